"""
Video data sets for EVL training and evaluation with `datasets`: loading (videofolder, `<path> <label>` list files,
Hub data sets), the authors' training augmentation, multi-view evaluation inputs, a collator that skips clips that
cannot be decoded, and the frozen-backbone feature cache.
"""

import logging
from pathlib import Path

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value, load_dataset
from transformers import TrainerCallback

from ..video_processing_evl import EVLVideoDecodingError, EVLVideoProcessor, decode_video, sample_frame_indices


logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v")


def _video_path(example_video) -> str:
    """A video column entry as a path: a str, or `datasets.Video(decode=False)`'s {"path", "bytes"} dict."""
    if isinstance(example_video, dict):
        return example_video.get("path") or example_video.get("bytes")
    return example_video


def read_list_file(path: str | Path, class_names: list[str] | None = None) -> Dataset:
    """The authors' list format: one `<video path> <integer label>` per line (paths relative to the list file)."""
    path = Path(path)
    videos, labels = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            video, label = line.rsplit(maxsplit=1)
            label = int(label)
        except ValueError:
            raise ValueError(f"{path}:{number}: expected '<video path> <integer label>', got {line!r}") from None
        video_path = Path(video)
        videos.append(str(video_path if video_path.is_absolute() else path.parent / video_path))
        labels.append(label)
    names = class_names or [str(i) for i in range(max(labels) + 1)]
    features = Features({"video": Value("string"), "label": ClassLabel(names=names)})
    return Dataset.from_dict({"video": videos, "label": labels}, features=features)


def load_video_dataset(
    train_dir: str | None = None,
    validation_dir: str | None = None,
    test_dir: str | None = None,
    train_list: str | None = None,
    validation_list: str | None = None,
    test_list: str | None = None,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    video_column: str = "video",
    label_column: str = "label",
    class_names: list[str] | None = None,
    cache_dir: str | None = None,
) -> DatasetDict:
    """
    A `DatasetDict` with a `video` column of paths and a `label` ClassLabel column, from videofolder directories
    (`split/<label>/<clip>`), list files, or a `datasets` data set with a video and a label column. Videos are not
    decoded here (`datasets.Video(decode=False)`): the transforms decode them, with the processor's `decoding_backend`.
    """
    splits = {}
    if dataset_name:
        loaded = load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir)
        for split, dataset in loaded.items():
            if video_column != "video":
                dataset = dataset.rename_column(video_column, "video")
            if label_column != "label":
                dataset = dataset.rename_column(label_column, "label")
            splits[split] = dataset
    folders = {"train": train_dir, "validation": validation_dir, "test": test_dir}
    if any(folders.values()):
        data_files = {}
        for split, folder in folders.items():
            if folder:
                files = sorted(
                    str(p) for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS
                )
                if not files:
                    raise ValueError(f"{folder}: no video files ({', '.join(VIDEO_EXTENSIONS)}) in <label>/ folders.")
                data_files[split] = files
        splits.update(load_dataset("videofolder", data_files=data_files, cache_dir=cache_dir))
    for split, list_file in (("train", train_list), ("validation", validation_list), ("test", test_list)):
        if list_file:
            splits[split] = read_list_file(list_file, class_names)
    if not splits:
        raise ValueError("No data: give --train_dir/--validation_dir/--test_dir, list files, or --dataset_name.")
    result = DatasetDict()
    for split, dataset in splits.items():
        if "video" in dataset.features and dataset.features["video"].__class__.__name__ == "Video":
            from datasets import Video

            dataset = dataset.cast_column("video", Video(decode=False))
        result[split] = dataset
    names = {tuple(d.features["label"].names) for d in result.values() if isinstance(d.features["label"], ClassLabel)}
    if len(names) > 1:
        raise ValueError(f"The splits disagree on the class names: {sorted(names)}")
    return result


