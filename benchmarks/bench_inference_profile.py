"""
Where EVL's inference time goes (issue 11's profile), ViT-B/16 shapes, batch 1, 8 frames, CPU, float32 or with a
bfloat16 backbone (`--backbone_dtype bfloat16`, meaningful where the CPU runs bfloat16 natively).

Each section runs alternately with the CLIPVisionModel forward alone and is printed as a share of it; then the
operators with the most self time in a `torch.profiler` trace of the whole EVL forward.

    python benchmarks/bench_inference_profile.py [--repeats 5] [--backbone_dtype bfloat16] [--threads 1]
"""

import argparse

import torch
from common import add_threads_argument, alternate, b16_classifier_and_clip, machine, set_threads
from torch.profiler import ProfilerActivity, profile

import evl_hf.modeling_evl as modeling


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backbone_dtype", choices=["bfloat16", "float16"])
    add_threads_argument(parser)
    args = parser.parse_args()
    set_threads(args.threads)
    model, clip = b16_classifier_and_clip(args.backbone_dtype)
    evl, backbone = model.evl, model.evl.vision_model
    frames = clip.flatten(0, 1).to(backbone.dtype)
    # One block's attention queries and keys, as the cross-frame maps receive them: (batch, frames, tokens, heads, dim).
    queries, keys = torch.randn(2, 1, 8, 197, 12, 64, dtype=backbone.dtype).unbind(0)

    with torch.inference_mode():
        # The features in the dtype the decoder reads them in at inference.
        features = evl._extract_backbone_features(clip, evl.reduced_precision_inference_dtype() or torch.float32)
        frame_features, maps = features.frame_features, features.cross_frame_maps
        layer = evl.decoder.layers[0]
        sections = {
            "CLIPVisionModel alone": lambda: backbone(pixel_values=frames),
            "EVL's backbone pass + maps": lambda: evl.extract_backbone_features(clip),
            "  cross-frame maps x4": lambda: [modeling.cross_frame_attention_maps(queries, keys) for _ in range(4)],
            "decoder from features (4 layers)": lambda: model(frame_features=frame_features, cross_frame_maps=maps),
            "  cross-frame module x4": lambda: [layer.cross_frame_attention(maps[:, 0]) for _ in range(4)],
            "  temporal conv x4": lambda: [layer.temporal_conv(frame_features[:, 0]) for _ in range(4)],
            "EVL forward": lambda: model(clip),
        }
        medians = alternate(sections, repeats=args.repeats)
        with profile(activities=[ProfilerActivity.CPU]) as trace:
            model(clip)
    print(f"machine: {machine()}")
    print(f"backbone {backbone.dtype}, decoder {evl.decoder.query.dtype}")
    base = medians["CLIPVisionModel alone"]
    for name, seconds in medians.items():
        print(f"{name:<36} median {seconds * 1000:8.1f} ms   {seconds / base:6.3f} of the backbone alone")
    print("operators with the most self CPU time in one EVL forward:")
    events = sorted(trace.key_averages(), key=lambda event: event.self_cpu_time_total, reverse=True)
    total = sum(event.self_cpu_time_total for event in events)
    for event in events[:10]:
        print(f"  {event.key:<48} {event.self_cpu_time_total / total:6.1%}  ({event.count} calls)")


if __name__ == "__main__":
    main()
