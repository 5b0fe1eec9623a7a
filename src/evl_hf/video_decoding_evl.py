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
"""
Video decoding for EVL: torchcodec or PyAV, seeking to the frames a sampling asks for, with the guards (frame size,
time, still images) and one error type, `EVLVideoDecodingError`, that names the file. `EVLVideoProcessor` decodes
through `decode_video`.
"""

import contextlib
import errno
import functools
import io
import itertools
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers.utils import is_av_available, is_torchcodec_usable, logging
from transformers.video_utils import VideoMetadata


# Optional decoders, guarded (as transformers' own files do) so that transformers' remote-code check, which requires
# every unguarded import, loads this file where they are not installed.
if is_av_available():
    import av

logger = logging.get_logger(__name__)

DECODING_BACKENDS = ("auto", "torchcodec", "pyav")
# The file names taken for videos where the package looks for them by name (a videofolder's clips, the web demo's
# examples): the containers and raw streams FFmpeg reads that hold video. Not `.gif` (an image format: a folder's
# GIFs are mostly pictures, and a still image is no video) nor audio-first ones (`.ogg`).
VIDEO_SUFFIXES = (
    ".3g2", ".3gp", ".asf", ".avi", ".dv", ".f4v", ".flv", ".h264", ".h265", ".hevc", ".m1v", ".m2t", ".m2ts", ".m2v",
    ".m4v", ".mkv", ".mov", ".mp4", ".mpeg", ".mpg", ".mts", ".mxf", ".nut", ".ogv", ".qt", ".ts", ".vob", ".webm",
    ".wmv", ".y4m",
)  # fmt: skip
# Frames fetched per torchcodec call: small enough that the decoding timeout is checked often.
_TORCHCODEC_CHUNK = 16
# FFmpeg's decoding threads pay off on large frames; on small ones (Kinetics clips are about 340x256) synchronising
# them costs more than they save: 1.25-1.4x the single-threaded time with either backend (benchmarks/bench_decoding.py).
_SINGLE_THREAD_MAX_PIXELS = 160_000
# Intact files may declare a frame or two more than they hold (a duration rounded up, a last frame's duration
# unknown): up to this many frames' time missing at the end of the stream are its last frame repeated, not a truncated
# file.
_MISSING_END_FRAMES_TOLERATED = 2
# How much earlier than the wanted frame an MPEG program stream is sought (see `_decode_range`).
_PROGRAM_STREAM_RESYNC_SECONDS = 2.0
# An AVI B-frame stream is sought only where this many of its first key frames are where their guessed times say
# (`_key_frames_placed_by_their_times`); the check decodes up to this many GOPs from the start.
_KEY_FRAMES_CHECKED = 2
_VIDEO_SOURCE_TYPES = (str, Path, bytes, bytearray, io.IOBase)


class EVLVideoDecodingError(ValueError):
    """A video could not be opened or decoded; the message names the file and the problem."""


# Failures of the process, not of the file: file descriptors or disk space (for a download) ran out. FFmpeg's ENOMEM
# is not one of them: FFmpeg also reports it, without allocating, for a header that asks for too much (a crafted or
# damaged file), so it stays a bad file.
_ENVIRONMENT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOSPC})


def _raise_if_environment_error(name: str, error: BaseException) -> None:
    """
    Raise `error` as the process's failure, naming the video, when it is one (or wraps one, as HTTP clients do): a
    data set that counted it as one unusable video would quietly drop every video read while it lasts. Any other
    error is left to the caller, which reports the video as unreadable.
    """
    cause, seen = error, 0
    while cause is not None and seen < 8:
        if isinstance(cause, OSError) and cause.errno in _ENVIRONMENT_ERRNOS:
            raise OSError(
                cause.errno, f"{name}: cannot read the video: {cause.strerror or cause} (a limit of this process, not "
                "a problem of the file)"
            ) from error
        cause, seen = cause.__cause__ or cause.__context__, seen + 1


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


def _is_seekable(file: io.IOBase) -> bool:
    """Whether a file object can be rewound; not a closed one (reading it raises the error naming it)."""
    try:
        return file.seekable()
    except (OSError, ValueError):
        return False


def _rewind(file: io.IOBase, position: int, name: str) -> None:
    """Seek a file object to `position`: one that says it can seek but whose seek fails is an error naming it."""
    try:
        file.seek(position)
    except (OSError, ValueError) as error:
        _raise_if_environment_error(name, error)
        raise EVLVideoDecodingError(
            f"{name}: the file object cannot seek ({type(error).__name__}: {error}); give the path or the bytes."
        ) from None


def _open_source(source, timeout: float):
    """Return something `av.open` accepts, with clear errors for missing paths, directories, empty files and URLs; a
    seekable file object rewound to its start."""
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise EVLVideoDecodingError(f"{_video_name(source)}: the video is empty (0 bytes).")
        return io.BytesIO(source)
    if isinstance(source, io.IOBase):
        # Read from its start, as PIL and PyAV read files: a caller that sniffed the header need not rewind. (torchcodec
        # would read some containers from where the file stands, fail, and leave the video to PyAV.)
        if _is_seekable(source):
            _rewind(source, 0, _video_name(source))
        return source
    if not isinstance(source, (str, os.PathLike)):
        frames = " (decoded frames go to the video processor or the video-classification pipeline)"
        raise TypeError(
            f"A video to decode is a path, an http(s) URL, bytes or a file object (`io.IOBase`), got "
            f"{type(source).__name__}{frames if hasattr(source, 'shape') else ''}."
        )
    text = str(source)
    if text.startswith(("http://", "https://")):
        from huggingface_hub.utils import httpx

        # Into a temporary file, not memory: a long video would otherwise be held whole while it streams through a
        # timeline. The file is deleted when closed or collected.
        try:
            downloaded = tempfile.TemporaryFile()
        except OSError as error:
            raise OSError(error.errno, f"{text}: cannot store the download ({error.strerror or error})") from error
        try:
            with httpx.stream("GET", text, follow_redirects=True, timeout=timeout) as response:
                response.raise_for_status()
                for chunk in response.iter_bytes(1 << 20):
                    downloaded.write(chunk)
        except MemoryError:
            downloaded.close()
            raise
        except Exception as error:
            downloaded.close()
            _raise_if_environment_error(text, error)
            # The first line only: httpx's status errors add a second one pointing at MDN's page for the status.
            reason = f"{type(error).__name__}: {next(iter(str(error).splitlines()), '')}"
            raise EVLVideoDecodingError(f"{text}: cannot download the video ({reason}).") from None
        if downloaded.tell() == 0:
            downloaded.close()
            raise EVLVideoDecodingError(f"{text}: the download is empty (0 bytes).")
        downloaded.seek(0)
        return downloaded
    if not text:  # `Path("")` is the working directory
        raise EVLVideoDecodingError("The video's path is an empty string.")
    path = Path(text)
    if not path.exists():
        raise EVLVideoDecodingError(f"{text}: no such file.")
    if path.is_dir():
        raise EVLVideoDecodingError(f"{text}: is a directory, not a video file.")
    if path.stat().st_size == 0:
        raise EVLVideoDecodingError(f"{text}: the file is empty (0 bytes).")
    return text


