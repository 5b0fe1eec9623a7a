"""
Where EVL's inference time goes (issue 11's profile), ViT-B/16 shapes, batch 1, 8 frames, CPU, float32 or with a
bfloat16 backbone (`--backbone_dtype bfloat16`, meaningful where the CPU runs bfloat16 natively).

Each section runs alternately with the CLIPVisionModel forward alone and is printed as a share of it; then the
operators with the most self time in a `torch.profiler` trace of the whole EVL forward; then the floor: what EVL's
forward must cost at least on this machine, as a ratio to the backbone alone (see `arithmetic_floor`).

    python benchmarks/bench_inference_profile.py [--repeats 5] [--backbone_dtype bfloat16] [--threads 1]
"""

import argparse

import torch
from common import add_threads_argument, alternate, b16_classifier_and_clip, machine, set_threads
from torch.profiler import ProfilerActivity, profile

import evl_hf.modeling_evl as modeling


def multiply_adds(config, batch_size: int = 1) -> dict:
    """Multiply-adds of one forward by part, counted from the shapes (a ViT with a class token, as CLIP).

    `backbone`: the CLIP tower over every frame. `maps`: the cross-frame scores (each neighbouring pair, both
    directions, every head; a head's scores are patches x patches x head_dim). `cross-frame module`: the module as
    implemented (per query-column group, each query row against the table rows and column offsets the group reaches)
    and, as `minimal`, each query patch against exactly the N offsets its N keys have (a clip's first frame has no
    previous-frame map and its last no next-frame map). `decoder attention`: the folded single-query attention of
    every layer over the tokens (keys and values never projected). `decoder matrix-vector products`: the projections
    and MLP of one query token, and the classifier; at a batch of one these are bound by reading the weights."""
    vision = config.vision_config
    hidden, frames, layers = vision.hidden_size, config.num_frames, config.decoder_num_layers
    height, width = config.patch_grid
    patches = height * width
    tokens = config.num_prefix_tokens + patches
    clip_frames = batch_size * frames
    block = 4 * tokens * hidden * hidden + 2 * tokens * tokens * hidden + 2 * tokens * hidden * vision.intermediate_size
    patch_embedding = patches * 3 * vision.patch_size**2 * hidden
    backbone = clip_frames * (patch_embedding + vision.num_hidden_layers * block)
    maps = layers * batch_size * 2 * (frames - 1) * patches * patches * hidden
    groups = [columns.stop - columns.start for columns in modeling._query_column_groups(width)]
    # Each direction skips the clip end without a neighbour (the first frame's previous, the last frame's next).
    module = layers * 2 * sum(height * batch_size * (frames - 1) * g * height * (g + width - 1) * hidden for g in groups)
    minimal_module = layers * 2 * batch_size * (frames - 1) * patches * patches * hidden
    attention = layers * batch_size * 2 * config.decoder_num_heads * frames * tokens * hidden
    # q, out, and the key and value weights applied to the folded query and the weighted sum; fc1, fc2; classifier.
    projections = 4 * hidden * config.decoder_qkv_dim + 2 * round(config.decoder_mlp_factor * hidden) * hidden
    vectors = layers * batch_size * projections + batch_size * hidden * config.num_labels
    return {"backbone": backbone, "maps": maps, "cross-frame module": module,
            "cross-frame module, minimal": minimal_module, "decoder attention": attention,
            "decoder matrix-vector products": vectors}  # fmt: skip


def arithmetic_floor(model, backbone_alone, repeats: int) -> None:
    """
    An estimate of the least EVL's forward can cost beyond the backbone here: its extra multiply-adds (the
    cross-frame module at its minimum; the decoder's matrix-vector products left to the next term) at the rate the
    backbone reaches over its whole forward (nearly all of it matmuls), plus one `exp` per cross-frame score (the
    softmax's least work) and one read of every decoder weight (a batch of one reads each once), both timed here
    alternately with the backbone alone. The parts are added: nothing is assumed to overlap.
    """
    config, evl = model.config, model.evl
    counts = multiply_adds(config)
    height, width = config.patch_grid
    patches = height * width
    heads = config.vision_config.num_attention_heads
    # The scores of one frame pair and direction, as the maps compute them (one pair at a time).
    scores = torch.randn(1, 1, heads, patches, patches, dtype=evl.vision_model.dtype)
    probabilities = torch.empty_like(scores, dtype=torch.promote_types(scores.dtype, torch.float32))
    pairs = config.decoder_num_layers * 2 * (config.num_frames - 1)
    weights = [module.weight for module in evl.decoder.modules() if isinstance(module, torch.nn.Linear)]
    weights.append(model.classifier.weight)
    vectors = [torch.randn(weight.shape[1], dtype=weight.dtype) for weight in weights]

    def exp_per_score():
        for _ in range(pairs):
            torch.exp(scores, out=probabilities)  # into a reused buffer: no allocation

    def read_decoder_weights():
        for weight, vector in zip(weights, vectors):
            torch.mv(weight, vector)

    with torch.inference_mode():
        timed = alternate({"backbone": backbone_alone, "exp": exp_per_score,
                           "weights": read_decoder_weights}, repeats=repeats)  # fmt: skip
    share = {name: seconds / timed["backbone"] for name, seconds in timed.items()}
    shared = counts["maps"] + counts["decoder attention"]
    extra = shared + counts["cross-frame module, minimal"]
    implemented = shared + counts["cross-frame module"] + counts["decoder matrix-vector products"]
    print("multiply-adds of one forward (batch 1), counted from the shapes:")
    for name, count in counts.items():
        print(f"  {name:<36} {count / 1e9:8.3f} G   {count / counts['backbone']:6.4f} of the backbone")
    print(f"  EVL's extra, as implemented          {implemented / counts['backbone']:6.4f} of the backbone; the "
          f"floor's (minimal module, no matrix-vector products) {extra / counts['backbone']:6.4f}")  # fmt: skip
    print(f"the backbone's rate here (whole forward): {counts['backbone'] * 2 / timed['backbone'] / 1e9:.0f} GFLOP/s")
    print(f"one exp per cross-frame score ({pairs} x {heads} x {patches}^2): {share['exp']:.4f} of the backbone alone")
    print(f"one read of the decoder's {sum(w.numel() for w in weights) * weights[0].element_size() / 2**20:.0f} MiB of "
          f"weights (matrix-vector products): {share['weights']:.4f} of the backbone alone")  # fmt: skip
    floor = 1 + extra / counts["backbone"] + share["exp"] + share["weights"]
    print(f"floor (estimate): EVL forward / backbone alone >= {floor:.3f} (the extra multiply-adds at the backbone's "
          f"rate, the exps and the weight reads; softmax's other passes, LayerNorms, the temporal conv and copies not "
          f"counted)")  # fmt: skip


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
    arithmetic_floor(model, sections["CLIPVisionModel alone"], args.repeats)


if __name__ == "__main__":
    main()
