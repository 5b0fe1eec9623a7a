import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_without_packages, save_tiny_backbone
from huggingface_hub import HfApi
from huggingface_hub.hf_api import CommitInfo, RepoUrl
from PIL import Image
from safetensors.torch import load_file
from transformers import pipeline

from evl_hf import EVLForVideoClassification
from evl_hf.data.synthetic import MOTION_CLASSES, generate_motion_dataset


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "run_video_classification.py"


def load_script():
    spec = importlib.util.spec_from_file_location("run_video_classification", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """2 train clips per class, 1 validation and 1 test clip per class, plus unusable files in train and validation."""
    root = generate_motion_dataset(tmp_path_factory.mktemp("motion"), 2, 1, 1, num_frames=12, size=32, seed=1)
    (root / "train" / "growing" / "random_bytes.mp4").write_bytes(np.random.default_rng(0).bytes(3000))
    (root / "train" / "shrinking" / "empty.mp4").write_bytes(b"")
    good = (root / "train" / "appearing" / "appearing_0000.mp4").read_bytes()
    (root / "validation" / "appearing" / "truncated_header.mp4").write_bytes(good[:200])
    return root


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory):
    return save_tiny_backbone(tmp_path_factory.mktemp("clip"))


def base_args(data_dir, backbone_dir, output_dir, *extra):
    return [
        "--backbone", str(backbone_dir), "--train_dir", str(data_dir / "train"),
        "--validation_dir", str(data_dir / "validation"), "--test_dir", str(data_dir / "test"),
        "--output_dir", str(output_dir), "--config_overrides", "decoder_num_layers=2,decoder_qkv_dim=32,decoder_num_heads=4",
        "--num_frames", "4", "--sampling_rate", "2", "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "4", "--learning_rate", "1e-3", "--report_to", "none", "--seed", "7",
        "--dataloader_num_workers", "0", "--disable_tqdm", "true", *extra,
    ]  # fmt: skip


def test_train_evaluate_with_three_crops_and_predict(data_dir, backbone_dir, tmp_path):
    output = tmp_path / "run"
    trainer = load_script().main(
        base_args(data_dir, backbone_dir, output, "--do_train", "--do_eval", "--do_predict", "--num_train_epochs", "2",
                  "--num_spatial_views", "3", "--save_strategy", "no")
    )  # fmt: skip
    results = json.loads((output / "all_results.json").read_text())
    # 2 distinct unusable training clips (replaced in both epochs); the validation file with a cut header is masked.
    assert results["train_unusable_clips"] == 2
    assert results["eval_unusable_clips"] == 1 and results["test_unusable_clips"] == 0
    for key in ("eval_top1_accuracy", "eval_top5_accuracy", "test_top1_accuracy", "test_top5_accuracy", "train_loss"):
        assert key in results and 0 <= results[key] <= (1 if "accuracy" in key else 100)
    per_class = json.loads((output / "eval_per_class_accuracy.json").read_text())
    assert sorted(per_class) == sorted(MOTION_CLASSES)
    rows = (output / "eval_confusion_matrix.csv").read_text().splitlines()
    assert len(rows) == 11 and sum(int(v) for row in rows[1:] for v in row.split(",")[1:]) == 10
    for prefix in ("eval", "test"):  # 10 usable clips each
        with Image.open(output / f"{prefix}_confusion_matrix.png") as image:
            assert image.format == "PNG"
        with open(output / f"{prefix}_predictions.csv", newline="") as handle:
            predictions = list(csv.DictReader(handle))
        assert len(predictions) == 10 and set(predictions[0]) == {"clip", "label", "predicted"}
        assert all(row["predicted"] in MOTION_CLASSES and Path(row["clip"]).parent.name == row["label"] for row in predictions)
    assert trainer.model.evl.vision_model.training is False
    # The saved run is a complete checkpoint: model, config, video processor, card.
    from huggingface_hub import ModelCard

    metadata = ModelCard.load(output / "README.md").data.to_dict()
    assert metadata["pipeline_tag"] == "video-classification"
    # The backbone came from a local directory of unknown origin: no local path as the Hub's base_model.
    assert "base_model" not in metadata
    (entry,) = metadata["model-index"][0]["results"]
    assert entry["task"]["type"] == "video-classification" and entry["dataset"]["type"] == "videofolder"
    assert {m["name"]: m["value"] for m in entry["metrics"]} == {
        "Top-1 accuracy": results["eval_top1_accuracy"], "Top-5 accuracy": results["eval_top5_accuracy"]
    }
    result = pipeline("video-classification", model=str(output))(str(next((data_dir / "test").rglob("*.mp4"))))
    assert {r["label"] for r in result} <= set(MOTION_CLASSES)


def test_resume_from_a_checkpoint_reaches_the_same_weights(data_dir, backbone_dir, tmp_path):
    script = load_script()
    full = tmp_path / "full"
    # PyAV here (the other runs decode with torchcodec, the default where it loads); the choice is saved.
    steps = ("--do_train", "--max_steps", "4", "--save_steps", "2", "--decoding_backend", "pyav")
    script.main(base_args(data_dir, backbone_dir, full, *steps))
    assert json.loads((full / "video_preprocessor_config.json").read_text())["decoding_backend"] == "pyav"
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    trainer = script.main(base_args(data_dir, backbone_dir, resumed, *steps))
    assert trainer.state.global_step == 4
    # The unusable clips met before the checkpoint are counted too: their batches are not read again.
    counts = [json.loads((run / "train_results.json").read_text())["train_unusable_clips"] for run in (full, resumed)]
    assert counts[0] == counts[1] > 0, counts
    expected, actual = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=0, rtol=0)


def test_starting_from_an_evl_checkpoint_with_overrides(data_dir, backbone_dir, tmp_path):
    script = load_script()
    first = tmp_path / "first"
    script.main(base_args(data_dir, backbone_dir, first, "--do_train", "--max_steps", "1", "--save_strategy", "no"))
    args = base_args(data_dir, backbone_dir, tmp_path / "second", "--do_eval", "--num_temporal_views", "2")
    args[args.index("--backbone") : args.index("--backbone") + 2] = ["--model_name_or_path", str(first)]
    trainer = script.main(args)
    assert isinstance(trainer.model, EVLForVideoClassification)
    assert json.loads((tmp_path / "second" / "eval_results.json").read_text())["eval_unusable_clips"] == 1


def test_bf16_mixed_precision_training(data_dir, backbone_dir, tmp_path):
    trainer = load_script().main(
        base_args(data_dir, backbone_dir, tmp_path / "bf16", "--do_train", "--max_steps", "2", "--bf16", "true", "--use_cpu", "true",
                  "--save_strategy", "no", "--rand_augment", "false")
    )  # fmt: skip
    assert trainer.args.bf16 and trainer.state.global_step == 2
    assert json.loads((tmp_path / "bf16" / "train_results.json").read_text())["train_loss"] > 0
    assert trainer.model.classifier.weight.dtype == torch.float32  # mixed precision: float32 master weights


def test_without_the_train_extra_the_script_and_the_demo_say_how_to_install_it(tmp_path):
    # A core install (`pip install evl-hf`) has no `datasets`: a bare "No module named 'datasets'" named no extra.
    for module in ("evl_hf.run_video_classification", "evl_hf.demo"):
        result = run_without_packages({"datasets"}, ["-m", module, "--help"], tmp_path)
        assert result.returncode != 0, result.stdout
        assert 'needs datasets: pip install "evl-hf[train]"' in result.stderr, result.stderr[-3000:]


def test_config_overrides_are_typed_by_the_configuration(data_dir, backbone_dir, tmp_path):
    args = base_args(data_dir, backbone_dir, tmp_path / "overrides", "--do_eval")
    args[args.index("--config_overrides") + 1] += ",use_temporal_conv=false,decoder_mlp_factor=2.5"
    config = load_script().main(args).model.config
    assert (config.use_temporal_conv, config.decoder_num_layers, config.decoder_mlp_factor) == (False, 2, 2.5)
    args[args.index("--config_overrides") + 1] = "decoder_num_layers"
    with pytest.raises(ValueError, match="expected key=value pairs.*'decoder_num_layers'"):
        load_script().main(args)
    args[args.index("--config_overrides") + 1] = "decoder_num_layers=7"  # deeper than the 3-block backbone
    with pytest.raises(ValueError, match="cannot exceed the backbone's number of layers"):
        load_script().main(args)


def test_config_overrides_set_the_fields_that_default_to_none():
    # transformers' `update_from_string` types a value by the field's current one, and refuses a field set to None:
    # `backbone_dtype` and `image_size` (the README's low-precision backbone, DINOv2 at another size) could not be set.
    from helpers import tiny_config

    from evl_hf.run_video_classification import apply_overrides

    config = apply_overrides(tiny_config(), "backbone_dtype=bfloat16,image_size=48,num_frames=6", check=False)
    assert (config.backbone_dtype, config.image_size, config.num_frames) == ("bfloat16", 48, 6)
    assert apply_overrides(config, "backbone_dtype=none,image_size=None", check=False).backbone_dtype is None
    assert config.image_size is None
    with pytest.raises(ValueError, match="--config_overrides: image_size=big is not a valid int"):
        apply_overrides(config, "image_size=big")


def test_feature_cache_training_matches_the_uncached_model(data_dir, backbone_dir, tmp_path):
    trainer = load_script().main(
        base_args(data_dir, backbone_dir, tmp_path / "cached", "--do_train", "--do_eval", "--max_steps", "3",
                  "--cache_backbone_features", "true", "--feature_cache_dtype", "float32", "--save_strategy", "no",
                  "--feature_cache_dir", str(tmp_path / "feature-cache"))
    )  # fmt: skip
    cached = trainer.train_dataset
    assert len(cached) == 20  # the two unusable clips are left out at caching time
    model = trainer.model.eval()
    first = cached[0]
    clip = sorted((data_dir / "train").rglob("*.mp4"))
    with torch.no_grad():
        from_cache = model(frame_features=first["frame_features"][None], cross_frame_maps=first["cross_frame_maps"][None]).logits
        features = model.evl.extract_backbone_features(trainer.processing_class(str(clip[0]), num_frames=4, sampling_rate=2, return_tensors="pt")["pixel_values"])
        direct = model(frame_features=features.frame_features, cross_frame_maps=features.cross_frame_maps).logits
    assert first["labels"] == 0
    torch.testing.assert_close(from_cache, direct, atol=1e-5, rtol=1e-5)


