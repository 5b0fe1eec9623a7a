"""
Video data sets for EVL training and evaluation with `datasets`: loading (videofolder, `<path> <label>` list files,
Hub data sets), the authors' training augmentation, multi-view evaluation inputs, the bad-clip policy, and the
frozen-backbone feature cache.

The bad-clip policy keeps every process of a data-parallel run in step: every rank always gets full batches of the
same shapes, so it runs the same collectives.
- Training: a clip that cannot be decoded is replaced by another clip of the data set, drawn from (seed, epoch, clip
  index) alone, so every process and every resumed run makes the same replacement (`TrainingClips`).
- Evaluation: the clip keeps its slot, with zero pixels and the label -100, and is left out of the loss and the
  metrics (`EvaluationClips`, `EVLTrainer`).
- Only decoding failures of a file (`EVLVideoDecodingError`; a row without a video is one) are handled this way;
  any other error stops the run.
Both report the indices of the unusable clips in the batch (`unusable_clip_indices`), and `EVLTrainer` counts
distinct clips across processes.
"""

import contextlib
import hashlib
import json
import logging
import math
import os
import signal
import threading
import time
import unicodedata
import uuid
from collections.abc import Collection
from pathlib import Path

import numpy as np
import torch
from transformers.image_utils import SizeDict


try:
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value, Video, load_dataset
except ImportError as error:  # an optional extra: say how to get it
    raise ImportError('Training and evaluating EVL needs datasets: pip install "evl-hf[train]"') from error

from ..video_decoding_evl import VIDEO_SUFFIXES
from ..video_processing_evl import EVLVideoDecodingError, EVLVideoProcessor, decode_video, sample_frame_indices


logger = logging.getLogger(__name__)

# The label of an evaluation slot whose clip could not be decoded: ignored by the loss and the metrics.
IGNORE_LABEL = -100
# The label of a clip that has none (`datasets`' convention for test splits): predicted, never scored.
UNLABELED = -1
# The column `shuffled_subset` adds: each clip's row in the whole data set, which names it in reports.
ROW_COLUMN = "__row__"
# How long the main process waits for another process's feature cache shard to show up before it calls the build
# failed: on a file system shared by several machines, a file written on one may be listed late on another.
SHARD_VISIBILITY_TIMEOUT = 60


def _video_path(example_video) -> str | bytes | None:
    """
    A video column entry as something `decode_video` reads: a path, or the bytes of `datasets.Video(decode=False)`'s
    {"path", "bytes"} dict. Bytes come first: a data set stored as Parquet keeps the clip in `bytes` and only the
    original file name in `path`. `None` for an entry without either (null).
    """
    if isinstance(example_video, dict):
        return example_video["bytes"] if example_video.get("bytes") is not None else example_video.get("path")
    return example_video


def _video_to_decode(example_video) -> str | bytes:
    """`_video_path`, for decoding: a row without a video (null, or an empty path) is an unusable clip, handled as a
    file that cannot be decoded is, not a crash of the processor (or the directory "" names)."""
    video = _video_path(example_video)
    if video is None or video == "":
        raise EVLVideoDecodingError("no video (the row's entry is empty).")
    return video


def clip_names(dataset: Dataset) -> list[str]:
    """
    A name for every clip of a data set's `video` column, for reports: its path (for clips stored as bytes, the
    original file name the data set keeps), else `#` and its row in the data set (in the whole data set for a
    `shuffled_subset`). Read from Arrow batches, so clips stored in the data set are never copied out.
    """
    names = []
    for batch in dataset.select_columns(["video"]).with_format("arrow").iter(batch_size=1000):
        column = batch.column("video").combine_chunks()
        paths = column.field("path") if hasattr(column, "field") else column
        names.extend(paths.to_pylist())
    rows = dataset[ROW_COLUMN] if ROW_COLUMN in dataset.column_names else range(len(names))
    return [str(name) if name is not None else f"#{row}" for row, name in zip(rows, names)]


def shuffled_subset(dataset: Dataset, size: int | None, seed: int) -> Dataset:
    """
    `size` clips of `dataset`, shuffled first as transformers' examples do (folders list clips class by class), each
    with its row in `dataset` (`ROW_COLUMN`): a clip without a file name is reported by that row, not by its place in
    the selection. The whole data set where `size` is `None` or not smaller. A data set with a column of that name
    of its own is refused: it would be read as rows.
    """
    if ROW_COLUMN in dataset.column_names:
        raise ValueError(
            f"The data set has a column named {ROW_COLUMN!r}, the name the script gives each clip's row (to name clips "
            "without a file in reports): rename or remove that column."
        )
    if size is None or size >= len(dataset):
        return dataset
    with_rows = dataset.add_column(ROW_COLUMN, np.arange(len(dataset)))
    return with_rows.shuffle(seed=seed).select(range(size))


def _row(example: dict, index: int) -> int:
    """The clip's row in the data set, for messages: `index` unless it is a `shuffled_subset`'s clip."""
    return int(example.get(ROW_COLUMN, index))


