"""
Target 3 and issue 11's target 2: training cost at ViT-B/16 shapes, batch 2, 8 frames, CPU. A training step is forward
+ backward + AdamW step, with the fused AdamW that `Trainer` uses by default (`optim="adamw_torch_fused"`).

* EVL step (frozen backbone) / end-to-end fine-tuning step of the same model (`freeze_backbone=False`): time
  (target <= 0.42) and peak memory (target <= 0.35), each variant's memory in a fresh process;
* EVL step / EVL inference forward: time (issue 11: target <= 1.08), in float32 and, where this CPU runs bfloat16
  natively (or with `--bfloat16`), with `backbone_dtype="bfloat16"`: the step under bf16 autocast as
  `TrainingArguments(bf16=True)` runs it, against that model's inference forward.

Peak memory is the process's peak RSS above what it held once the model and the batch existed (the weights, identical
for both variants); the ratio of whole-process peaks is printed too.

    python benchmarks/bench_training_cost.py [--repeats 3] [--bfloat16] [--step_vs_inference_only] [--keep_freed_memory]

Each round runs the variants back to back; the step / inference ratios are also printed per round, with a
confidence interval for their median (its exact coverage printed: 95% or more from 6 rounds on), in wall-clock and in
the process's CPU time.
`--step_vs_inference_only` leaves out the fine-tuning step and the memory measurements, for long runs of that ratio
alone.
`--keep_freed_memory` calls `evl_hf.keep_freed_memory()` first: glibc then keeps freed memory for reuse, so neither
variant page-faults memory given back (the step allocates more than the forward: its activations for the backward).
"""

import argparse
import statistics

import torch
from common import (
    add_keep_freed_memory_argument,
    alternate_times,
    bfloat16_measured,
    evl_config,
    keep_freed_memory_if,
    machine,
    per_round_ratios,
    peak_rss_bytes,
    rss_bytes,
    run_isolated,
)

from evl_hf import EVLForVideoClassification


def build(freeze: bool, backbone_dtype=None):
    torch.manual_seed(0)
    config = evl_config(freeze_backbone=freeze, decoder_mlp_dropout=0.5, backbone_dtype=backbone_dtype)
    model = EVLForVideoClassification(config).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    clip = torch.randn(2, 8, 3, 224, 224)
    labels = torch.tensor([1, 2])

    def step():
        # Trainer's bf16=True: autocast around the forward and the loss.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=backbone_dtype == "bfloat16"):
            loss = model(clip, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def inference():
        with torch.inference_mode():
            model.eval()
            model(clip)
            model.train()

    return model, step, clip, inference


def peak_memory(freeze: bool) -> dict:
    model, step, _, _ = build(freeze)
    before = rss_bytes()
    step()
    step()
    return {"above_model_gb": (peak_rss_bytes() - before) / 1e9, "process_gb": peak_rss_bytes() / 1e9}


def per_round(times: dict, cpu_times: dict, step: str, inference: str) -> str:
    """The step / inference ratios of the rounds (run back to back, so the VM's drifts cancel), in wall-clock and in
    process CPU time."""
    return (
        f"per round: {per_round_ratios(times[step], times[inference])}; in process CPU time: "
        f"{per_round_ratios(cpu_times[step], cpu_times[inference])}"
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bfloat16", action="store_true", help="measure bfloat16 even where it is emulated")
    parser.add_argument("--step_vs_inference_only", action="store_true",
                        help="only EVL's step against its inference forward: no fine-tuning step, no memory")  # fmt: skip
    add_keep_freed_memory_argument(parser)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    keep_freed_memory_if(args.keep_freed_memory)
    frozen, frozen_step, clip, inference = build(True)
    variants = {"EVL inference forward": inference, "EVL training step": frozen_step}
    finetune = None
    if not args.step_vs_inference_only:
        finetune, finetune_step, _, _ = build(False)
        variants["fine-tuning step"] = finetune_step
    cpu_times = {}
    times = alternate_times(variants, repeats=args.repeats, cpu_times=cpu_times)
    medians = {name: statistics.median(seconds) for name, seconds in times.items()}
    for name, seconds in medians.items():
        print(f"{name:<24} median {seconds:7.2f} s")
    if finetune is not None:
        print(f"time   EVL step / fine-tuning step: {medians['EVL training step'] / medians['fine-tuning step']:.3f} (target <= 0.42)")
    print(f"time   EVL step / EVL inference:    {medians['EVL training step'] / medians['EVL inference forward']:.3f} (target <= 1.08); "
          f"{per_round(times, cpu_times, 'EVL training step', 'EVL inference forward')}")  # fmt: skip
    del frozen, finetune
    if bfloat16_measured(args.bfloat16):
        _, bf16_step, _, bf16_inference = build(True, "bfloat16")
        cpu_times = {}
        variants = {"inference": bf16_inference, "training step": bf16_step}
        times = alternate_times(variants, repeats=args.repeats, cpu_times=cpu_times)
        medians = {name: statistics.median(seconds) for name, seconds in times.items()}
        print(f"bfloat16 backbone: inference forward {medians['inference']:.2f} s, training step (bf16 autocast) "
              f"{medians['training step']:.2f} s, ratio {medians['training step'] / medians['inference']:.3f} "
              f"(target <= 1.08); {per_round(times, cpu_times, 'training step', 'inference')}")  # fmt: skip
    if args.step_vs_inference_only:
        return
    memory = {name: run_isolated("bench_training_cost", "peak_memory", freeze) for name, freeze in (("EVL", True), ("fine-tuning", False))}
    for name, result in memory.items():
        print(f"peak memory {name:<12} above model {result['above_model_gb']:.3f} GB, whole process {result['process_gb']:.3f} GB")
    print(f"memory EVL step / fine-tuning step: {memory['EVL']['above_model_gb'] / memory['fine-tuning']['above_model_gb']:.3f} "
          f"(target <= 0.35); whole-process peaks: {memory['EVL']['process_gb'] / memory['fine-tuning']['process_gb']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
