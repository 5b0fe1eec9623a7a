# Copyright 2026 The evl-hf authors. Licensed under the Apache License, Version 2.0.
"""
Train, evaluate and predict with EVL on video folders, list files or a `datasets` data set, with `EVLTrainer`.
`examples/run_video_classification.py` and the demo (`python -m evl_hf.demo`) both run this module's `main`.

Start from pretrained CLIP (the frozen backbone) or from an EVL checkpoint:

    python examples/run_video_classification.py --backbone openai/clip-vit-base-patch16 \
        --train_dir data/train --validation_dir data/val --output_dir evl-out \
        --do_train --do_eval --num_frames 8 --sampling_rate 16 --learning_rate 4e-4 --weight_decay 0.05 \
        --decay_norms_and_biases true --lr_scheduler_type cosine --max_grad_norm 0 \
        --per_device_train_batch_size 32 --max_steps 50000 --bf16

Works unchanged under `accelerate launch` / torchrun (data parallel, mixed precision, gradient accumulation).

With `--model_name_or_path`, the checkpoint's own video processor gives the defaults (frames, stride, evaluation
views, sizes); a flag given on the command line overrides it. The data set's labels are mapped to the checkpoint's
by name.
"""

import gc
import json
import logging
import math
import os
import sys
import typing
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoVideoProcessor, HfArgumentParser, TrainingArguments, set_seed
from transformers.trainer import TRAINER_STATE_NAME

from .backbone_families import family_of_checkpoint, has_image_processor, processor_crop_size
from .class_names import read_class_names
from .configuration_evl import EVLConfig
from .data.video_dataset import (  # it says how to get `datasets` where that is missing
    FRAME_ORDERS,
    ClassLabel,
    Dataset,
    EvaluationClips,
    Features,
    FrameOrderClips,
    TrainingClips,
    Value,
    VideoClipCollator,
    VideoEvalTransform,
    VideoTrainTransform,
    build_feature_cache,
    clip_names,
    is_unlabeled,
    labels_by_name,
    load_video_dataset,
    shuffled_subset,
)
from .modeling_evl import EVLCheckpointError, EVLForVideoClassification
from .training import (
    RUN_ARGUMENTS_FILE,
    EVLTrainer,
    make_compute_metrics,
    warn_if_many_unusable,
    whole,
    write_per_class_report,
    write_predictions,
)
from .video_processing_evl import EVLVideoProcessor


logger = logging.getLogger(__name__)

# What --feature_cache_dtype names: Arrow, and so the cache, stores no bfloat16.
FEATURE_CACHE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "An EVL checkpoint (dir or Hub id)."})
    backbone: str | None = field(
        default=None,
        metadata={
            "help": "An image backbone to start a new EVL from (a Hub id or a dir): CLIP (e.g. "
            "openai/clip-vit-base-patch16), SigLIP, DINOv2 (with or without registers) or ViT."
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "EVLConfig fields to override, e.g. 'use_temporal_conv=false,decoder_num_layers=2'."},
    )
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "Start a new classification head when the checkpoint's labels are not the data set's."},
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded models/data sets are cached."})
    decay_norms_and_biases: bool = field(
        default=False,
        metadata={
            "help": "Apply --weight_decay to biases and LayerNorm weights too, as the authors' AdamW does (Trainer "
            "leaves them undecayed)."
        },
    )