def _opened_here(opened, source) -> bool:
    """Whether `_open_source` made `opened` (the download of a URL, a buffer over bytes), so that its reader closes
    it; a path is opened by the decoder, and the caller's own file object stays open."""
    return opened is not source and not isinstance(opened, str)


@dataclass
class _DecodeRequest:
    """What every step of one `decode_video` call needs: the video's name for errors, the sampling, the guards."""

    name: str
    sample_indices_fn: Callable | None
    max_frame_pixels: int
    timeout: float
    started: float  # time.monotonic() at the start of the call
    stats: dict | None = None

    def check_frame_size(self, width: int, height: int) -> None:
        if width * height > self.max_frame_pixels:
            raise EVLVideoDecodingError(
                f"{self.name}: frames are {width}x{height}, over the {self.max_frame_pixels}-pixel limit for decoding."
            )

    def check_time(self) -> None:
        if time.monotonic() - self.started > self.timeout:
            raise EVLVideoDecodingError(f"{self.name}: decoding took longer than {self.timeout:.0f}s; giving up.")

    def indices(self, metadata: VideoMetadata) -> list[int]:
        """The frames to return (all without a sampling function), recorded in `metadata.frames_indices`."""
        if self.sample_indices_fn is None:
            return list(range(metadata.total_num_frames))
        indices = [int(i) for i in np.asarray(self.sample_indices_fn(metadata=metadata)).reshape(-1)]
        metadata.frames_indices = indices
        return indices

    def stack(self, frames: list[np.ndarray]) -> np.ndarray:
        if not frames:
            raise EVLVideoDecodingError(f"{self.name}: no frames to return (the sampling asked for none).")
        if len({frame.shape for frame in frames}) > 1:
            raise EVLVideoDecodingError(
                f"{self.name}: the frame size changes within the stream ({sorted({f.shape for f in frames})})."
            )
        return np.stack(frames)


def decode_video(
    source,
    sample_indices_fn=None,
    max_frame_pixels: int = 4096 * 4096,
    timeout: float = 120.0,
    stats: dict | None = None,
    backend: str = "auto",
) -> tuple[np.ndarray, VideoMetadata]:
    """
    Decode the frames of `source` (a path, an http(s) URL, bytes or a file object, read from its start where it can be
    rewound, and left open) that `sample_indices_fn(metadata)` asks for, as a `(num_indices, height, width, 3)` uint8
    array, plus the video's metadata.

    Only what is needed is decoded: the demuxer seeks to the key frame before the first wanted frame and decoding stops
    after the last one. Frame `i` is the frame shown at `i / fps` seconds (the container's frame count and average rate,
    so both backends pick the same frames). Indices past the end of the stream repeat its last frame, as the authors
    do for clips shorter than the sampling window; an MP4/MOV file (or a Matroska/WebM file FFmpeg wrote) whose frames
    stop more than two frames' time short of its video track's duration (a truncated download whose index comes
    first) is refused for indices past its end. Display rotation (phone videos) is applied. Any failure of the video
    raises `EVLVideoDecodingError` naming the video and the problem; a failure of the process (out of file
    descriptors, or of disk space for a download) raises an `OSError` naming the video instead.
    Frames over `max_frame_pixels`, decoding past `timeout` seconds and still images (a photo renamed `.mp4`, which
    FFmpeg would open as a one-frame video) are refused.

    `backend`: `"torchcodec"`, `"pyav"`, or `"auto"` (torchcodec when it can load, else PyAV). A video torchcodec
    cannot handle (a stream with no frame count or duration to seek by, a damaged file, ...) is decoded with PyAV
    instead, so torchcodec never fails a video that PyAV decodes. `stats`, when given, receives `backend` (the one
    that decoded the video) and, for PyAV, `decoded_frames` (how many frames were decoded).
    """
    backend = resolve_decoding_backend(backend)
    request = _DecodeRequest(_video_name(source), sample_indices_fn, max_frame_pixels, timeout, time.monotonic(), stats)
    opened = _open_source(source, timeout)
    try:
        return _decode_opened(opened, backend, request)
    finally:
        if _opened_here(opened, source):
            opened.close()


def _decode_opened(opened, backend: str, request: "_DecodeRequest"):
    is_file = not isinstance(opened, str)
    if is_file and not opened.seekable():
        backend = "pyav"  # torchcodec seeks in file objects, and a failed try could not be rewound for PyAV
    if backend == "torchcodec":
        start_position = opened.tell() if is_file else None
        try:
            result = _decode_with_torchcodec(opened, start_position, request)
        except EVLVideoDecodingError:
            raise  # a size or time limit: PyAV would refuse the video the same way
        except Exception as error:
            logger.info(f"{request.name}: torchcodec cannot decode it ({type(error).__name__}: {error}); decoding with PyAV.")
            if start_position is not None:
                _rewind(opened, start_position, request.name)
        else:
            if request.stats is not None:
                request.stats["backend"] = "torchcodec"
            return result
    if request.stats is not None:
        request.stats["backend"] = "pyav"
    return _decode_with_pyav(opened, request)


def _check_not_still_image(name: str, demuxer: str | None, codec: str | None, total: int | None) -> None:
    # FFmpeg opens a photo (one renamed .mp4) as a one-frame video, which would train and evaluate as num_frames
    # copies of itself. Its still-image demuxers are `image2` and the `*_pipe` family; a GIF has a demuxer of its own.
    if demuxer is not None and (demuxer == "image2" or demuxer.endswith("_pipe")):
        raise EVLVideoDecodingError(f"{name}: the file is a still image ({codec or demuxer}), not a video.")
    if codec == "gif" and total == 1:
        raise EVLVideoDecodingError(f"{name}: the file is a still image (a one-frame GIF), not a video.")


