"""EVL over every backbone family: exact features, literal cross-frame maps, loading, saving, refusals."""

import json
import pickle

import numpy as np
import pytest
import torch
from transformers import (
    AutoConfig,
    BitImageProcessor,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    ConvNextConfig,
    ConvNextModel,
    Dinov2Config,
    Dinov2WithRegistersConfig,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
    SiglipVisionConfig,
    ViTConfig,
    modeling_utils,
)
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from evl_hf import EVLConfig, EVLForVideoClassification, EVLVideoProcessor
from evl_hf.backbone_families import BACKBONE_FAMILIES, backbone_family


SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, patch_size=8)
DECODER = dict(num_frames=3, decoder_num_layers=2, decoder_qkv_dim=32, decoder_num_heads=4, num_labels=5)
# (vision config, frame size EVL runs at, tokens before the patches)
FAMILIES = {
    "clip": (CLIPVisionConfig(image_size=32, hidden_act="quick_gelu", **SHAPE), 32, 1),
    "siglip": (SiglipVisionConfig(image_size=32, **SHAPE), 32, 0),
    # DINOv2 declares a larger resolution than it is run at (its processor's crop): its position table is resized.
    "dinov2": (Dinov2Config(image_size=48, **SHAPE), 32, 1),
    "dinov2_with_registers": (Dinov2WithRegistersConfig(image_size=48, num_register_tokens=2, **SHAPE), 32, 3),
    "vit": (ViTConfig(image_size=32, **SHAPE), 32, 1),
}


def save_backbone(directory, vision_config, seed=0):
    """A random tower saved the way the Hub holds one, with an image processor whose crop is EVL's frame size."""
    family = backbone_family(vision_config)
    torch.manual_seed(seed)
    tower = family.build(vision_config)
    with torch.no_grad():
        for parameter in tower.parameters():  # far from the init, so that every tensor matters
            parameter.normal_(0, 0.2)
    tower.save_pretrained(directory)
    return tower


def family_model(tmp_path, name, **fields):
    vision_config, frame_size, _ = FAMILIES[name]
    save_backbone(tmp_path / name, vision_config)
    BitImageProcessor(crop_size={"height": frame_size, "width": frame_size}).save_pretrained(tmp_path / name)
    return EVLForVideoClassification.from_backbone_pretrained(str(tmp_path / name), **DECODER, **fields).eval()


