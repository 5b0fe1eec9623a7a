"""
Target 1: EVL inference forward / the same CLIPVisionModel forward alone, batch 1, 8 frames, ViT-B/16 shapes,
float32, CPU. The backbone alone is the floor; by FLOP count the decoder and the cross-frame maps add about 4%.

    python benchmarks/bench_inference_overhead.py [--repeats 5]
"""

import argparse
import statistics

import torch
from common import alternate_times, b16_classifier_and_clip, machine


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    model, clip = b16_classifier_and_clip()
    backbone = model.evl.vision_model
    frames = clip.flatten(0, 1)
    variants = {"CLIPVisionModel alone": lambda: backbone(pixel_values=frames), "EVL forward": lambda: model(clip)}
    with torch.inference_mode():
        times = alternate_times(variants, repeats=args.repeats)
    print(f"machine: {machine()}")
    for name, seconds in times.items():
        print(f"{name:<24} median {statistics.median(seconds) * 1000:8.1f} ms")
    # Each round's two runs are back to back, so their ratio cancels the VM's slow drifts in speed.
    ratios = sorted(evl / alone for evl, alone in zip(times["EVL forward"], times["CLIPVisionModel alone"]))
    ratio = statistics.median(times["EVL forward"]) / statistics.median(times["CLIPVisionModel alone"])
    print(f"ratio EVL / backbone alone: {ratio:.3f} (target <= 1.06)")
    print(f"per-round ratios: median {statistics.median(ratios):.3f}, range {ratios[0]:.3f}-{ratios[-1]:.3f}")


if __name__ == "__main__":
    main()