def test_feature_cache_under_bf16_holds_the_features_the_uncached_run_trains_on(data_dir, backbone_dir, tmp_path):
    # With --bf16 the uncached run's frozen backbone runs under the Trainer's autocast, but the cache was built
    # outside it (float32 features) and reused by float32 runs alike: cached training was not uncached training.
    cache = tmp_path / "feature-cache"
    steps = ("--do_train", "--max_steps", "1", "--save_strategy", "no", "--use_cpu", "true", "--cache_backbone_features",
             "true", "--feature_cache_dtype", "float32", "--feature_cache_dir", str(cache))  # fmt: skip
    trainer = load_script().main(base_args(data_dir, backbone_dir, tmp_path / "bf16", *steps, "--bf16", "true"))
    model = trainer.model.eval()
    clip = sorted((data_dir / "train").rglob("*.mp4"))[0]
    pixel_values = trainer.processing_class(str(clip), num_frames=4, sampling_rate=2, return_tensors="pt")["pixel_values"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = model.evl.extract_backbone_features(pixel_values)
    with torch.no_grad():
        float32 = model.evl.extract_backbone_features(pixel_values)
    first = trainer.train_dataset[0]
    for name in ("frame_features", "cross_frame_maps"):
        torch.testing.assert_close(first[name][None], getattr(under_autocast, name).float(), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(first[name][None], getattr(float32, name), atol=1e-5, rtol=1e-5)
    # A float32 run builds its own cache.
    load_script().main(base_args(data_dir, backbone_dir, tmp_path / "float32", *steps))
    assert len(list(cache.iterdir())) == 2


def test_a_feature_cache_dtype_other_than_float16_or_float32_is_refused_by_the_argument_parser(tmp_path, capsys):
    # Not after the data set is loaded and the model built.
    for dtype in ("bfloat16", "fp16"):
        with pytest.raises(SystemExit):
            load_script().main(["--output_dir", str(tmp_path), "--feature_cache_dtype", dtype])
        assert f"invalid choice: '{dtype}' (choose from 'float16', 'float32')" in capsys.readouterr().err


def test_a_feature_cache_dtype_other_than_float16_or_float32_in_a_json_file_is_refused_when_parsed(tmp_path):
    # A JSON arguments file bypasses argparse's choices.
    from evl_hf.run_video_classification import parse_arguments

    for dtype in ("bfloat16", "fp16"):
        arguments = tmp_path / "args.json"
        arguments.write_text(json.dumps({"output_dir": str(tmp_path / "out"), "feature_cache_dtype": dtype}))
        with pytest.raises(ValueError, match=rf"--feature_cache_dtype {dtype}: the feature cache stores float16 or "
                                             r"float32 \(Arrow stores no bfloat16\)"):  # fmt: skip
            parse_arguments([str(arguments)])


class LocalHubApi(HfApi):
    """An HfApi whose repositories are local folders: commits are written to disk instead of uploaded."""

    def __init__(self, root: Path):
        super().__init__(endpoint="https://huggingface.co", token="hf_fake")  # never contacted: HF_HUB_OFFLINE=1
        self.root = root
        self.commits = []
        self.validated_cards = []

    def create_repo(self, repo_id, **kwargs):
        (self.root / repo_id).mkdir(parents=True, exist_ok=True)
        return RepoUrl(f"https://huggingface.co/{repo_id}", endpoint="https://huggingface.co")

    def _validate_yaml(self, content: str, *, repo_type=None, token=None):
        # The Hub validates the card's metadata server-side; here it must at least parse as a model card.
        from huggingface_hub import ModelCard

        card = ModelCard(content)
        if not card.data.to_dict():
            raise ValueError("README.md has no metadata")
        self.validated_cards.append(content)

    def create_commit(self, repo_id, operations, *, commit_message, **kwargs):
        written = []
        for operation in operations:
            target = self.root / repo_id / operation.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            source = operation.path_or_fileobj
            data = Path(source).read_bytes() if isinstance(source, (str, Path)) else (source if isinstance(source, bytes) else source.read())
            target.write_bytes(data)
            written.append(operation.path_in_repo)
        self.commits.append((commit_message, written))
        return CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/{len(self.commits):040d}", commit_message=commit_message,
            commit_description="", oid=f"{len(self.commits):040d}",
        )  # fmt: skip


def local_hub(monkeypatch, root: Path) -> LocalHubApi:
    """Trainer's Hub client replaced by a `LocalHubApi` writing repositories under `root`."""
    import transformers.utils.hub as hub

    import huggingface_hub.hf_api

    fake = LocalHubApi(root)
    monkeypatch.setattr(hub, "_hf_api", fake)
    # huggingface_hub's single-commit upload path (the one it takes without hf_xet): files reach `create_commit`.
    monkeypatch.setattr(huggingface_hub.hf_api, "is_xet_available", lambda: False)
    return fake


def test_push_to_hub_through_trainer_writes_a_loadable_repository(data_dir, backbone_dir, tmp_path, monkeypatch):
    fake = local_hub(monkeypatch, tmp_path / "hub")
    load_script().main(
        base_args(data_dir, backbone_dir, tmp_path / "out", "--do_train", "--do_eval", "--max_steps", "2",
                  "--save_strategy", "no", "--push_to_hub", "--hub_model_id", "someone/evl-tiny-motion",
                  "--cache_backbone_features", "--feature_cache_dir", str(tmp_path / "feature-cache"))
    )  # fmt: skip
    repo = tmp_path / "hub" / "someone" / "evl-tiny-motion"
    pushed = {path for _, paths in fake.commits for path in paths}
    assert {"model.safetensors", "config.json", "README.md", "video_preprocessor_config.json"} <= set(fake.commits[-1][1])
    assert not any("cache" in path or path.endswith((".arrow", ".lock")) for path in pushed), pushed
    assert any((tmp_path / "feature-cache").rglob("*.arrow"))
    card = (repo / "README.md").read_text()
    assert "pipeline_tag: video-classification" in card and "base_model" not in card
    assert fake.validated_cards and fake.validated_cards[-1] == card
    assert "videofolder" in card and "learning_rate: 0.001" in card and "Loss" in card
    result = pipeline("video-classification", model=str(repo))(str(next((data_dir / "test").rglob("*.mp4"))), top_k=2)
    assert len(result) == 2 and result[0]["label"] in MOTION_CLASSES


def test_a_checkpoint_pushed_to_the_hub_carries_the_run_arguments(data_dir, backbone_dir, tmp_path, monkeypatch):
    """With `--hub_strategy checkpoint` Trainer pushes each checkpoint as `last-checkpoint` as soon as it is written,
    before the callbacks' `on_save`: the run arguments a resumed run compares against must already be in it."""
    from concurrent.futures import Future

    fake = local_hub(monkeypatch, tmp_path / "hub")

    def upload_now(function, *args, **kwargs):
        # Trainer uploads in the background, racing the rest of the save; here the upload happens when it is asked.
        future = Future()
        future.set_result(function(*args, **kwargs))
        return future

    monkeypatch.setattr(fake, "run_as_future", upload_now)
    load_script().main(
        base_args(data_dir, backbone_dir, tmp_path / "out", "--do_train", "--max_steps", "2", "--save_strategy",
                  "steps", "--save_steps", "2", "--push_to_hub", "--hub_model_id", "someone/evl-resumable",
                  "--hub_strategy", "checkpoint")
    )  # fmt: skip
    pushed = tmp_path / "hub" / "someone" / "evl-resumable" / "last-checkpoint"
    local = tmp_path / "out" / "checkpoint-2"
    assert (pushed / "trainer_state.json").is_file()
    saved = json.loads((local / "evl_run_arguments.json").read_text())
    assert json.loads((pushed / "evl_run_arguments.json").read_text()) == saved and saved["max_steps"] == 2
    assert not (tmp_path / "out" / "evl_run_arguments.json").exists()  # checkpoints only, not the final model


def test_resuming_with_data_of_other_classes_is_refused_before_training(data_dir, backbone_dir, tmp_path):
    """A rerun into an output dir whose checkpoint was trained for other classes (the data gained one) says so,
    instead of failing inside Trainer with a size mismatch of the classification head."""
    train = tmp_path / "train"
    shutil.copytree(data_dir / "train", train)
    args = base_args(data_dir, backbone_dir, tmp_path / "out", "--do_train", "--max_steps", "1", "--save_steps", "1")
    args[args.index("--train_dir") + 1] = str(train)
    load_script().main(args)
    (train / "zooming").mkdir()
    shutil.copy(next((train / "growing").glob("*.mp4")), train / "zooming" / "clip.mp4")
    args[args.index("--max_steps") + 1] = "2"
    with pytest.raises(ValueError, match=r"Cannot resume from .*checkpoint-1: it was trained for 10 classes, this "
                                         r"run's model has 11 \(new: \['zooming'\], gone: \[\]\)"):  # fmt: skip
        load_script().main(args)


def test_resuming_with_another_freeze_backbone_is_refused_before_training(data_dir, backbone_dir, tmp_path):
    """The optimizer state saved with a trained backbone holds more parameters than a frozen one trains: Trainer would
    fail in torch's optimizer.load_state_dict ("a parameter group that doesn't match the size"), after the warning
    about the changed --config_overrides."""
    args = base_args(data_dir, backbone_dir, tmp_path / "out", "--do_train", "--max_steps", "1", "--save_steps", "1")
    overrides = args.index("--config_overrides") + 1
    frozen = args[overrides]
    args[overrides] += ",freeze_backbone=false"
    load_script().main(args)
    args[args.index("--max_steps") + 1] = "2"
    args[overrides] = frozen
    with pytest.raises(ValueError, match=r"Cannot resume from .*checkpoint-1: it was trained with freeze_backbone=False, "
                                         r"this run's model has freeze_backbone=True"):  # fmt: skip
        load_script().main(args)


def test_weight_decay_on_norms_and_biases_is_the_runs_and_kept_on_resuming(data_dir, backbone_dir, tmp_path):
    # The authors' recipe decays every tensor. Resuming with the other choice would fail in torch's
    # optimizer.load_state_dict (its two parameter groups change size), after the feature cache.
    args = base_args(data_dir, backbone_dir, tmp_path / "out", "--do_train", "--max_steps", "1", "--save_steps", "1",
                     "--weight_decay", "0.05")  # fmt: skip
    trainer = load_script().main([*args, "--decay_norms_and_biases", "true"])
    decayed = {id(p) for group in trainer.optimizer.param_groups if group["weight_decay"] > 0 for p in group["params"]}
    assert id(trainer.model.classifier.bias) in decayed
    args[args.index("--max_steps") + 1] = "2"
    with pytest.raises(ValueError, match=r"Cannot resume from .*checkpoint-1: it was trained with "
                                         r"--decay_norms_and_biases true, this run has false"):  # fmt: skip
        load_script().main(args)


def test_a_checkpoint_that_cannot_be_resumed_is_refused_before_the_feature_cache(data_dir, backbone_dir, tmp_path):
    # Trainer.train would refuse each only after the feature cache (a backbone pass over every training clip).
    output, cache = tmp_path / "out", tmp_path / "cache"
    args = base_args(data_dir, backbone_dir, output, "--do_train", "--max_steps", "1", "--save_steps", "1")
    load_script().main(args)
    cached = [*args, "--cache_backbone_features", "--feature_cache_dir", str(cache)]
    # A mistyped path, and a folder Trainer did not finish writing (without trainer_state.json).
    partial = tmp_path / "partial"
    shutil.copytree(output / "checkpoint-1", partial)
    (partial / "trainer_state.json").unlink()
    for resume, message in ((output / "checkpoint-typo", "no such directory"),
                            (partial, "no trainer_state.json in it: not a checkpoint Trainer wrote")):  # fmt: skip
        with pytest.raises(ValueError, match=rf"Cannot resume from {resume}: {message}"):
            load_script().main([*cached, "--resume_from_checkpoint", str(resume)])
    # A rerun into the output dir with another --num_frames: the tensors that differ are named.
    cached[cached.index("--num_frames") + 1] = "6"
    with pytest.raises(ValueError, match=r"(?s)Cannot resume from .*checkpoint-1: its weights do not fit .*temporal_position_embedding"):
        load_script().main(cached)
    assert not list(cache.rglob("*.arrow"))


def test_a_folder_without_the_optimizer_scheduler_and_random_states_is_not_resumed_from(data_dir, backbone_dir, tmp_path):
    """A finished run's output dir has trainer_state.json but no optimizer, scheduler or random states: Trainer would
    go on from its step with a fresh optimizer and a restarted learning-rate schedule, without a word."""
    output = tmp_path / "out"
    load_script().main(base_args(data_dir, backbone_dir, output, "--do_train", "--max_steps", "1", "--save_steps", "1"))
    args = base_args(data_dir, backbone_dir, tmp_path / "resumed", "--do_train", "--max_steps", "2")
    with pytest.raises(ValueError, match=rf"Cannot resume from {output}: no optimizer, scheduler or random states in it "
                                         rf"\(a run's final model, not a checkpoint\): resume from its last checkpoint, "
                                         rf"{output / 'checkpoint-1'}"):  # fmt: skip
        load_script().main([*args, "--resume_from_checkpoint", str(output)])
    # A checkpoint saved with --save_only_model cannot continue where it stopped either; its weights can be trained on.
    model_only = tmp_path / "model_only"
    shutil.copytree(output / "checkpoint-1", model_only)
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (model_only / name).unlink()
    with pytest.raises(ValueError, match=rf"Cannot resume from {model_only}: no optimizer, scheduler or random states "
                                         rf"in it .*--save_only_model.*--model_name_or_path {model_only}"):  # fmt: skip
        load_script().main([*args, "--resume_from_checkpoint", str(model_only)])


def test_checkpoints_are_told_apart_by_the_states_trainer_resumes_from(tmp_path):
    """Trainer writes the random states (one file per process when distributed) after the optimizer and scheduler,
    in every layout: plain, DeepSpeed (its own folder, no scheduler.pt) and FSDP (a sharded optimizer folder). A
    folder with the model alone is refused."""
    from evl_hf.run_video_classification import check_trainer_checkpoint

    layouts = {
        "plain": ["optimizer.pt", "scheduler.pt", "rng_state.pth"],
        "deepspeed": ["latest", "global_step4/mp_rank_00_model_states.pt", "rng_state_0.pth", "rng_state_1.pth"],
        "fsdp": ["optimizer_0/.metadata", "scheduler.pt", "rng_state_0.pth", "rng_state_1.pth"],
        "model_only": ["model.safetensors", "config.json"],
    }
    for layout, files in layouts.items():
        for name in ["trainer_state.json", *files]:
            (tmp_path / layout / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / layout / name).write_text("{}")
        if layout == "model_only":
            with pytest.raises(ValueError, match="no optimizer, scheduler or random states in it"):
                check_trainer_checkpoint(str(tmp_path / layout))
        else:
            check_trainer_checkpoint(str(tmp_path / layout))


def test_resuming_a_run_whose_classes_are_transformers_default_names(data_dir, backbone_dir, tmp_path):
    """config.json leaves out an id2label equal to transformers' default (LABEL_0, LABEL_1): such a checkpoint
    resumes, its classes read as transformers reads them."""
    train = tmp_path / "train"
    for name, source in (("LABEL_0", "growing"), ("LABEL_1", "shrinking")):
        (train / name).mkdir(parents=True)
        for clip in (data_dir / "train" / source).glob("*_000*.mp4"):
            shutil.copy(clip, train / name / clip.name)
    args = base_args(data_dir, backbone_dir, tmp_path / "out", "--do_train", "--max_steps", "1", "--save_steps", "1")
    args[args.index("--train_dir") + 1] = str(train)
    for flag in ("--validation_dir", "--test_dir"):  # their classes would count too
        del args[args.index(flag) : args.index(flag) + 2]
    load_script().main(args)
    assert "id2label" not in json.loads((tmp_path / "out" / "checkpoint-1" / "config.json").read_text())
    args[args.index("--max_steps") + 1] = "2"
    assert load_script().main(args).state.global_step == 2


def test_resuming_skips_a_checkpoint_the_killed_run_did_not_finish_writing(tmp_path, caplog):
    # Trainer writes trainer_state.json last: a run killed while saving leaves a folder without it (seen: only
    # config.json and the code files), or with it cut short. transformers' get_last_checkpoint returns such a folder,
    # and resuming from it fails with "Can't find a valid checkpoint".
    # A --save_only_model checkpoint (no random states) is complete but cannot be resumed from: skipped too.
    from evl_hf.run_video_classification import last_resumable_checkpoint

    assert last_resumable_checkpoint(tmp_path) is None
    for step in (2, 4, 6, 10, 12):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "config.json").write_text("{}")
    for step in (2, 4, 6):
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}" / "rng_state.pth").write_text("")
    (tmp_path / "checkpoint-10" / "trainer_state.json").write_text('{"global_st')
    (tmp_path / "checkpoint-x").mkdir()
    with caplog.at_level("WARNING"):
        assert last_resumable_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    assert "checkpoint-12" in caplog.text and "checkpoint-10" in caplog.text
    assert "checkpoint-6: it was saved with --save_only_model" in caplog.text