def _decode_with_torchcodec(opened, start_position, request: "_DecodeRequest"):
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

    container = _container_by_header(opened, start_position)
    if container == "mpeg":
        # An MPEG program stream (.mpg, .vob): its frame times after a seek are off (see `_decode_range`).
        raise ValueError("an MPEG program stream, whose frame times after a seek are its neighbours'")
    is_avi = container == "avi"
    # The stream, frame count and average rate are PyAV's, read from the header, so that both backends number the
    # same frames of the same stream: torchcodec's own rate is the header's nominal one (FFmpeg's `r_frame_rate`),
    # not the average (a variable-frame-rate phone video: 30 fps against 23.7), and a Matroska video track's own length
    # is in a tag torchcodec cannot read (see `_matroska_video_seconds`). A picture as the best video stream (a cover
    # flagged default beside the real video, see `_video_stream`) is not decoded: PyAV's choice decides.
    header = _pyav_header(opened, start_position, request.name)
    if header.full_range_unflagged:
        # torchcodec's colour conversion takes full range from the yuvj* pixel formats alone: it would decode these
        # frames as limited range (grey 64 as 54-56; shadows and highlights clipped).
        raise ValueError("full-range YUV in a pixel format other than yuvj*, which torchcodec decodes as limited range")
    decoder = VideoDecoder(
        opened, stream_index=header.index, seek_mode="approximate", dimension_order="NHWC", num_ffmpeg_threads=1
    )
    stream = decoder.metadata
    # Width and height are after rotation, as the frames come out; their product is what the limit is about.
    request.check_frame_size(stream.width, stream.height)
    reread = False
    if stream.rotation is not None:
        # A display matrix: torchcodec applies its angle alone, which turns a mirrored picture upside down (see
        # `_display_orientation`). Only a decoded frame carries the matrix itself: PyAV decodes the first one.
        if _pyav_first_frame_mirrored(opened, start_position, header.index):
            raise ValueError("a display matrix that mirrors the picture")
        reread = start_position is not None  # PyAV moved the file object under torchcodec's buffered reads
    large = stream.width * stream.height > _SINGLE_THREAD_MAX_PIXELS
    if large or reread:
        # The thread count is fixed when the decoder opens: reopen (milliseconds, against 100s of ms of decoding).
        if start_position is not None:
            opened.seek(start_position)
        decoder = VideoDecoder(
            opened, stream_index=header.index, seek_mode="approximate", dimension_order="NHWC",
            num_ffmpeg_threads=0 if large else 1,
        )  # fmt: skip
    (total, duration), fps = header.count, stream.average_fps  # past torchcodec's own count, a frame is an IndexError
    _check_not_still_image(request.name, None, stream.codec, total)
    if not total or not fps or not header.fps:
        raise ValueError("the container gives no frame count or rate to seek by")
    # torchcodec takes frame i as the one shown at i / its rate: where that drifts a quarter of a frame from PyAV's
    # over the stream (a variable frame rate), the frames would be others than PyAV's.
    if total * abs(header.fps / fps - 1) > 0.25:
        raise ValueError(f"a variable frame rate ({header.fps:.3f} fps on average, {fps:.3f} fps nominal)")
    metadata = VideoMetadata(total, header.fps, stream.width, stream.height, duration, "torchcodec")
    indices = request.indices(metadata)
    wanted = sorted({min(index, total - 1) for index in indices})
    if wanted and wanted[0] < 0:
        raise ValueError(f"negative frame index {wanted[0]}")
    decoded = {}
    begin = stream.begin_stream_seconds or 0.0
    if is_avi and decoder.get_frame_at(0).pts_seconds - begin > 0.5 / float(fps):
        # A B-frame stream in AVI: see `_times_are_guessed`. PyAV indexes its frames by their order instead.
        raise ValueError("an AVI stream with B-frames, whose frame times are FFmpeg's guesses")
    for chunk_start in range(0, len(wanted), _TORCHCODEC_CHUNK):
        request.check_time()
        chunk = wanted[chunk_start : chunk_start + _TORCHCODEC_CHUNK]
        frames = decoder.get_frames_at(chunk)
        # Approximate mode seeks by time, and FFmpeg can land on a key frame shown after the one wanted (MPEG-TS,
        # HEVC, a B-frame delay without an edit list): that frame's own time says so. PyAV seeks again from earlier.
        shown = frames.pts_seconds.tolist()
        for index, seconds in zip(chunk, shown):
            if seconds - (begin + index / float(fps)) > 0.5 / float(fps):
                raise ValueError(f"torchcodec gave the frame shown at {seconds:.3f} s for frame {index}")
        decoded.update(zip(chunk, frames.data.numpy()))
    return request.stack([decoded[min(index, total - 1)] for index in indices]), metadata


def _container_by_header(opened, start_position) -> str | None:
    """
    `"avi"` or `"mpeg"` (an MPEG program stream: a pack header) where the file (a path, or a seekable file object
    starting at `start_position`) starts with that container's header (their frame times are guessed, see
    `_times_are_guessed` and `_decode_range`), `"matroska"` for Matroska/WebM (see `_matroska_video_seconds`); else
    `None`.
    """
    header = _file_header(opened, start_position, 12)
    if header[:4] == b"RIFF" and header[8:12] == b"AVI ":
        return "avi"
    if header[:4] == b"\x00\x00\x01\xba":
        return "mpeg"
    return "matroska" if header[:4] == _EBML_ID else None


def _file_header(opened, start_position, size: int) -> bytes:
    """The first `size` bytes of a path, or of a seekable file object starting at `start_position` (left there)."""
    if isinstance(opened, str):
        with open(opened, "rb") as file:
            return file.read(size)
    opened.seek(start_position)
    header = opened.read(size)
    opened.seek(start_position)
    return header


# FFmpeg's AVCOL_RANGE_JPEG: full-range YUV (0-255 for 8 bits), not the 16-235 of broadcast video.
_FULL_RANGE = 2


@dataclass
class _PyAVHeader:
    """What PyAV reads from a video's header about the stream it decodes (see `_pyav_header`)."""

    index: int  # the stream's (`_video_stream`)
    count: tuple[int | None, float | None]  # `_frame_count`
    fps: float | None  # the average rate
    full_range_unflagged: bool  # full range (color_range=pc) in a pixel format other than yuvj*


def _pyav_header(opened, start_position, name: str) -> _PyAVHeader:
    """`_PyAVHeader` of a path, or of a seekable file object starting at `start_position` (left there). Raises (for
    `decode_video` to decode with PyAV, which reports the problem) where PyAV finds no video stream; a cover picture
    as the only video is refused (`_check_not_cover_art`)."""
    if not is_av_available():
        raise ImportError("reading the video's header needs PyAV")
    muxing_app = _matroska_muxing_app(_file_header(opened, start_position, _MATROSKA_HEADER_BYTES))
    with _read_from_start(opened, start_position):
        with av.open(opened, mode="r", metadata_errors="ignore") as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            stream = _video_stream(container)
            _check_not_cover_art(name, stream)
            _warn_if_anamorphic(name, stream)
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else None
            context = stream.codec_context
            # YUV only: RGB streams flag full range too, which means nothing to their conversion.
            pixel_format = (context.pix_fmt or "") if context is not None else ""
            full_range = (
                context is not None
                and context.color_range == _FULL_RANGE
                and pixel_format.startswith("yuv")
                and not pixel_format.startswith("yuvj")
            )
            count = _frame_count(container, stream, fps, muxing_app, rewindable=True)
            return _PyAVHeader(stream.index, count, fps, full_range)


