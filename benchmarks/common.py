"""Helpers for the benchmarks: ViT-B/16-shaped models with random weights, alternating timing, peak memory."""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, Dinov2Config, SiglipVisionConfig

from evl_hf.cpu_info import cpu_flags, cpu_model_name


ROOT = Path(__file__).resolve().parent.parent
B16 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=16, image_size=224)  # fmt: skip
L14_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14, image_size=336)  # fmt: skip


def vision_config(shape=B16) -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_act="quick_gelu", attn_implementation="sdpa", **shape)


def evl_config(shape=B16, num_frames=8, vision=None, **overrides):
    """`vision`: another family's vision config of the same width and heads as `shape` (default: CLIP of `shape`)."""
    from evl_hf import EVLConfig

    values = dict(num_frames=num_frames, decoder_num_layers=4, decoder_qkv_dim=shape["hidden_size"],
                  decoder_num_heads=shape["num_attention_heads"], num_labels=400)  # fmt: skip
    values.update(overrides)
    config = EVLConfig(vision_config=vision if vision is not None else vision_config(shape), **values)
    config._attn_implementation = "sdpa"
    return config


def machine() -> str:
    flags = cpu_flags()
    isa = " ".join(flag for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if flag in flags) or "?"
    return f"{cpu_model_name()} ({isa}), {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads (default: torch's, one per core). With 1 thread no thread waits for a descheduled sibling, "
        "so a forward's time on these VMs varies less (compare the per-round ranges printed).",
    )


def set_threads(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


def add_keep_freed_memory_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--keep_freed_memory",
        action="store_true",
        help="call evl_hf.keep_freed_memory() first: glibc then keeps freed memory for reuse instead of page-faulting "
        "it back in (the timed variants run in this process, so each of them gets it)",
    )


def keep_freed_memory_if(asked: bool) -> None:
    """`evl_hf.keep_freed_memory()` where `--keep_freed_memory` asked for it, printing whether it was applied."""
    if asked:
        from evl_hf import keep_freed_memory

        print(f"keep_freed_memory(): {'applied' if keep_freed_memory() else 'not available here'}")


def alternate_times(functions: dict, repeats: int = 5, warmup: int = 1, cpu_times: dict | None = None) -> dict:
    """Run the variants alternately (after warm-up) and return each one's list of wall-clock seconds, one entry per
    round. Where `cpu_times` is given it receives the same for the process's CPU time (all its threads, user and
    system): these VMs' hypervisor takes the vCPUs away at times (the `steal` column of /proc/stat), which the wall
    clock counts and the process's CPU time does not; with one thread no sibling spins while it waits either."""
    for function in functions.values():
        for _ in range(warmup):
            function()
    times = {name: [] for name in functions}
    if cpu_times is not None:
        cpu_times.update({name: [] for name in functions})
    for _ in range(repeats):
        for name, function in functions.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            function()
            times[name].append(time.perf_counter() - start)
            if cpu_times is not None:
                cpu_times[name].append(time.process_time() - cpu_start)
    return times


def per_round_ratios(numerators: list[float], denominators: list[float]) -> str:
    """The ratios of rounds whose two runs were back to back (the VM's slow drifts in speed cancel): their median, a
    confidence interval for it and their range."""
    ratios = sorted(a / b for a, b in zip(numerators, denominators))
    low, high, coverage = median_confidence_interval(ratios)
    return (
        f"median {statistics.median(ratios):.3f} ({coverage:.0%} confidence interval {low:.3f}-{high:.3f}), "
        f"range {ratios[0]:.3f}-{ratios[-1]:.3f}"
    )


def median_confidence_interval(values: list[float]) -> tuple[float, float, float]:
    """
    A distribution-free confidence interval for the median of the rounds' ratios, assuming independent rounds (their
    distribution is not assumed): the j-th smallest and j-th largest ratios, j the largest count with
    P(binomial(n, 1/2) < j) <= 2.5%, and the interval's exact coverage, 1 - 2 P(binomial(n, 1/2) < j): at least 95%
    from 6 rounds on; below that the interval is all the rounds and its coverage is printed as it is (94% at 5).
    """
    values, n = sorted(values), len(values)
    below, j = 0.0, 0  # below: P(binomial(n, 1/2) < j + 1)
    while j < n // 2:
        below += math.comb(n, j) / 2**n
        if below > 0.025:
            break
        j += 1
    j = max(j, 1)
    coverage = 1 - 2 * sum(math.comb(n, i) for i in range(j)) / 2**n
    return values[j - 1], values[n - j], coverage