@dataclass
class DataTrainingArguments:
    train_dir: str | None = field(default=None, metadata={"help": "videofolder layout: train/<label>/<clip>."})
    validation_dir: str | None = field(default=None)
    test_dir: str | None = field(
        default=None,
        metadata={"help": "Test clips for --do_predict: a videofolder, or a folder of clips without labels (all "
                          "directly in it), predicted and not scored."},
    )  # fmt: skip
    train_list: str | None = field(default=None, metadata={"help": "The authors' '<path> <label>' list format."})
    validation_list: str | None = field(default=None)
    test_list: str | None = field(
        default=None, metadata={"help": "'<path> <label>' lines, or paths alone (or with label -1) to predict."}
    )
    class_names_file: str | None = field(
        default=None,
        metadata={"help": "Class names in label order (a JSON list, a JSON object of name to label or label to "
                          "name, or one name per line): they name list files' and --dataset_name's number labels, "
                          "and number string labels, label folders and a ClassLabel's classes."},  # fmt: skip
    )
    dataset_name: str | None = field(default=None, metadata={"help": "A `datasets` data set with video and label."})
    dataset_config_name: str | None = field(default=None)
    video_column: str = field(default="video")
    label_column: str = field(
        default="label",
        metadata={"help": "The data set's label column; a test split without it is predicted without labels."},
    )
    # Processor settings: None means "the checkpoint's" (or EVLVideoProcessor's default for a new model).
    num_frames: int | None = field(default=None, metadata={"help": "Frames per clip (default: the model's)."})
    sampling_rate: int | None = field(
        default=None,
        metadata={"help": "Stride between sampled frames (default: the checkpoint's, else 16, or 8 for 32 frames or more)."},
    )
    num_spatial_views: int | None = field(
        default=None, metadata={"help": "Evaluation crops per window: 1 or 3 (default: the checkpoint's, else 1)."}
    )
    num_temporal_views: int | None = field(
        default=None, metadata={"help": "Evaluation windows per clip (default: the checkpoint's, else 1)."}
    )
    decoding_backend: str | None = field(
        default=None,
        metadata={"help": "auto (torchcodec when it loads, else PyAV), torchcodec or pyav (default: the checkpoint's, "
                  "else auto).", "choices": ["auto", "torchcodec", "pyav"]},
    )  # fmt: skip
    rand_augment: bool = field(default=True, metadata={"help": "RandAugment (same ops for every frame) in training."})
    cache_backbone_features: bool = field(
        default=False,
        metadata={"help": "Run the frozen backbone once per training clip and train the decoder from the cache "
                  "(no augmentation; see README)."},
    )  # fmt: skip
    feature_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where feature caches live (one sub-folder per fingerprint); default: the datasets cache. "
                  "Never inside --output_dir, which is saved and pushed."},
    )  # fmt: skip
    feature_cache_dtype: str = field(
        default="float16",
        metadata={"help": "float16 or float32 (Arrow stores no bfloat16).", "choices": list(FEATURE_CACHE_DTYPES)},
    )
    temporal_reliance: bool = field(
        default=False,
        metadata={"help": "Evaluate the validation clips also with their sampled frames reversed and shuffled in time "
                  "(eval_reversed_* / eval_shuffled_* metrics, per-clip predictions, a model-card section): how much "
                  "the model uses frame order. Three evaluations instead of one."},
    )  # fmt: skip
    train_val_split: float | None = field(
        default=0.15,
        metadata={"help": "With --do_eval and no validation split, the share of the training clips split off as one "
                  "(stratified by label where every class can be in both sets; seeded with --seed)."},
    )  # fmt: skip
    max_train_samples: int | None = field(default=None)
    max_eval_samples: int | None = field(default=None)
    max_predict_samples: int | None = field(default=None)

    def __post_init__(self):
        # Also for a JSON arguments file, which argparse's choices do not check: refused before any data is loaded.
        if self.feature_cache_dtype not in FEATURE_CACHE_DTYPES:
            raise ValueError(
                f"--feature_cache_dtype {self.feature_cache_dtype}: the feature cache stores float16 or float32 (Arrow "
                "stores no bfloat16)."
            )


# EVLConfig's fields that may be None (`int | None` ...): the type their value is read as, and `none` unsets them.
OPTIONAL_FIELD_TYPES = {
    name: next(kind for kind in typing.get_args(hint) if kind is not type(None))
    for name, hint in EVLConfig.__annotations__.items()
    if type(None) in typing.get_args(hint) and name != "vision_config"
}


def apply_overrides(config: EVLConfig, text: str | None, check: bool = True) -> EVLConfig:
    """`--config_overrides "a=1,b=false"` through `PretrainedConfig.update_from_string` (typed by each field's current
    value), then the configuration's own checks. A field that may be None (`image_size`, `backbone_dtype`) is typed by
    its annotation when it is None, which `update_from_string` refuses, and `none` sets it to None."""
    if text:
        malformed = [item for item in text.split(",") if "=" not in item]
        if malformed:
            raise ValueError(f"--config_overrides: expected key=value pairs separated by commas, got {malformed[0]!r}.")
        typed_by_current_value = []
        for item in text.split(","):
            key, value = item.split("=", 1)
            if key not in OPTIONAL_FIELD_TYPES or (value.lower() != "none" and getattr(config, key) is not None):
                typed_by_current_value.append(item)
                continue
            kind = OPTIONAL_FIELD_TYPES[key]
            try:
                setattr(config, key, None if value.lower() == "none" else kind(value))
            except ValueError:
                raise ValueError(f"--config_overrides: {key}={value} is not a valid {kind.__name__}.") from None
        if typed_by_current_value:
            config.update_from_string(",".join(typed_by_current_value))
    if check:
        config.check_architecture()
    return config


def checkpoint_labels(config: EVLConfig, data_labels: list[str], ignore_mismatched_sizes: bool) -> dict | None:
    """
    The id2label to train/evaluate with when starting from an EVL checkpoint: the checkpoint's own when every class
    of the data set is one of its classes (the data set is then mapped to it by name), None (a new head for the data
    set's labels) for a checkpoint without a head (an `EVLModel`'s, or a classifier's saved with `num_labels=0`) or
    with `--ignore_mismatched_sizes`; otherwise a `ValueError`.
    """
    if "EVLForVideoClassification" not in (config.architectures or []) or config.num_labels == 0:
        return None  # no classes to map the data set's to: the head is new
    # In the form the data set's class names take (label folders' names are NFC, a ClassLabel's as written): a
    # checkpoint trained on names in another form has the same classes. Classes of its own that differ only in form
    # stay as they are, two classes matched by exact name, not one name twice.
    names = [config.id2label[i] for i in range(config.num_labels)]
    composed = [unicodedata.normalize("NFC", name) for name in names]
    twins = {name for name, count in Counter(composed).items() if count > 1}
    data_by_form = {unicodedata.normalize("NFC", name): name for name in data_labels}
    names = [name if form in twins else data_by_form.get(form, form) for name, form in zip(names, composed)]
    missing = sorted(set(data_labels) - set(names))
    if not missing:
        return dict(enumerate(names))
    if ignore_mismatched_sizes:
        logger.warning("The data set's classes are not the checkpoint's: training a new head for %d classes.", len(data_labels))
        return None
    raise ValueError(
        f"The data set has classes the checkpoint does not know: {missing[:10]}{' ...' if len(missing) > 10 else ''} "
        f"(the checkpoint has {len(names)} classes, e.g. {names[:5]}). Give --ignore_mismatched_sizes to train a new "
        "classification head for the data set's classes. (A test folder's sub-folders are read as classes: clips to "
        "predict without labels lie directly in it.)"
    )


