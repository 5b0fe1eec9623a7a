import json
import pickle
import re

import pytest
import torch
from evl_reference import random_original_state_dict
from helpers import save_tiny_backbone
from safetensors.torch import load_file
from transformers import AutoModelForVideoClassification, AutoVideoProcessor, pipeline

from evl_hf import EVLForVideoClassification, EVLVideoProcessor
from evl_hf.convert import EVLCheckpointError, convert_evl_checkpoint, main


def test_cli_converts_the_golden_checkpoint_with_labels(golden_dir, tmp_path, capsys):
    labels = ["archery", "bowling", "cooking", "dancing", "eating"]
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    main([
        "--checkpoint", str(golden_dir / "evl_checkpoint.pth"), "--backbone", str(golden_dir / "clip-vision"),
        "--output_dir", str(tmp_path / "out"), "--decoder_num_heads", "4", "--labels", str(tmp_path / "labels.json"),
        "--num_temporal_views", "3",
    ])  # fmt: skip
    assert "Saved EVLForVideoClassification (5 classes, 4 frames)" in capsys.readouterr().out
    out = tmp_path / "out"
    assert {"config.json", "model.safetensors", "video_preprocessor_config.json"} <= {p.name for p in out.iterdir()}
    model = AutoModelForVideoClassification.from_pretrained(out).eval()
    assert isinstance(model, EVLForVideoClassification)
    assert model.config.id2label == dict(enumerate(labels))
    assert (model.config.num_frames, model.config.decoder_num_layers, model.config.decoder_qkv_dim) == (4, 2, 64)
    reference = load_file(golden_dir / "reference.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(model(reference["pixel_values"]).logits, reference["logits"], atol=1e-4, rtol=0)
    processor = AutoVideoProcessor.from_pretrained(out)
    assert isinstance(processor, EVLVideoProcessor)
    assert (processor.num_frames, processor.sampling_rate, processor.crop_size["height"]) == (4, 16, 64)
    assert (processor.num_temporal_views, processor.num_spatial_views) == (3, 1)
    assert pipeline("video-classification", model=str(out)).model.config.id2label[0] == "archery"


def test_cli_takes_the_class_names_in_the_formats_the_training_script_takes(golden_dir, tmp_path, capsys):
    # One name per line (as `--class_names_file`), e.g. the Kinetics label lists shipped as text; was refused as not
    # JSON.
    labels = ["archery", "bowling", "cooking", "dancing", "eating"]
    (tmp_path / "labels.txt").write_text("\n".join(labels) + "\n")
    main([
        "--checkpoint", str(golden_dir / "evl_checkpoint.pth"), "--backbone", str(golden_dir / "clip-vision"),
        "--output_dir", str(tmp_path / "out"), "--decoder_num_heads", "4", "--labels", str(tmp_path / "labels.txt"),
    ])  # fmt: skip
    assert EVLForVideoClassification.from_pretrained(tmp_path / "out").config.id2label == dict(enumerate(labels))


def test_cli_names_itself_and_shows_its_example_as_written(capsys):
    # Its errors read `evl-convert: error: ...` (as the README's troubleshooting quotes them), not `convert.py`, and
    # the example's line continuation is shown, not folded into spaces.
    with pytest.raises(SystemExit):
        main(["--help"])
    shown = capsys.readouterr().out
    assert shown.startswith("usage: evl-convert ")
    assert "--backbone openai/clip-vit-base-patch16 \\\n        --output_dir" in shown


def test_cli_names_a_bad_file_in_one_line(golden_dir, tmp_path, capsys):
    checkpoint, backbone = golden_dir / "evl_checkpoint.pth", golden_dir / "clip-vision"
    (tmp_path / "labels.json").write_text('["archery", "bowling",]')
    torch.save({"state_dict": {"decoder.cls_token": torch.zeros(1)}}, tmp_path / "other_layout.pth")
    torch.save({"model": {"decoder.decoder_layers.0.attn.q_proj.weight": torch.zeros(1)}}, tmp_path / "partial.pth")
    for arguments, message in (
        (["--checkpoint", str(checkpoint), "--labels", str(tmp_path / "labels.json")],
         f"{tmp_path / 'labels.json'}: the class names are not valid JSON"),
        (["--checkpoint", str(tmp_path / "other_layout.pth")],
         f"{tmp_path / 'other_layout.pth'}: expected the tensors under 'model' .* found a dict with the keys \\['state_dict'\\]"),
        (["--checkpoint", str(tmp_path / "partial.pth")], f"{tmp_path / 'partial.pth'}: The checkpoint lacks 'decoder.cls_token'"),
    ):  # fmt: skip
        with pytest.raises(SystemExit) as ended:
            main([*arguments, "--backbone", str(backbone), "--output_dir", str(tmp_path / "out"), "--decoder_num_heads", "4"])
        error = capsys.readouterr().err
        assert ended.value.code == 1 and re.search(message, error) and "Traceback" not in error, error


def test_cli_names_a_checkpoint_that_does_not_fit_or_holds_a_pickled_model_in_one_line(golden_dir, tmp_path, capsys):
    state = random_original_state_dict(64, (4, 4), 2, 4, 64, 4.0, 5)
    torch.save({"model": {**state, "module.decoder.temporal_conv.0.weight": torch.zeros(64, 1, 5)}}, tmp_path / "misshaped.pth")
    torch.save({"model": {**state, "module.decoder.extra.weight": torch.zeros(3)}}, tmp_path / "extra.pth")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "pickled_model.pth")
    for name, message in (
        ("misshaped.pth", r"does not fit the EVL model .* shape mismatch: \['evl.decoder.layers.0.temporal_conv"),
        ("extra.pth", "Unexpected key 'decoder.extra.weight'"),
        ("pickled_model.pth", r"holds Python objects other than tensors .*torch.nn.modules.linear.Linear"),
    ):
        with pytest.raises(SystemExit) as ended:
            main([
                "--checkpoint", str(tmp_path / name), "--backbone", str(golden_dir / "clip-vision"),
                "--output_dir", str(tmp_path / "out"), "--decoder_num_heads", "4",
            ])  # fmt: skip
        error = capsys.readouterr().err  # after the loader's progress bar
        report = error[error.index("error: ") :]
        assert ended.value.code == 1 and report.count("\n") == 1 and "\x1b" not in report, error
        assert re.match(f"error: {re.escape(str(tmp_path / name))}: .*{message}", report), report
        assert "weights_only=False" not in report


