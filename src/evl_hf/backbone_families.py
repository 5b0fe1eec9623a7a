# Copyright 2026 The evl-hf authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""
The image backbones EVL reads. EVL needs only a frozen pre-LN ViT: its embeddings, its blocks, each block's attention
queries and keys, and how many tokens precede the patches. A family is those few facts about one transformers model;
everything else (features, cross-frame maps, decoder) is shared.
"""

import inspect
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path

import torch
from torch import nn
from transformers import (
    CLIPVisionModel,
    Dinov2Model,
    Dinov2WithRegistersModel,
    PreTrainedConfig,
    PreTrainedModel,
    SiglipVisionModel,
    ViTModel,
)
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import CONFIG_NAME, cached_file


@dataclass(frozen=True)
class EVLBackboneFamily:
    """
    One family of image backbones, described by the names of its modules. Blocks are pre-LN:
    `h + residual(attention(attention_norm(h)))`, then `h + residual(mlp(mlp_norm(h)))`, where `residual` applies the
    block's layer scale and residual dropout where it has them.
    """

    name: str
    # `model_type` of the vision tower's config, and the class that runs it.
    vision_model_type: str
    model_class: type[PreTrainedModel]
    # `model_type`s of the checkpoints the tower loads from: the tower itself, or a two-tower model whose vision
    # tower is taken (CLIP, SigLIP). Tensors under `unused_prefixes` (a text tower, a pooler) are not loaded.
    checkpoint_model_types: tuple[str, ...]
    unused_prefixes: tuple[str, ...]
    layers: str
    attention_norm: str
    attention: str
    output_projection: str
    scaling: str
    attention_dropout: str
    mlp_norm: str
    has_class_token: bool = True
    # Whether the embeddings resize their position table to any input resolution (DINOv2 always does).
    interpolates_position_embeddings: bool = False
    pre_norm: str | None = None
    layer_scales: tuple[str, str] | None = None
    residual_dropout: str | None = None
    model_kwargs: dict = field(default_factory=dict)
    # The normalisation of the family's released image processors, for a processor built without one.
    image_mean: tuple[float, ...] = tuple(OPENAI_CLIP_MEAN)
    image_std: tuple[float, ...] = tuple(OPENAI_CLIP_STD)

    def build(self, config: PreTrainedConfig, dtype: torch.dtype | None = None) -> PreTrainedModel:
        """A randomly initialised tower of `config`, in `dtype` (else the one `config.dtype` records)."""
        kwargs = {"dtype": dtype} if dtype is not None else {}
        return self.model_class._from_config(config, **self.model_kwargs, **kwargs)

    def from_pretrained(self, name_or_path, **kwargs):
        return self.model_class.from_pretrained(name_or_path, **self.model_kwargs, **kwargs)

    def blocks(self, tower: nn.Module) -> nn.ModuleList:
        return attrgetter(self.layers)(tower)

    def unused_parameters(self, tower: nn.Module) -> list[str]:
        """
        The tower's parameters EVL never runs: its final norm, pooler or pooling head, and the mask token of masked
        image modelling. They stay in the checkpoint; a trained backbone does not train them (they get no gradient).
        """
        used = ("embeddings.", f"{self.layers}.") + ((f"{self.pre_norm}.",) if self.pre_norm else ())
        return [
            name
            for name, _ in tower.named_parameters()
            if not name.startswith(used) or name == "embeddings.mask_token"
        ]

    def num_prefix_tokens(self, config: PreTrainedConfig) -> int:
        """Tokens before the patches: the class token and, for DINOv2 with registers, the registers."""
        return int(self.has_class_token) + getattr(config, "num_register_tokens", 0)

    def embed(self, tower: nn.Module, frames: torch.Tensor) -> torch.Tensor:
        """The tokens the first block reads, as the tower's own forward computes them."""
        hidden_states = tower.embeddings(frames)
        return getattr(tower, self.pre_norm)(hidden_states) if self.pre_norm else hidden_states

    def block_with_query_key(self, layer: nn.Module, hidden_states: torch.Tensor):
        """
        The block's forward, computed from its own modules in its own order (bitwise equal to `layer(hidden_states)`),
        returning its output and the queries and keys its attention used: the cross-frame maps read those, and a
        second projection would cost a sixth of the block.
        """
        attention = getattr(layer, self.attention)
        normed = getattr(layer, self.attention_norm)(hidden_states)
        query, key, value = attention.q_proj(normed), attention.k_proj(normed), attention.v_proj(normed)
        heads_shape = (*normed.shape[:-1], -1, attention.head_dim)
        # The eager fallback is the one the backbone's own attention uses (its modeling module's).
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            attention.config._attn_implementation, inspect.getmodule(attention).eager_attention_forward
        )
        attended, _ = attention_interface(
            attention,
            query.view(heads_shape).transpose(1, 2),
            key.view(heads_shape).transpose(1, 2),
            value.view(heads_shape).transpose(1, 2),
            None,
            scaling=getattr(attention, self.scaling),
            dropout=0.0 if not attention.training else getattr(attention, self.attention_dropout),
        )
        del value, normed
        attended = getattr(attention, self.output_projection)(attended.reshape(*query.shape[:-1], -1).contiguous())
        hidden_states = self._residual(layer, attended, 0) + hidden_states
        mlp_output = layer.mlp(getattr(layer, self.mlp_norm)(hidden_states))
        hidden_states = self._residual(layer, mlp_output, 1) + hidden_states
        return hidden_states, query, key

    def _residual(self, layer: nn.Module, branch: torch.Tensor, index: int) -> torch.Tensor:
        if self.layer_scales is not None:
            branch = getattr(layer, self.layer_scales[index])(branch)
        if self.residual_dropout is not None:
            branch = getattr(layer, self.residual_dropout)(branch)
        return branch