def _pyav_first_frame_mirrored(opened, start_position, index: int) -> bool:
    """Whether the first frame of stream `index` of a path, or of a seekable file object starting at `start_position`
    (left there), is mirrored by its display matrix (`_display_orientation`)."""
    with _read_from_start(opened, start_position):  # torchcodec may have read the file object to its end
        with av.open(opened, mode="r", metadata_errors="ignore") as container:
            frame = next(iter(container.decode(container.streams[index])), None)
            return frame is not None and _display_orientation(frame)[1]


@contextlib.contextmanager
def _read_from_start(opened, start_position):
    """A path, or a seekable file object read from `start_position` and left there (`None` for a path)."""
    if start_position is not None:
        opened.seek(start_position)
    try:
        yield
    finally:
        if start_position is not None:
            opened.seek(start_position)


def _decode_with_pyav(opened, request: "_DecodeRequest"):
    if not is_av_available():
        raise ImportError(f"{request.name}: decoding a video file without torchcodec needs PyAV: pip install av")

    muxing_app = _muxing_app_of(opened, request.name)
    try:
        container = av.open(opened, mode="r", metadata_errors="ignore")
    except (av.error.FFmpegError, OSError, ValueError) as error:
        _raise_if_environment_error(request.name, error)
        raise EVLVideoDecodingError(f"{request.name}: not a readable video file ({error}).") from None
    with container:
        try:
            return _decode_container(container, request, muxing_app, _can_rewind(opened))
        except av.error.FFmpegError as error:
            _raise_if_environment_error(request.name, error)
            raise EVLVideoDecodingError(f"{request.name}: the video cannot be decoded ({error}).") from None


def _video_stream(container):
    """
    The video stream decoded: FFmpeg's best (the default track where there are several), which torchcodec decodes,
    unless that is a still picture (cover art: an attached picture, or one frame) beside a moving video.
    """
    best = container.streams.best("video")
    if len(container.streams.video) > 1 and _is_still_picture(best):
        moving = [stream for stream in container.streams.video if not _is_still_picture(stream)]
        # Pictures only (an MJPEG video beside an MJPEG thumbnail): the one known to hold several frames.
        moving = moving or [stream for stream in container.streams.video if _known_frames(stream) > 1]
        if moving:
            return moving[0]
    return best


def _known_frames(stream) -> int:
    """A stream's frame count where its container or its `DURATION` tag says it; 0 where neither does."""
    rate, seconds = stream.average_rate or stream.guessed_rate, _duration_tag_seconds(stream)
    if stream.frames:
        return stream.frames
    return round(seconds * float(rate)) if rate and seconds is not None else 0


# Codecs of pictures rather than videos: beside a video track, a track of one of them is cover art.
_PICTURE_CODECS = frozenset({"mjpeg", "png", "bmp", "webp", "tiff", "gif"})


def _check_not_cover_art(name: str, stream) -> None:
    """Refuse a file whose video is an attached picture: an audio file's cover art, which would decode as that picture
    repeated for the whole length of the audio."""
    if stream.disposition & av.stream.Disposition.attached_pic:
        raise EVLVideoDecodingError(f"{name}: its only picture is cover art (an audio file?), not a video.")


def _warn_if_anamorphic(name: str, stream) -> None:
    """
    Warn, once per file and process, where the stream's pixels are not square (DVD and broadcast 16:9, 720x576 at
    64:45): players stretch the frames to the display aspect ratio, but both backends return them at their coded
    size, as EVL's preprocessing takes them, so the picture is squeezed (circles become ellipses).
    """
    context = stream.codec_context
    ratio = stream.sample_aspect_ratio or (context.sample_aspect_ratio if context is not None else None)
    if not ratio or ratio == 1 or context is None or not context.width or not context.height:
        return
    logger.warning_once(
        f"{name}: the pixels are not square (sample aspect ratio {ratio.numerator}:{ratio.denominator}): its "
        f"{context.width}x{context.height} frames are shown at {round(context.width * ratio)}x{context.height}, "
        "but are decoded at their coded size, so the picture is squeezed; re-encode it with square pixels (e.g. "
        "`ffmpeg -vf scale=iw*sar:ih,setsar=1`) to see it as players do."
    )


def _is_still_picture(stream) -> bool:
    """Cover art: an attached picture, a picture codec, or a track of one frame (by its count, or, where the container
    gives none, by its `DURATION` tag)."""
    if stream.disposition & av.stream.Disposition.attached_pic or stream.frames == 1:
        return True
    if stream.codec_context is not None and stream.codec_context.name in _PICTURE_CODECS:
        return True
    rate, seconds = stream.average_rate or stream.guessed_rate, _duration_tag_seconds(stream)
    return bool(rate) and seconds is not None and seconds <= 1.5 / float(rate)


def _decode_container(container, request: "_DecodeRequest", muxing_app: str | None, rewindable: bool):
    """The body of `decode_video` once the container is open (`muxing_app`: see `_matroska_muxing_app`; `rewindable`:
    see `_frame_count`)."""
    name = request.name
    if not container.streams.video:
        raise EVLVideoDecodingError(f"{name}: the file has no video stream.")
    stream = _video_stream(container)
    if stream.codec_context is None:
        raise EVLVideoDecodingError(f"{name}: the video stream has no usable codec.")
    width, height = stream.codec_context.width, stream.codec_context.height
    _check_not_still_image(name, container.format.name, stream.codec_context.name, stream.frames)
    _check_not_cover_art(name, stream)
    request.check_frame_size(width, height)
    _warn_if_anamorphic(name, stream)
    if width * height > _SINGLE_THREAD_MAX_PIXELS:
        stream.thread_type = "AUTO"
    rate = stream.average_rate or stream.guessed_rate
    fps = float(rate) if rate else None
    total, duration = _frame_count(container, stream, fps, muxing_app, rewindable)
    if not total:
        # Neither a frame count nor a duration: count by decoding (bounded by the timeout).
        frames = _decode_range(container, stream, request, None, 0, None)
        total = len(frames)
        metadata = VideoMetadata(total, fps, width, height, duration, "pyav")
        indices = request.indices(metadata)
        return _displayed(request.stack([frames[min(i, total - 1)] for i in indices]), metadata)

    metadata = VideoMetadata(total, fps, width, height, duration, "pyav")
    indices = request.indices(metadata)
    wanted = sorted(set(indices))
    declared = _declared_seconds(container, stream, muxing_app)
    decoded = _decode_range(container, stream, request, wanted, wanted[0], fps, declared)
    return _displayed(request.stack([decoded[i] for i in indices]), metadata)


def _frame_count(
    container, stream, fps: float | None, muxing_app: str | None, rewindable: bool
) -> tuple[int | None, float | None]:
    """
    The stream's frame count (`None` where it has neither a count nor a duration) and duration in seconds: the
    container's count (less the frames an MP4/MOV edit list hides, see `_frames_hidden_at_start`, where the source
    is `rewindable`: a path or a seekable file object), or the duration at the average rate: a Matroska video track's
    own (see `_matroska_video_seconds`; Matroska has no other: the stream's duration, where FFmpeg fills it in for a
    short file, is the container's), the stream's, else the container's, which for Matroska/WebM, ASF, ... covers all
    streams.
    """
    duration = _matroska_video_seconds(container, stream, muxing_app)
    if duration is None and stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif duration is None and container.duration is not None:
        duration = container.duration / 1_000_000
    total = stream.frames
    if total and rewindable and "mp4" in container.format.name.split(","):
        total -= _frames_hidden_at_start(container, stream)
    if not total and fps and duration:
        total = max(1, int(round(duration * fps)))
    return total or None, duration