def test_every_decoder_tensor_is_loaded_from_the_checkpoint(golden_dir):
    model, _ = convert_evl_checkpoint(golden_dir / "evl_checkpoint.pth", golden_dir / "clip-vision", 4)
    original = torch.load(golden_dir / "evl_checkpoint.pth", weights_only=True)["model"]
    state = model.state_dict()
    decoder_keys = [k for k in state if not k.startswith("evl.vision_model.")]
    assert len(decoder_keys) == len(original)
    from evl_hf.convert import rename_key

    for key, value in original.items():
        assert torch.equal(state[rename_key(key.removeprefix("module."))], value), key


def test_heads_default_to_the_backbone_and_the_sampling_rate_to_the_authors(golden_dir):
    model, processor = convert_evl_checkpoint(golden_dir / "evl_checkpoint.pth", golden_dir / "clip-vision")
    assert model.config.decoder_num_heads == 4 and processor.sampling_rate == 16


def _write(tmp_path, state_dict, name="evl.pth"):
    torch.save({"model": state_dict}, tmp_path / name)
    return tmp_path / name


def test_checkpoint_of_another_backbone_width_is_refused(golden_dir, tmp_path):
    state = random_original_state_dict(96, (4, 4), 2, 4, 96, 4.0, 5)
    with pytest.raises(EVLCheckpointError, match="decoder width is 96.*hidden_size is 64"):
        convert_evl_checkpoint(_write(tmp_path, state), golden_dir / "clip-vision")


def test_checkpoint_for_another_patch_grid_names_the_mismatched_tables(golden_dir, tmp_path):
    state = random_original_state_dict(64, (7, 7), 2, 4, 64, 4.0, 5)
    with pytest.raises(EVLCheckpointError, match=r"cross_frame_attention.previous_frame_table: checkpoint \(169, 64\) vs model \(49, 64\)"):
        convert_evl_checkpoint(_write(tmp_path, state), golden_dir / "clip-vision")


def test_missing_keys_are_listed(golden_dir, tmp_path):
    state = random_original_state_dict(64, (4, 4), 2, 4, 64, 4.0, 5)
    del state["module.decoder.decoder_layers.1.mlp.fc2.bias"]
    with pytest.raises(EVLCheckpointError, match=r"missing: \['evl.decoder.layers.1.mlp.fc2.bias'\]"):
        convert_evl_checkpoint(_write(tmp_path, state), golden_dir / "clip-vision")


def test_more_decoder_layers_than_backbone_blocks_is_refused(golden_dir, tmp_path):
    state = random_original_state_dict(64, (4, 4), 5, 4, 64, 4.0, 5)
    with pytest.raises(EVLCheckpointError, match="5 decoder layers but the backbone only 4 blocks"):
        convert_evl_checkpoint(_write(tmp_path, state), golden_dir / "clip-vision")


def test_unknown_keys_are_refused(golden_dir, tmp_path):
    state = random_original_state_dict(64, (4, 4), 2, 4, 64, 4.0, 5)
    state["module.decoder.extra.weight"] = torch.zeros(3)
    with pytest.raises(EVLCheckpointError, match="Unexpected key 'decoder.extra.weight'"):
        convert_evl_checkpoint(_write(tmp_path, state), golden_dir / "clip-vision")