def test_an_output_dir_of_save_only_model_checkpoints_is_not_resumed_and_says_what_to_do(data_dir, backbone_dir, tmp_path):
    """transformers cannot resume from a --save_only_model checkpoint (no optimizer, scheduler or random states): a
    rerun into such an --output_dir is refused with what to do, and a finished run's --output_dir names no such
    checkpoint to resume from."""
    output = tmp_path / "out"
    steps = ("--do_train", "--save_steps", "1", "--save_only_model", "true", "--save_strategy", "steps")
    load_script().main(base_args(data_dir, backbone_dir, output, *steps, "--max_steps", "1"))
    with pytest.raises(ValueError, match=rf"{output} holds only checkpoints saved with --save_only_model, which cannot "
                                         rf"be resumed from.*--model_name_or_path {output / 'checkpoint-1'} and a new "
                                         rf"--output_dir"):  # fmt: skip
        load_script().main(base_args(data_dir, backbone_dir, output, *steps, "--max_steps", "2"))
    args = base_args(data_dir, backbone_dir, tmp_path / "resumed", "--do_train", "--max_steps", "2")
    with pytest.raises(ValueError, match=rf"Cannot resume from {output}: no optimizer") as error:
        load_script().main([*args, "--resume_from_checkpoint", str(output)])
    assert "checkpoint-1" not in str(error.value)


