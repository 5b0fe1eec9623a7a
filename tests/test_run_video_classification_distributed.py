"""
Real multi-process runs of the training script on the CPU (gloo), launched as users launch them: through
`accelerate launch --multi_gpu --num_processes 2 ... --use_cpu true` and through `torchrun --nproc_per_node 2`.
Each is compared with single-process runs of the same global batch.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import save_tiny_backbone
from safetensors.torch import load_file

from evl_hf.data.synthetic import MOTION_CLASSES, generate_motion_dataset
from evl_hf.run_video_classification import main as run_script


ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "scripts" / "ddp_train_and_hash.py"
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """12 training clips (2 unusable), 11 validation clips (2 unusable) and 11 test clips without labels (1 unusable):
    11 does not divide into 2 x 2 batches."""
    root = generate_motion_dataset(tmp_path_factory.mktemp("motion"), 1, 1, 0, num_frames=12, size=32, seed=3)
    (root / "train" / "growing" / "random_bytes.mp4").write_bytes(np.random.default_rng(0).bytes(3000))
    good = (root / "train" / "appearing" / "appearing_0000.mp4").read_bytes()
    (root / "train" / "shrinking" / "truncated.mp4").write_bytes(good[: len(good) // 3])
    (root / "validation" / "moving_up" / "moving_up_0000.mp4").unlink()
    (root / "validation" / "appearing" / "empty.mp4").write_bytes(b"")
    (root / "validation" / "rotating_clockwise" / "truncated_header.mp4").write_bytes(good[:200])
    # 11 test clips without labels (1 unusable), as a folder of loose clips: predicted, not scored.
    unlabeled = root / "unlabeled"
    unlabeled.mkdir()
    for clip in (root / "train").rglob("*_0000.mp4"):
        (unlabeled / clip.name).write_bytes(clip.read_bytes())
    (unlabeled / "truncated.mp4").write_bytes(good[: len(good) // 3])
    return root


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory):
    return save_tiny_backbone(tmp_path_factory.mktemp("clip"))


def script_args(data_dir, backbone_dir, output_dir, *extra):
    return [
        "--backbone", str(backbone_dir), "--train_dir", str(data_dir / "train"),
        "--validation_dir", str(data_dir / "validation"), "--output_dir", str(output_dir),
        "--config_overrides", "decoder_num_layers=2,decoder_qkv_dim=32,decoder_num_heads=4,decoder_mlp_dropout=0.0,"
        "classifier_dropout=0.0", "--num_frames", "4", "--sampling_rate", "2", "--report_to", "none", "--seed", "7",
        "--dataloader_num_workers", "0", "--disable_tqdm", "true", "--save_strategy", "no", "--use_cpu", "true",
        *extra,
    ]  # fmt: skip


def launch(launcher: str, args: list[str], port: int, cwd: Path | None = None) -> str:
    if launcher == "accelerate":
        # `--cpu` would start one process only; `--multi_gpu` with `--use_cpu` trains data-parallel on the CPU (gloo).
        prefix = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "--main_process_port", str(port)]  # fmt: skip
    else:
        prefix = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    env = ENV
    if cwd is not None:  # the package under test, also where a relative PYTHONPATH would point elsewhere
        env = dict(ENV, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), *filter(None, [ENV.get("PYTHONPATH")])]))
    result = subprocess.run([*prefix, str(WORKER), *args], capture_output=True, text=True, env=env, timeout=600, cwd=cwd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result.stderr


def step_losses(log_history: list[dict]) -> list[float]:
    return [entry["loss"] for entry in log_history if "loss" in entry]


# 12 training clips in optimizer steps of a global batch of 4 (epoch 0: steps 1-3, epoch 1: steps 4-5), then
# evaluation in batches of 2, with the frames in order, reversed and shuffled.
SGD_STEPS = ("--do_train", "--do_eval", "--max_steps", "5", "--optim", "sgd", "--learning_rate", "0.5",
             "--lr_scheduler_type", "constant", "--weight_decay", "0", "--logging_steps", "1",
             "--per_device_eval_batch_size", "2", "--temporal_reliance")  # fmt: skip
EVAL_ACCURACIES = [f"eval{order}_top{k}_accuracy" for order in ("", "_reversed", "_shuffled") for k in (1, 5)]


def predict_unlabeled(data_dir):
    return ("--do_predict", "--test_dir", str(data_dir / "unlabeled"))


def test_one_global_batch_is_the_same_over_processes_and_accumulation(data_dir, backbone_dir, tmp_path, caplog):
    """
    1 process x batch 4, 1 x batch 1 x accumulation 4, 2 processes x batch 2 (accelerate launch) and 2 x batch 1 x
    accumulation 2 (torchrun) log the same loss at every step and reach the same weights after five SGD steps over
    two epochs with gradient clipping; the replicas of a run are identical; every run counts the 2 unusable training
    clips; the evaluation with unusable clips, split unevenly over 2 processes, gives the single-process metrics and
    per-clip predictions, also with the frames reversed and shuffled (`--temporal_reliance`); a 2-process run resumed
    mid-epoch 1 ends where the uninterrupted one does.
    """
    import logging
    import shutil

    save = ("--save_strategy", "steps", "--save_steps", "4")
    runs = {
        "1x4": ("in-process", ("--per_device_train_batch_size", "4")),
        "1x1x4": ("in-process", ("--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "4")),
        "2x2": ("accelerate", ("--per_device_train_batch_size", "2", *save)),
        "2x1x2": ("torchrun", ("--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2")),
        "2x2-resumed": ("accelerate", ("--per_device_train_batch_size", "2", *save)),
    }
    results, losses, weights, logs = {}, {}, {}, {}
    for port, (name, (launcher, batch)) in enumerate(runs.items(), 29611):
        output = tmp_path / name
        args = script_args(data_dir, backbone_dir, output, *SGD_STEPS, *batch, *predict_unlabeled(data_dir))
        if name == "2x2-resumed":  # the same command over a copy of the 2x2 run's mid-epoch-1 checkpoint
            shutil.copytree(tmp_path / "2x2" / "checkpoint-4", output / "checkpoint-4")
        if launcher == "in-process":
            with caplog.at_level(logging.WARNING, logger="evl_hf"):
                trainer = run_script(args)
            history = trainer.state.log_history
        else:
            logs[name] = launch(launcher, args, port)
            digests = {(output / f"weights_rank{rank}_of_2.sha256").read_text() for rank in (0, 1)}
            assert len(digests) == 1, f"{name}: the replicas differ"
            history = json.loads((output / "log_history_rank0_of_2.json").read_text())
        results[name] = json.loads((output / "all_results.json").read_text())
        losses[name] = step_losses(history)
        weights[name] = load_file(output / "model.safetensors")

    reference = "1x4"
    assert len(losses[reference]) == 5
    initial_loss = losses[reference][0]
    # A data set with 2 of 12 clips unusable is reported loudly, besides the one warning per clip.
    assert "2 of the 12 training clips could not be decoded and were replaced" in caplog.text
    resumed, uninterrupted = weights.pop("2x2-resumed"), weights["2x2"]
    assert "Resuming training from" in logs["2x2-resumed"] and "Resuming training from" not in logs["2x2"]
    assert losses["2x2-resumed"] == losses["2x2"]  # steps 1-4 come from the checkpoint's log history
    for key, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[key], tensor, atol=0, rtol=0, msg=f"resumed: {key}")
    for metric in ("eval_loss", *EVAL_ACCURACIES, "eval_unusable_clips", "train_unusable_clips"):
        assert results["2x2-resumed"][metric] == results["2x2"][metric], metric
    for name in weights:
        np.testing.assert_allclose(losses[name], losses[reference], rtol=1e-5, err_msg=name)
        assert results[name]["train_unusable_clips"] == 2, name
        assert results[name]["eval_unusable_clips"] == 2, name
        for metric in EVAL_ACCURACIES:
            assert results[name][metric] == results[reference][metric], (name, metric)
        for metric in ("eval_loss", "eval_reversed_loss", "eval_shuffled_loss"):
            assert results[name][metric] == pytest.approx(results[reference][metric], rel=1e-5), (name, metric)
        predictions = (tmp_path / name / "eval_predictions.csv").read_text().splitlines()
        assert predictions == (tmp_path / reference / "eval_predictions.csv").read_text().splitlines(), name
        assert predictions[0] == "clip,label,predicted,predicted_reversed,predicted_shuffled" and len(predictions) == 10
        # The test clips without labels: the same predictions, the unusable one counted once, no score.
        assert results[name]["test_unusable_clips"] == 1, name
        assert not [key for key in results[name] if key.startswith("test_") and key.endswith(("accuracy", "loss"))]
        predictions = (tmp_path / name / "test_predictions.csv").read_text().splitlines()
        assert predictions == (tmp_path / reference / "test_predictions.csv").read_text().splitlines(), name
        assert len(predictions) == 11 and all(row.split(",")[1] == "" for row in predictions[1:]), name
        for key, tensor in weights[reference].items():
            torch.testing.assert_close(weights[name][key], tensor, atol=2e-6, rtol=1e-5, msg=f"{name}: {key}")
    assert initial_loss == pytest.approx(np.log(len(MOTION_CLASSES)), rel=0.2)  # a fresh head: about log(10)
    assert not torch.equal(weights[reference]["classifier.weight"], torch.zeros_like(weights[reference]["classifier.weight"]))


def test_feature_cache_built_by_two_processes_equals_the_single_process_one(data_dir, backbone_dir, tmp_path):
    cache_args = ("--do_train", "--max_steps", "1", "--per_device_train_batch_size", "2", "--cache_backbone_features",
                  "--feature_cache_dtype", "float32", "--per_device_eval_batch_size", "4")  # fmt: skip
    single = tmp_path / "single-cache"
    # One thread, as each launched process has (OMP_NUM_THREADS=1): the thread count changes float summation order.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_script(script_args(data_dir, backbone_dir, tmp_path / "single", *cache_args, "--feature_cache_dir", str(single)))
    finally:
        torch.set_num_threads(threads)
    double = tmp_path / "two-process-cache"
    launch("accelerate", script_args(data_dir, backbone_dir, tmp_path / "double", *cache_args, "--feature_cache_dir", str(double)), 29621)

    def read(root):
        (directory,) = [d for d in root.iterdir() if d.is_dir()]
        manifest = json.loads((directory / "cache.json").read_text())
        from datasets import Dataset, concatenate_datasets

        rows = concatenate_datasets([Dataset.from_file(str(directory / shard["file"])) for shard in manifest["shards"]])
        return directory.name, manifest, rows.with_format("numpy")[:]

    name_1, manifest_1, rows_1 = read(single)
    name_2, manifest_2, rows_2 = read(double)
    assert name_1 == name_2  # the same fingerprint
    assert len(manifest_1["shards"]) == 1 and len(manifest_2["shards"]) == 2
    assert manifest_1["unusable_clip_indices"] == manifest_2["unusable_clip_indices"] and len(manifest_1["unusable_clip_indices"]) == 2
    assert len(rows_1["frame_features"]) == 10 and "labels" not in rows_1  # labels are the data set's, added on reading
    for key in ("frame_features", "cross_frame_maps"):
        np.testing.assert_array_equal(rows_2[key], rows_1[key], err_msg=key)
    for run in ("single", "double"):
        saved = {p.name for p in (tmp_path / run).rglob("*")}
        assert not any("cache" in name or name.endswith((".arrow", ".lock")) for name in saved), saved
        assert json.loads((tmp_path / run / "train_results.json").read_text())["train_unusable_clips"] == 2


def test_a_trained_dinov2_backbone_under_checkpointing_is_the_same_over_two_processes(data_dir, tmp_path):
    """
    A backbone trained with the decoder (`freeze_backbone=false`) under activation checkpointing, where Trainer wraps
    the model in DDP without `find_unused_parameters`: DINOv2 with registers, whose final norm and mask token EVL
    never runs. 2 processes x batch 2 reach the weights of 1 x batch 4, backbone included.
    """
    from transformers import BitImageProcessor, Dinov2WithRegistersConfig

    from evl_hf.backbone_families import backbone_family

    config = Dinov2WithRegistersConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=3, num_attention_heads=4, num_register_tokens=2)  # fmt: skip
    torch.manual_seed(0)
    backbone_family(config).build(config).save_pretrained(tmp_path / "dinov2")
    BitImageProcessor(crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path / "dinov2")
    steps = ("--do_train", "--max_steps", "2", "--optim", "sgd", "--learning_rate", "0.5", "--lr_scheduler_type",
             "constant", "--weight_decay", "0", "--logging_steps", "1", "--activation_checkpointing", "true")  # fmt: skip

    def args(name, batch):
        arguments = script_args(data_dir, tmp_path / "dinov2", tmp_path / name, *steps, "--per_device_train_batch_size", batch)
        arguments[arguments.index("--config_overrides") + 1] += ",freeze_backbone=false"
        return arguments

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_script(args("single", "4"))
    finally:
        torch.set_num_threads(threads)
    launch("accelerate", args("double", "2"), 29631)
    single, double = load_file(tmp_path / "single" / "model.safetensors"), load_file(tmp_path / "double" / "model.safetensors")
    initial = load_file(tmp_path / "dinov2" / "model.safetensors")  # the backbone trained
    assert not torch.equal(single["evl.vision_model.encoder.layer.2.mlp.fc1.weight"], initial["encoder.layer.2.mlp.fc1.weight"])
    for key, tensor in single.items():
        torch.testing.assert_close(double[key], tensor, atol=2e-6, rtol=1e-5, msg=key)


def data_set_args(backbone_dir, output_dir, *extra):
    """`script_args` with the data from `--dataset_name` (given in `extra`) instead of the folders."""
    args = script_args(Path("unused"), backbone_dir, output_dir, *extra)
    for flag in ("--train_dir", "--validation_dir"):
        del args[args.index(flag) : args.index(flag) + 2]
    return args


def test_data_sets_read_by_datasets_are_the_same_over_two_processes(data_dir, backbone_dir, tmp_path, monkeypatch):
    """
    The clips of the train and validation folders (but moving_up, of which there is one clip) as one `datasets` data
    set, each clip labeled by a ClassLabel of the names sorted: a folder with a CSV of clip paths relative to it (a
    README's YAML gives the ClassLabel), loaded into the `datasets` cache, and the same rows saved with
    `Dataset.save_to_disk`. Each run splits half of the clips off as the validation split (`--train_val_split`),
    numbers the classes as `--class_names_file` does (reversed, one class more than the data) and reads the training
    clips in order (`--train_sampling_strategy sequential`). The CSV folder read from another directory in 1 process
    and in 2 (accelerate launch), and the saved data set in 2 (torchrun), give the same split, labels, weights,
    metrics and per-clip predictions.
    """
    hub, saved, elsewhere = tmp_path / "hub", tmp_path / "saved", tmp_path / "elsewhere"
    elsewhere.mkdir()
    clips = sorted(p for split in ("train", "validation") for p in (data_dir / split).rglob("*.mp4"))
    clips = [clip for clip in clips if clip.parent.name != "moving_up"]
    relative = [f"videos/{clip.parent.name}/{index:02d}.mp4" for index, clip in enumerate(clips)]
    for clip, path in zip(clips, relative):
        (hub / path).parent.mkdir(parents=True, exist_ok=True)
        (hub / path).write_bytes(clip.read_bytes())
    names = sorted({clip.parent.name for clip in clips})
    lines = [f"{path},{clip.parent.name}\n" for clip, path in zip(clips, relative)]
    (hub / "train.csv").write_text("video,label\n" + "".join(lines))
    features = [{"name": "video", "dtype": "string"},
                {"name": "label", "dtype": {"class_label": {"names": dict(enumerate(names))}}}]  # fmt: skip
    (hub / "README.md").write_text(f"---\ndataset_info: {json.dumps({'features': features})}\n---\n")  # YAML
    from datasets import ClassLabel, Dataset, Features, Value

    # The paths as the CSV's are read: from the folder, not from the current directory.
    original = {os.path.join(hub, path): clip.name for clip, path in zip(clips, relative)}
    rows = {"video": list(original), "label": [names.index(clip.parent.name) for clip in clips]}
    features = Features({"video": Value("string"), "label": ClassLabel(names=names)})
    Dataset.from_dict(rows, features=features).save_to_disk(saved)
    class_names = list(reversed(MOTION_CLASSES))
    (tmp_path / "classes.json").write_text(json.dumps(class_names))
    unusable = {"random_bytes.mp4", "truncated.mp4", "empty.mp4", "truncated_header.mp4"}
    steps = ("--do_train", "--do_eval", "--max_steps", "1", "--optim", "sgd", "--learning_rate", "0.5",
             "--lr_scheduler_type", "constant", "--weight_decay", "0", "--logging_steps", "1",
             "--per_device_eval_batch_size", "2", "--train_val_split", "0.5", "--train_sampling_strategy", "sequential",
             "--class_names_file", str(tmp_path / "classes.json"))  # fmt: skip

    def args(name, dataset, batch):
        return data_set_args(backbone_dir, tmp_path / name, *steps, "--dataset_name", str(dataset), "--cache_dir",
                             str(tmp_path / f"cache-{name}"), "--per_device_train_batch_size", batch)  # fmt: skip

    monkeypatch.chdir(elsewhere)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = run_script(args("1x4", hub, "4"))
    finally:
        torch.set_num_threads(threads)
    launch("accelerate", args("2x2", hub, "2"), 29641, cwd=elsewhere)
    launch("torchrun", args("2x2-saved", saved, "2"), 29642, cwd=elsewhere)

    from evl_hf.data.video_dataset import clip_names

    assert list(tmp_path.glob("cache-1x4/**/*.arrow")) and list(tmp_path.glob("cache-2x2/**/*.arrow"))  # by datasets
    assert trainer.run_arguments["train_val_split"] == 0.5
    training, validation = clip_names(trainer.train_dataset.dataset), clip_names(trainer.eval_dataset.dataset)
    assert len(training) == len(validation) == 11 and sorted(training + validation) == sorted(rows["video"])
    reference = "1x4"
    runs = ("1x4", "2x2", "2x2-saved")
    results = {name: json.loads((tmp_path / name / "all_results.json").read_text()) for name in runs}
    weights = {name: load_file(tmp_path / name / "model.safetensors") for name in results}
    for name in results:
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert [config["id2label"][str(i)] for i in range(len(class_names))] == class_names, name
        predictions = (tmp_path / name / "eval_predictions.csv").read_text().splitlines()
        # Each clip under its own class: the labels numbered as the class names file does.
        assert all(row.split(",")[1] == Path(row.split(",")[0]).parent.name for row in predictions[1:]), name
        assert predictions[0] == "clip,label,predicted" and len(predictions) == 10, name
        assert predictions == (tmp_path / reference / "eval_predictions.csv").read_text().splitlines(), name
        assert results[name]["eval_unusable_clips"] == 2, name
        for metric in ("eval_top1_accuracy", "eval_top5_accuracy"):
            assert results[name][metric] == results[reference][metric], (name, metric)
        assert results[name]["eval_loss"] == pytest.approx(results[reference]["eval_loss"], rel=1e-5), name
        for key, tensor in weights[reference].items():
            torch.testing.assert_close(weights[name][key], tensor, atol=2e-6, rtol=1e-5, msg=f"{name}: {key}")
    for name in ("2x2", "2x2-saved"):
        digests = {(tmp_path / name / f"weights_rank{rank}_of_2.sha256").read_text() for rank in (0, 1)}
        assert len(digests) == 1, f"{name}: the replicas differ"
        history = json.loads((tmp_path / name / "log_history_rank0_of_2.json").read_text())
        np.testing.assert_allclose(step_losses(history), step_losses(trainer.state.log_history), rtol=1e-5,
                                   err_msg=name)  # fmt: skip
    # The one step reads the first 4 training clips, all usable: a shuffled order would read unusable ones.
    assert not {original[clip] for clip in training[:4]} & unusable and {original[clip] for clip in training} & unusable
    assert [results[name]["train_unusable_clips"] for name in results] == [0, 0, 0]