def clip_of(frame_size, batch_size=2, seed=1):
    torch.manual_seed(seed)
    return torch.randn(batch_size, DECODER["num_frames"], 3, frame_size, frame_size)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_features_are_the_backbones_own_hidden_states(tmp_path, name):
    vision_config, frame_size, num_prefix_tokens = FAMILIES[name]
    model = family_model(tmp_path, name)
    assert model.config.frame_size == frame_size and model.config.num_prefix_tokens == num_prefix_tokens
    tower = model.evl.vision_model
    clip = clip_of(frame_size)
    with torch.no_grad():
        features = model.evl.extract_backbone_features(clip)
        hidden_states = tower(pixel_values=clip.flatten(0, 1), output_hidden_states=True).hidden_states
    num_tokens = num_prefix_tokens + (frame_size // SHAPE["patch_size"]) ** 2
    assert features.frame_features.shape == (2, 2, 3, num_tokens, 32)
    for index, block in enumerate((1, 2)):  # the last two of three blocks
        expected = hidden_states[block + 1].view(2, 3, num_tokens, 32)
        assert torch.equal(features.frame_features[:, index], expected), f"block {block}"


@pytest.mark.parametrize("name", list(FAMILIES))
def test_cross_frame_maps_are_recomputed_literally_from_the_blocks_modules(tmp_path, name):
    """Per block: its own pre-attention norm and q/k projections, patch tokens only, softmax over the neighbouring
    frame's patch keys, mean over heads."""
    vision_config, frame_size, num_prefix_tokens = FAMILIES[name]
    model = family_model(tmp_path, name)
    family = backbone_family(vision_config)
    clip = clip_of(frame_size)
    with torch.no_grad():
        maps = model.evl.extract_backbone_features(clip).cross_frame_maps
        inputs = model.evl.vision_model(pixel_values=clip.flatten(0, 1), output_hidden_states=True).hidden_states
        for index, block in enumerate((1, 2)):
            layer = family.blocks(model.evl.vision_model)[block]
            attention = getattr(layer, family.attention)
            normed = getattr(layer, family.attention_norm)(inputs[block])[:, num_prefix_tokens:]
            queries = attention.q_proj(normed).view(2, 3, -1, 4, 8)
            keys = attention.k_proj(normed).view(2, 3, -1, 4, 8)
            for t in range(3):
                for direction, neighbour in ((0, t - 1), (1, t + 1)):
                    found = maps[:, index, t, direction]
                    if not 0 <= neighbour < 3:
                        assert found.abs().sum() == 0
                        continue
                    scores = torch.einsum("bqhd,bkhd->bhqk", queries[:, t], keys[:, neighbour]) / 8**0.5
                    torch.testing.assert_close(found, scores.softmax(-1).mean(1), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["siglip", "dinov2_with_registers", "vit"])
def test_save_load_and_frozen_training(tmp_path, name):
    _, frame_size, _ = FAMILIES[name]
    model = family_model(tmp_path, name)
    assert not any(parameter.requires_grad for parameter in model.evl.vision_model.parameters())
    backbone_before = {key: value.clone() for key, value in model.evl.vision_model.state_dict().items()}
    model.train()
    assert not model.evl.vision_model.training
    clip = clip_of(frame_size)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = model(clip, labels=torch.tensor([0, 3])).loss
    loss.backward()
    optimizer.step()
    assert all(torch.equal(value, backbone_before[key]) for key, value in model.evl.vision_model.state_dict().items())
    model.eval()
    model.save_pretrained(tmp_path / "evl")
    saved = json.loads((tmp_path / "evl" / "config.json").read_text())
    assert saved["vision_config"]["model_type"] == FAMILIES[name][0].model_type
    reloaded = EVLForVideoClassification.from_pretrained(tmp_path / "evl").eval()
    assert type(reloaded.evl.vision_model) is type(model.evl.vision_model)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(clip).logits, model(clip).logits, atol=0, rtol=0)
        # Pickled whole (`torch.save(model)`), with the backbone's output recorders.
        expected = model(clip, output_attentions=True)
        unpickled = pickle.loads(pickle.dumps(model))(clip, output_attentions=True)
        torch.testing.assert_close(unpickled.logits, expected.logits, atol=0, rtol=0)
        torch.testing.assert_close(unpickled.attentions, expected.attentions, atol=0, rtol=0)


@pytest.mark.parametrize(
    "full_model, config",
    [
        (CLIPModel, CLIPConfig(vision_config=dict(image_size=32, **SHAPE), text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2), projection_dim=8)),
        (SiglipModel, SiglipConfig(vision_config=dict(image_size=32, **SHAPE), text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))),
    ],
)  # fmt: skip
def test_a_two_tower_checkpoint_gives_its_vision_tower(tmp_path, full_model, config):
    torch.manual_seed(0)
    full = full_model(config)
    with torch.no_grad():
        for parameter in full.parameters():
            parameter.normal_(0, 0.2)
    full.save_pretrained(tmp_path / "full")
    with CaptureLogger(logging.get_logger(modeling_utils.__name__)) as report:
        model = EVLForVideoClassification.from_backbone_pretrained(str(tmp_path / "full"), **DECODER)
    # The text tower is left out on purpose: transformers' report does not list it tensor by tensor as UNEXPECTED.
    assert "UNEXPECTED" not in report.out
    expected = full.vision_model.state_dict()
    loaded = model.evl.vision_model.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[key], expected[key]) for key in expected)