def test_a_run_killed_with_sigkill_resumes_to_the_same_result(data_dir, backbone_dir, tmp_path):
    import signal
    import time

    def command(output):
        return [sys.executable, str(SCRIPT), *base_args(data_dir, backbone_dir, output, "--do_train", "--do_eval",
                "--max_steps", "12", "--save_steps", "2", "--logging_steps", "1")]  # fmt: skip

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    uninterrupted = tmp_path / "uninterrupted"
    subprocess.run(command(uninterrupted), check=True, capture_output=True, env=env, timeout=600)

    killed = tmp_path / "killed"
    process = subprocess.Popen(command(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 300
    while not (killed / "checkpoint-6" / "trainer_state.json").exists() and process.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "all_results.json").exists()

    # Same command again: it finds the last complete checkpoint and continues from there.
    subprocess.run(command(killed), check=True, capture_output=True, env=env, timeout=600)
    expected = json.loads((uninterrupted / "all_results.json").read_text())
    actual = json.loads((killed / "all_results.json").read_text())
    for key in ("eval_loss", "eval_top1_accuracy", "eval_top5_accuracy"):
        assert actual[key] == expected[key], key
    reference, resumed = load_file(uninterrupted / "model.safetensors"), load_file(killed / "model.safetensors")
    for key in reference:
        assert torch.equal(reference[key], resumed[key]), key


def test_persistent_workers_see_every_epoch(data_dir, backbone_dir, tmp_path, monkeypatch):
    """Two persistent dataloader workers, two epochs: each clip's augmentation is the one of its epoch (a callback
    updating the main process's transform never reaches persistent workers), and the epochs differ."""
    from evl_hf.training import EVLTrainer

    seen = []
    compute_loss = EVLTrainer.compute_loss

    def recording_compute_loss(self, model, inputs, *args, **kwargs):
        seen.append((self.state.global_step, inputs["clip_indices"].tolist(), inputs["pixel_values"].detach().clone()))
        return compute_loss(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(EVLTrainer, "compute_loss", recording_compute_loss)
    args = base_args(data_dir, backbone_dir, tmp_path / "workers", "--do_train", "--num_train_epochs", "2",
                     "--save_strategy", "no", "--learning_rate", "0")  # fmt: skip
    args[args.index("--dataloader_num_workers") + 1] = "2"
    trainer = load_script().main([*args, "--dataloader_persistent_workers", "true"])
    clips = trainer.train_dataset
    steps_per_epoch = -(-len(clips) // 4)
    by_epoch = {0: {}, 1: {}}
    for step, indices, pixel_values in seen:
        for index, clip in zip(indices, pixel_values):
            by_epoch[step // steps_per_epoch][index] = clip
    assert sorted(by_epoch[0]) == sorted(by_epoch[1]) == list(range(len(clips)))
    for epoch in (0, 1):
        for index in (0, 5, 17):
            torch.testing.assert_close(by_epoch[epoch][index], clips[epoch * len(clips) + index]["pixel_values"], atol=0, rtol=0)
    assert all(not torch.equal(by_epoch[0][i], by_epoch[1][i]) for i in range(len(clips)))


def test_persistent_workers_resume_to_the_weights_of_the_uninterrupted_run(data_dir, backbone_dir, tmp_path):
    """Two persistent workers, 3 steps an epoch, a checkpoint at the end of the first: the resumed run makes its
    dataloader's workers once more than the uninterrupted one (which keeps them), and that must not change the dropout
    masks. Workers made anew every epoch give the same weights too."""
    script = load_script()

    def train(output, *workers):
        args = base_args(data_dir, backbone_dir, output, "--do_train", "--max_steps", "4", "--save_steps", "3",
                         "--per_device_train_batch_size", "8", *workers)  # fmt: skip
        args[args.index("--dataloader_num_workers") + 1] = "2"
        script.main(args)
        return load_file(output / "model.safetensors")

    persistent = ("--dataloader_persistent_workers", "true")
    expected = train(tmp_path / "full", *persistent)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-3", resumed / "checkpoint-3")
    for actual in (train(resumed, *persistent), train(tmp_path / "not persistent")):
        for key in expected:
            assert torch.equal(actual[key], expected[key]), key


def test_configuration_errors_stop_the_run_instead_of_skipping_clips(data_dir, backbone_dir, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="num_spatial_views must be 1 or 3"):
        load_script().main(base_args(data_dir, backbone_dir, tmp_path / "views", "--do_eval", "--num_spatial_views", "2"))
    # An error that is not a decoding failure of a file (here: a bug in frame sampling) stops training.
    import evl_hf.data.video_dataset as video_dataset

    def broken_sampling(*args, **kwargs):
        raise ValueError("a bug, not a bad file")

    monkeypatch.setattr(video_dataset, "sample_frame_indices", broken_sampling)
    with pytest.raises(ValueError, match="a bug, not a bad file"):
        load_script().main(base_args(data_dir, backbone_dir, tmp_path / "bug", "--do_train", "--max_steps", "1"))


def saved_checkpoint(data_dir, backbone_dir, tmp_path, name="checkpoint"):
    output = tmp_path / name
    load_script().main(base_args(data_dir, backbone_dir, output, "--do_train", "--max_steps", "1", "--save_strategy", "no"))
    return output


def test_a_loaded_checkpoint_keeps_its_processor_settings_unless_a_flag_says_otherwise(data_dir, backbone_dir, tmp_path):
    checkpoint = saved_checkpoint(data_dir, backbone_dir, tmp_path)
    settings = json.loads((checkpoint / "video_preprocessor_config.json").read_text())
    settings.update(sampling_rate=3, num_temporal_views=2, num_spatial_views=3, decoding_backend="pyav")
    (checkpoint / "video_preprocessor_config.json").write_text(json.dumps(settings))

    def evaluate(output, *flags):
        args = base_args(data_dir, backbone_dir, output, "--do_train", "--max_steps", "1", "--do_eval", *flags)
        args[args.index("--backbone") : args.index("--backbone") + 2] = ["--model_name_or_path", str(checkpoint)]
        args[args.index("--sampling_rate") : args.index("--sampling_rate") + 2] = []  # no flag: the checkpoint's
        return load_script().main(args).processing_class

    processor = evaluate(tmp_path / "defaults")
    assert (processor.sampling_rate, processor.num_temporal_views, processor.num_spatial_views) == (3, 2, 3)
    assert processor.decoding_backend == "pyav"
    saved = json.loads((tmp_path / "defaults" / "video_preprocessor_config.json").read_text())
    assert (saved["sampling_rate"], saved["num_temporal_views"], saved["num_spatial_views"]) == (3, 2, 3)
    processor = evaluate(tmp_path / "flags", "--sampling_rate", "1", "--num_temporal_views", "1")
    assert (processor.sampling_rate, processor.num_temporal_views, processor.num_spatial_views) == (1, 1, 3)


@pytest.mark.parametrize("flags", [[], ["--ignore_mismatched_sizes"]])
def test_a_headless_checkpoint_gets_a_head_for_the_data_classes(data_dir, backbone_dir, tmp_path, flags):
    # A num_labels=0 classifier (its logits are the video embeddings) has no classes to map the data set's to: as an
    # EVLModel checkpoint, it trains a new head for them, its decoder loaded as saved.
    headless = EVLForVideoClassification.from_backbone_pretrained(
        backbone_dir, num_labels=0, num_frames=4, decoder_num_layers=2, decoder_qkv_dim=32, decoder_num_heads=4
    )
    headless.save_pretrained(tmp_path / "headless")
    args = base_args(data_dir, backbone_dir, tmp_path / "out", "--max_steps", "1", "--save_strategy", "no", *flags)
    args[args.index("--backbone") : args.index("--backbone") + 2] = ["--model_name_or_path", str(tmp_path / "headless")]
    model = load_script().main(args).model
    assert sorted(model.config.label2id) == sorted(MOTION_CLASSES)
    assert model.classifier.weight.shape == (len(MOTION_CLASSES), 32)
    assert torch.equal(model.evl.decoder.query.cpu(), headless.evl.decoder.query)


def test_three_spatial_views_a_checkpoints_processor_cannot_crop_are_refused_before_training(data_dir, backbone_dir, tmp_path):
    # A processor that neither crops nor resizes to a square has no crop size for 3 views: evaluation would fail
    # only after training.
    checkpoint = saved_checkpoint(data_dir, backbone_dir, tmp_path)
    settings = json.loads((checkpoint / "video_preprocessor_config.json").read_text())
    settings.update(do_center_crop=False, size={"shortest_edge": 32})
    (checkpoint / "video_preprocessor_config.json").write_text(json.dumps(settings))
    args = base_args(data_dir, backbone_dir, tmp_path / "out", "--do_train", "--do_eval", "--num_spatial_views", "3")
    args[args.index("--backbone") : args.index("--backbone") + 2] = ["--model_name_or_path", str(checkpoint)]
    with pytest.raises(ValueError, match=r"--num_spatial_views 3: num_spatial_views=3 takes 3 crops .*do_center_crop=True"):
        load_script().main(args)
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_trained_on_decomposed_folder_names_knows_the_composed_ones():
    # Label folders' names are read in NFC; a checkpoint trained before on NFD-named folders has the same classes.
    import unicodedata

    from evl_hf import EVLConfig
    from evl_hf.run_video_classification import checkpoint_labels

    config = EVLConfig(id2label={0: unicodedata.normalize("NFD", "café"), 1: "tea"})
    config.architectures = ["EVLForVideoClassification"]
    mapped = checkpoint_labels(config, [unicodedata.normalize("NFC", "café"), "tea"], ignore_mismatched_sizes=False)
    assert mapped == {0: unicodedata.normalize("NFC", "café"), 1: "tea"}
    # A data set whose ClassLabel names its classes in NFD (not folders, which are read in NFC): the same classes, in
    # the data set's form (they were refused as classes the checkpoint does not know).
    config = EVLConfig(id2label={0: unicodedata.normalize("NFC", "café"), 1: "tea"})
    config.architectures = ["EVLForVideoClassification"]
    mapped = checkpoint_labels(config, [unicodedata.normalize("NFD", "café"), "tea"], ignore_mismatched_sizes=False)
    assert mapped == {0: unicodedata.normalize("NFD", "café"), 1: "tea"}


def test_checkpoint_classes_that_differ_only_in_unicode_form_stay_two_classes():
    # Composed and decomposed "café" are two classes of this checkpoint: read in one form they would be one name
    # twice (a ClassLabel refuses it), and the data set's "café" would be scored as either.
    import unicodedata

    from datasets import ClassLabel, Dataset

    from evl_hf import EVLConfig
    from evl_hf.run_video_classification import checkpoint_labels, labels_by_name

    composed, decomposed = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    config = EVLConfig(id2label={0: decomposed, 1: composed, 2: "tea"})
    config.architectures = ["EVLForVideoClassification"]
    mapped = checkpoint_labels(config, [composed, "tea"], ignore_mismatched_sizes=False)
    assert mapped == {0: decomposed, 1: composed, 2: "tea"}
    clips = Dataset.from_dict({"label": [0, 1]}).cast_column("label", ClassLabel(names=[composed, "tea"]))
    assert labels_by_name(clips, ClassLabel(names=[mapped[i] for i in range(3)]))["label"] == [1, 2]


def test_labels_map_to_the_checkpoint_by_name(data_dir, backbone_dir, tmp_path):
    checkpoint = saved_checkpoint(data_dir, backbone_dir, tmp_path)
    config = json.loads((checkpoint / "config.json").read_text())
    # The checkpoint's classes in reverse alphabetical order: the data set's folders must map to them by name.
    names = sorted(MOTION_CLASSES, reverse=True)
    config["id2label"] = {str(i): name for i, name in enumerate(names)}
    config["label2id"] = {name: i for i, name in enumerate(names)}
    (checkpoint / "config.json").write_text(json.dumps(config))

    def args_for(output, *flags, data=data_dir):
        args = base_args(data, backbone_dir, output, "--do_eval", *flags)
        args[args.index("--backbone") : args.index("--backbone") + 2] = ["--model_name_or_path", str(checkpoint)]
        return args

    trainer = load_script().main(args_for(tmp_path / "mapped"))
    assert trainer.model.config.id2label == dict(enumerate(names))
    clips = trainer.eval_dataset.dataset
    for row in clips:
        assert names[row["label"]] == Path(row["video"]["path"]).parent.name

    other = tmp_path / "other-classes"
    for split in ("train", "validation", "test"):
        shutil.copytree(data_dir / split, other / split)
        (other / split / "growing").rename(other / split / "expanding")
    with pytest.raises(ValueError, match=r"classes the checkpoint does not know: \['expanding'\].*--ignore_mismatched_sizes"):
        load_script().main(args_for(tmp_path / "refused", data=other))
    trainer = load_script().main(args_for(tmp_path / "new-head", "--ignore_mismatched_sizes", data=other))
    assert "expanding" in trainer.model.config.label2id
    old_head = load_file(checkpoint / "model.safetensors")["classifier.weight"]
    assert not torch.equal(trainer.model.classifier.weight.detach(), old_head)


def test_class_names_that_differ_only_in_case_are_different_classes(data_dir, backbone_dir, tmp_path):
    # A checkpoint with the classes "GROWING" and "growing": clips of each keep their class when mapped to the
    # checkpoint's (`datasets`' align_labels_with_mapping compares names lowercased).
    checkpoint = saved_checkpoint(data_dir, backbone_dir, tmp_path)
    config = json.loads((checkpoint / "config.json").read_text())
    names = ["GROWING" if name == "appearing" else name for name in MOTION_CLASSES]
    config["id2label"] = {str(i): name for i, name in enumerate(names)}
    config["label2id"] = {name: i for i, name in enumerate(names)}
    (checkpoint / "config.json").write_text(json.dumps(config))
    validation = tmp_path / "validation"
    for name in ("GROWING", "growing", "shrinking"):
        shutil.copytree(data_dir / "validation" / ("appearing" if name == "GROWING" else name), validation / name)
    args = base_args(data_dir, backbone_dir, tmp_path / "out", "--do_eval")
    args[args.index("--backbone") : args.index("--backbone") + 2] = ["--model_name_or_path", str(checkpoint)]
    args[args.index("--validation_dir") + 1] = str(validation)
    for flag in ("--train_dir", "--test_dir"):
        del args[args.index(flag) : args.index(flag) + 2]
    load_script().main(args)
    with open(tmp_path / "out" / "eval_predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["label"] for row in rows) == ["GROWING", "growing", "shrinking"]
    assert all(Path(row["clip"]).parent.name == row["label"] for row in rows)


def test_rerunning_into_a_checkpointed_output_dir_warns_about_changed_arguments(data_dir, backbone_dir, tmp_path, caplog):
    import logging

    output = tmp_path / "run"
    steps = ("--do_train", "--save_steps", "1", "--rand_augment", "false")
    load_script().main(base_args(data_dir, backbone_dir, output, *steps, "--max_steps", "1"))
    assert (output / "checkpoint-1" / "evl_run_arguments.json").exists()
    with caplog.at_level(logging.WARNING, logger="evl_hf.run_video_classification"):
        load_script().main(base_args(data_dir, backbone_dir, output, *steps, "--max_steps", "2", "--learning_rate", "2e-3"))
    warning = "\n".join(r.getMessage() for r in caplog.records)
    assert "Resuming training from" in warning and "with different arguments" in warning
    assert "learning_rate: 0.001 -> 0.002" in warning and "max_steps: 1 -> 2" in warning
    assert "seed" not in warning.split("arguments")[-1].replace("data_seed", "")  # unchanged ones are not listed


def test_do_eval_without_validation_data_splits_it_off_the_training_clips(data_dir, backbone_dir, tmp_path):
    """--train_val_split, as in transformers' run_image_classification.py: with a share large enough for every class
    to be in both sets, the split is stratified."""
    args = base_args(data_dir, backbone_dir, tmp_path / "out", "--do_train", "--do_eval", "--max_steps", "1",
                     "--save_strategy", "no", "--train_val_split", "0.5")  # fmt: skip
    for flag in ("--validation_dir", "--test_dir"):
        del args[args.index(flag) : args.index(flag) + 2]
    from evl_hf.data.video_dataset import clip_names

    trainer = load_script().main(args)
    training, validation = trainer.train_dataset.dataset, trainer.eval_dataset.dataset
    assert len(validation) == 11 and len(training) == 11  # of the 22 training clips (2 of them unusable)
    assert not set(clip_names(validation)) & set(clip_names(training))
    assert set(validation["label"]) == set(training["label"]) == set(range(len(MOTION_CLASSES)))
    results = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert "eval_top1_accuracy" in results
    # Recorded with the run's arguments (written into each checkpoint): a resumed run that does not split says so.
    assert trainer.run_arguments["train_val_split"] == 0.5
    with pytest.raises(ValueError, match="--do_eval needs a validation split: .*--train_val_split"):
        load_script().main([*args, "--train_val_split", "0"])


def test_an_evaluation_only_run_never_splits_the_training_clips(data_dir, backbone_dir, tmp_path):
    """Without --do_train the model was trained elsewhere, most likely on these very training clips: a validation
    split drawn from them would be scored as held-out data."""
    args = base_args(data_dir, backbone_dir, tmp_path / "out", "--do_eval")
    for flag in ("--validation_dir", "--test_dir"):
        del args[args.index(flag) : args.index(flag) + 2]
    with pytest.raises(ValueError, match=r"--do_eval without --do_train and no validation split: .*clips the model was "
                                         r"trained on.*--validation_dir"):  # fmt: skip
        load_script().main(args)


def labeled_clips(counts: dict):
    from datasets import ClassLabel, Dataset, Features, Value

    names = list(counts)
    videos = [f"{name}_{index}.mp4" for name in names for index in range(counts[name])]
    labels = [label for label, name in enumerate(names) for _ in range(counts[name])]
    features = Features({"video": Value("string"), "label": ClassLabel(names=names)})
    return Dataset.from_dict({"video": videos, "label": labels}, features=features)


SPLIT_IN_A_NEW_PROCESS = """
import json, sys
from datasets import ClassLabel, Dataset, Features, Value
from evl_hf.run_video_classification import split_off_validation
videos, labels, names = json.loads(sys.argv[1])
features = Features({"video": Value("string"), "label": ClassLabel(names=names)})
train = Dataset.from_dict({"video": videos, "label": labels}, features=features)
print(json.dumps(list(split_off_validation(train, 0.3, seed=7, training=True)[1]["video"])))
"""


def test_the_train_val_split_is_stratified_and_the_same_in_every_process():
    import random

    from evl_hf.run_video_classification import split_off_validation

    clips = labeled_clips({"a": 6, "b": 6, "c": 6})
    training, validation = split_off_validation(clips, 0.3, seed=7, training=True)
    assert len(validation) == 6 and sorted(validation["label"]) == [0, 0, 1, 1, 2, 2]
    assert sorted([*training["video"], *validation["video"]]) == sorted(clips["video"])
    assert list(split_off_validation(clips, 0.3, seed=8, training=True)[1]["video"]) != list(validation["video"])
    # Each process splits on its own: the split depends on the seed alone, not on the random states of the process
    # (they differ between ranks) nor on its hash seed.
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    assert list(split_off_validation(clips, 0.3, seed=7, training=True)[1]["video"]) == list(validation["video"])
    data = json.dumps([list(clips["video"]), list(clips["label"]), clips.features["label"].names])
    env = dict(os.environ, PYTHONHASHSEED="123", PYTHONPATH=str(ROOT / "src"))
    result = subprocess.run([sys.executable, "-c", SPLIT_IN_A_NEW_PROCESS, data], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == list(validation["video"])


def test_a_train_val_split_that_cannot_be_stratified_is_random_and_leaves_every_class_training_clips(caplog):
    from evl_hf.run_video_classification import split_off_validation

    clips = labeled_clips({"a": 4, "b": 4, "single": 1})
    with caplog.at_level("WARNING"):
        training, validation = split_off_validation(clips, 0.3, seed=7, training=False)
    assert "not stratified: the class 'single' has 1 clip" in caplog.text
    assert len(validation) == 3 and len(training) == 6
    # Training: a class whose clips all went to the validation split would never be trained.
    with pytest.raises(ValueError, match=r"--train_val_split 0.7 leaves no training clips of the classes \["):
        split_off_validation(clips, 0.7, seed=7, training=True)  # 2 training clips for 3 classes
    with pytest.raises(ValueError, match=r"--train_val_split must be at least 0 and less than 1, got 1.0"):
        split_off_validation(clips, 1.0, seed=7, training=True)


def test_classes_a_stratified_split_leaves_out_of_validation_are_named(caplog):
    """datasets stratifies in proportion to the classes' sizes: next to a large class, one of 2 clips may get no
    validation clip at all, and would not be scored."""
    from evl_hf.run_video_classification import split_off_validation

    clips = labeled_clips({"big": 100, **{f"c{i}": 2 for i in range(9)}})
    with caplog.at_level("WARNING"):
        training, validation = split_off_validation(clips, 0.1, seed=7, training=True)
    names = clips.features["label"].names
    absent = [names[label] for label in sorted(set(range(len(names))) - set(validation["label"]))]
    assert absent and "not stratified" not in caplog.text
    assert f"--train_val_split 0.1 leaves no validation clips of the classes {absent}" in caplog.text


def test_the_train_val_split_of_a_data_set_backed_by_cache_files(tmp_path):
    """What `load_dataset` returns (a CSV, JSON lines, Parquet) is backed by cache files, where `datasets` refuses to
    keep a split's indices in memory: the split is the same as an in-memory data set's."""
    from datasets import load_dataset

    from evl_hf.run_video_classification import split_off_validation

    clips = labeled_clips({"a": 6, "b": 6, "c": 6})
    clips.to_csv(tmp_path / "train.csv", index=False)
    cached = load_dataset("csv", data_files=str(tmp_path / "train.csv"), features=clips.features, split="train",
                          cache_dir=str(tmp_path / "cache"))  # fmt: skip
    assert cached.cache_files
    training, validation = split_off_validation(cached, 0.3, seed=7, training=True)
    expected_training, expected_validation = split_off_validation(clips, 0.3, seed=7, training=True)
    assert list(validation["video"]) == list(expected_validation["video"])
    assert sorted(validation["label"]) == [0, 0, 1, 1, 2, 2]
    assert list(training["video"]) == list(expected_training["video"])
    assert training.features == validation.features == clips.features


def test_data_directories_that_are_not_videofolders_say_what_is_wrong(data_dir, backbone_dir, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(next((data_dir / "train").rglob("*.mp4")), flat / "clip.mp4")
    for folder, message in ((tmp_path / "missing", "the directory does not exist"), (flat, "one sub-folder per label"),
                            (flat / "clip.mp4", "is not a directory")):  # fmt: skip
        args = base_args(data_dir, backbone_dir, tmp_path / "out", "--do_train")
        args[args.index("--train_dir") + 1] = str(folder)
        with pytest.raises(ValueError, match=message):
            load_script().main(args)


def test_hub_repo_id_of_a_backbone():
    from evl_hf.training import hub_repo_id

    assert hub_repo_id("openai/clip-vit-base-patch16") == "openai/clip-vit-base-patch16"
    assert hub_repo_id(str(ROOT)) is None  # a local directory of unknown origin
    assert hub_repo_id(None) is None and hub_repo_id("not a repo id!") is None


def test_hub_repo_id_of_a_cached_snapshot(tmp_path):
    from evl_hf.training import hub_repo_id

    snapshot = tmp_path / "hub" / "models--openai--clip-vit-base-patch16" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    assert hub_repo_id(str(snapshot)) == "openai/clip-vit-base-patch16"


def test_the_feature_cache_is_reused_and_never_inside_the_output_dir(data_dir, backbone_dir, tmp_path, caplog):
    import logging

    cache = tmp_path / "feature-cache"
    steps = ("--do_train", "--max_steps", "1", "--save_strategy", "no", "--cache_backbone_features",
             "--feature_cache_dir", str(cache))  # fmt: skip
    load_script().main(base_args(data_dir, backbone_dir, tmp_path / "first", *steps))
    (fingerprint,) = [d.name for d in cache.iterdir()]
    with caplog.at_level(logging.INFO, logger="evl_hf.data.video_dataset"):
        trainer = load_script().main(base_args(data_dir, backbone_dir, tmp_path / "second", *steps))
    assert "Reusing the backbone feature cache" in caplog.text and [d.name for d in cache.iterdir()] == [fingerprint]
    assert len(trainer.train_dataset) == 20
    inside = base_args(data_dir, backbone_dir, tmp_path / "third", *steps)
    inside[inside.index("--feature_cache_dir") + 1] = str(tmp_path / "third" / "cache")
    with pytest.raises(ValueError, match="is inside --output_dir"):
        load_script().main(inside)


def test_a_cached_training_set_of_broken_clips_stops_and_a_mostly_broken_one_is_reported(
    data_dir, backbone_dir, tmp_path, caplog
):
    # As without the cache: a set of unreadable files stops with the error that says so, and over a tenth of them is
    # reported loudly.
    import logging

    steps = ("--do_train", "--max_steps", "1", "--save_strategy", "no", "--cache_backbone_features",
             "--feature_cache_dir", str(tmp_path / "cache"))  # fmt: skip

    def train_on(folder, output):
        args = base_args(data_dir, backbone_dir, output, *steps)
        args[args.index("--train_dir") + 1] = str(folder)
        args[args.index("--validation_dir") : args.index("--validation_dir") + 4] = []  # and --test_dir
        return load_script().main(args)

    some = tmp_path / "some"  # 4 clips and random bytes
    for label in ("growing", "shrinking"):
        shutil.copytree(data_dir / "train" / label, some / label, ignore=shutil.ignore_patterns("empty.mp4"))
    names = sorted(path.name for path in some.rglob("*.mp4"))
    assert len(names) == 5 and "random_bytes.mp4" in names
    with caplog.at_level(logging.WARNING):
        train_on(some, tmp_path / "out-some")
    assert "1 of the 5 training clips could not be decoded and were left out of the feature cache" in caplog.text
    broken = tmp_path / "broken"
    for label, data in (("growing", np.random.default_rng(0).bytes(3000)), ("shrinking", b"")):
        (broken / label).mkdir(parents=True)
        (broken / label / "clip.mp4").write_bytes(data)
    with pytest.raises(RuntimeError, match="None of the 2 training clips could be decoded for the feature cache"):
        train_on(broken, tmp_path / "out-broken")


@pytest.mark.parametrize("cached", [False, True])
def test_an_empty_training_split_is_refused_with_or_without_the_feature_cache(data_dir, backbone_dir, tmp_path, cached):
    # --max_train_samples 0: uncached, the run trained 0 steps and saved an untrained model; cached, it stopped
    # saying no clip could be decoded and the data set looked broken. Neither said the training split was empty.
    args = base_args(data_dir, backbone_dir, tmp_path / "out", "--do_train", "--max_steps", "1", "--save_strategy", "no",
                     "--max_train_samples", "0")  # fmt: skip
    if cached:
        args += ["--cache_backbone_features", "--feature_cache_dir", str(tmp_path / "cache")]
    with pytest.raises(ValueError, match=r"--do_train: the training split has no clips \(--max_train_samples 0\)"):
        load_script().main(args)
    assert not (tmp_path / "out" / "model.safetensors").exists() and not (tmp_path / "cache").exists()


def test_settings_the_script_cannot_train_are_refused(data_dir, backbone_dir, tmp_path):
    args = base_args(data_dir, backbone_dir, tmp_path / "unfrozen", "--do_train", "--cache_backbone_features")
    args[args.index("--config_overrides") + 1] += ",freeze_backbone=false"
    with pytest.raises(ValueError, match="cannot train a backbone with freeze_backbone=false"):
        load_script().main(args)
    checkpoint = saved_checkpoint(data_dir, backbone_dir, tmp_path)
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "problem_type": "multi_label_classification"}))
    args = base_args(data_dir, backbone_dir, tmp_path / "multi-label", "--do_train")
    args[args.index("--backbone") : args.index("--backbone") + 2] = ["--model_name_or_path", str(checkpoint)]
    with pytest.raises(ValueError, match="single-label video classification"):
        load_script().main(args)


@pytest.mark.parametrize("run", ["train", "train cached", "evaluate"])
def test_a_checkpoint_whose_processor_samples_by_fps_is_refused(data_dir, backbone_dir, tmp_path, run):
    # Training and evaluation took `num_frames` frames a clip, where the saved processor (and the pipeline) samples as
    # many as each clip lasts; with the feature cache, or evaluating, it went on without a word.
    checkpoint = saved_checkpoint(data_dir, backbone_dir, tmp_path)
    settings = json.loads((checkpoint / "video_preprocessor_config.json").read_text())
    (checkpoint / "video_preprocessor_config.json").write_text(json.dumps({**settings, "fps": 2}))
    steps = ["--do_eval"] if run == "evaluate" else ["--do_train", "--max_steps", "1"]
    args = base_args(data_dir, backbone_dir, tmp_path / "out", *steps)
    args[args.index("--backbone") : args.index("--backbone") + 2] = ["--model_name_or_path", str(checkpoint)]
    with pytest.raises(ValueError, match=r"samples by time \(fps=2\)"):
        load_script().main(args + (["--cache_backbone_features", "--rand_augment", "false"] if run == "train cached" else []))


def test_data_of_one_class_is_refused_before_any_backbone_work(data_dir, backbone_dir, tmp_path, monkeypatch):
    # One output would train a regression (transformers infers it from num_labels == 1 at the first forward), and
    # the empty folder of the other class names no class.
    checkpoint = saved_checkpoint(data_dir, backbone_dir, tmp_path)
    train = tmp_path / "train"
    shutil.copytree(data_dir / "train" / "growing", train / "zooming")
    (train / "shrinking").mkdir()

    def backbone_work(*args, **kwargs):
        raise AssertionError("the backbone was loaded")

    monkeypatch.setattr(EVLForVideoClassification, "from_backbone_pretrained", backbone_work)
    monkeypatch.setattr(EVLForVideoClassification, "from_pretrained", backbone_work)
    args = base_args(data_dir, backbone_dir, tmp_path / "out", "--do_train", "--max_steps", "1")
    args[args.index("--train_dir") + 1] = str(train)
    for flag in ("--validation_dir", "--test_dir"):
        del args[args.index(flag) : args.index(flag) + 2]
    with pytest.raises(ValueError, match=rf"{train} has 1 class \['zooming'\]: .* 2 or more classes"):
        load_script().main(args)
    # A new head on a checkpoint for the data's classes (a class it does not know): the same.
    args[args.index("--backbone") : args.index("--backbone") + 2] = ["--model_name_or_path", str(checkpoint)]
    with pytest.raises(ValueError, match=rf"{train} has 1 class \['zooming'\]"):
        load_script().main(args + ["--ignore_mismatched_sizes"])


def test_an_evaluation_where_no_clip_decodes_stops_with_an_error(data_dir, backbone_dir, tmp_path):
    broken = tmp_path / "broken"
    for label in ("growing", "shrinking"):
        (broken / label).mkdir(parents=True)
        (broken / label / "clip.mp4").write_bytes(b"\x00" * 500)
    args = base_args(data_dir, backbone_dir, tmp_path / "out", "--do_eval")
    args[args.index("--validation_dir") + 1] = str(broken)
    args[args.index("--train_dir") + 1] = str(broken)
    args[args.index("--test_dir") : args.index("--test_dir") + 2] = []
    with pytest.raises(ValueError, match="None of the 2 evaluation clips could be decoded"):
        load_script().main(args)


@pytest.mark.parametrize("family", ["siglip", "dinov2_with_registers"])
def test_training_from_another_backbone_family_with_its_processor_and_the_feature_cache(data_dir, tmp_path, family):
    """--backbone of a SigLIP / DINOv2-with-registers tower that ships its image processor: the script builds EVL and
    the processor from them, caches features (SigLIP has no class token, DINOv2 a class token and two registers) and
    trains from the cache; cached logits equal direct ones."""
    from transformers import BitImageProcessor, Dinov2WithRegistersConfig, SiglipImageProcessor, SiglipVisionConfig

    from evl_hf.backbone_families import backbone_family

    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, patch_size=8)
    if family == "siglip":
        vision_config, image_processor = SiglipVisionConfig(image_size=32, **shape), SiglipImageProcessor(size={"height": 32, "width": 32})
    else:
        vision_config = Dinov2WithRegistersConfig(image_size=48, num_register_tokens=2, **shape)
        image_processor = BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    torch.manual_seed(0)
    backbone_family(vision_config).build(vision_config).save_pretrained(tmp_path / "backbone")
    image_processor.save_pretrained(tmp_path / "backbone")
    trainer = load_script().main(
        base_args(data_dir, tmp_path / "backbone", tmp_path / "run", "--do_train", "--do_eval", "--max_steps", "2",
                  "--cache_backbone_features", "true", "--feature_cache_dtype", "float32", "--save_strategy", "no",
                  "--feature_cache_dir", str(tmp_path / "feature-cache"))
    )  # fmt: skip
    model, processor = trainer.model.eval(), trainer.processing_class
    assert model.config.vision_config.model_type == vision_config.model_type and model.config.frame_size == 32
    assert list(processor.image_mean) == pytest.approx(list(image_processor.image_mean))
    assert processor.num_frames == 4 and processor.sampling_rate == 2
    first = trainer.train_dataset[0]
    assert first["frame_features"].shape[-2] == model.config.num_prefix_tokens + 16
    clip = sorted((data_dir / "train").rglob("*.mp4"))[0]
    with torch.no_grad():
        from_cache = model(frame_features=first["frame_features"][None], cross_frame_maps=first["cross_frame_maps"][None]).logits
        direct = model(processor(str(clip), return_tensors="pt")["pixel_values"]).logits
    torch.testing.assert_close(from_cache, direct, atol=1e-5, rtol=1e-5)
    assert json.loads((tmp_path / "run" / "all_results.json").read_text())["eval_top1_accuracy"] >= 0


def test_a_dinov2_backbone_at_another_image_size_gets_its_processor_scaled_to_it(data_dir, tmp_path, caplog):
    """`image_size=` in --config_overrides runs DINOv2 at another resolution: the processor built from the backbone's
    image processor (a 32 crop of a 36 short side) crops at that size, its resize scaled by as much."""
    import logging

    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                             patch_size=8, image_size=32)).save_pretrained(tmp_path / "backbone")  # fmt: skip
    BitImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path / "backbone")
    args = base_args(data_dir, tmp_path / "backbone", tmp_path / "run", "--do_train", "--do_eval", "--max_steps", "1",
                     "--save_strategy", "no")  # fmt: skip
    args[args.index("--config_overrides") + 1] += ",image_size=48"
    with caplog.at_level(logging.WARNING, logger="evl_hf.run_video_classification"):
        trainer = load_script().main(args)
    processor = trainer.processing_class
    assert trainer.model.config.frame_size == 48
    assert (processor.size.shortest_edge, processor.crop_size.height, processor.crop_size.width) == (54, 48, 48)
    assert ("its image processor crops 32x32 frames, the model reads 48x48 (its image_size); the video processor crops "
            "those, after resizing the short side to 54") in caplog.text
    saved = json.loads((tmp_path / "run" / "video_preprocessor_config.json").read_text())
    assert (saved["size"]["shortest_edge"], saved["crop_size"]["height"]) == (54, 48)


