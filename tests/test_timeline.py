"""The video timeline: windows over a long video that share the backbone's work, exact per window, in bounded memory."""

import io
import json
import re
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from helpers import index_coded_frames, seeded_classifier, serving, tiny_config, write_clip
from transformers import pipeline

import evl_hf.timeline
from evl_hf import (
    EVLConfig,
    EVLForVideoClassification,
    EVLVideoDecodingError,
    EVLVideoProcessor,
    decode_video,
    video_timeline,
)
from evl_hf.video_decoding_evl import VideoFrameStream


LABELS = {i: f"class_{i}" for i in range(5)}
NUM_FRAMES, SAMPLING_RATE = 4, 3


def save_model(directory, config):
    model = seeded_classifier(config)
    model.save_pretrained(directory)
    EVLVideoProcessor.from_model_config(model.config, num_frames=NUM_FRAMES, sampling_rate=SAMPLING_RATE,
                                        size={"shortest_edge": 32}).save_pretrained(directory)  # fmt: skip
    return directory


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    config = tiny_config(id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    return save_model(tmp_path_factory.mktemp("evl-tiny"), config)


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    # 62 frames: 21 sampled frames 3 apart (0, 3, ..., 60).
    frames = index_coded_frames(62)
    rng = np.random.default_rng(0)
    frames = np.clip(frames.astype(int) + rng.integers(-40, 40, frames.shape), 0, 255).astype(np.uint8)
    return write_clip(tmp_path_factory.mktemp("clips") / "long.mp4", frames)


def load(directory):
    return EVLForVideoClassification.from_pretrained(directory).eval(), EVLVideoProcessor.from_pretrained(directory)


def logits_on_frames(model, processor, video, indices):
    """The model on exactly these decoded frames, as a user computes it without the timeline."""
    frames, _ = decode_video(video, lambda metadata: indices, backend="pyav")
    inputs = processor(frames, do_sample_frames=False, num_temporal_views=1, num_spatial_views=1, return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits[0]


@pytest.mark.parametrize("window_stride, backbone_batch_size", [(1, 32), (1, 5), (2, 3), (3, 7), (7, 4)])
def test_every_window_equals_the_model_on_its_frames(saved_model, clip_path, window_stride, backbone_batch_size):
    model, processor = load(saved_model)
    stats = {}
    windows = video_timeline(model, processor, str(clip_path), window_stride=window_stride,
                             backbone_batch_size=backbone_batch_size, decoder_batch_size=3, stats=stats)  # fmt: skip
    starts = list(range(0, 21 - NUM_FRAMES + 1, window_stride))
    if starts[-1] != 21 - NUM_FRAMES:
        starts.append(21 - NUM_FRAMES)  # the closing window ends at the last sampled frame
    assert [w.frame_indices for w in windows] == [[SAMPLING_RATE * (s + t) for t in range(NUM_FRAMES)] for s in starts]
    for window in windows:
        expected = logits_on_frames(model, processor, str(clip_path), window.frame_indices)
        torch.testing.assert_close(window.logits, expected, atol=1e-5, rtol=1e-5)
        assert window.start == window.frame_indices[0] / 25 and window.end == (window.frame_indices[-1] + 1) / 25
    # The reuse, counted: each sampled frame through the backbone once, each neighbouring pair's maps once.
    assert stats["frames_through_backbone"] == 21 and stats["frame_pairs"] == 20 and stats["windows"] == len(starts)


def test_frames_three_pixels_tall_are_read_as_channels_last(saved_model, tmp_path):
    # A (T, 3, W, 3) stack of decoded frames is ambiguous to transformers' format inference, which took it as
    # channels-first.
    model, processor = load(saved_model)
    frames = np.random.default_rng(1).integers(0, 256, (20, 3, 40, 3), dtype=np.uint8)
    path = write_clip(tmp_path / "three_pixels_tall.mp4", frames, pix_fmt="yuv444p")
    for window in video_timeline(model, processor, str(path)):
        decoded, _ = decode_video(str(path), lambda metadata: window.frame_indices, backend="pyav")
        inputs = processor(decoded, do_sample_frames=False, num_temporal_views=1, num_spatial_views=1,
                           input_data_format="channels_last", return_tensors="pt")  # fmt: skip
        with torch.no_grad():
            torch.testing.assert_close(window.logits, model(**inputs).logits[0], atol=1e-5, rtol=1e-5)


def test_window_logits_are_ordinary_tensors(saved_model, clip_path):
    # They were inference tensors: `div_` or a loss against them as targets raised outside inference mode.
    model = EVLForVideoClassification.from_pretrained(saved_model)
    windows = video_timeline(model, EVLVideoProcessor.from_pretrained(saved_model), str(clip_path), window_stride=8)
    short = video_timeline(model, EVLVideoProcessor.from_pretrained(saved_model, num_frames=64), str(clip_path))
    for window in windows + short:
        assert not window.logits.is_inference()
        window.logits.div_(2)


def test_the_backbone_runs_once_per_sampled_frame(saved_model, clip_path):
    """Counted at the backbone itself: frames through its embeddings, and the cross-frame map computations."""
    model, processor = load(saved_model)
    frames_embedded, pairs = [], []
    model.evl.vision_model.embeddings.register_forward_hook(lambda module, args, out: frames_embedded.append(len(args[0])))
    compute_maps = evl_hf.timeline.cross_frame_attention_maps

    def counting_maps(queries, keys, num_prefix_tokens):
        pairs.append(queries.shape[1] - 1)
        return compute_maps(queries, keys, num_prefix_tokens)

    evl_hf.timeline.cross_frame_attention_maps = counting_maps
    try:
        windows = video_timeline(model, processor, str(clip_path), window_stride=1, backbone_batch_size=6)
    finally:
        evl_hf.timeline.cross_frame_attention_maps = compute_maps
    assert len(windows) == 18
    assert sum(frames_embedded) == 21  # naive per-window inference: 18 x 4 = 72
    assert sum(pairs) == 20 * model.config.decoder_num_layers  # per decoder layer's block


def test_memory_does_not_grow_with_the_videos_length(saved_model, tmp_path):
    model, processor = load(saved_model)
    held = {}
    for num_frames in (60, 600):
        path = write_clip(tmp_path / f"{num_frames}.mp4", index_coded_frames(num_frames, 32, 32), gop=250)
        stats = {}
        windows = video_timeline(model, processor, str(path), backbone_batch_size=8, decoder_batch_size=4, stats=stats)
        assert len(windows) == -(-num_frames // SAMPLING_RATE) - NUM_FRAMES + 1
        held[num_frames] = stats["max_buffered_frames"]
    # Frames held: one backbone batch plus the windows waiting for the decoder, whatever the length.
    assert held[600] == held[60] <= 8 + 4 + NUM_FRAMES


@pytest.mark.parametrize("window_stride", [20, 90])
def test_frames_between_far_apart_windows_are_not_all_held(saved_model, tmp_path, window_stride):
    """Windows far apart wait for the decoder no longer than a batch's frames allow, whatever the stride: before, with
    a stride of 20 and batches of 16 windows, the whole video was held (200 sampled frames); then, decoding early by
    the pending windows' span, a lone pending window still held every frame up to the next (90 at a stride of 90)."""
    model, processor = load(saved_model)
    path = write_clip(tmp_path / "600.mp4", index_coded_frames(600, 32, 32), gop=250)
    stats = {}
    windows = video_timeline(model, processor, str(path), window_stride=window_stride, backbone_batch_size=8,
                             decoder_batch_size=4, stats=stats)  # fmt: skip
    starts = [*range(0, 200 - NUM_FRAMES + 1, window_stride)]
    assert [w.frame_indices[0] for w in windows] == [SAMPLING_RATE * s for s in [*starts, 196]]
    # The frames of a decoder batch of windows (4 x 4) and one backbone batch at most.
    assert stats["max_buffered_frames"] <= 4 * NUM_FRAMES + 8


def test_a_progress_bar_counts_the_sampled_frames_of_long_videos(saved_model, clip_path, tmp_path, capfd):
    model, processor = load(saved_model)
    video_timeline(model, processor, str(clip_path))  # 21 sampled frames: too short to need a bar
    assert "Timeline" not in capfd.readouterr().err
    video_timeline(model, processor, str(clip_path), progress=True)
    shown = capfd.readouterr().err
    assert "Timeline: 100%" in shown and "21/21" in shown
    path = write_clip(tmp_path / "600.mp4", index_coded_frames(600, 32, 32), gop=250)
    video_timeline(model, processor, str(path))  # 200 sampled frames: shown by default
    shown = capfd.readouterr().err
    assert "Timeline: 100%" in shown and "200/200" in shown
    video_timeline(model, processor, str(path), progress=False)
    assert "Timeline" not in capfd.readouterr().err


def test_windows_decoded_early_equal_the_model_on_their_frames(saved_model, clip_path):
    model, processor = load(saved_model)
    # A stride of 9 with batches of 3 windows: two pending windows already span 13 frames, over 3 x 4.
    windows = video_timeline(model, processor, str(clip_path), window_stride=9, decoder_batch_size=3)
    assert [w.frame_indices[0] for w in windows] == [0, 27, 51]
    for window in windows:
        expected = logits_on_frames(model, processor, str(clip_path), window.frame_indices)
        torch.testing.assert_close(window.logits, expected, atol=1e-5, rtol=1e-5)


def test_a_model_in_training_mode_is_run_in_evaluation_mode_and_left_as_it_was(saved_model, clip_path):
    # As `explain` does: a model just trained (`trainer.model`) is in training mode, whose dropout would give other
    # logits on every call.
    model = EVLForVideoClassification.from_pretrained(saved_model, decoder_mlp_dropout=0.5, classifier_dropout=0.5)
    processor = EVLVideoProcessor.from_pretrained(saved_model)
    windows = video_timeline(model.train(), processor, str(clip_path), window_stride=9)
    assert model.training and model.evl.decoder.training
    model.eval()
    for window in windows:
        expected = logits_on_frames(model, processor, str(clip_path), window.frame_indices)
        torch.testing.assert_close(window.logits, expected, atol=1e-5, rtol=1e-5)


def test_a_model_returning_tuples_gives_the_same_windows(saved_model, clip_path, tmp_path):
    """`from_pretrained(..., return_dict=False)` makes the model return tuples; the timeline reads its outputs by
    name, for a long video (the shared backbone) and for one shorter than a window (the model's forward)."""
    short = write_clip(tmp_path / "short.mp4", index_coded_frames(7, 32, 32))
    model, processor = load(saved_model)
    tuples = EVLForVideoClassification.from_pretrained(saved_model, return_dict=False).eval()
    for video in (str(clip_path), str(short)):
        expected = video_timeline(model, processor, video, window_stride=4)
        windows = video_timeline(tuples, processor, video, window_stride=4)
        assert [w.frame_indices for w in windows] == [w.frame_indices for w in expected]
        for window, reference in zip(windows, expected):
            torch.testing.assert_close(window.logits, reference.logits, atol=0, rtol=0)
    timeline = pipeline("video-timeline", model=tuples, video_processor=processor)
    assert timeline(str(short), top_k=2) == pipeline("video-timeline", model=str(saved_model))(str(short), top_k=2)


def test_frames_of_the_wrong_size_are_refused_by_name(saved_model, tmp_path):
    from evl_hf import EVLInputError

    model, processor = load(saved_model)
    path = write_clip(tmp_path / "wide.mp4", index_coded_frames(30, 32, 64))
    processor.do_center_crop = False  # frames stay 32x64
    with pytest.raises(EVLInputError, match="Frames are 32x64, but this model's backbone"):
        video_timeline(model, processor, str(path))


def test_the_frame_stream_counts_frames_of_a_matroska_file(tmp_path):
    """Matroska/WebM give no per-stream frame count or duration: the container's duration sets the progress bar's."""
    import av

    path = tmp_path / "clip.mkv"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for frame in index_coded_frames(50, 32, 32):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    with av.open(str(path)) as container:
        assert not container.streams.video[0].frames and not container.streams.video[0].duration
    with VideoFrameStream(str(path), step=5) as stream:
        assert stream.total_num_frames == 50


def test_the_frame_stream_gives_decode_videos_frames(clip_path):
    with VideoFrameStream(str(clip_path), step=5) as stream:
        streamed = list(stream)
        assert stream.fps == 25 and stream.total_num_frames == 62
    assert [index for index, _ in streamed] == list(range(0, 62, 5))
    frames, _ = decode_video(str(clip_path), lambda metadata: list(range(0, 62, 5)), backend="pyav")
    np.testing.assert_array_equal(np.stack([frame for _, frame in streamed]), frames)


@pytest.mark.parametrize("num_frames, indices", [(7, [0, 3, 6, 6]), (8, [0, 3, 6, 7]), (9, [0, 3, 6, 8])])
def test_a_video_shorter_than_one_window_is_sampled_as_the_processor_samples_it(saved_model, tmp_path, num_frames, indices):
    model, processor = load(saved_model)
    path = write_clip(tmp_path / "short.mp4", index_coded_frames(num_frames, 32, 32))
    (window,) = video_timeline(model, processor, str(path))
    assert window.frame_indices == indices  # the video's last frame repeated, as the processor does
    inputs = processor(str(path), return_tensors="pt")  # the processor's own sampling of the whole clip
    with torch.no_grad():
        torch.testing.assert_close(window.logits, model(**inputs).logits[0], atol=1e-5, rtol=1e-5)


def test_a_short_video_from_a_url_is_downloaded_once(saved_model, tmp_path):
    """A video shorter than one window is decoded a second time (as the processor samples it), from the stream's own
    download: the URL is fetched once."""
    model, processor = load(saved_model)
    path = write_clip(tmp_path / "short.mp4", index_coded_frames(7, 32, 32))
    (expected,) = video_timeline(model, processor, str(path))
    requests = []
    with serving(tmp_path, requests) as base_url:
        (window,) = video_timeline(model, processor, f"{base_url}/short.mp4")
    assert requests == ["/short.mp4"]
    assert window.frame_indices == expected.frame_indices
    torch.testing.assert_close(window.logits, expected.logits, atol=0, rtol=0)


def test_a_short_video_from_a_file_object_is_rewound_to_be_read_again(saved_model, tmp_path):
    """A video shorter than one window is decoded a second time (as the processor samples it): a file object is
    rewound for that, and one that cannot be rewound is refused by name."""
    model, processor = load(saved_model)
    path = write_clip(tmp_path / "short.mp4", index_coded_frames(7, 32, 32))
    (expected,) = video_timeline(model, processor, str(path))
    with open(path, "rb") as file:
        (window,) = video_timeline(model, processor, file)
    (from_buffer,) = video_timeline(model, processor, io.BytesIO(path.read_bytes()))
    for got in (window, from_buffer):
        assert got.frame_indices == expected.frame_indices
        torch.testing.assert_close(got.logits, expected.logits, atol=1e-6, rtol=1e-6)

    closed = open(path, "rb")
    closed.close()
    with pytest.raises(EVLVideoDecodingError, match="short.mp4: not a readable video file"):
        video_timeline(model, processor, closed)

    class Unseekable(io.BytesIO):
        def seekable(self):
            return False

    with pytest.raises(EVLVideoDecodingError, match="<file object>: shorter than one window .* cannot be rewound"):
        video_timeline(model, processor, Unseekable(path.read_bytes()))


def test_a_saved_timeline_pipeline_loads_again(saved_model, clip_path, tmp_path):
    timeline = pipeline("video-timeline", model=str(saved_model))
    timeline.save_pretrained(tmp_path / "saved")
    again = pipeline("video-timeline", model=str(tmp_path / "saved"))
    assert again(str(clip_path), window_stride=8) == timeline(str(clip_path), window_stride=8)


def test_the_pipeline_returns_windows_in_time_order_with_labels(saved_model, clip_path):
    timeline = pipeline("video-timeline", model=str(saved_model))
    assert isinstance(timeline, evl_hf.timeline.EVLVideoTimelinePipeline)
    windows = timeline(str(clip_path), window_stride=4, top_k=2)
    assert [w["start"] for w in windows] == sorted(w["start"] for w in windows) and len(windows) == 6
    model, processor = load(saved_model)
    for window in windows:
        assert set(window) == {"start", "end", "frame_indices", "labels"} and len(window["labels"]) == 2
        scores = logits_on_frames(model, processor, str(clip_path), window["frame_indices"]).softmax(-1)
        best = scores.topk(2)
        assert [entry["label"] for entry in window["labels"]] == [LABELS[i] for i in best.indices.tolist()]
        np.testing.assert_allclose([entry["score"] for entry in window["labels"]], best.values.numpy(), atol=1e-5)
    assert len(timeline([str(clip_path), str(clip_path)], window_stride=4)) == 2  # a list of videos: one timeline each
    assert timeline([]) == []


def test_the_functions_windows_plot_as_the_pipelines(saved_model, clip_path):
    """`plot_timeline` draws `video_timeline`'s windows (logits) as it draws the pipeline's (labels and scores): the
    classes named and scored by the model's config, without it by index (transformers' `LABEL_<i>`) with a softmax."""

    def lines(figure):
        return {line.get_label(): line.get_ydata() for line in figure.axes[0].get_lines()}

    model, processor = load(saved_model)
    windows = video_timeline(model, processor, str(clip_path), window_stride=4)
    labelled = pipeline("video-timeline", model=str(saved_model))(str(clip_path), window_stride=4, top_k=len(LABELS))
    expected = lines(evl_hf.plot_timeline(labelled, num_classes=3))
    by_index = {LABELS[int(name.removeprefix("LABEL_"))]: scores
                for name, scores in lines(evl_hf.plot_timeline(windows, num_classes=3)).items()}  # fmt: skip
    for drawn in (lines(evl_hf.plot_timeline(windows, num_classes=3, config=model.config)), by_index):
        assert len(drawn) == 3 and list(drawn) == list(expected)
        for label in expected:
            np.testing.assert_allclose(drawn[label], expected[label], atol=1e-6)
    # A model without a head (`num_labels=0`) has no classes to draw: an empty plot, without matplotlib's warning
    # about an empty legend (the web demo draws one per request).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lines(evl_hf.plot_timeline(windows, config=EVLConfig(num_labels=0))) == {}


def test_the_cli_runs_as_a_module_without_runpys_warning(saved_model, clip_path, tmp_path):
    """`python -m evl_hf.timeline`, although `import evl_hf` imports the timeline (to register its pipeline): no
    runpy warning about a module found in sys.modules."""
    output = tmp_path / "timeline.json"
    command = [sys.executable, "-m", "evl_hf.timeline", str(clip_path), "--model",
               str(saved_model), "--window_stride", "8", "--output", str(output)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "RuntimeWarning" not in done.stderr and len(json.loads(output.read_text())) == 4  # 0, 8, 16 and the last


def test_the_cli_names_the_problem_in_one_line(saved_model, clip_path, tmp_path, capsys):
    """A broken video or a missing model: exit status 1 and one line naming it, not a traceback; a non-positive option
    is refused by argparse (status 2) before any model loads."""
    output = tmp_path / "timeline.json"
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all" * 10)
    for video, model, expected in [
        (tmp_path / "broken.mp4", saved_model, f"{tmp_path / 'broken.mp4'}: not a readable video file"),
        (clip_path, tmp_path / "no-such-model", ""),
    ]:
        with pytest.raises(SystemExit) as ended:
            evl_hf.timeline.main([str(video), "--model", str(model), "--output", str(output)])
        assert ended.value.code == 1
        assert f"python -m evl_hf.timeline: error: {expected}" in capsys.readouterr().err
    # A damaged checkpoint: EVL's own error, naming the file, not the pipeline's report of every class it tried.
    damaged = tmp_path / "damaged"
    shutil.copytree(saved_model, damaged)
    weights = (damaged / "model.safetensors").read_bytes()
    (damaged / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(SystemExit) as ended:
        evl_hf.timeline.main([str(clip_path), "--model", str(damaged), "--output", str(output)])
    error = capsys.readouterr().err
    assert ended.value.code == 1 and error.count("\n") == 1, error
    assert "model.safetensors: the weights file is truncated or corrupt" in error
    # A checkpoint whose processor samples uniformly has no stride for the windows: --frame_sampling_rate is asked for.
    uniform = tmp_path / "uniform"
    shutil.copytree(saved_model, uniform)
    EVLVideoProcessor.from_pretrained(saved_model, frame_sampling="uniform").save_pretrained(uniform)
    with pytest.raises(SystemExit) as ended:
        evl_hf.timeline.main([str(clip_path), "--model", str(uniform), "--output", str(output)])
    assert ended.value.code == 1
    error = capsys.readouterr().err
    assert "does not sample frames at a fixed stride" in error and "Traceback" not in error
    for option in ("--top_k", "--window_stride", "--frame_sampling_rate"):
        arguments = [str(clip_path), "--model", str(saved_model), "--output", str(output), option, "0"]
        with pytest.raises(SystemExit) as refused:
            evl_hf.timeline.main(arguments)
        assert refused.value.code == 2 and f"{option} must be a positive integer, got 0" in capsys.readouterr().err
    assert not output.exists()


def test_the_cli_checks_its_output_files_before_any_work(clip_path, tmp_path, capsys):
    # Checked first (the model given does not even exist): a long video's windows are never lost to a bad path.
    output = ["--output", str(tmp_path / "t.json")]
    for arguments, message in (
        (["--output", str(tmp_path / "missing" / "t.json")], "--output .*t.json: the folder .* does not exist"),
        ([*output, "--plot", str(tmp_path / "missing" / "t.png")], "--plot .*t.png: the folder .* does not exist"),
        ([*output, "--plot", str(tmp_path / "t.xyz")], "--plot .*t.xyz: a figure is written as .*; got '.xyz'"),
        ([*output, "--plot", str(tmp_path / "t")], "--plot .*: a figure is written as .*; got no suffix"),
        # A typo or a GPU this machine lacks: torch's traceback after the model had loaded.
        ([*output, "--device", "gpu"], "argument --device: 'gpu' is not a device name"),
    ):
        with pytest.raises(SystemExit) as refused:
            evl_hf.timeline.main([str(clip_path), "--model", str(tmp_path / "no-model"), *arguments])
        error = capsys.readouterr().err
        assert refused.value.code == 2 and re.search(message, error), error
    with pytest.raises(ValueError, match="a figure is written as .*; got no suffix"):
        evl_hf.plot_timeline([{"start": 0.0, "end": 1.0, "scores": {"a": 1.0}}], tmp_path / "plot")


def test_a_pgf_plot_without_its_tex_system_is_refused_before_any_work(clip_path, tmp_path, capsys, monkeypatch):
    # matplotlib lists .pgf, but writes it through a TeX system: without one the save failed after the whole run.
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SystemExit) as refused:
        evl_hf.timeline.main([str(clip_path), "--model", str(tmp_path / "no-model"), "--output", str(tmp_path / "t.json"),
                              "--plot", str(tmp_path / "t.pgf")])  # fmt: skip
    error = capsys.readouterr().err
    assert refused.value.code == 2 and re.search(r"--plot .*t.pgf: \.pgf is written by xelatex, .* not found", error), error


def test_the_cli_writes_the_windows_and_the_plot(saved_model, clip_path, tmp_path):
    from PIL import Image

    output, plot = tmp_path / "timeline.json", tmp_path / "timeline.png"
    returned = evl_hf.timeline.main([str(clip_path), "--model", str(saved_model), "--window_stride", "2", "--top_k", "3",
                                     "--output", str(output), "--plot", str(plot)])  # fmt: skip
    assert json.loads(output.read_text()) == json.loads(json.dumps(returned)) and len(returned) == 10
    # Another stride than the checkpoint's (3): what a processor sampling uniformly or by fps needs.
    returned = evl_hf.timeline.main([str(clip_path), "--model", str(saved_model), "--frame_sampling_rate", "5",
                                     "--window_stride", "4", "--output", str(output)])  # fmt: skip
    assert [window["frame_indices"] for window in returned] == [[0, 5, 10, 15], [20, 25, 30, 35], [40, 45, 50, 55],
                                                                [45, 50, 55, 60]]  # fmt: skip
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.size[0] > 300 and len(set(image.convert("L").get_flattened_data())) > 10


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"window_stride": 0}, "`window_stride` must be a positive integer"),
        ({"backbone_batch_size": 1.5}, "`backbone_batch_size` must be a positive integer"),
        ({"top_k": 0}, "`top_k` must be a positive integer"),
        ({"stride": 2}, "Unknown arguments for the video-timeline pipeline: stride"),
        ({"batch_size": 2}, "labels one video at a time \\(got batch_size=2\\)"),
        ({"num_workers": 2}, "in the calling process \\(got num_workers=2\\)"),
    ],
)
def test_bad_arguments_are_refused_by_name(saved_model, clip_path, kwargs, message):
    timeline = pipeline("video-timeline", model=str(saved_model))
    with pytest.raises((ValueError, TypeError), match=message):
        timeline(str(clip_path), **kwargs)
    if "batch_size" in kwargs or "num_workers" in kwargs:  # given to the pipeline itself, then a list of videos
        with pytest.raises(ValueError, match=message):
            pipeline("video-timeline", model=str(saved_model), **kwargs)([str(clip_path)] * 2)


