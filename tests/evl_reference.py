"""
An independent, deliberately literal EVL forward pass over a state dict in the authors' release layout, written from
the reference notes (`evl-reference.md`) rather than from `evl_hf`: backbone features are recomputed from
`hidden_states` (no hooks), and the cross-frame attention gathers the full (N, N, D) relative-offset table, as the
authors do. It is checked against the authors' golden output in the tests, then used as the oracle for configurations
the golden fixture does not cover.
"""

import torch
from torch import nn
from transformers import CLIPVisionModel


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def layer_norm(x, sd, prefix, eps=1e-5):
    return nn.functional.layer_norm(x, x.shape[-1:], sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], eps)


def linear(x, sd, prefix):
    return nn.functional.linear(x, sd[f"{prefix}.weight"], sd[f"{prefix}.bias"])


def backbone_features(backbone: CLIPVisionModel, pixel_values: torch.Tensor, num_layers: int):
    """Per used block: (out, q, k), out (B, T, L, D), q/k (B, T, L, heads, head_dim), recomputed from hidden states."""
    batch, frames = pixel_values.shape[:2]
    hidden = backbone(pixel_values.flatten(0, 1), output_hidden_states=True).hidden_states
    layers = backbone.encoder.layers
    heads = backbone.config.num_attention_heads
    result = []
    for index in range(len(layers) - num_layers, len(layers)):
        normed = layers[index].layer_norm1(hidden[index])
        q = layers[index].self_attn.q_proj(normed)
        k = layers[index].self_attn.k_proj(normed)
        out = hidden[index + 1]
        shape = (batch, frames, out.shape[1])
        result.append((out.view(*shape, -1), q.view(*shape, heads, -1), k.view(*shape, heads, -1)))
    return result


def gathered_cross_frame_attention(q, k, w1, w2, grid):
    """The authors' formulation: gather w[offset(q, k)] into (N, N, D) and contract with the attention map."""
    h, w = grid
    batch, frames, tokens, heads, head_dim = q.shape
    q, k = q[:, :, 1:], k[:, :, 1:]
    qi, qj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    qi, qj = qi.reshape(-1), qj.reshape(-1)
    offset = (qi[:, None] - qi[None, :] + h - 1) * (2 * w - 1) + (qj[:, None] - qj[None, :] + w - 1)
    table1, table2 = w1[offset], w2[offset]  # (N, N, D) each
    out = torch.zeros(batch, frames, tokens, w1.shape[-1], dtype=q.dtype)
    for t in range(frames):
        for neighbour, table in ((t - 1, table1), (t + 1, table2)):
            if 0 <= neighbour < frames:
                scores = torch.einsum("bqhd,bkhd->bhqk", q[:, t], k[:, neighbour]) / head_dim**0.5
                attn = scores.softmax(-1).mean(1)  # (B, N, N)
                out[:, t, 1:] += torch.einsum("bqk,qkd->bqd", attn, table)
    return out


