# Copyright 2026 The evl-hf authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""The `video-classification` pipeline for EVL: the documented `num_frames` / `frame_sampling_rate` and batching."""

import collections.abc
import os

import torch
from torch.utils.data import DataLoader
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.pipelines.pt_utils import PipelineDataset, PipelineIterator
from transformers.pipelines.video_classification import VideoClassificationPipeline
from transformers.utils import logging

from .modeling_evl import problem_type_without_labels
from .video_processing_evl import EVLVideoProcessor


logger = logging.get_logger(__name__)

TASK = "video-classification"


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def scoring_function(config, function_to_apply: str | None) -> str | None:
    """The pipelines' `function_to_apply`: the one given, else "none" for a model that trains as a regression without
    saying so (one output, no `problem_type`), where transformers' pipeline would take a softmax of the one logit
    (1.0 for every video); otherwise transformers' default, from `problem_type`."""
    if function_to_apply is None and problem_type_without_labels(config) == "regression":
        return "none"
    return function_to_apply


def _collate_videos(items: list) -> dict:
    """Concatenate the `(1, ...)` tensors of single processed videos into a batch."""
    shapes = {tuple(item["pixel_values"].shape[1:]) for item in items}
    if len(shapes) > 1:
        raise ValueError(
            f"Cannot batch videos whose processed `pixel_values` differ in shape ({sorted(shapes)}); this happens "
            "when frames are not sampled to one length or not cropped to one size. Use batch_size=1."
        )
    return {key: torch.cat([item[key] for item in items]) for key in items[0].keys()}