def data_source(data_args) -> str:
    """Where the classes were read from, for messages: the class names file, else the first data given."""
    for name in ("class_names_file", "dataset_name", "train_dir", "train_list", "validation_dir", "validation_list",
                 "test_dir", "test_list"):  # fmt: skip
        if getattr(data_args, name):
            return getattr(data_args, name)
    return "the data"


def split_off_validation(train: Dataset, fraction: float, seed: int, training: bool) -> tuple[Dataset, Dataset]:
    """
    (training, validation) clips of `train`, `fraction` of them for validation, as transformers'
    run_image_classification.py does with `--train_val_split`. Stratified by label where `datasets` can (every class
    has 2 clips or more and each set room for every class), else a random split (with a warning). `datasets` splits
    each class in proportion to its size, so a small class next to large ones may have no validation clip: a warning
    names such classes, which are not scored. Seeded with `seed` alone, so every process makes the same split. When
    `training`, a split that leaves a class without training clips is refused: that class would never be trained.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"--train_val_split must be at least 0 and less than 1, got {fraction}.")
    names = train.features["label"].names
    counts = Counter(train["label"])
    num_validation = math.ceil(fraction * len(train))  # as `train_test_split` counts it
    fewest, count = min(counts.items(), key=lambda item: item[1])
    if count < 2:
        why = f"the class {names[fewest]!r} has {count} clip"
    elif min(num_validation, len(train) - num_validation) < len(counts):
        why = (f"{num_validation} validation and {len(train) - num_validation} training clips cannot both hold each "
               f"of the {len(counts)} classes")  # fmt: skip
    else:
        why = None
    if why is not None:
        logger.warning("--train_val_split %s: the split is not stratified: %s.", fraction, why)
    # The split of the labels and row numbers alone, in memory, then the rows selected in memory: the processes would
    # otherwise write the same cache file at once, and `datasets` refuses `keep_in_memory` to split a data set backed
    # by cache files (everything `load_dataset` returns).
    rows = Dataset.from_dict(
        {"label": train["label"], "row": range(len(train))},
        features=Features({"label": train.features["label"], "row": Value("int64")}),
    )
    try:
        split = rows.train_test_split(
            test_size=fraction, seed=seed, stratify_by_column=None if why else "label", keep_in_memory=True
        )
    except ValueError as error:  # e.g. no clip left for training
        raise ValueError(f"--train_val_split {fraction}: {error}") from None
    unscored = sorted(set(counts) - set(split["test"]["label"]))
    if unscored:
        logger.warning(
            "--train_val_split %s leaves no validation clips of the classes %s (too few clips for their share): they "
            "are not scored. Give a larger --train_val_split, or a --validation_dir.",
            fraction, [names[label] for label in unscored],
        )  # fmt: skip
    missing = sorted(set(counts) - set(split["train"]["label"]))
    if training and missing:
        raise ValueError(
            f"--train_val_split {fraction} leaves no training clips of the classes {[names[label] for label in missing]}: "
            "they would never be trained. Give a smaller --train_val_split, another --seed, or a --validation_dir."
        )
    return tuple(train.select(split[part]["row"], keep_in_memory=True) for part in ("train", "test"))


def check_num_classes(id2label: dict, source: str) -> None:
    """Refuse fewer than 2 classes: transformers takes a model with one output for a regression (at its first
    forward), which would train and save as one without a word."""
    if len(id2label) < 2:
        names = list(id2label.values())
        raise ValueError(
            f"{source} has {len(names)} class {names}: video classification needs 2 or more classes (one output would "
            "train as a regression). Give the clips of the other classes too (an empty class folder names no class)."
        )


def build_model(model_args, data_args, labels: list[str]):
    """The model and its processor: the checkpoint's (flags given on the command line override the processor's
    settings) or a new EVL around `--backbone`."""
    if model_args.model_name_or_path:
        config = EVLConfig.from_pretrained(model_args.model_name_or_path, cache_dir=model_args.cache_dir)
        kept = checkpoint_labels(config, labels, model_args.ignore_mismatched_sizes)
        if kept is None and not labels:
            why = ("--ignore_mismatched_sizes asks for a new classification head" if model_args.ignore_mismatched_sizes
                   else f"{model_args.model_name_or_path} has no classification head")  # fmt: skip
            raise ValueError(f"{why}, and the data has no labeled clips (or --class_names_file) to give it classes.")
        new_head = kept is None and "EVLForVideoClassification" in (config.architectures or [])
        id2label = kept or dict(enumerate(labels))
        check_num_classes(id2label, model_args.model_name_or_path if kept else data_source(data_args))
        config.id2label, config.label2id = id2label, {label: index for index, label in id2label.items()}
        config = apply_overrides(config, model_args.config_overrides)
        model = EVLForVideoClassification.from_pretrained(
            model_args.model_name_or_path, config=config, cache_dir=model_args.cache_dir,
            ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        )  # fmt: skip
        if new_head:  # other classes: a head of the same size must not keep the old classes' weights either
            with torch.no_grad():
                torch.nn.init.normal_(model.classifier.weight, std=model.config.initializer_range)
                torch.nn.init.zeros_(model.classifier.bias)
        try:
            processor = AutoVideoProcessor.from_pretrained(model_args.model_name_or_path, cache_dir=model_args.cache_dir)
        except OSError:
            processor = None
    elif model_args.backbone:
        if not labels:
            raise ValueError("The data has no labeled clips, so a new model around --backbone has no classes: give "
                             "labeled clips, or predict with a trained checkpoint (--model_name_or_path).")  # fmt: skip
        id2label = dict(enumerate(labels))
        check_num_classes(id2label, data_source(data_args))
        fields = dict(id2label=id2label, label2id={label: index for index, label in id2label.items()})
        if data_args.num_frames is not None:
            fields["num_frames"] = data_args.num_frames
        backbone_config = AutoConfig.from_pretrained(model_args.backbone, cache_dir=model_args.cache_dir)
        vision_config = getattr(backbone_config, "vision_config", backbone_config)
        family = family_of_checkpoint(backbone_config.model_type)
        if family is not None:
            # Overrides first, then the backbone: the defaults alone may not fit it (e.g. 4 decoder layers on a
            # 3-block backbone that the overrides give 2).
            config = apply_overrides(EVLConfig(**fields), model_args.config_overrides, check=False)
            config.vision_config = vision_config
            if family.interpolates_position_embeddings and config.image_size is None:
                config.image_size = processor_crop_size(model_args.backbone, cache_dir=model_args.cache_dir)
            config.check_architecture()
            fields = {"config": config}
        # An unsupported backbone is refused there, naming the model type it found.
        model = EVLForVideoClassification.from_backbone_pretrained(model_args.backbone, cache_dir=model_args.cache_dir, **fields)
        # CLIP: the authors' preprocessing (bilinear, no antialias), which their results depend on. Other families:
        # the backbone's own image preprocessing (size, crop, resampling, mean / std) where it ships one.
        processor = None
        # (`from_backbone_pretrained` has refused any checkpoint without a family.)
        if family.vision_model_type != "clip_vision_model" and has_image_processor(model_args.backbone, cache_dir=model_args.cache_dir):
            settings = dict(cache_dir=model_args.cache_dir, num_frames=model.config.num_frames,
                            sampling_rate=8 if model.config.num_frames >= 32 else 16)  # fmt: skip
            # At the model's frame size: DINOv2 run at another `image_size` than its processor's crop.
            processor = EVLVideoProcessor.from_backbone_pretrained(
                model_args.backbone, image_size=model.config.frame_size, **settings
            )
            backbone_crop = processor_crop_size(model_args.backbone, cache_dir=model_args.cache_dir)
            if backbone_crop is not None and backbone_crop != model.config.frame_size:
                logger.warning(
                    "--backbone %s: its image processor crops %dx%d frames, the model reads %dx%d (its image_size); the "
                    "video processor crops those, after resizing %s (scaled by as much).", model_args.backbone,
                    backbone_crop, backbone_crop, model.config.frame_size, model.config.frame_size,
                    f"the short side to {processor.size.shortest_edge}" if processor.size.shortest_edge is not None
                    else f"to {processor.size.height}x{processor.size.width}",
                )  # fmt: skip
    else:
        raise ValueError("Give --model_name_or_path (an EVL checkpoint) or --backbone (an image backbone: CLIP, SigLIP, DINOv2, ViT).")
    if processor is None:
        processor = EVLVideoProcessor.from_model_config(model.config)
    overrides = {
        name: getattr(data_args, name)
        for name in ("num_frames", "sampling_rate", "num_spatial_views", "num_temporal_views", "decoding_backend")
        if getattr(data_args, name) is not None
    }
    if overrides:  # rebuilt, so the processor checks them with its other settings now, not at evaluation after training
        try:
            processor = type(processor).from_dict(processor.to_dict(), **overrides)
        except ValueError as error:
            flags = " ".join(f"--{name} {value}" for name, value in overrides.items())
            raise ValueError(f"{flags}: {error}") from None
    return model, processor


def checkpoint_folders(output_dir: str) -> list[Path]:
    """The `checkpoint-N` folders of `output_dir`, newest first."""
    folders = [path for path in Path(output_dir).glob("checkpoint-*") if path.is_dir() and path.name[11:].isdigit()]
    return sorted(folders, key=lambda path: int(path.name[11:]), reverse=True)


def last_resumable_checkpoint(output_dir: str) -> str | None:
    """
    The newest `checkpoint-N` folder of `output_dir` that `Trainer` can resume from, `None` if there is none. A run
    killed while saving leaves a folder with only some of its files; `Trainer` writes `trainer_state.json` last, so a
    folder whose state file is missing or does not parse is skipped, with a warning naming it. So is one without the
    random states (saved with `--save_only_model`), as `check_trainer_checkpoint` would refuse it.
    """
    for folder in checkpoint_folders(output_dir):
        try:
            json.loads((folder / TRAINER_STATE_NAME).read_text())
        except (OSError, ValueError):
            logger.warning("Skipping %s: it was not completely written (the run stopped while saving it).", folder)
            continue
        if not any(folder.glob("rng_state*.pth")):
            logger.warning("Skipping %s: it was saved with --save_only_model, which cannot be resumed from.", folder)
            continue
        return str(folder)
    return None


# Arguments that may differ between a run and its resumption without changing what is trained.
_RESUME_NEUTRAL = {
    "output_dir", "logging_dir", "run_name", "resume_from_checkpoint", "overwrite_output_dir", "do_train", "do_eval",
    "do_predict", "push_to_hub", "hub_model_id", "hub_token", "hub_strategy", "hub_private_repo", "report_to",
    "disable_tqdm", "dataloader_num_workers", "dataloader_persistent_workers", "dataloader_prefetch_factor",
    "cache_dir", "feature_cache_dir", "local_rank", "max_eval_samples", "max_predict_samples", "validation_dir",
    "validation_list", "test_dir", "test_list", "per_device_eval_batch_size", "logging_steps", "save_total_limit",
    "temporal_reliance",
}  # fmt: skip


def run_arguments(model_args, data_args, training_args) -> dict:
    from dataclasses import asdict

    # The world size changes the global batch as much as the per-device batch does.
    world = {"world_size": training_args.world_size,
             "total_train_batch_size": training_args.world_size * training_args.per_device_train_batch_size
             * training_args.gradient_accumulation_steps}  # fmt: skip
    return {**asdict(model_args), **asdict(data_args), **training_args.to_dict(), **world}


def warn_about_changed_arguments(checkpoint: str, current: dict) -> list[str]:
    """Compare the arguments saved in `checkpoint` with this run's; log a warning listing what differs."""
    saved_path = Path(checkpoint) / RUN_ARGUMENTS_FILE
    if not saved_path.exists():
        logger.warning("Resuming from %s, which does not record its run's arguments: they cannot be compared.", checkpoint)
        return []
    saved = json.loads(saved_path.read_text())
    current = json.loads(json.dumps(current, default=str))
    changed = [
        f"{key}: {saved.get(key)!r} -> {current.get(key)!r}"
        for key in sorted(set(saved) | set(current))
        if key not in _RESUME_NEUTRAL and saved.get(key) != current.get(key)
    ]
    if changed:
        logger.warning(
            "Resuming from %s with different arguments than the run that saved it (use a new --output_dir to start "
            "afresh):\n  %s", checkpoint, "\n  ".join(changed),
        )  # fmt: skip
    return changed