def read_list_file(path: str | Path, class_names: list[str] | None = None, allow_unlabeled: bool = False) -> Dataset:
    """
    The authors' list format: one `<video path> <integer label>` per line (paths relative to the list file). With
    `allow_unlabeled` (a test split), a list of clips without labels: every line a path alone (the whole line, so
    it may contain spaces) or a path with the label -1; their label is `UNLABELED`.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: the list file does not exist." if not path.exists() else f"{path}: is not a file.")
    videos, labels, numbers = [], [], []
    expected = "'<video path> <integer label>'" + (" or '<video path>'" if allow_unlabeled else "")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: the list file is not UTF-8 text ({error.reason}).") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.strip().rsplit(maxsplit=1)  # an indented or aligned line's spaces are no part of its path
        try:
            video, label = fields[0], int(fields[1])
        except (IndexError, ValueError):
            # A path alone, unless the line is an existing clip and a word after it (a label that is not a number).
            if not allow_unlabeled or (
                len(fields) == 2 and _is_file(path, fields[0]) and not _is_file(path, line.strip())
            ):
                raise ValueError(f"{path}:{number}: expected {expected}, got {line!r}") from None
            video, label = line.strip(), UNLABELED
        if (label < 0 and label != UNLABELED) or (label == UNLABELED and not allow_unlabeled):
            raise ValueError(f"{path}:{number}: expected {expected} with a label of 0 or more, got {line!r}")
        video_path = Path(video)
        videos.append(str(video_path if video_path.is_absolute() else path.parent / video_path))
        labels.append(label)
        numbers.append(number)
    if not videos:
        raise ValueError(f"{path}: the list file has no clips.")
    unlabeled = [number for number, label in zip(numbers, labels) if label == UNLABELED]
    if unlabeled and len(unlabeled) < len(labels):
        labeled = next(number for number, label in zip(numbers, labels) if label != UNLABELED)
        raise ValueError(
            f"{path}: {len(unlabeled)} of its {len(labels)} clips have no label (e.g. line {unlabeled[0]}) and the "
            f"others do (e.g. line {labeled}): label every clip, or none to predict them."
        )
    if class_names is not None:
        beyond = next(((n, label) for n, label in zip(numbers, labels) if label >= len(class_names)), None)
        if beyond is not None:
            raise ValueError(
                f"{path}:{beyond[0]}: label {beyond[1]}, but the class names give {len(class_names)} classes "
                f"(0 to {len(class_names) - 1}; labels count from 0)."
            )
    names = class_names or [str(i) for i in range(max(labels) + 1)]
    features = Features({"video": Value("string"), "label": ClassLabel(names=names)})
    return Dataset.from_dict({"video": videos, "label": labels}, features=features)


def _is_file(list_file: Path, video: str) -> bool:
    video_path = Path(video)
    return (video_path if video_path.is_absolute() else list_file.parent / video_path).is_file()


def _folder_videos(folder: Path) -> list[str]:
    """The video files under `folder`, sorted. Symbolic links are followed (a label folder may be one), except a link
    back to a folder the walk is inside. Hidden files and folders (".*": `.ipynb_checkpoints`, macOS's `._clip.mp4`)
    and special folders ("__*") are left out, as `datasets` leaves them out; so are links to nothing."""
    files = []
    inside = {str(folder): {os.path.realpath(folder)}}  # each folder walked: the real folders it lies in
    for root, directories, names in os.walk(folder, followlinks=True):
        entered = []
        for name in directories:
            target = os.path.realpath(os.path.join(root, name))
            if not name.startswith((".", "__")) and target not in inside[root]:  # not a loop
                entered.append(name)
                inside[os.path.join(root, name)] = inside[root] | {target}
        directories[:] = entered
        files.extend(
            path
            for path in (os.path.join(root, name) for name in names if not name.startswith("."))
            if Path(path).suffix.lower() in VIDEO_SUFFIXES and os.path.isfile(path)
        )
    return sorted(files)


def _videofolder_files(folder: str | Path, allow_unlabeled: bool = False) -> tuple[list[str], bool]:
    """
    The clips of a `split/<label>/<clip>` folder and `True`, or a `ValueError` that says what is wrong with the
    path. With `allow_unlabeled` (a test split), a folder whose clips all lie directly in it gives them and `False`:
    clips without labels.
    """
    folder = Path(folder)
    if not folder.exists():
        raise ValueError(f"{folder}: the directory does not exist.")
    if not folder.is_dir():
        raise ValueError(f"{folder}: is not a directory (expected a folder with one sub-folder per label).")
    folder = folder.absolute()  # clips are read by path from wherever the data set is used
    files = _folder_videos(folder)
    if not files:
        raise ValueError(f"{folder}: no video files ({', '.join(VIDEO_SUFFIXES)}) in <label>/ sub-folders.")
    loose = [f for f in files if Path(f).parent == folder]
    if allow_unlabeled and len(loose) == len(files):
        return files, False
    if loose:
        unlabeled = " A test folder of clips without labels has them all directly in it." if allow_unlabeled else ""
        raise ValueError(
            f"{folder}: {len(loose)} video file(s) lie directly in the folder (e.g. {Path(loose[0]).name}); the "
            f"videofolder layout needs one sub-folder per label: <split>/<label>/<clip>.{unlabeled}"
        )
    # A clip is labeled by the folder it lies in: one further down would be labeled by its sub-folder.
    nested = [f for f in files if Path(f).parent.parent != folder]
    if nested:
        raise ValueError(
            f"{folder}: {len(nested)} video file(s) lie below a label's sub-folder (e.g. "
            f"{Path(nested[0]).relative_to(folder)}); the videofolder layout is <split>/<label>/<clip>, a clip's "
            "label the sub-folder it lies in directly."
        )
    return files, True


def is_unlabeled(dataset: Dataset) -> bool:
    """Whether a split of `load_video_dataset` is clips without labels (every label `UNLABELED`)."""
    return len(dataset) > 0 and dataset.unique("label") == [UNLABELED]


def _without_labels(dataset: Dataset) -> Dataset:
    """The split with an int64 `label` column of `UNLABELED` (cast to the data set's ClassLabel afterwards)."""
    if "label" in dataset.column_names:
        dataset = dataset.remove_columns("label")
    return dataset.add_column("label", [UNLABELED] * len(dataset), feature=Value("int64"))


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
    used_splits: Collection[str] | None = None,
) -> DatasetDict:
    """
    A `DatasetDict` with a `video` column of paths and a `label` ClassLabel column, from videofolder directories
    (`split/<label>/<clip>`), list files, or a `datasets` data set with a video and a label column. Videos are not
    decoded here (`datasets.Video(decode=False)`): the transforms decode them, with the processor's `decoding_backend`.

    The test split may be clips without labels, to predict: a folder whose clips all lie directly in it, a list file
    of paths alone (or with the label -1), or a data set's split without a label column or with every label -1 or
    missing (None or an empty string). Its labels are then all `UNLABELED`, under the other splits' ClassLabel
    (`class_names` without one). Any other split, or a test split with some clips labeled and others not, is refused
    with the count.
    `used_splits`: the splits the caller will use (all by default). Every split given is loaded and its class names
    count, but a split the caller will not use whose labels break these rules is left out (logged) instead of
    stopping the run, e.g. a partly labeled test split in a training run.
    """
    splits, left_out = {}, {}

    def unless_unused(split: str, check):
        """`check()`, or, for a split the caller will not use, None with the reason kept (a broken split it does not
        use does not stop it)."""
        try:
            return check()
        except ValueError as error:
            if used_splits is None or split in used_splits:
                raise
            logger.info("The %s split is not used, and left out: %s", split, error)
            left_out[split] = str(error)
            return None

    from_data_set, columns = set(), {}
    if dataset_name:
        loaded = _load_dataset(dataset_name, dataset_config_name, cache_dir)
        columns = {split: data.column_names for split, data in loaded.items()}
        if label_column != "label" and not any(label_column in names for names in columns.values()):
            raise ValueError(f"--label_column {label_column!r} is in no split of {dataset_name}: {columns}.")
        for split, dataset in loaded.items():
            if video_column != "video":
                # Another column named "video" (often a clip's id) is not the videos the run was told to read.
                dataset = dataset.remove_columns([name for name in ("video",) if name in dataset.column_names])
                dataset = dataset.rename_column(video_column, "video")
            if Path(dataset_name).is_dir() and not _saved_to_disk(Path(dataset_name)):
                # Relative paths in a folder's data files are read from it, as a list file's and datasets'
                # videofolder metadata's: not from wherever the run is started.
                dataset = _paths_read_from(dataset, dataset_name)
            if label_column != "label":
                # Another column named "label" is not the labels the run was told to use. A split without
                # `label_column` is left without labels: a test split is predicted, another split refused below.
                dataset = dataset.remove_columns([name for name in ("label",) if name in dataset.column_names])
                if label_column in dataset.column_names:
                    dataset = dataset.rename_column(label_column, "label")
            splits[split] = dataset
            from_data_set.add(split)
    folders = {"train": train_dir, "validation": validation_dir, "test": test_dir}
    lists = {"train": train_list, "validation": validation_list, "test": test_list}
    data_files = {}
    for split, folder in folders.items():
        if folder:
            found = unless_unused(split, lambda: _videofolder_files(folder, allow_unlabeled=split == "test"))
            if found is not None and found[1]:
                data_files[split] = found[0]
            elif found is not None:
                splits[split] = Dataset.from_dict({"video": found[0]})
    if data_files:
        # Each clip labeled by the folder it lies in, over the classes of every folder given, as `datasets`'
        # videofolder labels them; built here because that loader drops, without a word, the files of extensions it
        # does not list (.webm, .m4v) and paths with glob characters ("clip[1].mp4").
        # One class per name whatever its Unicode form (macOS copies folder names decomposed).
        labels = {
            split: [unicodedata.normalize("NFC", Path(file).parent.name) for file in files]
            for split, files in data_files.items()
        }
        names = sorted(set().union(*labels.values()))
        # The loader's representation too: `Video` rows of {"path", "bytes"}, not decoded here.
        features = Features({"video": Video(decode=False), "label": ClassLabel(names=names)})
        for split, files in data_files.items():
            splits[split] = Dataset.from_dict({"video": files, "label": labels[split]}, features=features)
    list_splits = {}
    for split, list_file in lists.items():
        if list_file:
            read = unless_unused(split, lambda: read_list_file(list_file, class_names, allow_unlabeled=split == "test"))
            if read is not None:
                list_splits[split] = read
    if class_names is None:
        # Without class names each list file numbers its classes up to its own largest label: a split without the
        # last classes (a small validation list) takes the widest numbering, the same classes.
        numbered = [data.features["label"].names for data in list_splits.values() if not is_unlabeled(data)]
        widest = max(numbered, key=len, default=None)
        for split, data in list_splits.items():
            if widest and not is_unlabeled(data) and data.features["label"].names != widest:
                list_splits[split] = data.cast_column("label", ClassLabel(names=widest))
    splits.update(list_splits)
    from_data_set -= {split for split in folders if folders[split] or lists[split]}  # replaced by a folder or list
    if not splits and not left_out:
        raise ValueError("No data: give --train_dir/--validation_dir/--test_dir, list files, or --dataset_name.")
    result, unlabeled = DatasetDict(), []
    for split, dataset in splits.items():
        checked = unless_unused(split, lambda: _checked_labels(split, dataset))
        if checked is None:
            continue
        dataset, without_labels = checked
        if without_labels:
            dataset = _without_labels(dataset)
            unlabeled.append(split)
            if split in from_data_set and (used_splits is None or split in used_splits):
                # `datasets` fills a column that only other splits have with nulls: say what happened, in case the
                # labels are under another name.
                why = (f"has no {label_column!r} column" if label_column not in columns[split]
                       else f"has no labels (every {label_column!r} is missing or -1)")  # fmt: skip
                logger.warning(f"The {split} split of {dataset_name} {why} (columns {columns[split]}): its clips are "
                               "predicted without labels (see --label_column).")  # fmt: skip
        result[split] = dataset
    if not result:
        reasons = "; ".join(f"{split}: {reason}" for split, reason in left_out.items())
        raise ValueError(f"No usable split: every split given is broken and not used by this run ({reasons}).")
    labeled = [split for split in result if split not in unlabeled]
    plain = [split for split in labeled if not isinstance(result[split].features["label"], ClassLabel)]
    if plain and all(result[split].features["label"].dtype.startswith(("int", "uint")) for split in plain):
        # Integer labels are class ids, as in list files: named by the class names given, else by their numbers.
        smallest = min(min(result[split].unique("label")) for split in plain)
        largest = max(max(result[split].unique("label")) for split in plain)
        if smallest < 0:  # -1 marks a clip without a label, refused above outside a whole test split
            raise ValueError(f"{dataset_name}: label {smallest}: labels are class ids, 0 or more.")
        if class_names is not None and largest >= len(class_names):
            raise ValueError(
                f"{dataset_name}: label {largest}, but the class names give {len(class_names)} classes (0 to "
                f"{len(class_names) - 1}; labels count from 0)."
            )
        ids = ClassLabel(names=list(class_names) if class_names is not None else [str(i) for i in range(largest + 1)])
        for split in plain:
            result[split] = result[split].cast_column("label", ids)
    elif plain:
        # Labels given as strings: a ClassLabel of the class names given, else of their sorted values.
        found = {str(v) for split in plain for v in result[split].unique("label")}
        names = list(class_names) if class_names is not None else sorted(found)
        if not found <= set(names):
            raise ValueError(f"{dataset_name}: labels not among the class names given: {sorted(found - set(names))}.")
        for split in plain:
            labels = result[split].cast_column("label", Value("string"))
            result[split] = labels.cast_column("label", ClassLabel(names=names))
    names = {tuple(result[split].features["label"].names) for split in labeled}
    if names and class_names is not None:
        # Label folders and a ClassLabel column name their classes themselves: names given (numbers and strings take
        # them as they are) number those classes, matched by name in any Unicode form (a file written on macOS).
        # Every split is numbered so before the splits are compared: folders beside string labels number their
        # classes in sorted order, the strings in the order given.
        own = {}
        for split in labeled:
            for name in result[split].features["label"].names:
                own.setdefault(unicodedata.normalize("NFC", name), name)
        given = [own.get(unicodedata.normalize("NFC", name), name) for name in class_names]
        missing = [name for name in own.values() if name not in given]
        if missing:
            lacking = [split for split in labeled if set(missing) & set(result[split].features["label"].names)]
            source = (f"the names of {dataset_name}'s ClassLabel" if any(split in from_data_set for split in lacking)
                      else "the label folders' names")  # fmt: skip
            raise ValueError(
                f"The class names given lack {missing[:10]}{' ...' if len(missing) > 10 else ''}, "
                f"{'one' if len(missing) == 1 else f'{len(missing)}'} of {source} ({len(own)} classes): give names "
                "that include every class of the data, in the order that numbers them."
            )
        class_label = ClassLabel(names=given)
        for split in labeled:
            split_names = result[split].features["label"].names
            if split_names != given:
                # Matched in the split's own Unicode form, then named as the first split names them.
                by_form = {unicodedata.normalize("NFC", name): name for name in split_names}
                in_its_form = [by_form.get(unicodedata.normalize("NFC", name), name) for name in given]
                result[split] = labels_by_name(result[split], ClassLabel(names=in_its_form))
                if in_its_form != given:
                    result[split] = result[split].cast_column("label", class_label)
        names = {tuple(given)}
    if len(names) > 1:
        raise ValueError(f"The splits disagree on the class names: {sorted(names)}")
    class_label = ClassLabel(names=list(names.pop()) if names else list(class_names or []))
    for split in unlabeled:
        result[split] = result[split].cast_column("label", class_label)
    return result


def labels_by_name(dataset: Dataset, class_label: ClassLabel) -> Dataset:
    """
    `dataset` with its labels renumbered as `class_label` numbers their names, names matched exactly: `datasets`'
    `align_labels_with_mapping` compares them lowercased, so "B" would be scored as "b" next to it.
    """
    # Not `ClassLabel.str2int`, which also tries the name stripped and read as a number.
    new_ids = {name: index for index, name in enumerate(class_label.names)}
    ids = [new_ids[name] for name in dataset.features["label"].names]
    features = dataset.features.copy()
    features["label"] = class_label
    return dataset.map(
        lambda batch: {"label": [ids[label] for label in batch["label"]]}, batched=True, features=features,
        desc="Numbering the labels as the classes given",
    )  # fmt: skip


def _saved_to_disk(folder: Path) -> bool:
    """Whether `folder` was written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    import datasets

    names = (datasets.config.DATASET_STATE_JSON_FILENAME, datasets.config.DATASETDICT_JSON_FILENAME)
    return any((folder / name).is_file() for name in names)


def _load_dataset(dataset_name: str, dataset_config_name: str | None, cache_dir: str | None) -> DatasetDict:
    """`load_dataset`, or `load_from_disk` for a folder written by `save_to_disk` (`load_dataset` refuses a saved
    `Dataset`): a single saved `Dataset` is the train split."""
    import datasets

    if not _saved_to_disk(Path(dataset_name)):
        return load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir)
    if dataset_config_name:
        raise ValueError(
            f"--dataset_config_name {dataset_config_name}: {dataset_name} is a data set saved with `save_to_disk`, "
            "which has no configurations."
        )
    loaded = datasets.load_from_disk(dataset_name)
    return DatasetDict(train=loaded) if isinstance(loaded, Dataset) else loaded


def _paths_read_from(dataset: Dataset, folder: str | Path) -> Dataset:
    """`dataset` with the relative paths of its string `video` column read from `folder`; URLs, absolute paths and
    empty entries are kept, and so is a relative path found only from the current directory (read from there before)."""
    from datasets.utils.file_utils import is_relative_path

    feature = dataset.features.get("video")
    if not isinstance(feature, Value) or feature.dtype not in ("string", "large_string"):
        return dataset
    folder = os.path.abspath(folder)  # clips are read by path from wherever the data set is used

    def read_from(path):
        if not path or not is_relative_path(path):
            return path
        in_folder = os.path.join(folder, path)
        return path if os.path.exists(path) and not os.path.exists(in_folder) else in_folder

    def read_from_folder(batch):
        return {"video": [read_from(path) for path in batch["video"]]}

    # In memory, as the paths are small: the processes would otherwise write the same cache file at once. (A new
    # column added to the table would not follow a selection's indices mapping.)
    return dataset.map(
        read_from_folder, batched=True, keep_in_memory=True, desc="Reading relative clip paths from the data set folder"
    )


def _checked_labels(split: str, dataset: Dataset) -> tuple[Dataset, bool]:
    """The split with its video column as paths or bytes and whether it is a test split without labels, or a
    `ValueError` for missing columns and for clips without a label outside a whole test split."""
    if "video" not in dataset.features or ("label" not in dataset.features and split != "test"):
        raise ValueError(f"The {split} split has the columns {list(dataset.features)}: it needs 'video' and 'label' "
                         "(see --video_column / --label_column).")  # fmt: skip
    if isinstance(dataset.features["video"], Video):
        dataset = dataset.cast_column("video", Video(decode=False))
    # Clips without a label: a test split without a label column, or whose labels are all -1 or missing.
    missing = len(dataset) if "label" not in dataset.features else _count_missing_labels(dataset)
    if missing and (split != "test" or missing < len(dataset)):
        where = "" if split == "test" else " (only a test split can be predicted without labels)"
        raise ValueError(f"The {split} split has {missing} of its {len(dataset)} clips without a label{where}: label "
                         "every clip, or none to predict them.")  # fmt: skip
    return dataset, missing > 0


def _count_missing_labels(dataset: Dataset) -> int:
    """Clips whose label is missing (None, an empty string) or -1 (`datasets`' convention for an unlabeled clip; a
    string "-1" where JSON files mix the two in one column)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = dataset.select_columns(["label"]).with_format("arrow")[:]["label"]
    missing = column.null_count
    if pa.types.is_integer(column.type):
        missing += pc.sum(pc.equal(column, UNLABELED)).as_py() or 0
    elif pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        missing += pc.sum(pc.is_in(column, pa.array(["", str(UNLABELED)]))).as_py() or 0
    return missing


def _check_frame_count_fixed(processor: EVLVideoProcessor, purpose: str) -> None:
    """Refuse a processor that samples by time (`fps`): it takes as many frames as each clip lasts, which cannot be
    batched (and sampling `num_frames` instead would score other frames than the pipeline does)."""
    if processor.fps is not None:
        raise ValueError(
            f"This video processor samples by time (fps={processor.fps:g}): as many frames as each clip lasts, which "
            f"cannot be batched for {purpose}. Use a processor that samples num_frames frames a clip: load it with "
            "fps=None (EVLVideoProcessor.from_pretrained(..., fps=None), then save_pretrained)."
        )


class VideoTrainTransform:
    """
    The authors' training augmentation: frames sampled as the processor samples them (`frame_sampling`) from a random
    offset (`sample_frame_indices` with `random_temporal_offset`: a random dense window start, the authors', or one
    random offset shared by the uniform segments), then RandAugment (timm's `rand-m7-n4-mstd0.5-inc1`, the same ops
    and magnitudes for every frame of a clip, see `ClipRandAugment`) on the decoded 8-bit frames, then one random
    resized crop box (scale 0.08-1, ratio 3/4-4/3) for all frames, resized to the crop size, rescaled and normalised
    as the processor prepares evaluation frames (`EVLVideoProcessor.resize_frames`): by default bilinearly on float
    frames without antialias, as the authors' `random_resized_crop` does; a backbone's own preprocessing otherwise.

    `num_frames` and `sampling_rate` default to the processor's. A processor that samples by time (`fps`) is refused:
    its frame count follows each clip's length, and clips of different lengths cannot be batched.

    All randomness comes from the `generator` given with each clip, never from a global state, so the caller decides
    what it depends on (`TrainingClips`: seed, epoch and clip index).
    """

    def __init__(
        self,
        processor: EVLVideoProcessor,
        num_frames: int | None = None,
        sampling_rate: int | None = None,
        rand_augment: bool = True,
    ):
        num_frames = processor.num_frames if num_frames is None else num_frames
        sampling_rate = processor.sampling_rate if sampling_rate is None else sampling_rate
        if num_frames < 1 or sampling_rate < 1:
            raise ValueError(f"num_frames ({num_frames}) and sampling_rate ({sampling_rate}) must be positive.")
        _check_frame_count_fixed(processor, "training")
        self.processor = processor
        self.num_frames = num_frames
        self.sampling_rate = sampling_rate
        self.crop_size = SizeDict(height=processor.crop_size["height"], width=processor.crop_size["width"])
        self.rand_augment = None
        if rand_augment:
            from .augmentation import ClipRandAugment

            self.rand_augment = ClipRandAugment()

    def __call__(self, video, generator: np.random.Generator) -> torch.Tensor:
        from torchvision.transforms import RandomResizedCrop

        frames, _ = decode_video(
            video,
            lambda metadata: sample_frame_indices(
                metadata.total_num_frames, self.num_frames, self.sampling_rate, self.processor.frame_sampling,
                random_temporal_offset=True, generator=generator,
            ),
            backend=self.processor.decoding_backend,
        )  # fmt: skip
        frames = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()  # (T, C, H, W) uint8
        if self.rand_augment is not None:
            frames = self.rand_augment(frames, seed=int(generator.integers(2**63 - 1)))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(generator.integers(2**63 - 1)))
            # One box for every frame, drawn as torchvision's RandomResizedCrop draws it.
            top, left, height, width = RandomResizedCrop.get_params(frames, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
        # Resized, rescaled and normalised as the processor prepares frames for evaluation: by default the authors'
        # bilinear resize of float frames without antialias (they normalise first: the same numbers, resizing and
        # normalising being linear), a backbone's own preprocessing otherwise.
        processor = self.processor
        frames = processor.resize_frames(frames[..., top : top + height, left : left + width], self.crop_size)
        # Tuples, as the processor's call passes them: transformers caches the statistics by value (a list set on
        # the processor after it was built would be unhashable).
        mean, std = (tuple(v) if isinstance(v, (list, tuple)) else v for v in (processor.image_mean, processor.image_std))
        return processor.rescale_and_normalize(
            frames, processor.do_rescale, processor.rescale_factor, processor.do_normalize, mean, std
        )


class VideoEvalTransform:
    """Deterministic evaluation input: the processor's dense window(s) and crop(s), `num_views = temporal x spatial`."""

    def __init__(
        self,
        processor: EVLVideoProcessor,
        num_frames: int | None = None,
        sampling_rate: int | None = None,
        temporal_views: int | None = None,
        spatial_views: int | None = None,
    ):
        self.processor = processor
        num_frames = processor.num_frames if num_frames is None else num_frames
        sampling_rate = processor.sampling_rate if sampling_rate is None else sampling_rate
        temporal_views = processor.num_temporal_views if temporal_views is None else temporal_views
        spatial_views = processor.num_spatial_views if spatial_views is None else spatial_views
        # Settings are checked here, once: an impossible one must stop the run, not turn every clip into a bad one.
        if num_frames < 1 or sampling_rate < 1 or temporal_views < 1:
            raise ValueError(
                f"num_frames ({num_frames}), sampling_rate ({sampling_rate}) and num_temporal_views ({temporal_views}) "
                "must be positive."
            )
        if spatial_views not in (1, 3):
            raise ValueError(f"num_spatial_views must be 1 or 3, got {spatial_views}.")
        _check_frame_count_fixed(processor, "evaluation")
        self.kwargs = dict(
            num_frames=num_frames, sampling_rate=sampling_rate, num_temporal_views=temporal_views,
            num_spatial_views=spatial_views, random_temporal_offset=False, return_tensors="pt",
        )  # fmt: skip
        num_views = temporal_views * spatial_views
        clip_shape = (num_frames, 3, processor.crop_size["height"], processor.crop_size["width"])
        self.output_shape = clip_shape if num_views == 1 else (num_views, *clip_shape)

    @property
    def num_frames(self) -> int:
        return self.kwargs["num_frames"]

    def __call__(self, video) -> torch.Tensor:
        return self.processor(video, **self.kwargs)["pixel_values"][0]


class _WarnOnce:
    """Log a bad clip once per process (a replaced training clip fails again every epoch)."""

    def __init__(self):
        self.seen = set()

    def __call__(self, index: int, error: Exception, action: str) -> None:
        if index not in self.seen:
            self.seen.add(index)
            logger.warning("Clip %d cannot be decoded, %s: %s", index, action, error)


class TrainingClips(torch.utils.data.Dataset):
    """
    Training clips of a `datasets.Dataset` (`video`, `label`), decoded and augmented by a `VideoTrainTransform`.

    Items are addressed as `epoch * len(self) + clip_index` (`EpochShuffleSampler` yields such keys), so the
    augmentation of every clip depends on (seed, epoch, clip index) only. That holds in dataloader worker processes,
    persistent or not, which never see a callback's update, and it makes a resumed run exact.

    A clip that cannot be decoded is replaced by another clip, drawn from the same (seed, epoch, clip index), and its
    index is reported in `unusable_clip_indices`. After `max_replacements` failures in a row the data set is taken to
    be broken and the run stops.
    """

    def __init__(self, dataset: Dataset, transform: VideoTrainTransform, seed: int = 0, max_replacements: int = 10):
        self.dataset = dataset
        self.transform = transform
        self.seed = seed
        self.max_replacements = max_replacements
        self._warn = _WarnOnce()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int) -> dict:
        epoch, index = divmod(int(key), len(self.dataset))
        draws = np.random.default_rng([self.seed, epoch, index])
        unusable, errors = [], []
        candidate = index
        for attempt in range(self.max_replacements + 1):
            example = self.dataset[candidate]
            try:
                pixel_values = self.transform(
                    _video_to_decode(example["video"]), np.random.default_rng([self.seed, epoch, index, attempt])
                )
            except EVLVideoDecodingError as error:
                self._warn(_row(example, candidate), error, "replaced by another clip")
                unusable.append(candidate)
                errors.append(str(error))
                candidate = int(draws.integers(len(self.dataset)))
                continue
            return {"pixel_values": pixel_values, "labels": int(example["label"]), "clip_index": index,
                    "unusable_clip_indices": unusable}  # fmt: skip
        raise RuntimeError(
            f"{len(errors)} clips in a row could not be decoded; the data set looks broken. First errors: "
            + "; ".join(errors[:3])
        )