def _frames_hidden_at_start(container, stream) -> int:
    """
    How many of an MP4/MOV stream's samples its edit list hides before its first shown frame: a cut made without
    re-encoding (`ffmpeg -ss 1.3 -c copy`) keeps the key frame before the cut and the frames up to it, which players
    (and both decoders) never show, yet the container counts (125 samples, 117 frames shown). Hidden samples are shown
    before the stream's start, so they are decoded before it: the packets are read (not decoded) until their decoding
    times reach the start, at most a GOP. The demuxer is left at the start.
    """
    start, hidden = stream.start_time or 0, 0
    try:
        for packet in container.demux(stream):
            if packet.dts is None or packet.dts >= start:
                break
            hidden += bool(packet.is_discard)
    except av.error.FFmpegError:
        hidden = 0  # a damaged start: decoding reports it, or the frames after it
    container.seek(0)
    return hidden


def _can_rewind(opened) -> bool:
    """Whether a source `_open_source` returned can be read again from its start: a path or a seekable file object."""
    return isinstance(opened, str) or _is_seekable(opened)


def _muxing_app_of(opened, name: str) -> str | None:
    """`_matroska_muxing_app` of a path or a seekable file object (from where it stands); `None` for one that cannot
    seek (PyAV reads it as it comes) or is not Matroska."""
    if not _can_rewind(opened):
        return None
    try:
        return _matroska_muxing_app(_file_header(opened, None if isinstance(opened, str) else opened.tell(),
                                                 _MATROSKA_HEADER_BYTES))  # fmt: skip
    except (OSError, ValueError) as error:
        _raise_if_environment_error(name, error)
        return None  # PyAV's opening reports the file


# Matroska (EBML) element IDs: the file's EBML header, the segment, its info and the info's MuxingApp.
_EBML_ID, _SEGMENT_ID = b"\x1a\x45\xdf\xa3", b"\x18\x53\x80\x67"
_INFO_ID, _MUXING_APP_ID = b"\x15\x49\xa9\x66", b"\x4d\x80"
# The segment info follows the EBML header and the seek head: a few hundred bytes into the files FFmpeg writes.
_MATROSKA_HEADER_BYTES = 8192


def _ebml_number(data: bytes, position: int, keep_marker: bool) -> tuple[int, int] | None:
    """An EBML variable-length number at `position` (an element ID keeps its length marker, a size does not) and the
    position after it; `None` past the end of `data` or for an invalid one. A size of all ones (unknown) is -1."""
    if position >= len(data) or not data[position]:
        return None
    length = 9 - data[position].bit_length()
    if position + length > len(data):
        return None
    value = int.from_bytes(data[position : position + length], "big")
    if not keep_marker:
        value &= (1 << (7 * length)) - 1
        if value == (1 << (7 * length)) - 1:
            value = -1
    return value, position + length


def _matroska_muxing_app(header: bytes) -> str | None:
    """
    The MuxingApp of a Matroska/WebM file's segment info (the library that wrote the file: "Lavf60.16.100", or
    "Lavf" for a bit-exact file, from FFmpeg's muxer; "libebml ..." from mkvmerge), read from the file's first bytes;
    `None` for another container or where they do not hold it. FFmpeg's `encoder` metadata is no substitute: a tag of
    that name, which mkvmerge copies from its source, replaces it.
    """
    position, parents = 0, {_SEGMENT_ID: None, _INFO_ID: None}  # elements read into, not skipped
    while True:
        element = _ebml_number(header, position, keep_marker=True)
        size = element and _ebml_number(header, element[1], keep_marker=False)
        if size is None:
            return None
        identifier = element[0].to_bytes(element[1] - position, "big")
        if position == 0 and identifier != _EBML_ID:
            return None
        body, position = size[1], size[1] + size[0]
        if identifier == _MUXING_APP_ID:
            return header[body:position].decode("utf-8", "replace").rstrip("\0") if position <= len(header) else None
        if identifier in parents:
            position = body
        elif size[0] < 0:
            return None  # an element of unknown size other than the segment: nothing to skip it by


def _matroska_video_seconds(container, stream, muxing_app: str | None) -> float | None:
    """
    How long a Matroska/WebM file's video track lasts, from its first frame to the end of its last, where FFmpeg's
    muxer wrote the file (`muxing_app` "Lavf..."; else `None`). Matroska's only length is the container's, which covers
    all streams (audio that outlasts the video made 50 frames count 126); FFmpeg's muxer tags each track with its end
    time (`DURATION`, "00:00:04.823000000", near the start of the file, so a cut file keeps it), never copying a tag
    of that name from its source. Other files keep the container's length: mkvmerge's `DURATION` is measured from
    the track's first frame, and a tool may keep a tag from its source, stale after a cut or a shift.
    """
    if muxing_app is None or not muxing_app.startswith("Lavf") or "matroska" not in container.format.name.split(","):
        return None
    end = _duration_tag_seconds(stream)
    if end is None:
        return None  # no tag: a file written as a live stream, or not seekable
    seconds = end - (_start_seconds(stream) or 0.0)
    return seconds if seconds > 0 else None


def _duration_tag_seconds(stream) -> float | None:
    """A Matroska track's `DURATION` tag ("00:00:04.823000000") in seconds; `None` without one."""
    try:
        hours, minutes, seconds = stream.metadata.get("DURATION", "").split(":")
        return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    except ValueError:
        return None


def _displayed(frames: np.ndarray, metadata: VideoMetadata) -> tuple[np.ndarray, VideoMetadata]:
    # The coded size is known before decoding; a display rotation of 90 degrees swaps it (torchcodec reports it so).
    metadata.height, metadata.width = frames.shape[1:3]
    return frames, metadata


def _to_rgb(frame) -> np.ndarray:
    """(H, W, 3) uint8 RGB as a player shows the frame: any pixel format converted, display rotation applied."""
    array = frame.to_ndarray(format="rgb24")
    rotation, mirrored = _display_orientation(frame)
    if rotation:
        array = np.rot90(array, k=round(rotation / 90) % 4)
    if mirrored:
        array = array[:, ::-1]
    return np.ascontiguousarray(array) if rotation or mirrored else array


