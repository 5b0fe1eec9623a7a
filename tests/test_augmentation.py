"""
`ClipRandAugment` against the EVL authors' recipe `rand-m7-n4-mstd0.5-inc1` (OpenGVLab/efficient-video-recognition,
`video_dataset/`): timm's RandAugment, the same draws for every frame of a clip, reproducible from a seed.
"""

import random

import numpy as np
import pytest
import torch
from helpers import run_without_packages
from PIL import Image
from timm.data import auto_augment  # part of the test install: a missing timm fails, never skips

from evl_hf.data.augmentation import ClipRandAugment, seeded_global_rngs


# The authors' op sets, copied from their `video_dataset/rand_augment.py` (a SlowFast copy of timm's).
AUTHORS_INCREASING_OPS = [
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
    "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
    "TranslateXRel", "TranslateYRel",
]  # fmt: skip
AUTHORS_PLAIN_OPS = [
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color", "Contrast",
    "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
]  # fmt: skip


def textured_clip(num_frames: int, height: int = 24, width: int = 32, seed: int = 0) -> torch.Tensor:
    """Different frames (gradients plus noise, so every op, AutoContrast and Equalize too, changes them)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width]
    frames = []
    for _ in range(num_frames):
        slope = rng.uniform(1, 4, size=3)
        base = (rows[..., None] * slope + cols[..., None] * slope[::-1]) % 200 + 20
        frames.append(np.clip(base + rng.normal(0, 10, size=base.shape), 0, 255))
    return torch.from_numpy(np.stack(frames).astype(np.uint8)).permute(0, 3, 1, 2).contiguous()


@pytest.fixture
def op_log(monkeypatch):
    """Record every op timm's RandAugment chooses, in order: (name, level args) if applied, (name, None) if skipped."""
    log = []
    original_call = auto_augment.AugmentOp.__call__

    def recording_call(op, img):
        applied_args = []
        aug_fn = op.aug_fn

        def recording_aug_fn(image, *level_args, **kwargs):
            applied_args.append(level_args)
            return aug_fn(image, *level_args, **kwargs)

        op.aug_fn = recording_aug_fn
        try:
            result = original_call(op, img)
        finally:
            op.aug_fn = aug_fn
        log.append((op.name, applied_args[0] if applied_args else None))
        return result

    monkeypatch.setattr(auto_augment.AugmentOp, "__call__", recording_call)
    return log


def authors_clip_augment(augment: ClipRandAugment, frames: torch.Tensor, seed: int) -> torch.Tensor:
    """
    The authors' video RandAugment, transliterated: `RandAugment.__call__` chooses the ops once and each
    `AugmentOp.__call__` draws apply/skip, magnitude and sign once, then maps the op over the list of frames.
    """
    images = [Image.fromarray(frame.permute(1, 2, 0).numpy()) for frame in frames]
    transform = augment.timm_transform(frames.shape[2], frames.shape[3])
    with seeded_global_rngs(seed):
        for op in np.random.choice(transform.ops, transform.num_layers, replace=True):
            if op.prob < 1.0 and random.random() > op.prob:
                continue
            magnitude = random.gauss(op.magnitude, op.magnitude_std) if op.magnitude_std > 0 else op.magnitude
            magnitude = min(10.0, max(0.0, magnitude))
            level_args = op.level_fn(magnitude, op.hparams) if op.level_fn is not None else ()
            images = [op.aug_fn(image, *level_args, **op.kwargs) for image in images]
    return torch.stack([torch.from_numpy(np.array(image)).permute(2, 0, 1) for image in images])


