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
"""
Labels over time for long videos: overlapping windows of the checkpoint's own sampling (frames x stride), sharing the
backbone's work. EVL's backbone sees every frame alone and its cross-frame maps pair neighbouring frames only, so a
sampled frame goes through the backbone once and each neighbouring pair's maps are computed once, whatever the
windows' overlap; only the light decoder runs per window. `import evl_hf` registers the `"video-timeline"` pipeline.

    python -m evl_hf.timeline VIDEO --model DIR [--window_stride S] [--top_k K] --output timeline.json [--plot timeline.png]
"""

import argparse
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForVideoClassification, PreTrainedConfig
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.pipelines.video_classification import VideoClassificationPipeline
from transformers.utils import logging

from ..devices import device_argument
from ..explain import in_evaluation_mode, load_model_and_processor, top_predictions
from ..modeling_evl import EVLForVideoClassification, _backbone_autocast, cross_frame_attention_maps
from ..output_paths import check_output_path, figure_format
from ..pipeline_evl import scoring_function
from ..video_decoding_evl import EVLVideoDecodingError, VideoFrameStream, _video_name, decode_video
from ..video_processing_evl import EVLVideoProcessor, sample_frame_indices


logger = logging.get_logger(__name__)

TASK = "video-timeline"
# Above this many sampled frames (about a minute at 25 fps and a stride of 16) a progress bar is shown.
_PROGRESS_MIN_FRAMES = 100


@dataclass
class EVLTimelineWindow:
    """One window of a timeline: its decoded-frame indices, its span in seconds and the model's logits."""

    frame_indices: list[int]
    start: float
    end: float
    logits: torch.Tensor


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


class _HeldFrames:
    """
    One per-frame quantity of consecutive sampled frames, `(frames, K, tokens, hidden)`, in a buffer reused from chunk
    to chunk: a chunk's frames are written once, after the frames kept, instead of concatenated into a fresh tensor
    (at these sizes a fresh tensor per chunk costs a copy of everything held and a page fault per 4 kB).
    """

    def __init__(self, reserve: int = 0):
        self.buffer: torch.Tensor | None = None
        self.length = 0
        self.reserve = reserve  # room for this many more frames whenever the buffer grows

    @property
    def frames(self) -> torch.Tensor:
        return self.buffer[: self.length]

    def drop_first(self, count: int) -> None:
        keep = self.length - count
        if keep > 0:
            kept = self.buffer[count : self.length]
            self.buffer[:keep] = kept.clone() if count < keep else kept  # the frames still needed: a few
        self.length = max(keep, 0)

    def append(self, blocks: list[torch.Tensor], dtype: torch.dtype, count: int | None = None) -> None:
        """Append `count` frames given per block: `blocks[k]` is `(n, tokens, hidden)`, converted to `dtype`; frames
        past the `n` given (`count` > n) are zeros."""
        count = len(blocks[0]) if count is None else count
        if self.buffer is None or self.length + count > len(self.buffer):
            size = self.length + count + self.reserve
            grown = blocks[0].new_empty((size, len(blocks), *blocks[0].shape[1:]), dtype=dtype)
            if self.length:
                grown[: self.length] = self.frames
            self.buffer = grown
        new = self.buffer[self.length : self.length + count]
        for index, block in enumerate(blocks):
            new[: len(block), index] = block
        new[len(blocks[0]) :] = 0
        self.length += count