def test_dinov2_runs_at_its_processors_crop_or_at_image_size(tmp_path):
    model = family_model(tmp_path, "dinov2")
    assert model.config.image_size == 32 and model.config.patch_grid == (4, 4)
    table = model.evl.decoder.layers[0].cross_frame_attention.previous_frame_table
    assert table.shape == (7 * 7, 32)
    other = EVLForVideoClassification.from_backbone_pretrained(str(tmp_path / "dinov2"), image_size=48, **DECODER)
    assert other.config.patch_grid == (6, 6)
    # A complete `config=` built from the backbone's (as the error on a config for another backbone says) runs at the
    # crop too, the frames the backbone's processor gives, unless it sets `image_size`.
    for image_size, patch_grid in ((None, (4, 4)), (48, (6, 6))):
        config = EVLConfig(vision_config=AutoConfig.from_pretrained(tmp_path / "dinov2"), image_size=image_size, **DECODER)
        other = EVLForVideoClassification.from_backbone_pretrained(str(tmp_path / "dinov2"), config=config)
        assert other.config.patch_grid == patch_grid
        # The caller's config is left as given (another backbone built from it would take this one's crop).
        assert config.image_size == image_size and other.config is not config
    with pytest.raises(ValueError, match="position embeddings are not interpolated"):
        EVLConfig(vision_config=FAMILIES["clip"][0], image_size=48, **DECODER)


def test_a_dinov2_processor_at_another_image_size_gives_the_models_frames(tmp_path):
    # The model at `image_size=48` and its processor from the backbone's (a 32 crop of a 224 short side): the crop
    # becomes the model's frame size and the resize is scaled by as much, as DINOv2 users run it at 448.
    model = family_model(tmp_path, "dinov2", image_size=48)
    processor = EVLVideoProcessor.from_backbone_pretrained(str(tmp_path / "dinov2"), image_size=48, num_frames=4)
    assert processor.crop_size.height == processor.crop_size.width == 48
    assert processor.size.shortest_edge == round(224 * 48 / 32)
    frames = np.random.default_rng(0).integers(0, 255, (8, 60, 80, 3), dtype=np.uint8)
    with torch.no_grad():
        model(**processor(frames, return_tensors="pt"))  # the frames it was built for
    assert EVLVideoProcessor.from_backbone_pretrained(str(tmp_path / "dinov2"), image_size=32).crop_size.height == 32


def test_an_unsupported_backbone_is_refused_naming_its_type(tmp_path):
    ConvNextModel(ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1])).save_pretrained(tmp_path / "convnext")
    with pytest.raises(ValueError, match="`convnext` checkpoint") as error:
        EVLForVideoClassification.from_backbone_pretrained(str(tmp_path / "convnext"), **DECODER)
    for model_type in ("clip_vision_model", "siglip", "dinov2", "dinov2_with_registers", "vit"):
        assert f"`{model_type}`" in str(error.value)
    SiglipImageProcessor().save_pretrained(tmp_path / "not-a-model")
    with pytest.raises((ValueError, OSError), match="not-a-model"):
        EVLForVideoClassification.from_backbone_pretrained(str(tmp_path / "not-a-model"), **DECODER)
    with pytest.raises(ValueError, match="no backbone family for a `convnext`"):
        backbone_family(ConvNextConfig())


def test_every_family_is_covered_here():
    assert {config.model_type for config, _, _ in FAMILIES.values()} == set(BACKBONE_FAMILIES)


@pytest.mark.parametrize("name", ["vit", "dinov2", "siglip", "clip"])
def test_an_image_classification_checkpoint_gives_its_tower_without_the_head(tmp_path, name):
    """`google/vit-base-patch16-224`, DeiT and DINOv2's ImageNet models are `*ForImageClassification` (CLIP and
    SigLIP have one too): the tower is loaded (under `vit.` / `dinov2.` / `vision_model.`), the classifier is not."""
    from transformers import (
        CLIPForImageClassification,
        Dinov2ForImageClassification,
        SiglipForImageClassification,
        ViTForImageClassification,
    )

    vision_config = FAMILIES[name][0]
    torch.manual_seed(0)
    if name in ("siglip", "clip"):
        text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
        config_class, model_class = {
            "siglip": (SiglipConfig, SiglipForImageClassification), "clip": (CLIPConfig, CLIPForImageClassification)
        }[name]  # fmt: skip
        config = config_class(vision_config=vision_config.to_dict(), text_config=text, num_labels=7)
        classifier, prefix = model_class(config), "vision_model."
    else:
        config = vision_config.__class__(**{**vision_config.to_dict(), "num_labels": 7})
        model_class = ViTForImageClassification if name == "vit" else Dinov2ForImageClassification
        classifier, prefix = model_class(config), f"{name}."
    classifier.save_pretrained(tmp_path / name)
    model = EVLForVideoClassification.from_backbone_pretrained(str(tmp_path / name), **DECODER)
    tower = {key[len(prefix) :]: value for key, value in classifier.state_dict().items() if key.startswith(prefix)}
    loaded = model.evl.vision_model.state_dict()
    assert loaded.keys() == tower.keys()
    assert all(torch.equal(loaded[key], tower[key]) for key in tower)


