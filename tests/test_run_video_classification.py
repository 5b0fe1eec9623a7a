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
from helpers import save_tiny_backbone
from huggingface_hub import HfApi
from huggingface_hub.hf_api import CommitInfo, RepoUrl
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
    # 2 unusable training clips, seen once per epoch; the validation file with a cut header is skipped too.
    assert results["train_skipped_clips"] == 4
    assert results["eval_skipped_clips"] == 1 and results["test_skipped_clips"] == 0
    for key in ("eval_top1_accuracy", "eval_top5_accuracy", "test_top1_accuracy", "test_top5_accuracy", "train_loss"):
        assert key in results and 0 <= results[key] <= (1 if "accuracy" in key else 100)
    per_class = json.loads((output / "eval_per_class_accuracy.json").read_text())
    assert sorted(per_class) == sorted(MOTION_CLASSES)
    rows = (output / "eval_confusion_matrix.csv").read_text().splitlines()
    assert len(rows) == 11 and sum(int(v) for row in rows[1:] for v in row.split(",")[1:]) == 10
    assert trainer.model.evl.vision_model.training is False
    # The saved run is a complete checkpoint: model, config, video processor, card.
    card = (output / "README.md").read_text()
    assert "pipeline_tag: video-classification" in card and f"base_model: {backbone_dir}" in card
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
    assert json.loads((tmp_path / "second" / "eval_results.json").read_text())["eval_skipped_clips"] == 1


def test_bf16_mixed_precision_training(data_dir, backbone_dir, tmp_path):
    trainer = load_script().main(
        base_args(data_dir, backbone_dir, tmp_path / "bf16", "--do_train", "--max_steps", "2", "--bf16", "true", "--use_cpu", "true",
                  "--save_strategy", "no", "--rand_augment", "false")
    )  # fmt: skip
    assert trainer.args.bf16 and trainer.state.global_step == 2
    assert json.loads((tmp_path / "bf16" / "train_results.json").read_text())["train_loss"] > 0
    assert trainer.model.classifier.weight.dtype == torch.float32  # mixed precision: float32 master weights


def test_config_overrides_are_typed():
    overrides = load_script().parse_overrides("use_temporal_conv=false,decoder_num_layers=2,decoder_mlp_factor=2.5")
    assert overrides == {"use_temporal_conv": False, "decoder_num_layers": 2, "decoder_mlp_factor": 2.5}
    with pytest.raises(ValueError, match="key=value"):
        load_script().parse_overrides("decoder_num_layers")


def test_feature_cache_training_matches_the_uncached_model(data_dir, backbone_dir, tmp_path):
    trainer = load_script().main(
        base_args(data_dir, backbone_dir, tmp_path / "cached", "--do_train", "--do_eval", "--max_steps", "3",
                  "--cache_backbone_features", "true", "--feature_cache_dtype", "float32", "--save_strategy", "no")
    )  # fmt: skip
    cached = trainer.train_dataset
    assert len(cached) == 20  # the two unusable clips are skipped at caching time
    model = trainer.model.eval()
    first = cached[0]
    clip = sorted((data_dir / "train").rglob("*.mp4"))
    with torch.no_grad():
        from_cache = model(frame_features=first["frame_features"][None], cross_frame_maps=first["cross_frame_maps"][None]).logits
        features = model.evl.extract_backbone_features(trainer.processing_class(str(clip[0]), num_frames=4, sampling_rate=2, return_tensors="pt")["pixel_values"])
        direct = model(frame_features=features.frame_features, cross_frame_maps=features.cross_frame_maps).logits
    assert first["labels"] == 0
    torch.testing.assert_close(from_cache, direct, atol=1e-5, rtol=1e-5)


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


def test_push_to_hub_through_trainer_writes_a_loadable_repository(data_dir, backbone_dir, tmp_path, monkeypatch):
    import transformers.utils.hub as hub

    import huggingface_hub.hf_api

    fake = LocalHubApi(tmp_path / "hub")
    monkeypatch.setattr(hub, "_hf_api", fake)
    # huggingface_hub's single-commit upload path (the one it takes without hf_xet): files reach `create_commit`.
    monkeypatch.setattr(huggingface_hub.hf_api, "is_xet_available", lambda: False)
    load_script().main(
        base_args(data_dir, backbone_dir, tmp_path / "out", "--do_train", "--do_eval", "--max_steps", "2",
                  "--save_strategy", "no", "--push_to_hub", "--hub_model_id", "someone/evl-tiny-motion")
    )  # fmt: skip
    repo = tmp_path / "hub" / "someone" / "evl-tiny-motion"
    assert fake.commits and {"model.safetensors", "config.json", "README.md", "video_preprocessor_config.json"} <= set(fake.commits[-1][1])
    card = (repo / "README.md").read_text()
    assert "pipeline_tag: video-classification" in card and f"base_model: {backbone_dir}" in card
    assert fake.validated_cards and fake.validated_cards[-1] == card
    assert "videofolder" in card and "learning_rate: 0.001" in card and "Loss" in card
    result = pipeline("video-classification", model=str(repo))(str(next((data_dir / "test").rglob("*.mp4"))), top_k=2)
    assert len(result) == 2 and result[0]["label"] in MOTION_CLASSES


def test_two_process_data_parallel_training_keeps_replicas_identical(data_dir, backbone_dir, tmp_path):
    output = tmp_path / "ddp"
    command = [
        # `--cpu` selects accelerate's single-process launcher; `--multi_gpu` launches the processes through torchrun,
        # and with `--use_cpu` they train data-parallel on the CPU (gloo), as on a machine without GPUs.
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
        str(ROOT / "tests" / "scripts" / "ddp_train_and_hash.py"),
        *base_args(data_dir, backbone_dir, output, "--do_train", "--max_steps", "3", "--save_strategy", "no",
                   "--gradient_accumulation_steps", "2", "--per_device_train_batch_size", "2", "--use_cpu", "true"),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    digests = [(output / f"weights_rank{rank}_of_2.sha256").read_text() for rank in (0, 1)]
    assert digests[0] == digests[1]
    initial = EVLForVideoClassification.from_backbone_pretrained(backbone_dir, num_frames=4, decoder_num_layers=2, decoder_qkv_dim=32, decoder_num_heads=4, num_labels=10)
    trained = load_file(output / "model.safetensors")
    assert not torch.equal(trained["classifier.weight"], initial.state_dict()["classifier.weight"])


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
