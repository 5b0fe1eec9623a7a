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
"""Video processor for EVL: torchcodec or PyAV decoding with seeking, the authors' frame sampling, CLIP preprocessing, multi-view."""

import functools
import io
import time
from pathlib import Path

import numpy as np
import torch
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ChannelDimension, PILImageResampling, SizeDict
from transformers.processing_utils import Unpack, VideosKwargs
from transformers.utils import is_av_available, is_torchcodec_usable, logging
from transformers.video_processing_utils import BaseVideoProcessor
from transformers.video_utils import VideoMetadata


# Optional decoders, guarded (as transformers' own files do) so that transformers' remote-code check, which requires
# every unguarded import, loads this file where they are not installed.
if is_av_available():
    import av

logger = logging.get_logger(__name__)

DECODING_BACKENDS = ("auto", "torchcodec", "pyav")
# Frames fetched per torchcodec call: small enough that the decoding timeout is checked often.
_TORCHCODEC_CHUNK = 16
# FFmpeg's decoding threads pay off on large frames; on small ones (Kinetics clips are about 340x256) synchronising
# them costs more than they save: 1.25-1.4x the single-threaded time with either backend (benchmarks/bench_decoding.py).
_SINGLE_THREAD_MAX_PIXELS = 160_000
_VIDEO_SOURCE_TYPES = (str, Path, bytes, bytearray, io.IOBase)


class EVLVideoDecodingError(ValueError):
    """A video could not be opened or decoded; the message names the file and the problem."""


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
        1 (centre crop) or 3 (crops at both ends and the centre of the long side).
    random_temporal_offset (`bool`, *optional*):
        Training augmentation: draw the dense window's start (or the uniform offsets) at random.
    decoding_backend (`str`, *optional*):
        `"auto"` (torchcodec when it can load, else PyAV), `"torchcodec"` or `"pyav"`; see `decode_video`.
    antialias (`bool`, *optional*):
        Antialias when resizing. Off by default, as in the authors' evaluation (the released checkpoints' accuracy).
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


@functools.cache
def _torchcodec_can_decode_video() -> bool:
    # torchcodec's native libraries must match torch and find FFmpeg's shared libraries; transformers checks both.
    return is_torchcodec_usable(decode="video")


def resolve_decoding_backend(backend: str = "auto") -> str:
    """The backend `decode_video` uses for `backend`: `"auto"` is torchcodec when it can decode video, else PyAV."""
    if backend not in DECODING_BACKENDS:
        raise ValueError(f"decoding_backend must be one of {DECODING_BACKENDS}, got {backend!r}.")
    if backend == "auto":
        return "torchcodec" if _torchcodec_can_decode_video() else "pyav"
    if backend == "torchcodec" and not _torchcodec_can_decode_video():
        raise ImportError(
            "decoding_backend='torchcodec' needs torchcodec built for the installed torch and FFmpeg's shared "
            "libraries (e.g. `apt-get install ffmpeg`); see https://github.com/meta-pytorch/torchcodec#installing-torchcodec. "
            "Use decoding_backend='pyav' (or 'auto') to decode with PyAV."
        )
    return backend


def _is_video_source(videos) -> bool:
    """Whether `videos` is one file (path, URL, bytes, file object) or a list of them, for `decode_video`."""
    if isinstance(videos, _VIDEO_SOURCE_TYPES):
        return True
    return isinstance(videos, (list, tuple)) and bool(videos) and all(isinstance(v, _VIDEO_SOURCE_TYPES) for v in videos)


def _video_name(source) -> str:
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes of video>"
    if isinstance(source, io.IOBase):
        return getattr(source, "name", "<file object>")
    return str(source)


