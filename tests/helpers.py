"""Builders shared by the tests: tiny random CLIP backbones, EVL configs and synthetic clips."""

from pathlib import Path

import numpy as np
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from evl_hf import EVLConfig


def tiny_vision_config(**overrides) -> CLIPVisionConfig:
    values = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, patch_size=8,
        image_size=32, hidden_act="quick_gelu", projection_dim=16,
    )  # fmt: skip
    values.update(overrides)
    return CLIPVisionConfig(**values)


def tiny_config(vision_overrides=None, **overrides) -> EVLConfig:
    values = dict(
        num_frames=4, decoder_num_layers=2, decoder_qkv_dim=32, decoder_num_heads=4, num_labels=5,
        decoder_mlp_dropout=0.0, classifier_dropout=0.0,
    )  # fmt: skip
    values.update(overrides)
    return EVLConfig(vision_config=tiny_vision_config(**(vision_overrides or {})), **values)


def save_tiny_backbone(directory: Path, seed: int = 0, **overrides) -> Path:
    torch.manual_seed(seed)
    CLIPVisionModel(tiny_vision_config(**overrides)).save_pretrained(directory)
    return directory


def randomize_decoder(model, seed: int = 0, scale: float = 0.2) -> None:
    """Give every zero-initialised decoder tensor (query, position embeddings, offset tables) non-zero values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "vision_model" not in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


def pixel_values(batch=2, frames=4, size=32, seed=0) -> torch.Tensor:
    return torch.randn(batch, frames, 3, size, size, generator=torch.Generator().manual_seed(seed))


def write_clip(path: Path, frames: np.ndarray, fps: int = 25, codec: str = "libx264", pix_fmt: str = "yuv420p") -> Path:
    """Encode (T, H, W, 3) uint8 frames to an mp4 with PyAV."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def index_coded_frames(num_frames: int, height: int = 48, width: int = 64) -> np.ndarray:
    """Frames whose brightness encodes their index (index * 2 + 20), so decoded frames can be identified."""
    values = (np.arange(num_frames) * 2 + 20).astype(np.uint8)
    return np.broadcast_to(values[:, None, None, None], (num_frames, height, width, 3)).copy()


def frame_index(frame: np.ndarray) -> int:
    return int(round((float(np.asarray(frame, dtype=np.float64).mean()) - 20) / 2))
