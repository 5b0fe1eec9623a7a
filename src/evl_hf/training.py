"""Trainer glue for EVL: the bad-clip policy (counted, masked in evaluation), top-k metrics through `evaluate`,
per-class reports, and model-card metadata for the Hub."""

import contextlib
import copy
import csv
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import RandomSampler
from transformers import EvalPrediction, Trainer
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .backbone_families import hub_repo_id
from .data.video_dataset import IGNORE_LABEL, UNLABELED, EpochShuffleSampler, TrainingClips
from .metrics import load_video_accuracy


logger = logging.getLogger(__name__)

# Every argument of a run, written into each of its checkpoints so that a resumed run can say what it changed.
RUN_ARGUMENTS_FILE = "evl_run_arguments.json"
# The training clips found unusable so far (over all processes), in each checkpoint: a resumed run does not read the
# batches before it again, and its count would otherwise miss their clips.
UNUSABLE_CLIPS_FILE = "evl_unusable_training_clips.json"


class EVLTrainer(Trainer):
    """
    The stock `Trainer` (accelerate, mixed precision, gradient accumulation, checkpoints, Hub) with EVL's data policy:

    - training clips come from `TrainingClips` with an `EpochShuffleSampler` (augmentation keyed by seed, epoch and
      clip; unusable clips replaced), so every process and every resumed run sees the same clips;
    - its dataloaders draw their workers' seeds from a generator of their own (seeded from `data_seed`, else `seed`,
      and for training the epoch), never from torch's global one, which the model's dropout draws from: a resumed run
      continues exactly where the interrupted one stopped, with persistent workers too;
    - in evaluation, slots whose clip could not be decoded (label -100) are left out of the loss and the metrics; the
      evaluation loss is computed over all usable clips at once, so it does not depend on how clips are batched or
      split across processes, and with the loss trained with (`compute_loss_func`, label smoothing or the model's);
      clips without a label (class label -1, `datasets`' convention) are predicted and left out of the loss and the
      metrics too, so a test split without labels gives predictions and no scores; `compute_metrics` sees the
      scored clips alone, and with `include_for_metrics` their inputs and each one's own loss (with
      `batch_eval_metrics`, batch by batch; the loss is still computed over all of them);
    - the number of distinct unusable clips, over all processes, is reported as `train_unusable_clips` and
      `<prefix>_unusable_clips`;
    - `run_arguments`, when given, are written into every checkpoint as `RUN_ARGUMENTS_FILE`, and the unusable
      training clips met so far as `UNUSABLE_CLIPS_FILE`, which a resumed run counts in;
    - with `decay_norms_and_biases=True`, `weight_decay` applies to every trained tensor, biases and LayerNorm weights
      too, as the authors' AdamW does (`Trainer` leaves those undecayed).
    """

    def __init__(self, *args, run_arguments: dict | None = None, decay_norms_and_biases: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.run_arguments = run_arguments
        self.decay_norms_and_biases = decay_norms_and_biases
        self._user_compute_metrics = self.compute_metrics
        self.compute_metrics = self._metrics_of_usable_clips
        # The loss is computed over all scored clips at the end (`_metrics_of_usable_clips`) and needs the model's
        # logits: both are kept, and the user's metrics and `predict` get the preprocessed ones, as with `Trainer`.
        self._user_preprocess_logits = self.preprocess_logits_for_metrics
        if self._user_preprocess_logits is not None:
            self.preprocess_logits_for_metrics = self._logits_and_preprocessed
        self.unusable_clips = {"train": set(), "eval": set()}
        self._start_evaluation()

    def _track_num_input_tokens(self, inputs):
        # `--include_num_input_tokens_seen` counts the main input's elements: cached clips (backbone features, no
        # `pixel_values`) count the pixels they were computed from, as decoded clips do, without allocating them.
        frame_features = inputs.get("frame_features")
        if "pixel_values" not in inputs and frame_features is not None:
            config = self.accelerator.unwrap_model(self.model).config
            batch_size, _, num_frames = frame_features.shape[:3]
            shape = (batch_size, num_frames, config.vision_config.num_channels, config.frame_size, config.frame_size)
            inputs = {**inputs, "pixel_values": torch.empty(shape, device="meta")}
        return super()._track_num_input_tokens(inputs)

    def get_decay_parameter_names(self, model: torch.nn.Module) -> list[str]:
        if self.decay_norms_and_biases:
            return [name for name, _ in model.named_parameters()]
        return super().get_decay_parameter_names(model)

    def _logits_and_preprocessed(self, logits, labels):
        # Only the classification logits are kept beside the preprocessed outputs: the rest of the model's outputs
        # (hidden states, attentions) is what preprocessing exists to drop.
        return (logits[0] if isinstance(logits, tuple) else logits), self._user_preprocess_logits(logits, labels)

    def _split_predictions(self, predictions):
        """(the model's logits, the predictions the user's metrics get): the same tensor without
        `preprocess_logits_for_metrics`. A list (`eval_do_concat_batches=False`) is split batch by batch."""
        if isinstance(predictions, list):
            pairs = [self._split_predictions(batch) for batch in predictions]
            return [logits for logits, _ in pairs], [shown for _, shown in pairs]
        if self._user_preprocess_logits is None:
            logits = predictions[0] if isinstance(predictions, tuple) else predictions
            return logits, logits
        logits, shown = predictions
        return (logits[0] if isinstance(logits, tuple) else logits), shown

    def _start_evaluation(self) -> None:
        self.unusable_clips["eval"] = set()
        reset_metrics = getattr(self._user_compute_metrics, "reset", None)
        if callable(reset_metrics):
            reset_metrics()
        # `batch_eval_metrics`: the batches' logits and labels so far, and whether the user's metrics got clips.
        self._eval_batches, self._eval_batches_scored = [], False

    @property
    def _data_seed(self) -> int:
        return self.args.data_seed if self.args.data_seed is not None else self.args.seed

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        # Strategies for examples of different lengths: Trainer's samplers would look for the lengths in the rows,
        # which cached clips (backbone features) have none of.
        grouping_by_length = self.args.train_sampling_strategy in ("group_by_length", "batch_rebalance")
        if grouping_by_length:
            logger.warning(
                "train_sampling_strategy=%r is ignored: every clip has the same length; the clips are shuffled.",
                self.args.train_sampling_strategy,
            )
        if isinstance(dataset, TrainingClips):
            self._epoch_sampler = EpochShuffleSampler(
                len(dataset), seed=self._data_seed, shuffle=self.args.train_sampling_strategy != "sequential"
            )
            return self._epoch_sampler
        if grouping_by_length:
            return RandomSampler(dataset)  # Trainer's for "random"
        return super()._get_train_sampler(train_dataset)

    def _get_dataloader(self, *args, **kwargs):
        dataloader = super()._get_dataloader(*args, **kwargs)
        # A DataLoader draws its workers' base seed each time it starts an iterator, from torch's global generator
        # unless it has its own: persistent workers start one for the whole run, the run resumed from its checkpoint
        # one more, and the model's dropout masks, drawn from the global generator, would differ from then on. Set on
        # the DataLoader accelerate wraps (`base_dataloader`), whose arguments `skip_first_batches` copies.
        getattr(dataloader, "base_dataloader", dataloader).generator = torch.Generator().manual_seed(self._data_seed)
        return dataloader

    def _run_epoch(self, *args, **kwargs):
        # Trainer's and accelerate's `set_epoch` reach the sampler through at most two wrappers; a run resumed
        # mid-epoch on several processes has three (skip, shard, batch), so set the epoch here, before the
        # sampler is iterated.
        epoch = kwargs["epoch"] if "epoch" in kwargs else args[1]
        sampler = getattr(self, "_epoch_sampler", None)
        if sampler is not None:
            sampler.set_epoch(epoch)
        # The workers' seeds keyed by the epoch, as the clips' augmentation is: workers made anew each epoch then
        # get the same seeds in a resumed run as in the uninterrupted one (a generator seeded once per loader would
        # hand the resumed run's first epoch the seeds of the uninterrupted run's first). Persistent workers keep the
        # seeds of the epoch they were made in.
        dataloader = kwargs["train_dataloader"] if "train_dataloader" in kwargs else args[2]
        generator = getattr(getattr(dataloader, "base_dataloader", dataloader), "generator", None)
        if generator is not None:
            generator.manual_seed(int(np.random.SeedSequence([self._data_seed, epoch]).generate_state(1)[0]))
        return super()._run_epoch(*args, **kwargs)

    @contextlib.contextmanager
    def _every_clip_in_order(self):
        """`dataloader_drop_last`, `dataloader_in_order=False` and `train_sampling_strategy="group_by_length"` serve
        training: an evaluation scores every clip (else the clips dropped would depend on the process count) and
        names each row after its clip's position, so its loaders read all the clips, in order. The loaders are built
        from a copy of the arguments with those settings; the run's own are left alone."""
        asked = self.args
        self.args = copy.copy(asked)
        self.args.dataloader_drop_last, self.args.dataloader_in_order = False, True
        self.args.train_sampling_strategy = "random"
        try:
            yield
        finally:
            self.args = asked

    def get_eval_dataloader(self, eval_dataset=None):
        with self._every_clip_in_order():
            return super().get_eval_dataloader(eval_dataset)

    def get_test_dataloader(self, test_dataset):
        with self._every_clip_in_order():
            return super().get_test_dataloader(test_dataset)

    def _save_checkpoint(self, model, trial) -> None:
        # Every process saves a checkpoint (its random states): gathered here, where all of them take part.
        self._unusable_training_clips = self._gather_unusable("train")
        super()._save_checkpoint(model, trial)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict=state_dict)
        folder = Path(output_dir if output_dir is not None else self.args.output_dir)
        # With the model rather than in a callback's `on_save`: `hub_strategy="checkpoint"` uploads a checkpoint as
        # soon as Trainer has written it, before callbacks run. The ranks that save (`should_save`) write the files
        # into the checkpoint being written (named after the step), never elsewhere.
        checkpoint = folder.name == f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if not (self.args.should_save and checkpoint):
            return
        if self.run_arguments is not None:
            (folder / RUN_ARGUMENTS_FILE).write_text(json.dumps(self.run_arguments, indent=1, default=str))
        unusable = getattr(self, "_unusable_training_clips", None)
        if unusable is not None:
            (folder / UNUSABLE_CLIPS_FILE).write_text(json.dumps(unusable))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        saved = Path(resume_from_checkpoint) / UNUSABLE_CLIPS_FILE
        if saved.is_file():
            self.unusable_clips["train"].update(json.loads(saved.read_text()))

    def _record_unusable(self, inputs: dict, phase: str) -> None:
        inputs.pop("clip_indices", None)
        self.unusable_clips[phase].update(int(i) for i in inputs.pop("unusable_clip_indices", ()))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._record_unusable(inputs, "train")
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        self._record_unusable(inputs, "eval")
        # The loss comes from `_metrics_of_usable_clips`, over the gathered logits: a per-batch mean would weigh
        # clips by how they fall into batches and processes, and count the masked slots' batches.
        labels = inputs.pop("labels", None)
        unwrapped = self.accelerator.unwrap_model(model)
        if labels is not None and unwrapped.config.problem_type is None:
            # The views of a clip are combined as the problem type says, which a forward with the labels infers
            # from them (and sets): inferred here, as the labels are held back.
            unwrapped.config.problem_type = unwrapped.problem_type_for(labels)
        _, logits, _ = super().prediction_step(model, inputs, prediction_loss_only=False, ignore_keys=ignore_keys)
        return None, logits, labels

    def _metrics_of_usable_clips(self, eval_prediction: EvalPrediction, compute_result: bool | None = None) -> dict:
        if compute_result is not None:
            return self._metrics_of_batch(eval_prediction, compute_result)
        logits, shown = self._split_predictions(eval_prediction.predictions)
        labels = eval_prediction.label_ids
        if labels is None:
            return {}
        batch_sizes = [len(batch) for batch in labels] if isinstance(labels, list) else None
        logits, shown, labels = whole(logits), whole(shown), whole(labels)
        metrics, scored = self._loss_of_scored_clips(logits, labels)
        logits, labels = logits[scored], labels[scored]
        if self._user_compute_metrics is not None and len(labels):
            inputs = eval_prediction.inputs
            inputs = whole(inputs)[scored] if inputs is not None else None
            losses = self._loss_per_clip(logits, labels) if "loss" in self.args.include_for_metrics else None
            outputs = (_selected(shown, scored), labels, inputs, losses)
            if batch_sizes is not None:
                # `eval_do_concat_batches=False`: per-batch arrays, as `Trainer` gives them, of each batch's scored clips.
                scored_per_batch = [int(part.sum()) for part in np.split(scored, np.cumsum(batch_sizes)[:-1])]
                outputs = tuple(None if output is None else per_batch(output, scored_per_batch) for output in outputs)
            metrics.update(self._user_compute_metrics(EvalPrediction(*outputs)))
        return metrics

    def _metrics_of_batch(self, eval_prediction: EvalPrediction, compute_result: bool) -> dict:
        """
        `batch_eval_metrics=True`: `Trainer` passes each batch's tensors (gathered over processes) and asks for the
        result with the last batch. The user's `compute_metrics` gets each batch's scored clips as it would get the
        whole set's, and the last batch even without any, to give its result; the loss, the checks and the warning
        are those of a whole-set evaluation, over the batches' logits kept until the last one.
        """
        logits, shown = self._split_predictions(eval_prediction.predictions)
        labels = eval_prediction.label_ids
        batch_logits, batch_labels = logits.detach().float().cpu().numpy(), labels.cpu().numpy()
        self._eval_batches.append((batch_logits, batch_labels))
        scored = self._scored(batch_labels)
        metrics = {}
        # The scored clips and the gathered labels are the same on every process: all of them gather the inputs.
        if self._user_compute_metrics is not None and (scored.any() or (compute_result and self._eval_batches_scored)):
            self._eval_batches_scored = True
            mask = torch.from_numpy(scored).to(labels.device)
            inputs = None
            if eval_prediction.inputs is not None:
                # `Trainer` gives this process's batch (a dict): gathered here as the predictions are, to be masked
                # alike.
                name = self.accelerator.unwrap_model(self.model).main_input_name
                batch = self.accelerator.pad_across_processes(eval_prediction.inputs[name], dim=1, pad_index=-100)
                inputs = {name: self.accelerator.gather_for_metrics(batch)[mask]}
            losses = None
            if "loss" in self.args.include_for_metrics:
                losses = torch.from_numpy(self._loss_per_clip(batch_logits[scored], batch_labels[scored]))
            prediction = EvalPrediction(
                predictions=_selected(shown, mask), label_ids=labels[mask], inputs=inputs, losses=losses
            )
            metrics = self._user_compute_metrics(prediction, compute_result=compute_result)
        if not compute_result:
            return {}
        batches, self._eval_batches, self._eval_batches_scored = self._eval_batches, [], False
        loss, _ = self._loss_of_scored_clips(*(np.concatenate(arrays) for arrays in zip(*batches)))
        return {**loss, **(metrics or {})}

    def _scored(self, labels: np.ndarray, warn: bool = False) -> np.ndarray:
        """The clips scored: those that could be decoded (label not -100) and, for class labels, labeled (not -1)."""
        usable = _decodable(labels)
        model = self.accelerator.unwrap_model(self.model)
        # Class labels, as transformers' losses tell them apart; a regression target of -1 is a target.
        if model.problem_type_for(torch.from_numpy(labels)) != "single_label_classification":
            return usable
        scored = usable & (labels.reshape(len(labels), -1)[:, 0] != UNLABELED)
        if warn and scored.any() and not scored[usable].all():
            logger.warning("%d of the %d usable clips have no label (-1): the loss and the metrics are over the "
                           "other %d.", (usable & ~scored).sum(), usable.sum(), scored.sum())  # fmt: skip
        return scored

    def _loss_of_scored_clips(self, logits: np.ndarray, labels: np.ndarray) -> tuple[dict, np.ndarray]:
        """`{"loss": ...}` over the scored clips of a whole evaluation (`{}` without any), and which those are."""
        if len(labels) and not _decodable(labels).any():
            raise ValueError(
                f"None of the {len(labels)} evaluation clips could be decoded (see the warnings above): check the "
                "data paths and files."
            )
        scored = self._scored(labels, warn=True)
        if not scored.any():
            return {}, scored
        loss = self._loss_of(torch.from_numpy(logits[scored]).float(), torch.from_numpy(labels[scored]))
        return {"loss": float(loss)}, scored

    def _loss_per_clip(self, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """For `include_for_metrics=["loss"]`: each clip's loss, as if it were alone in its batch. `Trainer` gives each
        clip its batch's loss, which here (one loss over all clips) would say nothing of the clip; for the model's
        losses and label smoothing, the mean of these is the evaluation loss."""
        logits, labels = torch.from_numpy(logits).float(), torch.from_numpy(labels)
        losses = [float(self._loss_of(logits[i : i + 1], labels[i : i + 1])) for i in range(len(labels))]
        return np.array(losses, dtype=np.float32)

    def _loss_of(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss `Trainer.compute_loss` computes on these clips as one batch: `compute_loss_func` or label
        smoothing where the run trains with one, else the model's own loss."""
        model = self.accelerator.unwrap_model(self.model)
        outputs = ImageClassifierOutput(logits=logits)
        num_items_in_batch = labels.ne(IGNORE_LABEL).sum()  # as `Trainer` counts them
        if self.compute_loss_func is not None:
            return self.compute_loss_func(outputs, labels, num_items_in_batch=num_items_in_batch)
        if self.label_smoother is not None:
            return self.label_smoother(outputs, labels, num_items_in_batch=num_items_in_batch)
        return model.loss_function(labels, logits, model.config)

    def _gather_unusable(self, phase: str) -> list[int]:
        """The distinct unusable clips of `phase` over all processes (every process must call it)."""
        from accelerate.utils import gather_object

        indices = sorted(self.unusable_clips[phase])
        if self.accelerator.num_processes > 1:
            indices = gather_object(indices)
        return sorted(set(indices))

    def _count_unusable(self, phase: str) -> int:
        return len(self._gather_unusable(phase))

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        self._start_evaluation()
        metrics = super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        metrics[f"{metric_key_prefix}_unusable_clips"] = self._count_unusable("eval")
        self.log({f"{metric_key_prefix}_unusable_clips": metrics[f"{metric_key_prefix}_unusable_clips"]})
        return metrics

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test"):
        self._start_evaluation()
        output = super().predict(test_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        if self._user_preprocess_logits is not None:
            output = output._replace(predictions=self._split_predictions(output.predictions)[1])
        output.metrics[f"{metric_key_prefix}_unusable_clips"] = self._count_unusable("eval")
        return output

    def train(self, *args, **kwargs):
        # Offloaded weights (big-model loading) wait on the meta device and are loaded into accelerate's hooks at each
        # forward: the optimizer would update none of them, and the run would silently train the rest alone.
        offloaded = [name for name, parameter in self.model.named_parameters() if parameter.requires_grad and parameter.is_meta]
        if offloaded:
            raise ValueError(
                f"{len(offloaded)} trainable tensors are offloaded (`device_map` to \"disk\" or \"cpu\"), e.g. "
                f"{offloaded[0]}: offloaded modules cannot be trained. Load the model without offloading them (only "
                "the frozen backbone may be offloaded)."
            )
        result = super().train(*args, **kwargs)
        count = self._count_unusable("train")
        result.metrics["train_unusable_clips"] = count
        total = len(self.train_dataset) if hasattr(self.train_dataset, "__len__") else 0
        warn_if_many_unusable(count, total, "were replaced")
        return result

    def create_model_card(self, *args, **kwargs) -> None:
        """
        Trainer's card, plus the metadata the Hub needs for a video classifier: the pipeline tag, `base_model` as a
        Hub id (left out when the model started from a local directory of unknown origin, which the card's text
        names only if it is an EVL checkpoint) and `model-index` with the latest evaluation results.
        """
        # Trainer links `finetuned_from` and `dataset` as Hub repositories in the card's text: only Hub ids may go there.
        origin = kwargs.get("finetuned_from") or self.model.config._name_or_path
        kwargs["finetuned_from"] = hub_repo_id(origin)
        # Like Trainer, one data set or several (`str | list[str]`): a local one is named by its folder.
        datasets = _listify(kwargs.get("dataset"))
        local = [os.path.exists(str(dataset)) for dataset in datasets]
        names = [dataset_display_name(dataset) if is_local else dataset for dataset, is_local in zip(datasets, local)]
        if any(local):
            kwargs["dataset"] = names if isinstance(kwargs["dataset"], (list, tuple)) else names[0]
        super().create_model_card(*args, **kwargs)
        if not self.is_world_process_zero():
            return
        from huggingface_hub import EvalResult, ModelCard

        path = Path(self.args.output_dir) / "README.md"
        card = ModelCard.load(path)
        card.data.pipeline_tag = "video-classification"
        card.data.library_name = "transformers"
        card.data.base_model = kwargs["finetuned_from"]  # None: left out of the metadata
        backbone = "frozen image backbone" if self.model.config.freeze_backbone else "image backbone fine-tuned end to end"
        if kwargs["finetuned_from"] is not None:
            # Trainer's sentence links the Hub id but says nothing of the backbone.
            link = f"[{kwargs['finetuned_from']}](https://huggingface.co/{kwargs['finetuned_from']})"
            opening = f"This model is a fine-tuned version of {link} "
            card.text = card.text.replace(f"{opening}on ", f"{opening}({backbone}) on ", 1)
        else:
            # Without a Hub id, Trainer falls back to the model's `_name_or_path`: empty (a model built around a
            # backbone) gives an empty Hub link, a local directory "trained from scratch". Neither says how it was made.
            if local_evl_checkpoint(origin):
                name = Path(origin).resolve()
                name = f"{name.parent.name}/{name.name}" if name.name.startswith(PREFIX_CHECKPOINT_DIR) else name.name
                made = f"This model is a fine-tuned version of the local EVL checkpoint {name} ({backbone}) on "
            else:
                made = f"This model is an EVL video classifier ({backbone}) trained on "
            for opening in ("This model is a fine-tuned version of [](https://huggingface.co/) on ",
                            "This model was trained from scratch on "):  # fmt: skip
                card.text = card.text.replace(opening, made)
        tags = _listify(kwargs.get("dataset_tags")) or [
            ("videofolder" if os.path.isdir(str(dataset)) else "custom") if is_local else dataset
            for dataset, is_local in zip(datasets, local)
        ]  # fmt: skip
        results = latest_evaluation(self.state.log_history)
        if results and tags:
            # The name Trainer's heading gives (push_to_hub passes the Hub repository's), else the run's.
            card.data.model_name = kwargs.get("model_name") or (
                Path(self.args.output_dir).name if self.hub_model_id is None else self.hub_model_id.split("/")[-1]
            )
            # One result per data set, each tag paired with its name (the tag without one), as in TrainingSummary.
            card.data.eval_results = [
                EvalResult(
                    task_type="video-classification", task_name="Video Classification", dataset_type=tag,
                    dataset_name=name, dataset_split="validation", metric_type="accuracy", metric_name=metric_name,
                    metric_value=value,
                )  # fmt: skip
                for tag, name in zip(tags, names or tags)
                for metric_name, value in results.items()
            ]
        reliance = latest_temporal_reliance(self.state.log_history)
        if reliance:
            section = temporal_reliance_section(reliance)
            # Next to the results, before the training details (or at the end of a card without them).
            marker = "\n## Training procedure"
            card.text = card.text.replace(marker, f"\n{section}{marker}", 1) if marker in card.text else f"{card.text.rstrip()}\n\n{section}"
        card.save(path)


def whole(outputs):
    """Evaluation outputs as one array (or tuple of arrays): `eval_do_concat_batches=False` gives a list of per-batch
    ones."""
    if not isinstance(outputs, list):
        return outputs
    if outputs and isinstance(outputs[0], tuple):
        return tuple(np.concatenate(parts) for parts in zip(*outputs))
    return np.concatenate(outputs)


def per_batch(outputs, batch_sizes: list[int]) -> list:
    """A whole-set output (or tuple of them) split into batches of these sizes: `whole` undone."""
    bounds = np.cumsum(batch_sizes)[:-1]
    if isinstance(outputs, tuple):
        return [tuple(parts) for parts in zip(*(np.split(output, bounds) for output in outputs))]
    return np.split(outputs, bounds)


def _decodable(labels: np.ndarray) -> np.ndarray:
    """Which clips could be decoded: an unusable clip's label (each of its labels, for multi-label) is -100."""
    return labels.reshape(len(labels), -1)[:, 0] != IGNORE_LABEL


def _selected(outputs, mask):
    """The rows of `mask` of an output, or of each of a tuple's (`preprocess_logits_for_metrics` may return one)."""
    return tuple(output[mask] for output in outputs) if isinstance(outputs, tuple) else outputs[mask]


def warn_if_many_unusable(count: int, total: int, fate: str) -> None:
    """Say it loudly when over a tenth of the `total` training clips could not be decoded (each was warned about
    already): at that share the data set, not a stray file, is likely the problem."""
    if total and count * 10 > total:
        logger.warning("%d of the %d training clips could not be decoded and %s: check the data set.", count, total, fate)


def latest_evaluation(log_history: list[dict]) -> dict:
    """Top-1/top-5 accuracy of the last evaluation in a Trainer log history, keyed by the metric names of the card."""
    for entry in reversed(log_history):
        if "eval_top1_accuracy" in entry:
            return {
                f"Top-{k} accuracy": float(entry[f"eval_top{k}_accuracy"]) for k in (1, 5) if f"eval_top{k}_accuracy" in entry
            }
    return {}


def latest_temporal_reliance(log_history: list[dict]) -> dict:
    """Top-1 (and top-5) accuracy with the frames in order, reversed and shuffled, from the last evaluation of a
    Trainer log history that ran all three (`--temporal_reliance`), keyed by order then metric; {} if none did."""
    for entry in reversed(log_history):
        if "eval_reversed_top1_accuracy" in entry:
            return {
                order: {k: float(entry[f"eval{infix}_top{k}_accuracy"]) for k in (1, 5) if f"eval{infix}_top{k}_accuracy" in entry}
                for order, infix in (("in order", ""), ("reversed", "_reversed"), ("shuffled", "_shuffled"))
            }
    return {}


def temporal_reliance_section(reliance: dict) -> str:
    """The model card's section on how much the model's predictions depend on the order of the frames."""
    top5 = all(5 in metrics for metrics in reliance.values())
    rows = [f"| {order} | {metrics[1]:.4f} |" + (f" {metrics[5]:.4f} |" if top5 else "") for order, metrics in reliance.items()]
    return "\n".join([
        "## How much does this model use time?",
        "",
        "The validation clips were evaluated three times, on the same sampled frames: in their order, reversed in time, "
        "and shuffled in time (a fixed random order per clip).",
        "",
        "| Frames | Top-1 accuracy |" + (" Top-5 accuracy |" if top5 else ""),
        "|:--|--:|" + ("--:|" if top5 else ""),
        *rows,
        "",
        "A model that ignores the order of the frames scores the same on all three. The further the reversed and "
        "shuffled accuracies fall below the in-order one, the more its predictions depend on time; on classes that are "
        "time reversals of each other (opening / closing), a model that reads time gets the reversed clips wrong.",
        "",
    ])  # fmt: skip


def _listify(value) -> list:
    """`str | list[str] | None`, as Trainer's card arguments take them, as a list."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def dataset_display_name(path) -> str:
    """A local data set's name for a card: its folder (the parent of a `train/` split folder), never a full path."""
    path = Path(str(path)).resolve()
    if path.is_file():
        return path.stem
    return path.parent.name if path.name in ("train", "training", "validation", "val", "test") else path.name


def local_evl_checkpoint(name_or_path: str | None) -> bool:
    """Whether a model started from a local directory holding an EVL checkpoint (rather than an image backbone)."""
    if not name_or_path or not os.path.isdir(str(name_or_path)):
        return False
    from .configuration_evl import EVLConfig

    try:
        config, _ = EVLConfig.get_config_dict(str(name_or_path))
    except OSError:  # no config.json
        return False
    return config.get("model_type") == EVLConfig.model_type


def make_compute_metrics(top_k: int = 5):
    """`compute_metrics` for `Trainer`: top-1 / top-k accuracy through the packaged `evaluate` metric. With
    `batch_eval_metrics`, the batches go to the metric as they come and the result is computed with the last one."""
    metric = load_video_accuracy()
    batches = []  # `batch_eval_metrics`: (logits, labels) of the evaluation under way

    def compute_metrics(eval_prediction, compute_result: bool | None = None) -> dict | None:
        predictions = whole(eval_prediction.predictions)  # `eval_do_concat_batches=False` gives batches
        logits = predictions[0] if isinstance(predictions, tuple) else predictions
        if compute_result is None:
            return metric.compute(predictions=logits, references=whole(eval_prediction.label_ids), top_k=top_k)
        if len(logits):
            batches.append((logits.float().cpu().numpy(), eval_prediction.label_ids.cpu().numpy()))
        if not compute_result:
            return None
        scored = [np.concatenate(column) for column in zip(*batches)] if batches else [np.zeros((0, 0)), np.zeros(0)]
        batches.clear()
        return metric.compute(predictions=scored[0], references=scored[1], top_k=top_k)

    # `EVLTrainer` calls it as an evaluation starts: the batches of one stopped part way (Ctrl-C) are dropped.
    compute_metrics.reset = batches.clear
    return compute_metrics


def write_per_class_report(logits: np.ndarray, labels: np.ndarray, id2label: dict, output_dir: str, prefix: str) -> dict:
    """Write `<prefix>_per_class_accuracy.json` and `<prefix>_confusion_matrix.csv` (rows: true class). Slots of
    clips that could not be decoded (label -100) are left out."""
    usable = labels != IGNORE_LABEL
    logits, labels = logits[usable], labels[usable]
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
    plot_confusion_matrix(np.asarray(report["confusion_matrix"]), names, output / f"{prefix}_confusion_matrix.png")
    return per_class


def plot_confusion_matrix(confusion: np.ndarray, names: list[str], path: str | Path) -> Path:
    """
    Draw a confusion matrix (rows: true class, as in the CSV) as a PNG. Each row is shown as the fraction of that
    class's clips given each prediction, so classes with more clips do not outshine the others; the counts are
    written in the cells for up to 20 classes, the class names on the axes for up to 60 (beyond, the axes count
    class ids).
    """
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no interactive backend (Agg)

    confusion = np.asarray(confusion)
    num_classes = len(names)
    totals = confusion.sum(axis=1, keepdims=True)
    fractions = np.divide(confusion, totals, out=np.zeros(confusion.shape, dtype=float), where=totals > 0)
    side = min(16.0, 3.0 + 0.35 * num_classes)
    figure = Figure(figsize=(side + 1.5, side), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(fractions, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    figure.colorbar(image, ax=axes, shrink=0.8, label="fraction of the true class's clips")
    if num_classes <= 60:
        font_size = 9 if num_classes <= 20 else 6
        axes.set_xticks(range(num_classes), names, rotation=90, fontsize=font_size)
        axes.set_yticks(range(num_classes), names, fontsize=font_size)
    if num_classes <= 20:
        for (row, column), count in np.ndenumerate(confusion):
            if count:
                color = "white" if fractions[row, column] > 0.5 else "black"
                axes.text(column, row, str(count), ha="center", va="center", color=color, fontsize=8)
    axes.set_xlabel("predicted class" if num_classes <= 60 else f"predicted class (id 0-{num_classes - 1})")
    axes.set_ylabel("true class" if num_classes <= 60 else f"true class (id 0-{num_classes - 1})")
    axes.set_title(f"Confusion matrix ({int(confusion.sum())} clips)")
    figure.savefig(path)
    return Path(path)


def write_predictions(
    clips: list[str], labels: np.ndarray, logits: dict[str, np.ndarray], id2label: dict, output_dir: str, prefix: str
) -> Path:
    """
    Write `<prefix>_predictions.csv`: one row per clip that could be decoded (label -100 ones are left out, as in
    the metrics) with the clip, its label (empty for a clip without one, label -1) and, for each column of `logits`
    (e.g. `predicted`, `predicted_reversed`), the top-1 class of those logits.
    """
    usable = labels != IGNORE_LABEL
    path = Path(output_dir) / f"{prefix}_predictions.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    # A NaN logit ranks last, as in the metrics (`argmax` would put it first).
    predicted = {column: np.nan_to_num(values, nan=-np.inf).argmax(-1) for column, values in logits.items()}
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["clip", "label", *predicted])
        for row in np.flatnonzero(usable):
            label = "" if labels[row] == UNLABELED else id2label[int(labels[row])]
            writer.writerow([clips[row], label, *(id2label[int(p[row])] for p in predicted.values())])
    return path
