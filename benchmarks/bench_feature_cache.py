"""
Target 5: one training epoch from a warm backbone-feature cache / one uncached epoch (decode + preprocess + frozen
backbone + decoder forward/backward + fused AdamW step), ViT-B/16 shapes, 8 frames, batch 2, float32, CPU; the
cached epoch's clips/s and the share of it spent reading and collating the cache (issue 11). Also checks
that logits from cached float32 features equal the uncached ones and reports the float16 cache's disk cost per clip.

    python benchmarks/bench_feature_cache.py [--clips 8]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import evl_config, machine
from datasets import ClassLabel, Dataset, Features, Value

from evl_hf import EVLForVideoClassification, EVLVideoProcessor
from evl_hf.data.synthetic import write_video
from evl_hf.data.video_dataset import (
    EvaluationClips,
    VideoClipCollator,
    VideoEvalTransform,
    build_feature_cache,
    feature_cache_bytes_per_clip,
)


def epoch(model, optimizer, data, batch_size=2, reading=None):
    """One epoch's seconds; `reading` (a list) gets the seconds spent fetching and collating batches."""
    loader = iter(torch.utils.data.DataLoader(data, batch_size=batch_size, collate_fn=VideoClipCollator()))
    start = time.perf_counter()
    read_seconds = 0.0
    while True:
        fetch = time.perf_counter()
        batch = next(loader, None)
        read_seconds += time.perf_counter() - fetch
        if batch is None:
            break
        batch.pop("unusable_clip_indices")
        batch.pop("clip_indices", None)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if reading is not None:
        reading.append(read_seconds)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    workdir = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    paths = [
        str(write_video(workdir / f"clip{i}.mp4", rng.integers(0, 255, (64, 256, 320, 3), dtype=np.uint8), fps=25))
        for i in range(args.clips)
    ]
    features = Features({"video": Value("string"), "label": ClassLabel(num_classes=400)})
    dataset = Dataset.from_dict({"video": paths, "label": list(range(args.clips))}, features=features)
    processor = EVLVideoProcessor(num_frames=8, sampling_rate=8)
    transform = VideoEvalTransform(processor, 8, 8)
    torch.manual_seed(0)
    model = EVLForVideoClassification(evl_config()).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)

    uncached = EvaluationClips(dataset, transform)
    start = time.perf_counter()
    cache16, _ = build_feature_cache(model, dataset, transform, workdir / "cache16", dtype=torch.float16, progress=False)
    build_seconds = time.perf_counter() - start
    cache32, _ = build_feature_cache(model, dataset, transform, workdir / "cache32", dtype=torch.float32, progress=False)
    epoch(model, optimizer, torch.utils.data.Subset(uncached, range(2)))  # warm-up
    epoch(model, optimizer, cache16.select(range(2)))
    times = {"uncached": [], "cached": []}
    reading = []
    for _ in range(args.repeats):  # alternating epochs, medians
        times["uncached"].append(epoch(model, optimizer, uncached))
        times["cached"].append(epoch(model, optimizer, cache16, reading=reading))
    uncached_seconds, cached_seconds = (statistics.median(times[k]) for k in ("uncached", "cached"))

    model.eval()
    with torch.inference_mode():
        direct = model(processor(paths[0], return_tensors="pt")["pixel_values"]).logits
        row = cache32[0]
        from32 = model(frame_features=row["frame_features"][None], cross_frame_maps=row["cross_frame_maps"][None]).logits
        row = cache16[0]
        from16 = model(frame_features=row["frame_features"][None], cross_frame_maps=row["cross_frame_maps"][None]).logits
    print(f"{args.clips} clips, batch 2, median of {args.repeats} alternating epochs each: uncached epoch "
          f"{uncached_seconds:.2f} s, warm-cache epoch {cached_seconds:.2f} s "
          f"(building the cache: {build_seconds:.2f} s)")  # fmt: skip
    print(f"ratio warm-cache epoch / uncached epoch: {cached_seconds / uncached_seconds:.3f} (target <= 0.1)")
    share = statistics.median(read / total for read, total in zip(reading, times["cached"]))
    print(f"training from the cache: {args.clips / cached_seconds:.1f} clips/s, {share:.1%} of the epoch reading "
          "and collating the cache (issue 11: <= 20%)")  # fmt: skip
    print(f"max |logits from cached features - uncached logits|: float32 cache {(from32 - direct).abs().max():.2e}, "
          f"float16 cache {(from16 - direct).abs().max():.2e}")  # fmt: skip
    print(f"disk per clip (float16): {feature_cache_bytes_per_clip(model.config, 8) / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
