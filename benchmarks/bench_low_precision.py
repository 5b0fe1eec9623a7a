"""
Target 4: the frozen backbone in bfloat16/float16 (`EVLConfig.backbone_dtype`) while the decoder's parameters stay
float32 (at inference the maps' scores and the cross-frame module compute in the backbone's dtype).

* speed: EVL inference forward with a low-precision backbone / with a float32 backbone (ViT-B/16 shapes, batch 1,
  8 frames), alternating in one process;
* accuracy: max |logit difference| against float32 on the authors' golden fixture (tests/fixtures/evl-original-tiny).

    python benchmarks/bench_low_precision.py [--repeats 3]
"""

import argparse

import torch
from common import ROOT, alternate, evl_config, machine
from safetensors.torch import load_file

from evl_hf import EVLForVideoClassification
from evl_hf.convert import convert_evl_checkpoint


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    golden = ROOT / "tests" / "fixtures" / "evl-original-tiny"
    reference = load_file(golden / "reference.safetensors")
    fp32, _ = convert_evl_checkpoint(golden / "evl_checkpoint.pth", golden / "clip-vision", 4)
    with torch.inference_mode():
        expected = fp32.eval()(reference["pixel_values"]).logits
    for dtype in ("bfloat16", "float16"):
        model, _ = convert_evl_checkpoint(golden / "evl_checkpoint.pth", golden / "clip-vision", 4)
        model.config.backbone_dtype = dtype
        model.evl._apply_backbone_freeze()
        with torch.inference_mode():
            logits = model.eval()(reference["pixel_values"]).logits
        print(f"golden fixture, {dtype} backbone: max |logit - float32 logit| = {(logits - expected).abs().max():.2e}, "
              f"vs the authors' logits {(logits - reference['logits']).abs().max():.2e}")  # fmt: skip

    torch.manual_seed(0)
    models = {"float32": EVLForVideoClassification(evl_config()).eval()}
    for dtype in ("bfloat16", "float16"):
        torch.manual_seed(0)
        models[dtype] = EVLForVideoClassification(evl_config(backbone_dtype=dtype)).eval()
    clip = torch.randn(1, 8, 3, 224, 224)
    with torch.inference_mode():
        medians = alternate({name: (lambda m=m: m(clip)) for name, m in models.items()}, repeats=args.repeats)
    print("ViT-B/16 shapes, batch 1, 8 frames, inference forward:")
    for name, seconds in medians.items():
        print(f"  {name:<9} backbone: median {seconds * 1000:8.1f} ms, ratio to float32 {seconds / medians['float32']:.3f}")


if __name__ == "__main__":
    main()