TEMPORAL_MODULES_OFF = "use_temporal_conv=false,use_temporal_pos_embed=false,use_temporal_cross_attention=false"


def randomized_checkpoint(backbone_dir, output_dir, temporal_modules: bool) -> Path:
    """An EVL checkpoint whose decoder and head have random non-zero weights (fresh ones give every clip about the
    same prediction), with or without its temporal modules."""
    from helpers import randomize_decoder

    from evl_hf import EVLVideoProcessor

    switches = {} if temporal_modules else {name: False for name in ("use_temporal_conv", "use_temporal_pos_embed", "use_temporal_cross_attention")}
    names = sorted(MOTION_CLASSES)
    torch.manual_seed(0)  # the head's initialisation
    model = EVLForVideoClassification.from_backbone_pretrained(
        str(backbone_dir), num_frames=4, decoder_num_layers=2, decoder_qkv_dim=32, decoder_num_heads=4,
        id2label=dict(enumerate(names)), label2id={name: i for i, name in enumerate(names)}, **switches,
    )  # fmt: skip
    randomize_decoder(model, seed=1, scale=1.0)
    with torch.no_grad():
        model.classifier.bias.zero_()  # a random bias would outweigh what the clips say
    model.save_pretrained(output_dir)
    EVLVideoProcessor.from_model_config(model.config, sampling_rate=2).save_pretrained(output_dir)
    return output_dir