class EpochShuffleSampler(torch.utils.data.Sampler):
    """
    A new permutation of the clips every epoch, drawn from (seed, epoch), yielding `epoch * num_clips + index` for
    `TrainingClips`; with `shuffle=False` (`train_sampling_strategy="sequential"`), the clips in order. The Trainer
    calls `set_epoch` at the start of every epoch, also on resume.
    """

    def __init__(self, num_clips: int, seed: int = 0, shuffle: bool = True):
        self.num_clips = num_clips
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_clips

    def __iter__(self):
        offset = self.epoch * self.num_clips
        if not self.shuffle:
            return iter(range(offset, offset + self.num_clips))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter((offset + torch.randperm(self.num_clips, generator=generator)).tolist())


class EvaluationClips(torch.utils.data.Dataset):
    """
    Evaluation clips of a `datasets.Dataset` (`video`, `label`) through a `VideoEvalTransform`. A clip that cannot
    be decoded keeps its slot, with zero pixels and label `IGNORE_LABEL`, so every process of a distributed
    evaluation gathers batches of the same size; `EVLTrainer` leaves such slots out of the loss and the metrics.
    """

    def __init__(self, dataset: Dataset, transform: VideoEvalTransform):
        self.dataset = dataset
        self.transform = transform
        self._warn = _WarnOnce()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        example = self.dataset[int(index)]
        try:
            pixel_values, label, unusable = self.transform(_video_to_decode(example["video"])), int(example["label"]), []
        except EVLVideoDecodingError as error:
            self._warn(_row(example, index), error, "left out of the evaluation")
            pixel_values, label, unusable = torch.zeros(self.transform.output_shape), IGNORE_LABEL, [int(index)]
        return {"pixel_values": pixel_values, "labels": label, "clip_index": int(index), "unusable_clip_indices": unusable}


