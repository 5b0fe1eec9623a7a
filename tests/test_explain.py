"""`evl_hf.explain`: the decoder query's attention as maps over the frames the model read, the PNG / GIF, the CLI."""

import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    index_coded_frames,
    randomize_decoder,
    run_without_packages,
    save_tiny_backbone,
    small_processor,
    write_clip,
)
from PIL import Image
from transformers import CLIPVisionConfig, Dinov2WithRegistersConfig, SiglipVisionConfig

from evl_hf import (
    EVLConfig,
    EVLExplanation,
    EVLForVideoClassification,
    EVLVideoDecodingError,
    EVLVideoProcessor,
    explain,
    sample_frame_indices,
)
from evl_hf.backbone_families import backbone_family
from evl_hf.explain import (
    COLORMAP,
    OVERLAY_ALPHA,
    attention_maps,
    in_evaluation_mode,
    main,
    overlay_heatmap,
    top_predictions,
)


LABELS = {i: name for i, name in enumerate(["left", "right", "up", "down", "still"])}
SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, patch_size=8)
# (vision config, tokens before the patches); every one runs at 32x32 frames, a 4x4 patch grid.
FAMILIES = {
    "clip": (CLIPVisionConfig(image_size=32, hidden_act="quick_gelu", **SHAPE), 1),
    "siglip": (SiglipVisionConfig(image_size=32, **SHAPE), 0),
    "dinov2_with_registers": (Dinov2WithRegistersConfig(image_size=48, num_register_tokens=2, **SHAPE), 3),
}


def family_model(name: str) -> EVLForVideoClassification:
    torch.manual_seed(0)
    config = EVLConfig(
        vision_config=FAMILIES[name][0], image_size=32, num_frames=4, decoder_num_layers=2, decoder_qkv_dim=32,
        decoder_num_heads=4, num_labels=5, id2label=LABELS, label2id={v: k for k, v in LABELS.items()},
    )  # fmt: skip
    model = EVLForVideoClassification(config).eval()
    # Far from the zero-initialised query, so that the attention is far from uniform.
    randomize_decoder(model, scale=1.0)
    return model


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory) -> Path:
    return write_clip(tmp_path_factory.mktemp("clips") / "coded.mp4", index_coded_frames(40))


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    """A tiny CLIP EVL built the way a user builds one, saved with its video processor."""
    root = tmp_path_factory.mktemp("explain")
    backbone = save_tiny_backbone(root / "clip-tiny")
    torch.manual_seed(0)
    model = EVLForVideoClassification.from_backbone_pretrained(
        str(backbone), num_frames=4, decoder_num_layers=2, decoder_qkv_dim=32, decoder_num_heads=4,
        id2label=LABELS, label2id={v: k for k, v in LABELS.items()},
    )  # fmt: skip
    randomize_decoder(model, scale=1.0)
    model.save_pretrained(root / "evl")
    small_processor().save_pretrained(root / "evl")
    return root / "evl"