def evaluate_temporal_reliance(data_dir, backbone_dir, checkpoint, output, *flags):
    args = base_args(data_dir, backbone_dir, output, "--do_eval", "--temporal_reliance", *flags)
    args[args.index("--backbone") : args.index("--backbone") + 2] = ["--model_name_or_path", str(checkpoint)]
    args[args.index("--config_overrides") : args.index("--config_overrides") + 2] = []
    load_script().main(args)
    results = json.loads((output / "all_results.json").read_text())
    with open(output / "eval_predictions.csv", newline="") as handle:
        predictions = list(csv.DictReader(handle))
    return results, predictions


def test_temporal_reliance_of_a_model_without_temporal_modules_is_none(data_dir, backbone_dir, tmp_path):
    """Without its temporal modules the decoder attends over the set of all frames' tokens: reversed and shuffled
    frames give the in-order predictions, clip by clip. Two temporal views per clip: (batch, views, frames, ...)."""
    from huggingface_hub import ModelCard

    checkpoint = randomized_checkpoint(backbone_dir, tmp_path / "no-temporal", temporal_modules=False)
    output = tmp_path / "run"
    results, predictions = evaluate_temporal_reliance(data_dir, backbone_dir, checkpoint, output, "--num_temporal_views", "2")
    for k in (1, 5):
        in_order = results[f"eval_top{k}_accuracy"]
        assert results[f"eval_reversed_top{k}_accuracy"] == results[f"eval_shuffled_top{k}_accuracy"] == in_order, k
    for order in ("reversed", "shuffled"):
        # Only the order of float sums differs.
        assert results[f"eval_{order}_loss"] == pytest.approx(results["eval_loss"], rel=1e-5, abs=1e-6), order
    assert len(predictions) == 10  # the validation file with a cut header is left out, as in the metrics
    assert all(row["predicted"] == row["predicted_reversed"] == row["predicted_shuffled"] for row in predictions)
    assert len({row["predicted"] for row in predictions}) > 1  # a model that tells clips apart
    assert {Path(row["clip"]).parent.name for row in predictions} == {row["label"] for row in predictions} == set(MOTION_CLASSES)
    eval_results = json.loads((output / "eval_results.json").read_text())
    assert {key for key in eval_results if "reversed" in key or "shuffled" in key} == {
        f"eval_{order}_{metric}" for order in ("reversed", "shuffled") for metric in ("loss", "top1_accuracy", "top5_accuracy")
    }
    card = ModelCard.load(output / "README.md")
    section = card.text.split("## How much does this model use time?")[1].split("\n## ")[0]
    top1 = f"{results['eval_top1_accuracy']:.4f}"
    for order in ("in order", "reversed", "shuffled"):
        assert f"| {order} | {top1} |" in section, order
    assert "ignores the order of the frames scores the same on all three" in section
    assert (output / "eval_confusion_matrix.png").exists()


