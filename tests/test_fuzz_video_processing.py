"""Property-based tests of the processor's inputs and a bounded byte-level fuzz of the decoding entry point.
A longer fuzz run: `python tools/fuzz_decoding.py --seconds 600`."""

import numpy as np
import pytest
import torch
from helpers import index_coded_frames, write_clip
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from evl_hf import EVLVideoDecodingError, EVLVideoProcessor, decode_video, sample_frame_indices


FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(
    total=st.integers(1, 5000),
    frames=st.integers(1, 64),
    rate=st.integers(1, 32),
    views=st.integers(1, 5),
    sampling=st.sampled_from(["dense", "uniform"]),
    random=st.booleans(),
)
def test_sampled_indices_are_always_valid(total, frames, rate, views, sampling, random):
    indices = sample_frame_indices(total, frames, rate, sampling, views, random, np.random.default_rng(0))
    assert indices.shape == (frames * views,) and indices.dtype == np.int64
    assert indices.min() >= 0 and indices.max() < total
    for view in indices.reshape(views, frames):
        assert (np.diff(view) >= 0).all()  # temporal order is kept inside every view
        if sampling == "dense" and total >= (frames - 1) * rate + 1:
            assert (np.diff(view) == rate).all()


@FAST
@given(
    video=arrays(
        dtype=st.sampled_from([np.uint8, np.float32, np.float64]),
        shape=st.tuples(st.integers(1, 12), st.integers(1, 40), st.integers(1, 40), st.just(3)),
        elements=st.integers(0, 255),
    ),
    frames=st.integers(1, 6),
    rate=st.integers(1, 4),
    layout=st.sampled_from(["last", "first"]),
)
def test_processor_output_shape_and_values_for_any_array(video, frames, rate, layout):
    if video.dtype != np.uint8:
        video = video / 255.0  # float videos are taken as already rescaled to [0, 1]
    processor = EVLVideoProcessor(num_frames=frames, sampling_rate=rate, size={"shortest_edge": 16},
                                  crop_size={"height": 16, "width": 16}, do_rescale=video.dtype == np.uint8)  # fmt: skip
    if layout == "first":
        video = np.ascontiguousarray(video.transpose(0, 3, 1, 2))
    data_format = "channels_first" if layout == "first" else "channels_last"
    if len(video) < frames:  # an array shorter than the clip: refused, as transformers' samplers do
        with pytest.raises(ValueError):
            processor(video, return_tensors="pt", input_data_format=data_format)
        return
    out = processor(video, return_tensors="pt", input_data_format=data_format)["pixel_values"]
    assert out.shape == (1, frames, 3, 16, 16) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # Normalised [0, 1] pixels, plus the overshoot resampling may add (under 15% of the range).
    low = (0 - max(processor.image_mean)) / min(processor.image_std)
    high = (1 - min(processor.image_mean)) / min(processor.image_std)
    margin = 0.15 / min(processor.image_std)
    assert out.min() >= low - margin and out.max() <= high + margin


@pytest.fixture(scope="module")
def seed_clip(tmp_path_factory):
    return write_clip(tmp_path_factory.mktemp("fuzz") / "seed.mp4", index_coded_frames(30), gop=5).read_bytes()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_files_decode_or_raise_a_decoding_error(seed_clip, decoding_backend, data):
    blob = bytearray(seed_clip)
    kind = data.draw(st.sampled_from(["flip", "truncate", "splice", "zero_block"]))
    if kind == "flip":
        for position in data.draw(st.lists(st.integers(0, len(blob) - 1), min_size=1, max_size=64)):
            blob[position] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    elif kind == "splice":
        start = data.draw(st.integers(0, len(blob) - 1))
        blob[start:start] = data.draw(st.binary(min_size=1, max_size=512))
    else:
        start = data.draw(st.integers(0, len(blob) - 1))
        blob[start : start + data.draw(st.integers(1, 4096))] = bytes(4096)[: len(blob[start : start + 4096])]
    wanted = data.draw(st.lists(st.integers(0, 40), min_size=1, max_size=8))
    try:
        frames, _ = decode_video(bytes(blob), lambda metadata: wanted, timeout=20, backend=decoding_backend)
    except EVLVideoDecodingError as error:
        assert "bytes of video" in str(error)
    else:
        assert frames.dtype == np.uint8 and frames.ndim == 4 and frames.shape[0] == len(wanted) and frames.shape[-1] == 3