def literal_attention(model: EVLForVideoClassification, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """
    Per decoder layer, the query's head-averaged attention as a (frames, tokens) array, computed from the layer's
    own modules on the (batch, frames, tokens, hidden) memory: keys projected per token (not folded into the query),
    softmax over all frames and tokens, no flattening of the memory to rely on.
    """
    evl = model.evl
    with torch.no_grad():
        features = evl.extract_backbone_features(pixel_values)
        queries = model(pixel_values, output_hidden_states=True).hidden_states  # the query before each layer
        weights = []
        for index, layer in enumerate(evl.decoder.layers):
            frame_features = features.frame_features[:, index]
            num_frames = frame_features.shape[1]
            memory = frame_features + layer.temporal_conv(frame_features)
            memory = memory + layer.temporal_position_embedding(num_frames)[:, None, :]
            memory = memory + layer.cross_frame_attention(features.cross_frame_maps[:, index])
            attention = layer.cross_attention
            keys = attention.k_proj(layer.frame_layernorm(memory)).unflatten(-1, (attention.num_heads, -1))
            query = attention.q_proj(layer.query_layernorm(queries[index]))[:, 0]
            query = query.unflatten(-1, (attention.num_heads, -1))
            scores = torch.einsum("bhd,btnhd->bhtn", query, keys) * attention.scaling
            probabilities = scores.flatten(2).softmax(-1).view_as(scores)
            weights.append(probabilities.mean(1)[0])
    return weights


def test_attention_maps_place_each_weight_on_its_frame_row_and_column():
    """One-hot weights on a 2x3 grid with 2 prefix tokens: a frames-major / row-major mistake moves them."""
    num_frames, prefix, grid = 3, 2, (2, 3)
    num_tokens = prefix + 6
    first, second = torch.zeros(1, 2, 1, num_frames * num_tokens), torch.zeros(1, 2, 1, num_frames * num_tokens)
    first[0, :, 0, 2 * num_tokens + prefix + 1 * 3 + 0] = 1  # both heads: frame 2, row 1, column 0
    second[0, 0, 0, 1 * num_tokens + 1] = 1  # head 0: frame 1's second prefix token
    second[0, 1, 0, 0 * num_tokens + prefix + 0 * 3 + 2] = 1  # head 1: frame 0, row 0, column 2
    maps, prefix_share = attention_maps([first, second], num_frames, prefix, grid)
    assert maps.shape == (1, 2, num_frames, *grid) and prefix_share.shape == (1, 2)
    expected = np.zeros((2, num_frames, *grid))
    expected[0, 2, 1, 0] = 1
    expected[1, 0, 0, 2] = 0.5
    np.testing.assert_array_equal(maps[0], expected)
    np.testing.assert_array_equal(prefix_share[0], [0, 0.5])
    with pytest.raises(ValueError, match="3 frames x 8 tokens"):
        attention_maps([first[..., :-1]], num_frames, prefix, grid)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_backbone_patch_tokens_are_row_major_after_the_prefix(name):
    """What the maps assume of every family: pixels in patch (row, column) feed token prefix + row * width + column."""
    model = family_model(name)
    frames = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    changed = frames.clone()
    changed[..., 0:8, 24:32] += 1  # patch row 0, column 3 of the 4x4 grid
    family, tower = backbone_family(model.config.vision_config), model.evl.vision_model
    with torch.no_grad():
        difference = (family.embed(tower, changed) - family.embed(tower, frames)).abs().sum(-1)[0]
    assert torch.nonzero(difference > 1e-6).flatten().tolist() == [FAMILIES[name][1] + 0 * 4 + 3]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_maps_are_the_decoder_attention_computed_literally(name, clip_path):
    model = family_model(name)
    processor = EVLVideoProcessor.from_model_config(model.config, sampling_rate=3)
    explanation = explain(model, processor, str(clip_path), top_k=5)
    prefix = FAMILIES[name][1]
    pixel_values = processor(str(clip_path), return_tensors="pt")["pixel_values"]
    literal = literal_attention(model, pixel_values)

    assert explanation.layer_maps.shape == (2, 4, 4, 4) and explanation.combined_map.shape == (4, 4, 4)
    # The literal form projects every key; the model folds the key projection into the query, so float32 rounds the
    # (large, spread-out) scores differently: up to 2.2e-6 on weights of up to 0.2 on an AVX-512 CPU (already before
    # the eager path was rewritten), where a misplaced weight is 1e-2.
    for layer, weights in enumerate(literal):
        expected = weights[:, prefix:].reshape(4, 4, 4)  # (frame, row, column): the backbone's row-major patches
        np.testing.assert_allclose(explanation.layer_maps[layer], expected.numpy(), atol=1e-5)
        np.testing.assert_allclose(explanation.prefix_share[layer], weights[:, :prefix].sum().item(), atol=1e-5)
    assert explanation.layer_maps.std() > 1e-3  # far from uniform: a misplaced weight would show
    # Normalisation: per layer the patches and the prefix tokens share the whole attention.
    np.testing.assert_allclose(explanation.layer_maps.sum((1, 2, 3)) + explanation.prefix_share, 1, atol=1e-5)
    np.testing.assert_allclose(explanation.combined_map, explanation.layer_maps.mean(0), atol=1e-12)
    if prefix == 0:
        assert np.all(explanation.prefix_share == 0)
    assert explanation.num_prefix_tokens == prefix and explanation.backbone_blocks == (1, 2)
    with torch.no_grad():
        probabilities = model(pixel_values).logits.softmax(-1)[0]
    best = probabilities.topk(5)
    assert explanation.labels == [LABELS[int(i)] for i in best.indices]
    np.testing.assert_allclose(explanation.scores, best.values.numpy(), atol=1e-6)


def test_frames_shown_are_the_sampled_resized_cropped_frames(saved_model, clip_path):
    model = EVLForVideoClassification.from_pretrained(saved_model)
    processor = EVLVideoProcessor.from_pretrained(saved_model)
    explanation = explain(model, processor, clip_path, top_k=2)
    np.testing.assert_array_equal(explanation.frame_indices, sample_frame_indices(40, 4, sampling_rate=3))
    unnormalised = processor(str(clip_path), return_tensors="pt", do_rescale=False, do_normalize=False)
    expected = unnormalised["pixel_values"][0].permute(0, 2, 3, 1).numpy()
    assert explanation.frames.dtype == np.uint8 and explanation.frames.shape == (4, 32, 32, 3)
    assert np.abs(explanation.frames.astype(np.float64) - expected).max() <= 0.5 + 1e-3
    assert explanation.video_name == str(clip_path) and len(explanation.labels) == 2


def test_sdpa_models_explain_with_the_eager_weights(saved_model, clip_path):
    processor = EVLVideoProcessor.from_pretrained(saved_model)
    eager_model = EVLForVideoClassification.from_pretrained(saved_model, attn_implementation="eager")
    eager = explain(eager_model, processor, clip_path)
    sdpa_model = EVLForVideoClassification.from_pretrained(saved_model, attn_implementation="sdpa").train()
    sdpa = explain(sdpa_model, processor, clip_path)
    assert sdpa_model.config._attn_implementation == "sdpa" and sdpa_model.training  # its mode is left as it was
    # The backbones attend with sdpa and eager, which sum in different orders: with one thread the maps differed by
    # up to 1.1e-6.
    np.testing.assert_allclose(sdpa.layer_maps, eager.layer_maps, atol=5e-6)
    np.testing.assert_allclose(sdpa.scores, eager.scores, atol=5e-6)


def test_a_model_with_offloaded_modules_is_explained_as_the_model(saved_model, clip_path, tmp_path):
    """Big-model loading: with everything offloaded to disk the model's first weights are on the meta device; its
    hooks move the frames where each module runs."""
    pytest.importorskip("accelerate")
    processor = EVLVideoProcessor.from_pretrained(saved_model)
    expected = explain(EVLForVideoClassification.from_pretrained(saved_model), processor, clip_path)
    offloaded = EVLForVideoClassification.from_pretrained(
        saved_model, device_map=dict.fromkeys(["evl", "fc_norm", "dropout", "classifier"], "disk"),
        offload_folder=tmp_path / "offload",
    )  # fmt: skip
    assert offloaded.device.type == "meta"
    explanation = explain(offloaded, processor, clip_path)
    np.testing.assert_allclose(explanation.layer_maps, expected.layer_maps, atol=1e-6, rtol=0)
    np.testing.assert_allclose(explanation.scores, expected.scores, atol=1e-6, rtol=0)


def test_a_model_returning_tuples_is_explained_as_the_model(saved_model, clip_path):
    """`from_pretrained(..., return_dict=False)` makes the model return tuples; `explain` reads its outputs by name."""
    processor = EVLVideoProcessor.from_pretrained(saved_model)
    expected = explain(EVLForVideoClassification.from_pretrained(saved_model), processor, clip_path)
    explanation = explain(EVLForVideoClassification.from_pretrained(saved_model, return_dict=False), processor, clip_path)
    np.testing.assert_array_equal(explanation.layer_maps, expected.layer_maps)
    assert explanation.labels == expected.labels and explanation.scores == expected.scores


def test_overlapping_analyses_in_threads_keep_the_model_in_evaluation_mode_until_the_last_ends():
    """Two explanations or timelines in threads on one model in training mode (e.g. a callback during training):
    the first to finish must not switch dropout back on under the other, and the model ends in training mode."""
    model = torch.nn.Dropout().train()
    first_entered, second_entered, first_left = threading.Event(), threading.Event(), threading.Event()
    modes = {}

    def first():
        with in_evaluation_mode(model):
            first_entered.set()
            second_entered.wait(10)
        first_left.set()

    def second():
        first_entered.wait(10)
        with in_evaluation_mode(model):
            second_entered.set()
            first_left.wait(10)
            modes["after the first left"] = model.training

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert modes == {"after the first left": False} and model.training


def test_analyses_through_a_wrapper_and_the_model_count_as_one_models():
    # torch.compile's and DataParallel's wrappers share the model's dropout: one analysis through a wrapper and one
    # through the model overlap on the same mode.
    model = torch.nn.Sequential(torch.nn.Dropout()).train()
    for wrapper in (torch.nn.DataParallel(model), torch.compile(model)):
        through_wrapper, through_model = in_evaluation_mode(wrapper), in_evaluation_mode(model)
        through_wrapper.__enter__()
        through_model.__enter__()
        through_wrapper.__exit__(None, None, None)  # the first to start ends first, as threads may
        assert not model.training, type(wrapper).__name__
        through_model.__exit__(None, None, None)
        assert model.training, type(wrapper).__name__


def test_evl_hf_imports_and_unwraps_models_without_accelerate(tmp_path):
    # accelerate comes with the `train` extra only: `import evl_hf` failed on a core install (the explanations
    # imported it to unwrap models).
    script = """
import torch
import evl_hf
from evl_hf.explain import in_evaluation_mode

model = torch.nn.Sequential(torch.nn.Dropout()).train()
for wrapper in (torch.nn.DataParallel(model), torch.compile(model)):
    with in_evaluation_mode(wrapper), in_evaluation_mode(model):
        assert not model.training
    assert model.training
print("ok")
"""
    result = run_without_packages({"accelerate"}, ["-c", script], tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_a_multi_view_processor_is_explained_on_its_centred_single_view(saved_model, clip_path, caplog):
    model = EVLForVideoClassification.from_pretrained(saved_model)
    single = EVLVideoProcessor.from_pretrained(saved_model)
    views = EVLVideoProcessor.from_pretrained(saved_model, num_temporal_views=2, num_spatial_views=3)
    with caplog.at_level("WARNING"):
        explanation = explain(model, views, str(clip_path))
    assert "2 temporal x 3 spatial views" in caplog.text
    reference = explain(model, single, str(clip_path))
    np.testing.assert_array_equal(explanation.frame_indices, reference.frame_indices)
    np.testing.assert_array_equal(explanation.frames, reference.frames)
    np.testing.assert_allclose(explanation.layer_maps, reference.layer_maps, atol=1e-7)


def test_a_model_without_a_head_is_explained_without_labels(tmp_path, clip_path, capsys):
    """`num_labels=0`: the logits are the video embedding, not class scores; as the pipelines, `explain` reports no
    labels (the maps do not depend on a class)."""
    torch.manual_seed(0)
    model = EVLForVideoClassification(EVLConfig(
        vision_config=FAMILIES["clip"][0], num_frames=4, decoder_num_layers=2, decoder_qkv_dim=32, decoder_num_heads=4,
        num_labels=0,
    )).eval()  # fmt: skip
    randomize_decoder(model, scale=1.0)
    model.save_pretrained(tmp_path / "evl")
    small_processor().save_pretrained(tmp_path / "evl")
    explanation = explain(model, small_processor(), clip_path, top_k=3)
    assert explanation.labels == [] and explanation.scores == []
    assert explanation.title() == str(clip_path)
    assert explanation.layer_maps.shape == (2, 4, 4, 4)
    main([str(clip_path), "--model", str(tmp_path / "evl"), "--output", str(tmp_path / "explain.png")])
    printed = capsys.readouterr().out
    assert printed.splitlines()[1].startswith("Attention on the class token"), printed


def test_predictions_are_scored_as_the_model_trains_its_outputs():
    logits = torch.tensor([-3.0, 1.0])
    assert top_predictions(EVLConfig(num_labels=2), logits, 1) == (["LABEL_1"], [pytest.approx(0.982, abs=1e-3)])
    multi_label = EVLConfig(num_labels=2, problem_type="multi_label_classification")
    assert top_predictions(multi_label, logits, 2)[1] == pytest.approx([0.731, 0.047], abs=1e-3)
    # One output and no problem_type: a regression, as transformers' losses take it (a softmax gave 1.0 always).
    assert top_predictions(EVLConfig(num_labels=1), logits[:1], 1) == (["LABEL_0"], [-3.0])


def test_overlay_draws_each_weight_over_its_own_patch():
    frame = np.zeros((4, 6, 3), dtype=np.uint8)
    heatmap = np.zeros((2, 3))
    heatmap[0, 2] = 0.5  # row 0, column 2: pixels [0:2, 4:6]
    from matplotlib import colormaps

    image = overlay_heatmap(frame, heatmap, vmax=0.5)
    hot, cold = (np.round(OVERLAY_ALPHA * np.array(colormaps[COLORMAP](v)[:3]) * 255) for v in (1.0, 0.0))
    expected = np.broadcast_to(cold, (4, 6, 3)).copy()
    expected[0:2, 4:6] = hot
    np.testing.assert_array_equal(image, expected)


def test_png_and_gif_are_written_and_readable(saved_model, clip_path, tmp_path):
    model = EVLForVideoClassification.from_pretrained(saved_model)
    explanation = explain(model, EVLVideoProcessor.from_pretrained(saved_model), clip_path)
    assert isinstance(explanation, EVLExplanation)
    with Image.open(explanation.save_figure(tmp_path / "explain.png")) as figure:
        assert figure.format == "PNG" and figure.width > figure.height > 300  # 4 frames x 3 rows, and a colour bar
    with Image.open(explanation.save_animation(tmp_path / "explain.gif", seconds_per_frame=0.25)) as animation:
        assert animation.format == "GIF" and animation.n_frames == 4 and animation.size == (32, 32)
        assert animation.info["duration"] == 250
    with pytest.raises(ValueError, match="explain.mp4: animations are written as .gif"):
        explanation.save_animation(tmp_path / "explain.mp4")


def test_cli_end_to_end_as_a_module(saved_model, clip_path, tmp_path):
    """`python -m evl_hf.explain` runs, without runpy's warning, although `evl_hf.explain` also names the function."""
    output, animation = tmp_path / "grid.png", tmp_path / "frames.gif"
    result = subprocess.run(
        [sys.executable, "-m", "evl_hf.explain", str(clip_path), "--model", str(saved_model), "--output", str(output),
         "--animation", str(animation), "--top_k", "3"],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "RuntimeWarning" not in result.stderr
    assert "Loading weights" not in result.stderr  # transformers' progress bars, before the command's own output
    expected = explain(EVLForVideoClassification.from_pretrained(saved_model), small_processor(), clip_path, top_k=3)
    printed = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("    ")]
    assert printed == expected.labels
    assert "frames 15, 18, 21, 24" in result.stdout
    with Image.open(output) as image:
        assert image.format == "PNG"
    with Image.open(animation) as image:
        assert image.n_frames == 4


def test_videos_that_cannot_be_read_are_named(saved_model, tmp_path, capsys):
    model, processor = EVLForVideoClassification.from_pretrained(saved_model), small_processor()
    missing = tmp_path / "missing.mp4"
    with pytest.raises(EVLVideoDecodingError, match="missing.mp4: no such file"):
        explain(model, processor, missing)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(EVLVideoDecodingError, match="garbage.mp4"):
        explain(model, processor, str(garbage))
    with pytest.raises(SystemExit) as exit_info:
        main([str(missing), "--model", str(saved_model), "--output", str(tmp_path / "out.png")])
    assert exit_info.value.code == 1
    assert f"{missing}: no such file" in capsys.readouterr().err
    assert not (tmp_path / "out.png").exists()


def test_the_cli_checks_its_output_files_before_any_work(clip_path, tmp_path, capsys):
    for arguments, message in (
        (["--output", str(tmp_path / "missing" / "e.png")], "the folder .* does not exist"),
        (["--output", str(tmp_path / "e")], "a figure is written as .*; got no suffix"),
        (["--output", str(tmp_path / "e.xyz")], "got '.xyz'"),
        (["--output", str(tmp_path / "e.png"), "--animation", str(tmp_path / "missing" / "a.gif")], "--animation .* the folder"),
    ):
        with pytest.raises(SystemExit) as refused:
            main([str(clip_path), "--model", str(tmp_path / "no-model"), *arguments])
        error = capsys.readouterr().err
        assert refused.value.code == 2 and re.search(message, error), error


def test_a_model_without_a_video_processor_is_refused(saved_model, tmp_path, clip_path, capsys):
    EVLForVideoClassification.from_pretrained(saved_model).save_pretrained(tmp_path / "bare")
    with pytest.raises(SystemExit) as exit_info:
        main([str(clip_path), "--model", str(tmp_path / "bare"), "--output", str(tmp_path / "out.png")])
    assert exit_info.value.code == 1
    assert f"{tmp_path / 'bare'}: no video processor (video_preprocessor_config.json)" in capsys.readouterr().err


def test_a_damaged_checkpoint_is_named_in_one_line(saved_model, tmp_path, clip_path, capsys):
    # An EVLCheckpointError (a ValueError) used to end the command in a traceback.
    damaged = tmp_path / "damaged"
    shutil.copytree(saved_model, damaged)
    weights = (damaged / "model.safetensors").read_bytes()
    (damaged / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(SystemExit) as exit_info:
        main([str(clip_path), "--model", str(damaged), "--output", str(tmp_path / "out.png")])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "model.safetensors: the weights file is truncated or corrupt" in error, error
    # The image backbone itself given as the model: named by its type (its config was misread as EVL's).
    save_tiny_backbone(tmp_path / "backbone")
    with pytest.raises(SystemExit) as exit_info:
        main([str(clip_path), "--model", str(tmp_path / "backbone"), "--output", str(tmp_path / "out.png")])
    error = capsys.readouterr().err
    assert exit_info.value.code == 1 and "a `clip_vision_model` checkpoint, not an EVL model (`evl`)" in error, error
    # The checkpoint's config.json given for its folder: transformers unpickled the JSON as weights (a traceback).
    with pytest.raises(SystemExit) as exit_info:
        main([str(clip_path), "--model", str(saved_model / "config.json"), "--output", str(tmp_path / "out.png")])
    error = capsys.readouterr().err
    assert exit_info.value.code == 1 and error.count("\n") == 1, error
    assert f"{saved_model / 'config.json'} is a file: give the checkpoint's folder" in error, error


def test_a_numpy_integer_top_k_is_taken_as_the_timeline_takes_it(saved_model, clip_path):
    model = EVLForVideoClassification.from_pretrained(saved_model)
    explanation = explain(model, small_processor(), clip_path, top_k=np.int64(2))
    assert len(explanation.labels) == 2 == len(explanation.scores)


def test_wrong_arguments_are_refused(saved_model, clip_path, tmp_path):
    model = EVLForVideoClassification.from_pretrained(saved_model)
    with pytest.raises(TypeError, match="must be the model's EVLVideoProcessor"):
        explain(model, None, clip_path)
    with pytest.raises(TypeError, match="must be an EVLForVideoClassification"):
        explain(model.evl, small_processor(), clip_path)
    with pytest.raises(ValueError, match="one video at a time, got 2"):
        explain(model, small_processor(), [str(clip_path), str(clip_path)])
    with pytest.raises(ValueError, match="`top_k` must be a positive integer"):
        explain(model, small_processor(), clip_path, top_k=0)
    with pytest.raises(SystemExit) as exit_info:
        main([str(clip_path), "--model", str(saved_model), "--output", "x.png", "--animation", "x.mp4"])
    assert exit_info.value.code == 2
