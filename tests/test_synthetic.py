"""The synthetic motion data set is reproducible: same seed, same bytes; each clip depends only on its own key."""

import re
from pathlib import Path

import numpy as np
import pytest

from evl_hf.data.synthetic import MOTION_CLASSES, generate_motion_dataset, render_clip, write_video


def _file_bytes(root: Path) -> dict[str, bytes]:
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def _generate(root: Path, train_per_class: int = 2, seed: int = 0) -> dict[str, bytes]:
    return _file_bytes(generate_motion_dataset(root, train_per_class, 1, 1, num_frames=8, size=32, seed=seed))


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(tmp_path):
    first, second = _generate(tmp_path / "first"), _generate(tmp_path / "second")
    assert len(first) == len(MOTION_CLASSES) * 4 + 1  # 2 + 1 + 1 clips per class, and labels.json
    assert first.keys() == second.keys()
    assert [name for name in first if first[name] != second[name]] == []
    other = _generate(tmp_path / "other", seed=1)
    assert other.keys() == first.keys()
    clips = [name for name in first if name.endswith(".mp4")]
    assert all(other[name] != first[name] for name in clips)


def test_a_clip_depends_only_on_seed_split_class_and_index(tmp_path):
    # Changing the number of training clips per class changes no other clip.
    smaller, larger = _generate(tmp_path / "smaller", train_per_class=1), _generate(tmp_path / "larger")
    assert set(smaller) < set(larger)
    assert [name for name in smaller if smaller[name] != larger[name]] == []


def test_encoder_runs_on_one_thread_whatever_the_cpu_count(tmp_path):
    # Left at PyAV's default (thread_count=0), x264 picks its thread count, and so its slicing and its output, from
    # the CPU count once frames are 128 pixels tall; one thread keeps the bytes independent of the CPUs available.
    frames = render_clip("moving_left", num_frames=2, size=128, rng=np.random.default_rng(0))
    data = write_video(tmp_path / "clip.mp4", frames).read_bytes()
    assert re.search(rb"threads=(\d+) lookahead_threads=\d+ sliced_threads=(\d)", data).groups() == (b"1", b"0")


def test_a_motion_sequence_is_its_classes_clips_back_to_back(tmp_path):
    from evl_hf import decode_video
    from evl_hf.data.synthetic import generate_motion_sequence, main

    path = generate_motion_sequence(tmp_path / "sequence.mp4", ("growing", "moving_left"), clips_per_class=2,
                                    num_frames=8, size=32)  # fmt: skip
    frames, metadata = decode_video(str(path), backend="pyav")
    assert frames.shape == (32, 32, 32, 3) and metadata.fps == 16
    with pytest.raises(SystemExit):
        main(["--sequence", str(tmp_path / "bad.mp4"), "--sequence_classes", "growing,jumping"])
