"""Every kind of bad or unusual video file: it works correctly, or raises EVLVideoDecodingError naming the file."""

import errno
import io
import json
import os
import struct
import subprocess
import sys
import time
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from helpers import decode_on_backend as decode
from helpers import frame_index, index_coded_frames, write_clip, write_matroska
from PIL import Image

from evl_hf import EVLVideoDecodingError, EVLVideoProcessor, decode_video
from evl_hf.video_decoding_evl import VideoFrameStream


def processor(backend, **kwargs):
    values = dict(num_frames=4, sampling_rate=2, size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return EVLVideoProcessor(decoding_backend=backend, **(values | kwargs))


def encode(path, frames, codec="libx264", pix_fmt="yuv420p", fps=25, container_format=None, rotation=None, pts=None,
           options=None):
    """
    Encode RGB frames with any codec/pixel format; optional display rotation, explicit timestamps (VFR) and muxer
    `options`.
    """
    with av.open(str(path), mode="w", format=container_format, options=options) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt
        if pts is not None:
            stream.time_base = Fraction(1, 1000)
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for index, frame in enumerate(frames):
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            if pts is not None:
                video_frame.pts, video_frame.time_base = pts[index], Fraction(1, 1000)
            container.mux(stream.encode(video_frame))
        container.mux(stream.encode())
    return path


def assert_named_error(path, message, backend, **kwargs):
    with pytest.raises(EVLVideoDecodingError, match=message) as error:
        processor(backend, **kwargs)(str(path), return_tensors="pt")
    assert str(path) in str(error.value)


# ---------------------------------------------------------------- files that are not (usable) videos


def test_truncated_at_half_its_size(tmp_path, decoding_backend):
    good = write_clip(tmp_path / "good.mp4", index_coded_frames(60))
    cut = tmp_path / "half.mp4"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert_named_error(cut, "not a readable video", decoding_backend)


def test_truncated_faststart_file_is_refused_not_padded_with_its_last_frame(tmp_path, decoding_backend):
    # The index (moov) first, as web videos are laid out: a download cut after 30% of the frames' data still opens
    # and declares 300 frames. The frames it holds decode; frames past its end are refused, by both backends and the
    # timeline's stream, rather than all being the last frame it holds.
    data = encode(tmp_path / "good.mp4", index_coded_frames(300), options={"movflags": "faststart"}).read_bytes()
    frames_start = data.index(b"mdat")
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: frames_start + (len(data) - frames_start) * 3 // 10])
    frames, _ = decode(cut, lambda metadata: [0, 20], decoding_backend)
    assert [frame_index(frame) for frame in frames] == [0, 20]
    message = r"the video stops at [\d.]+ s of the [\d.]+ s its header declares"
    with pytest.raises(EVLVideoDecodingError, match=message) as error:
        decode_video(cut, lambda metadata: [0, 150, 299], backend=decoding_backend)
    assert str(cut) in str(error.value)
    assert_named_error(cut, message, decoding_backend, num_temporal_views=3)
    with pytest.raises(EVLVideoDecodingError, match=message), VideoFrameStream(str(cut), step=10) as stream:
        list(stream)


def test_truncated_matroska_file_is_refused_not_padded_with_its_last_frame(tmp_path, decoding_backend):
    # FFmpeg's muxer tags each track with its duration near the start of the file: a Matroska/WebM file cut at half
    # still declares its whole video, and frames past its end are refused as for MP4, by both backends and the
    # timeline's stream, rather than all being its last frame.
    data = write_matroska(tmp_path / "good.mkv", index_coded_frames(120), audio_seconds=6).read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: len(data) // 2])
    frames, metadata = decode(cut, lambda metadata: [0, 20], decoding_backend)
    assert metadata.total_num_frames == 120 and [frame_index(frame) for frame in frames] == [0, 20]
    message = r"the video stops at [\d.]+ s of the 4.80 s its header declares"
    with pytest.raises(EVLVideoDecodingError, match=message) as error:
        decode_video(cut, lambda metadata: [0, 60, 119], backend=decoding_backend)
    assert str(cut) in str(error.value)
    assert_named_error(cut, message, decoding_backend, num_temporal_views=3)
    with pytest.raises(EVLVideoDecodingError, match=message), VideoFrameStream(str(cut), step=10) as stream:
        list(stream)


def test_a_cut_mp4_counts_the_frames_its_edit_list_shows_not_those_it_hides(tmp_path, decoding_backend):
    # `ffmpeg -ss 1.3 -c copy` keeps the GOP from the key frame before the cut, its first 8 frames hidden by an edit
    # list: players show 117 frames, the container holds 125 samples. Counted 125, every sampling spread over 8
    # phantom frames that came back as copies of the last one.
    source, cut = tmp_path / "source.mp4", tmp_path / "cut.mp4"
    write_clip(source, index_coded_frames(150), fps=25, gop=25, options={"bf": "2"})
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-ss", "1.3", "-i", str(source), "-c", "copy", str(cut)],
                   check=True, timeout=60)  # fmt: skip
    frames, metadata = decode(cut, None, decoding_backend)
    assert metadata.total_num_frames == len(frames) == 117
    assert [frame_index(f) for f in frames] == list(range(33, 150))
    with VideoFrameStream(str(cut)) as stream:
        assert stream.total_num_frames == len(list(stream)) == 117


def test_an_intact_video_whose_frame_rate_rises_at_its_end_is_not_taken_for_a_truncated_one(tmp_path, decoding_backend):
    # 10 frames at 10 fps, then 90 at 30 fps (a phone camera as the light changes): at the average rate (24.4 fps, not
    # 100 frames in 3.97 s) the last frame's index is 96, four short of the 100 the header counts, yet nothing is
    # missing: its time is the stream's end. The truncation check compares times, not an index with a count.
    path = tmp_path / "rising_rate.mp4"
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        time_ms = 0
        for index, step_ms in enumerate([100] * 10 + [33] * 90):
            frame = av.VideoFrame.from_ndarray(np.full((64, 96, 3), index, np.uint8), format="rgb24")
            frame.pts, frame.time_base = time_ms, Fraction(1, 1000)
            time_ms += step_ms
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    frames, metadata = decode_video(path, lambda metadata: list(range(metadata.total_num_frames)), backend=decoding_backend)
    assert len(frames) == metadata.total_num_frames == 100
    with VideoFrameStream(str(path), step=1) as frame_stream:
        assert len(list(frame_stream)) >= 96


