"""The offline demo, small: it runs the training script's code, shows progress, and repeats itself exactly."""

import json

from evl_hf.demo import MOTION_CLASSES, main


def test_the_demo_trains_through_the_script_shows_progress_and_is_reproducible(tmp_path, capfd):
    small = ["--train_per_class", "2", "--validation_per_class", "1", "--epochs", "2"]
    first = main(["--output_dir", str(tmp_path / "first"), *small])
    shown = capfd.readouterr()
    # The example script's driver ran: its outputs and its progress bars (caching, training) are there.
    for folder in ("evl-full", "evl-no-temporal"):
        for name in ("all_results.json", "eval_confusion_matrix.csv", "config.json", "video_preprocessor_config.json"):
            assert (tmp_path / "first" / folder / name).exists(), (folder, name)
    assert "Caching backbone features" in shown.err and "it/s]" in shown.err
    assert first["pipeline"]["top3"][0]["label"] in MOTION_CLASSES

    second = main(["--output_dir", str(tmp_path / "second"), *small])
    for variant in ("full EVL", "temporal modules off"):
        for metric in ("top1", "top5", "pair", "direction_given_pair"):
            assert first[variant][metric] == second[variant][metric], (variant, metric)
    for folder in ("evl-full", "evl-no-temporal"):
        results = [json.loads((tmp_path / run / folder / "all_results.json").read_text()) for run in ("first", "second")]
        assert results[0]["train_loss"] == results[1]["train_loss"] and results[0]["eval_loss"] == results[1]["eval_loss"]
    assert first["pipeline"]["top3"] == second["pipeline"]["top3"]