def check_trainer_checkpoint(checkpoint: str) -> None:
    """
    Refuse a folder that does not exist (a typo) or that `Trainer` did not write (no `trainer_state.json`), which
    `Trainer.train` would only refuse after the feature cache is built, and one without the optimizer, scheduler and
    random states (a run's final model, a `--save_only_model` checkpoint), from which `Trainer` would go on with a
    fresh optimizer and a restarted learning-rate schedule without a word. `Trainer` writes the random states (one
    file per process when distributed) after the optimizer and scheduler, in every layout (DeepSpeed's and FSDP's
    included), and only with them: their presence tells a checkpoint that can be resumed exactly.
    """
    folder = Path(checkpoint)
    if not (folder / TRAINER_STATE_NAME).is_file():
        why = "no such directory" if not folder.is_dir() else (
            f"no {TRAINER_STATE_NAME} in it: not a checkpoint Trainer wrote (a checkpoint-N folder of an --output_dir)"
        )  # fmt: skip
        raise ValueError(f"Cannot resume from {checkpoint}: {why}.")
    if not any(folder.glob("rng_state*.pth")):
        last = last_resumable_checkpoint(checkpoint)
        why = "no optimizer, scheduler or random states in it"
        if last is not None:
            raise ValueError(f"Cannot resume from {checkpoint}: {why} (a run's final model, not a checkpoint): resume "
                             f"from its last checkpoint, {last}.")  # fmt: skip
        raise ValueError(
            f"Cannot resume from {checkpoint}: {why} (a run's final model, or a checkpoint saved with "
            "--save_only_model), so training cannot continue where it stopped. To train on from its weights with a "
            f"new optimizer and schedule, give --model_name_or_path {checkpoint} and a new --output_dir."
        )