_CLIP_LIKE = dict(
    layers="encoder.layers", attention_norm="layer_norm1", attention="self_attn", output_projection="out_proj",
    scaling="scale", attention_dropout="dropout", mlp_norm="layer_norm2",
)  # fmt: skip
_DINOV2_LIKE = dict(
    layers="encoder.layer", attention_norm="norm1", attention="attention", output_projection="o_proj",
    scaling="scaling", attention_dropout="attention_dropout", mlp_norm="norm2",
    layer_scales=("layer_scale1", "layer_scale2"), residual_dropout="drop_path", unused_prefixes=("classifier.",),
    interpolates_position_embeddings=True, image_mean=tuple(IMAGENET_DEFAULT_MEAN), image_std=tuple(IMAGENET_DEFAULT_STD),
)  # fmt: skip

BACKBONE_FAMILIES: dict[str, EVLBackboneFamily] = {
    family.vision_model_type: family
    for family in (
        EVLBackboneFamily(
            name="CLIP", vision_model_type="clip_vision_model", model_class=CLIPVisionModel,
            checkpoint_model_types=("clip_vision_model", "clip"),
            unused_prefixes=("text_model.", "text_projection.", "visual_projection.", "logit_scale", "classifier."),
            pre_norm="pre_layrnorm", **_CLIP_LIKE,
        ),
        EVLBackboneFamily(
            name="SigLIP", vision_model_type="siglip_vision_model", model_class=SiglipVisionModel,
            checkpoint_model_types=("siglip_vision_model", "siglip"),
            unused_prefixes=("text_model.", "logit_scale", "logit_bias", "classifier."),
            has_class_token=False, image_mean=tuple(IMAGENET_STANDARD_MEAN), image_std=tuple(IMAGENET_STANDARD_STD), **_CLIP_LIKE,
        ),
        EVLBackboneFamily(
            name="DINOv2", vision_model_type="dinov2", model_class=Dinov2Model, checkpoint_model_types=("dinov2",),
            **_DINOV2_LIKE,
        ),
        EVLBackboneFamily(
            name="DINOv2 with registers", vision_model_type="dinov2_with_registers",
            model_class=Dinov2WithRegistersModel, checkpoint_model_types=("dinov2_with_registers",), **_DINOV2_LIKE,
        ),
        EVLBackboneFamily(
            name="ViT", vision_model_type="vit", model_class=ViTModel, checkpoint_model_types=("vit",),
            layers="layers", attention_norm="layernorm_before", attention="attention", output_projection="o_proj",
            scaling="scaling", attention_dropout="attention_dropout", mlp_norm="layernorm_after",
            residual_dropout="dropout", unused_prefixes=("pooler.", "classifier."),
            model_kwargs={"add_pooling_layer": False}, image_mean=tuple(IMAGENET_STANDARD_MEAN),
            image_std=tuple(IMAGENET_STANDARD_STD),
        ),
    )
}  # fmt: skip


def supported_checkpoint_types() -> str:
    return ", ".join(
        f"`{model_type}` ({family.name})"
        for family in BACKBONE_FAMILIES.values()
        for model_type in family.checkpoint_model_types
    )