@pytest.mark.parametrize(
    "container_format, options",
    [("mpegts", {}), ("mp4", {"use_editlist": "0"})],
    ids=["MPEG-TS", "mp4 without an edit list"],
)
def test_a_seek_landing_after_the_wanted_frame_is_done_again_from_earlier(
    tmp_path, decoding_backend, container_format, options
):
    # FFmpeg can land on a key frame shown after the wanted frame: MPEG-TS has no index (its seek guesses a byte
    # position), and an mp4 without an edit list starts its B-frame stream late (key frames are found by decoding
    # time). Every frame asked for alone must still be itself, with both backends.
    path = tmp_path / f"clip.{'ts' if container_format == 'mpegts' else 'mp4'}"
    with av.open(str(path), "w", format=container_format, options=options) as container:
        stream = container.add_stream("libx264", rate=25, options={"g": "24", "keyint_min": "24", "sc_threshold": "0"})
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for frame in index_coded_frames(72):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    frames, _ = decode_video(path, lambda metadata: list(range(1, 72)), backend=decoding_backend)
    assert [frame_index(frame) for frame in frames] == list(range(1, 72))
    for index in (1, 5, 22, 23, 46, 47, 70):
        frames, _ = decode_video(path, lambda metadata: [index], backend=decoding_backend)
        assert frame_index(frames[0]) == index


@pytest.mark.parametrize("codec, b_frames", [("mpeg4", "2"), ("libx264", "2"), ("libx264", "0")])
def test_an_avi_gives_each_frame_for_its_own_index(tmp_path, decoding_backend, codec, b_frames):
    # AVI stores no presentation times, and FFmpeg's guesses for a B-frame stream are the reorder delay late (MPEG-4
    # part 2, as Xvid/DivX write it) or in decoding order (H.264), and one frame late for H.264 without B-frames:
    # indexed by them, frame i was frame i-1 or a neighbour. Each frame is its own index, alone or together, with both
    # backends and the timeline's stream.
    path = write_clip(tmp_path / "clip.avi", index_coded_frames(72), codec=codec, gop=24, options={"bf": b_frames})
    frames, metadata = decode_video(path, lambda metadata: list(range(72)), backend=decoding_backend)
    assert [frame_index(frame) for frame in frames] == list(range(72)) and metadata.total_num_frames == 72
    assert_each_frame_is_its_index(path, ([0], [1], [22], [23], [24], [47, 71], [5, 30, 60]), decoding_backend)
    with VideoFrameStream(str(path), step=5) as frame_stream:
        assert [(index, frame_index(frame)) for index, frame in frame_stream] == [(i, i) for i in range(0, 72, 5)]


