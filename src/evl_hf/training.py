"""Trainer glue for EVL: skipped-clip accounting, top-k metrics through `evaluate`, per-class reports."""

import csv
import json
from pathlib import Path

import numpy as np
import torch
from transformers import Trainer

from .metrics import load_video_accuracy


class EVLTrainer(Trainer):
    """
    `Trainer` that adds up the clips the data collator had to skip (undecodable files), per phase, and reports them
    as `train_skipped_clips` in the training metrics and `<prefix>_skipped_clips` in evaluation/prediction metrics.
    Everything else is the stock Trainer (accelerate, mixed precision, gradient accumulation, checkpoints, Hub).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skipped_clips = {"train": 0, "eval": 0}

    def _count_skipped(self, inputs: dict, phase: str) -> None:
        skipped = inputs.pop("num_skipped_clips", None)
        if skipped is not None:
            self.skipped_clips[phase] += int(skipped)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._count_skipped(inputs, "train")
        if "labels" not in inputs:  # every clip of the batch was unusable: a zero loss that still has a graph
            loss = sum(p.sum() * 0.0 for p in model.parameters() if p.requires_grad)
            return (loss, None) if return_outputs else loss
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        self._count_skipped(inputs, "eval")
        if "labels" not in inputs:
            return None, None, None
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def evaluate(self, *args, metric_key_prefix: str = "eval", **kwargs):
        self.skipped_clips["eval"] = 0
        metrics = super().evaluate(*args, metric_key_prefix=metric_key_prefix, **kwargs)
        metrics[f"{metric_key_prefix}_skipped_clips"] = self._total_across_processes(self.skipped_clips["eval"])
        self.log({f"{metric_key_prefix}_skipped_clips": metrics[f"{metric_key_prefix}_skipped_clips"]})
        return metrics

    def predict(self, *args, metric_key_prefix: str = "test", **kwargs):
        self.skipped_clips["eval"] = 0
        output = super().predict(*args, metric_key_prefix=metric_key_prefix, **kwargs)
        output.metrics[f"{metric_key_prefix}_skipped_clips"] = self._total_across_processes(self.skipped_clips["eval"])
        return output

    def train(self, *args, **kwargs):
        result = super().train(*args, **kwargs)
        result.metrics["train_skipped_clips"] = self._total_across_processes(self.skipped_clips["train"])
        return result

    def create_model_card(self, *args, **kwargs) -> None:
        """Trainer's card, plus the metadata the Hub needs for a video classifier (pipeline tag, base model)."""
        super().create_model_card(*args, **kwargs)
        if not self.is_world_process_zero():
            return
        from huggingface_hub import ModelCard

        path = Path(self.args.output_dir) / "README.md"
        card = ModelCard.load(path)
        card.data.pipeline_tag = "video-classification"
        card.data.library_name = "transformers"
        if kwargs.get("finetuned_from"):
            card.data.base_model = kwargs["finetuned_from"]
        card.save(path)

    def _total_across_processes(self, count: int) -> int:
        total = torch.tensor([count], device=self.accelerator.device)
        return int(self.accelerator.reduce(total, reduction="sum").item())


def make_compute_metrics(top_k: int = 5):
    """`compute_metrics` for `Trainer`: top-1 / top-k accuracy through the packaged `evaluate` metric."""
    metric = load_video_accuracy()

    def compute_metrics(eval_prediction) -> dict:
        logits = eval_prediction.predictions[0] if isinstance(eval_prediction.predictions, tuple) else eval_prediction.predictions
        return metric.compute(predictions=logits, references=eval_prediction.label_ids, top_k=top_k)

    return compute_metrics


def write_per_class_report(logits: np.ndarray, labels: np.ndarray, id2label: dict, output_dir: str, prefix: str) -> dict:
    """Write `<prefix>_per_class_accuracy.json` and `<prefix>_confusion_matrix.csv` (rows: true class)."""
    metric = load_video_accuracy()
    report = metric.compute(
        predictions=logits, references=labels, top_k=1, num_classes=len(id2label), per_class=True
    )
    names = [id2label[i] for i in range(len(id2label))]
    per_class = {name: accuracy for name, accuracy in zip(names, report["per_class_accuracy"])}
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / f"{prefix}_per_class_accuracy.json").write_text(json.dumps(per_class, indent=2))
    with open(output / f"{prefix}_confusion_matrix.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["true \\ predicted", *names])
        for name, row in zip(names, report["confusion_matrix"]):
            writer.writerow([name, *row])
    return per_class
