"""
GPU throughput (clips/s) and issue 11's ratios at ViT-B/16 and ViT-L/14 shapes, 8 frames, random weights, no
downloads (under 5 minutes on one recent GPU):

* float32: the backbone alone, EVL inference (ratio target <= 1.06), EVL training step (frozen backbone, fused AdamW;
  step / inference target <= 1.08);
* `backbone_dtype="bfloat16"`: the bf16 backbone alone, EVL inference (target <= 1.10), EVL training step under bf16
  autocast as `TrainingArguments(bf16=True)` runs it (target <= 1.08), and the end-to-end fine-tuning step under bf16
  autocast (EVL step / fine-tuning step);
* `torch.compile` (inductor) of the bf16 EVL inference against eager, ViT-B/16 only.

    bash benchmarks/gpu.sh
"""

import time

import torch
from common import B16, evl_config

from evl_hf import EVLForVideoClassification


L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14, image_size=224)  # fmt: skip


def throughput(function, batch, steps=10, warmup=3):
    for _ in range(warmup):
        function()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        function()
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def measure(shape, batch, backbone_dtype, freeze=True, compile_inference=False) -> dict:
    torch.manual_seed(0)
    config = evl_config(shape, freeze_backbone=freeze, backbone_dtype=backbone_dtype if freeze else None)
    model = EVLForVideoClassification(config).cuda()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    clip = torch.randn(batch, 8, 3, 224, 224, device="cuda")
    labels = torch.randint(0, 400, (batch,), device="cuda")
    autocast = backbone_dtype == "bfloat16" or not freeze

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = model(clip, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    results = {}
    if freeze:
        model.eval()
        backbone = model.evl.vision_model
        with torch.inference_mode():
            frames = clip.flatten(0, 1).to(backbone.dtype)
            results["backbone alone"] = throughput(lambda: backbone(pixel_values=frames), batch)
            results["EVL inference"] = throughput(lambda: model(clip), batch)
            if compile_inference:
                compiled = torch.compile(model)
                start = time.perf_counter()
                compiled(clip)
                torch.cuda.synchronize()
                results["compile seconds"] = time.perf_counter() - start
                results["compiled EVL inference"] = throughput(lambda: compiled(clip), batch)
    model.train()
    results["training step" if freeze else "fine-tuning step"] = throughput(step, batch)
    del model, optimizer
    torch.cuda.empty_cache()
    return results


def main():
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for name, shape, batch in (("ViT-B/16", B16, 32), ("ViT-L/14", L14, 16)):
        fp32 = measure(shape, batch, None)
        bf16 = measure(shape, batch, "bfloat16", compile_inference=shape is B16)
        finetune = measure(shape, batch, None, freeze=False)
        print(f"{name}, 8 frames, batch {batch}:")
        for label, results in (("float32", fp32), ("bf16 backbone", bf16)):
            print(f"  {label}: backbone alone {results['backbone alone']:8.1f} clips/s, EVL inference "
                  f"{results['EVL inference']:8.1f}, EVL training step {results['training step']:8.1f}")  # fmt: skip
        print(f"  fine-tuning step (bf16 autocast) {finetune['fine-tuning step']:8.1f} clips/s")
        print(f"  EVL inference / backbone alone time: float32 {fp32['backbone alone'] / fp32['EVL inference']:.3f} "
              f"(target <= 1.06), bf16 {bf16['backbone alone'] / bf16['EVL inference']:.3f} (target <= 1.10)")  # fmt: skip
        print(f"  EVL training step / EVL inference time: float32 {fp32['EVL inference'] / fp32['training step']:.3f}, "
              f"bf16 {bf16['EVL inference'] / bf16['training step']:.3f} (target <= 1.08)")  # fmt: skip
        print(f"  EVL training step (bf16) / fine-tuning step time: "
              f"{finetune['fine-tuning step'] / bf16['training step']:.3f} (target <= 0.42)")  # fmt: skip
        if "compiled EVL inference" in bf16:
            print(f"  torch.compile, bf16 inference: compiled / eager time "
                  f"{bf16['EVL inference'] / bf16['compiled EVL inference']:.3f} "
                  f"(compiling took {bf16['compile seconds']:.0f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
