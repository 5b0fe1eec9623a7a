"""
The offline EVL demo: a few minutes on 2 CPU cores, no network.

1. Generates the synthetic motion data set (classes only temporal order can tell apart; `evl_hf.data.synthetic`),
   the same bytes for the same seed.
2. Pretrains a small vision tower (CLIP; `--backbone_family siglip` or `dinov2` for those architectures) for about a
   minute on single frames to read the object's position, size, angle and opacity (`pretrain_backbone`; EVL's premise
   is a frozen *pretrained* image encoder, and a random one's features tell the classes' attributes apart poorly),
   and saves it: it is loaded with `from_backbone_pretrained`, the path a user takes with
   `openai/clip-vit-base-patch16`. `--backbone_pretraining_steps 0` keeps the tower random.
3. Trains and evaluates full EVL and EVL with its three temporal modules switched off (the paper's temporal
   ablation) with `evl_hf.run_video_classification`, the code behind `examples/run_video_classification.py`, from a
   frozen-backbone feature cache (the backbone runs once per training clip). Each model is evaluated on the
   validation clips with their frames in order, reversed and shuffled (`--temporal_reliance`).
4. Classifies a held-out clip with `pipeline("video-classification")` from the saved full model.

    python -m evl_hf.demo --output_dir demo_output
"""

import argparse
import csv
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from transformers import (
    CLIPVisionConfig,
    Dinov2Config,
    PreTrainedModel,
    SiglipVisionConfig,
    get_cosine_schedule_with_warmup,
    pipeline,
    set_seed,
)

from .backbone_families import backbone_family
from .data.synthetic import FRAME_ATTRIBUTES, MOTION_CLASSES, generate_motion_dataset, render_frames
from .run_video_classification import main as run_video_classification


NUM_FRAMES, SAMPLING_RATE, IMAGE_SIZE = 8, 2, 48  # the data's own frame size: no resize
BACKBONE_SHAPE = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, patch_size=8, image_size=IMAGE_SIZE)
# The pretraining frames' generator key, after the seed: the data set's clips use (split 0-2, class, index) and the
# timeline's sequences split 3, so no clip shares it.
_PRETRAINING_FRAMES_KEY = 10
PRETRAINING_BATCH_SIZE, PRETRAINING_LEARNING_RATE = 64, 3e-3
# Raised whenever the pretraining's code changes what it makes, so that a tower saved by an earlier version is not
# reused (`prepare_backbone`).
_PRETRAINING_VERSION = 1
DECODER = "decoder_num_layers=2,decoder_qkv_dim=64,decoder_num_heads=4,decoder_mlp_dropout=0.0,classifier_dropout=0.0"
VARIANTS = {
    "full EVL": ("evl-full", ""),
    "temporal modules off": (
        "evl-no-temporal", ",use_temporal_conv=false,use_temporal_pos_embed=false,use_temporal_cross_attention=false"
    ),
}


# Random towers of one shape, each family's own architecture and initialisation.
DEMO_BACKBONES = {
    "clip": lambda **shape: CLIPVisionConfig(intermediate_size=256, hidden_act="quick_gelu", **shape),
    "siglip": lambda **shape: SiglipVisionConfig(intermediate_size=256, **shape),
    "dinov2": lambda **shape: Dinov2Config(mlp_ratio=4, **shape),
}