class VideoTrainTransform:
    """
    The authors' training augmentation: a random dense window, then RandAugment with the same ops and magnitudes for
    every frame of a clip, then one random resized crop box (scale 0.08-1, ratio 3/4-4/3) for all frames, then CLIP
    normalisation. (torchvision's RandAugment has no per-op magnitude noise, the authors' `mstd 0.5`.)

    The randomness of a clip is a function of (`seed`, `epoch`, clip index) only, not of a global generator's state,
    so a run resumed from a checkpoint sees exactly the augmentations of an uninterrupted one (`EpochCallback` keeps
    `epoch` in step with the Trainer).
    """

    def __init__(
        self, processor: EVLVideoProcessor, num_frames: int, sampling_rate: int, rand_augment: bool = True, seed: int = 0
    ):
        from torchvision.transforms import v2

        self.processor = processor
        self.num_frames = num_frames
        self.sampling_rate = sampling_rate
        self.seed = seed
        self.epoch = 0
        crop = processor.crop_size["height"], processor.crop_size["width"]
        steps = [v2.RandAugment(num_ops=4, magnitude=7)] if rand_augment else []
        steps.append(v2.RandomResizedCrop(crop, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), antialias=True))
        self.augment = v2.Compose(steps)
        self.mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(processor.image_std).view(1, 3, 1, 1)

    def __call__(self, video, index: int = 0) -> torch.Tensor:
        generator = np.random.default_rng([self.seed, self.epoch, index])
        frames, _ = decode_video(
            video,
            lambda metadata: sample_frame_indices(
                metadata.total_num_frames, self.num_frames, self.sampling_rate, random_temporal_offset=True,
                generator=generator,
            ),
            backend=self.processor.decoding_backend,
        )  # fmt: skip
        frames = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()  # (T, C, H, W) uint8
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(generator.integers(2**63 - 1)))
            frames = self.augment(frames)  # v2 transforms draw their parameters once per call: same for every frame
        return (frames.float() / 255 - self.mean) / self.std


class EpochCallback(TrainerCallback):
    """Tell a `VideoTrainTransform` which epoch the Trainer is in (also when resuming mid-epoch)."""

    def __init__(self, transform: VideoTrainTransform):
        self.transform = transform

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.transform.epoch = int(state.epoch or 0)


class VideoEvalTransform:
    """Deterministic evaluation input: the processor's dense window(s) and crop(s), `num_views = temporal x spatial`."""

    def __init__(self, processor: EVLVideoProcessor, num_frames: int, sampling_rate: int, temporal_views: int = 1, spatial_views: int = 1):  # fmt: skip
        self.processor = processor
        self.kwargs = dict(
            num_frames=num_frames, sampling_rate=sampling_rate, num_temporal_views=temporal_views,
            num_spatial_views=spatial_views, return_tensors="pt",
        )  # fmt: skip

    def __call__(self, video, index: int = 0) -> torch.Tensor:
        return self.processor(video, **self.kwargs)["pixel_values"][0]


def with_skipping(transform):
    """Wrap a per-clip transform for `Dataset.set_transform`: a clip that cannot be decoded becomes `None`."""

    def apply(batch: dict) -> dict:
        pixel_values = []
        indices = batch.get("clip_index", [0] * len(batch["video"]))
        for video, index in zip(batch["video"], indices):
            path = _video_path(video)
            try:
                pixel_values.append(transform(path, index))
            except (EVLVideoDecodingError, ValueError) as error:
                logger.warning("Skipping a clip that cannot be used: %s", error)
                pixel_values.append(None)
        return {"pixel_values": pixel_values, "labels": list(batch["label"])}

    return apply


class SkippingVideoCollator:
    """Stack clips into a batch, dropping those the transform marked unusable; the count rides along in the batch
    as `num_skipped_clips` for `EVLTrainer` to add up (it works with dataloader worker processes too)."""

    def __call__(self, examples: list[dict]) -> dict:
        usable = [e for e in examples if e.get("pixel_values") is not None or e.get("frame_features") is not None]
        batch = {"num_skipped_clips": torch.tensor(len(examples) - len(usable))}
        if not usable:
            return batch
        for key in ("pixel_values", "frame_features", "cross_frame_maps"):
            if usable[0].get(key) is not None:
                batch[key] = torch.stack([torch.as_tensor(e[key]) for e in usable])
        batch["labels"] = torch.tensor([int(e["labels"]) for e in usable])
        return batch