def _open_source(source, timeout: float):
    """Return something `av.open` accepts, with clear errors for missing paths, directories, empty files and URLs."""
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise EVLVideoDecodingError(f"{_video_name(source)}: the video is empty (0 bytes).")
        return io.BytesIO(source)
    if isinstance(source, io.IOBase):
        return source
    text = str(source)
    if text.startswith(("http://", "https://")):
        from huggingface_hub.utils import httpx

        try:
            response = httpx.get(text, follow_redirects=True, timeout=timeout)
            response.raise_for_status()
        except Exception as error:
            raise EVLVideoDecodingError(f"{text}: cannot download the video ({type(error).__name__}: {error}).") from None
        return io.BytesIO(response.content)
    path = Path(text)
    if not path.exists():
        raise EVLVideoDecodingError(f"{text}: no such file.")
    if path.is_dir():
        raise EVLVideoDecodingError(f"{text}: is a directory, not a video file.")
    if path.stat().st_size == 0:
        raise EVLVideoDecodingError(f"{text}: the file is empty (0 bytes).")
    return text


def decode_video(
    source,
    sample_indices_fn=None,
    max_frame_pixels: int = 4096 * 4096,
    timeout: float = 120.0,
    stats: dict | None = None,
    backend: str = "auto",
) -> tuple[np.ndarray, VideoMetadata]:
    """
    Decode the frames of `source` (a path, an http(s) URL, bytes or a file object) that `sample_indices_fn(metadata)`
    asks for, as a `(num_indices, height, width, 3)` uint8 array, plus the video's metadata.

    Only what is needed is decoded: the demuxer seeks to the key frame before the first wanted frame and decoding stops
    after the last one. Frame `i` is the frame shown at `i / fps` seconds (the container's frame count and average rate,
    so both backends pick the same frames). Indices past the real end of the stream (containers that over-report their
    length) repeat the last decoded frame, as the authors do for clips shorter than the sampling window. Display
    rotation (phone videos) is applied. Any failure raises `EVLVideoDecodingError` naming the video and the problem.
    Frames over `max_frame_pixels`, decoding past `timeout` seconds and still images (a photo renamed `.mp4`, which
    FFmpeg would open as a one-frame video) are refused.

    `backend`: `"torchcodec"`, `"pyav"`, or `"auto"` (torchcodec when it can load, else PyAV). A video torchcodec
    cannot handle (a stream with no frame count or duration to seek by, a damaged file, ...) is decoded with PyAV
    instead, so torchcodec never fails a video that PyAV decodes. `stats`, when given, receives `backend` (the one
    that decoded the video) and, for PyAV, `decoded_frames` (how many frames were decoded).
    """
    backend = resolve_decoding_backend(backend)
    name = _video_name(source)
    started = time.monotonic()
    opened = _open_source(source, timeout)
    if isinstance(opened, io.IOBase) and not opened.seekable():
        backend = "pyav"  # torchcodec seeks in file objects, and a failed try could not be rewound for PyAV
    if backend == "torchcodec":
        start_position = opened.tell() if isinstance(opened, io.IOBase) else None
        try:
            result = _decode_with_torchcodec(
                opened, start_position, name, sample_indices_fn, max_frame_pixels, timeout, started
            )
        except EVLVideoDecodingError:
            raise  # a size or time limit: PyAV would refuse the video the same way
        except Exception as error:
            logger.info(f"{name}: torchcodec cannot decode it ({type(error).__name__}: {error}); decoding with PyAV.")
            if start_position is not None:
                opened.seek(start_position)
        else:
            if stats is not None:
                stats["backend"] = "torchcodec"
            return result
    if stats is not None:
        stats["backend"] = "pyav"
    return _decode_with_pyav(opened, name, sample_indices_fn, max_frame_pixels, timeout, started, stats)


def _check_frame_size(name: str, width: int, height: int, max_frame_pixels: int) -> None:
    if width * height > max_frame_pixels:
        raise EVLVideoDecodingError(
            f"{name}: frames are {width}x{height}, over the {max_frame_pixels}-pixel limit for decoding."
        )


def _check_not_still_image(name: str, demuxer: str | None, codec: str | None, total: int | None) -> None:
    # FFmpeg opens a photo (one renamed .mp4) as a one-frame video, which would train and evaluate as num_frames
    # copies of itself. Its still-image demuxers are `image2` and the `*_pipe` family; a GIF has a demuxer of its own.
    if demuxer is not None and (demuxer == "image2" or demuxer.endswith("_pipe")):
        raise EVLVideoDecodingError(f"{name}: the file is a still image ({codec or demuxer}), not a video.")
    if codec == "gif" and total == 1:
        raise EVLVideoDecodingError(f"{name}: the file is a still image (a one-frame GIF), not a video.")