def pretrain_backbone(
    tower: PreTrainedModel,
    steps: int,
    image_size: int,
    seed: int,
    batch_size: int = PRETRAINING_BATCH_SIZE,
    learning_rate: float = PRETRAINING_LEARNING_RATE,
) -> list[float]:
    """
    Pretrain the demo's small image backbone on single frames, as CLIP is pretrained on images before EVL reads its
    frozen features: a linear head on the mean of the last block's tokens regresses each frame's object attributes
    (position, size, angle, opacity; `render_frames`). The frames carry no class and come from no class's clip, so
    the backbone learns what a frame shows, never which way it changes. Returns the losses; the tower is left in
    eval mode.
    A random tower's features mix a patch's pixels into a few dimensions at random; pretrained, they say where the
    object is and how it looks, which is what EVL's temporal modules compare between frames.
    """
    family = backbone_family(tower.config)
    mean = torch.tensor(family.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(family.image_std).view(1, 3, 1, 1)
    rng = np.random.default_rng([seed, _PRETRAINING_FRAMES_KEY])
    torch.manual_seed(seed)
    head = torch.nn.Linear(tower.config.hidden_size, len(FRAME_ATTRIBUTES))
    parameters = [*tower.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.01)
    warmup_steps = max(1, steps // 10)  # never the whole tower at the full rate from the first step
    schedule = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=warmup_steps, num_training_steps=steps)
    tower.train()
    losses = []
    for _ in range(steps):
        frames, attributes = render_frames(batch_size, image_size, rng)
        pixels = (torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255 - mean) / std
        # The last block's output, the features EVL reads (before any final norm of the tower).
        tokens = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
        # Centred on the attributes' mean, so an output of 0 predicts it (a loss of 1/12).
        loss = torch.nn.functional.mse_loss(head(tokens.mean(dim=1)), torch.from_numpy(attributes) - 0.5)
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    tower.eval()
    return losses


def prepare_backbone(output: Path, family_name: str, pretraining_steps: int, seed: int) -> tuple[Path, dict | None]:
    """
    Build the demo's small tower, pretrain it (`pretrain_backbone`) unless `pretraining_steps` is 0, and save it under
    `output`; return its directory and the pretraining's summary (losses at the start and the end, seconds). A tower
    pretrained before with the same settings (and the same version of this pretraining, on the same number of
    threads: it is deterministic only for those), whose weights were saved whole, is reused instead of trained again;
    its summary then says `"reused": true`.
    """
    pretrained = pretraining_steps > 0
    backbone_dir = output / f"{family_name}-vit-tiny-{'frames' if pretrained else 'random'}"
    vision_config = DEMO_BACKBONES[family_name](**BACKBONE_SHAPE)
    settings = {
        "version": _PRETRAINING_VERSION, "vision_config": vision_config.to_diff_dict(), "steps": pretraining_steps,
        "batch_size": PRETRAINING_BATCH_SIZE, "learning_rate": PRETRAINING_LEARNING_RATE, "seed": seed,
        "threads": torch.get_num_threads(),
    }  # fmt: skip
    record = backbone_dir / "demo_pretraining.json"
    try:
        earlier = json.loads(record.read_text()) if pretrained else None
    except (OSError, ValueError):  # none yet, or unreadable: pretrained anew
        earlier = None
    summary_keys = {"steps", "first_loss", "last_loss", "seconds"}
    if (
        isinstance(earlier, dict)
        and earlier.get("settings") == json.loads(json.dumps(settings))  # as a JSON round trip gives it back
        and isinstance(earlier.get("summary"), dict)
        and summary_keys <= set(earlier["summary"])
        and (backbone_dir / "model.safetensors").is_file()
    ):
        print(f"Reusing the {family_name} tower pretrained with the same settings in {backbone_dir}", flush=True)
        return backbone_dir, {**earlier["summary"], "reused": True}
    set_seed(seed)
    tower = backbone_family(vision_config).build(vision_config)
    summary = None
    if pretrained:
        print(f"Pretraining the small {family_name} tower on single frames ...", flush=True)
        started = time.perf_counter()
        losses = pretrain_backbone(tower, pretraining_steps, IMAGE_SIZE, seed)
        window = max(1, len(losses) // 20)
        first, last = (float(np.mean(part)) for part in (losses[:window], losses[-window:]))
        seconds = time.perf_counter() - started
        summary = {"steps": len(losses), "first_loss": first, "last_loss": last, "seconds": seconds}
        print(f"  mean squared error of the frame attributes {first:.4f} -> {last:.4f} (predicting the mean: 0.083)")
    record.unlink(missing_ok=True)  # written again only once the new tower is saved whole
    tower.save_pretrained(backbone_dir)
    if pretrained:
        record.write_text(json.dumps({"settings": settings, "summary": summary}))
    return backbone_dir, summary


def pair_metrics(confusion: np.ndarray) -> dict:
    """
    From a confusion matrix (rows: true class) in `MOTION_CLASSES` order, where classes 2k and 2k+1 are a
    time-reversed pair: top-1, accuracy at telling the pair, and direction accuracy among clips whose pair was right.
    """
    total = confusion.sum()
    pairs = np.arange(len(confusion)) // 2
    right_pair = confusion[pairs[:, None] == pairs[None, :]].sum()
    right = np.trace(confusion)
    return {
        "top1": float(right / total),
        "pair": float(right_pair / total),
        "direction_given_pair": float(right / right_pair) if right_pair else 0.0,
    }


def time_reversed_partner(name: str) -> str:
    """The class whose clips are this class's clips played backwards (classes 2k and 2k+1 of `MOTION_CLASSES`)."""
    return MOTION_CLASSES[MOTION_CLASSES.index(name) ^ 1]


def reversal_swap_rates(path: Path) -> tuple[float, dict[str, float]]:
    """
    From `eval_predictions.csv` (written with `--temporal_reliance`): the fraction of clips whose prediction on the
    reversed clip is the time-reversed partner of the prediction on the clip in order, over all clips and per pair
    of true classes (keyed "class/partner"). A model that reads the direction of time swaps every pair (1.0); one
    that sees the frames as a set never changes its prediction (0.0).
    """
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    swapped = [row["predicted_reversed"] == time_reversed_partner(row["predicted"]) for row in rows]
    by_pair = {}
    for first in MOTION_CLASSES[::2]:
        pair = (first, time_reversed_partner(first))
        in_pair = [swap for swap, row in zip(swapped, rows) if row["label"] in pair]
        if in_pair:
            by_pair["/".join(pair)] = sum(in_pair) / len(in_pair)
    return sum(swapped) / len(rows), by_pair


def read_confusion_matrix(path: Path) -> np.ndarray:
    """`eval_confusion_matrix.csv` as written by the training script, reordered to `MOTION_CLASSES`."""
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    names = rows[0][1:]
    matrix = np.array([[int(v) for v in row[1:]] for row in rows[1:]])
    order = [names.index(name) for name in MOTION_CLASSES]
    return matrix[np.ix_(order, order)]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="demo_output")
    parser.add_argument("--train_per_class", type=int, default=100)
    parser.add_argument("--validation_per_class", type=int, default=20)
    parser.add_argument("--epochs", type=float, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--backbone_family", choices=sorted(DEMO_BACKBONES), default="clip",
        help="The family of the small backbone (the same shape for each): EVL's decoder is the same for all.",
    )  # fmt: skip
    parser.add_argument(
        "--backbone_pretraining_steps", type=int, default=800,
        help=f"Steps of {PRETRAINING_BATCH_SIZE} single frames that pretrain the backbone before EVL freezes it (0: a "
        "random backbone).",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.backbone_pretraining_steps < 0:
        steps = args.backbone_pretraining_steps
        parser.error(f"--backbone_pretraining_steps must be 0 (a random backbone) or more, got {steps}")
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    output = Path(args.output_dir)
    started = time.perf_counter()

    data_dir = output / "motion_data"
    generation = {"train_per_class": args.train_per_class, "validation_per_class": args.validation_per_class, "test_per_class": 5,
                  "num_frames": 16, "size": IMAGE_SIZE, "seed": args.seed}  # fmt: skip
    recorded = data_dir / "generation.json"
    if not recorded.exists() or json.loads(recorded.read_text()) != generation:
        # A data set made with other settings (or a run cut short) is made anew, never silently reused.
        shutil.rmtree(data_dir, ignore_errors=True)
        print(f"Generating the synthetic motion data set in {data_dir} ...", flush=True)
        generate_motion_dataset(data_dir, **generation)
        recorded.write_text(json.dumps(generation))

    results = {}
    steps, family_name = args.backbone_pretraining_steps, args.backbone_family
    backbone_dir, pretraining = prepare_backbone(output, family_name, steps, args.seed)
    if pretraining is not None:
        results["backbone pretraining"] = pretraining

    for name, (folder, switches) in VARIANTS.items():
        print(f"\n=== Training {name} with examples/run_video_classification.py's code ===", flush=True)
        run_dir = output / folder
        train_started = time.perf_counter()
        run_video_classification([
            "--backbone", str(backbone_dir), "--train_dir", str(data_dir / "train"),
            "--validation_dir", str(data_dir / "validation"), "--output_dir", str(run_dir),
            "--do_train", "--do_eval", "--num_frames", str(NUM_FRAMES), "--sampling_rate", str(SAMPLING_RATE),
            "--config_overrides", DECODER + switches, "--cache_backbone_features",
            "--feature_cache_dir", str(output / "feature_cache"),
            "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "32", "--learning_rate", "2e-3",
            "--weight_decay", "0.05", "--lr_scheduler_type", "cosine", "--warmup_steps", "0.1",
            "--num_train_epochs", str(args.epochs), "--logging_strategy", "epoch", "--save_strategy", "no",
            "--report_to", "none", "--seed", str(args.seed), "--dataloader_num_workers", "0",
            # Pinned memory serves an accelerator only (torch warns at every step without one).
            "--dataloader_pin_memory", str(torch.accelerator.is_available()).lower(),
            "--log_level", "warning", "--temporal_reliance",
        ])  # fmt: skip
        seconds = time.perf_counter() - train_started
        evaluation = json.loads((run_dir / "all_results.json").read_text())
        metrics = pair_metrics(read_confusion_matrix(run_dir / "eval_confusion_matrix.csv"))
        metrics["top5"] = evaluation["eval_top5_accuracy"]
        metrics["reversed_top1"] = evaluation["eval_reversed_top1_accuracy"]
        metrics["shuffled_top1"] = evaluation["eval_shuffled_top1_accuracy"]
        metrics["reversal_swaps_pair"], metrics["reversal_swaps_by_pair"] = reversal_swap_rates(
            run_dir / "eval_predictions.csv"
        )
        metrics["train_seconds"] = evaluation["train_runtime"]
        metrics["run_seconds"] = seconds
        results[name] = metrics

    classifier = pipeline("video-classification", model=str(output / "evl-full"))
    test_clip = sorted((data_dir / "test").rglob("*.mp4"))[0]
    prediction = classifier(str(test_clip), top_k=3)
    results["pipeline"] = {"clip": str(test_clip), "true": test_clip.parent.name, "top3": prediction}
    results["total seconds"] = time.perf_counter() - started
    (output / "demo_results.json").write_text(json.dumps(results, indent=2))

    num_validation = sum(1 for _ in (data_dir / "validation").rglob("*.mp4"))
    print()
    print(f"Validation ({num_validation} clips, {len(MOTION_CLASSES)} classes in 5 time-reversed pairs; chance 0.10):")
    print(f"{'variant':<22} {'top-1':>6} {'top-5':>6} {'pair':>6} {'direction|pair':>15} {'train time':>11}")
    for name in VARIANTS:
        m = results[name]
        print(f"{name:<22} {m['top1']:>6.3f} {m['top5']:>6.3f} {m['pair']:>6.3f} {m['direction_given_pair']:>15.3f} {m['train_seconds']:>10.1f}s")
    print("(direction|pair: right direction among clips whose time-reversed pair was right; chance 0.5)")
    print("\nHow much does each model use time? The same clips with their frames in order, reversed, shuffled:")
    print(f"{'variant':<22} {'in order':>8} {'reversed':>8} {'shuffled':>8} {'reversal swaps the pair':>24}")
    for name in VARIANTS:
        m = results[name]
        print(f"{name:<22} {m['top1']:>8.3f} {m['reversed_top1']:>8.3f} {m['shuffled_top1']:>8.3f} {m['reversal_swaps_pair']:>24.3f}")
    print("(top-1 accuracy; a model that ignores frame order scores the same on all three. Reversal swaps the pair: the")
    print(" prediction on the reversed clip is the time-reversed partner of the prediction on the clip in order)")
    print("\nReversal swaps the pair, by pair of true classes (full EVL should swap each; without its temporal modules,")
    print("none):")
    print(f"{'pair':<42}" + "".join(f"{name:>22}" for name in VARIANTS))
    for pair in results["full EVL"]["reversal_swaps_by_pair"]:
        rates = (results[name]["reversal_swaps_by_pair"][pair] for name in VARIANTS)
        print(f"{pair:<42}" + "".join(f"{rate:>22.3f}" for rate in rates))
    print()
    print(f"pipeline('video-classification') on held-out {test_clip.name} (true: {test_clip.parent.name}):")
    for item in prediction:
        print(f"    {item['label']:<24} {item['score']:.3f}")
    print(f"Saved the trained model to {output / 'evl-full'}; total {results['total seconds']:.0f}s")
    return results


if __name__ == "__main__":
    main()