def build_feature_cache(
    model,
    dataset: Dataset,
    transform: VideoEvalTransform,
    cache_dir: str | Path,
    dtype: torch.dtype = torch.float16,
    batch_size: int = 8,
    progress: bool = True,
) -> tuple[Dataset, int]:
    """
    Run the frozen backbone once per clip and store what the decoder reads (`EVLModel.extract_backbone_features`:
    the last blocks' outputs and the cross-frame attention maps) in a `datasets` Arrow file under `cache_dir`,
    in `dtype` (float16 halves the disk cost; float32 makes cached logits equal uncached ones to float precision).
    Clips that cannot be decoded are skipped and counted. Returns the cached data set (torch format) and that count.
    Only for training without augmentation: the cache freezes one view of every clip.
    """
    from datasets import Array4D, Array5D
    from tqdm.auto import tqdm

    evl = model.evl if hasattr(model, "evl") else model
    config = evl.config
    num_tokens = config.patch_grid[0] * config.patch_grid[1] + 1
    arrow_dtype = {torch.float16: "float16", torch.float32: "float32", torch.bfloat16: "float32"}[dtype]
    num_frames = transform.kwargs["num_frames"]
    feature_spec = {
        "frame_features": Array4D(
            (config.decoder_num_layers, num_frames, num_tokens, config.vision_config.hidden_size), arrow_dtype
        ),
        "labels": Value("int64"),
    }
    if config.use_temporal_cross_attention:
        feature_spec["cross_frame_maps"] = Array5D(
            (config.decoder_num_layers, num_frames, 2, num_tokens - 1, num_tokens - 1), arrow_dtype
        )
    skipped = []

    def generate():
        evl.eval()
        pending = []

        def flush():
            with torch.no_grad():
                features = evl.extract_backbone_features(torch.stack([p for p, _ in pending]))
            for row, (_, label) in enumerate(pending):
                item = {"frame_features": features.frame_features[row].to(dtype).float().numpy(), "labels": label}
                if features.cross_frame_maps is not None:
                    item["cross_frame_maps"] = features.cross_frame_maps[row].to(dtype).float().numpy()
                yield item
            pending.clear()

        for example in tqdm(dataset, desc="Caching backbone features", unit="clip", disable=not progress):
            try:
                pixel_values = transform(_video_path(example["video"]))
            except (EVLVideoDecodingError, ValueError) as error:
                logger.warning("Skipping a clip that cannot be used: %s", error)
                skipped.append(str(error))
                continue
            if pixel_values.ndim != 4:
                raise ValueError("The feature cache stores one view per clip: use 1 temporal and 1 spatial view.")
            pending.append((pixel_values, int(example["label"])))
            if len(pending) == batch_size:
                yield from flush()
        if pending:
            yield from flush()

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    cached = Dataset.from_generator(generate, features=Features(feature_spec), cache_dir=str(cache_dir))
    return cached.with_format("torch"), len(skipped)


def feature_cache_bytes_per_clip(config, num_frames: int, dtype: torch.dtype = torch.float16) -> int:
    """Disk cost of one cached clip: K blocks x T frames x (N + 1) tokens x D, plus K x T x 2 x N x N maps."""
    num_tokens = config.patch_grid[0] * config.patch_grid[1] + 1
    elements = config.decoder_num_layers * num_frames * num_tokens * config.vision_config.hidden_size
    if config.use_temporal_cross_attention:
        elements += config.decoder_num_layers * num_frames * 2 * (num_tokens - 1) ** 2
    return elements * torch.finfo(dtype).bits // 8
