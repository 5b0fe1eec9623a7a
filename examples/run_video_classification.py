#!/usr/bin/env python
# Copyright 2026 The evl-hf authors. Licensed under the Apache License, Version 2.0.
"""
Train, evaluate and predict with EVL on video folders, list files or a `datasets` data set, with `Trainer`.

Start from pretrained CLIP (the frozen backbone) or from an EVL checkpoint:

    python examples/run_video_classification.py --backbone openai/clip-vit-base-patch16 \
        --train_dir data/train --validation_dir data/val --output_dir evl-out \
        --do_train --do_eval --num_frames 8 --sampling_rate 16 --learning_rate 4e-4 --weight_decay 0.05 \
        --lr_scheduler_type cosine --per_device_train_batch_size 32 --num_train_epochs 30 --bf16

Works unchanged under `accelerate launch` (data parallel, mixed precision, gradient accumulation). `--demo` runs
the offline demo instead (synthetic motion data set, tiny random CLIP).
"""

import logging
import os
import sys
from dataclasses import dataclass, field

import torch
import transformers
from transformers import AutoVideoProcessor, HfArgumentParser, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from evl_hf import EVLConfig, EVLForVideoClassification, EVLVideoProcessor
from evl_hf.data.video_dataset import (
    EpochCallback,
    SkippingVideoCollator,
    VideoEvalTransform,
    VideoTrainTransform,
    build_feature_cache,
    load_video_dataset,
    with_skipping,
)
from evl_hf.training import EVLTrainer, make_compute_metrics, write_per_class_report


logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "An EVL checkpoint (dir or Hub id)."})
    backbone: str | None = field(
        default=None, metadata={"help": "A CLIP model (e.g. openai/clip-vit-base-patch16 or a dir) to start a new EVL."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "EVLConfig fields to override, e.g. 'use_temporal_conv=false,decoder_num_layers=2'."},
    )
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Re-initialise layers whose shapes differ (e.g. a new number of classes)."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded models/data sets are cached."})


@dataclass
class DataTrainingArguments:
    train_dir: str | None = field(default=None, metadata={"help": "videofolder layout: train/<label>/<clip>."})
    validation_dir: str | None = field(default=None)
    test_dir: str | None = field(default=None)
    train_list: str | None = field(default=None, metadata={"help": "The authors' '<path> <label>' list format."})
    validation_list: str | None = field(default=None)
    test_list: str | None = field(default=None)
    class_names_file: str | None = field(default=None, metadata={"help": "JSON list of class names for list files."})
    dataset_name: str | None = field(default=None, metadata={"help": "A `datasets` data set with video and label."})
    dataset_config_name: str | None = field(default=None)
    video_column: str = field(default="video")
    label_column: str = field(default="label")
    num_frames: int | None = field(default=None, metadata={"help": "Frames per clip (default: the model's)."})
    sampling_rate: int = field(default=16, metadata={"help": "Stride between sampled frames."})
    num_spatial_views: int = field(default=1, metadata={"help": "Evaluation crops per window: 1 or 3."})
    decoding_backend: str = field(
        default="auto",
        metadata={"help": "auto (torchcodec when it loads, else PyAV), torchcodec or pyav.", "choices": ["auto", "torchcodec", "pyav"]},
    )
    num_temporal_views: int = field(default=1, metadata={"help": "Evaluation windows per clip."})
    rand_augment: bool = field(default=True, metadata={"help": "RandAugment (same ops for every frame) in training."})
    cache_backbone_features: bool = field(
        default=False,
        metadata={"help": "Run the frozen backbone once per training clip and train the decoder from the cache "
                  "(no augmentation; see README)."},
    )  # fmt: skip
    feature_cache_dtype: str = field(default="float16", metadata={"help": "float16 or float32."})
    max_train_samples: int | None = field(default=None)
    max_eval_samples: int | None = field(default=None)
    max_predict_samples: int | None = field(default=None)


def parse_overrides(text: str | None) -> dict:
    """'a=1,b=false,c=0.5' -> {'a': 1, 'b': False, 'c': 0.5}."""
    overrides = {}
    for item in filter(None, (text or "").split(",")):
        key, _, value = item.partition("=")
        if not _:
            raise ValueError(f"--config_overrides: expected key=value, got {item!r}")
        lowered = value.strip().lower()
        if lowered in ("true", "false"):
            parsed = lowered == "true"
        else:
            try:
                parsed = int(value)
            except ValueError:
                try:
                    parsed = float(value)
                except ValueError:
                    parsed = value.strip()
        overrides[key.strip()] = parsed
    return overrides