FRAME_ORDERS = ("reversed", "shuffled")


def shuffled_frame_order(num_frames: int, clip_index: int, seed: int = 0) -> np.ndarray:
    """The frame order of clip `clip_index` in a shuffled evaluation: a permutation of `range(num_frames)` drawn from
    (seed, clip index) alone, so every process and every run shuffles a clip the same way; never the identity."""
    if num_frames < 2:
        raise ValueError(f"A clip of {num_frames} frame has no other frame order to shuffle into.")
    generator = np.random.default_rng([seed, int(clip_index)])
    while True:
        order = generator.permutation(num_frames)
        if (order != np.arange(num_frames)).any():
            return order


class FrameOrderClips(torch.utils.data.Dataset):
    """
    `EvaluationClips` with each clip's sampled frames put in another temporal order: `"reversed"`, or `"shuffled"`
    (`shuffled_frame_order`). The frames are decoded and sampled as in the in-order evaluation and only then
    reordered, so the three evaluations see the same frames; every view of a multi-view clip (`(num_views,
    num_frames, ...)`) gets the same order. Unusable clips stay what `EvaluationClips` makes of them.
    """

    def __init__(self, clips: EvaluationClips, order: str, seed: int = 0):
        if order not in FRAME_ORDERS:
            raise ValueError(f"order must be one of {FRAME_ORDERS}, got {order!r}.")
        self.num_frames = clips.transform.num_frames
        if self.num_frames < 2:
            raise ValueError(
                f"The evaluation samples {self.num_frames} frame per clip: reversing or shuffling it changes "
                "nothing. Evaluate temporal reliance with at least 2 frames (--num_frames)."
            )
        self.clips = clips
        self.order = order
        self.seed = seed

    def __len__(self) -> int:
        return len(self.clips)

    def frame_order(self, index: int) -> np.ndarray:
        if self.order == "reversed":
            return np.arange(self.num_frames)[::-1].copy()
        return shuffled_frame_order(self.num_frames, index, self.seed)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.clips[index])
        pixel_values = item["pixel_values"]
        # (frames, C, H, W) or (views, frames, C, H, W): the frames axis is the fourth from the end either way.
        if pixel_values.ndim not in (4, 5) or pixel_values.shape[-4] != self.num_frames:
            raise ValueError(
                f"Expected a clip of {self.num_frames} frames, (num_frames, C, H, W) or (num_views, num_frames, C, H, "
                f"W), got pixel_values of shape {tuple(pixel_values.shape)}."
            )
        item["pixel_values"] = pixel_values.index_select(-4, torch.from_numpy(self.frame_order(index)))
        return item


