"""
Long videos stay cheap: an 8 x 16 window from a 10-minute 1080p H.264 video (25 fps, a key frame every 250 frames,
x264's default), at the start, middle and end, each decoded in a fresh process, with PyAV and with torchcodec: peak
memory above the process's baseline, frames decoded (PyAV counts them; torchcodec does not say), and time, against
decoding the same window from a 10-second clip of the same content.

    python benchmarks/bench_long_video.py [--minutes 10]
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from common import machine, peak_rss_bytes, rss_bytes, run_isolated


def encode(path: Path, seconds: float, fps: int = 25) -> Path:
    import av

    frames = int(seconds * fps)
    y, x = np.mgrid[0:1080, 0:1920]
    background = np.stack([(x // 8) % 256, (y // 8) % 256, ((x + y) // 16) % 256], -1).astype(np.uint8)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 1920, 1080, "yuv420p"
        stream.options = {"preset": "ultrafast", "g": "250"}
        for t in range(frames):
            frame = background.copy()
            left = (t * 7) % 1800
            frame[400:520, left : left + 120] = 255  # a moving square
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def window(path: str, position: float, backend: str) -> dict:
    import av  # noqa: F401  (load the backends' libraries before the baseline)

    from evl_hf import decode_video, resolve_decoding_backend

    resolve_decoding_backend(backend)
    before = rss_bytes()
    start = time.perf_counter()
    stats = {}
    frames, metadata = decode_video(
        path,
        lambda metadata: [int(position * (metadata.total_num_frames - 113)) + 16 * i for i in range(8)],
        stats=stats,
        backend=backend,
    )
    assert stats["backend"] == backend, stats
    return {
        "seconds": time.perf_counter() - start,
        "peak_above_baseline_gb": (peak_rss_bytes() - before) / 1e9,
        "decoded_frames": stats.get("decoded_frames", "?"),
        "total_frames": metadata.total_num_frames,
        "shape": list(frames.shape),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=10)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    directory = Path(tempfile.mkdtemp())
    started = time.perf_counter()
    long_path = encode(directory / "long_1080p.mp4", args.minutes * 60)
    short_path = encode(directory / "short_1080p.mp4", 10)
    print(f"encoded a {args.minutes:g}-minute and a 10-second 1920x1080 clip in {time.perf_counter() - started:.0f} s "
          f"({long_path.stat().st_size / 1e6:.0f} MB and {short_path.stat().st_size / 1e6:.1f} MB)")  # fmt: skip
    for name, path, positions in (("10-second", short_path, (0.5,)), (f"{args.minutes:g}-minute", long_path, (0.0, 0.5, 1.0))):
        for position in positions:
            for backend in ("pyav", "torchcodec"):
                result = run_isolated("bench_long_video", "window", str(path), position, backend)
                print(f"{name:>10} video, window at {position:4.0%}, {backend:>10}: {result['seconds']:.2f} s, decoded "
                      f"{result['decoded_frames']} of {result['total_frames']} frames, peak "
                      f"{result['peak_above_baseline_gb']:.3f} GB above baseline, frames {result['shape']}")  # fmt: skip


if __name__ == "__main__":
    main()