class _SharedBackboneTimeline:
    """
    The streaming state of one video: what the decoder reads of the frames still needed, the last frame's q/k, and the
    windows waiting for the decoder.

    Per held sampled frame, in tensors over consecutive frames (so a batch of evenly spaced windows is a strided view,
    not a copy): each block's output; with cross-frame attention, the cross-frame module's features from the frame's
    map towards the previous and towards the next sampled frame (the module is linear in each map; the next one is
    filled when the next frame arrives); and, for windows of more than 2 frames, the sum a window's interior frame
    reads. A window's first frame leaves out the previous frame's terms and its last frame the next one's.
    """

    def __init__(self, model: EVLForVideoClassification, num_frames: int, window_stride: int, decoder_batch_size: int):
        self.model, self.evl = model, model.evl
        self.num_frames, self.window_stride, self.decoder_batch_size = num_frames, window_stride, decoder_batch_size
        # Pending windows are decoded before a full batch once the frames since the oldest one's start exceed this,
        # so that the frames held stay bounded by a batch's frames, whatever `window_stride`.
        self.max_pending_span = decoder_batch_size * num_frames
        self.first_held = 0  # the sampled index of the first held frame
        # Held besides a chunk: at most the frames of the pending windows and the last window's.
        reserve = self.max_pending_span + num_frames
        self.features = _HeldFrames(reserve)  # each block's output
        self.from_previous, self.from_next = _HeldFrames(reserve), _HeldFrames(reserve)  # cross-frame features
        # A window's interior frames (all but its first and last) see both neighbours: their features with the
        # temporal conv and both cross-frame directions added are the same in every window, so they are summed once
        # per frame; a window adds its position embedding, and builds its first and last frames itself.
        self.interior = _HeldFrames(reserve)
        self.interior_done = 1  # interior sums exist for sampled frames 1 .. interior_done - 1
        # One decoder layer's keys/values for a batch of windows, rewritten for each layer and batch (reused for the
        # same reason as the buffers).
        self.memory_workspace: torch.Tensor | None = None
        self.num_sampled = 0
        self.next_start = 0  # the next regular window's first sampled frame
        self.pending: list[int] = []  # starts of complete windows not yet decoded
        self.last_query_key: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.stats = {"frames_through_backbone": 0, "frame_pairs": 0, "windows": 0, "max_buffered_frames": 0}
        self.maps_dtype = self.evl.reduced_precision_inference_dtype() or self.evl.decoder.query.dtype
        self.modules = [layer.cross_frame_attention for layer in self.evl.decoder.layers]

    def add_frames(self, pixel_values: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """Run the backbone on the next consecutive sampled frames `(n, C, H, W)`; yield `(start, logits)` of windows
        done."""
        self.evl.check_pixel_values(pixel_values[None])
        self.evl.check_autocast()
        block_outputs, queries, keys = self.evl._run_backbone(pixel_values.to(self.model.device))
        self.stats["frames_through_backbone"] += len(pixel_values)
        cross = self._cross_frame_features(queries, keys) if queries else None
        del queries, keys
        self._forget_frames()
        dtype = self.evl.decoder.query.dtype
        self.features.append(block_outputs, dtype)
        if cross is not None:
            from_previous, from_next, previous_from_next = cross
            if previous_from_next is not None:
                self.from_next.frames[-1] = torch.stack(previous_from_next)
            self.from_previous.append(from_previous, dtype)
            self.from_next.append(from_next, dtype, count=len(pixel_values))
        self.num_sampled += len(pixel_values)
        if self.num_frames > 2:
            self.interior.append([output[:0] for output in block_outputs], dtype, count=len(pixel_values))
            self._sum_interior_frames()
        self.stats["max_buffered_frames"] = max(self.stats["max_buffered_frames"], self.features.length)
        while self.next_start + self.num_frames <= self.num_sampled:
            self.pending.append(self.next_start)
            self.next_start += self.window_stride
        # The oldest pending window holds every frame after its start: decoded once those exceed the span a full
        # batch of windows would hold, whatever the stride.
        while self.pending and (
            len(self.pending) >= self.decoder_batch_size or self.num_sampled - self.pending[0] > self.max_pending_span
        ):
            yield from self._decode(self.decoder_batch_size)

    def _cross_frame_features(self, queries: list, keys: list):
        """The maps of every new neighbouring pair (the previous chunk's last frame and this chunk's first included),
        each computed once, turned into each new frame's cross-frame features by direction: `(from_previous,
        from_next, previous_from_next)`, per block: `(n, tokens, hidden)`, `(n - 1, tokens, hidden)` (the last
        new frame's is computed with the next chunk) and the previous chunk's last frame's `(tokens, hidden)`, or
        `None` for the first chunk."""
        has_previous = self.num_sampled > 0
        from_previous, from_next, previous_from_next = [], [], []
        for layer, (query, key) in enumerate(zip(queries, keys)):
            with _backbone_autocast(query.device.type, query.dtype):  # as in the model's forward
                if has_previous:
                    query = torch.cat([self.last_query_key[layer][0], query])
                    key = torch.cat([self.last_query_key[layer][1], key])
                maps = cross_frame_attention_maps(query[None], key[None], self.model.config.num_prefix_tokens)
            maps = maps.to(self.maps_dtype)
            module = self.modules[layer]
            # The last new frame's next map is all zeros until the next chunk: computed then, with the previous
            # chunk's last frame's, which comes first here.
            towards_next = module.direction_features(maps[:, :-1, 1], 1)[0]
            if has_previous:
                previous_from_next.append(towards_next[0])
                towards_next, maps = towards_next[1:], maps[:, 1:]
            from_previous.append(module.direction_features(maps[:, :, 0], 0)[0])
            from_next.append(towards_next)
        self.stats["frame_pairs"] += len(queries[0]) - (not has_previous)
        self.last_query_key = [(query[-1:], key[-1:]) for query, key in zip(queries, keys)]
        return from_previous, from_next, previous_from_next if has_previous else None

    def finish(self) -> Iterator[tuple[int, torch.Tensor]]:
        """The remaining windows, and one ending at the last sampled frame where the regular ones stop short of it."""
        last_start = self.num_sampled - self.num_frames
        covered = self.next_start - self.window_stride
        if last_start > covered:
            self.pending.append(last_start)
        while self.pending:
            yield from self._decode(self.decoder_batch_size)

    def _windows(self, held: torch.Tensor, starts: list[int]) -> torch.Tensor:
        """`(windows, num_frames, ...)` of `held` at these sampled starts: a strided view where they are evenly
        spaced (consecutive windows overlap in memory as in time), a copy otherwise."""
        offsets = [start - self.first_held for start in starts]
        steps = {b - a for a, b in zip(offsets, offsets[1:])}
        if len(steps) <= 1:
            step = steps.pop() if steps else 1
            frame = held.stride(0)
            view = held[offsets[0] :]
            return view.as_strided((len(offsets), self.num_frames, *held.shape[1:]), (step * frame, *held.stride()))
        index = torch.tensor(offsets, device=held.device)[:, None] + torch.arange(self.num_frames, device=held.device)
        return held[index]

    def _sum_interior_frames(self) -> None:
        """For each frame whose next frame has arrived: features + temporal conv (both neighbours) + both cross-frame
        directions, per block, as a window's interior frame has them (before its position embedding)."""
        first, last = self.interior_done, self.num_sampled - 2
        if last < first:
            return
        start, stop = first - self.first_held, last + 1 - self.first_held  # in the held buffers
        features = self.features.frames
        for index, layer in enumerate(self.evl.decoder.layers):
            output = self.interior.frames[start:stop, index]
            frames = features[start - 1 : stop + 1, index]  # with each frame's neighbours
            if layer.temporal_conv is not None:
                # The layer's own convolution over them, as one clip: its inner frames see both neighbours.
                output.copy_(layer.temporal_conv(frames[None], add_input=True)[0, 1:-1])
            else:
                output.copy_(frames[1:-1])
            if layer.cross_frame_attention is not None:
                output.add_(self.from_previous.frames[start:stop, index]).add_(self.from_next.frames[start:stop, index])
        self.interior_done = last + 1

    def _edge_frame(self, layer, index: int, features, from_previous, from_next, t: int, output) -> None:
        """A window's first (`t == 0`) or last frame into `output`: its conv and cross-frame attention see only the
        neighbour inside the window; the same additions in the same order as the decoder layer."""
        num_frames = self.num_frames
        frame = features[:, t, index]
        neighbour = None if num_frames == 1 else features[:, 1 if t == 0 else num_frames - 2, index]
        if layer.temporal_conv is not None:
            # `EVLTemporalConv` over (frame, neighbour) computes the same, and the neighbour's output too: written out
            # here, once per window and layer, into the workspace.
            previous, current, following = layer.temporal_conv.taps(frame.dtype)
            torch.addcmul(layer.temporal_conv.conv.bias.to(frame.dtype), frame, current, out=output)
            if neighbour is not None:
                output.addcmul_(neighbour, following if t == 0 else previous)
            output.add_(frame)
        else:
            output.copy_(frame)
        if layer.temporal_position_embedding is not None:
            output.add_(layer.temporal_position_embedding(num_frames)[t])
        if layer.cross_frame_attention is not None and neighbour is not None:
            output.add_(from_next[:, 0, index] if t == 0 else from_previous[:, -1, index])

    def _decode(self, count: int) -> Iterator[tuple[int, torch.Tensor]]:
        """The decoder on a batch of windows: `EVLDecoderLayer.attend` on keys/values built here from the held
        per-frame sums, then the classification head; each window's logits equal the model's on its frames. (The
        decoder layers' and the model's own forward, and hooks on them, are not called.)"""
        starts, self.pending = self.pending[:count], self.pending[count:]
        num_windows, num_frames = len(starts), self.num_frames
        features = self._windows(self.features.frames, starts)  # (W, T, K, tokens, hidden)
        from_previous = from_next = interior = None
        if self.model.config.use_temporal_cross_attention and num_frames > 1:
            from_previous = self._windows(self.from_previous.frames, starts)
            from_next = self._windows(self.from_next.frames, starts)
        if num_frames > 2:
            interior = self._windows(self.interior.frames, starts)
        shape = (num_windows, num_frames, *features.shape[3:])
        if self.memory_workspace is None or len(self.memory_workspace) < num_windows:
            self.memory_workspace = features.new_empty(shape)
        memory = self.memory_workspace[:num_windows]
        query = self.evl.decoder.query.view(1, 1, -1).expand(num_windows, 1, -1)
        for index, layer in enumerate(self.evl.decoder.layers):
            if interior is not None:
                if layer.temporal_position_embedding is not None:
                    position = layer.temporal_position_embedding(num_frames)[1:-1, None, :]
                    torch.add(interior[:, 1:-1, index], position, out=memory[:, 1:-1])
                else:
                    memory[:, 1:-1] = interior[:, 1:-1, index]
            for t in {0, num_frames - 1}:
                self._edge_frame(layer, index, features, from_previous, from_next, t, memory[:, t])
            query, _ = layer.attend(query, memory)
        logits = self.model.classify(query[:, 0])
        self.stats["windows"] += num_windows
        for start, window_logits in zip(starts, logits):
            yield start, window_logits

    def _forget_frames(self) -> None:
        # Kept: frames of windows not decoded yet, and the last `num_frames` (the closing window may need them).
        keep_from = min([*self.pending, self.next_start, max(0, self.num_sampled - self.num_frames)])
        drop = keep_from - self.first_held
        if drop > 0:
            for held in (self.features, self.from_previous, self.from_next, self.interior):
                held.drop_first(drop)
            self.first_held = keep_from


def window_frame_sampling_rate(processor: EVLVideoProcessor, frame_sampling_rate: int | None = None) -> int:
    """The decoded frames between two sampled frames of the timeline's windows: `frame_sampling_rate` where given,
    else the processor's fixed stride. A processor that samples uniformly or by fps has none (its stride depends on the
    video): a `ValueError` then asks for one."""
    if frame_sampling_rate is not None:
        return frame_sampling_rate
    if processor.frame_sampling != "dense" or processor.fps is not None or processor.sampling_rate is None:
        raise ValueError(
            "This video processor does not sample frames at a fixed stride (frame_sampling="
            f"{processor.frame_sampling!r}, fps={processor.fps}): give `frame_sampling_rate`, the decoded frames "
            "between two sampled ones, for the timeline's windows."
        )
    return processor.sampling_rate


def video_timeline(
    model: EVLForVideoClassification,
    processor: EVLVideoProcessor,
    video,
    window_stride: int = 1,
    frame_sampling_rate: int | None = None,
    num_frames: int | None = None,
    backbone_batch_size: int = 8,
    decoder_batch_size: int = 4,
    progress: bool | None = None,
    stats: dict | None = None,
) -> list[EVLTimelineWindow]:
    """
    The model's logits for every window of `video` (a path, URL, bytes or file object), in time order.

    Windows are `num_frames` sampled frames `frame_sampling_rate` decoded frames apart (by default the processor's:
    the checkpoint's own sampling); consecutive windows start `window_stride` sampled frames apart, from the first
    frame, plus one window ending at the last sampled frame where the regular ones stop short of it. A video shorter
    than one window gives one window, sampled as the processor samples it (its last frame repeated). Each window's
    logits equal the model's on exactly its frames (`processor` on those frames, one centred view). `start` / `end`
    are the times of the window's first frame and of the end of its last (`(index + 1) / fps`).

    The video is decoded once, front to back; frames go through the backbone in batches of `backbone_batch_size`,
    windows through the decoder in batches of `decoder_batch_size`, and only the frames of windows not decoded yet
    are held: memory does not grow with the video's length. `progress`: a progress bar (default: for videos of more
    than 100 sampled frames). `stats`, when given, receives `frames_through_backbone`, `frame_pairs` (pairs whose
    cross-frame maps were computed), `windows` and `max_buffered_frames`. The model is run in evaluation mode and
    left in the mode it had.
    """
    from tqdm.auto import tqdm

    if not isinstance(model, EVLForVideoClassification):
        raise ValueError(f"The video timeline runs EVL models (EVLForVideoClassification), not {type(model).__name__}.")
    if not isinstance(processor, EVLVideoProcessor):
        raise ValueError(f"The video timeline needs an EVLVideoProcessor, not {type(processor).__name__}.")
    # Offloaded weights (big-model loading: `device_map` to "disk", or to "cpu" beside an accelerator) wait on the
    # meta device for their module's forward; the timeline reads the decoder's itself, outside any forward.
    if any(parameter.is_meta for parameter in model.evl.decoder.parameters()):
        raise ValueError(
            "The video timeline reads the decoder's weights itself, outside the model's forward, so it cannot run a "
            "model loaded with `evl.decoder` offloaded (its weights are on the meta device); only the backbone can be "
            'offloaded here, e.g. device_map={"evl.decoder": 0, "fc_norm": 0, "dropout": 0, "classifier": 0, '
            '"evl.vision_model": "disk"} (a device first: pipelines run on the first).'
        )
    num_frames = processor.num_frames if num_frames is None else num_frames
    frame_sampling_rate = window_frame_sampling_rate(processor, frame_sampling_rate)
    for name, value in (("window_stride", window_stride), ("frame_sampling_rate", frame_sampling_rate),
                        ("num_frames", num_frames), ("backbone_batch_size", backbone_batch_size),
                        ("decoder_batch_size", decoder_batch_size)):  # fmt: skip
        _check_positive_int(name, value)
    num_frames, frame_sampling_rate, window_stride = int(num_frames), int(frame_sampling_rate), int(window_stride)
    # One centred view of every frame, whatever views the checkpoint evaluates with.
    # Decoded frames are channels-last (a stack of frames 1 or 3 pixels tall would be guessed channels-first).
    single_view = {"num_temporal_views": 1, "num_spatial_views": 1, "do_sample_frames": False, "return_tensors": "pt",
                   "input_data_format": "channels_last"}  # fmt: skip

    def prepare(frames: list[np.ndarray]) -> torch.Tensor:
        return processor(np.stack(frames), **single_view)["pixel_values"][0].to(model.dtype)

    done: list[tuple[int, torch.Tensor]] = []
    decoded_indices, chunk = [], []
    with torch.inference_mode(), in_evaluation_mode(model), VideoFrameStream(video, frame_sampling_rate) as stream:
        # Built under inference mode: the maps' dtype follows a bf16/fp16 backbone only without autograd.
        timeline = _SharedBackboneTimeline(model, num_frames, window_stride, decoder_batch_size)
        fps = stream.fps or 1.0
        expected = -(-stream.total_num_frames // frame_sampling_rate) if stream.total_num_frames else None
        show = progress if progress is not None else (expected or 0) > _PROGRESS_MIN_FRAMES
        with tqdm(total=expected, desc="Timeline", unit="frame", disable=not show) as bar:
            for index, frame in stream:
                decoded_indices.append(index)
                chunk.append(frame)
                # Held back until the video is known to fill one window (a shorter one is sampled differently).
                if len(chunk) >= backbone_batch_size and len(decoded_indices) >= num_frames:
                    done.extend(timeline.add_frames(prepare(chunk)))
                    bar.update(len(chunk))
                    chunk = []
            if chunk and len(decoded_indices) >= num_frames:
                done.extend(timeline.add_frames(prepare(chunk)))
                bar.update(len(chunk))
        if len(decoded_indices) < num_frames:
            # Shorter than one window: decoded again as the processor samples it (the video's last frame repeated,
            # which the stream, keeping every `frame_sampling_rate`-th frame, may not have kept).
            def sample(metadata):
                return sample_frame_indices(metadata.total_num_frames, num_frames, frame_sampling_rate)

            source = stream.reread_source()  # a file object rewound, a URL's download (not fetched twice)
            if source is None:
                raise EVLVideoDecodingError(
                    f"{_video_name(video)}: shorter than one window ({len(decoded_indices)} sampled frames of "
                    f"{num_frames}), so it is sampled again as the processor samples it, but this file object "
                    "cannot be rewound to read it again: pass a path, bytes or a seekable file object."
                )
            frames, metadata = decode_video(source, sample, backend="pyav")
            indices = [int(i) for i in metadata.frames_indices]
            pixel_values = prepare(list(frames))[None].to(model.device)
            logits = model(pixel_values=pixel_values, return_dict=True).logits[0]  # whatever `config.return_dict`
            windows = [EVLTimelineWindow(indices, indices[0] / fps, (indices[-1] + 1) / fps, logits)]
            timeline.stats.update(frames_through_backbone=num_frames, windows=1)
        else:
            done.extend(timeline.finish())
            windows = []
            for start, logits in sorted(done, key=lambda item: item[0]):
                indices = decoded_indices[start : start + num_frames]
                windows.append(EVLTimelineWindow(indices, indices[0] / fps, (indices[-1] + 1) / fps, logits))
    for window in windows:
        # Copied out of inference mode: ordinary tensors, as the model's forward under `no_grad` returns (an
        # inference tensor cannot be changed in place, nor saved for a backward, e.g. as a distillation target).
        window.logits = window.logits.clone()
    if stats is not None:
        stats.update(timeline.stats)
    return windows


class EVLVideoTimelinePipeline(VideoClassificationPipeline):
    """
    The `"video-timeline"` pipeline (registered by `import evl_hf`): labels over time for a long video.

    `pipeline("video-timeline", model=DIR_OR_ID)(video, window_stride=1, top_k=5)` returns the windows in time order,
    each `{"start": seconds, "end": seconds, "frame_indices": [...], "labels": [{"label", "score"}, ...]}`. Windows
    use the checkpoint's own sampling (its video processor's `num_frames` frames, `sampling_rate` apart);
    `window_stride` counts sampled frames between consecutive window starts. See `video_timeline` for the windows,
    `frame_sampling_rate`, `backbone_batch_size`, `decoder_batch_size` and `progress`; `top_k` and
    `function_to_apply` are the video-classification pipeline's.

    ```python
    >>> import evl_hf  # registers the pipeline  # doctest: +SKIP
    >>> from transformers import pipeline

    >>> timeline = pipeline("video-timeline", model="path/to/evl-checkpoint")  # doctest: +SKIP
    >>> windows = timeline("film.mp4", window_stride=4, top_k=3)  # doctest: +SKIP
    >>> windows[0]["start"], windows[0]["labels"][0]["label"]  # doctest: +SKIP
    ```
    """

    _load_video_processor = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.model, EVLForVideoClassification) or not isinstance(self.video_processor, EVLVideoProcessor):
            raise ValueError(
                "The video-timeline pipeline shares the backbone's work between windows, which only EVL models with an "
                f"EVLVideoProcessor allow; got {type(self.model).__name__} with {type(self.video_processor).__name__}."
            )

    def _sanitize_parameters(self, top_k=None, function_to_apply=None, **forward_params):
        allowed = {"window_stride", "frame_sampling_rate", "num_frames", "backbone_batch_size", "decoder_batch_size",
                   "progress"}  # fmt: skip
        unknown = sorted(set(forward_params) - allowed)
        if unknown:
            raise TypeError(f"Unknown arguments for the video-timeline pipeline: {', '.join(unknown)}.")
        if top_k is not None:
            _check_positive_int("top_k", top_k)
        _, _, postprocess_params = super()._sanitize_parameters(top_k=top_k, function_to_apply=function_to_apply)
        return {}, forward_params, postprocess_params

    def __call__(self, inputs, **kwargs):
        """Label `inputs` (a video, or a list of videos) over time: a list of windows per video (see the class)."""
        if inputs is None:
            raise ValueError("Cannot call the video-timeline pipeline without a video.")
        if isinstance(inputs, list) and not inputs:
            return []  # one timeline per video; transformers' `Pipeline.__call__` reads the first item
        # One video at a time, decoded while the model runs: the work is batched inside it, by frames and windows.
        # As transformers resolves them: an argument given as None falls back to the pipeline's own.
        batch_size = kwargs.get("batch_size") if kwargs.get("batch_size") is not None else self._batch_size
        if batch_size not in (None, 1):
            raise ValueError(
                f"The video-timeline pipeline labels one video at a time (got batch_size={batch_size}); it batches "
                "within a video: `backbone_batch_size` frames through the backbone, `decoder_batch_size` windows "
                "through the decoder."
            )
        num_workers = kwargs.get("num_workers") if kwargs.get("num_workers") is not None else self._num_workers
        if num_workers not in (None, 0):
            raise ValueError(
                f"The video-timeline pipeline decodes each video while the model runs, in the calling process (got "
                f"num_workers={num_workers}): DataLoader workers have nothing to do; leave num_workers unset."
            )
        return super(VideoClassificationPipeline, self).__call__(inputs, **kwargs)

    def save_pretrained(self, save_directory, **kwargs):
        # transformers' Pipeline.save_pretrained does not save a video processor: without it the folder cannot load.
        super().save_pretrained(save_directory, **kwargs)
        self.video_processor.save_pretrained(save_directory, **kwargs)

    def preprocess(self, video):
        return {"video": video}  # decoded while the backbone runs, in `_forward`

    def _forward(self, model_inputs, **forward_params):
        return {"windows": video_timeline(self.model, self.video_processor, model_inputs["video"], **forward_params)}

    def postprocess(self, model_outputs, top_k=5, function_to_apply=None):
        function_to_apply = scoring_function(self.model.config, function_to_apply)
        return [
            {
                "start": window.start,
                "end": window.end,
                "frame_indices": window.frame_indices,
                "labels": super(EVLVideoTimelinePipeline, self).postprocess(
                    ImageClassifierOutput(logits=window.logits[None].float()), top_k, function_to_apply
                ),
            }
            for window in model_outputs["windows"]
        ]


def _labelled_window(window: EVLTimelineWindow, config: PreTrainedConfig | None) -> dict:
    """A `video_timeline` window as the pipeline gives it: every class with its score, as the pipeline scores it."""
    config = config if config is not None else PreTrainedConfig(num_labels=window.logits.numel())
    labels, scores = top_predictions(config, window.logits, window.logits.numel())
    entries = [{"label": label, "score": score} for label, score in zip(labels, scores)]
    return {"start": window.start, "end": window.end, "frame_indices": window.frame_indices, "labels": entries}


def plot_timeline(
    windows: list[dict] | list[EVLTimelineWindow],
    output_path: str | Path | None = None,
    num_classes: int = 5,
    config: PreTrainedConfig | None = None,
):
    """
    The scores of the `num_classes` classes with the highest peak score over time, one line each, drawn at each
    window's centre; saved to `output_path` (PNG) when given. Returns the matplotlib `Figure`.

    `windows`: the `"video-timeline"` pipeline's, or `video_timeline`'s, whose logits are scored as the pipeline
    scores them and named by `config` (the model's: its `id2label` and `problem_type`); without it the classes are
    `LABEL_<index>` and the scores a softmax (the raw output of a single one).
    """
    output_format = figure_format(output_path) if output_path is not None else None  # checked before drawing
    from matplotlib.figure import Figure  # no pyplot: the user's backend is left alone

    if not windows:
        raise ValueError("No windows to plot.")
    windows = [_labelled_window(w, config) if isinstance(w, EVLTimelineWindow) else w for w in windows]
    centres = [(window["start"] + window["end"]) / 2 for window in windows]
    peaks: dict[str, float] = {}
    for window in windows:
        for entry in window["labels"]:
            peaks[entry["label"]] = max(peaks.get(entry["label"], float("-inf")), entry["score"])
    shown = sorted(peaks, key=peaks.get, reverse=True)[:num_classes]
    figure = Figure(figsize=(10, 3.5), layout="constrained")
    axes = figure.subplots()
    for label in shown:
        # A class outside a window's top-k is drawn as 0 there (the pipeline's `top_k` bounds what is known).
        scores = [next((e["score"] for e in window["labels"] if e["label"] == label), 0.0) for window in windows]
        axes.plot(centres, scores, marker="o" if len(windows) < 50 else None, markersize=3, label=label)
    axes.set_xlabel("time (s)")
    axes.set_ylabel("score (0 outside a window's top-k)")
    axes.set_xlim(windows[0]["start"], windows[-1]["end"])
    axes.set_title("Top classes over time")
    if shown:  # none for a model without a head (`num_labels=0`)
        axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    axes.grid(alpha=0.3)
    if output_path is not None:
        figure.savefig(output_path, dpi=100, format=output_format)
    return figure


def register_pipeline() -> None:
    """Register the `"video-timeline"` task (what `import evl_hf` does)."""
    if TASK in PIPELINE_REGISTRY.supported_tasks:
        return
    PIPELINE_REGISTRY.register_pipeline(
        TASK, pipeline_class=EVLVideoTimelinePipeline, pt_model=AutoModelForVideoClassification, type="video"
    )
    # As for the video-classification pipeline: installed code, not Hub custom code, so `save_pretrained` must not
    # write `custom_pipelines` into config.json (which would demand `trust_remote_code=True` to load it back).
    del EVLVideoTimelinePipeline._registered_impl


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m evl_hf.timeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("video", help="a video file or URL")
    parser.add_argument("--model", required=True, help="an EVL checkpoint: a directory or a Hub id")
    parser.add_argument("--window_stride", type=int, default=1, help="sampled frames between window starts")
    parser.add_argument("--top_k", type=int, default=5, help="labels per window")
    parser.add_argument(
        "--frame_sampling_rate",
        type=int,
        default=None,
        help="decoded frames between two sampled ones (default: the checkpoint's processor's stride; needed where "
        "that processor samples uniformly or by fps)",
    )
    parser.add_argument("--output", required=True, help="where to write the windows (JSON)")
    parser.add_argument("--plot", default=None, help="also draw the top classes' scores over time (PNG)")
    parser.add_argument("--device", default=None, type=device_argument, help="e.g. cuda:0 (default: CPU)")
    args = parser.parse_args(argv)
    for name in ("window_stride", "top_k", "frame_sampling_rate"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}.")
    check_output_path(parser, "--output", args.output)
    check_output_path(parser, "--plot", args.plot, figure=True)
    from transformers import pipeline

    try:
        # Loaded here, not by `pipeline`, which reports a loading error as a list of every class it tried.
        model, processor = load_model_and_processor(args.model)
        timeline = pipeline(TASK, model=model, video_processor=processor, device=args.device)
        sampling = {} if args.frame_sampling_rate is None else {"frame_sampling_rate": args.frame_sampling_rate}
        windows = timeline(args.video, window_stride=args.window_stride, top_k=args.top_k, **sampling)
    # The model's, the video's or the machine's, or a setting the checkpoint needs (e.g. --frame_sampling_rate for
    # a processor sampling uniformly): one line.
    except (ValueError, OSError) as error:
        parser.exit(1, f"{parser.prog}: error: {error}\n")
    try:
        Path(args.output).write_text(json.dumps(windows, indent=1))
        if args.plot:
            plot_timeline(windows, args.plot)
    except OSError as error:  # e.g. no permission, a full disk
        parser.exit(1, f"{parser.prog}: error: {error}\n")
    print(f"{len(windows)} windows from {windows[0]['start']:.2f}s to {windows[-1]['end']:.2f}s -> {args.output}")
    return windows


__all__ = [
    "EVLTimelineWindow",
    "EVLVideoTimelinePipeline",
    "main",
    "plot_timeline",
    "register_pipeline",
    "video_timeline",
    "window_frame_sampling_rate",
]
