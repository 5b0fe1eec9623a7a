"""
The video timeline over a long video (issue 13): a 10-minute 25 fps video at Kinetics' resolution (340x256), an
8 x 16 ViT-B/16-shaped EVL (random weights), `window_stride=1` (a window at every sampled frame: 931 windows over 938
sampled frames). In one run, side by side:

- timeline: `video_timeline`, everything included (decoding, preprocessing, backbone, maps, decoder per window);
- backbone alone: the CLIP tower's forward over the same distinct sampled frames (preprocessed beforehand), in the
  timeline's backbone batches, the floor any labelling of every sampled frame pays; timed before and after each
  timeline run, since these VMs drift by 10-20% over minutes: each round's ratio is its timeline against the mean of
  the references on either side, and with `--rounds N` the median of the rounds is the figure; target: timeline /
  backbone alone <= 1.2;
- naive: the model on each window's 8 frames, as a loop over windows would run it, timed on `--naive_windows`
  evenly spaced windows and scaled to all of them (the frames x stride window makes the ideal ratio about 1/8).

    python benchmarks/bench_timeline.py [--minutes 10] [--rounds 1] [--naive_windows 24] [--threads N]
                                        [--backbone_batch_size 8]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import add_threads_argument, evl_config, machine, set_threads


def encode(path: Path, seconds: float, fps: int = 25) -> Path:
    """A moving square over a textured background, H.264 (x264's default key frame interval)."""
    import av

    y, x = np.mgrid[0:256, 0:340]
    background = np.stack([(x * 3) % 256, (y * 5) % 256, ((x + y) * 2) % 256], -1).astype(np.uint8)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 340, 256, "yuv420p"
        stream.options = {"preset": "ultrafast"}
        for t in range(int(seconds * fps)):
            frame = background.copy()
            left = (t * 3) % 280
            frame[100:160, left : left + 60] = 255
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def stream_length(path: Path) -> int:
    import av

    with av.open(str(path)) as container:
        return container.streams.video[0].frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=1, help="timeline runs, each between two references")
    parser.add_argument("--naive_windows", type=int, default=24)
    parser.add_argument("--backbone_batch_size", type=int, default=8, help="the timeline's default")
    add_threads_argument(parser)
    args = parser.parse_args()
    set_threads(args.threads)

    from evl_hf import EVLForVideoClassification, EVLVideoProcessor, decode_video, video_timeline

    torch.manual_seed(0)
    model = EVLForVideoClassification(evl_config()).eval()
    processor = EVLVideoProcessor.from_model_config(model.config, num_frames=8, sampling_rate=16)
    print(machine())
    with tempfile.TemporaryDirectory() as directory:
        path = encode(Path(directory) / "long.mp4", args.minutes * 60)
        size = path.stat().st_size / 2**20
        sampled = list(range(0, stream_length(path), 16))
        frames, _ = decode_video(str(path), lambda metadata: sampled, backend="pyav")
        single_view = dict(do_sample_frames=False, num_temporal_views=1, num_spatial_views=1, return_tensors="pt")
        pixel_values = torch.cat([processor(frames[i : i + 64], **single_view)["pixel_values"][0]
                                  for i in range(0, len(frames), 64)])  # fmt: skip
        del frames
        backbone, batch = model.evl.vision_model, args.backbone_batch_size

        def backbone_alone() -> float:
            start = time.perf_counter()
            with torch.inference_mode():
                for i in range(0, len(pixel_values), batch):
                    backbone(pixel_values=pixel_values[i : i + batch])
            return time.perf_counter() - start

        references, timelines = [backbone_alone()], []
        for _ in range(args.rounds):
            stats = {}
            start = time.perf_counter()
            windows = video_timeline(model, processor, str(path), window_stride=1, backbone_batch_size=batch,
                                     progress=False, stats=stats)  # fmt: skip
            timelines.append(time.perf_counter() - start)
            references.append(backbone_alone())
            assert sampled == sorted({index for window in windows for index in window.frame_indices})

        with torch.inference_mode():
            chosen = np.linspace(0, len(windows) - 1, min(args.naive_windows, len(windows))).round().astype(int)
            position = {index: row for row, index in enumerate(sampled)}
            clips = [pixel_values[[position[i] for i in windows[w].frame_indices]][None] for w in chosen]
            model(pixel_values=clips[0])  # warm-up
            start = time.perf_counter()
            for clip in clips:
                model(pixel_values=clip)
            naive_seconds = (time.perf_counter() - start) / len(clips) * len(windows)

    print(f"{args.minutes:g}-minute 340x256 25 fps video ({size:.1f} MiB), 8 x 16 sampling, window_stride=1: "
          f"{len(sampled)} sampled frames, {len(windows)} windows")  # fmt: skip
    print(f"  frames through the backbone {stats['frames_through_backbone']}, pairs of maps {stats['frame_pairs']}, "
          f"most frames held at once {stats['max_buffered_frames']}")  # fmt: skip
    ratios = []
    for round_index, timeline_seconds in enumerate(timelines):
        before, after = references[round_index : round_index + 2]
        ratios.append(timeline_seconds / ((before + after) / 2))
        print(f"  round {round_index + 1}: timeline (all included) {timeline_seconds:6.1f} s, backbone alone over the "
              f"sampled frames {before:6.1f} s before and {after:6.1f} s after (batches of {batch}): "
              f"{ratios[-1]:.3f}")  # fmt: skip
    print(f"  naive per-window inference (scaled from {len(chosen)} windows) {naive_seconds:8.1f} s")
    ratio = statistics.median(ratios)
    print(f"  timeline / backbone alone = {ratio:.3f}{' (median of the rounds)' if len(ratios) > 1 else ''} "
          f"(target <= 1.2: {'met' if ratio <= 1.2 else 'NOT met'})")  # fmt: skip
    print(f"  timeline / naive per-window = {statistics.median(timelines) / naive_seconds:.3f} (ideal about 1/8 = 0.125)")


if __name__ == "__main__":
    main()