def reference_logits(
    state_dict: dict,
    backbone: CLIPVisionModel,
    pixel_values: torch.Tensor,
    decoder_num_heads: int,
) -> torch.Tensor:
    sd = {key.removeprefix("module."): value for key, value in state_dict.items()}
    num_layers = len({key.split(".")[2] for key in sd if key.startswith("decoder.decoder_layers.")})
    cfg = backbone.config
    grid = (cfg.image_size // cfg.patch_size,) * 2
    with torch.no_grad():
        features = backbone_features(backbone, pixel_values, num_layers)
        batch, frames = pixel_values.shape[:2]
        x = sd["decoder.cls_token"].view(1, 1, -1).repeat(batch, 1, 1)
        for i, (out, q, k) in enumerate(features):
            y = out.clone()
            if f"decoder.temporal_conv.{i}.weight" in sd:
                seq = out.permute(0, 2, 3, 1).flatten(0, 1)
                conv = nn.functional.conv1d(
                    seq, sd[f"decoder.temporal_conv.{i}.weight"], sd[f"decoder.temporal_conv.{i}.bias"],
                    padding=1, groups=seq.shape[1],
                )  # fmt: skip
                y += conv.view(batch, out.shape[2], -1, frames).permute(0, 3, 1, 2)
            if f"decoder.temporal_pos_embed.{i}" in sd:
                y += sd[f"decoder.temporal_pos_embed.{i}"].view(1, frames, 1, -1)
            if f"decoder.cross_attention.{i}.w1" in sd:
                y += gathered_cross_frame_attention(
                    q, k, sd[f"decoder.cross_attention.{i}.w1"], sd[f"decoder.cross_attention.{i}.w2"], grid
                )
            y = y.flatten(1, 2)
            p = f"decoder.decoder_layers.{i}"
            query = linear(layer_norm(x, sd, f"{p}.norm1"), sd, f"{p}.attn.q_proj")
            memory = layer_norm(y, sd, f"{p}.norm3")
            key, value = linear(memory, sd, f"{p}.attn.k_proj"), linear(memory, sd, f"{p}.attn.v_proj")
            heads = decoder_num_heads
            split = lambda t: t.view(batch, t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
            query, key, value = split(query), split(key), split(value)
            attn = (query @ key.transpose(-1, -2) / query.shape[-1] ** 0.5).softmax(-1)
            mixed = (attn @ value).transpose(1, 2).reshape(batch, 1, -1)
            x = x + linear(mixed, sd, f"{p}.attn.out_proj")
            hidden = quick_gelu(linear(layer_norm(x, sd, f"{p}.norm2"), sd, f"{p}.mlp.fc1"))
            x = x + linear(hidden, sd, f"{p}.mlp.fc2")
        x = layer_norm(x[:, 0], sd, "proj.0")
        return linear(x, sd, "proj.2")


def random_original_state_dict(
    hidden_size: int,
    grid: tuple[int, int],
    num_layers: int,
    num_frames: int,
    qkv_dim: int,
    mlp_factor: float,
    num_classes: int,
    temporal_conv: bool = True,
    temporal_pos_embed: bool = True,
    cross_attention: bool = True,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A checkpoint in the authors' release layout with every tensor random and non-zero."""
    generator = torch.Generator().manual_seed(seed)
    rand = lambda *shape, scale=0.2: torch.randn(*shape, generator=generator) * scale  # noqa: E731
    d, h, w = hidden_size, *grid
    mlp = round(mlp_factor * d)
    sd = {"decoder.cls_token": rand(d)}
    for i in range(num_layers):
        p = f"decoder.decoder_layers.{i}"
        for name in ("q", "k", "v"):
            sd[f"{p}.attn.{name}_proj.weight"] = rand(qkv_dim, d)
            sd[f"{p}.attn.{name}_proj.bias"] = rand(qkv_dim)
        sd[f"{p}.attn.out_proj.weight"], sd[f"{p}.attn.out_proj.bias"] = rand(d, qkv_dim), rand(d)
        sd[f"{p}.mlp.fc1.weight"], sd[f"{p}.mlp.fc1.bias"] = rand(mlp, d), rand(mlp)
        sd[f"{p}.mlp.fc2.weight"], sd[f"{p}.mlp.fc2.bias"] = rand(d, mlp), rand(d)
        for norm in ("norm1", "norm2", "norm3"):
            sd[f"{p}.{norm}.weight"], sd[f"{p}.{norm}.bias"] = 1 + rand(d), rand(d)
        if temporal_conv:
            sd[f"decoder.temporal_conv.{i}.weight"], sd[f"decoder.temporal_conv.{i}.bias"] = rand(d, 1, 3), rand(d)
        if temporal_pos_embed:
            sd[f"decoder.temporal_pos_embed.{i}"] = rand(num_frames, d)
        if cross_attention:
            offsets = (2 * h - 1) * (2 * w - 1)
            sd[f"decoder.cross_attention.{i}.w1"] = rand(offsets, d)
            sd[f"decoder.cross_attention.{i}.w2"] = rand(offsets, d)
    sd["proj.0.weight"], sd["proj.0.bias"] = 1 + rand(d), rand(d)
    sd["proj.2.weight"], sd["proj.2.bias"] = rand(num_classes, d), rand(num_classes)
    return {f"module.{key}": value for key, value in sd.items()}
