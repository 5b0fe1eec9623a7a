"""
Convert the authors' released EVL checkpoints (`k400_vit*_dec4x*.pth`, decoder and head only) into a transformers
checkpoint: safetensors weights, `config.json` and `video_preprocessor_config.json`, loadable with
`AutoModelForVideoClassification`, `AutoVideoProcessor` and `pipeline("video-classification")`.

    evl-convert --checkpoint k400_vitb16_8f_dec4x768.pth --backbone openai/clip-vit-base-patch16 \\
        --output_dir evl-vit-b16-8f-k400 --labels kinetics400_labels.json

Everything the checkpoint's shapes determine (frames, decoder depth, qkv width, MLP factor, classes, which temporal
modules exist) is read from it; the decoder head count defaults to the backbone's.
"""

import argparse
import pickle
import re
from pathlib import Path

import torch
from transformers import CLIPVisionConfig

from .backbone_families import BACKBONE_FAMILIES, checkpoint_model_type, family_of_checkpoint
from .class_names import read_class_names, repeated_labels
from .configuration_evl import EVLConfig
from .modeling_evl import EVLCheckpointError, EVLForVideoClassification
from .output_paths import check_output_dir
from .video_processing_evl import EVLVideoProcessor


_LAYER_RENAMES = {
    "attn.q_proj": "cross_attention.q_proj",
    "attn.k_proj": "cross_attention.k_proj",
    "attn.v_proj": "cross_attention.v_proj",
    "attn.out_proj": "cross_attention.out_proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "norm1": "query_layernorm",
    "norm2": "mlp_layernorm",
    "norm3": "frame_layernorm",
}


def rename_key(key: str) -> str:
    """Map one key of the authors' layout (without the `module.` prefix) to `EVLForVideoClassification`'s."""
    if key == "decoder.cls_token":
        return "evl.decoder.query"
    if match := re.fullmatch(r"decoder\.decoder_layers\.(\d+)\.(attn\.\w+_proj|mlp\.fc\d|norm\d)\.(weight|bias)", key):
        index, module, kind = match.groups()
        if module in _LAYER_RENAMES:
            return f"evl.decoder.layers.{index}.{_LAYER_RENAMES[module]}.{kind}"
    if match := re.fullmatch(r"decoder\.temporal_conv\.(\d+)\.(weight|bias)", key):
        return f"evl.decoder.layers.{match[1]}.temporal_conv.conv.{match[2]}"
    if match := re.fullmatch(r"decoder\.temporal_pos_embed\.(\d+)", key):
        return f"evl.decoder.layers.{match[1]}.temporal_position_embedding.embedding"
    if match := re.fullmatch(r"decoder\.cross_attention\.(\d+)\.(w1|w2)", key):
        table = "previous_frame_table" if match[2] == "w1" else "next_frame_table"
        return f"evl.decoder.layers.{match[1]}.cross_frame_attention.{table}"
    if match := re.fullmatch(r"proj\.(0|2)\.(weight|bias)", key):
        return f"{'fc_norm' if match[1] == '0' else 'classifier'}.{match[2]}"
    raise EVLCheckpointError(f"Unexpected key {key!r} in the EVL checkpoint: it is not part of the EVL decoder/head.")


def load_original_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an authors' checkpoint (`{"model": {"module.<key>": tensor}}`) safely (`weights_only=True`)."""
    path = Path(path)
    if not path.is_file():
        raise EVLCheckpointError(f"{path}: no such checkpoint file.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's weights-only unpickler refused an object. Its text spans lines (with terminal escapes) and advises
        # weights_only=False, which would run the file's code: keep only what it refused.
        refused = re.search(r"WeightsUnpickler error:\s*(.+?)(?: was not an allowed global|\n|$)", str(error))
        raise EVLCheckpointError(
            f"{path}: cannot be read safely: it holds Python objects other than tensors (e.g. a pickled model), "
            "refused because loading them could run code, or it is not a PyTorch checkpoint"
            + (f" ({refused[1]})." if refused else ".")
        ) from None
    except Exception as error:  # torch raises several types for truncated/corrupt files
        detail = " ".join(str(error).split())  # one line
        raise EVLCheckpointError(
            f"{path}: cannot be read as a PyTorch checkpoint ({type(error).__name__}: {detail})."
        ) from None
    state_dict = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        found = f"a dict with the keys {list(checkpoint)[:5]}" if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise EVLCheckpointError(f"{path}: expected the tensors under 'model' (the authors' layout), found {found}.")
    state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()}
    backbone_keys = [key for key in state_dict if not key.startswith(("decoder.", "proj."))]
    if backbone_keys:
        raise EVLCheckpointError(
            f"{path}: expected only decoder/head weights, found {len(backbone_keys)} other keys "
            f"(e.g. {backbone_keys[:3]}); the backbone comes from --backbone."
        )
    return state_dict