@pytest.mark.parametrize("codec", ["libx264", "mpeg4"])
def test_an_avi_whose_video_starts_late_gives_each_frame_for_its_own_index(tmp_path, decoding_backend, codec):
    # Empty chunks before the first frame (a capture's dropped frames): FFmpeg times the first frame by its place
    # (H.264: one frame later), so it is no frame 0 to index from.
    path = tmp_path / "late.avi"
    frames = index_coded_frames(40)
    with av.open(str(path), "w", format="avi") as container:
        stream = container.add_stream(codec, rate=25, options={"g": "24", "bf": "0"})
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for index in range(5, 40):
            frame = av.VideoFrame.from_ndarray(frames[index], format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    decoded, _ = decode_video(path, lambda metadata: [10, 20, 30], backend=decoding_backend)
    assert [frame_index(frame) for frame in decoded] == [10, 20, 30]
    with VideoFrameStream(str(path), step=10) as frame_stream:
        assert [(index, frame_index(frame)) for index, frame in frame_stream][1:] == [(10, 10), (20, 20), (30, 30)]


def assert_each_frame_is_its_index(path, index_sets, decoding_backend):
    """Each set of indices of an index-coded clip, decoded alone, gives the frames showing those indices."""
    for indices in index_sets:
        frames, _ = decode_video(path, lambda metadata: indices, backend=decoding_backend)
        assert [frame_index(frame) for frame in frames] == indices


def _ffmpeg_can_encode(encoder):
    try:
        result = subprocess.run(["ffmpeg", "-hide_banner", "-encoders"], capture_output=True, text=True, timeout=30)
    except OSError:
        return False
    return f" {encoder} " in result.stdout


def test_an_avi_whose_key_frame_times_are_off_is_counted_from_its_start(tmp_path, decoding_backend):
    # H.264 with open GOPs in AVI: after a seek the key frame comes out first (its leading B-frames, shown before it,
    # dropped), and its guessed time is its decoding position, 3 frames early: frame 21 came back as 24.
    params = "open-gop=1:keyint=24:min-keyint=24:scenecut=0:bframes=3:b-pyramid=normal"
    path = write_clip(tmp_path / "clip.avi", index_coded_frames(72, 96, 128), gop=24, options={"x264-params": params})
    assert_each_frame_is_its_index(path, ([21], [22], [23], [24], [30], [45, 70], list(range(1, 12))), decoding_backend)


@pytest.mark.skipif(not _ffmpeg_can_encode("libxvid"), reason="needs the ffmpeg command with libxvid")
def test_an_xvid_avi_with_packed_b_frames_gives_each_frame_for_its_own_index(tmp_path, decoding_backend):
    # Xvid's packed B-frames: a reference frame and a B-frame share a packet, and a 6-byte placeholder, flagged a key
    # frame, follows. The key frames' guessed times are a frame off either way: [1..11] came back as [2..12].
    raw, path = tmp_path / "clip.rgb", tmp_path / "clip.avi"
    index_coded_frames(72, 96, 128).tofile(raw)
    subprocess.run(
        ["ffmpeg", "-hide_banner", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", "128x96",
         "-r", "25", "-i", str(raw), "-c:v", "libxvid", "-bf", "2", "-g", "24", "-q:v", "3", str(path)],
        check=True, timeout=60,
    )
    # (FFmpeg decodes 70 of the 72 frames: its last two are lost at the end, from the start too.)
    assert_each_frame_is_its_index(path, ([1], [2], [6], [16], [22], [47, 69], list(range(1, 12))), decoding_backend)


@pytest.mark.parametrize("codec", ["mpeg2video", "mpeg1video"])
def test_an_mpeg_program_stream_gives_each_frame_for_its_own_index_after_a_seek(tmp_path, decoding_backend, codec):
    # An MPEG program stream stamps only the first frame starting in each PES packet; after a seek FFmpeg's parser
    # restarts within a frame and gives the first key frames a neighbour's time (frame 24 timed 22.5): frames 22-31
    # came back as 24-31 and so on.
    path = write_clip(tmp_path / "clip.mpg", index_coded_frames(120, 96, 128), codec=codec, container_format="mpeg",
                      options={"bf": "2", "qscale": "3"})  # fmt: skip
    assert_each_frame_is_its_index(path, ([22], [23], [25], [35], [50], [70, 90], list(range(30, 42))), decoding_backend)


@pytest.mark.parametrize("codec", ["mpeg4", "libx264"])
def test_an_avi_whose_second_key_frame_is_damaged_keeps_the_frames_after_it(tmp_path, decoding_backend, codec):
    # The check of a B-frame stream's key frames (sought only where they are where their times say) met the damaged
    # one and counted the file from its start, where the frames the decoder dropped shifted every later index.
    path = write_clip(tmp_path / "damaged.avi", index_coded_frames(120), codec=codec, gop=24, options={"bf": "2"})
    with av.open(str(path)) as container:
        key_packets = [(packet.pos, packet.size) for packet in container.demux(video=0) if packet.is_keyframe]
    position, size = key_packets[1]
    with open(path, "r+b") as file:
        file.seek(position + 8)  # past the chunk's header
        file.write(bytes(size))
    assert_each_frame_is_its_index(path, ([60, 61], [100, 101]), decoding_backend)


def test_a_stream_that_cannot_seek_never_gives_a_later_frame_for_an_earlier_one(tmp_path):
    # An FLV read from a pipe: the demuxer cannot seek, and after probing it stands past the first frames. Its frames
    # from there must not stand for the ones before: a clear error instead (the path decodes it).
    path = tmp_path / "clip.flv"
    with av.open(str(path), "w", format="flv") as container:
        stream = container.add_stream("libx264", rate=25, options={"g": "24"})
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for frame in index_coded_frames(120):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())

    class Pipe(io.RawIOBase):
        def __init__(self, data):
            self.data = io.BytesIO(data)

        def readable(self):
            return True

        def readinto(self, buffer):
            chunk = self.data.read(len(buffer))
            buffer[: len(chunk)] = chunk
            return len(chunk)

    for indices in ([1], [41, 49]):
        expected = [frame_index(frame) for frame in decode_video(path, lambda metadata: indices, backend="pyav")[0]]
        assert expected == indices
        try:
            frames, _ = decode_video(io.BufferedReader(Pipe(path.read_bytes())), lambda metadata: indices)
        except EVLVideoDecodingError as error:
            assert "cannot seek to frame" in str(error) or "no decodable frame" in str(error), error
        else:
            assert [frame_index(frame) for frame in frames] == indices


def test_a_stream_appearing_part_way_through_a_pipe_is_a_named_error(tmp_path):
    # Two MPEG-TS parts joined, the second adding an audio stream: read from a pipe, FFmpeg announces the new stream
    # only when it arrives, and PyAV's demuxer raised IndexError on its first packet. A named error instead.
    def part(frames, first, audio):
        buffer = io.BytesIO()
        with av.open(buffer, "w", format="mpegts") as container:
            video = container.add_stream("mpeg2video", rate=25)
            video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
            if audio:
                sound = container.add_stream("mp2", rate=48000)
                sound.layout = "mono"
            for index, frame in enumerate(frames):
                video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
                video_frame.pts = first + index
                container.mux(video.encode(video_frame))
                if audio:
                    audio_frame = av.AudioFrame.from_ndarray(np.zeros((1, 1920), np.int16), format="s16", layout="mono")
                    audio_frame.sample_rate, audio_frame.pts = 48000, (first + index) * 1920
                    container.mux(sound.encode(audio_frame))
            container.mux(video.encode())
        return buffer.getvalue()

    frames = index_coded_frames(60)
    data = part(frames[:30], 0, audio=False) + part(frames[30:], 30, audio=True)
    decoded, _ = decode_video(data, lambda metadata: [5, 20], backend="pyav")  # whole, it is read
    assert [frame_index(frame) for frame in decoded] == [5, 20]

    class Pipe(io.RawIOBase):
        name = "camera-pipe"

        def __init__(self, data):
            self.data = io.BytesIO(data)

        def readable(self):
            return True

        def readinto(self, buffer):
            return self.data.readinto(buffer)

    # PyAV's failure is not deterministic (about 1 run in 12 demuxes it): either the right frame or the named error.
    try:
        decoded, _ = decode_video(io.BufferedReader(Pipe(data)), lambda metadata: [5])
    except EVLVideoDecodingError as error:
        assert "camera-pipe: a stream the header did not announce" in str(error)
    else:
        assert [frame_index(frame) for frame in decoded] == [5]


