"""
Target 6: decoding + sampling + preprocessing one 10-second 640x360 H.264 clip for an 8-frame window (stride 16,
centred, the authors' protocol) / one EVL inference forward (ViT-B/16 shapes, batch 1, float32, CPU), alternating,
with each decoding backend (torchcodec is the default where it loads).

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
    processors = {backend: EVLVideoProcessor(num_frames=8, sampling_rate=16, decoding_backend=backend) for backend in ("torchcodec", "pyav")}
    torch.manual_seed(0)
    model = EVLForVideoClassification(evl_config()).eval()
    clip = processors["torchcodec"](str(path), return_tensors="pt")["pixel_values"]
    assert clip.shape == (1, 8, 3, 224, 224)
    torch.testing.assert_close(processors["pyav"](str(path), return_tensors="pt")["pixel_values"], clip, atol=0, rtol=0)
    variants = {f"data ({backend})": (lambda p=processor: p(str(path), return_tensors="pt")) for backend, processor in processors.items()}
    with torch.inference_mode():
        medians = alternate(variants | {"EVL forward": lambda: model(clip)}, repeats=args.repeats)
    for name, seconds in medians.items():
        print(f"{name:<20} median {seconds * 1000:8.1f} ms")
    for backend in processors:
        print(f"ratio data ({backend}) / EVL forward: {medians[f'data ({backend})'] / medians['EVL forward']:.3f} (target <= 0.25)")


if __name__ == "__main__":
    main()