def infer_config(
    state_dict: dict[str, torch.Tensor], vision_config: CLIPVisionConfig, decoder_num_heads: int | None = None
) -> EVLConfig:
    """Read the EVL configuration off the checkpoint's shapes, checking that they fit the backbone."""
    hidden_size = vision_config.hidden_size
    layer_indices = sorted({int(m[1]) for k in state_dict if (m := re.match(r"decoder\.decoder_layers\.(\d+)\.", k))})
    if not layer_indices or layer_indices != list(range(len(layer_indices))):
        raise EVLCheckpointError(f"Decoder layers must be numbered 0..K-1, found {layer_indices}.")
    num_layers = len(layer_indices)
    for required in ("decoder.cls_token", "decoder.decoder_layers.0.attn.q_proj.weight", "decoder.decoder_layers.0.mlp.fc1.weight", "proj.2.weight"):  # fmt: skip
        if required not in state_dict:
            raise EVLCheckpointError(f"The checkpoint lacks {required!r}; it is not an EVL decoder checkpoint.")

    width = state_dict["decoder.cls_token"].shape[-1]
    if width != hidden_size:
        raise EVLCheckpointError(
            f"The checkpoint's decoder width is {width} ('decoder.cls_token' {tuple(state_dict['decoder.cls_token'].shape)}) "
            f"but the backbone's hidden_size is {hidden_size}: it was trained on another backbone."
        )
    qkv_dim = state_dict["decoder.decoder_layers.0.attn.q_proj.weight"].shape[0]
    mlp_hidden = state_dict["decoder.decoder_layers.0.mlp.fc1.weight"].shape[0]
    num_labels = state_dict["proj.2.weight"].shape[0]
    pos_key = "decoder.temporal_pos_embed.0"
    use_pos = pos_key in state_dict
    kwargs = dict(
        decoder_num_layers=num_layers,
        decoder_qkv_dim=qkv_dim,
        decoder_num_heads=vision_config.num_attention_heads if decoder_num_heads is None else decoder_num_heads,
        decoder_mlp_factor=mlp_hidden / hidden_size,
        use_temporal_conv="decoder.temporal_conv.0.weight" in state_dict,
        use_temporal_pos_embed=use_pos,
        use_temporal_cross_attention="decoder.cross_attention.0.w1" in state_dict,
        num_labels=num_labels,
    )
    if use_pos:
        kwargs["num_frames"] = state_dict[pos_key].shape[0]
    if num_layers > vision_config.num_hidden_layers:
        raise EVLCheckpointError(
            f"The checkpoint has {num_layers} decoder layers but the backbone only {vision_config.num_hidden_layers} blocks."
        )
    try:
        return EVLConfig(vision_config=vision_config, **kwargs)
    except ValueError as error:
        raise EVLCheckpointError(f"The checkpoint's shapes give an invalid EVL configuration: {error}") from error