def _display_orientation(frame) -> tuple[float, bool]:
    """
    How the frame's display matrix (phone videos, a "flip" edit) turns it: counterclockwise degrees, then whether
    the result is mirrored left to right. A matrix of negative determinant mirrors; FFmpeg's angle
    (`frame.rotation`) ignores that (a left-right mirror read as -180 turned the picture upside down): the angle is
    that of the matrix with its mirror undone (its first column negated, as `av_display_matrix_flip` does it).
    """
    rotation = frame.rotation  # 0 without a display matrix
    matrix = None
    for entry in frame.side_data:
        # PyAV 18.1.0 iterates the side data, later versions their types (keys of a mapping).
        side_data = entry if isinstance(entry, av.sidedata.sidedata.SideData) else frame.side_data[entry]
        if side_data.type == av.sidedata.sidedata.Type.DISPLAYMATRIX:
            matrix = np.frombuffer(bytes(side_data), dtype=np.int32)
    if matrix is None or len(matrix) != 9 or int(matrix[0]) * int(matrix[4]) - int(matrix[1]) * int(matrix[3]) >= 0:
        return rotation, False
    return -float(np.degrees(np.arctan2(float(matrix[1]), -float(matrix[0])))), True


def _decoded_frames(container, stream, name: str, damaged: list, check_time: Callable[[], None]):
    """
    The stream's frames in display order, decoded packet by packet. A packet the decoder refuses (data damaged part
    way through the file) is skipped, as players skip it, and its error appended to `damaged`: the frames after it
    still decode (until the next key frame they may show the damage). An error of the demuxer itself ends the frames
    and is raised to the caller. `check_time` runs before each packet.
    """
    packets = container.demux(stream)
    while True:
        try:
            packet = next(packets, None)
        except IndexError:
            # PyAV's demuxer fails on the first packet of a stream that FFmpeg announces only when it arrives (MPEG-TS
            # parts joined, or damaged data, read from a pipe): the frames cannot be read on.
            raise EVLVideoDecodingError(
                f"{name}: a stream the header did not announce starts part way through the file, which PyAV cannot "
                "demux (read from a file object that cannot seek? give the path or the bytes)."
            ) from None
        if packet is None:
            return
        check_time()
        try:
            frames = packet.decode()
        except av.error.FFmpegError as error:
            _raise_if_environment_error(name, error)
            damaged.append(error)
            continue
        yield from frames


def _warn_if_damaged(name: str, damaged: list) -> None:
    if damaged:
        logger.warning(f"{name}: skipped {len(damaged)} damaged packet(s) the decoder refused ({damaged[0]}).")


def _declared_seconds(container, stream, muxing_app: str | None) -> float | None:
    """
    How long the video stream lasts by its own track header, for MP4/MOV/3GP files (their index, which a cut download
    whose index comes first still holds whole, gives each track's duration, after its edit list) and Matroska/WebM
    files FFmpeg's muxer wrote (its per-track tag near the start of the file, see `_matroska_video_seconds`); `None`
    otherwise. Other containers may give the duration of all streams together (ASF, other Matroska files) or a frame
    count that over-reports (AVI), which would make intact files look cut short.
    """
    if "matroska" in container.format.name.split(","):
        return _matroska_video_seconds(container, stream, muxing_app)
    if "mp4" not in container.format.name.split(",") or not stream.duration or stream.time_base is None:
        return None
    return float(stream.duration * stream.time_base)


def _seconds_shown_until(frame, start_seconds: float | None, fps: float | None) -> float | None:
    """When `frame` stops being shown, in seconds from the stream's first frame: its time plus its duration (one
    frame at the average rate where it has none)."""
    if frame.time is None or start_seconds is None:
        return None
    if frame.duration and frame.time_base is not None:
        duration = float(frame.duration * frame.time_base)
    else:
        duration = 1 / fps if fps else 0.0
    return frame.time - start_seconds + duration


def _raise_if_cut_short(name: str, shown_until: float | None, declared: float | None, fps: float | None, needed) -> None:
    """
    Refuse a stream whose frames stop (at `shown_until` seconds) more than a frame or two before the `declared`
    duration of its track: a truncated file (a cut download of a video whose index comes first still opens and
    declares its whole length), whose missing frames would otherwise all be its last one. Compared as times, not frame
    counts: a variable frame rate makes indices at the average rate drift from the frames' count.
    """
    if declared is None or shown_until is None or not fps:
        return
    if declared - shown_until > _MISSING_END_FRAMES_TOLERATED / fps + 1e-6:
        raise EVLVideoDecodingError(
            f"{name}: the video stops at {shown_until:.2f} s of the {declared:.2f} s its header declares (a "
            f"truncated file?); frame {needed} cannot be decoded."
        )


def _times_are_guessed(container, stream) -> bool:
    """
    Whether the stream's frame times are FFmpeg's guesses, which the frames' order must correct: AVI stores no
    presentation times, only the frames in decoding order, and for a stream with B-frames the guesses are the reorder
    delay late (MPEG-4 part 2, as Xvid and DivX write it) or in decoding order (H.264).
    """
    return _is_avi_container(container) and bool(stream.codec_context.has_b_frames)


def _is_avi_container(container) -> bool:
    return "avi" in container.format.name.split(",")


def _is_program_stream_container(container) -> bool:
    return container.format.name in ("mpeg", "vob")


def _first_frame_seconds(container, stream, request: "_DecodeRequest") -> float | None:
    """The time of the stream's first frame, decoded from its start (the demuxer is left at the start again); `None`
    where the stream cannot seek (the first frame decoded from where the demuxer is is then frame 0)."""
    try:
        container.seek(0)
    except av.error.FFmpegError:
        return None
    try:
        first = next(iter(_decoded_frames(container, stream, request.name, [], request.check_time)), None)
    finally:
        try:
            container.seek(0)
        except av.error.FFmpegError:
            pass  # the error decoding raised, if any, is the one to report
    return first.time if first is not None else None


def _avi_output_lag(container, stream, name: str, check_time) -> float:
    """
    How much later than its place FFmpeg times each frame of an AVI stream without B-frames: one frame for H.264
    (frames come out of its decoder a packet late and take that packet's guessed time), none for the others. Measured
    on the stream's second frame (the first can be timed at the stream's start whatever its place), 0 where it cannot
    be; the demuxer is left at the start.
    """
    try:
        container.seek(0)
        frames = list(itertools.islice(_decoded_frames(container, stream, name, [], check_time), 2))
        container.seek(0)
    except av.error.FFmpegError:
        return 0.0
    if len(frames) < 2 or frames[1].pts is None or frames[1].dts is None:
        return 0.0
    return max(0.0, float((frames[1].pts - frames[1].dts) * frames[1].time_base))


