"""
What `evl_hf.keep_freed_memory()` changes for a long job: the video timeline over an N-minute video (as in
`bench_timeline.py`: 340x256 25 fps, an 8 x 16 ViT-B/16-shaped EVL, `window_stride=1`) in fresh processes, alternately
with glibc's malloc as it is and with the setting (as `python -m evl_hf.timeline` runs). Each process reports its
timeline's wall time and its minor page faults during it; the script prints medians and the ratio of the two.

    python benchmarks/bench_keep_freed_memory.py [--minutes 1] [--rounds 3] [--threads N]
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


def run_child(video: str, keep: bool, threads: int | None) -> dict:
    code = (
        f"import json, sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import torch; "
        f"{f'torch.set_num_threads({threads}); ' if threads else ''}"
        "import bench_keep_freed_memory as b; "
        f"print('RESULT' + json.dumps(b.timeline_in_this_process({video!r}, {keep!r})))"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(next(line for line in output.splitlines() if line.startswith("RESULT"))[6:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3, help="pairs of processes, one of each kind, alternately")
    add_threads_argument(parser)
    args = parser.parse_args()
    set_threads(args.threads)
    from bench_timeline import encode

    print(f"machine: {machine()}")
    results = {False: [], True: []}
    with tempfile.TemporaryDirectory() as directory:
        video = str(encode(Path(directory) / "long.mp4", args.minutes * 60))
        for _ in range(args.rounds):
            for keep in (False, True):
                results[keep].append(run_child(video, keep, args.threads))
    windows = results[True][0]["windows"]
    print(f"{args.minutes:g}-minute video, window_stride=1, {windows} windows, {args.rounds} processes of each kind:")
    for keep, name in ((False, "glibc malloc as it is"), (True, "keep_freed_memory()")):
        seconds = [result["seconds"] for result in results[keep]]
        faults = [result["faults"] for result in results[keep]]
        listed = ", ".join(f"{value:.1f}" for value in seconds)
        print(f"  {name:<24} timeline median {statistics.median(seconds):6.1f} s ({listed}), "
              f"minor page faults median {statistics.median(faults):,.0f}")  # fmt: skip
    assert all(result["applied"] for result in results[True])
    medians = {keep: statistics.median(result["seconds"] for result in results[keep]) for keep in results}
    pairs = zip(results[True], results[False])
    ratios = ", ".join(f"{kept['seconds'] / default['seconds']:.3f}" for kept, default in pairs)
    print(f"  timeline with / without: {medians[True] / medians[False]:.3f} (per pair: {ratios})")


if __name__ == "__main__":
    main()
