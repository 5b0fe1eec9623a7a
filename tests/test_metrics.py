import pytest
from helpers import run_without_packages

from evl_hf.metrics import load_video_accuracy


@pytest.fixture(scope="module")
def metric():
    return load_video_accuracy()


@pytest.mark.parametrize("label", [-1, -100, 3])
def test_labels_that_are_no_class_are_refused(metric, label):
    # -1 (datasets' "no label") was counted as the last class (numpy's negative indexing), -100 crashed per class.
    scores = [[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]]
    for per_class in (False, True):
        with pytest.raises(ValueError, match=f"references must be class indices in \\[0, 3\\); got {label}"):
            metric.compute(predictions=scores, references=[1, label], per_class=per_class)


def test_the_top_k_key_is_named_by_k_whatever_the_number_of_classes(metric):
    # `metric_for_best_model="top5_accuracy"` must find its key on a 3-class data set (was `top3_accuracy`).
    result = metric.compute(predictions=[[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]], references=[1, 2], top_k=5)
    assert result == {"top1_accuracy": 0.5, "top5_accuracy": 1.0}


def test_without_evaluate_it_says_how_to_install_it(tmp_path):
    # evaluate comes with the `train` extra: a core install raised a bare "No module named 'evaluate'".
    script = "from evl_hf.metrics import load_video_accuracy; load_video_accuracy()"
    result = run_without_packages({"evaluate"}, ["-c", script], tmp_path)
    assert result.returncode != 0, result.stdout
    assert 'needs evaluate: pip install "evl-hf[train]"' in result.stderr, result.stderr[-3000:]