def check_checkpoint_fits(checkpoint: str, model: EVLForVideoClassification) -> None:
    """Refuse a checkpoint whose weights do not fit this run's model (e.g. saved with another `--num_frames`), the
    tensors that differ named from the safetensors headers: `Trainer.train` would fail on them after the feature
    cache is built."""
    try:
        EVLForVideoClassification._check_checkpoint_files(checkpoint, {"config": model.config})
    except EVLCheckpointError as error:
        raise ValueError(
            f"Cannot resume from {checkpoint}: its weights do not fit this run's model (start afresh with a new "
            f"--output_dir, or resume with the run's own settings): {str(error).removeprefix(f'{checkpoint}: ')}"
        ) from None


def check_checkpoint_classes(checkpoint: str, id2label: dict) -> None:
    """Refuse to resume from a checkpoint trained for other classes than this run's model has (e.g. the data gained a
    class): loading its head would fail deep in `Trainer` with a size mismatch, or, with as many classes, resume
    with the old classes' weights under new names."""
    config_path = Path(checkpoint) / "config.json"
    if not config_path.exists():
        return
    # Read as transformers reads it: a config.json leaves out an id2label equal to the default (LABEL_0, LABEL_1).
    saved = EVLConfig.from_json_file(str(config_path)).id2label
    saved_names = [saved[key] for key in sorted(saved, key=int)]
    names = [id2label[index] for index in sorted(id2label)]
    if saved_names != names:
        added, dropped = sorted(set(names) - set(saved_names)), sorted(set(saved_names) - set(names))
        listed = f"new: {added[:5]}, gone: {dropped[:5]}" if added or dropped else "the same names in another order"
        raise ValueError(
            f"Cannot resume from {checkpoint}: it was trained for {len(saved_names)} classes, this run's model has "
            f"{len(names)} ({listed}). Start afresh with a new --output_dir, resume with the data the checkpoint was "
            "trained on, or give --resume_from_checkpoint another checkpoint."
        )