def test_a_processor_from_the_model_config_uses_the_familys_normalisation():
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_STANDARD_MEAN, OPENAI_CLIP_MEAN

    from evl_hf import EVLVideoProcessor

    for preset, mean in (("k400-vit-b16-8f", OPENAI_CLIP_MEAN), ("siglip-b16-224-8f", IMAGENET_STANDARD_MEAN),
                         ("dinov2-b14-224-8f", IMAGENET_DEFAULT_MEAN)):  # fmt: skip
        processor = EVLVideoProcessor.from_model_config(EVLConfig.from_preset(preset), preset=preset)
        assert list(processor.image_mean) == pytest.approx(list(mean)), preset
        assert processor.crop_size["height"] == 224


def test_an_unsupported_vision_config_is_refused_by_name():
    with pytest.raises(ValueError, match="no backbone family for a `convnext`"):
        EVLConfig(vision_config=ConvNextConfig())


def test_a_vit_config_with_sizes_as_pairs_runs_square_and_names_a_non_square_one(tmp_path):
    # ViTConfig takes (height, width) pairs: EVLConfig failed on them with a bare TypeError (tuple % int).
    shape = {key: value for key, value in SHAPE.items() if key != "patch_size"}
    torch.manual_seed(0)
    square = EVLForVideoClassification(
        EVLConfig(vision_config=ViTConfig(image_size=(32, 32), patch_size=(8, 8), **shape), **DECODER)
    ).eval()
    assert (square.config.frame_size, square.config.patch_grid) == (32, (4, 4))
    with torch.no_grad():
        assert square(torch.randn(1, 3, 3, 32, 32)).logits.shape == (1, 5)
    # A saved tower's config.json holds the pairs as lists, the same sizes: `config=` of either form fits it.
    square.evl.vision_model.save_pretrained(tmp_path / "vit")
    for vision in (square.config.vision_config, ViTConfig(image_size=32, patch_size=8, **shape)):
        EVLForVideoClassification.from_backbone_pretrained(
            str(tmp_path / "vit"), config=EVLConfig(vision_config=vision, **DECODER)
        )
    for sizes, field in (({"image_size": (32, 48), "patch_size": 8}, "image_size"),
                         ({"image_size": 32, "patch_size": (8, 4)}, "patch_size")):  # fmt: skip
        with pytest.raises(ValueError, match=rf"`vision_config.{field}` .* a square"):
            EVLConfig(vision_config=ViTConfig(**sizes, **shape), **DECODER)


def test_a_dinov2_processor_without_a_crop_sets_the_frame_size_from_its_resize(tmp_path):
    vision_config = FAMILIES["dinov2"][0]
    save_backbone(tmp_path / "dinov2", vision_config)
    BitImageProcessor(do_center_crop=False, size={"height": 40, "width": 40}).save_pretrained(tmp_path / "dinov2")
    model = EVLForVideoClassification.from_backbone_pretrained(str(tmp_path / "dinov2"), **DECODER)
    assert model.config.frame_size == 40 and model.config.patch_grid == (5, 5)


