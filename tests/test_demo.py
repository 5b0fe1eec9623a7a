"""The offline demo, small: it runs the training script's code, shows progress, and repeats itself exactly."""

import csv
import json

from evl_hf.demo import MOTION_CLASSES, main, time_reversed_partner


def test_the_demo_trains_through_the_script_shows_progress_and_is_reproducible(tmp_path, capfd):
    small = ["--train_per_class", "2", "--validation_per_class", "1", "--epochs", "2"]
    first = main(["--output_dir", str(tmp_path / "first"), *small])
    shown = capfd.readouterr()
    # The example script's driver ran: its outputs and its progress bars (caching, training) are there.
    for folder in ("evl-full", "evl-no-temporal"):
        for name in ("all_results.json", "eval_confusion_matrix.csv", "eval_confusion_matrix.png", "eval_predictions.csv",
                     "config.json", "video_preprocessor_config.json"):  # fmt: skip
            assert (tmp_path / "first" / folder / name).exists(), (folder, name)
    assert "Caching backbone features" in shown.err and "it/s]" in shown.err
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
    assert [time_reversed_partner(name) for name in ("moving_left", "growing", "disappearing")] == ["moving_right", "shrinking", "appearing"]

    second = main(["--output_dir", str(tmp_path / "second"), *small])
    for variant in ("full EVL", "temporal modules off"):
        for metric in ("top1", "top5", "pair", "direction_given_pair", "reversed_top1", "shuffled_top1", "reversal_swaps_pair"):
            assert first[variant][metric] == second[variant][metric], (variant, metric)
    for folder in ("evl-full", "evl-no-temporal"):
        results = [json.loads((tmp_path / run / folder / "all_results.json").read_text()) for run in ("first", "second")]
        assert results[0]["train_loss"] == results[1]["train_loss"] and results[0]["eval_loss"] == results[1]["eval_loss"]
    assert first["pipeline"]["top3"] == second["pipeline"]["top3"]