def build_model(model_args, data_args, labels: list[str]):
    id2label = dict(enumerate(labels))
    label2id = {label: index for index, label in id2label.items()}
    overrides = parse_overrides(model_args.config_overrides)
    if data_args.num_frames is not None:
        overrides.setdefault("num_frames", data_args.num_frames)
    if model_args.model_name_or_path:
        config = EVLConfig.from_pretrained(model_args.model_name_or_path, cache_dir=model_args.cache_dir)
        config = EVLConfig.from_dict({**config.to_dict(), **overrides, "id2label": id2label, "label2id": label2id})
        model = EVLForVideoClassification.from_pretrained(
            model_args.model_name_or_path, config=config, cache_dir=model_args.cache_dir,
            ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        )  # fmt: skip
        try:
            processor = AutoVideoProcessor.from_pretrained(model_args.model_name_or_path, cache_dir=model_args.cache_dir)
        except OSError:
            processor = None
    elif model_args.backbone:
        model = EVLForVideoClassification.from_backbone_pretrained(
            model_args.backbone, id2label=id2label, label2id=label2id, cache_dir=model_args.cache_dir, **overrides
        )
        processor = None
    else:
        raise ValueError("Give --model_name_or_path (an EVL checkpoint) or --backbone (a CLIP model).")
    image_size = model.config.vision_config.image_size
    if processor is None:
        processor = EVLVideoProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    processor.num_frames = model.config.num_frames if data_args.num_frames is None else data_args.num_frames
    processor.sampling_rate = data_args.sampling_rate
    processor.decoding_backend = data_args.decoding_backend
    return model, processor


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    if "--demo" in argv:
        from evl_hf.demo import main as demo_main

        return demo_main([a for a in argv if a != "--demo"])

    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    if len(argv) == 1 and argv[0].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    # Clips are decoded in the transforms, so the raw columns must reach them.
    training_args.remove_unused_columns = False

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    set_seed(training_args.seed)

    class_names = None
    if data_args.class_names_file:
        import json

        with open(data_args.class_names_file) as handle:
            class_names = json.load(handle)
    dataset = load_video_dataset(
        data_args.train_dir, data_args.validation_dir, data_args.test_dir, data_args.train_list,
        data_args.validation_list, data_args.test_list, data_args.dataset_name, data_args.dataset_config_name,
        data_args.video_column, data_args.label_column, class_names, model_args.cache_dir,
    )  # fmt: skip
    labels = next(iter(dataset.values())).features["label"].names
    model, processor = build_model(model_args, data_args, labels)
    num_frames = processor.num_frames

    def limit(split, maximum):
        data = dataset[split]
        return data.select(range(min(maximum, len(data)))) if maximum is not None else data

    train_dataset = eval_dataset = predict_dataset = None
    callbacks = []
    if training_args.do_train:
        if "train" not in dataset:
            raise ValueError("--do_train needs a train split.")
        train_dataset = limit("train", data_args.max_train_samples)
        if data_args.cache_backbone_features:
            dtype = {"float16": torch.float16, "float32": torch.float32}[data_args.feature_cache_dtype]
            train_dataset, skipped = build_feature_cache(
                model, train_dataset, VideoEvalTransform(processor, num_frames, data_args.sampling_rate),
                os.path.join(training_args.output_dir, "feature_cache"), dtype=dtype,
            )  # fmt: skip
            logger.info("Feature cache: %d clips cached, %d skipped", len(train_dataset), skipped)
        else:
            train_transform = VideoTrainTransform(
                processor, num_frames, data_args.sampling_rate, data_args.rand_augment, seed=training_args.seed
            )
            train_dataset = train_dataset.add_column("clip_index", list(range(len(train_dataset))))
            train_dataset.set_transform(with_skipping(train_transform))
            callbacks.append(EpochCallback(train_transform))
    eval_transform = with_skipping(
        VideoEvalTransform(processor, num_frames, data_args.sampling_rate, data_args.num_temporal_views, data_args.num_spatial_views)
    )  # fmt: skip
    if training_args.do_eval:
        if "validation" not in dataset:
            raise ValueError("--do_eval needs a validation split.")
        eval_dataset = limit("validation", data_args.max_eval_samples)
        eval_dataset.set_transform(eval_transform)
    if training_args.do_predict:
        if "test" not in dataset:
            raise ValueError("--do_predict needs a test split.")
        predict_dataset = limit("test", data_args.max_predict_samples)
        predict_dataset.set_transform(eval_transform)

    trainer = EVLTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=SkippingVideoCollator(),
        compute_metrics=make_compute_metrics(top_k=5),
        processing_class=processor,
        callbacks=callbacks,
    )

    if training_args.do_train:
        checkpoint = training_args.resume_from_checkpoint
        if checkpoint is None and os.path.isdir(training_args.output_dir):
            checkpoint = get_last_checkpoint(training_args.output_dir)
            if checkpoint is not None:
                logger.info("Resuming training from %s", checkpoint)
        result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()

    for split_name, prefix, data in (("validation", "eval", eval_dataset), ("test", "test", predict_dataset)):
        if data is None:
            continue
        output = trainer.predict(data, metric_key_prefix=prefix)
        trainer.log_metrics(prefix, output.metrics)
        trainer.save_metrics(prefix, output.metrics)
        if prefix == "eval":
            trainer.log(output.metrics)  # into the log history, where the model card reads evaluation results
        if trainer.is_world_process_zero() and output.label_ids is not None and len(output.label_ids):
            write_per_class_report(output.predictions, output.label_ids, model.config.id2label, training_args.output_dir, prefix)

    card = {
        "finetuned_from": model_args.backbone or model_args.model_name_or_path,
        "tasks": "video-classification",
        "dataset": data_args.dataset_name or data_args.train_dir or data_args.train_list,
        "tags": ["evl", "video-classification"],
    }
    if training_args.push_to_hub:
        trainer.push_to_hub(**card)
    else:
        trainer.create_model_card(**card)
    return trainer


if __name__ == "__main__":
    main()