@pytest.mark.parametrize("name", ["siglip", "dinov2_with_registers"])
def test_low_precision_backbone_multi_view_and_other_frame_counts(tmp_path, name):
    _, frame_size, _ = FAMILIES[name]
    model = family_model(tmp_path, name)
    clip = clip_of(frame_size)
    with torch.no_grad():
        reference = model(clip).logits
        # Views: the same clip twice is the clip; 5 frames on a 3-frame model interpolate the position embeddings.
        views = model(torch.stack([clip, clip], dim=1)).logits
        longer = model(clip_of(frame_size, seed=2).repeat_interleave(2, dim=1)[:, :5]).logits
    torch.testing.assert_close(views, reference.log_softmax(-1), atol=1e-5, rtol=1e-5)
    assert longer.shape == reference.shape and torch.isfinite(longer).all()
    for dtype, tolerance in (("bfloat16", 5e-2), ("float16", 5e-3)):
        low = family_model(tmp_path / dtype, name, backbone_dtype=dtype)
        assert low.evl.vision_model.dtype == getattr(torch, dtype)
        with torch.no_grad():
            torch.testing.assert_close(low(clip).logits, reference, atol=tolerance, rtol=0)


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_(en|dis)able` is deprecated:FutureWarning")
def test_a_trained_backbone_checkpoints_to_the_same_gradients_and_trains_only_what_runs(tmp_path, name):
    """Every trainable tensor gets a gradient (DDP without `find_unused_parameters`, which Trainer turns off under
    gradient checkpointing, refuses any that does not), and checkpointing the backbone's blocks changes nothing."""
    _, frame_size, _ = FAMILIES[name]
    model = family_model(tmp_path, name, freeze_backbone=False).train()
    family = backbone_family(model.config.vision_config)
    frozen = {f"evl.vision_model.{n}" for n in family.unused_parameters(model.evl.vision_model)}
    assert frozen and all(not p.requires_grad for n, p in model.named_parameters() if n in frozen)
    clip, labels = clip_of(frame_size), torch.tensor([0, 3])
    calls = []
    family.blocks(model.evl.vision_model)[-1].mlp.register_forward_pre_hook(lambda *_: calls.append(1))

    def gradients():
        model.zero_grad()
        torch.manual_seed(0)  # the same dropout masks (DINOv2's drop path, SigLIP's none) in both runs
        model(clip, labels=labels).loss.backward()
        found = {n: p.grad for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
        assert found.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
        return found

    expected = gradients()
    model.gradient_checkpointing_enable({"use_reentrant": False})
    calls.clear()
    checkpointed = gradients()
    assert len(calls) == 2  # the last block ran again in the backward
    for key, gradient in expected.items():
        scale = max(1.0, gradient.abs().max().item())
        torch.testing.assert_close(checkpointed[key], gradient, atol=2e-6 * scale, rtol=1e-5, msg=lambda m: f"{key}\n{m}")


@pytest.mark.parametrize("name", ["siglip", "dinov2", "vit"])
def test_the_auto_classes_load_every_family(tmp_path, name):
    from transformers import AutoConfig, AutoModel, AutoModelForVideoClassification, AutoVideoProcessor

    from evl_hf import EVLModel, EVLVideoProcessor

    _, frame_size, _ = FAMILIES[name]
    model = family_model(tmp_path, name)
    EVLVideoProcessor.from_backbone_pretrained(str(tmp_path / name)).save_pretrained(tmp_path / "evl")
    model.save_pretrained(tmp_path / "evl")
    config = AutoConfig.from_pretrained(tmp_path / "evl")
    assert isinstance(config, EVLConfig) and config.vision_config.model_type == FAMILIES[name][0].model_type
    classifier = AutoModelForVideoClassification.from_pretrained(tmp_path / "evl").eval()
    base = AutoModel.from_pretrained(tmp_path / "evl").eval()
    assert isinstance(classifier, EVLForVideoClassification) and isinstance(base, EVLModel)
    processor = AutoVideoProcessor.from_pretrained(tmp_path / "evl")
    assert isinstance(processor, EVLVideoProcessor) and processor.crop_size.height == frame_size
    clip = clip_of(frame_size)
    with torch.no_grad():
        assert torch.equal(classifier(clip).logits, model(clip).logits)
        assert torch.equal(base(clip).last_hidden_state, model.evl(clip).last_hidden_state)
