"""The offline demo, small: it runs the training script's code, shows progress, and repeats itself exactly."""

import csv
import json

import numpy as np
import pytest
import torch
from transformers import set_seed

from evl_hf.backbone_families import backbone_family
from evl_hf.data.synthetic import FRAME_ATTRIBUTES, render_frames
from evl_hf.demo import (
    BACKBONE_SHAPE,
    DEMO_BACKBONES,
    MOTION_CLASSES,
    main,
    prepare_backbone,
    pretrain_backbone,
    reversal_swap_rates,
    time_reversed_partner,
)


def test_the_demo_trains_through_the_script_shows_progress_and_is_reproducible(tmp_path, capfd, recwarn):
    small = ["--train_per_class", "2", "--validation_per_class", "1", "--epochs", "2", "--backbone_pretraining_steps", "3"]
    first = main(["--output_dir", str(tmp_path / "first"), *small])
    shown = capfd.readouterr()
    # The example script's driver ran: its outputs and its progress bars (caching, training) are there.
    for folder in ("evl-full", "evl-no-temporal"):
        for name in ("all_results.json", "eval_confusion_matrix.csv", "eval_confusion_matrix.png", "eval_predictions.csv",
                     "config.json", "video_preprocessor_config.json"):  # fmt: skip
            assert (tmp_path / "first" / folder / name).exists(), (folder, name)
    assert "Caching backbone features" in shown.err and "it/s]" in shown.err
    # Without an accelerator nothing is pinned: torch warned at every training step that pinning needs one.
    pinned = [str(warning.message) for warning in recwarn if "pin_memory" in str(warning.message)]
    assert torch.accelerator.is_available() or not pinned, pinned
    # The backbone EVL freezes was pretrained on single frames first, and saved where the training script loads it.
    assert first["backbone pretraining"]["steps"] == 3 and "Pretraining the small clip tower" in shown.out
    config = DEMO_BACKBONES["clip"](**BACKBONE_SHAPE)
    saved = backbone_family(config).from_pretrained(tmp_path / "first" / "clip-vit-tiny-frames")
    set_seed(0)  # as the demo builds its tower before pretraining it
    untrained = backbone_family(config).build(config).state_dict()
    assert any(not torch.equal(untrained[name], tensor) for name, tensor in saved.state_dict().items())
    assert first["pipeline"]["top3"][0]["label"] in MOTION_CLASSES
    # Temporal reliance: without its temporal modules the model sees a set of frames, so reversing or shuffling them
    # changes no prediction (and never swaps a pair); full EVL's figures are only in range after 2 epochs.
    ablation = first["temporal modules off"]
    evaluation = json.loads((tmp_path / "first" / "evl-no-temporal" / "all_results.json").read_text())
    assert ablation["reversed_top1"] == ablation["shuffled_top1"] == ablation["top1"] == evaluation["eval_top1_accuracy"]
    assert ablation["reversal_swaps_pair"] == 0.0
    with open(tmp_path / "first" / "evl-no-temporal" / "eval_predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 10 and all(row["predicted"] == row["predicted_reversed"] == row["predicted_shuffled"] for row in rows)
    for metric in ("reversed_top1", "shuffled_top1", "reversal_swaps_pair"):
        assert 0 <= first["full EVL"][metric] <= 1, metric
    assert "How much does each model use time?" in shown.out and "reversal swaps the pair" in shown.out
    pairs = ["moving_left/moving_right", "moving_up/moving_down", "growing/shrinking",
             "rotating_clockwise/rotating_anticlockwise", "appearing/disappearing"]  # fmt: skip
    assert list(first["full EVL"]["reversal_swaps_by_pair"]) == pairs
    assert set(first["temporal modules off"]["reversal_swaps_by_pair"].values()) == {0.0}
    assert [time_reversed_partner(name) for name in ("moving_left", "growing", "disappearing")] == ["moving_right", "shrinking", "appearing"]

    second = main(["--output_dir", str(tmp_path / "second"), *small])
    for variant in ("full EVL", "temporal modules off"):
        for metric in ("top1", "top5", "pair", "direction_given_pair", "reversed_top1", "shuffled_top1", "reversal_swaps_pair"):
            assert first[variant][metric] == second[variant][metric], (variant, metric)
    for folder in ("evl-full", "evl-no-temporal"):
        results = [json.loads((tmp_path / run / folder / "all_results.json").read_text()) for run in ("first", "second")]
        assert results[0]["train_loss"] == results[1]["train_loss"] and results[0]["eval_loss"] == results[1]["eval_loss"]
    assert first["pipeline"]["top3"] == second["pipeline"]["top3"]
    assert first["backbone pretraining"]["last_loss"] == second["backbone pretraining"]["last_loss"]

    # Run again into the same folder: the finished tower is reused, not pretrained again, with the same results.
    capfd.readouterr()
    again = main(["--output_dir", str(tmp_path / "first"), *small])
    shown = capfd.readouterr().out
    assert "Reusing the clip tower pretrained with the same settings" in shown and "Pretraining" not in shown
    assert again["backbone pretraining"] == {**first["backbone pretraining"], "reused": True}
    assert again["full EVL"]["top1"] == first["full EVL"]["top1"] and again["pipeline"]["top3"] == first["pipeline"]["top3"]


def test_single_frames_carry_their_attributes_scaled_to_the_unit_interval():
    frames, attributes = render_frames(200, size=32, rng=np.random.default_rng(0))
    assert frames.shape == (200, 32, 32, 3) and frames.dtype == np.uint8
    assert attributes.shape == (200, len(FRAME_ATTRIBUTES)) and ((0 <= attributes) & (attributes <= 1)).all()
    # Each attribute is drawn over its whole range, and the same generator state gives the same frames.
    assert (attributes.min(axis=0) < 0.1).all() and (attributes.max(axis=0) > 0.9).all()
    again, same = render_frames(200, size=32, rng=np.random.default_rng(0))
    assert (again == frames).all() and (same == attributes).all()


@pytest.mark.parametrize("family", sorted(DEMO_BACKBONES))
def test_pretraining_trains_each_family_tower_on_frames_reproducibly(family):
    # How well the demo's tower learns to read a frame (0.0147 against 0.083 for predicting the mean, after 800
    # steps) is in the demo's output; here: each family's tower trains, and the same seed gives the same run.
    config = DEMO_BACKBONES[family](hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=8, image_size=32)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        tower = backbone_family(config).build(config)
        before = {name: parameter.detach().clone() for name, parameter in tower.named_parameters()}
        runs.append(pretrain_backbone(tower, steps=40, image_size=32, seed=0, batch_size=16))
    losses = runs[0]
    assert len(losses) == 40 and all(np.isfinite(losses)) and runs[0] == runs[1]
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    changed = [name for name, parameter in tower.named_parameters() if not torch.equal(before[name], parameter)]
    assert any(name.startswith("embeddings.") for name in changed) and len(changed) > len(before) // 2


def test_a_negative_number_of_pretraining_steps_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--output_dir", str(tmp_path), "--backbone_pretraining_steps", "-5"])
    assert exited.value.code == 2 and "--backbone_pretraining_steps must be 0" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before anything was generated


def test_reversal_swaps_are_counted_per_pair_of_true_classes(tmp_path):
    rows = [  # label, prediction in order, prediction reversed
        ("moving_left", "moving_left", "moving_right"),  # swapped
        ("moving_left", "moving_left", "moving_left"),  # not
        ("moving_right", "moving_up", "moving_down"),  # swapped, though the pair was wrong in order
        ("growing", "growing", "shrinking"),  # swapped
        ("appearing", "appearing", "growing"),  # not
    ]
    path = tmp_path / "eval_predictions.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["clip", "label", "predicted", "predicted_reversed", "predicted_shuffled"])
        writer.writerows([f"{i}.mp4", *row, row[1]] for i, row in enumerate(rows))
    overall, by_pair = reversal_swap_rates(path)
    assert overall == 3 / 5
    assert by_pair == {"moving_left/moving_right": 2 / 3, "growing/shrinking": 1.0, "appearing/disappearing": 0.0}


def test_a_pretrained_tower_is_reused_only_if_saved_whole_with_the_same_settings(tmp_path):
    directory, summary = prepare_backbone(tmp_path, "clip", 2, seed=0)
    record, weights = directory / "demo_pretraining.json", directory / "model.safetensors"
    assert "reused" not in summary and record.is_file()
    saved = weights.read_bytes()
    assert prepare_backbone(tmp_path, "clip", 2, seed=0) == (directory, {**summary, "reused": True})
    # Other settings train anew, into the same folder; back to the first ones, the same tower again (deterministic).
    assert "reused" not in prepare_backbone(tmp_path, "clip", 2, seed=1)[1]
    assert "reused" not in prepare_backbone(tmp_path, "clip", 2, seed=0)[1] and weights.read_bytes() == saved
    # A record that cannot be read, or weights that are gone, mean training anew, not a crash or a broken load.
    record.write_text("{not json")
    assert "reused" not in prepare_backbone(tmp_path, "clip", 2, seed=0)[1]
    weights.unlink()
    assert "reused" not in prepare_backbone(tmp_path, "clip", 2, seed=0)[1] and weights.read_bytes() == saved
    # A random tower has a folder of its own and no record; the pretrained one is left as it was.
    random_directory, no_summary = prepare_backbone(tmp_path, "clip", 0, seed=0)
    assert no_summary is None and random_directory != directory and not (random_directory / record.name).exists()
    assert prepare_backbone(tmp_path, "clip", 2, seed=0)[1]["reused"] is True