def alternate(functions: dict, repeats: int = 5, warmup: int = 1) -> dict:
    """Run the variants alternately (after warm-up) and return each one's median seconds."""
    times = alternate_times(functions, repeats=repeats, warmup=warmup)
    return {name: statistics.median(values) for name, values in times.items()}


# The base towers of the other backbone families (issue 12), at 224x224: SigLIP-B/16 (14x14 patches, no class
# token) and DINOv2-B/14 (16x16 patches and a class token; its config's 518 is the size of its position table).
_BASE_TOWER = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
OTHER_BACKBONES = {
    "siglip": lambda: SiglipVisionConfig(patch_size=16, image_size=224, **_BASE_TOWER),
    "dinov2": lambda: Dinov2Config(patch_size=14, image_size=518, **_BASE_TOWER),
}


def b16_classifier_and_clip(backbone_dtype=None, backbone="clip"):
    """The inference benchmarks' subject: a seeded EVL classifier in eval mode, ViT-B/16-shaped CLIP by default (or
    `backbone="siglip"` / `"dinov2"`: those families' base towers), and one 8-frame 224x224 clip."""
    from evl_hf import EVLForVideoClassification

    torch.manual_seed(0)
    other = {} if backbone == "clip" else dict(vision=OTHER_BACKBONES[backbone](), image_size=224)
    model = EVLForVideoClassification(evl_config(backbone_dtype=backbone_dtype, **other)).eval()
    return model, torch.randn(1, 8, 3, 224, 224)


def bfloat16_measured(force: bool = False) -> bool:
    """Whether to measure bfloat16 here: where this CPU runs bf16 matmuls in hardware (AMX or AVX-512 BF16), or when
    asked (`--bfloat16`); elsewhere bf16 is emulated and its figures mean nothing, which is printed instead."""
    from evl_hf.modeling_evl import cpu_has_native_bfloat16

    if force or cpu_has_native_bfloat16():
        return True
    print("bfloat16: not measured, this CPU has neither AMX nor AVX-512 BF16 (emulated bfloat16)")
    return False


def float32_and_bfloat16_main(measure, default_repeats: int = 5) -> None:
    """A script's main(): `--repeats`, `--bfloat16`, `--threads`, `--backbone`, the machine line, then
    `measure(backbone_dtype, repeats, backbone)` with
    a float32 backbone (`None`) and, where `bfloat16_measured`, with `"bfloat16"`."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=default_repeats)
    parser.add_argument("--bfloat16", action="store_true", help="measure bfloat16 even where it is emulated")
    add_threads_argument(parser)
    parser.add_argument("--backbone", choices=["clip", *OTHER_BACKBONES], default="clip", help="the backbone family")
    add_keep_freed_memory_argument(parser)
    args = parser.parse_args()
    set_threads(args.threads)
    print(f"machine: {machine()}")
    print(f"backbone family: {args.backbone}")
    keep_freed_memory_if(args.keep_freed_memory)
    measure(None, args.repeats, args.backbone)
    if bfloat16_measured(args.bfloat16):
        measure("bfloat16", args.repeats, args.backbone)


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    # VmHWM, not ru_maxrss: on Linux a child's ru_maxrss starts from its parent's peak at fork time.
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmHWM:"))


def run_isolated(module: str, function: str, *args) -> dict:
    """Run `module.function(*args)` in a fresh interpreter (for peak-memory measurements) and return its dict."""
    code = (
        f"import json, sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import {module} as m; "
        f"print('RESULT' + json.dumps(m.{function}(*{args!r})))"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(next(line for line in output.splitlines() if line.startswith("RESULT"))[6:])