def _key_frames_placed_by_their_times(container, stream, request: "_DecodeRequest", start_seconds, fps, first) -> bool:
    """
    For a `_times_are_guessed` stream: whether its key frames' guessed times (less the reorder delay), which place the
    first frame after a seek, put them where counting from the start does, checked on its first key frames before frame
    `first` (the demuxer is left at the start). Not so for H.264 with open GOPs (a key frame's leading B-frames, shown
    before it, come after it: its time is its decoding position) or Xvid's packed B-frames (a frame off either way).
    Where no key frame before `first` says, `False`: counting from the start then costs no more than the check did.
    """
    checked, damaged = 0, []
    try:
        container.seek(0)
    except av.error.FFmpegError:
        return False
    try:
        for index, frame in enumerate(_decoded_frames(container, stream, request.name, damaged, request.check_time)):
            if damaged:
                # A packet the decoder refused: the frames counted from here on would be off by those it lost, while
                # the times are not; they are trusted, as for any other stream.
                return True
            if index >= first:
                break
            if index and frame.key_frame:
                if frame.time is None or round((frame.time - start_seconds) * fps) != index:
                    break
                checked += 1
                if checked == _KEY_FRAMES_CHECKED:
                    break
    except (av.error.FFmpegError, EVLVideoDecodingError):
        return True  # the demuxer failed: as damage, the times are trusted
    finally:
        try:
            container.seek(0)  # whatever the outcome, decoding starts from the start or seeks
        except av.error.FFmpegError:
            pass
    return checked == _KEY_FRAMES_CHECKED


def _start_seconds(stream) -> float | None:
    """When the stream's first frame is shown, `None` where the container does not say (raw elementary streams): the
    first frame decoded is then frame 0."""
    return float(stream.start_time * stream.time_base) if stream.start_time is not None else None


def _decode_range(container, stream, request: "_DecodeRequest", wanted, first, fps, declared=None):
    """
    Decode forward from the key frame before frame `first`. With `wanted` (sorted indices), returns {index: frame}
    with each wanted index mapped to the first decoded frame at or after it (the last frame if the stream ends
    early, unless it stops short of the `declared` duration: see `_raise_if_cut_short`); without, returns the list
    of all frames.
    """
    start_seconds = _start_seconds(stream)
    by_order = _times_are_guessed(container, stream)
    if by_order:
        # Frame 0 is the first frame shown, whose guessed time is the stream's start plus the reorder delay.
        start_seconds = _first_frame_seconds(container, stream, request)
    elif start_seconds is not None and _is_avi_container(container):
        start_seconds += _avi_output_lag(container, stream, request.name, request.check_time)
    if by_order and wanted is not None and fps and first > 0 and start_seconds is not None:
        if not _key_frames_placed_by_their_times(container, stream, request, start_seconds, fps, first):
            start_seconds = None  # counted from the first frame decoded, frame 0
    decode_from_here = functools.partial(
        _decode_frames_from, container, stream, request, wanted, first, fps, declared, start_seconds, by_order
    )
    # Without a start time, the first frame's time is frame 0's: decoded from the start, not sought.
    if wanted is not None and fps and first > 0 and start_seconds is not None:
        # FFmpeg seeks to a key frame by decoding timestamps, or without an index (MPEG-TS) by guessing a byte
        # position: it can land on a key frame shown after frame `first` (a B-frame delay without an edit list, HEVC,
        # MPEG-4 part 2), or past the real end of a stream whose length is over-reported (FLV with longer audio).
        # Then it seeks again from earlier, backing off 1, 2, 4, ... seconds, and at last decodes from the start.
        # An MPEG program stream stamps only the first frame starting in each PES packet, and after a seek FFmpeg's
        # parser, restarted within a frame, gives the first frames a neighbour's time (frame 24 timed 22.5) until the
        # next stamp: within 22 frames (0.9 s) in the files measured. Seeking that much earlier, the frames from
        # frame `first` on are past it.
        back_off = _PROGRAM_STREAM_RESYNC_SECONDS if _is_program_stream_container(container) else 0.0
        while True:
            seconds = first / fps - back_off
            try:
                if seconds > 0:
                    container.seek(int((start_seconds + seconds) / stream.time_base), stream=stream, backward=True)
                else:
                    container.seek(0)
            except av.error.FFmpegError:
                # An unseekable stream (a damaged file, a file object that cannot seek): decoded forward from where
                # the demuxer is, which must not lie past frame `first`.
                return decode_from_here(last_try=True, unsought=True)
            if seconds <= 0:
                break
            frames = decode_from_here()
            if frames is not None:
                return frames
            back_off = max(1.0, 2 * back_off)
    return decode_from_here(last_try=True)


def _decode_frames_from(
    container,
    stream,
    request: "_DecodeRequest",
    wanted,
    first,
    fps,
    declared,
    start_seconds,
    by_order: bool,
    last_try: bool = False,
    unsought: bool = False,
):
    """`_decode_range` from where the demuxer is; unless `last_try`, `None` where no frame decodes from there
    (without an error, which is raised) or the first one lies past frame `first`. `unsought`: the demuxer could not
    seek, and a first frame past frame `first` is an error (its frames would stand for the ones before it).
    `by_order`: the frames' times are guesses (`_times_are_guessed`), right for the first frame only (its time, less
    the reorder delay that `start_seconds` includes); the frames after it are counted."""
    name = request.name
    result = {} if wanted is not None else []
    position = 0
    latest = None  # the last frame decoded; converted to RGB only if it has to stand in for frames past the end
    decoded = 0
    index = None  # the last decoded frame's
    damaged = []
    try:
        for frame in _decoded_frames(container, stream, name, damaged, request.check_time):
            decoded += 1
            latest = frame
            if wanted is None:
                result.append(_to_rgb(frame))
                continue
            if start_seconds is None:
                start_seconds = frame.time
            if by_order and decoded == 1 and not frame.key_frame and not last_try:
                return None  # sought onto a packet flagged a key frame that is none (Xvid's placeholders): earlier
            if by_order and index is not None:
                index += 1
            elif frame.time is not None and fps:
                index = round((frame.time - start_seconds) * fps)
            elif index is not None:
                index += 1  # an untimed frame (H.264 in an MPEG program stream times only some) follows the last
            else:
                index = first + len(result)
            if decoded == 1 and index > first and not last_try:
                return None  # the demuxer sought past frame `first` (a container without an index): not its frames
            if decoded == 1 and index > first and unsought:
                raise EVLVideoDecodingError(
                    f"{name}: the stream cannot seek to frame {first}, and its frames from where it is start at frame "
                    f"{index} (a file object that cannot seek? give the path or the bytes)."
                )
            if index < wanted[position]:
                continue
            rgb = _to_rgb(frame)
            while position < len(wanted) and index >= wanted[position]:
                result[wanted[position]] = rgb
                position += 1
            if position == len(wanted):
                break
    except av.error.FFmpegError as error:
        _raise_if_environment_error(name, error)  # not a damaged tail: the frames after it are not missing
        if latest is None:
            raise EVLVideoDecodingError(f"{name}: the video stream cannot be decoded ({error}).") from None
    finally:
        if request.stats is not None:
            request.stats["decoded_frames"] = decoded
    if latest is None and damaged:
        raise EVLVideoDecodingError(f"{name}: the video stream cannot be decoded ({damaged[0]}).")
    if latest is None and not last_try:
        return None
    _warn_if_damaged(name, damaged)
    if wanted is None:
        if not result:
            raise EVLVideoDecodingError(f"{name}: the video stream holds no decodable frame.")
        return result
    if latest is None:
        raise EVLVideoDecodingError(
            f"{name}: no decodable frame at or after frame {first} (the container reports {stream.frames} frames)."
        )
    if position < len(wanted):
        # The stream ended before these indices: repeat its last frame, unless the file is cut short.
        _raise_if_cut_short(name, _seconds_shown_until(latest, start_seconds, fps), declared, fps, wanted[-1])
        rgb = _to_rgb(latest)
        for index in wanted[position:]:
            result[index] = rgb
    return result