def check_checkpoint_freeze(checkpoint: str, freeze_backbone: bool) -> None:
    """Refuse to resume from a checkpoint trained with the backbone frozen when this run's model trains it, or the other
    way round: its optimizer state holds the other set of parameters, which `Trainer` would only refuse in torch's
    `load_state_dict` (a parameter group that does not match in size)."""
    config_path = Path(checkpoint) / "config.json"
    if not config_path.exists():
        return
    saved = EVLConfig.from_json_file(str(config_path)).freeze_backbone
    if saved != freeze_backbone:
        raise ValueError(
            f"Cannot resume from {checkpoint}: it was trained with freeze_backbone={saved}, this run's model has "
            f"freeze_backbone={freeze_backbone}, so the optimizer state it saved is for other parameters. Resume with "
            f"freeze_backbone={str(saved).lower()} in --config_overrides, or start afresh with a new --output_dir."
        )


def check_checkpoint_decay(checkpoint: str, decay_norms_and_biases: bool) -> None:
    """Refuse to resume with the other `--decay_norms_and_biases`: the optimizer's decayed and undecayed parameter
    groups change size, which `Trainer` would only refuse in torch's `load_state_dict`. A checkpoint without its run's
    arguments cannot be checked."""
    saved_path = Path(checkpoint) / RUN_ARGUMENTS_FILE
    if not saved_path.exists():
        return
    saved = json.loads(saved_path.read_text()).get("decay_norms_and_biases", False)  # older runs: Trainer's groups
    if saved != decay_norms_and_biases:
        raise ValueError(
            f"Cannot resume from {checkpoint}: it was trained with --decay_norms_and_biases {str(saved).lower()}, this "
            f"run has {str(decay_norms_and_biases).lower()}, so the optimizer state it saved is for other parameter "
            f"groups. Resume with --decay_norms_and_biases {str(saved).lower()}, or start afresh with a new --output_dir."
        )


def parse_arguments(argv: list[str]):
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(args=argv)


