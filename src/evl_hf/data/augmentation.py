"""
RandAugment for video clips, as the EVL authors train with it: timm's RandAugment with the policy
`rand-m7-n4-mstd0.5-inc1`, its random choices drawn once per clip and applied to every frame.
"""

import operator
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Callable

import numpy as np
import torch
from PIL import Image


@contextmanager
def seeded_global_rngs(seed: int) -> Iterator[Callable[[], None]]:
    """
    Seed Python's `random` and NumPy's global state from `seed` for the duration of the block, then restore both.

    timm's RandAugment draws from these global states (`random` for the apply/skip decisions, magnitudes and signs,
    `numpy.random` for the op choice) and takes no generator. The block receives a `rewind` callable that resets
    both states to their freshly seeded values, so the same draws can be replayed. Not thread-safe: another thread
    using the global states during the block would both disturb and be disturbed (dataloader workers are processes).
    """
    seed = operator.index(seed)
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}.")
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        random.seed(seed)
        # `np.random.seed` takes 32-bit words only; SeedSequence spreads a seed of any size over four of them.
        np.random.seed(np.random.SeedSequence(seed).generate_state(4))
        seeded_python, seeded_numpy = random.getstate(), np.random.get_state()

        def rewind() -> None:
            random.setstate(seeded_python)
            np.random.set_state(seeded_numpy)

        yield rewind
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def _timm_auto_augment():
    """timm's RandAugment module; timm comes with the `train` extra."""
    try:
        from timm.data import auto_augment
    except ImportError as error:  # an optional extra: say how to get it
        raise ImportError('RandAugment (ClipRandAugment) needs timm: pip install "evl-hf[train]"') from error
    return auto_augment


class ClipRandAugment:
    """
    The EVL authors' RandAugment for training clips, through timm's implementation
    (`timm.data.auto_augment.rand_augment_transform`), with the same ops, magnitudes and apply/skip decisions for
    every frame of a clip.

    The recipe (the authors' `--auto_augment rand-m7-n4-mstd0.5-inc1`, in all their training scripts):
    - `num_ops=4` ops per clip, drawn uniformly with replacement from timm's 15 RandAugment ops, by default the
      "increasing" set (`inc1`): AutoContrast, Equalize, Invert, Rotate, PosterizeIncreasing, SolarizeIncreasing,
      SolarizeAdd, ColorIncreasing, ContrastIncreasing, BrightnessIncreasing, SharpnessIncreasing, ShearX, ShearY,
      TranslateXRel, TranslateYRel (`increasing=False`: timm's plain `rand` set, Posterize, Solarize, Color, ...).
    - each op applied with probability `prob=0.5`;
    - `magnitude=7` out of timm's 10 levels, with gaussian noise: each applied op draws its magnitude from
      N(7, `magnitude_std=0.5`), clipped to [0, 10], and uses magnitude/10 of its range (e.g. Rotate: up to 30
      degrees at 10, so about 21 here) with a random sign for the signed ops;
    - uncovered pixels filled with grey `fill=(128, 128, 128)` (the authors pass no `img_mean`, so timm's default),
      bicubic resampling (their `--interpolation` default), `translate_const = 0.45 * min(height, width)`.

    The authors (OpenGVLab/efficient-video-recognition, `video_dataset/`) build this transform for each clip at the
    decoded frame size and run it on the list of a clip's frames as PIL images; their copy of timm's `AugmentOp`
    draws once and applies the result to every image of the list. Here timm's per-image transform runs on each frame
    from the same seeded random state, which makes the same draws for every frame: no draw depends on the pixels.

    Input: a (T, 3, H, W) uint8 clip and a non-negative integer seed; output: a new (T, 3, H, W) uint8 clip. The
    output depends on (clip, seed) only; the global `random`/NumPy states are restored afterwards and torch's
    generator is not used.
    """

    def __init__(
        self,
        num_ops: int = 4,
        magnitude: int = 7,
        magnitude_std: float = 0.5,
        prob: float = 0.5,
        increasing: bool = True,
        fill: tuple[int, int, int] = (128, 128, 128),
        interpolation: str = "bicubic",
        op_names: Sequence[str] | None = None,
    ):
        known_ops = _timm_auto_augment().NAME_TO_OP

        if not isinstance(num_ops, int) or num_ops < 0:
            raise ValueError(f"num_ops must be a non-negative integer, got {num_ops!r}.")
        # timm's policy string only takes an integer magnitude ('m7'), on its 0-10 scale.
        if not isinstance(magnitude, int) or not 0 <= magnitude <= 10:
            raise ValueError(f"magnitude must be an integer in [0, 10] (timm's levels), got {magnitude!r}.")
        if magnitude_std < 0 or not 0 <= prob <= 1:
            raise ValueError(f"Need magnitude_std >= 0 and prob in [0, 1], got {magnitude_std} and {prob}.")
        unknown = sorted(set(op_names or ()) - set(known_ops))
        if unknown:
            raise ValueError(f"Unknown timm RandAugment ops {unknown}; known: {sorted(known_ops)}.")
        self.config_str = f"rand-m{magnitude}-n{num_ops}-mstd{magnitude_std}-p{prob}"
        if increasing:
            self.config_str += "-inc1"
        self.fill = tuple(fill)
        if interpolation.upper() not in Image.Resampling.__members__:
            raise ValueError(f"Unknown interpolation {interpolation!r}; known: {list(Image.Resampling.__members__)}.")
        self.resample = Image.Resampling[interpolation.upper()]
        # None: the set the policy string selects; a list (e.g. ["Rotate"]) restricts the choice, for analysis.
        self.op_names = list(op_names) if op_names is not None else None

    def timm_transform(self, height: int, width: int):
        """timm's RandAugment for one image of this size, with the hparams the authors' `create_random_augment` gives."""
        hparams = {
            # Only absolute translations use it (not in either default op set); passed as the authors do.
            "translate_const": int(min(height, width) * 0.45),
            "img_mean": self.fill,
            "interpolation": self.resample,
        }
        return _timm_auto_augment().rand_augment_transform(self.config_str, hparams, transforms=self.op_names)

    def __call__(self, frames: torch.Tensor, seed: int) -> torch.Tensor:
        if frames.ndim != 4 or frames.shape[1] != 3 or frames.dtype != torch.uint8:
            raise ValueError(
                f"Expected a (T, 3, H, W) uint8 clip, got shape {tuple(frames.shape)} and dtype {frames.dtype}."
            )
        pixels = frames.detach().permute(0, 2, 3, 1).cpu().numpy()  # (T, H, W, C), the layout PIL reads
        augmented = np.empty_like(pixels)
        transform = self.timm_transform(*pixels.shape[1:3])
        with seeded_global_rngs(seed) as rewind:
            for index, frame in enumerate(pixels):
                rewind()  # every frame replays the clip's draws: same ops, magnitudes, signs and skips
                augmented[index] = np.asarray(transform(Image.fromarray(np.ascontiguousarray(frame))))
        return torch.from_numpy(augmented).permute(0, 3, 1, 2).contiguous().to(frames.device)

    def __repr__(self) -> str:
        ops = "" if self.op_names is None else f", op_names={self.op_names}"
        return f"{type(self).__name__}({self.config_str!r}, fill={self.fill}, resample={self.resample.name}{ops})"