def test_a_file_object_whose_seek_fails_is_a_named_error(tmp_path, decoding_backend):
    # It says it can seek, but its seeks fail after the first few (a network file system, a wrapper): the decoders'
    # own errors or the rewinding before PyAV's try raised io.UnsupportedOperation. A named error instead.
    data = write_clip(tmp_path / "clip.mp4", index_coded_frames(30)).read_bytes()

    class FailingSeek(io.BytesIO):
        name = "flaky-share.mp4"
        seeks = 0

        def seek(self, position, whence=0):
            self.seeks += 1
            if self.seeks > 3 and whence == 0:
                raise io.UnsupportedOperation("seek")
            return super().seek(position, whence)

    with pytest.raises(EVLVideoDecodingError, match="flaky-share.mp4: "):
        decode_video(FailingSeek(data), lambda metadata: [5], backend=decoding_backend)


def test_audio_only_file(tmp_path, decoding_backend):
    path = tmp_path / "audio.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("aac", rate=16000)
        samples = np.zeros((1, 16000), dtype=np.float32)
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.sample_rate = 16000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    assert_named_error(path, "no video stream", decoding_backend)


@pytest.mark.parametrize("image_format", ["PNG", "JPEG", "GIF", "WEBP"])
def test_still_image_renamed_mp4_is_not_a_video(tmp_path, image_format, decoding_backend):
    # FFmpeg would open it as a one-frame video, trained on as num_frames copies of the photo.
    image = np.zeros((40, 60, 3), dtype=np.uint8)
    image[:, :30] = 255
    path = tmp_path / "photo.mp4"
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=image_format)
    path.write_bytes(buffer.getvalue())
    assert_named_error(path, "is a still image", decoding_backend)
    with pytest.raises(EVLVideoDecodingError, match="photo.mp4: the file is a still image"):
        decode_video(path, lambda metadata: [0] * 8, backend=decoding_backend)


def test_one_jpeg_is_a_still_image_but_a_raw_stream_of_them_is_a_video(tmp_path, decoding_backend):
    jpegs = []
    for index in range(6):
        buffer = io.BytesIO()
        Image.fromarray(np.full((40, 64, 3), 40 * index, dtype=np.uint8)).save(buffer, format="JPEG", quality=95)
        jpegs.append(buffer.getvalue())
    photo = tmp_path / "photo.mp4"
    photo.write_bytes(jpegs[0])
    assert_named_error(photo, "is a still image", decoding_backend)
    # Concatenated JPEGs (a raw MJPEG stream, FFmpeg's `mjpeg` demuxer) are a video.
    path = tmp_path / "frames.mjpeg"
    path.write_bytes(b"".join(jpegs))
    frames, metadata = decode(path, lambda metadata: [0, 5], decoding_backend, decoded_by="pyav")
    assert metadata.total_num_frames == 6 and abs(int(frames[1].mean()) - 200) <= 2


def test_text_file_and_missing_path_and_directory(tmp_path, decoding_backend):
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 50)
    assert_named_error(text, "not a readable video", decoding_backend)
    assert_named_error(tmp_path / "nowhere.mp4", "no such file", decoding_backend)
    assert_named_error(tmp_path, "is a directory", decoding_backend)


# ---------------------------------------------------------------- unusual but valid videos


def test_one_frame_video_repeats_its_frame(tmp_path, decoding_backend):
    path = write_clip(tmp_path / "one.mp4", index_coded_frames(1))
    frames, metadata = decode(path, lambda metadata: [0, 0, 0, 0], decoding_backend)
    assert metadata.total_num_frames == 1 and [frame_index(f) for f in frames] == [0, 0, 0, 0]
    assert processor(decoding_backend)(str(path), return_tensors="pt")["pixel_values"].shape == (1, 4, 3, 32, 32)