def convert_state_dict(state_dict: dict[str, torch.Tensor], model: EVLForVideoClassification) -> dict[str, torch.Tensor]:
    """Rename the authors' keys and check every decoder/head tensor against the model: all present, all shapes equal."""
    converted = {rename_key(key): value for key, value in state_dict.items()}
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.startswith("evl.vision_model.")}
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    mismatched = [
        f"{key}: checkpoint {tuple(converted[key].shape)} vs model {tuple(expected[key])}"
        for key in sorted(set(expected) & set(converted))
        if converted[key].shape != expected[key]
    ]
    if missing or unexpected or mismatched:
        found = (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
        problems = "; ".join(f"{kind}: {keys}" for kind, keys in found if keys)
        raise EVLCheckpointError(f"The checkpoint does not fit the EVL model built from it and the backbone; {problems}")
    return converted


def convert_evl_checkpoint(
    checkpoint_path: str | Path,
    backbone: str | Path,
    decoder_num_heads: int | None = None,
    id2label: dict[int, str] | None = None,
    sampling_rate: int | None = None,
    num_spatial_views: int = 1,
    num_temporal_views: int = 1,
) -> tuple[EVLForVideoClassification, EVLVideoProcessor]:
    """Build the transformers model (pretrained CLIP backbone + converted decoder/head) and its video processor."""
    if decoder_num_heads is not None and decoder_num_heads < 1:
        raise ValueError(f"`decoder_num_heads` must be a positive integer, got {decoder_num_heads}.")
    if id2label is not None and (repeated := repeated_labels(id2label.values())):
        raise ValueError(f"The class names must be distinct; repeated: {repeated}.")
    # `CLIPVisionConfig.from_pretrained` reads any config.json as CLIP's: the checkpoint would be saved as CLIP over
    # another family's weights. Checked before the (large) checkpoint is read.
    model_type = checkpoint_model_type(backbone)
    if family_of_checkpoint(model_type) is not BACKBONE_FAMILIES["clip_vision_model"]:
        raise ValueError(
            f"{backbone} is a `{model_type}` checkpoint: the authors' EVL checkpoints decode CLIP features, so "
            "--backbone must be the CLIP model they were trained on (`clip` or `clip_vision_model`)."
        )
    state_dict = load_original_state_dict(checkpoint_path)
    try:
        config = infer_config(state_dict, CLIPVisionConfig.from_pretrained(backbone), decoder_num_heads)
    except EVLCheckpointError as error:
        raise EVLCheckpointError(f"{checkpoint_path}: {error}") from None
    if id2label is not None:
        if len(id2label) != config.num_labels:
            raise EVLCheckpointError(
                f"{checkpoint_path}: {len(id2label)} labels given but the checkpoint's classifier has {config.num_labels} "
                "outputs."
            )
        config.id2label = dict(id2label)
        config.label2id = {label: index for index, label in id2label.items()}
    model = EVLForVideoClassification.from_backbone_pretrained(backbone, config=config)
    try:
        converted = convert_state_dict(state_dict, model)
    except EVLCheckpointError as error:
        raise EVLCheckpointError(f"{checkpoint_path}: {error}") from None
    model.load_state_dict(converted, strict=False)
    model.eval()
    overrides = {"sampling_rate": sampling_rate} if sampling_rate is not None else {}
    processor = EVLVideoProcessor.from_model_config(
        config, num_spatial_views=num_spatial_views, num_temporal_views=num_temporal_views, **overrides
    )
    return model, processor


def main(argv: list[str] | None = None) -> None:
    # Named as installed (`python -m evl_hf.convert` runs the same), not after this file.
    parser = argparse.ArgumentParser(
        prog="evl-convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="The authors' .pth file (decoder and head).")
    parser.add_argument("--backbone", required=True, help="CLIP id (e.g. openai/clip-vit-base-patch16) or local dir.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--decoder_num_heads", type=int, default=None, help="Defaults to the backbone's head count.")
    parser.add_argument(
        "--labels", default=None,
        help="Class names in label order: a JSON list or object, or one name per line (as --class_names_file).",
    )  # fmt: skip
    parser.add_argument("--sampling_rate", type=int, default=None, help="Frame stride (default: 16, or 8 for 32 frames).")
    parser.add_argument("--num_spatial_views", type=int, default=1, help="Evaluation crops saved in the processor (1 or 3).")
    parser.add_argument("--num_temporal_views", type=int, default=1, help="Evaluation windows saved in the processor.")
    parser.add_argument("--push_to_hub", default=None, metavar="REPO_ID", help="Also upload to this Hub repository.")
    args = parser.parse_args(argv)
    for name in ("decoder_num_heads", "sampling_rate", "num_temporal_views"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}.")
    check_output_dir(parser, "--output_dir", args.output_dir)

    try:  # a bad file or argument is one line naming it, not a traceback
        id2label = None
        if args.labels:
            id2label = dict(enumerate(read_class_names(args.labels)))
        model, processor = convert_evl_checkpoint(
            args.checkpoint, args.backbone, args.decoder_num_heads, id2label, args.sampling_rate,
            args.num_spatial_views, args.num_temporal_views,
        )  # fmt: skip
    except (ValueError, OSError) as error:  # EVLCheckpointError is a ValueError
        parser.exit(1, f"{parser.prog}: error: {error}\n")
    model.save_pretrained(args.output_dir)
    processor.save_pretrained(args.output_dir)
    print(f"Saved {type(model).__name__} ({model.config.num_labels} classes, {model.config.num_frames} frames) to {args.output_dir}")
    if args.push_to_hub:
        model.push_to_hub(args.push_to_hub)
        processor.push_to_hub(args.push_to_hub)


if __name__ == "__main__":
    main()