def test_truncated_file_is_a_clear_error(golden_dir, tmp_path):
    data = (golden_dir / "evl_checkpoint.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(EVLCheckpointError, match="cut.pth: cannot be read"):
        convert_evl_checkpoint(tmp_path / "cut.pth", golden_dir / "clip-vision")


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickles_with_code_are_refused_not_executed(golden_dir, tmp_path, capsys):
    with open(tmp_path / "evil.pth", "wb") as handle:
        pickle.dump({"model": _Payload()}, handle)
    with pytest.raises(EVLCheckpointError, match="evil.pth: cannot be read"):
        convert_evl_checkpoint(tmp_path / "evil.pth", golden_dir / "clip-vision")
    assert "this must never run" not in capsys.readouterr().out


def test_label_count_must_match_the_classifier(golden_dir):
    with pytest.raises(EVLCheckpointError, match="3 labels given but the checkpoint's classifier has 5"):
        convert_evl_checkpoint(golden_dir / "evl_checkpoint.pth", golden_dir / "clip-vision", id2label={0: "a", 1: "b", 2: "c"})


def test_32_frame_checkpoints_default_to_stride_8(tmp_path):
    save_tiny_backbone(tmp_path / "clip")
    state = random_original_state_dict(32, (4, 4), 2, 32, 32, 4.0, 3)
    model, processor = convert_evl_checkpoint(_write(tmp_path, state), tmp_path / "clip")
    assert model.config.num_frames == 32 and processor.sampling_rate == 8 and processor.num_frames == 32


def test_a_backbone_other_than_clip_is_refused_by_its_model_type(golden_dir, tmp_path, capsys):
    """The authors' checkpoints decode CLIP features: a SigLIP tower of the same width would convert, into a
    config.json that says CLIP over SigLIP weights."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    SiglipVisionModel(SiglipVisionConfig(
        hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, patch_size=16, image_size=64
    )).save_pretrained(tmp_path / "siglip")  # fmt: skip
    with pytest.raises(SystemExit) as ended:
        main([
            "--checkpoint", str(golden_dir / "evl_checkpoint.pth"), "--backbone", str(tmp_path / "siglip"),
            "--output_dir", str(tmp_path / "out"),
        ])  # fmt: skip
    error = capsys.readouterr().err
    assert ended.value.code == 1 and "Traceback" not in error, error
    assert f"{tmp_path / 'siglip'} is a `siglip_vision_model` checkpoint" in error and "CLIP" in error
    assert not (tmp_path / "out").exists()
    # Before the checkpoint, which may be large, is read.
    with pytest.raises(ValueError, match="is a `siglip_vision_model` checkpoint"):
        convert_evl_checkpoint(tmp_path / "not-read.pth", tmp_path / "siglip")


def test_cli_checks_its_output_dir_before_any_work(tmp_path, capsys):
    # Checked first (the checkpoint given does not even exist): a conversion never ends in a traceback about its output.
    (tmp_path / "a_file").write_text("x")
    for output_dir in (tmp_path / "a_file", tmp_path / "a_file" / "out"):
        with pytest.raises(SystemExit) as refused:
            main(["--checkpoint", str(tmp_path / "missing.pth"), "--backbone", str(tmp_path), "--output_dir", str(output_dir)])
        error = capsys.readouterr().err
        assert refused.value.code == 2 and f"--output_dir {output_dir}: {tmp_path / 'a_file'} is a file, not a folder" in error, error


def test_cli_refuses_zero_heads_and_repeated_labels(golden_dir, tmp_path, capsys):
    checkpoint, backbone = golden_dir / "evl_checkpoint.pth", golden_dir / "clip-vision"
    (tmp_path / "labels.json").write_text(json.dumps(["archery", "bowling", "archery", "cooking", "dancing"]))
    for arguments, code, message in (
        (["--decoder_num_heads", "0"], 2, "--decoder_num_heads must be a positive integer, got 0"),
        (["--labels", str(tmp_path / "labels.json")], 1, f"{tmp_path / 'labels.json'}: class names given more than once: \\['archery'\\]"),
    ):  # fmt: skip
        with pytest.raises(SystemExit) as ended:
            main(["--checkpoint", str(checkpoint), "--backbone", str(backbone), "--output_dir", str(tmp_path / "out"), *arguments])
        error = capsys.readouterr().err
        assert ended.value.code == code and re.search(message, error) and "Traceback" not in error, error
    assert not (tmp_path / "out").exists()


def test_repeated_labels_and_zero_heads_are_refused(golden_dir):
    checkpoint, backbone = golden_dir / "evl_checkpoint.pth", golden_dir / "clip-vision"
    with pytest.raises(ValueError, match="`decoder_num_heads` must be a positive integer, got 0"):
        convert_evl_checkpoint(checkpoint, backbone, decoder_num_heads=0)
    with pytest.raises(ValueError, match="The class names must be distinct; repeated: \\['a'\\]"):
        convert_evl_checkpoint(checkpoint, backbone, id2label=dict(enumerate("abacd")))
