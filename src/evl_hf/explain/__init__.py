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
Where an EVL model's decoder query reads from: its attention over the frames and patches, per decoder layer and
combined, as heatmaps over the frames the model saw (see `explain` for what the maps do and do not show).

    python -m evl_hf.explain VIDEO --model DIR --output explain.png [--animation explain.gif] [--top_k K]

`DIR` holds an `EVLForVideoClassification` and its `EVLVideoProcessor` (`save_pretrained` of both). The PNG is a grid:
one row for the layers combined, then one per decoder layer; one column per sampled frame, headed by its index in
the decoded video. The animation shows the frames with the combined heatmap.

(A package rather than a module, so that `python -m evl_hf.explain` runs its `__main__` although `import evl_hf`
has already imported this code: a plain module would be run a second time, with runpy's warning.)
"""

import argparse
import contextlib
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedConfig
from transformers.utils import is_accelerate_available, logging

from ..backbone_families import checkpoint_model_type
from ..configuration_evl import EVLConfig
from ..modeling_evl import EVLForVideoClassification, problem_type_without_labels
from ..output_paths import check_output_path, figure_format
from ..video_processing_evl import EVLVideoProcessor


logger = logging.get_logger(__name__)


# Per model in an analysis: how many analyses (in any thread) are running it, and the mode it had before the first.
_evaluation_users: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[int, bool]]" = weakref.WeakKeyDictionary()
_evaluation_users_lock = threading.Lock()


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model under `torch.compile`'s and (Distributed)DataParallel's wrappers: accelerate's unwrapping (which
    knows DeepSpeed's and FSDP's too) where it is installed; it comes with the `train` extra only."""
    if is_accelerate_available():
        from accelerate.utils import extract_model_from_parallel

        return extract_model_from_parallel(model, keep_torch_compile=False)
    while True:
        if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        elif isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


@contextlib.contextmanager
def in_evaluation_mode(model: torch.nn.Module):
    """The model in evaluation mode (a model just trained is in training mode, whose dropout changes every call's
    logits), then back in the mode it had: for analyses of a model that may be in the middle of training. The mode
    is one flag shared by every thread: overlapping analyses (threads of a server, callbacks) count themselves, the
    first saves the mode and the last restores it, so none runs with dropout switched back on under it."""
    # `torch.compile`'s and (Distributed)DataParallel's wrappers share the model's dropout: counted as the model.
    model = _unwrapped(model)
    with _evaluation_users_lock:
        users, was_training = _evaluation_users.get(model, (0, model.training))
        _evaluation_users[model] = (users + 1, was_training)
        model.eval()
    try:
        yield
    finally:
        with _evaluation_users_lock:
            users, was_training = _evaluation_users.pop(model)
            if users > 1:
                _evaluation_users[model] = (users - 1, was_training)
            else:
                model.train(was_training)

COLORMAP = "inferno"
# The heatmap's share of each displayed pixel: enough to read the colour, little enough to see the frame under it.
OVERLAY_ALPHA = 0.55
ANIMATION_SUFFIX = ".gif"


@dataclass
class EVLExplanation:
    """
    The attention of an EVL model's decoder query over one clip (see `explain`).

    frames (`np.ndarray` of shape `(num_frames, height, width, 3)`, uint8):
        The frames the model read, after the processor's resize and crop, with its rescaling and normalisation undone.
    frame_indices (`np.ndarray` of shape `(num_frames,)`):
        The index of each of those frames in the decoded video (its own frame order for an array of frames).
    layer_maps (`np.ndarray` of shape `(decoder_num_layers, num_frames, grid_height, grid_width)`):
        Per decoder layer, the head-averaged attention weight of each patch token. A layer's map sums, over all frames
        and patches, to `1 - prefix_share[layer]`.
    combined_map (`np.ndarray` of shape `(num_frames, grid_height, grid_width)`):
        The mean of `layer_maps` over the layers.
    prefix_share (`np.ndarray` of shape `(decoder_num_layers,)`):
        Per decoder layer, the attention on the tokens before the patches (class token, registers), all frames
        together; 0 for a backbone without any (SigLIP).
    labels, scores (`list`):
        The top predicted labels and their probabilities (see `explain`); empty for a model without a classification
        head (`num_labels=0`).
    backbone_blocks (`tuple[int, ...]`):
        The backbone block (0-based) whose features each decoder layer reads.
    num_prefix_tokens (`int`):
        Tokens per frame before the patches.
    video_name (`str`):
        What was explained, for titles.
    """

    frames: np.ndarray
    frame_indices: np.ndarray
    layer_maps: np.ndarray
    combined_map: np.ndarray
    prefix_share: np.ndarray
    labels: list[str]
    scores: list[float]
    backbone_blocks: tuple[int, ...]
    num_prefix_tokens: int
    video_name: str

    @property
    def combined_prefix_share(self) -> float:
        return float(self.prefix_share.mean())

    def title(self) -> str:
        predictions = "   ".join(f"{label} {score:.2f}" for label, score in zip(self.labels, self.scores))
        return f"{self.video_name}\n{predictions}" if predictions else self.video_name

    def save_figure(self, path: str | os.PathLike, dpi: int = 100) -> Path:
        """
        Save the grid (PNG, or any format matplotlib writes, by suffix): rows the layers combined then each decoder
        layer, columns the frames. One colour scale for the whole figure (0 to its largest patch weight), so cells
        compare within a figure but not across figures.
        """
        output_format = figure_format(path)  # checked before drawing
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize
        from matplotlib.figure import Figure

        rows = [(f"combined\n(mean of {len(self.layer_maps)})", self.combined_map, self.combined_prefix_share)]
        rows += [
            (f"layer {layer + 1}\n(block {block})", maps, share)
            for layer, (block, maps, share) in enumerate(zip(self.backbone_blocks, self.layer_maps, self.prefix_share))
        ]
        vmax = _display_max(self.layer_maps, self.combined_map)
        num_frames = len(self.frames)
        figure = Figure(figsize=(1.5 * num_frames + 1.8, 1.5 * len(rows) + 1.0), layout="constrained")
        axes = figure.subplots(len(rows), num_frames, squeeze=False)
        for row, (name, maps, share) in enumerate(rows):
            for column in range(num_frames):
                axis = axes[row, column]
                axis.imshow(overlay_heatmap(self.frames[column], maps[column], vmax))
                axis.set_xticks([])
                axis.set_yticks([])
                if row == 0:
                    axis.set_title(f"frame {self.frame_indices[column]}", fontsize=9)
            prefix = f"\nprefix {share:.1%}" if self.num_prefix_tokens else ""
            axes[row, 0].set_ylabel(name + prefix, fontsize=9)
        figure.colorbar(
            ScalarMappable(Normalize(0, vmax), COLORMAP), ax=axes, shrink=0.8, label="attention weight per patch"
        )
        figure.suptitle(self.title(), fontsize=10)
        figure.savefig(path, dpi=dpi, format=output_format)
        return Path(path)

    def save_animation(self, path: str | os.PathLike, seconds_per_frame: float = 0.5) -> Path:
        """Save the frames with the combined heatmap as a looping GIF, coloured from 0 to the map's largest weight."""
        from PIL import Image

        if Path(path).suffix.lower() != ANIMATION_SUFFIX:
            raise ValueError(f"{path}: animations are written as {ANIMATION_SUFFIX} files.")
        vmax = _display_max(self.combined_map)
        images = [Image.fromarray(overlay_heatmap(f, m, vmax)) for f, m in zip(self.frames, self.combined_map)]
        images[0].save(
            path, save_all=True, append_images=images[1:], duration=round(seconds_per_frame * 1000), loop=0
        )
        return Path(path)


def _display_max(*maps: np.ndarray) -> float:
    # An all-zero map (every weight on the prefix tokens) still needs a non-empty colour range.
    largest = max(float(m.max()) for m in maps)
    return largest if largest > 0 else 1.0


def overlay_heatmap(frame: np.ndarray, heatmap: np.ndarray, vmax: float) -> np.ndarray:
    """
    `frame` (height, width, 3) uint8 with `heatmap` (grid_height, grid_width) drawn over it, coloured by
    `heatmap / vmax`: one flat block per patch, since each weight belongs to one token, not to a point between them.
    """
    from matplotlib import colormaps

    height, width = frame.shape[:2]
    grid_height, grid_width = heatmap.shape
    rows = np.arange(height) * grid_height // height
    columns = np.arange(width) * grid_width // width
    blocks = heatmap[rows[:, None], columns[None, :]]
    colours = colormaps[COLORMAP](np.clip(blocks / vmax, 0, 1))[..., :3] * 255
    blended = (1 - OVERLAY_ALPHA) * frame.astype(np.float64) + OVERLAY_ALPHA * colours
    return np.round(blended).astype(np.uint8)


def attention_maps(
    attentions, num_frames: int, num_prefix_tokens: int, patch_grid: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """
    Split the decoder's attention weights into per-patch maps and the prefix tokens' share.

    `attentions`: one tensor per decoder layer, `(batch_size, heads, 1, num_frames * num_tokens)` with `num_tokens =
    num_prefix_tokens + grid_height * grid_width`, in the order of the decoder's memory: frame after frame, each
    frame's prefix tokens (class token, registers) first, then its patches row by row, as the backbone lays them out.

    Returns `patch_maps`, `(batch_size, layers, num_frames, grid_height, grid_width)`, the mean over heads of each
    patch's weight, and `prefix_share`, `(batch_size, layers)`, the head-averaged weight on all frames' prefix tokens.
    Every head's weights sum to 1, so per clip and layer `patch_maps.sum() + prefix_share == 1`.
    """
    grid_height, grid_width = patch_grid
    num_tokens = num_prefix_tokens + grid_height * grid_width
    weights = torch.stack([layer.detach().to("cpu", torch.float64) for layer in attentions], dim=1)
    if weights.shape[-2:] != (1, num_frames * num_tokens):
        raise ValueError(
            f"Expected attention weights over {num_frames} frames x {num_tokens} tokens of one query, got shape "
            f"{tuple(weights.shape[2:])} per layer."
        )
    weights = weights.mean(2)[..., 0, :].unflatten(-1, (num_frames, num_tokens))  # (B, layers, T, tokens)
    prefix_share = weights[..., :num_prefix_tokens].sum((-1, -2))
    patch_maps = weights[..., num_prefix_tokens:].unflatten(-1, (grid_height, grid_width))
    return patch_maps.numpy(), prefix_share.numpy()


def sample_clip(processor: EVLVideoProcessor, video) -> tuple[torch.Tensor, np.ndarray]:
    """
    `pixel_values` `(1, num_frames, channels, height, width)` of the one view `explain` shows, and the index in the
    decoded video of each of its frames: the processor's own decoding and sampling, with one temporal view (its
    centred window) and one spatial view (its centre crop, or the whole frame resized to a square), and no random
    offset.
    """
    num_views = processor.num_temporal_views * processor.num_spatial_views
    if num_views > 1:
        logger.warning(
            f"This video processor evaluates {processor.num_temporal_views} temporal x {processor.num_spatial_views} "
            "spatial views and averages their predictions; the explanation is of one view, the centred window as "
            "one spatial view gives it (its centre crop, or the whole frame where the processor resizes to a square "
            "without a crop), and its prediction is that view's."
        )
    inputs = processor(
        video, return_tensors="pt", return_metadata=True, num_temporal_views=1, num_spatial_views=1,
        random_temporal_offset=False,
    )  # fmt: skip
    if len(inputs["video_metadata"]) != 1:
        raise ValueError(f"`explain` explains one video at a time, got {len(inputs['video_metadata'])}.")
    pixel_values = inputs["pixel_values"]
    indices = inputs["video_metadata"][0].frames_indices
    # A processor that does not sample (`do_sample_frames=False`) passes every frame, in order.
    indices = np.arange(pixel_values.shape[1]) if indices is None else np.asarray(indices, dtype=np.int64)
    return pixel_values, indices


def displayed_frames(processor: EVLVideoProcessor, pixel_values: torch.Tensor) -> np.ndarray:
    """
    The frames the model read, `(num_frames, height, width, 3)` uint8: `pixel_values` `(num_frames, channels, height,
    width)` with the processor's normalisation and rescaling undone (so already resized and cropped).
    """
    frames = pixel_values.detach().to("cpu", torch.float64)
    if processor.do_normalize:
        frames = frames * torch.tensor(processor.image_std, dtype=torch.float64).view(-1, 1, 1)
        frames = frames + torch.tensor(processor.image_mean, dtype=torch.float64).view(-1, 1, 1)
    if processor.do_rescale:
        frames = frames / processor.rescale_factor
    return frames.permute(0, 2, 3, 1).round().clamp(0, 255).to(torch.uint8).numpy()


def top_predictions(config: PreTrainedConfig, logits: torch.Tensor, top_k: int) -> tuple[list[str], list[float]]:
    """
    The `top_k` labels of one clip's `logits` and their scores: sigmoid probabilities for a multi-label model, the
    raw outputs for regression (also one output without a `problem_type`), softmax probabilities otherwise (as
    `pipeline("video-classification")`). None for a model without a classification head (`num_labels=0`), whose
    logits are the video embedding, as in the pipeline.
    """
    if config.num_labels == 0:
        return [], []
    logits = logits.detach().float().cpu()
    problem_type = problem_type_without_labels(config)
    if problem_type == "multi_label_classification":
        scores = logits.sigmoid()
    elif problem_type == "regression":
        scores = logits
    else:
        scores = logits.softmax(-1)
    top = scores.topk(min(top_k, scores.numel()))
    labels = [config.id2label.get(int(index), str(int(index))) for index in top.indices]
    return labels, [float(score) for score in top.values]


def _video_name(video) -> str:
    if isinstance(video, (str, os.PathLike)):
        return os.fspath(video)
    return f"<{type(video).__name__}>"


def explain(
    model: EVLForVideoClassification, processor: EVLVideoProcessor, video, top_k: int = 5
) -> EVLExplanation:
    """
    Classify `video` and return where the decoder's query read from: its attention over the frames' tokens, per
    decoder layer and combined, as maps over the frames the model saw.

    `video`: one video, as `processor` takes it: a path or URL (decoded and sampled by the processor, so the frames
    shown are exactly those the model read, with their indices in the video), bytes, or decoded frames. A processor
    with several temporal or spatial views (whose predictions the pipeline averages) is run with one, its centred
    window and centre crop (a warning says so): the maps are of one clip, and the predicted labels are that clip's.

    The numbers. Decoder layer `l` has one query attending, with `decoder_num_heads` heads, over the tokens of every
    frame (class token and registers where the backbone has them, then the patches), softmax over all frames and
    tokens together. Per layer, the weights are averaged over heads; `prefix_share[l]` is the weight on the
    prefix tokens (kept apart: they summarise a whole frame and have no place on it), and `layer_maps[l, t, i, j]` is
    the weight on patch `(i, j)` of frame `t`, so that `layer_maps[l].sum() + prefix_share[l] == 1`. `combined_map`
    is the plain mean over layers. Attention rollout would chain the layers' attentions, which is needed where one
    layer attends over the previous layer's outputs; here every layer reads its own backbone block's features
    directly (no layer's keys or values hold another layer's attention output), and each adds what it read into
    the one query, so the mean is the summary that makes no further assumption. The figure and the animation colour
    each patch by its weight over the largest in the figure (the animation: in the combined map).

    What the maps show: which tokens each layer's query weighted when it read the clip. What they do not show:

    - A cause. A weight scales the token's value vector; a heavily weighted token with a small or irrelevant value
      changes little, and attention is one path among several: each layer's read goes through its output
      projection and MLP and is added to the query's residual stream, and the head reads only the final query.
    - One patch's pixels. The keys and values are the backbone block's features plus EVL's temporal terms: the
      temporal convolution mixes frames `t - 1`, `t`, `t + 1` at each position, the cross-frame attention features
      summarise how the patch matches the neighbouring frames' patches, and the backbone's own self-attention has
      already mixed every patch of a frame. A patch's weight covers information from its neighbours in time and
      from the rest of its frame.
    - A class. The query has no label: the maps are the same whichever class is asked about.
    - Everything read, where the prefix share is large (DINOv2's registers are known to gather much of it).

    The decoder computes the weights with the eager attention whatever `model.config._attn_implementation` is (only
    it materialises them); the model is run in evaluation mode and left in the mode it had.
    """
    if not isinstance(model, EVLForVideoClassification):
        raise TypeError(f"`model` must be an EVLForVideoClassification, got {type(model).__name__}.")
    if not isinstance(processor, EVLVideoProcessor):
        raise TypeError(
            f"`processor` must be the model's EVLVideoProcessor, got {type(processor).__name__}: it decides which "
            "frames are read and how they are cropped."
        )
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:  # as the timeline's
        raise ValueError(f"`top_k` must be a positive integer, got {top_k!r}.")
    top_k = int(top_k)
    pixel_values, frame_indices = sample_clip(processor, video)
    # A model loaded with its first weights offloaded (`device_map` to "disk"/"cpu") has them on the meta device:
    # its hooks then move the frames where each module runs.
    if model.device.type != "meta":
        pixel_values = pixel_values.to(model.device)
    with in_evaluation_mode(model), torch.no_grad():
        outputs = model(pixel_values, output_attentions=True, return_dict=True)  # whatever `config.return_dict`
    config = model.config
    layer_maps, prefix_share = attention_maps(
        outputs.attentions, pixel_values.shape[1], config.num_prefix_tokens, config.patch_grid
    )
    labels, scores = top_predictions(config, outputs.logits[0], top_k)
    first_block = config.vision_config.num_hidden_layers - config.decoder_num_layers
    return EVLExplanation(
        frames=displayed_frames(processor, pixel_values[0]),
        frame_indices=frame_indices,
        layer_maps=layer_maps[0],
        combined_map=layer_maps[0].mean(0),
        prefix_share=prefix_share[0],
        labels=labels,
        scores=scores,
        backbone_blocks=tuple(range(first_block, first_block + config.decoder_num_layers)),
        num_prefix_tokens=config.num_prefix_tokens,
        video_name=_video_name(video),
    )


def load_model_and_processor(model_dir: str | os.PathLike) -> tuple[EVLForVideoClassification, EVLVideoProcessor]:
    """An `EVLForVideoClassification` and the `EVLVideoProcessor` saved next to it (a directory or a Hub id)."""
    model_type = checkpoint_model_type(model_dir)
    if model_type != EVLConfig.model_type:  # e.g. the image backbone itself, whose config would be misread as EVL's
        raise ValueError(f"{model_dir}: a `{model_type}` checkpoint, not an EVL model (`{EVLConfig.model_type}`).")
    model = EVLForVideoClassification.from_pretrained(model_dir)
    try:
        processor = EVLVideoProcessor.from_pretrained(model_dir)
    except OSError:
        raise OSError(
            f"{model_dir}: no video processor (video_preprocessor_config.json) next to the model, and the frames "
            "to explain depend on it. Save the one the model is evaluated with into that directory, e.g. "
            "`EVLVideoProcessor.from_model_config(model.config).save_pretrained(model_dir)`."
        ) from None
    return model, processor


def main(argv: list[str] | None = None) -> EVLExplanation:
    parser = argparse.ArgumentParser(
        prog="python -m evl_hf.explain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("video", help="The video file (or URL) to explain.")
    parser.add_argument("--model", required=True, help="Directory (or Hub id) of the model and its video processor.")
    parser.add_argument("--output", required=True, help="The grid of heatmaps (PNG).")
    parser.add_argument("--animation", default=None, help="Also an animated GIF of the frames with the combined map.")
    parser.add_argument("--top_k", type=int, default=5, help="Predicted labels in the title (default: 5).")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error(f"--top_k must be a positive integer, got {args.top_k}.")
    if args.animation is not None and Path(args.animation).suffix.lower() != ANIMATION_SUFFIX:
        parser.error(f"--animation {args.animation}: animations are written as {ANIMATION_SUFFIX} files.")
    check_output_path(parser, "--output", args.output, figure=True)
    check_output_path(parser, "--animation", args.animation)

    try:
        model, processor = load_model_and_processor(args.model)
        explanation = explain(model, processor, args.video, top_k=args.top_k)
    # A damaged or foreign checkpoint (`EVLCheckpointError`, a `ValueError`), the video's or the machine's: one line.
    except (ValueError, OSError) as error:
        parser.exit(1, f"{parser.prog}: error: {error}\n")
    try:
        explanation.save_figure(args.output)
        if args.animation is not None:
            explanation.save_animation(args.animation)
    except OSError as error:  # e.g. no permission, a full disk
        parser.exit(1, f"{parser.prog}: error: {error}\n")

    print(f"{explanation.video_name}: frames {', '.join(map(str, explanation.frame_indices))}")
    for label, score in zip(explanation.labels, explanation.scores):
        print(f"    {label:<24} {score:.3f}")
    if explanation.num_prefix_tokens:
        shares = ", ".join(f"{share:.0%}" for share in explanation.prefix_share)
        print(f"Attention on the class token / registers, per decoder layer: {shares}")
    print(f"Saved {args.output}" + (f" and {args.animation}" if args.animation is not None else ""))
    return explanation


__all__ = ["EVLExplanation", "attention_maps", "explain", "load_model_and_processor", "main"]