def feature_cache_root(data_args, training_args) -> Path:
    """Where feature caches live: never inside the output directory, which is saved and pushed to the Hub."""
    if data_args.feature_cache_dir:
        root = Path(data_args.feature_cache_dir).resolve()
    else:
        import datasets

        root = Path(datasets.config.HF_DATASETS_CACHE).resolve() / "evl_hf_feature_cache"
    output = Path(training_args.output_dir).resolve()
    if root == output or output in root.parents:
        raise ValueError(
            f"--feature_cache_dir {root} is inside --output_dir {output}, which is saved and pushed to the Hub: "
            "put the cache elsewhere."
        )
    return root


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    if "--demo" in argv:
        from .demo import main as demo_main

        return demo_main([a for a in argv if a != "--demo"])

    model_args, data_args, training_args = parse_arguments(argv)
    if data_args.temporal_reliance and not training_args.do_eval:
        raise ValueError("--temporal_reliance evaluates the validation clips with their frames reordered: it needs --do_eval.")
    # The data sets hand the model exactly its inputs (decoded clips); the raw columns are read by the transforms.
    training_args.remove_unused_columns = False

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    logger.setLevel(training_args.get_process_log_level())
    set_seed(training_args.seed)

    class_names = None
    if data_args.class_names_file:
        class_names = read_class_names(data_args.class_names_file)
    # Every split given names classes; one this run does not use (e.g. a partly labeled test split in a training run)
    # is left out rather than stopping it.
    used = {"train": training_args.do_train, "validation": training_args.do_eval, "test": training_args.do_predict}
    dataset = load_video_dataset(
        data_args.train_dir, data_args.validation_dir, data_args.test_dir, data_args.train_list,
        data_args.validation_list, data_args.test_list, data_args.dataset_name, data_args.dataset_config_name,
        data_args.video_column, data_args.label_column, class_names, model_args.cache_dir,
        used_splits=[split for split, wanted in used.items() if wanted],
    )  # fmt: skip
    if training_args.do_eval and "validation" not in dataset and "train" in dataset and not training_args.do_train:
        # The model was trained elsewhere, most likely on these clips: a split of them is no held-out data.
        raise ValueError(
            "--do_eval without --do_train and no validation split: --train_val_split would split the validation "
            "clips off the training data and score clips the model was trained on. Give --validation_dir, "
            "--validation_list or a data set with a validation split."
        )
    if training_args.do_eval and "validation" not in dataset and "train" in dataset and data_args.train_val_split:
        dataset["train"], dataset["validation"] = split_off_validation(
            dataset["train"], data_args.train_val_split, training_args.seed, training=training_args.do_train
        )  # fmt: skip
    else:
        # Recorded with the run's arguments: a resumed run that splits where this one did not says so.
        data_args.train_val_split = None
    # Class names from the labeled splits (or --class_names_file); a test split without labels is only predicted.
    unlabeled = {split for split, data in dataset.items() if is_unlabeled(data)}
    labels = next(iter(dataset.values())).features["label"].names
    model, processor = build_model(model_args, data_args, labels)
    if model.config.problem_type not in (None, "single_label_classification"):
        raise ValueError(
            f"problem_type={model.config.problem_type!r}: this script trains and evaluates single-label video "
            "classification (one class per clip); use EVLForVideoClassification with your own Trainer for others."
        )
    if data_args.cache_backbone_features and not model.config.freeze_backbone:
        raise ValueError("--cache_backbone_features stores the frozen backbone's outputs; it cannot train a backbone "
                         "with freeze_backbone=false.")  # fmt: skip
    if list(model.config.id2label.values()) != list(labels):
        # Map the data set's labels to the model's by name (`datasets` renumbers the label column); clips without a
        # label keep -1 under the model's classes.
        model_labels = ClassLabel(names=[model.config.id2label[i] for i in range(model.config.num_labels)])
        for split in dataset:
            if split in unlabeled:
                dataset[split] = dataset[split].cast_column("label", model_labels)
            else:
                dataset[split] = labels_by_name(dataset[split], model_labels)

    def limit(split, maximum):
        return shuffled_subset(dataset[split], maximum, seed=training_args.seed)

    train_split = eval_dataset = predict_dataset = None
    train_dataset = None
    if training_args.do_train:
        if "train" not in dataset:
            raise ValueError("--do_train needs a train split.")
        train_split = limit("train", data_args.max_train_samples)
        # Trainer would train 0 steps and save an untrained model; the feature cache would call the data set broken.
        if not len(train_split):
            maximum = data_args.max_train_samples
            given = "" if maximum is None else f" (--max_train_samples {maximum})"
            raise ValueError(f"--do_train: the training split has no clips{given}.")
        # Built with the feature cache too, which does not use it: it refuses what cannot be trained either way.
        train_transform = VideoTrainTransform(processor, rand_augment=data_args.rand_augment)
        if not data_args.cache_backbone_features:
            seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed
            train_dataset = TrainingClips(train_split, train_transform, seed=seed)
    eval_transform = VideoEvalTransform(processor)
    if training_args.do_eval:
        if "validation" not in dataset:
            split_off = ", or split one off the training clips with --train_val_split" if training_args.do_train else ""
            raise ValueError(
                f"--do_eval needs a validation split: give --validation_dir, --validation_list or a data set with "
                f"one{split_off}."
            )
        eval_dataset = EvaluationClips(limit("validation", data_args.max_eval_samples), eval_transform)
    # The same clips with their decoded frames reordered; a clip's shuffle depends on its index only, never the rank.
    reordered_eval_datasets = {}
    if data_args.temporal_reliance:
        reordered_eval_datasets = {order: FrameOrderClips(eval_dataset, order) for order in FRAME_ORDERS}
    if training_args.do_predict:
        if "test" not in dataset:
            raise ValueError("--do_predict needs a test split.")
        predict_dataset = EvaluationClips(limit("test", data_args.max_predict_samples), eval_transform)

    arguments = run_arguments(model_args, data_args, training_args)
    trainer = EVLTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=VideoClipCollator(),
        compute_metrics=make_compute_metrics(top_k=5),
        processing_class=processor,
        run_arguments=arguments,
        decay_norms_and_biases=model_args.decay_norms_and_biases,
    )

    checkpoint = None
    if training_args.do_train:
        # Checked before any backbone work (the feature cache): a run that cannot resume stops at once.
        checkpoint = training_args.resume_from_checkpoint
        if checkpoint is None and os.path.isdir(training_args.output_dir):
            checkpoint = last_resumable_checkpoint(training_args.output_dir)
            if checkpoint is not None:
                logger.warning("Resuming training from %s (found in --output_dir)", checkpoint)
            else:
                # Starting afresh would overwrite the checkpoints, and Trainer cannot resume from model-only ones.
                folders = checkpoint_folders(training_args.output_dir)
                saved = [folder for folder in folders if (folder / TRAINER_STATE_NAME).is_file()]
                if saved:
                    raise ValueError(
                        f"{training_args.output_dir} holds only checkpoints saved with --save_only_model, which cannot "
                        "be resumed from (transformers saves no optimizer, scheduler or random states with them). To "
                        f"train on from the last one's weights with a new optimizer and schedule, give "
                        f"--model_name_or_path {saved[0]} and a new --output_dir; to start afresh, give a new "
                        "--output_dir (or remove its checkpoint-N folders)."
                    )
        if checkpoint is not None:
            check_trainer_checkpoint(checkpoint)
            warn_about_changed_arguments(checkpoint, arguments)
            check_checkpoint_classes(checkpoint, model.config.id2label)
            check_checkpoint_freeze(checkpoint, model.config.freeze_backbone)
            check_checkpoint_decay(checkpoint, model_args.decay_norms_and_biases)
            check_checkpoint_fits(checkpoint, model)

    if training_args.do_train and data_args.cache_backbone_features:
        # After the Trainer has put the model on its device: the backbone runs on the accelerator, each process
        # caching its share of the clips.
        if data_args.rand_augment:
            logger.warning("Training from the feature cache: one fixed view per clip, no augmentation (RandAugment "
                           "and the random crop are not applied).")  # fmt: skip
        dtype = FEATURE_CACHE_DTYPES[data_args.feature_cache_dtype]
        # Under the autocast the training step runs the model in (accelerate's, for --bf16/--fp16; Trainer's own
        # `autocast_smart_context_manager` does nothing): the backbone computes what it would uncached.
        with trainer.accelerator.autocast():
            trainer.train_dataset, unusable = build_feature_cache(
                trainer.model, train_split, VideoEvalTransform(processor, temporal_views=1, spatial_views=1),
                feature_cache_root(data_args, training_args), dtype=dtype,
                batch_size=training_args.per_device_eval_batch_size, progress=not training_args.disable_tqdm,
            )  # fmt: skip
        logger.info("Feature cache: %d clips cached, %d could not be decoded", len(trainer.train_dataset), unusable)
        if not len(trainer.train_dataset):
            raise RuntimeError(
                f"None of the {unusable} training clips could be decoded for the feature cache; the data set looks "
                "broken (the warnings above name the files)."
            )
        warn_if_many_unusable(unusable, len(trainer.train_dataset) + unusable, "were left out of the feature cache")

    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=checkpoint)
        if data_args.cache_backbone_features:
            result.metrics["train_unusable_clips"] = unusable
        trainer.save_model()
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()

    for prefix, data in (("eval", eval_dataset), ("test", predict_dataset)):
        if data is None:
            continue
        output = trainer.predict(data, metric_key_prefix=prefix)
        # Per-clip files need whole arrays, also under `--eval_do_concat_batches false` (a list per batch).
        predictions, label_ids = whole(output.predictions), whole(output.label_ids)
        logits = {"predicted": predictions}
        if prefix == "eval":
            for order, reordered in reordered_eval_datasets.items():
                reordered_output = trainer.predict(reordered, metric_key_prefix=f"eval_{order}")
                # The accuracies and the loss; the clips, and so their counts, are the in-order evaluation's.
                output.metrics.update(
                    {key: value for key, value in reordered_output.metrics.items() if key.endswith(("_accuracy", "_loss"))}
                )
                logits[f"predicted_{order}"] = whole(reordered_output.predictions)
        trainer.log_metrics(prefix, output.metrics)
        trainer.save_metrics(prefix, output.metrics)
        if prefix == "eval":
            trainer.log(output.metrics)  # into the log history, where the model card reads evaluation results
        if trainer.is_world_process_zero() and label_ids is not None and len(label_ids):
            id2label = model.config.id2label
            if not is_unlabeled(data.dataset):
                write_per_class_report(predictions, label_ids, id2label, training_args.output_dir, prefix)
            write_predictions(clip_names(data.dataset), label_ids, logits, id2label, training_args.output_dir, prefix)

    dataset_id = data_args.dataset_name or data_args.train_dir or data_args.train_list or data_args.validation_dir
    card = {
        "finetuned_from": model_args.backbone or model_args.model_name_or_path,
        "tasks": "video-classification",
        "dataset": dataset_id,
        "tags": ["evl", "video-classification"],
    }
    if training_args.push_to_hub:
        trainer.push_to_hub(**card)
    else:
        trainer.create_model_card(**card)
    return trainer


def run() -> None:
    """`main`, then leave the process group (under accelerate launch / torchrun) before the interpreter exits, also
    when `main` raised."""
    try:
        main()
    finally:
        leave_process_group()


def leave_process_group() -> None:
    """
    Destroy the process group and free it now, while the interpreter is whole. `destroy_process_group` (also called by
    `Trainer.end()`) only drops torch's own references: the trainer's DDP wrapper, unreachable garbage in a reference
    cycle by now, still holds the group, and gloo's threads would run until the interpreter's teardown frees it, where
    a rank can abort ("terminate called without an active exception") after a run that succeeded. Call it once the
    trainer is no longer referenced; the garbage is collected even if the group was destroyed already.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    gc.collect()


if __name__ == "__main__":
    run()