def _check_time(name: str, started: float, timeout: float) -> None:
    if time.monotonic() - started > timeout:
        raise EVLVideoDecodingError(f"{name}: decoding took longer than {timeout:.0f}s; giving up.")


def _decode_with_torchcodec(opened, start_position, name, sample_indices_fn, max_frame_pixels, timeout, started):
    """
    Decode with torchcodec, or raise (anything but `EVLVideoDecodingError`) for `decode_video` to fall back to PyAV.
    `start_position` is where a file object `opened` starts (None for a path). Approximate seek mode: the
    frame count, rate and key frames come from the container's index, so opening a long video does not read all of it
    (exact mode scans every packet first).
    """
    try:  # guarded for transformers' remote-code check; `resolve_decoding_backend` checked that it loads
        from torchcodec.decoders import VideoDecoder
    except ImportError as error:  # `decode_video` decodes with PyAV instead
        raise ImportError(f"torchcodec cannot be imported: {error}") from error

    decoder = VideoDecoder(opened, seek_mode="approximate", dimension_order="NHWC", num_ffmpeg_threads=1)
    stream = decoder.metadata
    # Width and height are after rotation, as the frames come out; their product is what the limit is about.
    _check_frame_size(name, stream.width, stream.height, max_frame_pixels)
    if stream.width * stream.height > _SINGLE_THREAD_MAX_PIXELS:
        # The thread count is fixed when the decoder opens: reopen (milliseconds, against 100s of ms of decoding).
        if start_position is not None:
            opened.seek(start_position)
        decoder = VideoDecoder(opened, seek_mode="approximate", dimension_order="NHWC", num_ffmpeg_threads=0)
    total, fps = stream.num_frames, stream.average_fps
    _check_not_still_image(name, None, stream.codec, total)
    if not total or not fps:
        raise ValueError("the container gives no frame count or rate to seek by")
    metadata = VideoMetadata(total, float(fps), stream.width, stream.height, stream.duration_seconds, "torchcodec")
    indices = _indices(sample_indices_fn, metadata)
    wanted = sorted({min(index, total - 1) for index in indices})
    if wanted and wanted[0] < 0:
        raise ValueError(f"negative frame index {wanted[0]}")
    decoded = {}
    for chunk_start in range(0, len(wanted), _TORCHCODEC_CHUNK):
        _check_time(name, started, timeout)
        chunk = wanted[chunk_start : chunk_start + _TORCHCODEC_CHUNK]
        decoded.update(zip(chunk, decoder.get_frames_at(chunk).data.numpy()))
    return _stack([decoded[min(index, total - 1)] for index in indices], name), metadata


def _decode_with_pyav(opened, name, sample_indices_fn, max_frame_pixels, timeout, started, stats):
    if not is_av_available():
        raise ImportError(f"{name}: decoding a video file without torchcodec needs PyAV: pip install av")

    try:
        container = av.open(opened, mode="r", metadata_errors="ignore")
    except (av.error.FFmpegError, OSError, ValueError) as error:
        raise EVLVideoDecodingError(f"{name}: not a readable video file ({error}).") from None
    with container:
        try:
            return _decode_container(container, name, sample_indices_fn, max_frame_pixels, timeout, started, stats)
        except av.error.FFmpegError as error:
            raise EVLVideoDecodingError(f"{name}: the video cannot be decoded ({error}).") from None


