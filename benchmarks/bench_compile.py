"""
Issue 11, target 5: `torch.compile` (inductor) against eager, ViT-B/16 shapes, 8 frames, CPU: the EVL inference
forward (batch 1) and a training step (batch 2, frozen backbone, forward + backward + fused AdamW step, the model
compiled, the optimizer eager as `Trainer(torch_compile=True)` runs it). Prints the one-off compile time and the
steady-state ratios; float32, and with `backbone_dtype="bfloat16"` where this CPU runs bfloat16 natively.

    python benchmarks/bench_compile.py [--repeats 5] [--bfloat16]
"""

import time

import torch
from common import alternate, b16_classifier_and_clip, float32_and_bfloat16_main


def seconds(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def compare(backbone_dtype, repeats: int, backbone: str = "clip") -> None:
    model, _ = b16_classifier_and_clip(backbone_dtype, backbone)  # seeded; decoder_mlp_dropout 0.5 by default
    model.train()
    compiled = torch.compile(model)
    clip, batch, labels = torch.randn(1, 8, 3, 224, 224), torch.randn(2, 8, 3, 224, 224), torch.tensor([1, 2])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)

    def inference(module):
        def run():
            model.eval()
            with torch.inference_mode():
                module(clip)

        return run

    def step(module):
        def run():
            model.train()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=backbone_dtype == "bfloat16"):
                loss = module(batch, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return run

    first_inference = seconds(inference(compiled))
    first_step = seconds(step(compiled))
    medians = alternate(
        {"eager inference": inference(model), "compiled inference": inference(compiled),
         "eager training step": step(model), "compiled training step": step(compiled)},
        repeats=repeats,
    )  # fmt: skip
    with torch.inference_mode():
        model.eval()
        difference = (compiled(clip).logits - model(clip).logits).abs().max()
    print(f"backbone {model.evl.vision_model.dtype}: first compiled call (compiles): inference {first_inference:.1f} s, "
          f"training step {first_step:.1f} s")  # fmt: skip
    for name, value in medians.items():
        print(f"  {name:<24} median {value * 1000:8.1f} ms")
    print(f"  compiled / eager: inference {medians['compiled inference'] / medians['eager inference']:.3f}, "
          f"training step {medians['compiled training step'] / medians['eager training step']:.3f}; "
          f"max |compiled - eager logit| {difference:.1e}")  # fmt: skip


def main():
    float32_and_bfloat16_main(compare, default_repeats=5)


if __name__ == "__main__":
    main()