def test_an_audio_file_with_cover_art_is_refused_not_decoded_as_the_picture_repeated(tmp_path, decoding_backend):
    # Its only video stream is the attached picture: it decoded as a 95,940-frame video of the cover.
    path = tmp_path / "song.m4a"
    with av.open(str(path), "w", format="mp4") as container:
        audio = container.add_stream("aac", rate=48000)
        audio.layout = "mono"
        cover = container.add_stream("mjpeg", rate=1)
        cover.width, cover.height, cover.pix_fmt = 64, 48, "yuvj420p"
        cover.disposition = av.stream.Disposition.attached_pic
        container.mux(cover.encode(av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")))
        container.mux(cover.encode())
        for index in range(50):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 48000, index * 1024
            container.mux(audio.encode(frame))
        container.mux(audio.encode())
    with pytest.raises(EVLVideoDecodingError, match="song.m4a: its only picture is cover art"):
        decode_video(path, lambda metadata: [0, 1], backend=decoding_backend)
    with pytest.raises(EVLVideoDecodingError, match="cover art"):
        VideoFrameStream(str(path))


@pytest.mark.skipif(not _ffmpeg_can_encode("mjpeg"), reason="needs the ffmpeg command")
def test_an_mjpeg_video_given_as_bytes_gives_the_frames_its_path_gives(tmp_path):
    # A picture codec makes torchcodec ask PyAV which stream it would pick; PyAV's read of the file object moved it
    # under torchcodec's buffered reads, which then returned other frames, silently.
    path = tmp_path / "camera.mov"
    subprocess.run(
        ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc=size=160x120:rate=10",
         "-t", "3", "-c:v", "mjpeg", "-q:v", "5", str(path)],
        check=True, timeout=60,
    )  # fmt: skip
    expected, _ = decode_video(path, lambda metadata: [0, 15, 29], backend="torchcodec")
    stats = {}
    frames, _ = decode_video(path.read_bytes(), lambda metadata: [0, 15, 29], backend="torchcodec", stats=stats)
    assert stats["backend"] == "torchcodec"
    np.testing.assert_array_equal(frames, expected)


def test_a_one_frame_video_given_as_bytes_stays_with_torchcodec(tmp_path):
    # Its one frame makes torchcodec ask PyAV which stream it would pick (a cover beside a video?): PyAV read the bytes
    # from where torchcodec had left them, failed, and the video went to PyAV for nothing.
    path = write_clip(tmp_path / "one.mp4", index_coded_frames(1))
    stats = {}
    frames, _ = decode_video(path.read_bytes(), lambda metadata: [0], backend="torchcodec", stats=stats)
    assert stats["backend"] == "torchcodec" and frame_index(frames[0]) == 0


def test_clip_shorter_than_the_window_repeats_the_last_frame(tmp_path, decoding_backend):
    path = write_clip(tmp_path / "short.mp4", index_coded_frames(5))
    out = processor(decoding_backend, do_resize=False, do_center_crop=False, do_rescale=False, do_normalize=False,
                    num_frames=4, sampling_rate=3)(str(path), return_tensors="pt", return_metadata=True)  # fmt: skip
    assert out["video_metadata"][0].video_backend == decoding_backend
    assert [frame_index(f.permute(1, 2, 0).numpy()) for f in out["pixel_values"][0]] == [0, 3, 4, 4]


@pytest.mark.parametrize("height, width", [(1, 1), (3, 5), (1, 3)])
def test_frames_one_or_three_pixels_tall_keep_their_colour(tmp_path, height, width, decoding_backend):
    # (frames, 1, 1, 3) or (frames, 3, W, 3): inferred, the channel axis would be read as the first one (grey out).
    frames = np.empty((6, height, width, 3), dtype=np.uint8)
    frames[...] = (200, 30, 90)
    path = encode(tmp_path / "pixel.mkv", frames, codec="ffv1", pix_fmt="bgr0")
    out = processor(decoding_backend, do_normalize=False)(str(path), return_tensors="pt", return_metadata=True)
    assert out["video_metadata"][0].video_backend == decoding_backend
    out = out["pixel_values"]
    assert out.shape == (1, 4, 3, 32, 32)
    expected = torch.tensor([200, 30, 90]).view(1, 1, 3, 1, 1).expand_as(out) / 255
    torch.testing.assert_close(out, expected, atol=2 / 255, rtol=0)


def test_very_large_frames_are_decoded_and_resized(tmp_path, decoding_backend):
    frames = np.zeros((2, 3000, 4000, 3), dtype=np.uint8)
    frames[:, :, 2000:] = 255
    path = encode(tmp_path / "large.mp4", frames)
    out = processor(decoding_backend, do_normalize=False, do_center_crop=False, size={"shortest_edge": 30})(
        str(path), return_tensors="pt", return_metadata=True
    )
    assert out["video_metadata"][0].video_backend == decoding_backend
    pixels = out["pixel_values"][0]
    assert pixels.shape == (4, 3, 30, 40)
    assert pixels[:, :, :, :18].max() < 0.1 and pixels[:, :, :, 22:].min() > 0.9


def test_frame_size_guard(tmp_path, decoding_backend):
    path = encode(tmp_path / "big.mp4", np.zeros((1, 480, 640, 3), dtype=np.uint8))
    with pytest.raises(EVLVideoDecodingError, match="640x480, over the 100000-pixel limit") as error:
        decode_video(path, max_frame_pixels=100_000, backend=decoding_backend)
    assert str(path) in str(error.value)


@pytest.mark.parametrize(
    "codec, pix_fmt, height, width",
    [("libx264", "gray", 48, 64), ("libx264", "yuv444p", 48, 64), ("libx264", "yuv420p10le", 48, 64),
     ("libx264", "yuv444p", 47, 63), ("ffv1", "yuv420p", 45, 61)],
)  # fmt: skip
def test_pixel_formats_bit_depths_and_odd_sizes(tmp_path, codec, pix_fmt, height, width, decoding_backend):
    frames = index_coded_frames(20, height=height - height % 2, width=width - width % 8)
    padded = np.zeros((20, height, width, 3), dtype=np.uint8)
    padded[:, : frames.shape[1], : frames.shape[2]] = frames
    path = encode(tmp_path / f"{pix_fmt}.mkv", padded, codec=codec, pix_fmt=pix_fmt)
    decoded, metadata = decode(path, lambda metadata: [0, 7, 19], decoding_backend)
    assert decoded.shape == (3, height, width, 3) and decoded.dtype == np.uint8
    assert [frame_index(f[: frames.shape[1], : frames.shape[2]]) for f in decoded] == [0, 7, 19]
    assert metadata.total_num_frames == 20


@pytest.mark.parametrize(
    "codec, pix_fmt, suffix, torchcodec_decodes",
    [("libx264", "yuvj420p", "mp4", True), ("libx264", "yuv420p10le", "mp4", False),
     ("libvpx-vp9", "yuv420p", "webm", False),
     ("libx264rgb", "bgr0", "mp4", True)],  # RGB: its range flag means nothing, torchcodec decodes it as it is
)  # fmt: skip
def test_a_full_range_video_keeps_its_levels(tmp_path, codec, pix_fmt, suffix, torchcodec_decodes, decoding_backend):
    # Flat grey 64 coded full range (color_range=pc). torchcodec takes the range from yuvj* pixel formats only and
    # decoded the others as limited range (54-56): PyAV decodes them, as FFmpeg shows them.
    if not _ffmpeg_can_encode(codec):
        pytest.skip(f"ffmpeg has no {codec} encoder")
    path = tmp_path / f"full_{pix_fmt}.{suffix}"
    lossless = ["-qp", "0"] if codec.startswith("libx264") else ["-lossless", "1"]
    subprocess.run(
        ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "color=c=0x404040:size=64x64:rate=25:duration=0.4", "-vf",
         f"scale=out_range=full,format={pix_fmt}", "-c:v", codec, *lossless, "-color_range", "pc", str(path)],
        check=True, timeout=60,
    )  # fmt: skip
    decoded_by = "torchcodec" if decoding_backend == "torchcodec" and torchcodec_decodes else "pyav"
    frames, _ = decode(path, lambda metadata: [0, 5], decoding_backend, decoded_by=decoded_by)
    assert np.abs(frames.astype(int) - 64).max() <= 1


