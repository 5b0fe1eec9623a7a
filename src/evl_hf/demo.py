"""
The offline EVL demo: a few minutes on 2 CPU cores, no network.

1. Generates the synthetic motion data set (classes only temporal order can tell apart; `evl_hf.data.synthetic`).
2. Saves a small random CLIP vision tower and builds EVL around it with `from_backbone_pretrained`, the path a user
   takes with `openai/clip-vit-base-patch16`.
3. Trains full EVL and EVL with its three temporal modules switched off (the paper's temporal ablation) with
   `EVLTrainer`, from a frozen-backbone feature cache (the backbone runs once per clip).
4. Evaluates both, saves the full model, and classifies a held-out clip with `pipeline("video-classification")`.

    python -m evl_hf.demo --output_dir demo_output
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, TrainingArguments, pipeline, set_seed
from transformers.utils import logging as hf_logging

from .data.synthetic import MOTION_CLASSES, generate_motion_dataset
from .data.video_dataset import SkippingVideoCollator, VideoEvalTransform, build_feature_cache, load_video_dataset
from .modeling_evl import EVLForVideoClassification
from .training import EVLTrainer, make_compute_metrics
from .video_processing_evl import EVLVideoProcessor


NUM_FRAMES, SAMPLING_RATE, IMAGE_SIZE = 8, 2, 32


def pair_metrics(logits: np.ndarray, labels: np.ndarray) -> dict:
    """Top-1, accuracy at telling the time-reversed pair (classes 2k, 2k+1), and direction accuracy within it."""
    predicted = logits.argmax(-1)
    right_pair = predicted // 2 == labels // 2
    return {
        "top1": float((predicted == labels).mean()),
        "pair": float(right_pair.mean()),
        "direction_given_pair": float((predicted == labels)[right_pair].mean()) if right_pair.any() else 0.0,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="demo_output")
    parser.add_argument("--train_per_class", type=int, default=100)
    parser.add_argument("--epochs", type=float, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    output = Path(args.output_dir)
    started = time.perf_counter()

    data_dir = output / "motion_data"
    if not (data_dir / "labels.json").exists():
        print(f"Generating the synthetic motion data set in {data_dir} ...", flush=True)
        generate_motion_dataset(data_dir, args.train_per_class, 20, 5, num_frames=16, size=48, seed=args.seed)
    dataset = load_video_dataset(data_dir / "train", data_dir / "validation", data_dir / "test")
    labels = dataset["train"].features["label"].names
    assert sorted(labels) == sorted(MOTION_CLASSES)
    # Order the classes so that time-reversed pairs are (2k, 2k + 1).
    order = [labels.index(name) for name in MOTION_CLASSES]

    set_seed(args.seed)
    backbone_dir = output / "clip-vit-tiny-random"
    CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, patch_size=8,
            image_size=IMAGE_SIZE, hidden_act="quick_gelu",
        )  # fmt: skip
    ).save_pretrained(backbone_dir)
    processor = EVLVideoProcessor(
        num_frames=NUM_FRAMES, sampling_rate=SAMPLING_RATE, size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )  # fmt: skip
    id2label = dict(enumerate(labels))
    label2id = {name: index for index, name in id2label.items()}
    common = dict(
        num_frames=NUM_FRAMES, decoder_num_layers=2, decoder_qkv_dim=64, decoder_num_heads=4,
        decoder_mlp_dropout=0.0, classifier_dropout=0.0, id2label=id2label, label2id=label2id,
    )  # fmt: skip
    variants = {
        "full EVL": {},
        "temporal modules off": dict(use_temporal_conv=False, use_temporal_pos_embed=False, use_temporal_cross_attention=False),
    }  # fmt: skip

    transform = VideoEvalTransform(processor, NUM_FRAMES, SAMPLING_RATE)
    caches = {}
    results = {}
    for name, switches in variants.items():
        set_seed(args.seed)
        model = EVLForVideoClassification.from_backbone_pretrained(backbone_dir, **common, **switches)
        if not caches:
            # The backbone is shared and frozen: cache its features once, with the full model (it needs the most).
            cache_started = time.perf_counter()
            for split in ("train", "validation"):
                caches[split], _ = build_feature_cache(
                    model, dataset[split], transform, output / "feature_cache" / split, progress=False
                )
            results["cache seconds"] = time.perf_counter() - cache_started
        train_data, eval_data = caches["train"], caches["validation"]
        if not model.config.use_temporal_cross_attention:
            train_data, eval_data = (d.remove_columns("cross_frame_maps") for d in (train_data, eval_data))
        run_dir = output / ("evl-full" if not switches else "evl-no-temporal")
        training_args = TrainingArguments(
            output_dir=str(run_dir), per_device_train_batch_size=16, per_device_eval_batch_size=32,
            learning_rate=2e-3, weight_decay=0.05, lr_scheduler_type="cosine", warmup_steps=0.1,
            num_train_epochs=args.epochs, logging_strategy="no", save_strategy="no", report_to=[],
            remove_unused_columns=False, seed=args.seed, dataloader_num_workers=0, disable_tqdm=True,
        )  # fmt: skip
        trainer = EVLTrainer(
            model=model, args=training_args, train_dataset=train_data, eval_dataset=eval_data,
            data_collator=SkippingVideoCollator(), compute_metrics=make_compute_metrics(),
        )  # fmt: skip
        print(f"Training {name} ...", flush=True)
        train_started = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - train_started
        prediction = trainer.predict(eval_data, metric_key_prefix="eval")
        remap = np.array([order.index(i) for i in range(len(labels))])
        metrics = pair_metrics(prediction.predictions[:, order], remap[prediction.label_ids])
        metrics["top5"] = prediction.metrics["eval_top5_accuracy"]
        metrics["train_seconds"] = train_seconds
        results[name] = metrics
        if not switches:
            trainer.save_model(str(run_dir))
            processor.save_pretrained(run_dir)

    classifier = pipeline("video-classification", model=str(output / "evl-full"))
    test_clip = sorted((data_dir / "test").rglob("*.mp4"))[0]
    prediction = classifier(str(test_clip), top_k=3)
    results["pipeline"] = {"clip": str(test_clip), "true": test_clip.parent.name, "top3": prediction}
    results["total seconds"] = time.perf_counter() - started
    (output / "demo_results.json").write_text(json.dumps(results, indent=2))

    print()
    print(f"Validation ({len(caches['validation'])} clips, {len(labels)} classes in 5 time-reversed pairs; chance 0.10):")
    print(f"{'variant':<22} {'top-1':>6} {'top-5':>6} {'pair':>6} {'direction|pair':>15} {'train time':>11}")
    for name in variants:
        m = results[name]
        print(f"{name:<22} {m['top1']:>6.3f} {m['top5']:>6.3f} {m['pair']:>6.3f} {m['direction_given_pair']:>15.3f} {m['train_seconds']:>10.1f}s")
    print("(direction|pair: right direction among clips whose time-reversed pair was right; chance 0.5)")
    print(f"Backbone feature cache: {results['cache seconds']:.1f}s for {len(caches['train']) + len(caches['validation'])} clips")
    print(f"pipeline('video-classification') on held-out {test_clip.name} (true: {test_clip.parent.name}):")
    for item in prediction:
        print(f"    {item['label']:<24} {item['score']:.3f}")
    print(f"Saved the trained model to {output / 'evl-full'}; total {results['total seconds']:.0f}s")
    return results


if __name__ == "__main__":
    main()
