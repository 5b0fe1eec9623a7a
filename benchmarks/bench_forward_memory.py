"""
Peak memory of EVL's inference forward against the CLIPVisionModel forward alone over the same frames, ViT-B/16
shapes, float32 unless asked, CPU, each in a fresh process: the peak resident memory above what the process held once
the model and the clip existed (the weights and the input, identical for both). What EVL adds is the decoder's work
and what it keeps from the backbone's last blocks (their outputs and the cross-frame maps computed from their queries
and keys).

The children fix glibc's mmap threshold at 64 KiB, so every tensor above it is mapped when allocated and unmapped
when freed, and the resident memory follows the live tensors (glibc's default keeps some freed memory, by amounts
that depend on the order of allocations). The peak is reset right before the forward.

    python benchmarks/bench_forward_memory.py [--frames 32] [--batch_size 2]
                                              [--backbone_dtype bfloat16]

With `--backbone_dtype bfloat16` the backbone is bf16 (`backbone_dtype="bfloat16"`, the decoder float32) in both
variants.
"""

import argparse
import ctypes

from common import machine, peak_rss_bytes, rss_bytes, run_isolated

from evl_hf.allocator import _M_MMAP_THRESHOLD


def peak_above_loaded(variant: str, num_frames: int, batch_size: int, backbone_dtype: str | None = None) -> dict:
    """The child's work: build the model and the clip, then one forward of `variant`; its peak above that point."""
    import torch
    from common import evl_config

    from evl_hf import EVLForVideoClassification

    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, 64 * 1024) != 1:
        raise RuntimeError("glibc refused the mmap threshold")
    torch.manual_seed(0)
    model = EVLForVideoClassification(evl_config(num_frames=num_frames, backbone_dtype=backbone_dtype)).eval()
    clip = torch.randn(batch_size, num_frames, 3, 224, 224)
    frames = clip.flatten(0, 1).to(model.evl.vision_model.dtype)
    with torch.inference_mode():
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets the peak (VmHWM) to the current resident memory
        loaded = rss_bytes()
        if variant == "EVL forward":
            model(clip)
        else:
            model.evl.vision_model(pixel_values=frames)
    return {"peak_above_loaded": peak_rss_bytes() - loaded}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--backbone_dtype", choices=["bfloat16"], help="a bf16 backbone (default: float32)")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    dtype = args.backbone_dtype or "float32"
    print(f"ViT-B/16 shapes, {dtype} backbone, batch {args.batch_size} x {args.frames} frames; "
          "each variant in a fresh process")  # fmt: skip
    peaks = {}
    for variant in ("backbone alone", "EVL forward"):
        peaks[variant] = run_isolated(
            "bench_forward_memory", "peak_above_loaded", variant, args.frames, args.batch_size, args.backbone_dtype
        )
        print(f"  {variant:<16} peak above the loaded model and clip: {peaks[variant]['peak_above_loaded'] / 2**30:.2f} GiB")
    ratio = peaks["EVL forward"]["peak_above_loaded"] / peaks["backbone alone"]["peak_above_loaded"]
    print(f"  ratio EVL / backbone alone: {ratio:.3f}")


if __name__ == "__main__":
    main()