def test_phone_rotation_metadata_is_applied(tmp_path, decoding_backend):
    frames = np.zeros((4, 32, 64, 3), dtype=np.uint8)
    frames[:, :, :32] = 255  # left half white
    path = encode(tmp_path / "phone.mp4", frames, rotation=90)
    decoded, metadata = decode(path, lambda metadata: [0], decoding_backend)
    # Displayed rotated 90 degrees counterclockwise: portrait, the white half on the bottom.
    assert decoded.shape == (1, 64, 32, 3) and (metadata.width, metadata.height) == (32, 64)
    assert decoded[0, 40:].mean() > 200 and decoded[0, :24].mean() < 50


@pytest.mark.parametrize(
    "matrix", [(-1, 0, 0, 1), (1, 0, 0, -1), (0, 1, 1, 0), (0, -1, -1, 0), (0, 1, -1, 0)],
    ids=["mirrored", "upside-down mirror", "transposed", "transposed the other way", "rotated 90"],
)  # fmt: skip
def test_a_display_matrix_that_mirrors_the_picture_is_applied_as_ffmpeg_shows_it(tmp_path, matrix, decoding_backend):
    # A "flip" edit writes a display matrix of negative determinant: the picture is mirrored, not rotated. Its angle
    # alone (-180 for a horizontal mirror) turned the frames upside down. The frames must be FFmpeg's autorotated ones.
    base, path = tmp_path / "base.mp4", tmp_path / "flipped.mp4"
    frames = np.zeros((3, 32, 48, 3), np.uint8)
    frames[:, :16, :16] = (255, 0, 0)  # a red top-left corner and a green bottom row tell all eight orientations
    frames[:, 24:] = (0, 255, 0)
    write_clip(base, frames, options={"qp": "0"})
    data = bytearray(base.read_bytes())
    tkhd = data.find(b"tkhd") - 4
    offset = tkhd + 8 + 4 + (32 if data[tkhd + 8] == 1 else 20) + 8 + 8
    a, b, c, d = (value * 0x10000 for value in matrix)
    struct.pack_into(">9i", data, offset, a, b, 0, c, d, 0, 0, 0, 0x40000000)
    path.write_bytes(bytes(data))
    shown = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-frames:v", "1", "-f", "rawvideo", "-pix_fmt",
                            "rgb24", "-"], capture_output=True, check=True, timeout=60).stdout  # fmt: skip
    decoded_by = "torchcodec" if decoding_backend == "torchcodec" and matrix == (0, 1, -1, 0) else "pyav"
    decoded, metadata = decode(path, lambda metadata: [0, 2], decoding_backend, decoded_by=decoded_by)
    expected = np.frombuffer(shown, np.uint8).reshape(decoded.shape[1:])
    assert (metadata.height, metadata.width) == expected.shape[:2]
    assert np.abs(decoded[0].astype(int) - expected).max() < 40
    # As bytes (a data set's column): the same, decoded by the same backend (torchcodec had read them to their end).
    in_memory, _ = decode(path.read_bytes(), lambda metadata: [0, 2], decoding_backend, decoded_by=decoded_by)
    np.testing.assert_array_equal(in_memory, decoded)


def test_an_anamorphic_video_is_decoded_at_its_coded_size_with_one_warning_naming_its_aspect_ratio(
    tmp_path, caplog, decoding_backend
):
    # Pixels 64:45 as wide as tall (DVD, broadcast 16:9): players stretch 64x48 to 91x48. The coded frames (squeezed
    # to EVL) came back without a word; now the file's first decoding warns, naming the ratio and the display size.
    path = tmp_path / f"anamorphic_{decoding_backend}.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc2=size=64x48:rate=25:duration=0.4",
                    "-vf", "setsar=64/45", "-c:v", "libx264", str(path)], check=True, timeout=60)  # fmt: skip
    with caplog.at_level("WARNING"):
        for _ in range(2):
            frames, metadata = decode(path, lambda metadata: [0, 5], decoding_backend)
    assert frames.shape[1:3] == (48, 64) and (metadata.width, metadata.height) == (64, 48)
    warnings = [record.getMessage() for record in caplog.records if "aspect ratio" in record.getMessage()]
    assert len(warnings) == 1 and str(path) in warnings[0] and "64:45" in warnings[0] and "91x48" in warnings[0]


def test_variable_frame_rate_picks_frames_by_timestamp(tmp_path, decoding_backend):
    # 30 frames: the first 10 at 10 ms spacing, then 100 ms spacing; nominal rate from the average.
    pts = [i * 10 for i in range(10)] + [100 + i * 100 for i in range(20)]
    path = encode(tmp_path / "vfr.mkv", index_coded_frames(30), pts=pts)
    # torchcodec's frames for the sparse part are shown after the times asked for, as a seek to a later key frame's
    # would be: PyAV decodes the video (`decode` checks that the frames are PyAV's either way).
    frames, metadata = decode(path, lambda metadata: list(range(0, metadata.total_num_frames, 3)), decoding_backend,
                              decoded_by="pyav")  # fmt: skip
    indices = [frame_index(f) for f in frames]
    assert indices == sorted(indices) and indices[-1] >= 25 and len(set(indices)) > 3


