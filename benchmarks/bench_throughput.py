"""
Issue 11, target 4: clips/s over a directory of real-sized clips (340x256, 10 s at 25 fps, H.264), end to end, against
the model alone on the same clips already decoded and preprocessed (target >= 0.85x). ViT-B/16 shapes, 8 frames at
stride 16, batch `--batch_size`, float32 (or `--backbone_dtype bfloat16`):

* `pipeline("video-classification")(paths, batch_size=B, num_workers=W)`: the processor decodes in W DataLoader
  worker processes while the model runs (W = 0: in the main process, in turn with the model);
* the evaluation data path: `EvaluationClips` + `VideoClipCollator` in a DataLoader with W workers, as `Trainer`'s
  evaluation loop reads it (`--dataloader_num_workers W`).

All variants run alternately in one process after a warm-up; medians. With `--device cuda` the model runs on the GPU
(`pipeline(..., device=...)`; the model alone and the evaluation loader copy each batch from host memory to it, as a
run does), where decoding in workers is what keeps the GPU fed (`benchmarks/gpu.sh` runs it so).

    python benchmarks/bench_throughput.py [--clips 8] [--batch_size 2] [--workers 0 1 2] [--repeats 3]
                                          [--backbone_dtype bfloat16] [--device cuda]
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import alternate, evl_config, machine
from datasets import ClassLabel, Dataset, Features, Value
from transformers import pipeline

import evl_hf  # noqa: F401  (registers the pipeline)
from evl_hf import EVLForVideoClassification, EVLVideoProcessor
from evl_hf.data.synthetic import write_video
from evl_hf.data.video_dataset import EvaluationClips, VideoClipCollator, VideoEvalTransform


def write_clips(directory: Path, count: int) -> list[str]:
    """Moving noise textures, 340x256, 250 frames: real-sized H.264 files (a few MB of motion each)."""
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        texture = rng.integers(0, 255, (256 + 250, 340, 3), dtype=np.uint8)
        frames = np.stack([texture[t : t + 256] for t in range(250)])  # scrolls down one row a frame
        paths.append(str(write_video(directory / f"clip{index:02d}.mp4", frames, fps=25)))
    return paths


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backbone_dtype", choices=["bfloat16"])
    parser.add_argument("--device", default="cpu", help="where the model runs: cpu (default) or cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"machine: {machine()}" + (f"; model on {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""))
    workdir = Path(tempfile.mkdtemp())
    paths = write_clips(workdir / "clips", args.clips)
    processor = EVLVideoProcessor(num_frames=8, sampling_rate=16)
    torch.manual_seed(0)
    model = EVLForVideoClassification(evl_config(backbone_dtype=args.backbone_dtype)).eval()
    model.save_pretrained(workdir / "model")
    processor.save_pretrained(workdir / "model")
    classifier = pipeline("video-classification", model=str(workdir / "model"), device=device)
    model = classifier.model

    def synchronize():  # a GPU's work is asynchronous: each variant is timed to its last kernel's end
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    batches = [
        torch.cat([processor(path, return_tensors="pt")["pixel_values"] for path in paths[start : start + args.batch_size]])
        for start in range(0, len(paths), args.batch_size)
    ]  # fmt: skip
    dataset = Dataset.from_dict(
        {"video": paths, "label": [0] * len(paths)}, features=Features({"video": Value("string"), "label": ClassLabel(num_classes=400)})
    )  # fmt: skip
    evaluation = EvaluationClips(dataset, VideoEvalTransform(processor))

    def model_alone():
        with torch.inference_mode():
            for pixel_values in batches:
                model(pixel_values.to(device))
        synchronize()

    def through_pipeline(workers):
        return lambda: classifier(paths, batch_size=args.batch_size, num_workers=workers)

    def evaluation_path(workers):
        def run():
            loader = torch.utils.data.DataLoader(
                evaluation, batch_size=args.batch_size, num_workers=workers, collate_fn=VideoClipCollator()
            )
            with torch.inference_mode():
                for batch in loader:
                    model(batch["pixel_values"].to(device))
            synchronize()

        return run

    variants = {"model alone (decoded clips)": model_alone}
    for workers in args.workers:
        variants[f"pipeline, num_workers={workers}"] = through_pipeline(workers)
        variants[f"evaluation loader, workers={workers}"] = evaluation_path(workers)
    medians = alternate(variants, repeats=args.repeats)
    print(f"{args.clips} clips of 340x256, 10 s, 25 fps; 8 frames x stride 16; batch {args.batch_size}; "
          f"backbone {model.evl.vision_model.dtype}")  # fmt: skip
    base = args.clips / medians["model alone (decoded clips)"]
    for name, seconds in medians.items():
        rate = args.clips / seconds
        print(f"  {name:<36} {rate:6.2f} clips/s   {rate / base:5.3f} x the model alone (target >= 0.85)")


if __name__ == "__main__":
    main()
