"""
Target 6: decoding + sampling + preprocessing one 10-second 640x360 H.264 clip for an 8-frame window (stride 16,
centred, the authors' protocol) / one EVL inference forward (ViT-B/16 shapes, batch 1, float32, CPU), alternating.

    python benchmarks/bench_data_pipeline.py [--repeats 5]
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import alternate, evl_config, machine

from evl_hf import EVLForVideoClassification, EVLVideoProcessor
from evl_hf.data.synthetic import write_video


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    # Smooth moving content so the encoder produces a realistic bit rate (not incompressible noise).
    t = np.arange(250)[:, None, None]
    y, x = np.mgrid[0:360, 0:640]
    frames = np.stack([(128 + 100 * np.sin((x + 3 * t) / 40 + c) * np.cos((y - 2 * t) / 30)) for c in range(3)], -1)
    path = write_video(Path(tempfile.mkdtemp()) / "clip_10s_640x360.mp4", frames.astype(np.uint8), fps=25)
    processor = EVLVideoProcessor(num_frames=8, sampling_rate=16)
    torch.manual_seed(0)
    model = EVLForVideoClassification(evl_config()).eval()
    clip = processor(str(path), return_tensors="pt")["pixel_values"]
    assert clip.shape == (1, 8, 3, 224, 224)
    with torch.inference_mode():
        medians = alternate(
            {"decode + sample + preprocess": lambda: processor(str(path), return_tensors="pt"), "EVL forward": lambda: model(clip)},
            repeats=args.repeats,
        )
    for name, seconds in medians.items():
        print(f"{name:<30} median {seconds * 1000:8.1f} ms")
    print(f"ratio data / EVL forward: {medians['decode + sample + preprocess'] / medians['EVL forward']:.3f} (target <= 0.25)")


if __name__ == "__main__":
    main()