def test_a_variable_frame_rate_mp4_gives_the_same_frames_at_the_same_average_rate_on_both_backends(
    tmp_path, decoding_backend
):
    # 1 s at 30 fps, then 1 s at 15 fps (a phone in low light): the header's nominal rate is 30 fps, the average
    # 45 frames / 1.9 s. torchcodec took the nominal rate and gave frame 17 for index 17, PyAV frame 21 (shown at
    # 17 / 23.7 s). Both now use the average rate (`decode` checks that the frames and metadata are PyAV's).
    pts = [round(i * 1000 / 30) for i in range(30)] + [1000 + round(i * 1000 / 15) for i in range(15)]
    path = encode(tmp_path / "phone_vfr.mp4", index_coded_frames(45), fps=30, pts=pts)
    frames, metadata = decode(path, lambda metadata: [17, 20, 23, 26], decoding_backend, decoded_by="pyav")
    assert metadata.fps == pytest.approx(45 / 1.9)
    assert [frame_index(f) for f in frames] == [21, 25, 29, 32]


def test_stream_without_frame_count_or_duration(tmp_path, decoding_backend):
    # A raw H.264 elementary stream carries neither a frame count nor a duration: frames are counted by decoding
    # (PyAV; torchcodec has nothing to seek by and hands the stream over, also from a file object it has read).
    path = encode(tmp_path / "raw.h264", index_coded_frames(12), container_format="h264")
    with path.open("rb") as file:
        for source in (path, file):
            frames, metadata = decode(source, lambda metadata: [0, metadata.total_num_frames - 1], decoding_backend,
                                      decoded_by="pyav")  # fmt: skip
            assert metadata.total_num_frames == 12
            assert [frame_index(f) for f in frames] == [0, 11]


def test_corrupt_payload_after_a_valid_header(tmp_path, decoding_backend):
    good = write_clip(tmp_path / "good.mp4", index_coded_frames(60)).read_bytes()
    damaged = bytearray(good)
    rng = np.random.default_rng(0)
    for position in rng.integers(len(good) // 10, len(good) * 9 // 10, 400):
        damaged[position] = rng.integers(0, 256)
    path = tmp_path / "damaged.mp4"
    path.write_bytes(bytes(damaged))
    try:
        out = processor(decoding_backend)(str(path), return_tensors="pt")["pixel_values"]
    except EVLVideoDecodingError as error:
        assert str(path) in str(error)
    else:
        assert out.shape == (1, 4, 3, 32, 32) and torch.isfinite(out).all()


def noisy_index_coded_clip(path, num_frames, gop):
    # Noise makes every packet hundreds of bytes, so damage in the middle of the file hits one packet's data.
    frames = index_coded_frames(num_frames).astype(int)
    frames += np.random.default_rng(0).integers(-40, 40, frames.shape)
    return write_clip(path, np.clip(frames, 0, 255).astype(np.uint8), gop=gop)


def test_a_damaged_packet_in_the_middle_is_skipped_not_the_rest_of_the_video(tmp_path, caplog):
    # 200 bytes flipped half way through a 300-frame clip: the decoder refuses one packet. Frames after it decode (a
    # player skips it); they used to be replaced by the last frame before it (decode_video with PyAV) or dropped with
    # the rest of the video (the timeline's stream).
    data = noisy_index_coded_clip(tmp_path / "good.mp4", 300, gop=25).read_bytes()
    middle = len(data) // 2
    path = tmp_path / "damaged.mp4"
    path.write_bytes(data[:middle] + bytes(byte ^ 0xFF for byte in data[middle : middle + 200]) + data[middle + 200 :])
    with caplog.at_level("WARNING"):
        frames, metadata = decode_video(str(path), lambda metadata: [100, 200, 290], backend="pyav")
    assert [frame_index(frame) for frame in frames] == [100, 200, 290]
    assert "damaged packet" in caplog.text and str(path) in caplog.text
    with VideoFrameStream(str(path), step=10) as stream:
        streamed = dict(stream)
    assert max(streamed) == 290
    assert all(frame_index(streamed[index]) == index for index in (100, 200, 290))


def test_a_stream_without_a_start_time_is_indexed_from_its_first_frame(tmp_path):
    # A raw MPEG-2 elementary stream has no start time, and its first frame is stamped one frame in: frame i is still
    # the i-th frame shown, for decode_video and for the timeline's stream alike.
    path = encode(tmp_path / "raw.m2v", index_coded_frames(30), codec="mpeg2video", container_format="mpeg2video")
    with av.open(str(path)) as container:
        assert container.streams.video[0].start_time is None
    frames, _ = decode_video(str(path), lambda metadata: [0, 3, 6, 27], backend="pyav")
    assert [frame_index(frame) for frame in frames] == [0, 3, 6, 27]
    with VideoFrameStream(str(path), step=3) as stream:
        assert [(index, frame_index(frame)) for index, frame in stream] == [(i, i) for i in range(0, 30, 3)]


def test_a_frame_size_change_within_the_stream_is_a_named_error_for_the_stream_too(tmp_path):
    # MPEG-TS parts joined end to end, their frames growing from 64x48 to 96x64 with continuous timestamps:
    # decode_video refused it clearly; the timeline's stream handed the frames on, to fail in np.stack.
    parts = []
    for part, (height, width) in enumerate([(48, 64), (64, 96)]):
        path = tmp_path / f"part{part}.ts"
        with av.open(str(path), mode="w", format="mpegts") as container:
            stream = container.add_stream("mpeg2video", rate=25)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for index, frame in enumerate(index_coded_frames(10, height, width)):
                video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
                video_frame.pts = part * 10 + index
                container.mux(stream.encode(video_frame))
            container.mux(stream.encode())
        parts.append(path.read_bytes())
    path = tmp_path / "resized.ts"
    path.write_bytes(b"".join(parts))
    with pytest.raises(EVLVideoDecodingError, match="frame size changes") as error:
        decode_video(str(path), lambda metadata: [0, 15], backend="pyav")
    assert str(path) in str(error.value)
    with pytest.raises(EVLVideoDecodingError, match="frame size changes") as error:
        with VideoFrameStream(str(path), step=1) as stream:
            list(stream)
    assert str(path) in str(error.value)


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory):
    # 4 minutes at 25 fps, a key frame every 50 frames.
    return write_clip(tmp_path_factory.mktemp("long") / "long.mp4", index_coded_frames(6000, height=32, width=64), gop=50)