def test_a_broken_file_is_an_error_naming_it(saved_model, tmp_path):
    from evl_hf import EVLVideoDecodingError

    model, processor = load(saved_model)
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all" * 10)
    with pytest.raises(EVLVideoDecodingError, match="broken.mp4"):
        video_timeline(model, processor, str(tmp_path / "broken.mp4"))
    with pytest.raises(EVLVideoDecodingError, match="missing.mp4: no such file"):
        video_timeline(model, processor, str(tmp_path / "missing.mp4"))


@pytest.mark.parametrize("family", ["siglip", "dinov2", "dinov2_with_registers", "vit"])
def test_other_backbone_families(tmp_path, clip_path, family):
    from transformers import Dinov2Config, Dinov2WithRegistersConfig, SiglipVisionConfig, ViTConfig

    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, patch_size=8)
    vision = {
        "siglip": lambda: SiglipVisionConfig(image_size=32, **shape),
        "dinov2": lambda: Dinov2Config(image_size=48, **shape),
        "dinov2_with_registers": lambda: Dinov2WithRegistersConfig(image_size=48, num_register_tokens=2, **shape),
        "vit": lambda: ViTConfig(image_size=32, **shape),
    }[family]()
    base = tiny_config(id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    directory = save_model(tmp_path / family, EVLConfig(**{**base.to_diff_dict(), "vision_config": vision, "image_size": 32}))
    model, processor = load(directory)
    windows = video_timeline(model, processor, str(clip_path), window_stride=5, backbone_batch_size=6)
    for window in windows:
        expected = logits_on_frames(model, processor, str(clip_path), window.frame_indices)
        torch.testing.assert_close(window.logits, expected, atol=1e-5, rtol=1e-5)


def test_temporal_modules_off_and_a_bfloat16_backbone(tmp_path, clip_path):
    base = dict(id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    off = save_model(tmp_path / "off", tiny_config(use_temporal_cross_attention=False, use_temporal_conv=False, **base))
    model, processor = load(off)
    for window in video_timeline(model, processor, str(clip_path), window_stride=6):
        torch.testing.assert_close(
            window.logits, logits_on_frames(model, processor, str(clip_path), window.frame_indices), atol=1e-5, rtol=1e-5
        )
    low = save_model(tmp_path / "bf16", tiny_config(backbone_dtype="bfloat16", **base))
    model, processor = load(low)
    for window in video_timeline(model, processor, str(clip_path), window_stride=6, backbone_batch_size=5):
        # The maps' scores in bf16, as the model computes them under no_grad (logits_on_frames).
        torch.testing.assert_close(
            window.logits, logits_on_frames(model, processor, str(clip_path), window.frame_indices), atol=1e-3, rtol=0
        )


@pytest.mark.parametrize("backbone_dtype, autocast_dtype", [("float16", torch.bfloat16), ("bfloat16", torch.float16)])
def test_a_half_precision_backbone_under_autocast_to_the_other_one(tmp_path, clip_path, backbone_dtype, autocast_dtype):
    # The backbone and its maps compute in the backbone's dtype, outside autocast, also across the timeline's chunks
    # (the previous chunk's last queries and keys are joined to the next chunk's): windows equal the model's forward,
    # up to the half-precision decoder under autocast, whose products depend on the batch (windows go 4 at a time).
    base = dict(id2label=LABELS, label2id={v: k for k, v in LABELS.items()}, backbone_dtype=backbone_dtype)
    model, processor = load(save_model(tmp_path / "half", tiny_config(**base)))
    with torch.autocast("cpu", dtype=autocast_dtype):
        windows = video_timeline(model, processor, str(clip_path), window_stride=6, backbone_batch_size=5)
        for window in windows:
            expected = logits_on_frames(model, processor, str(clip_path), window.frame_indices)
            torch.testing.assert_close(window.logits, expected, atol=5e-3, rtol=0)


def test_a_half_precision_decoder_under_autocast_to_the_other_one_is_refused_clearly(tmp_path, clip_path):
    base = dict(id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    model, processor = load(save_model(tmp_path / "model", tiny_config(**base)))
    model.to(torch.float16)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="decoder is float16.*autocast"):
        video_timeline(model, processor, str(clip_path), window_stride=6)


@pytest.mark.parametrize("window_frames", [1, 2, 3])
@pytest.mark.parametrize(
    "modules",
    [{}, {"use_temporal_conv": False}, {"use_temporal_pos_embed": False}, {"use_temporal_cross_attention": False}],
    ids=["all", "no-conv", "no-position", "no-cross-frame"],
)
def test_windows_of_any_length_with_any_temporal_modules(tmp_path, clip_path, window_frames, modules):
    """The timeline builds a window's first, interior and last frames apart (interior sums are shared between
    windows): each combination against the model on the window's frames."""
    base = dict(id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    model, processor = load(save_model(tmp_path / "model", tiny_config(**modules, **base)))
    windows = video_timeline(model, processor, str(clip_path), num_frames=window_frames, window_stride=2,
                             backbone_batch_size=5, decoder_batch_size=3)  # fmt: skip
    assert len(windows) == len(range(0, 21 - window_frames + 1, 2)) + ((21 - window_frames) % 2 != 0)
    for window in windows:
        assert len(window.frame_indices) == window_frames
        expected = logits_on_frames(model, processor, str(clip_path), window.frame_indices)
        torch.testing.assert_close(window.logits, expected, atol=1e-5, rtol=1e-5)


def test_an_offloaded_backbone_runs_and_an_offloaded_decoder_is_refused_clearly(saved_model, clip_path, tmp_path):
    """Big-model loading: the timeline calls the backbone's blocks, whose hooks load their weights, but reads the
    decoder's weights itself, outside any forward, where accelerate's hooks would not load them."""
    pytest.importorskip("accelerate")
    model, processor = load(saved_model)
    expected = [window.logits for window in video_timeline(model, processor, str(clip_path), window_stride=6)]
    head = {"fc_norm": "cpu", "dropout": "cpu", "classifier": "cpu"}
    backbone_offloaded = EVLForVideoClassification.from_pretrained(
        saved_model, device_map={"evl.vision_model": "disk", "evl.decoder": "cpu", **head},
        offload_folder=tmp_path / "backbone",
    ).eval()  # fmt: skip
    windows = video_timeline(backbone_offloaded, processor, str(clip_path), window_stride=6)
    torch.testing.assert_close([window.logits for window in windows], expected, atol=1e-6, rtol=0)
    decoder_offloaded = EVLForVideoClassification.from_pretrained(
        saved_model, device_map={"evl.vision_model": "cpu", "evl.decoder": "disk", **head},
        offload_folder=tmp_path / "decoder",
    ).eval()  # fmt: skip
    with pytest.raises(ValueError, match=r"`evl\.decoder` offloaded.*only the backbone"):
        video_timeline(decoder_offloaded, processor, str(clip_path), window_stride=6)