def authors_rotation_violations(angles: list[float], num_draws: int) -> list[str]:
    """
    How a sample of Rotate draws departs from `m7-mstd0.5`, p=0.5: timm rotates by 30 * m / 10 degrees with
    m ~ N(7, 0.5) clipped to [0, 10] (so |angle| ~ N(21, 1.5)), with a random sign, on half of the draws.
    """
    angles = np.asarray(angles, dtype=float)
    magnitudes = np.abs(angles)
    violations = []
    if not 0.45 < len(angles) / num_draws < 0.55:
        violations.append(f"applied on {len(angles)} of {num_draws} draws, not about half")
    if magnitudes.max() > 30.0 or magnitudes.min() <= 7.0:
        violations.append(f"|angle| in [{magnitudes.min():.2f}, {magnitudes.max():.2f}], not within (7, 30]")
    if abs(magnitudes.mean() - 21.0) > 0.5:
        violations.append(f"mean |angle| {magnitudes.mean():.2f}, not about 21")
    if not 1.2 < magnitudes.std() < 1.8:
        violations.append(f"std of |angle| {magnitudes.std():.2f}, not about 1.5 (3 x the magnitude std 0.5)")
    if not 0.44 < np.mean(angles > 0) < 0.56:
        violations.append(f"{np.mean(angles > 0):.2f} of the angles positive, not about half")
    return violations


def test_recipe_is_the_authors_policy_through_timm():
    augment = ClipRandAugment()
    assert augment.config_str == "rand-m7-n4-mstd0.5-p0.5-inc1"
    transform = augment.timm_transform(240, 320)
    assert isinstance(transform, auto_augment.RandAugment)
    assert transform.num_layers == 4 and transform.choice_weights is None  # 4 ops, uniform, with replacement
    assert [op.name for op in transform.ops] == AUTHORS_INCREASING_OPS
    for op in transform.ops:
        assert (op.prob, op.magnitude, op.magnitude_std) == (0.5, 7, 0.5)
        assert op.kwargs == {"fillcolor": (128, 128, 128), "resample": Image.Resampling.BICUBIC}
        assert op.hparams["translate_const"] == int(240 * 0.45)  # as the authors' `create_random_augment` derives it

    plain = ClipRandAugment(increasing=False).timm_transform(240, 320)
    assert [op.name for op in plain.ops] == AUTHORS_PLAIN_OPS


def test_a_clip_of_one_repeated_image_stays_one_repeated_image():
    clip = textured_clip(1).repeat(6, 1, 1, 1)
    augment = ClipRandAugment()
    changed = 0
    for seed in range(40):
        out = augment(clip, seed=seed)
        assert out.shape == clip.shape and out.dtype == torch.uint8
        assert (out == out[:1]).all(), f"seed {seed}: frames augmented differently"
        changed += not torch.equal(out, clip)
    # All 4 ops are skipped with probability 1/16: the transform must do something on most clips.
    assert changed >= 30


def test_every_frame_gets_the_same_ops_magnitudes_and_skips(op_log):
    augment = ClipRandAugment()
    num_frames = 5
    for seed in range(30):
        op_log.clear()
        augment(textured_clip(num_frames, seed=seed), seed=seed)
        assert len(op_log) == 4 * num_frames
        per_frame = [op_log[index * 4 : (index + 1) * 4] for index in range(num_frames)]
        assert all(draws == per_frame[0] for draws in per_frame), f"seed {seed}: {per_frame}"


def test_matches_the_authors_draw_once_per_clip_pixel_for_pixel():
    augment = ClipRandAugment()
    for seed in range(30):
        clip = textured_clip(4, seed=seed)
        torch.testing.assert_close(augment(clip, seed=seed), authors_clip_augment(augment, clip, seed), rtol=0, atol=0)


def test_each_frame_is_augmented_as_if_alone():
    augment = ClipRandAugment()
    clip = textured_clip(5)
    for seed in (0, 7, 2**63 - 1):
        out = augment(clip, seed=seed)
        for index in range(len(clip)):
            assert torch.equal(out[index], augment(clip[index : index + 1], seed=seed)[0])


def test_four_ops_per_clip_drawn_from_the_whole_set(op_log):
    augment = ClipRandAugment()
    clip = textured_clip(1)
    for seed in range(300):
        augment(clip, seed=seed)
    assert len(op_log) == 4 * 300
    chosen = {name for name, _ in op_log}
    assert chosen == set(AUTHORS_INCREASING_OPS)
    applied = sum(args is not None for _, args in op_log)
    assert 0.45 < applied / len(op_log) < 0.55


def test_rotation_angles_follow_magnitude_7_with_noise(op_log):
    augment = ClipRandAugment(op_names=["Rotate"])
    clip = textured_clip(1)
    num_clips = 500
    for seed in range(num_clips):
        augment(clip, seed=seed)
    assert len(op_log) == 4 * num_clips
    angles = [args[0] for _, args in op_log if args is not None]
    assert authors_rotation_violations(angles, len(op_log)) == []


