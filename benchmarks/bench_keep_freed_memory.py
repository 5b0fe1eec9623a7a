"""
What `evl_hf.keep_freed_memory()` changes for a long job, in fresh processes, alternately with glibc's malloc as it is
and with the setting. Each process reports its job's wall time and its minor page faults during it; the script prints
medians and the ratio of the two.

- `--workload timeline` (default): the video timeline over an N-minute video (as in `bench_timeline.py`: 340x256
  25 fps, an 8 x 16 ViT-B/16-shaped EVL, `window_stride=1`), as `python -m evl_hf.timeline` runs it;
- `--workload training`: `--steps` training steps of `bench_training_cost.py`'s EVL (ViT-B/16 shapes, batch 2,
  8 frames, fused AdamW) after one warm-up step, with the float32 backbone or `--backbone_dtype bfloat16` (the step
  under bf16 autocast), as `examples/run_video_classification.py` trains.

    python benchmarks/bench_keep_freed_memory.py [--workload timeline|training] [--minutes 1] [--steps 8]
                                                 [--backbone_dtype bfloat16] [--rounds 3] [--threads N]
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, add_threads_argument, machine, set_threads


def timeline_in_this_process(video: str, keep: bool) -> dict:
    """The child's work: a timeline over `video`, timed, with its page faults."""
    import torch
    from common import evl_config

    from evl_hf import EVLForVideoClassification, EVLVideoProcessor, keep_freed_memory, video_timeline

    applied = keep_freed_memory() if keep else False
    torch.manual_seed(0)
    model = EVLForVideoClassification(evl_config()).eval()
    processor = EVLVideoProcessor.from_model_config(model.config, num_frames=8, sampling_rate=16)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    windows = video_timeline(model, processor, video, window_stride=1, progress=False)
    seconds = time.perf_counter() - start
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return {"applied": applied, "seconds": seconds, "faults": faults, "windows": len(windows)}


def training_in_this_process(steps: int, backbone_dtype: str | None, keep: bool) -> dict:
    """The child's work: training steps, timed after a warm-up step, with their page faults."""
    from bench_training_cost import build

    from evl_hf import keep_freed_memory

    applied = keep_freed_memory() if keep else False
    _, step, _, _ = build(True, backbone_dtype)
    step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - start
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return {"applied": applied, "seconds": seconds, "faults": faults, "steps": steps}


def run_child(call: str, threads: int | None) -> dict:
    code = (
        f"import json, sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import torch; "
        f"{f'torch.set_num_threads({threads}); ' if threads else ''}"
        "import bench_keep_freed_memory as b; "
        f"print('RESULT' + json.dumps(b.{call}))"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(next(line for line in output.splitlines() if line.startswith("RESULT"))[6:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=["timeline", "training"], default="timeline")
    parser.add_argument("--minutes", type=float, default=1.0, help="timeline: the video's length")
    parser.add_argument("--steps", type=int, default=8, help="training: steps timed per process")
    parser.add_argument("--backbone_dtype", choices=["float32", "bfloat16"], default="float32", help="training")
    parser.add_argument("--rounds", type=int, default=3, help="pairs of processes, one of each kind, alternately")
    add_threads_argument(parser)
    args = parser.parse_args()
    set_threads(args.threads)
    from bench_timeline import encode

    print(f"machine: {machine()}")
    results = {False: [], True: []}
    with tempfile.TemporaryDirectory() as directory:
        if args.workload == "timeline":
            video = str(encode(Path(directory) / "long.mp4", args.minutes * 60))
        dtype = None if args.backbone_dtype == "float32" else args.backbone_dtype
        for _ in range(args.rounds):
            for keep in (False, True):
                call = (f"timeline_in_this_process({video!r}, {keep!r})" if args.workload == "timeline"
                        else f"training_in_this_process({args.steps}, {dtype!r}, {keep!r})")  # fmt: skip
                results[keep].append(run_child(call, args.threads))
    if args.workload == "timeline":
        job = "timeline"
        print(f"{args.minutes:g}-minute video, window_stride=1, {results[True][0]['windows']} windows, {args.rounds} "
              "processes of each kind:")  # fmt: skip
    else:
        job = f"{args.steps} steps"
        print(f"training, {args.backbone_dtype} backbone, {args.steps} steps a process after one warm-up step, "
              f"{args.rounds} processes of each kind:")  # fmt: skip
    for keep, name in ((False, "glibc malloc as it is"), (True, "keep_freed_memory()")):
        seconds = [result["seconds"] for result in results[keep]]
        faults = [result["faults"] for result in results[keep]]
        listed = ", ".join(f"{value:.1f}" for value in seconds)
        print(f"  {name:<24} {job} median {statistics.median(seconds):6.1f} s ({listed}), "
              f"minor page faults median {statistics.median(faults):,.0f}")  # fmt: skip
    assert all(result["applied"] for result in results[True])
    medians = {keep: statistics.median(result["seconds"] for result in results[keep]) for keep in results}
    pairs = zip(results[True], results[False])
    ratios = ", ".join(f"{kept['seconds'] / default['seconds']:.3f}" for kept, default in pairs)
    print(f"  {job} with / without: {medians[True] / medians[False]:.3f} (per pair: {ratios})")


if __name__ == "__main__":
    main()