class VideoClipCollator:
    """
    Stack clips (`pixel_values`, or cached `frame_features` / `cross_frame_maps`) and labels into a batch. The indices
    of clips that could not be decoded ride along as `unusable_clip_indices` (a list) for `EVLTrainer` to count; it
    works in dataloader worker processes too. A batch that is mostly unusable clips is reported loudly.
    """

    def __call__(self, examples: list[dict]) -> dict:
        batch = {}
        for key in ("pixel_values", "frame_features", "cross_frame_maps"):
            if examples[0].get(key) is not None:
                batch[key] = torch.stack([torch.as_tensor(e[key]) for e in examples])
        batch["labels"] = torch.tensor([int(e["labels"]) for e in examples])
        if "clip_index" in examples[0]:
            batch["clip_indices"] = torch.tensor([int(e["clip_index"]) for e in examples])
        unusable = [index for e in examples for index in e.get("unusable_clip_indices", [])]
        batch["unusable_clip_indices"] = unusable
        affected = sum(1 for e in examples if e.get("unusable_clip_indices"))
        if len(examples) > 1 and 2 * affected > len(examples):
            logger.warning(
                "%d of the %d clips of this batch could not be decoded (clips %s): check the data set.",
                affected, len(examples), sorted(set(unusable)),
            )  # fmt: skip
        return batch