class VideoFrameStream:
    """
    Every `step`-th frame of a video, decoded once, front to back, with PyAV: for long videos, in memory that does not
    depend on their length (one decoded frame at a time). Frame `i` is the one `decode_video` gives for index `i` (the
    frame shown at `i / fps` seconds; an index the stream skips gets the next decoded frame), so a window of these
    frames equals the same indices decoded by `decode_video`. Use as a context manager; iterate for
    `(index, frame)` pairs, frames `(height, width, 3)` uint8 RGB. Errors are `EVLVideoDecodingError`s naming the video
    (`OSError`s for the process's failures, as in `decode_video`).
    """

    def __init__(self, source, step: int = 1, max_frame_pixels: int = 4096 * 4096):
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise ValueError(f"`step` must be a positive integer, got {step!r}.")
        if not is_av_available():
            raise ImportError("Streaming a video needs PyAV: pip install av")
        self.name, self.step = _video_name(source), step
        self._source = source  # read again from its start by `reread_source`
        opened = _open_source(source, 120.0)
        self._owned = opened if _opened_here(opened, source) else None  # this stream's to close
        try:
            muxing_app = _muxing_app_of(opened, self.name)
            self._container = av.open(opened, mode="r", metadata_errors="ignore")
        except (av.error.FFmpegError, OSError, ValueError) as error:
            self._close_owned()
            _raise_if_environment_error(self.name, error)
            raise EVLVideoDecodingError(f"{self.name}: not a readable video file ({error}).") from None
        try:
            if not self._container.streams.video:
                raise EVLVideoDecodingError(f"{self.name}: the file has no video stream.")
            self._stream = _video_stream(self._container)
            if self._stream.codec_context is None:
                raise EVLVideoDecodingError(f"{self.name}: the video stream has no usable codec.")
            context = self._stream.codec_context
            _check_not_still_image(self.name, self._container.format.name, context.name, self._stream.frames)
            _check_not_cover_art(self.name, self._stream)
            if context.width * context.height > max_frame_pixels:
                raise EVLVideoDecodingError(
                    f"{self.name}: frames are {context.width}x{context.height}, over the {max_frame_pixels}-pixel "
                    "limit for decoding."
                )
            if context.width * context.height > _SINGLE_THREAD_MAX_PIXELS:
                self._stream.thread_type = "AUTO"
            _warn_if_anamorphic(self.name, self._stream)
        except BaseException:
            self.close()
            raise
        rate = self._stream.average_rate or self._stream.guessed_rate
        self.fps = float(rate) if rate else None
        # A cut file stops short of it.
        self._declared_seconds = _declared_seconds(self._container, self._stream, muxing_app)
        # `decode_video`'s count, which may be missing or approximate: for progress bars only.
        self.total_num_frames, _ = _frame_count(
            self._container, self._stream, self.fps, muxing_app, _can_rewind(opened)
        )

    def __iter__(self):
        stream, fps = self._stream, self.fps
        start_seconds = _start_seconds(stream)
        by_order = _times_are_guessed(self._container, stream)  # counted from the start: frame i is the i-th shown
        if not by_order and start_seconds is not None and _is_avi_container(self._container):
            start_seconds += _avi_output_lag(self._container, stream, self.name, lambda: None)  # see `_decode_range`
        wanted, counted, damaged, size, shown_until = 0, 0, [], None, None
        try:
            for frame in _decoded_frames(self._container, stream, self.name, damaged, lambda: None):
                if start_seconds is None:
                    start_seconds = frame.time
                # The index `decode_video` gives this frame: by its time, or by its position without one.
                by_time = frame.time is not None and fps and not by_order
                index = round((frame.time - start_seconds) * fps) if by_time else counted
                counted += 1
                shown_until = _seconds_shown_until(frame, start_seconds, fps)
                if size is None:
                    size = (frame.width, frame.height)
                elif (frame.width, frame.height) != size:  # windows of frames must stack
                    raise EVLVideoDecodingError(
                        f"{self.name}: the frame size changes within the stream ({size[0]}x{size[1]} to "
                        f"{frame.width}x{frame.height} at frame {index})."
                    )
                if index < wanted:
                    continue
                rgb = _to_rgb(frame)
                while index >= wanted:
                    yield wanted, rgb
                    wanted += self.step
        except av.error.FFmpegError as error:
            _raise_if_environment_error(self.name, error)  # not a damaged tail: the frames after it are not missing
            if counted == 0:
                raise EVLVideoDecodingError(f"{self.name}: the video stream cannot be decoded ({error}).") from None
            # A damaged tail: the frames before it stand, as `decode_video` keeps them (unless the file is cut short).
            logger.warning(f"{self.name}: decoding stopped after {counted} frames ({error}).")
        if counted == 0:
            detail = f" ({damaged[0]})" if damaged else ""
            raise EVLVideoDecodingError(f"{self.name}: the video stream holds no decodable frame{detail}.")
        _warn_if_damaged(self.name, damaged)
        # As `decode_video` refuses its frames: the windows seen so far would score a part of the video as all of it.
        _raise_if_cut_short(self.name, shown_until, self._declared_seconds, fps, wanted)

    def reread_source(self):
        """
        The video again from its start, for a second read (e.g. by `decode_video`): for a URL, while the stream is
        open, its download rewound (a temporary file the stream closes with itself), so it is not fetched twice; a
        file object rewound to its start, or `None` where it cannot be rewound; otherwise the path,
        URL or bytes given.
        """
        if isinstance(self._source, io.IOBase):
            if not _is_seekable(self._source):
                return None
            try:
                self._source.seek(0)
            except (OSError, ValueError):  # it says it can seek, but fails
                return None
            return self._source
        if isinstance(self._source, str) and self._owned is not None:  # a URL's download
            self._owned.seek(0)
            return self._owned
        return self._source

    def close(self) -> None:
        self._container.close()
        self._close_owned()

    def _close_owned(self) -> None:
        if self._owned is not None:
            self._owned.close()
            self._owned = None

    def __enter__(self) -> "VideoFrameStream":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


__all__ = ["DECODING_BACKENDS", "VIDEO_SUFFIXES", "EVLVideoDecodingError", "VideoFrameStream", "decode_video", "resolve_decoding_backend"]