def test_temporal_reliance_of_a_model_with_temporal_modules_sees_the_order(data_dir, backbone_dir, tmp_path):
    checkpoint = randomized_checkpoint(backbone_dir, tmp_path / "temporal", temporal_modules=True)
    # Training's loader settings and per-batch predictions leave the evaluation's clips, rows and files whole.
    results, predictions = evaluate_temporal_reliance(
        data_dir, backbone_dir, checkpoint, tmp_path / "run", "--per_device_eval_batch_size", "3",
        "--dataloader_drop_last", "true", "--eval_do_concat_batches", "false",
    )  # fmt: skip
    assert [Path(row["clip"]).parent.name for row in predictions] == [row["label"] for row in predictions]
    # The temporal convolution, position embeddings and cross-frame attention read the order: other logits (an
    # untrained model's top-1 classes may not change, its loss does).
    for order in ("reversed", "shuffled"):
        assert abs(results[f"eval_{order}_loss"] - results["eval_loss"]) > 1e-3, order
        assert 0 <= results[f"eval_{order}_top1_accuracy"] <= 1
    assert len(predictions) == 10 and all(row["predicted_reversed"] in MOTION_CLASSES for row in predictions)


def test_temporal_reliance_settings_it_cannot_evaluate_are_refused(data_dir, backbone_dir, tmp_path):
    with pytest.raises(ValueError, match="--temporal_reliance evaluates the validation clips.*needs --do_eval"):
        load_script().main(base_args(data_dir, backbone_dir, tmp_path / "no-eval", "--do_train", "--temporal_reliance"))
    args = base_args(data_dir, backbone_dir, tmp_path / "one-frame", "--do_eval", "--temporal_reliance")
    args[args.index("--num_frames") + 1] = "1"
    with pytest.raises(ValueError, match="samples 1 frame per clip: reversing or shuffling it changes nothing"):
        load_script().main(args)


@pytest.mark.parametrize("num_classes", [10, 400])
def test_the_confusion_matrix_picture_shows_the_matrix(tmp_path, num_classes):
    from matplotlib import colormaps
    from PIL import Image

    from evl_hf.training import plot_confusion_matrix

    darkest = np.array(colormaps["Blues"](1.0)[:3]) * 255  # the colour of a row whose clips all went to one class
    names = [f"class_{i}" for i in range(num_classes)]
    diagonal = np.diag(np.arange(1, num_classes + 1))
    correlations = {}
    for name, matrix in (("diagonal", diagonal), ("anti-diagonal", np.fliplr(diagonal))):
        with Image.open(plot_confusion_matrix(matrix, names, tmp_path / f"{name}.png")) as image:
            assert image.format == "PNG" and 500 <= min(image.size) and max(image.size) <= 2000, image.size
            pixels = np.asarray(image.convert("RGB"), dtype=float)
        rows, columns = np.nonzero(np.linalg.norm(pixels - darkest, axis=-1) < 40)
        # The colour bar, right of the matrix behind a gap, has the darkest colour at its top: leave it out.
        used = np.unique(columns)
        matrix_area = columns <= used[np.argmax(np.diff(used))]
        correlations[name] = np.corrcoef(columns[matrix_area], rows[matrix_area])[0, 1]
    # Rows are true classes top to bottom, columns predicted classes left to right.
    assert correlations["diagonal"] > 0.95 and correlations["anti-diagonal"] < -0.95, correlations


