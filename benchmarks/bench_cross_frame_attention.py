"""
Target 2: the cross-frame attention module (attention maps between neighbouring frames + the learned relative-offset
features, one decoder layer, both directions) against the authors' formulation, which gathers an (N, N, D) table
per direction.

* speed at ViT-B/16 shapes (14x14 grid, width 768, 12 heads), batch 1, 8 frames: ours / gathered (target <= 1.0);
* peak memory above the inputs at ViT-L/14@336 shapes (24x24 grid, width 1024, 16 heads), 32 frames, each
  formulation in a fresh process (target for ours <= 0.5 GB); parity between the two on the same inputs.

    python benchmarks/bench_cross_frame_attention.py [--repeats 5]
"""

import argparse

import torch
from common import B16, L14_336, alternate, evl_config, machine, peak_rss_bytes, rss_bytes, run_isolated

from evl_hf.modeling_evl import EVLCrossFrameAttention, cross_frame_attention_maps


def gathered_cross_frame_attention(queries, keys, previous_table, next_table, grid):
    """The authors' formulation, batched over frames: softmax maps, then a gathered (N, N, D) table per direction."""
    height, width = grid
    batch, frames, tokens, heads, head_dim = queries.shape
    q, k = queries[:, :, 1:].transpose(2, 3), keys[:, :, 1:].transpose(2, 3)  # (B, T, H, N, d)
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    rows, cols = rows.reshape(-1), cols.reshape(-1)
    offset = (rows[:, None] - rows[None, :] + height - 1) * (2 * width - 1) + (cols[:, None] - cols[None, :] + width - 1)
    out = queries.new_zeros(batch, frames, tokens, previous_table.shape[-1])
    backward = (q[:, 1:] @ k[:, :-1].transpose(-1, -2) / head_dim**0.5).softmax(-1).mean(2)
    out[:, 1:, 1:] += torch.einsum("btqk,qkd->btqd", backward, previous_table[offset])
    forward = (q[:, :-1] @ k[:, 1:].transpose(-1, -2) / head_dim**0.5).softmax(-1).mean(2)
    out[:, :-1, 1:] += torch.einsum("btqk,qkd->btqd", forward, next_table[offset])
    return out


def setup(shape, frames, seed=0):
    torch.manual_seed(seed)
    config = evl_config(shape, num_frames=frames)
    module = EVLCrossFrameAttention(config).eval()
    with torch.no_grad():
        module.previous_frame_table.normal_()
        module.next_frame_table.normal_()
    tokens = config.patch_grid[0] * config.patch_grid[1] + 1
    heads = shape["num_attention_heads"]
    queries = torch.randn(1, frames, tokens, heads, shape["hidden_size"] // heads)
    keys = torch.randn(1, frames, tokens, heads, shape["hidden_size"] // heads)
    return config, module, queries, keys


def ours(module, queries, keys):
    return module(cross_frame_attention_maps(queries, keys))


def reference(module, queries, keys, grid):
    return gathered_cross_frame_attention(queries, keys, module.previous_frame_table, module.next_frame_table, grid)


def peak_memory(formulation: str, shape_name: str, frames: int) -> dict:
    shape = {"B16": B16, "L14_336": L14_336}[shape_name]
    config, module, queries, keys = setup(shape, frames)
    before = rss_bytes()
    with torch.inference_mode():
        if formulation == "ours":
            output = ours(module, queries, keys)
        else:
            output = reference(module, queries, keys, config.patch_grid)
    return {"peak_above_inputs_gb": (peak_rss_bytes() - before) / 1e9, "output_sum": float(output.double().sum())}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"machine: {machine()}")

    config, module, queries, keys = setup(B16, 8)
    with torch.inference_mode():
        difference = (ours(module, queries, keys) - reference(module, queries, keys, config.patch_grid)).abs().max()
        medians = alternate(
            {
                "gathered (authors)": lambda: reference(module, queries, keys, config.patch_grid),
                "offset space (ours)": lambda: ours(module, queries, keys),
            },
            repeats=args.repeats,
        )
    print("ViT-B/16 shapes, batch 1, 8 frames, one decoder layer's module:")
    for name, seconds in medians.items():
        print(f"  {name:<22} median {seconds * 1000:8.2f} ms")
    print(f"  ratio ours / gathered: {medians['offset space (ours)'] / medians['gathered (authors)']:.3f} (target <= 1.0)")
    print(f"  max |ours - gathered| = {difference:.2e}")

    print("ViT-L/14@336 shapes (24x24 grid, width 1024, 16 heads), batch 1, 32 frames, peak RSS above inputs:")
    results = {name: run_isolated("bench_cross_frame_attention", "peak_memory", name, "L14_336", 32) for name in ("ours", "gathered")}
    for name, result in results.items():
        print(f"  {name:<9} {result['peak_above_inputs_gb']:.3f} GB")
    print(f"  target for ours <= 0.5 GB; outputs agree: |sum difference| = "
          f"{abs(results['ours']['output_sum'] - results['gathered']['output_sum']):.3e} "
          f"(sums {results['ours']['output_sum']:.1f})")  # fmt: skip


if __name__ == "__main__":
    main()
