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
"""EVL model configuration."""

# Imported first: where transformers is older than EVL needs, it says so before the imports below fail.
from .transformers_requirement import TRANSFORMERS_REQUIREMENT  # noqa: F401  # isort: skip
from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, CLIPVisionConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .backbone_families import backbone_family, vision_tower_config


# The public OpenAI CLIP vision towers the authors built on. Kept here so that presets work offline.
_CLIP_VISION_SHAPES = {
    "openai/clip-vit-base-patch16": dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=16,
        image_size=224, projection_dim=512,
    ),
    "openai/clip-vit-large-patch14": dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14,
        image_size=224, projection_dim=768,
    ),
    "openai/clip-vit-large-patch14-336": dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14,
        image_size=336, projection_dim=768,
    ),
}  # fmt: skip
# Other families' public towers (transformers' defaults for the rest of their configs), for the presets below.
_OTHER_VISION_SHAPES = {
    "google/siglip-base-patch16-224": ("siglip_vision_model", dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=16,
        image_size=224,
    )),
    "facebook/dinov2-base": ("dinov2", dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, patch_size=14, image_size=518,
    )),
}  # fmt: skip

# Released (and paper) configurations. `sampling_rate` and the view counts describe the authors' evaluation protocol
# and are consumed by the video processor, not by the model.
EVL_PRESETS = {
    "k400-vit-b16-8f": dict(backbone="openai/clip-vit-base-patch16", num_labels=400, num_frames=8, sampling_rate=16, decoder_qkv_dim=768, decoder_num_heads=12, num_spatial_views=1, num_temporal_views=3),
    "k400-vit-b16-16f": dict(backbone="openai/clip-vit-base-patch16", num_labels=400, num_frames=16, sampling_rate=16, decoder_qkv_dim=768, decoder_num_heads=12, num_spatial_views=3, num_temporal_views=1),
    "k400-vit-b16-32f": dict(backbone="openai/clip-vit-base-patch16", num_labels=400, num_frames=32, sampling_rate=8, decoder_qkv_dim=768, decoder_num_heads=12, num_spatial_views=3, num_temporal_views=1),
    "k400-vit-l14-8f": dict(backbone="openai/clip-vit-large-patch14", num_labels=400, num_frames=8, sampling_rate=16, decoder_qkv_dim=1024, decoder_num_heads=16, num_spatial_views=1, num_temporal_views=3),
    "k400-vit-l14-16f": dict(backbone="openai/clip-vit-large-patch14", num_labels=400, num_frames=16, sampling_rate=16, decoder_qkv_dim=1024, decoder_num_heads=16, num_spatial_views=3, num_temporal_views=1),
    "k400-vit-l14-32f": dict(backbone="openai/clip-vit-large-patch14", num_labels=400, num_frames=32, sampling_rate=8, decoder_qkv_dim=1024, decoder_num_heads=16, num_spatial_views=3, num_temporal_views=1),
    # Reported in the paper, never released.
    "k400-vit-l14-336-32f": dict(backbone="openai/clip-vit-large-patch14-336", num_labels=400, num_frames=32, sampling_rate=8, decoder_qkv_dim=1024, decoder_num_heads=16, num_spatial_views=3, num_temporal_views=1),
    # The authors advise 12 decoder layers for Something-Something v2 (174 classes); no weights were released.
    "ssv2-vit-b16-8f-dec12": dict(backbone="openai/clip-vit-base-patch16", num_frames=8, sampling_rate=16, decoder_qkv_dim=768, decoder_num_heads=12, decoder_num_layers=12, num_labels=174, num_spatial_views=3, num_temporal_views=1),
    # The ViT-B/16 8-frame recipe on the other families' base towers (no EVL weights exist for them); DINOv2-B/14
    # runs at 224 (a 16x16 patch grid).
    "siglip-b16-224-8f": dict(backbone="google/siglip-base-patch16-224", num_frames=8, sampling_rate=16, decoder_qkv_dim=768, decoder_num_heads=12, num_spatial_views=1, num_temporal_views=3),
    "dinov2-b14-224-8f": dict(backbone="facebook/dinov2-base", image_size=224, num_frames=8, sampling_rate=16, decoder_qkv_dim=768, decoder_num_heads=12, num_spatial_views=1, num_temporal_views=3),
}  # fmt: skip