def _decode_container(container, name, sample_indices_fn, max_frame_pixels, timeout, started, stats):
    """The body of `decode_video` once the container is open."""
    if not container.streams.video:
        raise EVLVideoDecodingError(f"{name}: the file has no video stream.")
    stream = container.streams.video[0]
    if stream.codec_context is None:
        raise EVLVideoDecodingError(f"{name}: the video stream has no usable codec.")
    width, height = stream.codec_context.width, stream.codec_context.height
    _check_not_still_image(name, container.format.name, stream.codec_context.name, stream.frames)
    _check_frame_size(name, width, height, max_frame_pixels)
    if width * height > _SINGLE_THREAD_MAX_PIXELS:
        stream.thread_type = "AUTO"
    rate = stream.average_rate or stream.guessed_rate
    fps = float(rate) if rate else None
    duration = None
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / 1_000_000
    total = stream.frames
    if not total and fps and duration:
        total = max(1, int(round(duration * fps)))
    if not total:
        # Neither a frame count nor a duration: count by decoding (bounded by the timeout).
        frames = _decode_range(container, stream, name, None, 0, None, started, timeout, stats)
        total = len(frames)
        metadata = VideoMetadata(total, fps, width, height, duration, "pyav")
        indices = _indices(sample_indices_fn, metadata)
        return _displayed(_stack([frames[min(i, total - 1)] for i in indices], name), metadata)

    metadata = VideoMetadata(total, fps, width, height, duration, "pyav")
    indices = _indices(sample_indices_fn, metadata)
    wanted = sorted(set(indices))
    decoded = _decode_range(container, stream, name, wanted, wanted[0], fps, started, timeout, stats)
    return _displayed(_stack([decoded[i] for i in indices], name), metadata)


def _displayed(frames: np.ndarray, metadata: VideoMetadata) -> tuple[np.ndarray, VideoMetadata]:
    # The coded size is known before decoding; a display rotation of 90 degrees swaps it (torchcodec reports it so).
    metadata.height, metadata.width = frames.shape[1:3]
    return frames, metadata


def _to_rgb(frame) -> np.ndarray:
    """(H, W, 3) uint8 RGB as a player shows the frame: any pixel format converted, display rotation applied."""
    array = frame.to_ndarray(format="rgb24")
    rotation = frame.rotation  # counterclockwise degrees from the stream's display matrix (phone videos)
    if rotation:
        array = np.ascontiguousarray(np.rot90(array, k=round(rotation / 90) % 4))
    return array


def _indices(sample_indices_fn, metadata: VideoMetadata) -> list[int]:
    if sample_indices_fn is None:
        return list(range(metadata.total_num_frames))
    indices = [int(i) for i in np.asarray(sample_indices_fn(metadata=metadata)).reshape(-1)]
    metadata.frames_indices = indices
    return indices


def _stack(frames: list[np.ndarray], name: str) -> np.ndarray:
    if not frames:
        raise EVLVideoDecodingError(f"{name}: no frames to return (the sampling asked for none).")
    if len({frame.shape for frame in frames}) > 1:
        raise EVLVideoDecodingError(f"{name}: the frame size changes within the stream ({sorted({f.shape for f in frames})}).")
    return np.stack(frames)


def _decode_range(container, stream, name, wanted, first, fps, started, timeout, stats=None):
    """
    Decode forward from the key frame before frame `first`. With `wanted` (sorted indices), returns {index: frame}
    with each wanted index mapped to the first decoded frame at or after it (the last frame if the stream ends
    early); without, returns the list of all frames.
    """
    start_seconds = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    if wanted is not None and fps and first > 0:
        target = int((start_seconds + first / fps) / stream.time_base)
        try:
            container.seek(target, stream=stream, backward=True, any_frame=False)
        except av.error.FFmpegError:
            pass  # an unseekable (e.g. damaged) stream: decode forward from where the demuxer is
    result = {} if wanted is not None else []
    position = 0
    latest = None  # the last frame decoded; converted to RGB only if it has to stand in for frames past the end
    decoded = 0
    try:
        for frame in container.decode(stream):
            decoded += 1
            latest = frame
            _check_time(name, started, timeout)
            if wanted is None:
                result.append(_to_rgb(frame))
                continue
            index = round((frame.time - start_seconds) * fps) if frame.time is not None and fps else None
            if index is None:
                index = first + len(result)
            if index < wanted[position]:
                continue
            rgb = _to_rgb(frame)
            while position < len(wanted) and index >= wanted[position]:
                result[wanted[position]] = rgb
                position += 1
            if position == len(wanted):
                break
    except av.error.FFmpegError as error:
        if latest is None:
            raise EVLVideoDecodingError(f"{name}: the video stream cannot be decoded ({error}).") from None
    finally:
        if stats is not None:
            stats["decoded_frames"] = decoded
    if wanted is None:
        if not result:
            raise EVLVideoDecodingError(f"{name}: the video stream holds no decodable frame.")
        return result
    if latest is None:
        raise EVLVideoDecodingError(
            f"{name}: no decodable frame at or after frame {first} (the container reports {stream.frames} frames)."
        )
    if position < len(wanted):
        # The stream ended before these indices (a container that over-reports its length): repeat its last frame.
        rgb = _to_rgb(latest)
        for index in wanted[position:]:
            result[index] = rgb
    return result


