# Copyright 2026 The evl-hf authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Video processor for EVL: the authors' frame sampling and evaluation preprocessing, multi-view; decoding is in
`video_decoding_evl`."""

# Imported first: where transformers is older than EVL needs, it says so before the imports below fail.
from .transformers_requirement import TRANSFORMERS_REQUIREMENT  # noqa: F401  # isort: skip
import contextvars
import dataclasses
import functools

import numpy as np
import torch
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ChannelDimension, PILImageResampling, SizeDict
from transformers.processing_utils import Unpack, VideosKwargs
from transformers.utils import logging
from transformers.video_processing_utils import BaseVideoProcessor
from transformers.video_utils import VideoMetadata, make_batched_metadata, make_batched_videos

from .backbone_families import HUB_FILE_ARGUMENTS
from .video_decoding_evl import (
    _VIDEO_SOURCE_TYPES,
    DECODING_BACKENDS,
    EVLVideoDecodingError,
    _is_video_source,
    decode_video,
    resolve_decoding_backend,
)

logger = logging.get_logger(__name__)

# The decoding backend one call of a processor asked for: transformers hands a call's arguments to sampling and
# preprocessing but not to `_decode_and_sample_videos`. A context variable, so concurrent calls keep their own.
_CALL_DECODING_BACKEND: contextvars.ContextVar[str | None] = contextvars.ContextVar("decoding_backend", default=None)


class EVLVideoProcessorKwargs(VideosKwargs, total=False):
    """
    `fps` (transformers' argument) samples by time instead of `num_frames`: `duration * fps` frames spread evenly over
    the video (one per `1 / fps` seconds). It needs the video's frame rate (decoded files have it; for an array pass
    `video_metadata`) and excludes `num_frames`: giving both in one call is an error. A processor saved with `fps`
    samples by time unless a call gives `num_frames`. EVL checkpoints take a fixed number of frames, so `fps` suits
    feature extraction more than classification.

    sampling_rate (`int`, *optional*):
        Stride, in decoded frames, between the frames of one dense window (the authors use 16, or 8 for 32 frames).
    frame_sampling (`str`, *optional*):
        `"dense"` (a window of `num_frames` frames `sampling_rate` apart, the authors' protocol) or `"uniform"`
        (`num_frames` frames spread evenly over the whole video).
    num_temporal_views (`int`, *optional*):
        Temporal views per video: dense windows (or uniform offsets) spread evenly over the video.
    num_spatial_views (`int`, *optional*):
        1 (centre crop) or 3 (crops at both ends and the centre of the long side). A processor that resizes to a
        square without cropping (SigLIP's, ViT's) resizes the short side to that square's side for 3 views, keeping
        the aspect ratio, and takes the 3 squares along the long side.
    random_temporal_offset (`bool`, *optional*):
        Training augmentation: draw the dense window's start (or the uniform offsets) at random, following torch's
        global seed (`transformers.set_seed`).
    decoding_backend (`str`, *optional*):
        `"auto"` (torchcodec when it can load, else PyAV), `"torchcodec"` or `"pyav"`; see `decode_video`.
    antialias (`bool`, *optional*):
        Antialias when resizing. Off by default, as in the authors' evaluation (the released checkpoints' accuracy),
        which resizes frames as floats; on, 8-bit frames are resized as 8-bit, as image processors resize them.
    """

    sampling_rate: int | None
    frame_sampling: str | None
    num_temporal_views: int | None
    num_spatial_views: int | None
    random_temporal_offset: bool | None
    decoding_backend: str | None
    antialias: bool | None


# The name this module had before transformers' lookup (`<Processor>Kwargs`) was followed.
EVLVideosKwargs = EVLVideoProcessorKwargs


def _size_value(size, key: str):
    """A field of an image processor's size, whether a dict or a `SizeDict`."""
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def _python_numbers(value):
    """`value` with every numpy scalar in it (in dicts, lists and tuples too) as the Python number it holds."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {key: _python_numbers(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_python_numbers(item) for item in value)
    return value


def _check_positive(**values) -> None:
    # None means "the processor's default"; anything given must be a whole number of frames, views or a stride.
    for name, value in values.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _check_spatial_views(num_spatial_views, do_center_crop: bool, do_resize: bool, size) -> None:
    if num_spatial_views not in (1, 3):
        raise ValueError(f"num_spatial_views must be 1 or 3, got {num_spatial_views}.")
    side = _size_value(size, "height")
    square = do_resize and side is not None and side == _size_value(size, "width")
    if num_spatial_views == 3 and not do_center_crop and not square:
        raise ValueError(
            "num_spatial_views=3 takes 3 crops along each frame's long side: set do_center_crop=True (with a "
            "crop_size), or resize to a square, size={'height': S, 'width': S} (for 3 views the short side is then "
            "resized to S, keeping the aspect ratio)."
        )


def sample_frame_indices(
    total_num_frames: int,
    num_frames: int,
    sampling_rate: int = 16,
    frame_sampling: str = "dense",
    num_temporal_views: int = 1,
    random_temporal_offset: bool = False,
    generator: np.random.Generator | None = None,
) -> np.ndarray:
    """
    Frame indices of `num_temporal_views` clips of `num_frames` frames, concatenated view after view.

    Dense (the authors' protocol): a window of frames `sampling_rate` apart; one view is centred, several are spread
    evenly from the first to the last possible start, and `random_temporal_offset` draws the start uniformly. A video
    shorter than the window repeats its last frame, or, with `random_temporal_offset` (training), the last index of
    the window inside the video, as the authors' training sampler does (20 frames, 8 x 4:
    `[0, 4, 8, 12, 16, 16, 16, 16]`; evaluation: `[0, 4, 8, 12, 16, 19, 19, 19]`). Uniform: the video is cut into
    `num_frames` equal segments and one frame is taken per segment, at the same relative offset in each (centred,
    spread over views, or random).

    Random offsets are drawn from `generator`, or, without one, from a generator seeded by torch's default one, so
    `transformers.set_seed` (or `torch.manual_seed`) makes them reproducible.
    """
    if total_num_frames < 1:
        raise ValueError(f"Cannot sample frames from a video with {total_num_frames} frames.")
    _check_positive(num_frames=num_frames, sampling_rate=sampling_rate, num_temporal_views=num_temporal_views)
    if generator is None and random_temporal_offset:
        # Seeded from torch's default generator, which `transformers.set_seed` and `torch.manual_seed` seed (and a
        # DataLoader seeds per worker); drawn only for a random offset, so evaluation leaves the global state alone.
        generator = np.random.default_rng(int(torch.randint(2**63 - 1, ())))
    views = []
    if frame_sampling == "dense":
        window = (num_frames - 1) * sampling_rate + 1
        last_start = max(total_num_frames - window, 0)
        for view in range(num_temporal_views):
            if random_temporal_offset:
                start = int(generator.integers(0, last_start + 1))
            elif num_temporal_views == 1:
                start = last_start // 2
            else:
                # The authors' order of operations, so a start that lands on .5 rounds the same way.
                start = round(last_start / (num_temporal_views - 1) * view)
            indices = start + np.arange(num_frames) * sampling_rate
            if random_temporal_offset:
                # The authors' training sampler repeats the last index it could sample, their evaluation (and
                # ours) the video's last frame.
                indices[indices >= total_num_frames] = indices[indices < total_num_frames][-1]
            views.append(np.minimum(indices, total_num_frames - 1))
    elif frame_sampling == "uniform":
        segment = total_num_frames / num_frames
        for view in range(num_temporal_views):
            offset = generator.random() if random_temporal_offset else (view + 0.5) / num_temporal_views
            views.append(np.minimum((np.arange(num_frames) + offset) * segment, total_num_frames - 1).astype(np.int64))
    else:
        raise ValueError(f"frame_sampling must be 'dense' or 'uniform', got {frame_sampling!r}.")
    return np.concatenate(views).astype(np.int64)


class EVLVideoProcessor(BaseVideoProcessor):
    r"""
    Prepares clips for EVL the way the authors' evaluation does: decode (torchcodec, or PyAV where torchcodec is not
    installed or cannot read a file; both seek to the frames needed and pick the same frames, see `decode_video`),
    sample frames densely with a stride (or uniformly), resize the short side of float frames with bilinear
    interpolation and no antialiasing, centre-crop (or take 3 spatial crops at offsets `0, margin // 2, margin` of the
    long side), rescale and normalise with the OpenAI CLIP mean/std. On the authors' evaluation transform this matches
    to within 1e-5 (`tests/evl_reference_transform.py`); bicubic with antialias on uint8 frames, the defaults before,
    differed from it by 0.02 on average (normalised units, on a real clip). `resample` and `antialias` can be set for
    other preprocessing; a processor saved before keeps the `resample` it was saved with.

    Returns `pixel_values` of shape `(batch_size, num_frames, 3, crop_height, crop_width)`, or, with more than one
    view, `(batch_size, num_views, num_frames, 3, crop_height, crop_width)` (temporal-major view order), which
    `EVLForVideoClassification` averages.

    Inputs: paths, URLs, bytes, or decoded videos (arrays/tensors `(frames, height, width, 3)` or
    `(frames, 3, height, width)`, lists of PIL images), one or a list. Frames decoded from a file are known to be
    channels-last; for an array whose layout is ambiguous (frames 1 or 3 pixels tall) pass `input_data_format`.

    Frames given as an array: exactly `num_frames` of them are a clip already sampled and are used as they are (every
    temporal view is that clip); more are sampled like a decoded video; fewer raise a `ValueError` (a file that short
    repeats its last frame, as the authors' evaluation does). `do_sample_frames=False` takes any array as it is.
    Frames given with the `video_metadata` of a longer video and their indices in it (`frames_indices`, as
    `transformers.video_utils.load_video(path, num_frames=N)` gives): `num_frames` of them are used as they are, else
    the video is sampled as if decoded (stride and `fps` in its own frames), each frame the given one nearest; the
    returned `frames_indices` are the video's. Otherwise, without `frames_indices` (or with indices outside the video),
    such frames are a `ValueError`.

    ```python
    >>> import numpy as np
    >>> from evl_hf import EVLVideoProcessor

    >>> processor = EVLVideoProcessor()  # 8 frames, 16 apart, 224x224 centre crop
    >>> clip = np.random.randint(0, 256, (8, 240, 320, 3), dtype=np.uint8)  # already 8 frames: used as they are
    >>> processor(clip, return_tensors="pt")["pixel_values"].shape
    torch.Size([1, 8, 3, 224, 224])
    ```
    """

    resample = PILImageResampling.BILINEAR
    antialias = False
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    size = {"shortest_edge": 224}
    default_to_square = False
    crop_size = {"height": 224, "width": 224}
    do_resize = True
    do_center_crop = True
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    do_convert_rgb = True
    do_sample_frames = True
    num_frames = 8
    fps = None
    sampling_rate = 16
    frame_sampling = "dense"
    num_temporal_views = 1
    num_spatial_views = 1
    random_temporal_offset = False
    decoding_backend = "auto"
    valid_kwargs = EVLVideoProcessorKwargs
    model_input_names = ["pixel_values"]

    def __init__(self, **kwargs: Unpack[EVLVideoProcessorKwargs]):
        super().__init__(**kwargs)
        _check_positive(num_frames=self.num_frames, sampling_rate=self.sampling_rate,
                        num_temporal_views=self.num_temporal_views)  # fmt: skip
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"fps must be positive, got {self.fps!r}.")
        _check_spatial_views(self.num_spatial_views, self.do_center_crop, self.do_resize, self.size)
        if self.frame_sampling not in ("dense", "uniform"):
            raise ValueError(f"frame_sampling must be 'dense' or 'uniform', got {self.frame_sampling!r}.")
        if self.decoding_backend not in DECODING_BACKENDS:
            raise ValueError(f"decoding_backend must be one of {DECODING_BACKENDS}, got {self.decoding_backend!r}.")

    def to_dict(self) -> dict:
        # Numbers given as numpy scalars (a size, a mean, a frame count set later) are written as Python ones: the
        # JSON that `save_pretrained` writes takes no numpy type, and failed half way through the file.
        return _python_numbers(super().to_dict())

    @classmethod
    def from_dict(cls, video_processor_dict: dict, **kwargs):
        if "antialias" not in video_processor_dict and "resample" in video_processor_dict:
            # Saved (every field) before the authors' evaluation preprocessing became the default: keep that
            # version's antialiased resize, and say how to get the authors' (which the released checkpoints' accuracy
            # depends on). A dict listing some fields only takes the class defaults for the others.
            logger.warning(
                "This video processor was saved by an earlier evl-hf and keeps its resampling with antialias. The "
                "authors' evaluation resizes bilinearly without antialias: set resample=2 (bilinear) and "
                "antialias=False, and save it again."
            )
            video_processor_dict = {**video_processor_dict, "antialias": True}
        return super().from_dict(video_processor_dict, **kwargs)

    @classmethod
    def from_model_config(cls, config, preset: str | None = None, **kwargs) -> "EVLVideoProcessor":
        """
        The processor for a model of this `EVLConfig`, as the authors prepare its clips: `config.num_frames` frames
        with stride 16 (8 for 32 frames or more), short side and crop at the backbone's image size, normalised with
        the mean / std of the backbone family's released processors (CLIP's own, 0.5 / 0.5 for SigLIP and ViT, the
        ImageNet ones for DINOv2); `from_backbone_pretrained` takes a checkpoint's own settings instead. With `preset`
        (one of `EVL_PRESETS`), that preset's stride and evaluation views. `kwargs` override any field. The converter
        and the training script build their processors here.

        Example:

        ```python
        >>> from evl_hf import EVLConfig, EVLVideoProcessor
        >>> processor = EVLVideoProcessor.from_model_config(EVLConfig.from_preset("k400-vit-b16-32f"))
        >>> processor.num_frames, processor.sampling_rate, processor.crop_size["height"]
        (32, 8, 224)
        ```
        """
        from .backbone_families import backbone_family

        size = getattr(config, "frame_size", config.vision_config.image_size)
        family = backbone_family(config.vision_config)
        values = dict(
            num_frames=config.num_frames, sampling_rate=8 if config.num_frames >= 32 else 16,
            size={"shortest_edge": size}, crop_size={"height": size, "width": size},
            image_mean=list(family.image_mean), image_std=list(family.image_std),
        )  # fmt: skip
        if preset is not None:
            from .configuration_evl import EVL_PRESETS

            if preset not in EVL_PRESETS:
                raise ValueError(f"Unknown preset {preset!r}; choose one of {sorted(EVL_PRESETS)}.")
            protocol = EVL_PRESETS[preset]
            values.update({key: protocol[key] for key in ("sampling_rate", "num_spatial_views", "num_temporal_views")})
        values.update(kwargs)
        return cls(**values)

    @classmethod
    def from_backbone_pretrained(
        cls, pretrained_model_name_or_path, image_size: int | None = None, **kwargs
    ) -> "EVLVideoProcessor":
        """
        A processor that prepares frames as an image backbone's own image processor does (a Hub id or a directory
        holding its `preprocessor_config.json`): its resize (short side, or a fixed height x width), centre crop or
        none, whether it resizes and rescales at all, resampling, rescale factor and mean / std (one number for every
        channel is spread to the 3). SigLIP resizes to a square and normalises with 0.5 / 0.5, DINOv2 crops and uses
        the ImageNet mean / std, CLIP its own (for `num_spatial_views=3` a square resize keeps the aspect ratio, see
        `EVLVideoProcessorKwargs`). Those processors resize 8-bit frames as 8-bit, with antialias, so `antialias=True`,
        which does the same: the same pixels as their torchvision backend. Frame sampling keeps this class's defaults
        (8 frames, stride 16); `kwargs` override any field (`num_frames=`, `sampling_rate=`, ...). The Hub arguments
        that locate the backbone's files for `EVLForVideoClassification.from_backbone_pretrained` (`subfolder`,
        `revision`, `token`, `cache_dir`, ...) locate its image processor. `image_size` (the model's, for DINOv2 run at
        another size than its processor's crop) crops frames of that size, the resize scaled by as much (a 224 crop of
        a 256 short side becomes a 448 crop of a 512 one).
        """
        from transformers import AutoImageProcessor

        hub_kwargs = {key: kwargs.pop(key) for key in HUB_FILE_ARGUMENTS if key in kwargs}
        image_processor = AutoImageProcessor.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)

        def size_fields(size) -> dict:
            fields = {key: _size_value(size, key) for key in ("shortest_edge", "height", "width")}
            if fields["shortest_edge"] is not None:
                return {"shortest_edge": fields["shortest_edge"]}
            if fields["height"] is not None and fields["width"] is not None:
                return {"height": fields["height"], "width": fields["width"]}
            raise ValueError(
                f"{pretrained_model_name_or_path}: the image processor's size {size!r} is neither a short side nor a "
                "height and width."
            )

        size = size_fields(image_processor.size)
        do_center_crop = bool(getattr(image_processor, "do_center_crop", False))
        crop_size = size_fields(image_processor.crop_size) if do_center_crop else dict(size)
        if "shortest_edge" in crop_size:
            crop_size = {"height": crop_size["shortest_edge"], "width": crop_size["shortest_edge"]}
        if image_size is not None and (crop_size["height"], crop_size["width"]) != (image_size, image_size):
            scale = image_size / crop_size["height"]
            size = {key: round(value * scale) for key, value in size.items()}
            crop_size = {"height": image_size, "width": image_size}

        def per_channel(value) -> list:
            # Image processors take one number for every channel as well as one per channel.
            return [float(value)] * 3 if np.ndim(value) == 0 else [float(item) for item in value]

        values = dict(
            do_resize=bool(getattr(image_processor, "do_resize", True)),
            size=size, do_center_crop=do_center_crop, crop_size=crop_size, antialias=True,
            image_mean=per_channel(image_processor.image_mean), image_std=per_channel(image_processor.image_std),
            do_normalize=bool(getattr(image_processor, "do_normalize", True)),
            do_rescale=bool(getattr(image_processor, "do_rescale", True)),
            rescale_factor=getattr(image_processor, "rescale_factor", 1 / 255),
        )  # fmt: skip
        resample = getattr(image_processor, "resample", None)
        if resample is not None:
            values["resample"] = PILImageResampling(int(resample))
        values.update(kwargs)
        return cls(**values)

    def sample_frames(
        self,
        metadata: VideoMetadata,
        num_frames: int | None = None,
        sampling_rate: int | None = None,
        frame_sampling: str | None = None,
        num_temporal_views: int | None = None,
        random_temporal_offset: bool | None = None,
        given_frames: bool = False,
        fps: float | None = None,
        given_frame_indices=None,
        num_given_frames: int | None = None,
        **kwargs,
    ) -> np.ndarray:
        """
        Indices of the frames to take for every temporal view (see `sample_frame_indices`).

        `fps` (exclusive with `num_frames`; default `self.fps`): sample one frame per `1 / fps` seconds of the video
        instead, evenly over its whole length, which needs `metadata.fps`.

        `given_frames`: the frames were given as an array rather than decoded from a file. Such a clip of exactly
        `num_frames` frames is taken as already sampled and used as it is (for every temporal view); a longer one is
        sampled like a decoded video; a shorter one is an error, as in transformers' samplers (a file shorter than
        the window repeats its last frame instead, as the authors' evaluation does).

        `num_given_frames`: that many frames were given, taken from the longer video `metadata` describes, and
        `given_frame_indices` are their indices in it (one per frame; transformers' `load_video(path, num_frames=N)`).
        Exactly `num_frames` of them (without `fps`) are used as they are (the indices are not needed); otherwise the
        video is sampled as if decoded (`sampling_rate` and `fps` count in its own frames) and each index is the given
        frame nearest to it (ties: the earlier). The indices returned are positions in the given frames.
        """
        if given_frame_indices is not None and num_given_frames is None:
            num_given_frames = len(given_frame_indices)
        if num_given_frames is not None:
            total = metadata.total_num_frames
            given = None if given_frame_indices is None else np.asarray(given_frame_indices, dtype=np.int64)
            described = "no frames_indices" if given is None else f"{len(given)} frames_indices"
            not_each_frames_index = ValueError(
                f"{num_given_frames} frames were given with the metadata of a video of {total} frames and "
                f"{described}, not the index in that video of each frame given. Pass the frames without the metadata "
                "to sample among them as a video of their own, the video itself, or metadata whose frames_indices "
                "give each frame's index in the video."
            )
            # Indices given are checked whether they are needed or not: they are returned as the frames' own.
            if given is not None and len(given) != num_given_frames:
                raise not_each_frames_index
            if given is not None and len(given) and (given.min() < 0 or given.max() >= total):
                raise ValueError(
                    f"The metadata's frames_indices run from {given.min()} to {given.max()}, outside its video of "
                    f"{total} frames (total_num_frames): they do not describe the frames given."
                )
            if fps is None and num_frames is None:
                fps = self.fps
            views = self.num_temporal_views if num_temporal_views is None else num_temporal_views
            if fps is None and num_given_frames == (self.num_frames if num_frames is None else num_frames):
                return np.tile(np.arange(num_given_frames), views)
            if given is None:
                raise not_each_frames_index
            wanted = self.sample_frames(
                metadata, num_frames=num_frames, sampling_rate=sampling_rate, frame_sampling=frame_sampling,
                num_temporal_views=views, random_temporal_offset=random_temporal_offset, fps=fps,
            )  # fmt: skip
            # The nearest given frame, ties to the earlier: sorted by index, the first of the closest.
            order = np.argsort(given, kind="stable")
            distance = np.abs(given[order][None, :] - wanted[:, None])
            positions = order[np.argmin(distance, axis=1)]
            if len(np.unique(given[positions])) < len(np.unique(wanted)):
                logger.warning(
                    f"The {len(given)} frames given (of a video of {metadata.total_num_frames}) do not hold the "
                    f"{len(np.unique(wanted))} different frames sampled from it: the nearest stand in and some repeat. "
                    "Give the video itself, or the frames without `video_metadata` to sample among them."
                )
            return positions
        if fps is not None and num_frames is not None:
            raise ValueError("`num_frames` and `fps` are mutually exclusive arguments, please use only one!")
        if fps is None and num_frames is None:
            fps = self.fps
        # `is None`, not `or`: an explicit 0 is an error, never the default.
        num_temporal_views = self.num_temporal_views if num_temporal_views is None else num_temporal_views
        if random_temporal_offset is None:
            random_temporal_offset = self.random_temporal_offset
        total = metadata.total_num_frames
        if fps is not None:
            if not fps > 0:
                raise ValueError(f"fps must be positive, got {fps!r}.")
            if not metadata.fps:
                raise ValueError(
                    f"Sampling at fps={fps} needs the video's frame rate: pass `video_metadata` with `fps` (frames "
                    "decoded from a file have it), or `num_frames` instead."
                )
            num_frames = max(1, int(total / metadata.fps * fps))
            if num_frames > total:
                raise ValueError(
                    f"fps={fps} asks for {num_frames} frames, more than the video's {total} ({metadata.fps:g} fps)."
                )
            # One frame per 1/fps seconds: evenly spread over the whole video, whatever `frame_sampling` says.
            return sample_frame_indices(total, num_frames, frame_sampling="uniform",
                                        num_temporal_views=num_temporal_views,
                                        random_temporal_offset=random_temporal_offset)  # fmt: skip
        num_frames = self.num_frames if num_frames is None else num_frames
        if given_frames and total == num_frames:
            return np.tile(np.arange(total), num_temporal_views)
        if given_frames and total < num_frames:
            raise ValueError(
                f"The video has {total} frames, fewer than num_frames={num_frames}. Pass at least {num_frames} "
                "frames, the video file (short videos repeat their last frame), or do_sample_frames=False to use "
                "them as they are."
            )
        return sample_frame_indices(
            total,
            num_frames,
            self.sampling_rate if sampling_rate is None else sampling_rate,
            frame_sampling or self.frame_sampling,
            num_temporal_views,
            random_temporal_offset,
        )

    def preprocess(self, videos, **kwargs: Unpack[EVLVideoProcessorKwargs]) -> BatchFeature:
        # Checked before any decoding, sampled or not: `num_frames=0` is a mistake, not "the default".
        _check_positive(**{key: kwargs.get(key) for key in ("num_frames", "sampling_rate", "num_temporal_views")})
        # transformers fills every argument not given from the processor, so `sample_frames` would always see our
        # default `num_frames` next to an `fps`: decide here which one this call samples by.
        if kwargs.get("fps") is not None and kwargs.get("num_frames") is not None:
            raise ValueError("`num_frames` and `fps` are mutually exclusive arguments, please use only one!")
        if kwargs.get("num_frames") is not None:
            kwargs["fps"] = None
        elif kwargs.get("fps") is not None or self.fps is not None:
            kwargs["num_frames"] = None
        if _is_video_source(videos) and kwargs.get("input_data_format") is None:
            # Decoded frames are (frames, height, width, 3). Inferred, the layout of a frame 1 or 3 pixels tall is
            # ambiguous and read as channels first: a 1x1 video would come out grey.
            kwargs["input_data_format"] = ChannelDimension.LAST
        backend = kwargs.get("decoding_backend")
        if backend is not None and backend not in DECODING_BACKENDS:
            raise ValueError(f"decoding_backend must be one of {DECODING_BACKENDS}, got {backend!r}.")
        token = _CALL_DECODING_BACKEND.set(backend)
        try:
            return super().preprocess(videos, **kwargs)
        finally:
            _CALL_DECODING_BACKEND.reset(token)

    def _decode_and_sample_videos(self, videos, video_metadata, do_sample_frames=None, sample_indices_fn=None):
        if (
            isinstance(videos, (list, tuple)) and not _is_video_source(videos)
            and any(isinstance(v, _VIDEO_SOURCE_TYPES) for v in videos)
        ):  # fmt: skip
            # Files are decoded and sampled here; decoded frames go through transformers' path: one call does one.
            raise ValueError(
                "A list mixes video files (paths, URLs, bytes, file objects) with decoded frames; pass one kind per call."
            )
        if _is_video_source(videos):
            videos = [videos] if isinstance(videos, _VIDEO_SOURCE_TYPES) else videos
            sample = sample_indices_fn if do_sample_frames else None
            backend = _CALL_DECODING_BACKEND.get() or self.decoding_backend
            decoded = [decode_video(v, sample, backend=backend) for v in videos]
            return [frames for frames, _ in decoded], [metadata for _, metadata in decoded]
        if not do_sample_frames or sample_indices_fn is None:
            return super()._decode_and_sample_videos(videos, video_metadata, do_sample_frames, sample_indices_fn)
        # transformers samples an array as if it were a whole decoded video; tell `sample_frames` it is not.
        sample_indices_fn = functools.partial(sample_indices_fn, given_frames=True)
        if video_metadata is None:
            return super()._decode_and_sample_videos(videos, video_metadata, do_sample_frames, sample_indices_fn)
        videos = make_batched_videos(videos)
        video_metadata = make_batched_metadata(videos, video_metadata)
        video_metadata = [VideoMetadata(**m) if isinstance(m, dict) else m for m in video_metadata]  # a mixed list
        # Frames loaded with the metadata of their whole video (`transformers.video_utils.load_video(path,
        # num_frames=N)`) are fewer than its `total_num_frames`: the video is sampled in its own frames, from those
        # given, by their indices in it (`frames_indices`), which the frames used keep.
        whole, from_given = [], {}
        for position, (video, metadata) in enumerate(zip(videos, video_metadata)):
            total = metadata.total_num_frames
            if total is None:  # a copy: the frames given are the video
                video_metadata[position] = dataclasses.replace(metadata, total_num_frames=len(video))
            if total is None or total == len(video):
                whole.append(position)
                continue
            given = metadata.frames_indices
            positions = sample_indices_fn(metadata=metadata, given_frame_indices=given, num_given_frames=len(video))
            # A copy: the caller's metadata keeps describing the frames it loaded.
            used = None if given is None else np.asarray(given, dtype=np.int64)[positions]
            from_given[position] = video[positions], dataclasses.replace(metadata, frames_indices=used)
        sampled = dict(from_given)
        if whole:
            whole_videos, whole_metadata = super()._decode_and_sample_videos(
                [videos[i] for i in whole], [video_metadata[i] for i in whole], do_sample_frames, sample_indices_fn
            )
            sampled.update(zip(whole, zip(whole_videos, whole_metadata)))
        return [sampled[i][0] for i in range(len(videos))], [sampled[i][1] for i in range(len(videos))]

    def _spatial_crops(self, frames: torch.Tensor, crop_size: SizeDict, num_spatial_views: int) -> list[torch.Tensor]:
        if num_spatial_views == 1:
            return [self.center_crop(frames, crop_size)]
        # Three crops along the long side: start, centre, end (the authors' 3-crop testing).
        height, width = frames.shape[-2:]
        crop_height, crop_width = crop_size.height, crop_size.width
        if height < crop_height or width < crop_width:
            frames = self.center_crop(frames, SizeDict(height=max(height, crop_height), width=max(width, crop_width)))
            height, width = frames.shape[-2:]
        crops = []
        margin = width - crop_width if width >= height else height - crop_height
        for start in (0, margin // 2, margin):  # the authors floor the centre crop's offset
            if width >= height:
                top, left = (height - crop_height) // 2, start
            else:
                top, left = start, (width - crop_width) // 2
            crops.append(frames[..., top : top + crop_height, left : left + crop_width])
        return crops

    def resize_frames(
        self, frames: torch.Tensor, size: SizeDict, resample=None, antialias: bool | None = None
    ) -> torch.Tensor:
        """
        `frames` (T, C, H, W) resized to `size` as this processor resizes them (`resample` and `antialias` default to
        its own), returned as floats (0-255 for 8-bit frames). The authors resize float frames: resizing uint8 would
        round every resized pixel to an integer. Image processors (PIL, torchvision) resize 8-bit frames as 8-bit, with
        antialias: so does an antialiased resize here (`from_backbone_pretrained`'s, an earlier version's), to give the
        backbone's pixels. The training augmentation resizes its crops with it too.
        """
        resample = self.resample if resample is None else resample
        antialias = bool(self.antialias if antialias is None else antialias)
        eight_bit = antialias and frames.dtype == torch.uint8
        frames = frames if frames.is_floating_point() or eight_bit else frames.float()
        return self.resize(frames, size=size, resample=resample, antialias=antialias).float()

    def _preprocess(
        self,
        videos: list[torch.Tensor],
        do_resize: bool,
        size: SizeDict,
        resample,
        do_center_crop: bool,
        crop_size: SizeDict,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean,
        image_std,
        return_tensors=None,
        num_temporal_views: int | None = None,
        num_spatial_views: int | None = None,
        antialias: bool | None = None,
        **kwargs,
    ) -> BatchFeature:
        num_temporal_views = 1 if num_temporal_views is None else num_temporal_views
        num_spatial_views = 1 if num_spatial_views is None else num_spatial_views
        _check_positive(num_temporal_views=num_temporal_views)
        _check_spatial_views(num_spatial_views, do_center_crop, do_resize, size)
        if num_spatial_views > 1 and not do_center_crop:
            # A square resize without a crop (SigLIP's, ViT's) would give 3 equal crops of a squashed frame: resize
            # the short side to the square's side instead, and take the 3 squares along the long side (the authors'
            # 3-crop testing).
            size, crop_size, do_center_crop = SizeDict(shortest_edge=size.height), size, True
        processed = []
        for video in videos:
            if video.shape[0] % num_temporal_views:
                raise ValueError(
                    f"A video with {video.shape[0]} frames cannot be split into {num_temporal_views} temporal views; "
                    "let the processor sample frames (do_sample_frames=True) for multi-view evaluation."
                )
            if do_resize:
                video = self.resize_frames(video, size, resample, antialias)
            crops = self._spatial_crops(video, crop_size, num_spatial_views) if do_center_crop else [video]
            crops = [
                self.rescale_and_normalize(crop, do_rescale, rescale_factor, do_normalize, image_mean, image_std)
                for crop in crops
            ]
            # (spatial, temporal * frames, C, H, W) -> (temporal * spatial, frames, C, H, W)
            views = torch.stack(crops).unflatten(1, (num_temporal_views, -1)).transpose(0, 1).flatten(0, 1)
            processed.append(views[0] if views.shape[0] == 1 else views)
        if return_tensors and len({tuple(video.shape) for video in processed}) == 1:
            processed = torch.stack(processed)
        return BatchFeature(data={"pixel_values": processed}, tensor_type=return_tensors)


# `EVLVideoDecodingError`, `decode_video` and `resolve_decoding_backend` are re-exported for code that imported them
# from here before decoding had a module of its own.
__all__ = [
    "EVLVideoDecodingError",
    "EVLVideoProcessor",
    "EVLVideoProcessorKwargs",
    "decode_video",
    "resolve_decoding_backend",
    "sample_frame_indices",
]
