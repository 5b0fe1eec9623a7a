"""
Target 1: EVL inference forward / the same CLIPVisionModel forward alone, batch 1, 8 frames, ViT-B/16 shapes,
float32, CPU. The backbone alone is the floor; by FLOP count the decoder adds about 8%.

    python benchmarks/bench_inference_overhead.py [--repeats 5]
"""

import argparse

import torch
from common import alternate, evl_config, machine

from evl_hf import EVLForVideoClassification


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = EVLForVideoClassification(evl_config()).eval()
    backbone = model.evl.vision_model
    clip = torch.randn(1, 8, 3, 224, 224)
    frames = clip.flatten(0, 1)
    with torch.inference_mode():
        medians = alternate(
            {"CLIPVisionModel alone": lambda: backbone(pixel_values=frames), "EVL forward": lambda: model(clip)},
            repeats=args.repeats,
        )
    print(f"machine: {machine()}")
    for name, seconds in medians.items():
        print(f"{name:<24} median {seconds * 1000:8.1f} ms")
    ratio = medians["EVL forward"] / medians["CLIPVisionModel alone"]
    print(f"ratio EVL / backbone alone: {ratio:.3f} (target <= 1.12)")


if __name__ == "__main__":
    main()