def feature_cache_fingerprint(model, dataset: Dataset, transform: VideoEvalTransform, dtype: torch.dtype) -> str:
    """
    A hash of everything a cached clip depends on: the backbone's weights, which blocks and maps the decoder reads,
    the evaluation transform (processor settings, frames, stride), the storage dtype, the autocast it is built under
    (if any), and the clips (paths, file sizes and modification times). A cache is reused only when all of it is
    unchanged. Not the labels: the cache holds no label (they are the data set's, added when it is read), so clips
    numbered otherwise reuse it.
    """
    evl = model.evl if hasattr(model, "evl") else model
    # v3: the cross-frame maps are computed in the backbone's dtype. v4: the backbone's config and the tokens' layout.
    # v5: shards named by the clips they hold, the manifest giving each shard's range. v6: no labels in the shards.
    digest = hashlib.sha256(b"evl-hf feature cache v6")
    for name, tensor in sorted(evl.vision_model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    config = evl.config
    # Built under autocast (a --bf16/--fp16 run's), the backbone computes in its dtype: other features.
    device_type = next(evl.parameters()).device.type
    autocast = str(torch.get_autocast_dtype(device_type)) if torch.is_autocast_enabled(device_type) else None
    settings = {
        "decoder_num_layers": config.decoder_num_layers,
        "cross_frame_maps": config.use_temporal_cross_attention,
        "backbone_dtype": str(evl.vision_model.dtype),  # what `backbone_dtype="auto"` resolved to on this machine
        # The features are returned, and the maps computed, in the decoder's: float32 on a bf16 backbone, or not.
        "decoder_dtype": str(evl.decoder.query.dtype),
        # Weights alone do not fix the features: the family, norms' eps, activation, resolution and registers do too.
        "vision_config": config.vision_config.to_diff_dict(),
        "frame_size": config.frame_size,
        "tokens": [config.num_prefix_tokens, *config.patch_grid],
        "transform": {k: v for k, v in transform.kwargs.items() if k != "return_tensors"},
        # The settings, not how the processor was saved or named (`save_pretrained` adds `auto_map`), nor its
        # evaluation views or random offsets: the transform's own (above, never a random window) are those cached.
        "processor": {
            key: value for key, value in transform.processor.to_dict().items()
            if key not in ("auto_map", "processor_class", "video_processor_type", "num_temporal_views",
                           "num_spatial_views", "return_metadata", "random_temporal_offset")
        },  # fmt: skip
        "dtype": str(dtype),
        "autocast": autocast,
    }
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for example in dataset:
        video = _video_path(example["video"])
        if isinstance(video, (bytes, bytearray)):
            identity = hashlib.sha256(video).hexdigest()  # clips stored in the data set: their content
        else:
            stat = os.stat(video) if os.path.exists(str(video)) else None
            identity = [str(video), stat and (stat.st_size, stat.st_mtime_ns)]
        digest.update(json.dumps(identity).encode())
    return digest.hexdigest()[:20]


class _Terminated(BaseException):
    """SIGTERM received while the feature cache was built (see `_sigterm_raises`)."""


@contextlib.contextmanager
def _sigterm_raises():
    """
    Make SIGTERM (a scheduler's time limit; torchrun stopping the other processes when one fails) raise `_Terminated`
    in the main thread for the duration, so that the build's `except BaseException` removes its temporary files:
    Python's default handling ends the process at once, running no cleanup. Afterwards the previous handler is back,
    and a SIGTERM received is delivered again to it, so the process still ends (or does what its own handler says).
    Only the main thread can set handlers; an ignored SIGTERM stays ignored, and one handled outside Python (which
    could not be put back) is left alone.
    """
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or previous in (signal.SIG_IGN, None):
        yield
        return

    def terminate(signum, frame):
        raise _Terminated("SIGTERM received while the feature cache was built")

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    except _Terminated:
        signal.signal(signal.SIGTERM, previous)
        signal.raise_signal(signal.SIGTERM)
        raise  # the previous handler returned: the build stopped all the same
    finally:
        signal.signal(signal.SIGTERM, previous)


# Its temporary files are removed also when the process is told to stop.
@_sigterm_raises()
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
    the last blocks' outputs and the cross-frame attention maps) as Arrow files under
    `cache_dir/<fingerprint>/`, in `dtype` (float16 halves the disk cost; float32 makes cached logits equal uncached
    ones to float precision). The backbone runs where the model is (put it on the accelerator first), under the
    autocast the call is made in: build it under the one training runs in (`accelerator.autocast()` for mixed
    precision), so that the features are those the backbone gives in training.

    Under `accelerate launch` / torchrun every process caches its own contiguous share of the clips and writes one
    shard; all processes then read all shards, in the data set's order. Batches are formed from fixed groups of
    `batch_size` consecutive clips, so the cache is the same whatever the number of processes. A shard is named by
    the clips it holds, so runs with another batch size or number of processes sharing the cache never take each
    other's shards. A complete cache with the same fingerprint (see `feature_cache_fingerprint`) is reused: its
    manifest's shards hold every clip of the data set once, but those that could not be decoded, which are left out.
    Any other one is built again, with a warning that says why.
    Returns the cached data set (torch format), with `dataset`'s labels of the clips cached (the cache holds none: clips
    numbered otherwise reuse it), and the number of clips left out. Only for training without augmentation: the cache
    freezes one view of every clip.
    """
    from accelerate import PartialState
    from datasets import Array4D, Array5D, concatenate_datasets
    from datasets.arrow_writer import ArrowWriter
    from tqdm.auto import tqdm

    if len(transform.output_shape) != 4:
        raise ValueError("The feature cache stores one view per clip: use 1 temporal and 1 spatial view.")
    if dtype not in (torch.float16, torch.float32):  # Arrow, and so `datasets`' arrays, have no bfloat16
        raise ValueError(f"dtype={dtype}: the feature cache stores float16 or float32.")
    state = PartialState()
    evl = model.evl if hasattr(model, "evl") else model
    config = evl.config
    # Cached features would freeze what the optimizer is meant to train: those tensors would never get a gradient.
    trainable = [name for name, parameter in evl.vision_model.named_parameters() if parameter.requires_grad]
    if trainable:
        raise ValueError(
            f"The feature cache stores a frozen backbone's outputs, but this model has {len(trainable)} trainable "
            f"tensors in the backbone (freeze_backbone={config.freeze_backbone}; the first: {trainable[0]}): train "
            "it on decoded clips instead."
        )
    num_patches = config.patch_grid[0] * config.patch_grid[1]
    num_tokens = config.num_prefix_tokens + num_patches
    arrow_dtype = str(dtype).removeprefix("torch.")
    feature_spec = {
        "frame_features": Array4D(
            (config.decoder_num_layers, transform.num_frames, num_tokens, config.vision_config.hidden_size), arrow_dtype
        ),
    }
    if config.use_temporal_cross_attention:
        feature_spec["cross_frame_maps"] = Array5D(
            (config.decoder_num_layers, transform.num_frames, 2, num_patches, num_patches), arrow_dtype
        )
    features = Features(feature_spec)
    directory = Path(cache_dir) / feature_cache_fingerprint(model, dataset, transform, dtype)
    manifest = directory / "cache.json"

    complete = False
    if manifest.exists():
        problem = _cache_problem(directory, manifest.read_text(), features, len(dataset))
        if problem is not None:
            logger.warning("The feature cache in %s %s: building it again.", directory, problem)
        complete = problem is None
    if state.num_processes > 1:  # one decision for all processes, or they would run different collectives
        from accelerate.utils import broadcast_object_list

        complete = broadcast_object_list([complete])[0]
    if not complete:
        if state.is_main_process:
            # Caches are never removed: one of other clips or settings, or of an older version, would stay unseen.
            others = sorted(path.parent.name for path in Path(cache_dir).glob("*/cache.json") if path.parent != directory)
            if others:
                logger.warning(
                    "Building the feature cache in %s; other feature caches beside it: %s (of other clips or settings, "
                    "or of an older evl-hf version). They are kept: delete those no longer needed.", directory, others,
                )  # fmt: skip
        directory.mkdir(parents=True, exist_ok=True)
        clip_ranges = _shard_clip_ranges(len(dataset), batch_size, state.num_processes)
        indices = clip_ranges[state.process_index]
        shard = directory / _shard_name(indices)
        unusable = []
        device = next(evl.parameters()).device
        was_training = evl.training
        evl.eval()
        # Unique temporary names and atomic renames: two runs sharing the cache may build the same shard at once.
        partial = shard.with_name(f"{shard.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")
        # One Arrow record batch per batch of clips: datasets' default (1000 rows) held a whole shard in memory and
        # went past Arrow's 32-bit list offsets beyond a few hundred ViT-B/16 clips. Fewer clips a batch where one is
        # large (at most 2^30 values of a column and 512 MiB).
        values_per_clip = max(math.prod(spec.shape) for spec in feature_spec.values() if hasattr(spec, "shape"))
        bytes_per_clip = feature_cache_bytes_per_clip(config, transform.num_frames, dtype)
        rows_per_batch = max(1, min(batch_size, 2**30 // values_per_clip, 2**29 // bytes_per_clip))
        try:
            with ArrowWriter(features=features, path=str(partial), writer_batch_size=rows_per_batch) as writer:
                bar = tqdm(total=len(indices), desc="Caching backbone features", unit="clip",
                           disable=not progress or not state.is_local_main_process)  # fmt: skip
                for start in range(indices.start, indices.stop, batch_size):
                    pending = []
                    for index in range(start, min(start + batch_size, indices.stop)):
                        example = dataset[index]
                        try:
                            pending.append(transform(_video_to_decode(example["video"])))
                        except EVLVideoDecodingError as error:
                            logger.warning(
                                "Clip %d cannot be decoded, left out of the feature cache: %s",
                                _row(example, index), error,
                            )  # fmt: skip
                            unusable.append(index)
                    bar.update(min(start + batch_size, indices.stop) - start)
                    if not pending:
                        continue
                    with torch.no_grad():
                        output = evl.extract_backbone_features(torch.stack(pending).to(device))
                    for row in range(len(pending)):
                        item = {"frame_features": output.frame_features[row].to(dtype).cpu().numpy()}
                        if output.cross_frame_maps is not None:
                            item["cross_frame_maps"] = output.cross_frame_maps[row].to(dtype).cpu().numpy()
                        writer.write(item)
                bar.close()
                writer.finalize()
            _write_atomically(shard.with_suffix(".json"), json.dumps({"unusable_clip_indices": unusable}))
            os.replace(partial, shard)
        except BaseException:
            partial.unlink(missing_ok=True)  # a failed build (a full disk, Ctrl-C) gives its space back
            raise
        finally:
            evl.train(was_training)
        state.wait_for_everyone()
        if state.is_main_process:
            # The shards of this run's processes, by name: a listing of the folder may miss one written on another
            # machine, or hold one of another run. Processes given the same (empty) range of clips share a shard.
            shard_clips = list(dict.fromkeys((clips.start, clips.stop) for clips in clip_ranges))
            shard_files = [directory / _shard_name(range(*clips)) for clips in shard_clips]
            _wait_for_files([file for shard in shard_files for file in (shard, shard.with_suffix(".json"))])
            unusable = sorted(
                index for shard in shard_files
                for index in json.loads(shard.with_suffix(".json").read_text())["unusable_clip_indices"]
            )  # fmt: skip
            shards = [{"file": shard.name, "clips": list(clips)} for shard, clips in zip(shard_files, shard_clips)]
            text = json.dumps({"shards": shards, "num_clips": len(dataset), "unusable_clip_indices": unusable}, indent=1)
            # Checked as a later run checks it before reusing it: what this run reads is what a later one will.
            problem = _cache_problem(directory, text, features, len(dataset))
            if problem is not None:
                raise RuntimeError(f"The feature cache just built in {directory} {problem}.")
            _write_atomically(manifest, text)
        state.wait_for_everyone()
    else:
        logger.info("Reusing the backbone feature cache in %s", directory)

    info = json.loads(manifest.read_text())
    shards = [Dataset.from_file(str(directory / shard["file"])) for shard in info["shards"]]
    cached = concatenate_datasets(shards) if len(shards) > 1 else shards[0]
    unusable = set(info["unusable_clip_indices"])
    labels = [int(label) for index, label in enumerate(dataset["label"]) if index not in unusable]
    cached = cached.add_column("labels", labels, feature=Value("int64"))
    return cached.with_format("torch"), len(unusable)


def _shard_clip_ranges(num_clips: int, batch_size: int, num_processes: int) -> list[range]:
    """The clips each process caches: whole groups of `batch_size` clips, so the batches, and so the numbers, do not
    depend on the number of processes."""
    groups = -(-num_clips // batch_size)
    return [
        range(groups * rank // num_processes * batch_size, min(groups * (rank + 1) // num_processes * batch_size, num_clips))
        for rank in range(num_processes)
    ]  # fmt: skip


def _shard_name(clips: range) -> str:
    return f"shard-clips-{clips.start:09d}-{clips.stop:09d}.arrow"


def _wait_for_files(files: list[Path]) -> None:
    deadline = time.monotonic() + SHARD_VISIBILITY_TIMEOUT
    while missing := [file for file in files if not file.exists()]:
        if time.monotonic() >= deadline:
            raise FileNotFoundError(
                f"{', '.join(file.name for file in missing)} not in {missing[0].parent} {SHARD_VISIBILITY_TIMEOUT} s "
                "after every process wrote its feature cache shard: on several machines, the cache directory must be "
                "on a file system they all see."
            )
        time.sleep(1)


def _cache_problem(directory: Path, manifest_text: str, features: Features, num_clips: int) -> str | None:
    """Why a finished cache cannot be reused, None when it can: it must hold what this model reads (a cache written
    by another version may not) and every clip of the data set once, but the unusable ones (a shard cut short still
    opens, with fewer rows)."""
    try:
        info = json.loads(manifest_text)
        ranges = [range(*shard["clips"]) for shard in info["shards"]]
        shards = [Dataset.from_file(str(directory / shard["file"])) for shard in info["shards"]]
        unusable = info["unusable_clip_indices"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"cannot be read ({error})"
    if not all(shard.features == features for shard in shards):
        return "holds features of another layout"
    starts, stops = [r.start for r in ranges], [r.stop for r in ranges]
    if info["num_clips"] != num_clips or not ranges or starts != [0, *stops[:-1]] or stops[-1] != num_clips:
        return f"lists shards of clips {[[r.start, r.stop] for r in ranges]}, not of the data set's {num_clips} clips"
    if len(set(unusable)) != len(unusable) or not all(0 <= index < num_clips for index in unusable):
        return "lists unusable clips twice or beyond the data set"
    for name, clips, shard in zip((s["file"] for s in info["shards"]), ranges, shards):
        expected = len(clips) - sum(index in clips for index in unusable)
        if shard.num_rows != expected:
            return f"is incomplete: {name} holds {shard.num_rows} clips, not {expected}"
    return None


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def feature_cache_bytes_per_clip(config, num_frames: int, dtype: torch.dtype = torch.float16) -> int:
    """Disk cost of one cached clip: K blocks x T frames x (P + N) tokens x D (P: class token, registers), plus
    K x T x 2 x N x N maps."""
    num_patches = config.patch_grid[0] * config.patch_grid[1]
    elements = config.decoder_num_layers * num_frames * (config.num_prefix_tokens + num_patches) * config.vision_config.hidden_size
    if config.use_temporal_cross_attention:
        elements += config.decoder_num_layers * num_frames * 2 * num_patches**2
    return elements * torch.finfo(dtype).bits // 8
