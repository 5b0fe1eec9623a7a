"""
GPU throughput (clips/s) at ViT-B/16 and ViT-L/14 shapes, 8 frames, bfloat16 autocast, random weights, no downloads:
the backbone alone, EVL inference, EVL training step (frozen backbone, AdamW), end-to-end fine-tuning step.

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


def main():
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for name, shape, batch in (("ViT-B/16", B16, 32), ("ViT-L/14", L14, 16)):
        torch.manual_seed(0)
        results = {}
        for freeze in (True, False):
            model = EVLForVideoClassification(evl_config(shape, freeze_backbone=freeze)).cuda()
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
            clip = torch.randn(batch, 8, 3, 224, 224, device="cuda")
            labels = torch.randint(0, 400, (batch,), device="cuda")

            def step():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = model(clip, labels=labels).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            if freeze:
                model.eval()
                with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                    frames = clip.flatten(0, 1)
                    results["backbone alone"] = throughput(lambda: model.evl.vision_model(pixel_values=frames), batch)
                    results["EVL inference"] = throughput(lambda: model(clip), batch)
                model.train()
                results["EVL training step"] = throughput(step, batch)
            else:
                model.train()
                results["fine-tuning step"] = throughput(step, batch)
            del model, optimizer
            torch.cuda.empty_cache()
        print(f"{name}, 8 frames, batch {batch}, bf16 autocast:")
        for key, value in results.items():
            print(f"  {key:<20} {value:8.1f} clips/s")
        print(f"  EVL inference / backbone alone time ratio: {results['backbone alone'] / results['EVL inference']:.3f}")
        print(f"  EVL training / fine-tuning time ratio:    {results['fine-tuning step'] / results['EVL training step']:.3f}")


if __name__ == "__main__":
    main()