WINDOW_STARTS = (100, 3000, 5880)


def window(start):
    return list(range(start, start + 113, 16))  # the authors' 8 x 16 window


def test_a_window_of_a_long_video_decodes_only_what_it_needs_pyav(long_clip):
    import tracemalloc

    for start in WINDOW_STARTS:
        stats = {}
        tracemalloc.start()
        frames, metadata = decode_video(long_clip, lambda metadata: window(start), stats=stats, backend="pyav")
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert metadata.total_num_frames == 6000
        assert [frame_index(f) for f in frames] == window(start)
        # Seek to the key frame before the window, decode forward to its last frame: at most window + one GOP.
        assert stats["decoded_frames"] <= 113 + 50, stats
        # Only the wanted frames are kept (8 x 32 x 64 x 3 bytes), never the video.
        assert peak < 2_000_000, peak


def test_a_window_of_a_long_video_decodes_only_what_it_needs_torchcodec(long_clip):
    # torchcodec counts no decoded frames and allocates outside tracemalloc's view: time a window against the whole
    # video instead. A window plus one GOP is under 3% of the frames; 25% of the time leaves room for a noisy machine.
    decode(long_clip, lambda metadata: [0], "torchcodec")  # load torchcodec's libraries before timing
    window_seconds = []
    for start in WINDOW_STARTS:
        began = time.perf_counter()
        frames, metadata = decode(long_clip, lambda metadata: window(start), "torchcodec")
        window_seconds.append(time.perf_counter() - began)
        assert metadata.total_num_frames == 6000
        assert frames.shape == (8, 32, 64, 3) and [frame_index(f) for f in frames] == window(start)
    began = time.perf_counter()
    everything, _ = decode(long_clip, None, "torchcodec")
    whole_seconds = time.perf_counter() - began
    assert everything.shape[0] == 6000
    assert max(window_seconds) < 0.25 * whole_seconds, (window_seconds, whole_seconds)


def test_pipeline_reports_the_bad_file(tmp_path, decoding_backend):
    from transformers import pipeline

    from helpers import tiny_config
    from evl_hf import EVLForVideoClassification

    EVLForVideoClassification(tiny_config()).save_pretrained(tmp_path / "model")
    processor(decoding_backend).save_pretrained(tmp_path / "model")
    classifier = pipeline("video-classification", model=str(tmp_path / "model"))
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 1000)
    with pytest.raises(EVLVideoDecodingError, match="broken.mp4: not a readable video"):
        classifier(str(broken))


def test_decoding_time_guard(tmp_path, decoding_backend):
    path = write_clip(tmp_path / "clip.mp4", index_coded_frames(200))
    with pytest.raises(EVLVideoDecodingError, match="decoding took longer than 0s") as error:
        decode_video(path, lambda metadata: [199], timeout=0.0, backend=decoding_backend)
    assert str(path) in str(error.value)


# ---------------------------------------------------------------- the process, not the file


# With every file descriptor of the process in use, opening any video fails. That is the process's failure: it must
# surface as such (naming the video), never as "not a readable video file", which a data set counts as one unusable
# clip and skips, for every clip read while the descriptors are short. In a child process, whose limit can be lowered.
OUT_OF_DESCRIPTORS = """
import json, resource, sys
from evl_hf import EVLVideoDecodingError, decode_video
from evl_hf.video_decoding_evl import VideoFrameStream

path, backend = sys.argv[1], sys.argv[2]
decode_video(path, lambda metadata: [0, 1], backend=backend)  # the decoders' libraries loaded while descriptors last
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
held = []
try:
    while True:
        held.append(open(path, "rb"))
except OSError:
    pass
outcomes = []
for read in (lambda: decode_video(path, lambda metadata: [0, 1], backend=backend),
             lambda: list(VideoFrameStream(path, step=2))):
    try:
        read()
        outcomes.append(["read", "", False, None])
    except Exception as error:
        outcomes.append([type(error).__name__, str(error), isinstance(error, EVLVideoDecodingError),
                         getattr(error, "errno", None)])
for handle in held:
    handle.close()
frames, _ = decode_video(path, lambda metadata: [0, 1], backend=backend)  # and once descriptors are back, it reads
print(json.dumps({"outcomes": outcomes, "after": len(frames)}))
"""


def test_running_out_of_file_descriptors_is_the_process_error_not_a_bad_file(tmp_path, decoding_backend):
    path = write_clip(tmp_path / "clip.mp4", index_coded_frames(20))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", OUT_OF_DESCRIPTORS, str(path), decoding_backend],
                            capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    for kind, message, is_bad_file_error, number in report["outcomes"]:
        assert kind == "OSError" and not is_bad_file_error and number == errno.EMFILE, (kind, message)
        assert str(path) in message and "not a problem of the file" in message
    assert report["after"] == 2


def test_a_header_asking_for_too_much_memory_is_a_bad_file_not_the_process_error(tmp_path, decoding_backend):
    # An mp4 whose sample-time table claims 2^29 entries: FFmpeg refuses the 4 GiB table without allocating it and
    # reports ENOMEM, which PyAV raises as a MemoryError. It is this file's fault: one unusable clip, not a stop.
    data = bytearray(write_clip(tmp_path / "good.mp4", index_coded_frames(20)).read_bytes())
    at = data.index(b"stts")
    data[at + 8 : at + 12] = struct.pack(">I", 0x1FFFFFFF)
    path = tmp_path / "huge_table.mp4"
    path.write_bytes(bytes(data))
    with pytest.raises(EVLVideoDecodingError) as error:
        decode_video(path, lambda metadata: [0, 1], backend=decoding_backend)
    assert str(path) in str(error.value)
    with pytest.raises(EVLVideoDecodingError, match="not a readable video"), VideoFrameStream(path, step=2) as stream:
        list(stream)
