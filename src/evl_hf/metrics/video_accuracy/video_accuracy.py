"""Top-k accuracy of video classification scores, with an optional per-class breakdown and confusion matrix."""

import datasets
import evaluate
import numpy as np


_DESCRIPTION = """
Top-1 and top-k accuracy from per-class scores (logits or probabilities, one row per clip) and integer labels. The
scores of several views of a clip should be averaged (as probabilities) before they are passed here; EVL's
multi-view forward already returns the log of the averaged softmax.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[list[float]]`): scores, shape (num_clips, num_classes).
    references (`list[int]`): the true class of each clip, in [0, num_classes).
    top_k (`int`, defaults to 5): the k of the top-k accuracy (1.0 with no more classes than k).
    num_classes (`int`, optional): the number of classes, for the per-class outputs (defaults to the score width).
    per_class (`bool`, defaults to False): also return `per_class_accuracy` and `confusion_matrix` (rows: true class).
Returns:
    top1_accuracy, top{k}_accuracy (floats in [0, 1]), and with per_class the per-class lists.
Example:
    >>> metric = evaluate.load("path/to/video_accuracy")
    >>> metric.compute(predictions=[[0.1, 0.9], [0.8, 0.2]], references=[1, 1], top_k=1)
    {'top1_accuracy': 0.5}
"""


class VideoAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float32")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, top_k=5, num_classes=None, per_class=False):
        scores = np.asarray(predictions, dtype=np.float64)
        labels = np.asarray(references, dtype=np.int64)
        if scores.ndim != 2 or len(scores) != len(labels):
            raise ValueError(f"predictions must be (num_clips, num_classes) scores for {len(labels)} clips, got {scores.shape}.")
        num_classes = num_classes or scores.shape[1]
        outside = labels[(labels < 0) | (labels >= num_classes)]
        if len(outside):
            # -1 (no label in `datasets`) would count as the last class, -100 (transformers' ignore index) fail.
            raise ValueError(
                f"references must be class indices in [0, {num_classes}); got {int(outside[0])} ({len(outside)} "
                "clips). Leave clips without a label (-1) or ignored ones (-100) out before scoring."
            )
        # A NaN score ranks last (numpy sorts it so), as in EVL's predictions files.
        ranking = np.argsort(-scores, axis=1, kind="stable")
        results = {"top1_accuracy": float((ranking[:, 0] == labels).mean()) if len(labels) else 0.0}
        if top_k > 1:
            # Named by the k asked for whatever the number of classes (`metric_for_best_model` looks it up by name):
            # with no more classes than k, every clip is a hit.
            hits = (ranking[:, :top_k] == labels[:, None]).any(axis=1)
            results[f"top{top_k}_accuracy"] = float(hits.mean()) if len(labels) else 0.0
        if per_class:
            confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
            np.add.at(confusion, (labels, ranking[:, 0]), 1)
            totals = confusion.sum(axis=1)
            results["per_class_accuracy"] = [
                float(confusion[c, c] / totals[c]) if totals[c] else None for c in range(num_classes)
            ]
            results["confusion_matrix"] = confusion.tolist()
        return results