_PROCESSOR_PRESET_KEYS = ("backbone", "sampling_rate", "num_spatial_views", "num_temporal_views")

# The auto classes of the models in `modeling_evl.py`. Saving a model writes only its own class into `auto_map`; a
# checkpoint's remote code (`trust_remote_code=True`) holds both, so both are listed.
_AUTO_MODEL_CLASSES = {"AutoModel": "EVLModel", "AutoModelForVideoClassification": "EVLForVideoClassification"}


def square_side(vision_config, name: str) -> int:
    """`vision_config.<name>` (`image_size`, `patch_size`) as one side: ViT's config also takes a (height, width)
    pair, which must be square, since EVL's cross-frame offset tables are built for a square patch grid."""
    value = getattr(vision_config, name)
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(
                f"`vision_config.{name}` is {tuple(value)}: EVL reads frames of a square patch grid, so it must be a "
                "square (one number, or a pair of equal ones)."
            )
        return int(value[0])
    return value


@strict
class EVLConfig(PreTrainedConfig):
    r"""
    Configuration of an EVL video classifier ("Frozen CLIP Models are Efficient Video Learners", Lin et al., ECCV
    2022): a frozen CLIP ViT image encoder run on every frame, and a light Transformer decoder whose single learned
    query cross-attends, block by block, to the frame features of the last `decoder_num_layers` backbone blocks.

    Args:
        vision_config (`PreTrainedConfig` or `dict`, *optional*):
            Configuration of the image backbone: a `CLIPVisionConfig` (the default when none is given: ViT-B/16
            shaped; a dict takes transformers' defaults for the fields it leaves out), a `SiglipVisionConfig`, a
            `Dinov2Config`, a `Dinov2WithRegistersConfig` or a `ViTConfig` (a dict names its `model_type`); of a whole
            CLIP or SigLIP config, its vision tower's. See `evl_hf.backbone_families`.
        image_size (`int`, *optional*):
            Resolution of the frames the backbone reads. Defaults to the backbone's `image_size`. Only backbones that
            interpolate their position embeddings (DINOv2) may differ from it: DINOv2 checkpoints declare 518 and are
            used at 224.
        num_frames (`int`, *optional*, defaults to 8):
            Frames per clip the model is trained with. It sizes the temporal position embeddings; clips with another
            frame count still work (the embeddings are linearly interpolated along time).
        decoder_num_layers (`int`, *optional*, defaults to 4):
            Decoder layers. Decoder layer `i` reads backbone block `L - decoder_num_layers + i`, so this is also the
            number of backbone blocks whose features are used. At most the backbone's depth.
        decoder_qkv_dim (`int`, *optional*, defaults to 768):
            Width of the decoder attention's query/key/value projections.
        decoder_num_heads (`int`, *optional*, defaults to 12):
            Attention heads of the decoder; must divide `decoder_qkv_dim`.
        decoder_mlp_factor (`float`, *optional*, defaults to 4.0):
            Hidden width of the decoder MLP as a multiple of the backbone width (rounded to an integer).
        decoder_mlp_dropout (`float`, *optional*, defaults to 0.5):
            Dropout inside the decoder MLP.
        classifier_dropout (`float`, *optional*, defaults to 0.5):
            Dropout between the final LayerNorm and the classification layer.
        use_temporal_conv (`bool`, *optional*, defaults to `True`):
            Add a depthwise temporal convolution (kernel 3) of the frame features to the decoder's keys/values.
        use_temporal_pos_embed (`bool`, *optional*, defaults to `True`):
            Add learned per-frame position embeddings to the decoder's keys/values.
        use_temporal_cross_attention (`bool`, *optional*, defaults to `True`):
            Add the cross-frame attention feature (attention maps between neighbouring frames, turned into features
            through learned relative-offset tables) to the decoder's keys/values.
        freeze_backbone (`bool`, *optional*, defaults to `True`):
            Keep the image backbone frozen: its tensors do not require gradients, it stays in eval mode and runs
            without autograd, unless something in it asks for a gradient (its input, e.g. for a saliency map, or
            tensors made trainable by hand or by PEFT adapters, which then train in eval mode, without gradient
            checkpointing). Set to `False` to fine-tune end to end.
        backbone_dtype (`str`, *optional*):
            Run the frozen backbone in `"float16"` or `"bfloat16"` (as the authors run it in fp16) while the decoder's
            parameters keep the model's dtype (float32 by default). The cross-frame maps' scores are computed in the
            backbone's dtype (softmax and head mean in float32); at inference, with a float32 decoder, the
            cross-frame module computes in it too, while the rest of the decoder and training stay in the decoder's
            dtype. `"auto"` picks bfloat16 where the hardware runs it natively (CUDA with bf16, the GPU deciding when
            one is visible; CPUs with AMX or AVX-512 BF16) for a float32 model, and the model's dtype elsewhere,
            decided when the model is built. `None` keeps the backbone in the model's dtype.
            Only with `freeze_backbone=True`.
        layer_norm_eps (`float`, *optional*, defaults to 1e-05):
            Epsilon of the decoder and head LayerNorms.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialiser of the classification layer.

    Example:

    ```python
    >>> from evl_hf import EVLConfig, EVLForVideoClassification

    >>> configuration = EVLConfig(num_labels=400)
    >>> model = EVLForVideoClassification(configuration)
    >>> configuration = model.config
    ```"""

    model_type = "evl"
    # The default backbone is the recipe's ViT-B/16 (transformers' `CLIPVisionConfig` defaults to B/32).
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="clip_vision_model",
            init_kwargs=dict(hidden_act="quick_gelu", **_CLIP_VISION_SHAPES["openai/clip-vit-base-patch16"]),
        )
    }

    vision_config: dict | PreTrainedConfig | None = None
    image_size: int | None = None
    num_frames: int = 8
    decoder_num_layers: int = 4
    decoder_qkv_dim: int = 768
    decoder_num_heads: int = 12
    decoder_mlp_factor: float | int = 4.0
    decoder_mlp_dropout: float | int = 0.5
    classifier_dropout: float | int = 0.5
    use_temporal_conv: bool = True
    use_temporal_pos_embed: bool = True
    use_temporal_cross_attention: bool = True
    freeze_backbone: bool = True
    backbone_dtype: str | None = None
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        # A whole CLIP or SigLIP config (`AutoConfig` of such a checkpoint) gives its vision tower's, the backbone.
        self.vision_config = vision_tower_config(self.vision_config)
        super().__post_init__(**kwargs)
        self.check_architecture()

    def validate_architecture(self):
        """Part of `@strict` validation (`validate()`, run by `save_pretrained`): a field set after the config was
        built (`from_pretrained` sets its keyword arguments so) is checked too."""
        super().validate_architecture()
        self.check_architecture()

    def check_architecture(self):
        """Raise a `ValueError` naming the field when the model cannot be built from this configuration."""
        vision = self.vision_config
        family = backbone_family(vision) if vision is not None else None  # first: an unsupported config is named
        if self.num_frames < 1:
            raise ValueError(f"`num_frames` must be at least 1, got {self.num_frames}.")
        if self.decoder_num_layers < 1:
            raise ValueError(f"`decoder_num_layers` must be at least 1, got {self.decoder_num_layers}.")
        if vision is not None and self.decoder_num_layers > vision.num_hidden_layers:
            raise ValueError(
                f"`decoder_num_layers` ({self.decoder_num_layers}) cannot exceed the backbone's number of layers "
                f"(`vision_config.num_hidden_layers` = {vision.num_hidden_layers}): each decoder layer reads one "
                "backbone block."
            )
        if self.decoder_qkv_dim < 1 or self.decoder_num_heads < 1:
            raise ValueError(
                f"`decoder_qkv_dim` ({self.decoder_qkv_dim}) and `decoder_num_heads` ({self.decoder_num_heads}) must "
                "be positive."
            )
        if self.decoder_qkv_dim % self.decoder_num_heads != 0:
            raise ValueError(
                f"`decoder_qkv_dim` ({self.decoder_qkv_dim}) must be divisible by `decoder_num_heads` "
                f"({self.decoder_num_heads})."
            )
        if self.backbone_dtype not in (None, "float32", "float16", "bfloat16", "auto"):
            raise ValueError(
                "`backbone_dtype` must be None, 'float32', 'float16', 'bfloat16' or 'auto', got "
                f"{self.backbone_dtype!r}."
            )
        if self.backbone_dtype not in (None, "float32") and not self.freeze_backbone:
            raise ValueError("`backbone_dtype` lowers the precision of a frozen backbone only; set freeze_backbone=True.")
        if self.decoder_mlp_factor <= 0:
            raise ValueError(f"`decoder_mlp_factor` must be positive, got {self.decoder_mlp_factor}.")
        for name in ("decoder_mlp_dropout", "classifier_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"`{name}` must be in [0, 1), got {value}.")
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"`image_size` must be at least 1, got {self.image_size}.")
        if vision is not None:
            if vision.hidden_size % vision.num_attention_heads != 0:
                raise ValueError(
                    f"`vision_config.hidden_size` ({vision.hidden_size}) must be divisible by "
                    f"`vision_config.num_attention_heads` ({vision.num_attention_heads})."
                )
            for name in ("image_size", "patch_size"):
                square_side(vision, name)  # a (height, width) pair must be square
            if self.image_size is not None and self.image_size != square_side(vision, "image_size"):
                if not family.interpolates_position_embeddings:
                    raise ValueError(
                        f"`image_size` ({self.image_size}) differs from the {family.name} backbone's "
                        f"(`vision_config.image_size` = {vision.image_size}), whose position embeddings are not "
                        "interpolated: leave `image_size` unset."
                    )
            if self.frame_size % square_side(vision, "patch_size") != 0:
                raise ValueError(
                    f"The frame size ({self.frame_size}) must be a multiple of `vision_config.patch_size` "
                    f"({vision.patch_size}) for the cross-frame attention's patch grid."
                )

    def to_dict(self) -> dict:
        output = super().to_dict()
        auto_map = output.get("auto_map")
        if isinstance(auto_map, dict):
            # A saved model's remote code module ("modeling_evl", or "repo--modeling_evl" once loaded from the Hub)
            # serves every EVL model class.
            modules = [
                auto_map[auto_class].rpartition(".")[0]
                for auto_class, name in _AUTO_MODEL_CLASSES.items()
                if isinstance(auto_map.get(auto_class), str) and auto_map[auto_class].endswith(f".{name}")
            ]
            if modules:
                for auto_class, name in _AUTO_MODEL_CLASSES.items():
                    auto_map.setdefault(auto_class, f"{modules[0]}.{name}")
        return output

    @property
    def frame_size(self) -> int:
        """Height and width of the frames the backbone reads (`image_size`, or the backbone's)."""
        return self.image_size if self.image_size is not None else square_side(self.vision_config, "image_size")

    @property
    def patch_grid(self) -> tuple[int, int]:
        """(height, width) of the backbone's patch grid."""
        side = self.frame_size // square_side(self.vision_config, "patch_size")
        return side, side

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens each frame has before its patches: the class token (none for SigLIP) and any registers."""
        return backbone_family(self.vision_config).num_prefix_tokens(self.vision_config)

    @classmethod
    def from_preset(cls, name: str, vision_config: CLIPVisionConfig | None = None, **kwargs) -> "EVLConfig":
        """
        Build the configuration of one of the authors' released (or paper) models, see `EVL_PRESETS`. The backbone
        shape comes from the preset unless `vision_config` is given; `kwargs` override any field (an `id2label` the
        preset's `num_labels` too).
        """
        if name not in EVL_PRESETS:
            raise ValueError(f"Unknown EVL preset {name!r}; choose one of {sorted(EVL_PRESETS)}.")
        preset = dict(EVL_PRESETS[name])
        backbone = preset["backbone"]
        for key in _PROCESSOR_PRESET_KEYS:
            preset.pop(key)
        if vision_config is None and backbone in _CLIP_VISION_SHAPES:
            vision_config = CLIPVisionConfig(hidden_act="quick_gelu", **_CLIP_VISION_SHAPES[backbone])
        elif vision_config is None:
            model_type, shape = _OTHER_VISION_SHAPES[backbone]
            vision_config = AutoConfig.for_model(model_type, **shape)
        if kwargs.get("id2label") is not None:
            # The labels given make the head (transformers would otherwise keep the preset's count and rename them).
            preset.pop("num_labels", None)
        preset.update(kwargs)
        return cls(vision_config=vision_config, **preset)


__all__ = ["EVLConfig", "EVL_PRESETS"]