def _check_positive(**values) -> None:
    # None means "the processor's default"; anything given must be a whole number of frames, views or a stride.
    for name, value in values.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")


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
    """
    if total_num_frames < 1:
        raise ValueError(f"Cannot sample frames from a video with {total_num_frames} frames.")
    _check_positive(num_frames=num_frames, sampling_rate=sampling_rate, num_temporal_views=num_temporal_views)
    generator = generator or np.random.default_rng()
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
        if self.num_spatial_views not in (1, 3):
            raise ValueError(f"num_spatial_views must be 1 or 3, got {self.num_spatial_views}.")
        if self.decoding_backend not in DECODING_BACKENDS:
            raise ValueError(f"decoding_backend must be one of {DECODING_BACKENDS}, got {self.decoding_backend!r}.")

    @classmethod
    def from_model_config(cls, config, **kwargs) -> "EVLVideoProcessor":
        """
        The processor for a model of this `EVLConfig`, as the authors prepare its clips: `config.num_frames` frames
        with stride 16 (8 for 32 frames or more), short side and crop at the backbone's image size. `kwargs` override
        any field. The converter and the training script build their processors here.

        Example:

        ```python
        >>> from evl_hf import EVLConfig, EVLVideoProcessor
        >>> processor = EVLVideoProcessor.from_model_config(EVLConfig.from_preset("k400-vit-b16-32f"))
        >>> processor.num_frames, processor.sampling_rate, processor.crop_size["height"]
        (32, 8, 224)
        ```
        """
        size = config.vision_config.image_size
        values = dict(
            num_frames=config.num_frames, sampling_rate=8 if config.num_frames >= 32 else 16,
            size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        )  # fmt: skip
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
        """
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
        return super().preprocess(videos, **kwargs)

    def _decode_and_sample_videos(self, videos, video_metadata, do_sample_frames=None, sample_indices_fn=None):
        if _is_video_source(videos):
            videos = [videos] if isinstance(videos, _VIDEO_SOURCE_TYPES) else videos
            sample = sample_indices_fn if do_sample_frames else None
            decoded = [decode_video(v, sample, backend=self.decoding_backend) for v in videos]
            return [frames for frames, _ in decoded], [metadata for _, metadata in decoded]
        if do_sample_frames and sample_indices_fn is not None:
            # transformers samples an array as if it were a whole decoded video; tell `sample_frames` it is not.
            sample_indices_fn = functools.partial(sample_indices_fn, given_frames=True)
        return super()._decode_and_sample_videos(videos, video_metadata, do_sample_frames, sample_indices_fn)

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
        if num_spatial_views not in (1, 3):
            raise ValueError(f"num_spatial_views must be 1 or 3, got {num_spatial_views}.")
        if num_spatial_views > 1 and not do_center_crop:
            raise ValueError("Spatial views are crops: set do_center_crop=True to use num_spatial_views=3.")
        processed = []
        for video in videos:
            if video.shape[0] % num_temporal_views:
                raise ValueError(
                    f"A video with {video.shape[0]} frames cannot be split into {num_temporal_views} temporal views; "
                    "let the processor sample frames (do_sample_frames=True) for multi-view evaluation."
                )
            if do_resize:
                # The authors resize float frames: resizing uint8 would round every resized pixel to an integer.
                video = video if video.is_floating_point() else video.float()
                video = self.resize(video, size=size, resample=resample, antialias=bool(antialias))
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


__all__ = [
    "EVLVideoProcessor",
    "EVLVideoProcessorKwargs",
    "EVLVideoDecodingError",
    "decode_video",
    "resolve_decoding_backend",
    "sample_frame_indices",
]