def test_clips_without_file_names_keep_their_rows_under_max_eval_samples(data_dir, backbone_dir, tmp_path):
    # "#N" in eval_predictions.csv is the clip's row in the data set, not its place in the shuffled selection.
    from datasets import ClassLabel, Dataset, Features, Video

    videos = sorted((data_dir / "validation").rglob("*_0000.mp4"))[:6]
    labels = [0, 1, 0, 1, 0, 1]
    features = Features({"video": Video(decode=False), "label": ClassLabel(names=["cat", "dog"])})
    stored = Dataset.from_dict({"video": [{"bytes": v.read_bytes(), "path": None} for v in videos], "label": labels},
                               features=features)  # fmt: skip
    (tmp_path / "data" / "data").mkdir(parents=True)
    stored.to_parquet(str(tmp_path / "data" / "data" / "validation-00000-of-00001.parquet"))
    args = base_args(data_dir, backbone_dir, tmp_path / "out", "--do_eval", "--max_eval_samples", "4")
    for flag in ("--train_dir", "--validation_dir", "--test_dir"):
        del args[args.index(flag) : args.index(flag) + 2]
    load_script().main([*args, "--dataset_name", str(tmp_path / "data")])
    with open(tmp_path / "out" / "eval_predictions.csv", newline="") as handle:
        written = [(int(row["clip"][1:]), row["label"]) for row in csv.DictReader(handle)]
    assert len(written) == 4
    assert all(name == ["cat", "dog"][labels[row]] for row, name in written), written


def predict(checkpoint, output, *data_flags) -> tuple[dict, dict]:
    """`--do_predict` with a checkpoint: the results and {clip file name: (label, predicted)}."""
    load_script().main([
        "--model_name_or_path", str(checkpoint), "--output_dir", str(output), "--do_predict", *data_flags,
        "--per_device_eval_batch_size", "4", "--report_to", "none", "--dataloader_num_workers", "0",
        "--disable_tqdm", "true",
    ])  # fmt: skip
    with open(output / "test_predictions.csv", newline="") as handle:
        rows = {Path(row["clip"]).name: (row["label"], row["predicted"]) for row in csv.DictReader(handle)}
    return json.loads((output / "all_results.json").read_text()), rows


def test_clips_without_labels_are_predicted_as_the_labeled_ones(data_dir, backbone_dir, tmp_path):
    """Every way of giving test clips without labels (a flat folder, a list of paths, the -1 label of `datasets`, a
    data set's split without a label column) predicts what the labeled test split predicts, clip by clip, with no
    score and the broken file counted. Before, a -1 label crashed the run after predicting."""
    checkpoint = randomized_checkpoint(backbone_dir, tmp_path / "checkpoint", temporal_modules=True)
    results, labeled = predict(checkpoint, tmp_path / "labeled", "--test_dir", str(data_dir / "test"))
    assert results["test_unusable_clips"] == 0 and "test_top1_accuracy" in results
    assert all(label for label, _ in labeled.values()) and len(set(p for _, p in labeled.values())) > 1

    clips = sorted((data_dir / "test").rglob("*.mp4"))
    flat = tmp_path / "flat"
    flat.mkdir()
    for clip in clips:
        shutil.copy(clip, flat / clip.name)
    (flat / "broken.mp4").write_bytes(clips[0].read_bytes()[:300])
    (tmp_path / "paths.txt").write_text("".join(f"{flat / clip.name}\n" for clip in clips))
    (tmp_path / "minus_one.txt").write_text("".join(f"{flat / clip.name} -1\n" for clip in clips))
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "test.jsonl").write_text("\n".join(json.dumps({"video": str(flat / clip.name)}) for clip in clips))
    for name, flags in (("flat", ["--test_dir", str(flat)]), ("paths", ["--test_list", str(tmp_path / "paths.txt")]),
                        ("minus_one", ["--test_list", str(tmp_path / "minus_one.txt")]),
                        ("hub", ["--dataset_name", str(hub)])):  # fmt: skip
        output = tmp_path / f"out-{name}"
        results, unlabeled = predict(checkpoint, output, *flags)
        assert results["test_unusable_clips"] == (name == "flat")
        assert not [key for key in results if key.endswith(("accuracy", "loss"))]
        assert unlabeled == {clip: ("", predicted) for clip, (_, predicted) in labeled.items()}, name
        assert not (output / "test_confusion_matrix.csv").exists()


def test_batch_eval_metrics_give_the_scores_of_a_whole_set_evaluation(data_dir, backbone_dir, tmp_path):
    # `--batch_eval_metrics` crashed every evaluation: EVLTrainer's metrics did not take `compute_result`.
    checkpoint = randomized_checkpoint(backbone_dir, tmp_path / "checkpoint", temporal_modules=True)
    results = {
        flag: predict(checkpoint, tmp_path / flag, "--test_dir", str(data_dir / "test"), "--batch_eval_metrics", flag)
        for flag in ("false", "true")
    }
    scores = ("test_loss", "test_top1_accuracy", "test_top5_accuracy")
    expected = {key: results["false"][0][key] for key in scores}
    assert {key: results["true"][0][key] for key in scores} == pytest.approx(expected)
    assert results["true"][1] == results["false"][1]


def test_a_data_set_test_split_labeled_minus_one_next_to_a_labeled_one_and_another_label_order(
    data_dir, backbone_dir, tmp_path
):
    """A `datasets` data set with a labeled validation split and a test split of -1 labels, evaluated and predicted
    in one run by a checkpoint whose classes are in another order than the data set's: the labeled split is mapped to
    the checkpoint's classes by name, the other keeps -1. Before, `align_labels_with_mapping` crashed on the -1."""
    checkpoint = randomized_checkpoint(backbone_dir, tmp_path / "checkpoint", temporal_modules=True)
    config = json.loads((checkpoint / "config.json").read_text())
    names = sorted(MOTION_CLASSES, reverse=True)
    config["id2label"] = {str(i): name for i, name in enumerate(names)}
    config["label2id"] = {name: i for i, name in enumerate(names)}
    (checkpoint / "config.json").write_text(json.dumps(config))
    from datasets import ClassLabel, Dataset, Features, Value

    hub = tmp_path / "hub"
    features = Features({"video": Value("string"), "label": ClassLabel(names=sorted(MOTION_CLASSES))})
    clips = sorted((data_dir / "test").rglob("*.mp4"))
    for split, unlabeled in (("validation", False), ("test", True)):
        labels = [-1 if unlabeled else sorted(MOTION_CLASSES).index(clip.parent.name) for clip in clips]
        data = Dataset.from_dict({"video": [str(clip) for clip in clips], "label": labels}, features=features)
        data.to_parquet(str(hub / f"{split}.parquet"))
    results, predicted = predict(checkpoint, tmp_path / "out", "--dataset_name", str(hub), "--do_eval")
    assert "eval_top1_accuracy" in results and not [key for key in results if key.startswith("test_") and "accuracy" in key]
    with open(tmp_path / "out" / "eval_predictions.csv", newline="") as handle:
        evaluated = {Path(row["clip"]).name: (row["label"], row["predicted"]) for row in csv.DictReader(handle)}
    assert all(label == name.rsplit("_", 1)[0] for name, (label, _) in evaluated.items())
    assert predicted == {name: ("", prediction) for name, (_, prediction) in evaluated.items()}


def test_clips_without_labels_are_refused_where_labels_are_needed(data_dir, backbone_dir, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(next((data_dir / "test").rglob("*.mp4")), flat / "clip.mp4")
    # A new model has no classes to learn from unlabeled clips.
    with pytest.raises(ValueError, match="no labeled clips"):
        load_script().main(["--backbone", str(backbone_dir), "--test_dir", str(flat), "--do_predict",
                            "--output_dir", str(tmp_path / "out"), "--report_to", "none"])  # fmt: skip
    # Only a test split can go without labels, and a test split is labeled throughout or not at all.
    args = base_args(data_dir, backbone_dir, tmp_path / "out", "--do_eval")
    args[args.index("--validation_dir") + 1] = str(flat)
    with pytest.raises(ValueError, match="one sub-folder per label"):
        load_script().main(args)
    mixed = tmp_path / "mixed"
    shutil.copytree(data_dir / "test", mixed)
    shutil.copy(flat / "clip.mp4", mixed / "loose.mp4")
    args = base_args(data_dir, backbone_dir, tmp_path / "out", "--do_predict")
    args[args.index("--test_dir") + 1] = str(mixed)
    with pytest.raises(ValueError, match="1 video file.* lie directly in the folder.*all directly in it"):
        load_script().main(args)


LEAVE_PROCESS_GROUP = """
import os, sys, torch
import torch.distributed as dist
from evl_hf.run_video_classification import leave_process_group, run

def gloo_threads():
    return [name for name in (open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
            if "gloo" in name]

dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[1]}", rank=0, world_size=1)
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
model.cycle = [model]  # unreachable garbage once dropped, as a finished Trainer's DDP wrapper is
model(torch.ones(1, 2)).sum().backward()
if sys.argv[2] == "run":
    # `run` leaves the group also when training raised.
    def failing_main():
        raise RuntimeError("training failed")
    sys.modules["evl_hf.run_video_classification"].main = failing_main
    del model
    try:
        run()
    except RuntimeError:
        pass
else:
    dist.destroy_process_group()  # as Trainer.end() does
    before = gloo_threads()
    del model
    leave_process_group()
    assert before, "the destroyed group's threads ran on while the wrapper held it"
assert not gloo_threads(), gloo_threads()
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from /proc")
@pytest.mark.parametrize("case", ["destroyed already", "run"])
def test_leaving_the_process_group_frees_gloo_threads(case):
    # A process group freed in the interpreter's teardown can abort a rank after a successful run; leave_process_group
    # frees it before, also when it was destroyed already (Trainer.end) or when training raised (run).
    port = 29650 + (case == "run")
    result = subprocess.run(
        [sys.executable, "-c", LEAVE_PROCESS_GROUP, str(port), case.split()[0]],
        capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