class EVLVideoClassificationPipeline(VideoClassificationPipeline):
    """
    transformers' `VideoClassificationPipeline`, with the arguments it documents working for EVL's video processor.
    `import evl_hf` makes it the `"video-classification"` pipeline; models whose video processor is not an
    `EVLVideoProcessor` get exactly transformers' pipeline.

    For EVL:

    - `num_frames` (a positive integer) is the frames per clip; by default the video processor's (the checkpoint's
      setting) rather than `model.config.num_frames`, so the pipeline and `processor(video)` give the same input.
    - `frame_sampling_rate` (a positive integer) is the stride between the frames of a dense window: the processor's
      `sampling_rate`, by default the checkpoint's (the authors use 16, or 8 for 32 frames), not transformers' 1.
      A processor that samples uniformly (`frame_sampling="uniform"`) has no stride: giving it is an error.
    - `batch_size` batches the processed clips (a multi-view processor's views stay inside each clip).
    - `save_pretrained` also saves the video processor (transformers' saves tokenizers, feature extractors and image
      processors only), so the saved folder loads as a pipeline again.

    ```python
    >>> import evl_hf  # registers this pipeline  # doctest: +SKIP
    >>> from transformers import pipeline

    >>> classifier = pipeline("video-classification", model="path/to/evl-checkpoint")  # doctest: +SKIP
    >>> classifier(["a.mp4", "b.mp4"], frame_sampling_rate=8, batch_size=2, top_k=3)  # doctest: +SKIP
    ```
    """

    def _is_evl(self) -> bool:
        return isinstance(self.video_processor, EVLVideoProcessor)

    def _sanitize_parameters(self, top_k=None, num_frames=None, frame_sampling_rate=None, function_to_apply=None):
        if not self._is_evl():
            return super()._sanitize_parameters(
                top_k=top_k, num_frames=num_frames, frame_sampling_rate=frame_sampling_rate,
                function_to_apply=function_to_apply,
            )  # fmt: skip
        if num_frames is not None:
            _check_positive_int("num_frames", num_frames)
        if frame_sampling_rate is not None:
            _check_positive_int("frame_sampling_rate", frame_sampling_rate)
            # A call's frame count, else the one the pipeline was built with (not yet set while it is built).
            pipeline_num_frames = getattr(self, "_preprocess_params", {}).get("num_frames")
            if self.video_processor.fps is not None and num_frames is None and pipeline_num_frames is None:
                raise ValueError(
                    f"This video processor samples by time (fps={self.video_processor.fps}), which has no stride: "
                    "give `num_frames` too, or load the processor without `fps`, to use `frame_sampling_rate`."
                )
            if self.video_processor.frame_sampling != "dense":
                raise ValueError(
                    f"`frame_sampling_rate` is the stride of dense sampling, but this video processor samples frames "
                    f"with frame_sampling={self.video_processor.frame_sampling!r}, which has no stride. Load the "
                    "processor with frame_sampling='dense' to use it."
                )
        if top_k is not None:
            _check_positive_int("top_k", top_k)
        # transformers' parameters, with ours checked: the base class validates `function_to_apply`.
        return super()._sanitize_parameters(
            top_k=top_k, num_frames=num_frames, frame_sampling_rate=frame_sampling_rate,
            function_to_apply=function_to_apply,
        )  # fmt: skip

    def __call__(self, inputs, **kwargs):
        # A list of N videos gives N results, none for an empty list: transformers' `Pipeline.__call__` reads its
        # first item.
        if isinstance(inputs, list) and not inputs:
            return []
        return super().__call__(inputs, **kwargs)

    __call__.__doc__ = VideoClassificationPipeline.__call__.__doc__

    def preprocess(self, video, num_frames=None, frame_sampling_rate=None):
        if not self._is_evl():
            return super().preprocess(video, num_frames=num_frames, frame_sampling_rate=frame_sampling_rate or 1)
        # The metadata a processor may be saved to return are no model input (and do not batch).
        kwargs = {"do_sample_frames": True, "return_metadata": False}
        if num_frames is not None:
            kwargs["num_frames"] = num_frames
        if frame_sampling_rate is not None:
            kwargs["sampling_rate"] = frame_sampling_rate
        processed = self.video_processor(video, return_tensors="pt", **kwargs).to(self.dtype)
        if len(processed["pixel_values"]) != 1:
            # The pipeline returns one result per input: the other clips would be dropped, or, batched, scored as
            # the next inputs.
            raise ValueError(
                f"One input holds {len(processed['pixel_values'])} videos: give each video as an item of a list (a "
                "tuple or list of videos, or an array of several clips, is read as several videos)."
            )
        return processed

    def _forward(self, model_inputs):
        if not self._is_evl():
            return super()._forward(model_inputs)
        # `postprocess` reads the logits by name, also from a model loaded with `return_dict=False`.
        return self.model(**model_inputs, return_dict=True)

    def postprocess(self, model_outputs, top_k=5, function_to_apply=None):
        if self._is_evl():
            function_to_apply = scoring_function(self.model.config, function_to_apply)
        return super().postprocess(model_outputs, top_k=top_k, function_to_apply=function_to_apply)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs):
        super().save_pretrained(save_directory, **kwargs)
        if self._is_evl() and not os.path.isfile(save_directory):
            self.video_processor.save_pretrained(save_directory, **kwargs)

    def get_iterator(
        self, inputs, num_workers: int, batch_size: int, preprocess_params, forward_params, postprocess_params
    ):
        if batch_size == 1 or not self._is_evl():
            return super().get_iterator(
                inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params
            )
        # transformers' `Pipeline.get_iterator`, whose collate function needs a tokenizer or a feature extractor to
        # batch; processed clips are fixed-size tensors and are concatenated.
        if isinstance(inputs, collections.abc.Sized):
            dataset = PipelineDataset(inputs, self.preprocess, preprocess_params)
        else:
            if num_workers > 1:
                logger.warning(
                    "For iterable dataset using num_workers>1 is likely to result in errors since everything is "
                    "iterable, setting `num_workers=1` to guarantee correctness."
                )
                num_workers = 1
            dataset = PipelineIterator(inputs, self.preprocess, preprocess_params)
        dataloader = DataLoader(dataset, num_workers=num_workers, batch_size=batch_size, collate_fn=_collate_videos)
        model_iterator = PipelineIterator(dataloader, self.forward, forward_params, loader_batch_size=batch_size)
        return PipelineIterator(model_iterator, self.postprocess, postprocess_params)


def register_pipeline() -> None:
    """Make `EVLVideoClassificationPipeline` the `"video-classification"` pipeline (what `import evl_hf` does)."""
    builtin = PIPELINE_REGISTRY.supported_tasks[TASK]
    if builtin["impl"] is EVLVideoClassificationPipeline:
        return
    # `register_pipeline` warns that it overwrites a built-in task: expected here, and silenced.
    registry_logger = logging.get_logger("transformers.pipelines.base")
    level = registry_logger.level
    registry_logger.setLevel(logging.ERROR)
    try:
        PIPELINE_REGISTRY.register_pipeline(
            TASK, pipeline_class=EVLVideoClassificationPipeline, pt_model=builtin["pt"], default=builtin.get("default"),
            type=builtin.get("type"),
        )  # fmt: skip
    finally:
        registry_logger.setLevel(level)
    # `register_pipeline` also marks the class as Hub custom code (`_registered_impl`): `Pipeline.save_pretrained`
    # would then write `custom_pipelines` into config.json, and `pipeline()` would demand `trust_remote_code=True`
    # for that checkpoint even where evl-hf is installed. This pipeline is installed code, not Hub code.
    del EVLVideoClassificationPipeline._registered_impl


__all__ = ["EVLVideoClassificationPipeline", "register_pipeline"]