def backbone_family(vision_config: PreTrainedConfig) -> EVLBackboneFamily:
    """The family of a vision tower's config; a `ValueError` naming the type and the supported ones otherwise."""
    model_type = getattr(vision_config, "model_type", None)
    if model_type not in BACKBONE_FAMILIES:
        supported = ", ".join(f"`{key}` ({family.name})" for key, family in BACKBONE_FAMILIES.items())
        raise ValueError(f"EVL has no backbone family for a `{model_type}` vision config; supported: {supported}.")
    return BACKBONE_FAMILIES[model_type]


def vision_tower_config(config):
    """The vision tower's config of a two-tower model's (a whole CLIP or SigLIP config, as `AutoConfig` reads a CLIP
    checkpoint; a config or its dict); any other config as it is."""
    is_dict = isinstance(config, dict)
    model_type = config.get("model_type") if is_dict else getattr(config, "model_type", None)
    family = family_of_checkpoint(model_type)
    if family is None or model_type == family.vision_model_type:
        return config
    if not is_dict:
        return config.vision_config
    return {"model_type": family.vision_model_type, **(config.get("vision_config") or {})}


def family_of_checkpoint(model_type: str | None) -> EVLBackboneFamily | None:
    return next(
        (family for family in BACKBONE_FAMILIES.values() if model_type in family.checkpoint_model_types), None
    )


def checkpoint_model_type(pretrained_model_name_or_path, **hub_kwargs) -> str | None:
    """The `model_type` in a checkpoint's `config.json`; a `ValueError` naming the checkpoint when it has none (a folder
    of videos, a mistyped output folder), where transformers would read an empty configuration, or when it is a file
    (its `config.json`, say), which transformers would read as the config and then load as weights."""
    if os.path.isfile(pretrained_model_name_or_path):
        raise ValueError(
            f"{pretrained_model_name_or_path} is a file: give the checkpoint's folder (with its {CONFIG_NAME} and "
            "weights) or its Hub id."
        )
    config_dict, _ = PreTrainedConfig.get_config_dict(pretrained_model_name_or_path, **hub_file_kwargs(hub_kwargs))
    if not config_dict:
        raise ValueError(f"{pretrained_model_name_or_path}: no {CONFIG_NAME} there, so it is not a model checkpoint.")
    return config_dict.get("model_type")


_HUB_CACHE_FOLDER = re.compile(r"models--(?P<owner>[^/]+?)--(?P<name>[^/]+)")


def hub_repo_id(name_or_path: str | None) -> str | None:
    """
    The Hub id a model came from: the id itself, or the repository of a `huggingface_hub` cache snapshot
    (`.../models--owner--name/snapshots/<revision>`). None for any other local directory: the Hub's `base_model`
    must name a repository, never a local path.
    """
    if not name_or_path:
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    text = str(name_or_path)
    if os.path.exists(text):
        match = _HUB_CACHE_FOLDER.search(Path(text).resolve().as_posix())
        return f"{match['owner']}/{match['name']}" if match else None
    try:
        validate_repo_id(text)
    except HFValidationError:
        return None
    return text


# The loading arguments that locate a checkpoint's files (not those that load a model: `dtype`,
# `attn_implementation`, ...).
HUB_FILE_ARGUMENTS = ("cache_dir", "revision", "token", "local_files_only", "force_download", "proxies", "subfolder")


def hub_file_kwargs(hub_kwargs: dict) -> dict:
    """The arguments of `hub_kwargs` that locate files, for the Hub's file lookups."""
    return {key: value for key, value in hub_kwargs.items() if key in HUB_FILE_ARGUMENTS}


def _image_processor_file(pretrained_model_name_or_path, **hub_kwargs) -> str | None:
    kwargs = hub_file_kwargs(hub_kwargs)
    return cached_file(
        pretrained_model_name_or_path, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False, **kwargs
    )


def has_image_processor(pretrained_model_name_or_path, **hub_kwargs) -> bool:
    """Whether a backbone checkpoint ships its image processor (`preprocessor_config.json`)."""
    return _image_processor_file(pretrained_model_name_or_path, **hub_kwargs) is not None


def processor_crop_size(pretrained_model_name_or_path, **hub_kwargs) -> int | None:
    """The square frames a backbone checkpoint's image processor gives (`preprocessor_config.json`: its crop, or its
    resize without one), if it has one."""
    path = _image_processor_file(pretrained_model_name_or_path, **hub_kwargs)
    if path is None:
        return None
    settings = json.loads(Path(path).read_text())
    # Without a centre crop the frames the processor gives are its resize's.
    crop_size = settings.get("crop_size") if settings.get("do_center_crop", True) else settings.get("size")
    if isinstance(crop_size, dict) and crop_size.get("height") == crop_size.get("width"):
        crop_size = crop_size.get("height")
    return crop_size if isinstance(crop_size, int) else None