def test_magnitudes_are_clipped_to_timm_level_10(op_log):
    # At m10 the noise pushes half the magnitudes above 10: clipped, they rotate by exactly 30 degrees.
    augment = ClipRandAugment(magnitude=10, op_names=["Rotate"])
    clip = textured_clip(1)
    for seed in range(200):
        augment(clip, seed=seed)
    magnitudes = np.abs([args[0] for _, args in op_log if args is not None])
    assert magnitudes.max() == pytest.approx(30.0)
    assert 0.4 < np.mean(np.isclose(magnitudes, 30.0)) < 0.6


def test_torchvision_randaugment_4_7_rotates_far_less():
    """The old augmentation, `v2.RandAugment(num_ops=4, magnitude=7)`: 31 bins, so m7 is 7/30 of 30 degrees."""
    from torchvision.transforms import v2

    old = v2.RandAugment(num_ops=4, magnitude=7)
    angles, num_rotate_draws = [], 0
    apply_transform = old._apply_image_or_video_transform

    def recording_apply(image, transform_id, magnitude, *args, **kwargs):
        nonlocal num_rotate_draws
        if transform_id == "Rotate":
            num_rotate_draws += 1
            if magnitude != 0:
                angles.append(magnitude)
        return apply_transform(image, transform_id, magnitude, *args, **kwargs)

    old._apply_image_or_video_transform = recording_apply
    clip = textured_clip(2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for _ in range(500):
            old(clip)
    assert max(abs(angle) for angle in angles) == pytest.approx(7.0)
    # The distribution check that `ClipRandAugment` passes fails for the old transform.
    violations = authors_rotation_violations(angles, num_rotate_draws)
    assert any("not within (7, 30]" in v for v in violations) and any("not about 21" in v for v in violations)


def test_same_seed_same_clip_other_seed_other_clip():
    augment = ClipRandAugment()
    clip = textured_clip(3)
    assert torch.equal(augment(clip, seed=5), augment(clip, seed=5))
    assert torch.equal(augment(clip, seed=2**63 - 1), augment(clip, seed=2**63 - 1))
    outputs = {augment(clip, seed=seed).numpy().tobytes() for seed in range(20)}
    assert len(outputs) >= 15  # two seeds agree only when both skip everything (1/16 each) or draw alike


def test_independent_of_and_invisible_to_global_random_states():
    augment = ClipRandAugment()
    clip = textured_clip(3)
    reference = augment(clip, seed=11)

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    python_state, numpy_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    assert torch.equal(augment(clip, seed=11), reference)
    assert random.getstate() == python_state
    after = np.random.get_state()
    assert after[0] == numpy_state[0] and np.array_equal(after[1], numpy_state[1]) and after[2:] == numpy_state[2:]
    assert torch.equal(torch.get_rng_state(), torch_state)


def test_without_timm_it_says_how_to_install_it(tmp_path):
    # timm comes with the `train` extra: a core install raised a bare "No module named 'timm'".
    script = "from evl_hf.data.augmentation import ClipRandAugment; ClipRandAugment()"
    result = run_without_packages({"timm"}, ["-c", script], tmp_path)
    assert result.returncode != 0, result.stdout
    assert 'needs timm: pip install "evl-hf[train]"' in result.stderr, result.stderr[-3000:]


def test_rejects_what_it_cannot_augment():
    augment = ClipRandAugment()
    with pytest.raises(ValueError, match="uint8"):
        augment(textured_clip(2).float(), seed=0)
    with pytest.raises(ValueError, match="uint8"):
        augment(textured_clip(2)[:, :1], seed=0)
    with pytest.raises(ValueError, match="non-negative"):
        augment(textured_clip(2), seed=-1)
    with pytest.raises(ValueError, match="magnitude"):
        ClipRandAugment(magnitude=7.5)
    with pytest.raises(ValueError, match="Unknown"):
        ClipRandAugment(op_names=["Rotation"])
    with pytest.raises(ValueError, match="interpolation"):
        ClipRandAugment(interpolation="cubic")
