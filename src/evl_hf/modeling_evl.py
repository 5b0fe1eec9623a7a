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
"""PyTorch EVL model: a frozen CLIP ViT backbone with a light temporal Transformer decoder."""

# Imported first: where transformers is older than EVL needs, it says so before the imports below fail.
from .transformers_requirement import TRANSFORMERS_REQUIREMENT  # noqa: F401  # isort: skip
import contextlib
import copy
import dataclasses
import functools
import inspect
import json
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import is_offline_mode
from safetensors import SafetensorError, safe_open
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint as activation_checkpoint
from transformers import PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, ImageClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput, cached_file, is_accelerate_available, logging, output_capturing
from transformers.utils.generic import can_return_tuple
from transformers.utils.hub import resolve_revision
from transformers.utils.import_utils import is_tracing
from transformers.utils.loading_report import log_state_dict_report
from transformers.utils.output_capturing import OutputRecorder, capture_outputs, maybe_install_capturing_hooks

from .backbone_families import (
    HUB_FILE_ARGUMENTS,
    backbone_family,
    checkpoint_model_type,
    family_of_checkpoint,
    hub_repo_id,
    processor_crop_size,
    supported_checkpoint_types,
)
from .configuration_evl import EVLConfig, square_side
from .cpu_info import cpu_flags


# Optional, as transformers' files guard it (so remote code runs without it): only `device_map` loading uses it.
if is_accelerate_available():
    from accelerate.hooks import attach_align_device_hook, remove_hook_from_submodules
    from accelerate.utils import has_offloaded_params


logger = logging.get_logger(__name__)

# Working-set budget (in float32 elements) for one chunk of cross-frame attention maps: bounds the module's peak memory
# independently of the number of frames.
_CROSS_FRAME_CHUNK_ELEMENTS = 2**24
# The per-head scores of the cross-frame maps are softmaxed and averaged right away: a chunk that stays in the CPU's
# cache (one frame pair at ViT-B/16) is faster than a large one, which also costs a page fault per 4 kB.
_CROSS_FRAME_SCORES_CHUNK_ELEMENTS = 2**19
# The `from_pretrained` arguments that say where a checkpoint's files come from (passed on when EVL reads them first).
_HUB_KWARGS = ("cache_dir", "proxies", "token", "revision", "local_files_only", "subfolder")
# The classification head's tensors: the only ones a checkpoint may lack, or `ignore_mismatched_sizes=True` replace.
_HEAD_PREFIXES = ("classifier.", "fc_norm.")


def _with_variant(filename: str, variant: str | None) -> str:
    """A weights file's name for `from_pretrained(variant=...)`, as transformers names it: model.fp16.safetensors."""
    if variant is None:
        return filename
    stem, extension = filename.rsplit(".", 1)
    return f"{stem}.{variant}.{extension}"


@dataclass
class EVLModelOutput(ModelOutput):
    r"""
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, 1, hidden_size)`):
        The decoder's query token after the last decoder layer.
    pooler_output (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
        The video embedding: the final query token, before the classification head's LayerNorm.
    hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
        The query token before the first decoder layer and after each decoder layer, each of shape
        `(batch_size, 1, hidden_size)`.
    attentions (`tuple(torch.FloatTensor)`, *optional*, returned when `output_attentions=True`):
        Attention weights of each decoder layer's query over the frame features, each of shape
        `(batch_size, decoder_num_heads, 1, num_frames * (num_prefix_tokens + num_patches))`.
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class EVLBackboneFeatures(ModelOutput):
    r"""
    What the EVL decoder reads from the frozen backbone: computing it is most of the model's cost, and it depends on
    no trained parameter, so it can be cached per clip.

    frame_features (`torch.FloatTensor` of shape `(batch_size, decoder_num_layers, num_frames, num_prefix_tokens + num_patches, hidden_size)`):
        The outputs (all tokens in the backbone's order: class token and registers where it has them, then the
        patches) of the backbone's last `decoder_num_layers` blocks.
    cross_frame_maps (`torch.FloatTensor` of shape `(batch_size, decoder_num_layers, num_frames, 2, num_patches, num_patches)`, *optional*):
        Those blocks' head-averaged attention between neighbouring frames (see `cross_frame_attention_maps`); only
        when `use_temporal_cross_attention`.
    """

    frame_features: torch.FloatTensor | None = None
    cross_frame_maps: torch.FloatTensor | None = None


class EVLInputError(ValueError):
    """Raised when `pixel_values` cannot be a clip for this model (wrong rank, channels, size, dtype or values)."""


class EVLCheckpointError(ValueError, RuntimeError):
    """A checkpoint is unreadable or does not fit the model: the message names the file, keys and shapes. (Also a
    `RuntimeError`, what transformers raises for weights of the wrong shape.)"""


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AMX or AVX-512 BF16); elsewhere torch emulates
    bfloat16, several times slower than float32."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    if all(hasattr(torch.cpu, check) for check in checks):
        return any(getattr(torch.cpu, check)() for check in checks)
    return not cpu_flags().isdisjoint({"amx_bf16", "avx512_bf16"})


def resolve_backbone_dtype(backbone_dtype: str | None, model_dtype: torch.dtype = torch.float32) -> torch.dtype | None:
    """
    The dtype `EVLConfig.backbone_dtype` asks for, `None` for the model's own (`model_dtype`). `"auto"` is decided when
    the model is built, on the hardware it will run on: bfloat16 where that is native (a CUDA device with bf16, the
    GPU deciding when one is visible; else a CPU with AMX or AVX-512 BF16), the model's own dtype elsewhere, and
    always when the model was built in another dtype than float32 (e.g. `from_pretrained(..., dtype=torch.float64)`).
    """
    if backbone_dtype == "auto":
        if model_dtype != torch.float32:
            return None
        if torch.cuda.is_available():
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        else:
            native = cpu_has_native_bfloat16()
        return torch.bfloat16 if native else None
    return getattr(torch, backbone_dtype) if backbone_dtype is not None else None


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
):
    attn_weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


def _kernel_taps(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A depthwise Conv1d weight (D, 1, 3) as (3, D) in `dtype`, one contiguous row per tap (`EVLTemporalConv.taps`)."""
    return weight.squeeze(1).T.to(dtype).contiguous()


def _temporal_conv(
    frame_features: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor, add_input: bool
) -> torch.Tensor:
    """The depthwise temporal convolution of (B, T, tokens, D) features as three shifted multiply-adds (a Conv1d would
    need the features permuted to (B * tokens, D, T) and back, which costs more than the convolution itself), plus the
    features themselves with `add_input`, all summed into one new tensor. `taps`: (3, D), frames t - 1, t, t + 1."""
    previous, current, following = taps
    output = torch.addcmul(bias.to(frame_features.dtype), frame_features, current)
    output[:, 1:].addcmul_(frame_features[:, :-1], previous)
    output[:, :-1].addcmul_(frame_features[:, 1:], following)
    return output.add_(frame_features) if add_input else output


class _TemporalConvFunction(torch.autograd.Function):
    """`_temporal_conv` with its backward written out. Autograd's own backward of the in-place multiply-adds into
    slices clones the whole gradient once per slice and multiplies it by the multiply-add's scalar once more; here the
    kernel's gradient is three products of the gradient with the shifted features, each summed, and the features'
    gradient (a trained backbone only) the transposed convolution."""

    @staticmethod
    def forward(ctx, frame_features, weight, bias, add_input):
        taps = _kernel_taps(weight, frame_features.dtype)
        ctx.save_for_backward(frame_features, taps)
        ctx.add_input = add_input
        ctx.weight_dtype, ctx.bias_dtype = weight.dtype, bias.dtype
        return _temporal_conv(frame_features, taps, bias, add_input)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        frame_features, taps = ctx.saved_tensors
        grad_features = grad_weight = grad_bias = None
        summed = (0, 1, 2)  # batch, frames, tokens
        accumulate = torch.promote_types(grad.dtype, torch.float32)  # sums over thousands of tokens
        if ctx.needs_input_grad[0]:
            # Frame t feeds output t (tap 1, and itself with `add_input`), t + 1 (tap 0) and t - 1 (tap 2): the same
            # convolution of the gradient with the taps reversed in time.
            grad_features = _temporal_conv(grad, taps.flip(0), grad.new_zeros(()), ctx.add_input)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.stack(
                [
                    (grad[:, 1:] * frame_features[:, :-1]).sum(summed, dtype=accumulate),
                    (grad * frame_features).sum(summed, dtype=accumulate),
                    (grad[:, :-1] * frame_features[:, 1:]).sum(summed, dtype=accumulate),
                ],
                dim=1,
            )
            grad_weight = grad_weight.unsqueeze(1).to(ctx.weight_dtype)  # (D, 1, 3), as Conv1d's weight
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum(summed, dtype=accumulate).to(ctx.bias_dtype)
        return grad_features, grad_weight, grad_bias, None


class EVLTemporalConv(nn.Module):
    """Depthwise convolution (kernel 3, zero padded) along time, applied at every token position."""

    def __init__(self, config: EVLConfig):
        super().__init__()
        hidden_size = config.vision_config.hidden_size
        self.conv = nn.Conv1d(hidden_size, hidden_size, kernel_size=3, padding=1, groups=hidden_size)

    def forward(self, frame_features: torch.Tensor, add_input: bool = False) -> torch.Tensor:
        """The convolution of `frame_features` (B, T, tokens, D); with `add_input`, the features plus it (the decoder's
        residual form), summed into the same new tensor: `frame_features + conv(frame_features)`, bit for bit."""
        weight, bias = self.conv.weight, self.conv.bias
        if torch.is_grad_enabled() and (weight.requires_grad or bias.requires_grad or frame_features.requires_grad):
            return _TemporalConvFunction.apply(frame_features, weight, bias, add_input)
        return _temporal_conv(frame_features, self.taps(frame_features.dtype), bias, add_input)

    def taps(self, dtype: torch.dtype) -> torch.Tensor:
        """The kernel as (3, D) in `dtype`, one contiguous row per tap: frames t - 1, t, t + 1. The weight's own
        columns are strided (its layout is (D, 1, 3)), and an elementwise product with a strided per-channel vector
        takes a slow unvectorised path: 2x (float32) to 6x (bfloat16) the time of the same product with a contiguous
        one."""
        return _kernel_taps(self.conv.weight, dtype)


class EVLTemporalPositionEmbedding(nn.Module):
    """One learned embedding per frame. Other frame counts than `num_frames` get a linear interpolation over time."""

    def __init__(self, config: EVLConfig):
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(config.num_frames, config.vision_config.hidden_size))

    def forward(self, num_frames: int) -> torch.Tensor:
        if num_frames == self.embedding.shape[0]:
            return self.embedding
        resized = nn.functional.interpolate(
            self.embedding.T.unsqueeze(0), size=num_frames, mode="linear", align_corners=True
        )
        return resized.squeeze(0).T


def _frames_per_chunk(num_frames: int, elements_per_frame: int, budget: int) -> int:
    """How many of `num_frames` frames one chunk takes when each needs `elements_per_frame` (the whole batch's) of a
    working set of `budget` elements; at least one. All of them under `torch.export`: a chunk size computed from the
    batch size would specialise the exported program to the example's batch (its working set then grows with the
    batch and the clip's length)."""
    if torch.compiler.is_exporting():
        return max(1, num_frames)
    return max(1, budget // elements_per_frame)


def cross_frame_attention_maps(queries: torch.Tensor, keys: torch.Tensor, num_prefix_tokens: int = 1) -> torch.Tensor:
    """
    The backbone's attention between the patches of neighbouring frames, as the authors' cross-frame module reads it.

    `queries`, `keys`: one block's unscaled attention projections, (B, T, P + N, heads, head_dim), whose first
    `num_prefix_tokens` P tokens (class token, registers) are dropped. Returns (B, T, 2, N, N) over the patches:
    `[:, t, 0]` is softmax(q_t k_{t-1}^T / sqrt(head_dim)) over keys averaged over heads (zero for t = 0), `[:, t, 1]`
    the same towards frame t + 1 (zero for the last frame). The maps have
    no learned parameter, so they can be computed once per clip and cached. Frames are processed in chunks so the
    per-head scores never need more than a fixed working set. The scores are computed in the inputs' dtype (a bf16
    backbone's matmuls are the fast ones), the softmax, the head mean and the result in at least float32.
    """
    batch_size, num_frames, num_tokens, num_heads, head_dim = queries.shape
    num_patches = num_tokens - num_prefix_tokens
    dtype = torch.promote_types(queries.dtype, torch.float32)
    # (B, T, heads, N, head_dim) and (B, T, heads, head_dim, N) views; the scale goes on the queries, a third the size
    # of the scores.
    queries = queries[:, :, num_prefix_tokens:].transpose(2, 3)
    keys = keys[:, :, num_prefix_tokens:].permute(0, 1, 3, 4, 2)
    if queries.dtype == torch.bfloat16 and queries.device.type == "cpu":
        # oneDNN's bf16 matmuls copy a strided operand on every call: here each is copied once per block (each frame's
        # queries and keys serve two frame pairs). A clone, never the caller's tensor, is scaled in place. The keys
        # are copied as (heads, N, head_dim), moving whole rows, and read transposed, which oneDNN takes in place: a
        # copy into (heads, head_dim, N) transposes every head and takes 10x as long.
        queries = queries.clone(memory_format=torch.contiguous_format).mul_(head_dim**-0.5)
        keys = keys.mT.contiguous().mT
    else:
        queries = queries * head_dim**-0.5  # laid out as the projection was: other matmuls read the strided views
    maps = queries.new_zeros(batch_size, num_frames, 2, num_patches, num_patches, dtype=dtype)
    chunk = _frames_per_chunk(
        num_frames - 1, batch_size * num_heads * num_patches * num_patches, _CROSS_FRAME_SCORES_CHUNK_ELEMENTS
    )
    for start in range(0, num_frames - 1, chunk):
        stop = min(start + chunk, num_frames - 1)
        # Frame pairs (t, t + 1) for t in [start, stop): t + 1 looks back at t, t looks ahead at t + 1.
        scores = torch.matmul(queries[:, start + 1 : stop + 1], keys[:, start:stop])
        maps[:, start + 1 : stop + 1, 0] = scores.softmax(dim=-1, dtype=dtype).mean(dim=2)
        del scores  # before the next direction's scores exist
        scores = torch.matmul(queries[:, start:stop], keys[:, start + 1 : stop + 1])
        maps[:, start:stop, 1] = scores.softmax(dim=-1, dtype=dtype).mean(dim=2)
    return maps


def _autocast_enabled(device_type: str) -> bool:
    """`torch.is_autocast_enabled(device_type)`, `False` on the meta device, which has no autocast (torch raises when
    asked; transformers' `maybe_autocast` leaves it out too)."""
    return device_type != "meta" and torch.is_autocast_enabled(device_type)


def _autocast_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype autocast runs matmuls on `tensor` in where it is on for its device (it casts every floating dtype but
    float64), `tensor`'s own otherwise."""
    device_type = tensor.device.type
    if _autocast_enabled(device_type) and tensor.dtype.is_floating_point and tensor.dtype != torch.float64:
        return torch.get_autocast_dtype(device_type)
    return tensor.dtype


def _autocast_to_other_half_precision(device_type: str, dtype: torch.dtype) -> bool:
    """Whether autocast is on for `device_type` with the half-precision dtype that `dtype` (float16 or bfloat16) is
    not."""
    half_precision = (torch.float16, torch.bfloat16)
    if dtype not in half_precision or not _autocast_enabled(device_type):
        return False
    autocast_dtype = torch.get_autocast_dtype(device_type)
    return autocast_dtype in half_precision and autocast_dtype != dtype


def _backbone_autocast(device_type: str, backbone_dtype: torch.dtype):
    """
    The autocast state the backbone's work (its blocks, the cross-frame maps from its queries and keys) runs in: off
    where autocast is on with the other half-precision dtype than the backbone's (an fp16 backbone under bf16 autocast,
    or the reverse), since autocast cannot mix float16 and bfloat16 inputs (it raises) and such a backbone computes in
    its own dtype; as it is otherwise.
    """
    if _autocast_to_other_half_precision(device_type, backbone_dtype):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _sums_in_place(memory: torch.Tensor, term_dtype: torch.dtype) -> bool:
    """Whether a term of `term_dtype` can be added into `memory` itself: the sum keeps `memory`'s dtype (a bf16
    memory and a float32 term promote to float32, so they are summed into a new tensor)."""
    return torch.promote_types(memory.dtype, term_dtype) == memory.dtype


def _query_column_groups(grid_width: int) -> list[slice]:
    """The query columns the cross-frame module's inference path multiplies separately: two halves (one column alone
    on a grid one patch wide), each reaching w + w/2 - 1 of the 2w - 1 column offsets."""
    half = (grid_width + 1) // 2
    return [slice(0, half), slice(half, grid_width)] if grid_width > 1 else [slice(0, grid_width)]


def _windows_matmul(offsets: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """`torch.bmm(offsets, windows)` for the overlapping table windows of `_table_windows`. In bf16 on the CPU,
    oneDNN's bmm first copies the windows out (h times the table columns, several MB newly allocated, and so
    page-faulted in, at every call): one matmul per window reads them in place instead, the same values. Not where
    autograd records the product (`out=` has no gradient) or while compiling (inductor plans the product itself)."""
    records_gradient = torch.is_grad_enabled() and (offsets.requires_grad or windows.requires_grad)
    if (
        windows.dtype == torch.bfloat16
        and windows.device.type == "cpu"
        and not records_gradient
        and not torch.compiler.is_compiling()
    ):
        products = offsets.new_empty(offsets.shape[0], offsets.shape[1], windows.shape[2])
        for row, (row_offsets, row_window) in enumerate(zip(offsets, windows)):
            torch.mm(row_offsets, row_window, out=products[row])
        return products
    return torch.bmm(offsets, windows)


class _CrossFrameTrainingFunction(torch.autograd.Function):
    """
    Training with maps that need no gradient (a frozen backbone's, or cached ones): the cross-frame features of `module`
    summed into `memory` in place, with the tables' gradient written out. Per direction and half of the query columns
    (as at inference: each half reaches w + w/2 - 1 of the 2w - 1 column offsets, so a quarter of the FLOPs of one
    matmul over all columns are saved), one batched matmul of the offsets against the table windows (the inference
    path's overlapping strided view, `_table_windows`); the backward multiplies the saved offsets with the gradient and
    folds each query row's window into the table rows and columns it reads, summing in float32. Autograd's own backward
    of the same (`_forward_batched`, all columns at once) clones the whole gradient for each frame slice written, casts
    the windows' gradient to float32 in a pass of its own and folds with `unfold`'s general backward.
    """

    @staticmethod
    def forward(ctx, memory, maps, previous_frame_table, next_frame_table, module):
        num_frames = maps.shape[1]
        height, width = module.grid_height, module.grid_width
        dtype = _autocast_dtype(maps)  # the tables and maps cast before the matmuls' inputs are built from them
        patches = memory[:, :, module.num_prefix_tokens :].unflatten(2, (height, width))
        offsets = []  # per direction and column group; None for a direction without frames
        for direction, (table, frames) in enumerate(
            ((previous_frame_table, slice(1, num_frames)), (next_frame_table, slice(0, num_frames - 1)))
        ):
            for columns in _query_column_groups(width):
                if frames.start >= frames.stop:  # a single frame: no neighbour
                    offsets.append(None)
                    continue
                offsets.append(module._to_offsets(maps[:, frames, direction], dtype, columns))
                features = _windows_matmul(offsets[-1], module._table_windows(table, dtype, columns))
                # (h, B * c * g, D) -> (B, c, h, g, D)
                features = features.unflatten(1, (maps.shape[0], -1, columns.stop - columns.start))
                patches[:, frames, :, columns].add_(features.permute(1, 2, 0, 3, 4))
        ctx.mark_dirty(memory)
        ctx.save_for_backward(*offsets)
        ctx.grid, ctx.num_prefix_tokens, ctx.num_frames = (height, width), module.num_prefix_tokens, num_frames
        ctx.dtype = dtype
        ctx.tables = [(table.shape, table.dtype) for table in (previous_frame_table, next_frame_table)]
        return memory

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (height, width), num_frames = ctx.grid, ctx.num_frames
        groups = _query_column_groups(width)
        saved_offsets = ctx.saved_tensors  # once: activation checkpointing unpacks them once per backward
        patches = grad[:, :, ctx.num_prefix_tokens :].unflatten(2, (height, width))
        table_grads = []
        for direction, frames in enumerate((slice(1, num_frames), slice(0, num_frames - 1))):
            if not ctx.needs_input_grad[2 + direction]:
                table_grads.append(None)
                continue
            table_shape, table_dtype = ctx.tables[direction]
            accumulate = torch.promote_types(table_dtype, torch.float32)
            table_grad = grad.new_zeros(2 * height - 1, 2 * width - 1, table_shape[-1], dtype=accumulate)
            for columns, offsets in zip(groups, saved_offsets[direction * len(groups) :]):
                if offsets is None:  # no frame: a zero gradient (DDP requires every parameter's)
                    continue
                # (B, c, h, g, D) -> (h, B * c * g, D), the offsets' row order, cast in the same copy
                frames_grad = patches[:, frames, :, columns].permute(2, 0, 1, 3, 4)
                frames_grad = grad.new_empty(frames_grad.shape, dtype=ctx.dtype).copy_(frames_grad)
                windows_grad = torch.bmm(offsets.transpose(1, 2), frames_grad.view(height, -1, table_shape[-1]))
                # Query row i's window holds table rows i .. i + h - 1, columns j0 .. j1 + w - 2 of its group.
                offset_columns = slice(columns.start, columns.stop + width - 1)
                for row, window_grad in enumerate(windows_grad.unflatten(1, (height, -1))):
                    table_grad[row : row + height, offset_columns].add_(window_grad)
            table_grads.append(table_grad.view(table_shape).to(table_dtype))
        return grad, None, *table_grads, None


class EVLCrossFrameAttention(nn.Module):
    """
    Turns the backbone's attention between the patches of neighbouring frames (see `cross_frame_attention_maps`) into
    features: for every query patch q and key patch k of frame t and its neighbour, a learned vector indexed by the
    spatial offset between q and k, summed with the attention weights, one table per direction. The rows of the
    tokens before the patches (class token, registers) stay 0.

    The authors gather an (N, N, hidden_size) table per direction; that is 1.4 GB at ViT-L/14@336 shapes. Here each
    map is scattered into offset space instead: row offsets become a fixed window per query row (a flip), column
    offsets a (2w - 1)-wide scatter, and a matmul against the table rows each query row can reach gives the same sums:
    at inference, for each half of the query columns, one batched matmul per direction against an overlapping strided
    view of the table columns that half reaches (frames in chunks, so memory does not grow with the clip length); in
    training the same, with the tables' gradient written out (a cheap backward), or, where the maps need a gradient
    too (a fine-tuned backbone's), one batched matmul per direction over all columns under autograd. As in the
    authors' module, the clip's first frame has no previous-frame features and its last no next-frame ones.
    """

    def __init__(self, config: EVLConfig):
        super().__init__()
        hidden_size = config.vision_config.hidden_size
        self.grid_height, self.grid_width = config.patch_grid
        self.num_prefix_tokens = config.num_prefix_tokens
        num_offsets = (2 * self.grid_height - 1) * (2 * self.grid_width - 1)
        self.previous_frame_table = nn.Parameter(torch.zeros(num_offsets, hidden_size))
        self.next_frame_table = nn.Parameter(torch.zeros(num_offsets, hidden_size))
        columns = torch.arange(self.grid_width)
        # Column offset of query column j and key column k, shifted to be non-negative.
        self.register_buffer(
            "column_offsets", columns[:, None] - columns[None, :] + self.grid_width - 1, persistent=False
        )

    def _to_offsets(self, maps: torch.Tensor, dtype: torch.dtype, columns: slice | None = None) -> torch.Tensor:
        """(B, c, N, N) maps of one direction -> (h, B * c * g, h * m) in `dtype`: indexed by query row, then the
        other query coordinates, then (local row offset, column offset). `columns` keeps the query columns j0 .. j1 - 1
        only (g of them), whose column offsets span j0 .. j1 + w - 2 (m = g + w - 1 of the 2w - 1); all by default.
        One scatter from the maps into the result's layout: key row k lands at local row offset h - 1 - k (the rows
        of a query row's table window run the other way), key column k' of query column j at column offset
        j - k' + w - 1."""
        height, width = self.grid_height, self.grid_width
        columns = columns or slice(0, width)
        batch_size, num_frames, num_patches = maps.shape[:3]
        num_columns = columns.stop - columns.start
        row_length = num_columns + width - 1
        key_rows = torch.arange(height - 1, -1, -1, device=maps.device) * row_length
        positions = key_rows[None, :, None] + (self.column_offsets[columns] - columns.start)[:, None, :]
        # (B, c, h, g, N): the maps' query columns, scattered along the last dim
        source = maps.to(dtype).view(batch_size, num_frames, height, width, num_patches)[:, :, :, columns]
        index = positions.view(1, 1, 1, num_columns, num_patches).expand(source.shape)
        if torch.compiler.is_compiling():
            # Inductor gives a buffer scattered through a permuted view the view's strides, and the reshape into
            # the matmul's layout then fails (torch 2.14): compiled, the scatter goes into a plain buffer and is
            # permuted by a copy.
            offsets = source.new_zeros(*source.shape[:-1], height * row_length).scatter_(-1, index, source)
            return offsets.permute(2, 0, 1, 3, 4).reshape(height, -1, height * row_length)
        offsets = maps.new_zeros(height, batch_size, num_frames, num_columns, height * row_length, dtype=dtype)
        offsets.permute(1, 2, 0, 3, 4).scatter_(-1, index, source)
        return offsets.view(height, -1, height * row_length)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """`maps`: (B, T, 2, N, N) from `cross_frame_attention_maps`. Returns (B, T, P + N, hidden_size), P the
        tokens before the patches. As in the authors' module, the first frame's previous-frame map and the last
        frame's next-frame map (zero there) are never read: those frames have no such neighbour."""
        self._check_maps(maps)
        if not self._records_gradients(maps):
            return self._forward_by_row(maps, skip_clip_ends=True)
        if maps.requires_grad:  # a trained backbone's
            return self._forward_batched(maps)
        tables = (self.previous_frame_table, self.next_frame_table)
        return _CrossFrameTrainingFunction.apply(self._zero_features(maps), maps, *tables, self)

    def add_to(self, memory: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """`memory + self(maps)`, `memory` (B, T, P + N, hidden_size); use the returned tensor. The features are
        summed into `memory` itself, at inference and in training, so it must be a tensor of the caller's own, which
        no earlier operation saved for its backward: the module then writes and reads back no tensor of its own that
        size. Where that would narrow the sum's dtype, or where the maps need a gradient (a trained backbone's), a new
        tensor is returned."""
        self._check_maps(maps)
        if not _sums_in_place(memory, maps.dtype) or (maps.requires_grad and torch.is_grad_enabled()):
            return memory + self(maps)
        if self._records_gradients(maps):
            tables = (self.previous_frame_table, self.next_frame_table)
            return _CrossFrameTrainingFunction.apply(memory, maps, *tables, self)
        return self._forward_by_row(maps, skip_clip_ends=True, output=memory)

    def _check_maps(self, maps: torch.Tensor) -> None:
        num_patches = maps.shape[-1]
        if num_patches != self.grid_height * self.grid_width:
            raise ValueError(
                f"Cross-frame attention maps cover {num_patches} patches, the offset tables a "
                f"{self.grid_height}x{self.grid_width} grid."
            )

    def _records_gradients(self, maps: torch.Tensor) -> bool:
        tables_train = self.previous_frame_table.requires_grad or self.next_frame_table.requires_grad
        return torch.is_grad_enabled() and (tables_train or maps.requires_grad)

    def direction_features(self, maps: torch.Tensor, direction: int) -> torch.Tensor:
        """
        Inference: the features of one direction's maps `(B, T, N, N)` alone (0: towards the previous frame, 1: the
        next one), every frame's map used; `forward` returns the sum of both, leaving out the clip's first frame's
        previous-frame map and its last frame's next-frame map (zero in maps from `cross_frame_attention_maps`). They
        depend on one frame's map only, so a timeline computes them once per frame for every window that frame is in
        (a window's first frame has no previous frame).
        """
        return self._forward_by_row(maps.unsqueeze(2), directions=(direction,))

    def _table_windows(self, table: torch.Tensor, dtype: torch.dtype, columns: slice) -> torch.Tensor:
        """The table rows each query row i can reach (grid rows i .. i + h - 1), of the m column offsets the query
        `columns` reach, as (h, h * m, D) in `dtype`: one overlapping strided view of a copy of those table columns
        (a few MB), whose window i starts at grid row i; the offsets of `_to_offsets` for those columns index its
        middle dim. Read only by matmuls."""
        height, width = self.grid_height, self.grid_width
        # Sliced before the cast: one copy of the columns used, in `dtype`.
        grid = table.view(2 * height - 1, 2 * width - 1, -1)[:, columns.start : columns.stop + width - 1]
        grid = grid.to(dtype).contiguous()
        row_stride = grid.stride(0)  # m * D
        return grid.as_strided((height, height * grid.shape[1], grid.shape[2]), (row_stride, grid.shape[2], 1))

    def _zero_features(self, maps: torch.Tensor) -> torch.Tensor:
        """A zero (B, T, P + N, hidden_size) tensor in the maps' dtype, for the features of `maps` to be added into."""
        batch_size, num_frames, _, num_patches, _ = maps.shape
        hidden_size = self.previous_frame_table.shape[-1]
        return maps.new_zeros(batch_size, num_frames, self.num_prefix_tokens + num_patches, hidden_size)

    def _forward_batched(self, maps: torch.Tensor) -> torch.Tensor:
        """Training where the maps need a gradient (a fine-tuned backbone's): per direction, one batched matmul
        against copied (h, h * (2w - 1), D) table windows under autograd, whose backward is a single fold into the
        table (row-wise views would scatter a full-size gradient per row). The clip's first frame has no previous-frame
        map and its last no next-frame map, so neither is multiplied."""
        batch_size, num_frames, _, num_patches, _ = maps.shape
        height, width = self.grid_height, self.grid_width
        hidden_size = self.previous_frame_table.shape[-1]
        output = self._zero_features(maps)
        patches = output[:, :, self.num_prefix_tokens :]  # the prefix rows stay 0
        for direction, (table, frames) in enumerate(
            ((self.previous_frame_table, slice(1, num_frames)), (self.next_frame_table, slice(0, num_frames - 1)))
        ):
            if frames.start >= frames.stop:  # a single frame: no neighbour
                continue
            # In the maps' dtype even under autocast: the fold of the windows' gradient into the table then sums
            # in float32 too.
            grid = table.to(maps.dtype).view(2 * height - 1, 2 * width - 1, hidden_size)
            # unfold: [i, column offset, D, local row offset] = grid[i + local row offset, column offset]
            windows = grid.unfold(0, height, 1).permute(0, 3, 1, 2).reshape(height, height * (2 * width - 1), -1)
            features = torch.bmm(self._to_offsets(maps[:, frames, direction], maps.dtype), windows)
            # (h, B * c * w, D) -> (B, c, h, w, D)
            features = features.view(height, batch_size, frames.stop - frames.start, width, -1).permute(1, 2, 0, 3, 4)
            patches[:, frames].add_(features.reshape(batch_size, frames.stop - frames.start, num_patches, -1))
        if num_frames == 1:
            # No neighbour, no features; the tables stay in the graph with a zero gradient, as in the authors' module
            # (DDP without `find_unused_parameters` requires every parameter to get one).
            output = output + self.previous_frame_table[:0].sum() + self.next_frame_table[:0].sum()
        return output

    def _forward_by_row(
        self,
        maps: torch.Tensor,
        directions: tuple[int, ...] = (0, 1),
        skip_clip_ends: bool = False,
        output: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Without gradients for the tables or maps (inference, or frozen tables): the table rows that query row i can
        reach form a contiguous block (grid rows i .. i + h - 1), so the h blocks are one overlapping strided view of
        the table and each direction is one batched matmul over query rows; frames in chunks. `maps[:, :, i]` is the map
        of direction `directions[i]`. The query columns go in two halves: each half reaches w + w/2 - 1 of the 2w - 1
        column offsets, so a copy of those table columns (a few MB) takes a quarter of the matmul's FLOPs (the zeros of
        the unreachable offsets) away. With `skip_clip_ends`, the maps are a whole clip's (both directions): its first
        frame has no previous-frame map and its last no next-frame map (both are zero), so neither is multiplied. The
        features are added into `output` where given."""
        batch_size, num_frames, _, num_patches, _ = maps.shape
        height, width = self.grid_height, self.grid_width
        hidden_size = self.previous_frame_table.shape[-1]
        # The tables and maps are cast before the matmuls' inputs are built from them: autocast would cast those,
        # several times the size (the values are the same).
        dtype = _autocast_dtype(maps)
        groups = _query_column_groups(width)
        tables = (self.previous_frame_table, self.next_frame_table)
        # Per column group: {direction: windows (h, h * m, D)}, for the directions multiplied only.
        windows = [
            {direction: self._table_windows(tables[direction], dtype, columns) for direction in directions}
            for columns in groups
        ]
        # The frames whose map of each direction is multiplied.
        used_frames = {direction: range(num_frames) for direction in directions}
        if skip_clip_ends:
            if directions != (0, 1):
                raise ValueError(f"A whole clip's maps have both directions, got {directions}.")
            used_frames = {0: range(1, num_frames), 1: range(num_frames - 1)}
        if output is None:
            output = self._zero_features(maps)
        patches = output[:, :, self.num_prefix_tokens :].view(batch_size, num_frames, height, width, hidden_size)
        chunk = _frames_per_chunk(
            num_frames, batch_size * num_patches * height * (2 * width - 1), _CROSS_FRAME_CHUNK_ELEMENTS
        )
        for start in range(0, num_frames, chunk):
            stop = min(start + chunk, num_frames)
            for columns, direction_windows in zip(groups, windows):
                for position, direction in enumerate(directions):
                    first, last = max(start, used_frames[direction].start), min(stop, used_frames[direction].stop)
                    if first >= last:
                        continue
                    offsets = self._to_offsets(maps[:, first:last, position], dtype, columns)
                    features = _windows_matmul(offsets, direction_windows[direction])
                    # (h, B * c * g, D) -> (B, c, h, g, D)
                    features = features.view(height, batch_size, last - first, -1, hidden_size).permute(1, 2, 0, 3, 4)
                    patches[:, first:last, :, columns].add_(features)
        return output


class EVLDecoderAttention(nn.Module):
    """Multi-head attention of the query token over the frame features (no self-attention, no attention dropout)."""

    def __init__(self, config: EVLConfig):
        super().__init__()
        self.config = config
        hidden_size = config.vision_config.hidden_size
        self.num_heads = config.decoder_num_heads
        self.head_dim = config.decoder_qkv_dim // config.decoder_num_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.q_proj = nn.Linear(hidden_size, config.decoder_qkv_dim)
        self.k_proj = nn.Linear(hidden_size, config.decoder_qkv_dim)
        self.v_proj = nn.Linear(hidden_size, config.decoder_qkv_dim)
        self.out_proj = nn.Linear(config.decoder_qkv_dim, hidden_size)
        # q.b_k is the same for every key, so it cancels in the softmax: the key bias has an identically zero
        # gradient. It is kept (the authors' checkpoints carry it) but not trained, so no optimizer or DDP sees an
        # unused parameter.
        self.k_proj.bias.requires_grad_(False)

    def forward(
        self, query: torch.Tensor, memory: torch.Tensor, output_attentions: bool = False, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Only the eager path materialises the weights, so it serves calls that ask for them.
        implementation = "eager" if output_attentions else self.config._attn_implementation
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        batch_size, query_length, hidden_size = query.shape
        queries = self.q_proj(query).view(batch_size, query_length, self.num_heads, self.head_dim).transpose(1, 2)
        if implementation in ("eager", "sdpa"):
            # A handful of queries against thousands of frame tokens: instead of projecting every token to keys and
            # values, fold the key projection into the queries and apply the value projection after the weighted
            # sum. q.(W_k x + b_k) = (W_k^T q).x + q.b_k, and the constant q.b_k cancels in the softmax; the weights
            # sum to 1, so sum_i a_i (W_v x_i + b_v) = W_v (sum_i a_i x_i) + b_v. Same attention, ~1/head_dim the
            # FLOPs. The heads become query positions of one shared "head" whose keys and values are the tokens.
            key_weight = self.k_proj.weight.view(self.num_heads, self.head_dim, hidden_size)
            folded = torch.einsum("bhqd,hde->bhqe", queries, key_weight)  # (B, heads, q, D)
            # The tokens are both keys and values: autocast would cast them once for each (and the backward both
            # gradients back), so they are cast once here.
            memory = memory.to(_autocast_dtype(memory))
            if implementation == "eager":
                # Written out, with every head's folded query a row of one matmul against the tokens (a matmul
                # broadcasting the heads would copy the tokens once per head). The returned weights are the tensor
                # the output is computed from, so their gradient can be retained.
                rows = folded.reshape(batch_size, self.num_heads * query_length, hidden_size)
                scores = torch.matmul(rows, memory.transpose(1, 2)) * self.scaling
                scores = scores.view(batch_size, self.num_heads, query_length, -1)
                attn_weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(rows.dtype)
                attn_output = torch.matmul(attn_weights.view(batch_size, self.num_heads * query_length, -1), memory)
                attn_output = attn_output.view(batch_size, self.num_heads, query_length, hidden_size).transpose(1, 2)
            else:
                # sdpa wants matching head counts: the heads become query positions of one key/value "head", the
                # tokens, shared by all of them.
                tokens = memory.unsqueeze(1)
                packed = folded.transpose(1, 2).reshape(batch_size, 1, query_length * self.num_heads, hidden_size)
                attn_output, attn_weights = attention_interface(
                    self, packed, tokens, tokens, None, scaling=self.scaling, dropout=0.0, **kwargs
                )
            attn_output = attn_output.reshape(batch_size, query_length, self.num_heads, hidden_size)
            value_weight = self.v_proj.weight.view(self.num_heads, self.head_dim, hidden_size)
            attn_output = torch.einsum("bqhe,hde->bqhd", attn_output, value_weight) + self.v_proj.bias.view(
                self.num_heads, self.head_dim
            )
        else:
            keys = self.k_proj(memory).view(batch_size, -1, self.num_heads, self.head_dim).transpose(1, 2)
            values = self.v_proj(memory).view(batch_size, -1, self.num_heads, self.head_dim).transpose(1, 2)
            attn_output, attn_weights = attention_interface(
                self, queries, keys, values, None, scaling=self.scaling, dropout=0.0, **kwargs
            )
        attn_output = attn_output.reshape(batch_size, query_length, -1).contiguous()
        return self.out_proj(attn_output), attn_weights


class EVLDecoderMLP(nn.Module):
    def __init__(self, config: EVLConfig):
        super().__init__()
        hidden_size = config.vision_config.hidden_size
        intermediate_size = round(config.decoder_mlp_factor * hidden_size)
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.activation_fn = ACT2FN["quick_gelu"]
        self.dropout = nn.Dropout(config.decoder_mlp_dropout)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(self.activation_fn(self.fc1(hidden_states))))


class EVLDecoderLayer(GradientCheckpointingLayer):
    """
    One decoder layer, paired with one backbone block. It builds its keys/values from that block's frame features
    plus the enabled temporal terms (each computed from the unmodified features and summed into a tensor of the
    layer's own, so gradients into the backbone stay correct when it is fine-tuned), then updates the query (`attend`):
    pre-LN cross-attention, then MLP.
    """

    def __init__(self, config: EVLConfig):
        super().__init__()
        hidden_size = config.vision_config.hidden_size
        self.temporal_conv = EVLTemporalConv(config) if config.use_temporal_conv else None
        self.temporal_position_embedding = (
            EVLTemporalPositionEmbedding(config) if config.use_temporal_pos_embed else None
        )
        self.cross_frame_attention = EVLCrossFrameAttention(config) if config.use_temporal_cross_attention else None
        self.query_layernorm = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.frame_layernorm = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.cross_attention = EVLDecoderAttention(config)
        self.mlp_layernorm = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.mlp = EVLDecoderMLP(config)

    def forward(
        self,
        query: torch.Tensor,
        frame_features: torch.Tensor,
        cross_frame_maps: torch.Tensor | None = None,
        output_attentions: bool = False,
        cross_frame_features: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        num_frames = frame_features.shape[1]
        # The terms are summed into one new tensor, the first term out of place (the features stay unmodified, so a
        # trained backbone's gradient is right), the others in place: the same additions in the same order as
        # `features + conv + position + cross-frame`, without a window-sized tensor per term (at inference over many
        # windows, fresh tensors that size cost more in page faults than the additions themselves).
        def add(memory: torch.Tensor | None, term: torch.Tensor) -> torch.Tensor:
            if memory is None:
                return frame_features + term
            # In place unless the sum is of a wider dtype (a bf16 memory and a float32 term): promoted as before.
            return memory.add_(term) if _sums_in_place(memory, term.dtype) else memory + term

        memory = None
        if self.temporal_conv is not None:
            memory = self.temporal_conv(frame_features, add_input=True)
        if self.temporal_position_embedding is not None:
            memory = add(memory, self.temporal_position_embedding(num_frames)[:, None, :])
        if self.cross_frame_attention is not None:
            if cross_frame_features is None and memory is not None:
                memory = self.cross_frame_attention.add_to(memory, cross_frame_maps)
            else:
                if cross_frame_features is None:
                    cross_frame_features = self.cross_frame_attention(cross_frame_maps)
                memory = add(memory, cross_frame_features)
        return self.attend(query, frame_features if memory is None else memory, output_attentions, **kwargs)

    def attend(
        self, query: torch.Tensor, memory: torch.Tensor, output_attentions: bool = False, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The query's update from the keys/values `memory` (B, T, tokens, D), the frame features with the temporal
        terms added (`evl_hf.timeline` builds them itself, sharing what windows have in common)."""
        batch_size, num_frames, num_tokens, hidden_size = memory.shape
        memory = memory.reshape(batch_size, num_frames * num_tokens, hidden_size)
        attn_output, attn_weights = self.cross_attention(
            self.query_layernorm(query), self.frame_layernorm(memory), output_attentions, **kwargs
        )
        query = query + attn_output
        query = query + self.mlp(self.mlp_layernorm(query))
        return query, attn_weights


# `from_backbone_pretrained`: the arguments it passes on to the backbone's loading, and the names its configuration
# takes (any other is refused by name, rather than written into the configuration).
_BACKBONE_LOADING_ARGUMENTS = (*HUB_FILE_ARGUMENTS, "use_safetensors", "attn_implementation")
_EVL_CONFIG_ARGUMENTS = {field.name for field in dataclasses.fields(EVLConfig)} | {
    "num_labels", "output_attentions", "preset", "config",
}  # fmt: skip


# transformers' function that installs one output recorder (its name is misspelled in the versions we support).
_install_output_recorder = getattr(output_capturing, "install_output_capuring_hook", None) or getattr(
    output_capturing, "install_output_capturing_hook", None
)
_OUTPUT_RECORDER_ARGUMENTS = ("key", "index", "capture_initial_hidden_state")


class _PicklableOutputRecorder:
    """
    One of transformers' output-recording forward hooks, which pickles as the arguments that rebuild it. The hooks are
    closures, so a model holding them cannot be pickled (`torch.save(model)`, multiprocessing, job libraries). Where
    transformers installs them on the first call asking for outputs, a fresh model escapes that; EVL installs them at
    construction (see `EVLModel.__init__`), so it wraps them.
    """

    def __init__(self, key: str, index: int, capture_initial_hidden_state: bool, hook: Callable | None = None):
        self.arguments = (key, index, capture_initial_hidden_state)
        if hook is None:
            # transformers' own hook for these arguments, taken from a module it is installed on for the purpose.
            carrier = nn.Module()
            _install_output_recorder(carrier, *self.arguments)
            (hook,) = carrier._forward_hooks.values()
        self.hook = hook

    def __call__(self, module: nn.Module, args: tuple, output):
        return self.hook(module, args, output)

    def __reduce__(self):
        return type(self), self.arguments


def _make_output_recorders_picklable(model: nn.Module) -> None:
    """Wrap the output recorders transformers installed on `model`'s modules in `_PicklableOutputRecorder`s. A hook
    whose arguments cannot be read (another transformers version) is left as it is: the model then only fails to
    pickle, as before."""
    if _install_output_recorder is None:
        return
    for module in model.modules():
        for hook_id, hook in module._forward_hooks.items():
            if getattr(hook, "__name__", None) != "output_capturing_hook" or hook.__closure__ is None:
                continue
            captured = inspect.getclosurevars(hook).nonlocals
            if all(name in captured for name in _OUTPUT_RECORDER_ARGUMENTS):
                arguments = [captured[name] for name in _OUTPUT_RECORDER_ARGUMENTS]
                module._forward_hooks[hook_id] = _PicklableOutputRecorder(*arguments, hook=hook)


# Vision-config fields the towers EVL builds never read: CLIP's projection width (the two-tower model's), ViT's pooler
# and masked-image-modelling stride (heads not built), DINOv2's layer-scale value (the initial value of loaded
# parameters) and its final norm and output reshaping (EVL reads the blocks' outputs).
_FIELDS_THE_TOWER_DOES_NOT_RUN = {
    "projection_dim", "pooler_output_size", "pooler_act", "encoder_stride", "layerscale_value", "apply_layernorm",
    "reshape_hidden_states",
}  # fmt: skip


def _architecture_differences(given: PreTrainedConfig, checkpoint: PreTrainedConfig) -> list[str]:
    """
    The fields of a vision config's own class (not those every config has: `dtype`, `architectures`, ...) in which
    `given` differs from a backbone `checkpoint`'s, as "field: config X vs checkpoint Y". Initialisers, dropout
    rates and fields the tower does not run are left out: they change neither the weights loaded nor the frozen
    tower's features. So is the attention implementation, which is no field.
    """
    if given.model_type != checkpoint.model_type:
        return [f"model_type: config {given.model_type!r} vs checkpoint {checkpoint.model_type!r}"]
    common = {field.name for field in dataclasses.fields(PreTrainedConfig)}
    return [
        f"{field.name}: config {getattr(given, field.name)!r} vs checkpoint {getattr(checkpoint, field.name)!r}"
        for field in dataclasses.fields(given)
        if field.name not in common | _FIELDS_THE_TOWER_DOES_NOT_RUN
        and not field.name.startswith("_")
        and not any(word in field.name for word in ("initializer", "dropout", "drop_path"))
        and _setting(given, field.name) != _setting(checkpoint, field.name)
    ]


def _setting(config: PreTrainedConfig, name: str):
    """A config field as compared between configs: a pair read back from config.json is a list, and a ViT's square
    `image_size` / `patch_size` is the same given as one number or as a pair."""
    if name in ("image_size", "patch_size"):
        try:
            return square_side(config, name)
        except ValueError:  # not square: compared as it is
            pass
    value = getattr(config, name)
    return tuple(value) if isinstance(value, list) else value


@contextlib.contextmanager
def _loading_report_logged_on_error():
    """Hold back the loading report transformers logs (its table of a checkpoint's unexpected, missing and mismatched
    tensors) while the block runs, and log it only if the block raises."""
    loading_logger = logging.get_logger(PreTrainedModel.__module__)  # the one `from_pretrained` logs the report to
    held, loading_thread = [], threading.get_ident()

    def hold(record) -> bool:
        # Only this load's: another thread's `from_pretrained` logs to the same logger meanwhile.
        if record.funcName != log_state_dict_report.__name__ or record.thread != loading_thread:
            return True
        held.append(record)
        return False

    loading_logger.addFilter(hold)
    try:
        yield
    except BaseException:
        loading_logger.removeFilter(hold)
        for record in held:
            loading_logger.handle(record)
        raise
    finally:
        loading_logger.removeFilter(hold)


def problem_type_without_labels(config: PreTrainedConfig) -> str | None:
    """`config.problem_type`, or where it is unset what transformers' classification losses take a model's outputs
    for whatever the labels: a regression for one output. None where that depends on the labels' dtype. The
    pipelines score outputs by it, as the model trains them."""
    if config.problem_type is None and config.num_labels == 1:
        return "regression"
    return config.problem_type


def _single_device(device_map) -> torch.device | None:
    """The device a `device_map` places a model built in one piece on: a device, its name or index, a map of every
    module to one device (`{"": 0}`), or "auto" (the accelerator if there is one); `None` without one."""
    if device_map is None:
        return None
    if isinstance(device_map, dict) and len({str(device) for device in device_map.values()}) == 1:
        device_map = next(iter(device_map.values()))
    if device_map == "auto":
        accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        return accelerator or torch.device("cpu")
    if isinstance(device_map, str) and device_map in ("balanced", "balanced_low_0", "sequential"):
        raise ValueError(f"`device_map={device_map!r}` spreads a model over devices; `from_backbone_pretrained` builds "
                         "one in one piece: give one device.")  # fmt: skip
    if isinstance(device_map, (str, int, torch.device)):
        return torch.device(device_map)
    raise ValueError(
        f"`device_map` {device_map!r}: `from_backbone_pretrained` builds a model in one piece; give one device."
    )


def _preload_offloaded_decoder_layers(model: nn.Module) -> None:
    """
    Make a model loaded with offloaded decoder layers (`device_map` sending them to "disk", or to "cpu" while the
    model runs on an accelerator) load all of each such layer's weights when the layer runs. accelerate's hooks load a
    module's own tensors at that module's forward only, but a layer reads its children's weights itself (the folded
    key/value projections, the temporal convolution's taps) and calls a child's method instead of its forward
    (`EVLCrossFrameAttention.add_to`): this is accelerate's `preload_module_classes`, which transformers does not pass
    to `dispatch_model`.
    """
    if not getattr(model, "hf_device_map", None):  # set by accelerate's dispatch only
        return
    for name, layer in model.named_modules():
        if not isinstance(layer, EVLDecoderLayer):
            continue
        holders = [module for module in layer.modules() if next(module.parameters(recurse=False), None) is not None]
        offloaded = [module for module in holders if has_offloaded_params(module)]
        if not offloaded:
            continue
        if len(offloaded) < len(holders):
            # The hooks re-attached below load the whole layer from the offloaded weights, which hold only part of it.
            raise ValueError(
                f"The `device_map` offloads part of `{name}` and keeps the rest on a device: an EVL decoder layer is "
                "one block (`_no_split_modules`, which `device_map=\"auto\"` respects); give the whole layer one "
                f'place, e.g. "{name}": "disk".'
            )
        hook = offloaded[0]._hf_hook
        remove_hook_from_submodules(layer)
        attach_align_device_hook(
            layer, execution_device=hook.execution_device, offload=True,
            weights_map=hook.weights_map.dataset,  # the whole model's, which `module_name` prefixes again
            offload_buffers=hook.offload_buffers, module_name=name, skip_keys=hook.skip_keys,
            preload_module_classes=[type(layer).__name__], tied_params_map=hook.tied_params_map,
        )  # fmt: skip


class EVLPreTrainedModel(PreTrainedModel):
    config: EVLConfig
    config_class = EVLConfig
    base_model_prefix = "evl"
    main_input_name = "pixel_values"
    input_modalities = ("video",)
    supports_gradient_checkpointing = True
    # `EVLModel.forward(**kwargs)` only forwards attention kwargs and computes no loss: without this, `Trainer` would
    # read the `**kwargs` as taking `num_items_in_batch`. `EVLForVideoClassification` takes it.
    accepts_loss_kwargs = False
    _no_split_modules = [
        "CLIPEncoderLayer", "CLIPVisionEmbeddings", "SiglipEncoderLayer", "SiglipVisionEmbeddings", "Dinov2Layer",
        "Dinov2Embeddings", "Dinov2WithRegistersLayer", "Dinov2WithRegistersEmbeddings", "ViTLayer", "ViTEmbeddings",
        "EVLDecoderLayer",
    ]  # fmt: skip
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # Hidden states are the decoder's query states (the initial query, then each layer's output); attentions are the
    # weights of each layer's query over the frame tokens.
    _can_record_outputs = {
        "hidden_states": OutputRecorder(EVLDecoderLayer, index=0, num_hidden_layers_key="decoder_num_layers"),
        "attentions": OutputRecorder(EVLDecoderAttention, index=1),
    }

    def __init__(self, config: EVLConfig, *inputs, **kwargs):
        # `from_pretrained` sets its keyword arguments on a config already built, and fields can be set by hand:
        # checked here as `EVLConfig(...)` checks them, a `ValueError` naming the field.
        config.check_architecture()
        super().__init__(config, *inputs, **kwargs)

    def _set_gradient_checkpointing(
        self,
        enable: bool = True,
        gradient_checkpointing_func: Callable = activation_checkpoint,
        every_n_layers: int = 1,
    ):
        super()._set_gradient_checkpointing(enable, gradient_checkpointing_func, every_n_layers)
        # The backbone's blocks are checkpointed non-reentrantly whatever was asked: behind frozen blocks (a backbone
        # with `freeze_backbone=False` trained in part, or only through adapters) a block's input needs no gradient,
        # and a reentrant checkpoint would then record no graph for it, leaving its trainable tensors without
        # gradients. (A `freeze_backbone=True` backbone stays in eval mode, which transformers never checkpoints.)
        non_reentrant = functools.partial(gradient_checkpointing_func, use_reentrant=False)
        for module in self.base_model.vision_model.modules():
            if hasattr(module, "gradient_checkpointing"):
                module._gradient_checkpointing_func = non_reentrant

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """
        `PreTrainedModel.from_pretrained`, stricter: a checkpoint that lacks decoder or backbone tensors, or whose
        tensors do not fit the configuration, raises `EVLCheckpointError` listing them instead of leaving freshly
        initialised weights behind (only the classification head may be new: from a checkpoint saved without one, an
        `EVLModel`'s or a classifier's with `num_labels=0`, or with `ignore_mismatched_sizes=True`, which allows no
        other mismatch). A truncated or corrupt weights file is named in the error. With `output_loading_info=True`
        missing keys are reported in the returned info instead, for the caller to handle.
        """
        output_loading_info = kwargs.pop("output_loading_info", False)
        checkpoint_keys = None
        if kwargs.get("state_dict") is None and pretrained_model_name_or_path is not None:
            # The revision resolved to its commit once, here, and handed to the loader (which then does not resolve
            # it again): the files checked below are the ones it loads, and cached ones are used without asking the
            # Hub again. Local directories keep theirs.
            revision = resolve_revision(
                str(pretrained_model_name_or_path), kwargs.get("revision"), token=kwargs.get("token"),
                cache_dir=kwargs.get("cache_dir"),
                local_files_only=bool(kwargs.get("local_files_only")) or is_offline_mode(),
            )  # fmt: skip
            if revision is not None:
                kwargs["revision"] = revision
            checkpoint_keys = cls._check_checkpoint_files(pretrained_model_name_or_path, kwargs)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        # With output_loading_info=True the caller asked for the report and handles missing keys itself.
        if pretrained_model_name_or_path is not None and kwargs.get("state_dict") is None and not output_loading_info:
            missing = info.get("missing_keys", [])
            # A new head for a checkpoint saved without one (an `EVLModel`'s, whose keys lack the classifier's `evl.`
            # prefix; `architectures` where no safetensors header was read); a classifier's that lacks any part of
            # its head is damaged.
            if checkpoint_keys:
                classifier_layout = (f"{EVLForVideoClassification.base_model_prefix}.", *_HEAD_PREFIXES)
                saved_without_head = not any(key.startswith(classifier_layout) for key in checkpoint_keys)
            else:
                saved_without_head = EVLForVideoClassification.__name__ not in (model.config.architectures or [])
            head = [key for key in model.state_dict() if key.startswith(_HEAD_PREFIXES)]
            if saved_without_head and sum(key.startswith(_HEAD_PREFIXES) for key in missing) == len(head):
                missing = [key for key in missing if not key.startswith(_HEAD_PREFIXES)]
            elif any(key.startswith("classifier.") for key in missing) and cls._saved_headless(
                pretrained_model_name_or_path, kwargs
            ):
                # A classifier saved with `num_labels=0` has a LayerNorm but no linear layer (an identity): a new one.
                missing = [key for key in missing if not key.startswith("classifier.")]
            # The loader re-initialises every mismatched tensor under `ignore_mismatched_sizes`: only the head may be.
            mismatched = [
                f"{key}: checkpoint {tuple(found)} vs model {tuple(expected)}"
                for key, found, expected in sorted(info.get("mismatched_keys", []), key=lambda item: item[0])
                if not (kwargs.get("ignore_mismatched_sizes") and key.startswith(_HEAD_PREFIXES))
            ]
            if missing or mismatched:
                raise EVLCheckpointError(
                    f"{pretrained_model_name_or_path}: the checkpoint does not fit {cls.__name__}; refusing to leave "
                    "randomly initialised weights in their place."
                    + (f"\n  missing: {sorted(missing)}" if missing else "")
                    + (f"\n  shape mismatch: {mismatched}" if mismatched else "")
                )
        _preload_offloaded_decoder_layers(model)
        # Loading may replace parameters; the frozen backbone must stay frozen whatever the loader did.
        for module in model.modules():
            if isinstance(module, EVLModel):
                module._apply_backbone_freeze()
        return (model, info) if output_loading_info else model

    @classmethod
    def _saved_headless(cls, pretrained_model_name_or_path, kwargs: dict) -> bool:
        """Whether the checkpoint's own config.json (not `kwargs`' overrides or `config=`) has `num_labels=0`."""
        hub_kwargs = {key: kwargs[key] for key in _HUB_KWARGS if kwargs.get(key) is not None}
        try:
            config = cls.config_class.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        except OSError:
            return False  # no config.json of its own (a weights file given with `config=`): nothing says so
        return config.num_labels == 0

    @classmethod
    def _checkpoint_weight_files(cls, name: str, kwargs: dict, hub_kwargs: dict, explicit: str | None) -> list[str]:
        """The safetensors files `from_pretrained` will load, found as the loader finds them: a weights file given
        itself; else, in a local directory or a Hub id's files (from the cache, or downloaded into it), the file the
        configuration names (`transformers_weights`), else one weights file, else a sharded checkpoint's index, for
        `kwargs`' subfolder and variant. Empty where the loader reads something else (`use_safetensors=False`, a GGUF
        file) or nothing is found: the loader reports it."""
        if kwargs.get("use_safetensors") is False or kwargs.get("gguf_file") is not None:
            return []
        if not Path(name).is_dir():
            given = Path(kwargs.get("subfolder") or "", name)
            if given.is_file():  # a weights file given itself, which the loader takes as it is
                return [str(given)] if given.suffix == ".safetensors" else []
            if kwargs.get("force_download"):
                return []  # the loader downloads anew: a cached copy would be the wrong one to judge

        def resolve(filename: str) -> str | None:
            return cached_file(
                name, filename, _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False, _raise_exceptions_for_gated_repo=False, **hub_kwargs,
            )  # fmt: skip

        variant = kwargs.get("variant")
        if explicit is not None:
            if Path(explicit).is_absolute() or ".." in Path(explicit).parts:
                return []  # outside the checkpoint: the loader refuses it with its own message
            found = resolve(explicit)
            index = found if explicit.endswith(".safetensors.index.json") else None
            if index is None:
                return [found] if found is not None and explicit.endswith(".safetensors") else []
        else:
            weights = resolve(_with_variant("model.safetensors", variant))
            if weights is not None:
                return [weights]
            index = resolve(_with_variant("model.safetensors.index.json", variant))
        if index is None:
            return []
        shards = sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
        return [file for file in map(resolve, shards) if file is not None]

    @classmethod
    def _check_checkpoint_files(cls, pretrained_model_name_or_path, kwargs: dict) -> set[str]:
        """
        Read a checkpoint's safetensors headers before loading it, so that what is wrong is found in the files
        rather than guessed from the loader's error messages: an unreadable file, or tensors whose shapes do not fit
        the configuration (with `kwargs`' overrides applied; but for the classification head's under
        `ignore_mismatched_sizes`), raise `EVLCheckpointError` naming them. Returns the tensors' names (empty where
        no safetensors file is read).
        """
        name = str(pretrained_model_name_or_path)
        hub_kwargs = {key: kwargs[key] for key in _HUB_KWARGS if kwargs.get(key) is not None}
        config = kwargs.get("config")
        if not isinstance(config, PreTrainedConfig):
            # The configuration the loader builds: the checkpoint's, or the one `config=` names, with the overrides.
            defaults = cls.config_class()
            overrides = {key: value for key, value in kwargs.items() if hasattr(defaults, key)}
            config = cls.config_class.from_pretrained(name if config is None else config, **hub_kwargs, **overrides)
        files = cls._checkpoint_weight_files(name, kwargs, hub_kwargs, getattr(config, "transformers_weights", None))
        shapes = {}
        for file in files:
            try:
                with safe_open(file, framework="pt") as handle:
                    shapes.update((key, tuple(handle.get_slice(key).get_shape())) for key in handle.keys())
            except SafetensorError as error:
                raise EVLCheckpointError(f"{file}: the weights file is truncated or corrupt ({error}).") from error
        if not shapes:
            return set()
        with torch.device("meta"):
            expected = {key: tuple(value.shape) for key, value in cls(config).state_dict().items()}
        prefix = f"{cls.base_model_prefix}."
        mismatched = {}
        for key, shape in shapes.items():
            # An EVLModel checkpoint in an EVLForVideoClassification, or the other way round.
            name = next((k for k in (key, prefix + key, key.removeprefix(prefix)) if k in expected), None)
            if name is not None and expected[name] != shape:
                mismatched[name] = shape
        if kwargs.get("ignore_mismatched_sizes"):
            mismatched = {name: shape for name, shape in mismatched.items() if not name.startswith(_HEAD_PREFIXES)}
        if not mismatched:
            return set(shapes)
        lines = "".join(f"\n  {key}: checkpoint {shape} vs model {expected[key]}" for key, shape in mismatched.items())
        if all(name.startswith(_HEAD_PREFIXES) for name in mismatched):
            hint = " (pass ignore_mismatched_sizes=True to re-initialise the classification head, e.g. for new labels)"
        else:
            # The flag would re-initialise trained decoder or backbone tensors: it does not apply, and is not offered.
            hint = ""
            position_embeddings = [
                shape for name, shape in mismatched.items() if name.endswith("temporal_position_embedding.embedding")
            ]
            saved_frames = position_embeddings[0][0] if position_embeddings else None
            if saved_frames is not None and saved_frames != config.num_frames:
                lines += (
                    f"\n  num_frames={config.num_frames} need not be changed to run {config.num_frames}-frame clips: "
                    "the temporal position embeddings are interpolated to any frame count at run time. Load the "
                    f"checkpoint with its own num_frames ({saved_frames})."
                )
        raise EVLCheckpointError(
            f"{pretrained_model_name_or_path}: tensors do not fit the configuration{hint}:{lines}"
        )

    @classmethod
    def is_custom_code(cls) -> bool:
        # transformers treats models defined outside it as code whose `_init_weights` may write tensors in place, and
        # then skips every module without parameters of its own, for the backbone too: CLIP initialises its attention
        # and MLP projections from those parameter-less parents, so weights missing from a checkpoint would get
        # another distribution than at construction. EVL's and CLIP's `_init_weights` both go through
        # `transformers.initialization`, which never overwrites a loaded tensor, so they need no such guard.
        return False

    def _init_weights(self, module):
        # Initialised where each tensor is owned, so that weights missing from a checkpoint get the same values.
        # The backbone is a `PreTrainedModel` of its own and is initialised by its family's rules.
        if module is getattr(self, "classifier", None) and isinstance(module, nn.Linear):  # `num_labels=0`: none
            init.normal_(module.weight, std=self.config.initializer_range)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            # As the authors' decoder: Xavier-uniform projections, zero biases.
            init.xavier_uniform_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Conv1d):
            # The temporal convolution keeps PyTorch's default initialisation, as the authors'.
            init.kaiming_uniform_(module.weight, a=5**0.5)
            bound = (module.weight.shape[1] * module.weight.shape[2]) ** -0.5
            init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, EVLTemporalPositionEmbedding):
            init.zeros_(module.embedding)
        elif isinstance(module, EVLCrossFrameAttention):
            init.zeros_(module.previous_frame_table)
            init.zeros_(module.next_frame_table)
            columns = torch.arange(module.grid_width)
            init.copy_(module.column_offsets, columns[:, None] - columns[None, :] + module.grid_width - 1)
        elif isinstance(module, EVLDecoder):
            init.zeros_(module.query)


class EVLDecoder(nn.Module):
    """The learned query token and one `EVLDecoderLayer` per used backbone block."""

    def __init__(self, config: EVLConfig):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(config.vision_config.hidden_size))
        self.layers = nn.ModuleList([EVLDecoderLayer(config) for _ in range(config.decoder_num_layers)])

    def forward(
        self,
        frame_features: torch.Tensor | Sequence[torch.Tensor],
        cross_frame_maps: torch.Tensor | Sequence[torch.Tensor] | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        cross_frame_features: torch.Tensor | Sequence[torch.Tensor] | None = None,
        **kwargs,
    ) -> BaseModelOutput:
        """
        `frame_features`, `cross_frame_maps` (and `cross_frame_features`, which replace the maps) as in
        [`EVLBackboneFeatures`], or as one tensor per block (what `EVLModel` passes from its own backbone pass: it
        does not stack them); layer `i` reads block `i`'s. Returns the query token after the last layer,
        `(batch_size, 1, hidden_size)`. The states and attention weights of each layer are recorded by [`EVLModel`]
        (`output_hidden_states`, `output_attentions`).
        """

        def per_layer(features):
            if features is None:
                return [None] * len(self.layers)
            features = features.unbind(1) if isinstance(features, torch.Tensor) else features
            if len(features) != len(self.layers):
                raise ValueError(f"The decoder's {len(self.layers)} layers read one block each, got {len(features)}.")
            return features

        frame_features, cross_frame_maps, cross_frame_features = (
            per_layer(features) for features in (frame_features, cross_frame_maps, cross_frame_features)
        )
        query = self.query.view(1, 1, -1).expand(frame_features[0].shape[0], 1, -1)
        for layer, features, maps, features_across_frames in zip(
            self.layers, frame_features, cross_frame_maps, cross_frame_features, strict=True
        ):
            query, _ = layer(
                query,
                features,
                maps,
                bool(output_attentions),  # the eager path, which materialises the weights
                features_across_frames,
                **kwargs,
            )
        return BaseModelOutput(last_hidden_state=query)


class EVLModel(EVLPreTrainedModel):
    """
    The image backbone (CLIP by default, or another family of `evl_hf.backbone_families`) and the EVL decoder,
    without a classification head. Returns the video embedding (the final query token).

    `pixel_values` has shape `(batch_size, num_frames, num_channels, height, width)`, normalised as the backbone
    expects (`EVLVideoProcessor`), at `config.frame_size`. Any frame count works; see `EVLConfig.num_frames`.
    """

    def __init__(self, config: EVLConfig):
        super().__init__(config)
        # The trainable decoder is registered first: it is what `modules()` / `named_parameters()` consumers (optimizers,
        # gradient checkpointing, parameter summaries) meet first, while the frozen backbone runs under no_grad.
        self.decoder = EVLDecoder(config)
        # In the model's dtype (the decoder's), not in the one `vision_config.dtype` records: a backbone loaded from a
        # bfloat16 checkpoint records bfloat16. `backbone_dtype` casts it below.
        self.vision_model = backbone_family(config.vision_config).build(
            config.vision_config, dtype=self.decoder.query.dtype
        )
        self.post_init()
        # transformers installs its output recorders on the first call that asks for them, under a lock that
        # torch.compile(fullgraph=True) cannot trace: install them now, in a form that pickles.
        maybe_install_capturing_hooks(self)
        _make_output_recorders_picklable(self)
        self._apply_backbone_freeze()

    def _apply_backbone_freeze(self) -> None:
        if self.config.freeze_backbone:
            self.vision_model.requires_grad_(False)
            self.vision_model.eval()
        else:
            # A trained backbone: what EVL never runs would be a parameter without a gradient, which DDP refuses
            # (Trainer turns `find_unused_parameters` off under gradient checkpointing).
            parameters = dict(self.vision_model.named_parameters())
            for name in backbone_family(self.config.vision_config).unused_parameters(self.vision_model):
                parameters[name].requires_grad_(False)
        backbone_dtype = resolve_backbone_dtype(self.config.backbone_dtype, self.vision_model.dtype)
        if backbone_dtype is not None:
            self.vision_model.to(backbone_dtype)
        for layer in self.decoder.layers:
            layer.cross_attention.k_proj.bias.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.config.freeze_backbone:
            # Dropout or other train-time behaviour must never reach a frozen backbone.
            self.vision_model.eval()
        return self

    def get_input_embeddings(self) -> nn.Module:
        return self.vision_model.get_input_embeddings()

    def check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        """Validate a batch of clips once, at the boundary, with an error that says what is wrong."""
        vision_config = self.config.vision_config
        expected = (
            f"(batch_size, num_frames, {vision_config.num_channels}, {self.config.frame_size}, "
            f"{self.config.frame_size})"
        )
        if not isinstance(pixel_values, torch.Tensor):
            raise EVLInputError(f"`pixel_values` must be a torch.Tensor of shape {expected}, got {type(pixel_values)}.")
        if pixel_values.ndim != 5:
            raise EVLInputError(
                f"`pixel_values` must have 5 dimensions {expected}, got shape {tuple(pixel_values.shape)}."
            )
        if pixel_values.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise EVLInputError(
                "`pixel_values` must be a float16, bfloat16, float32 or float64 tensor of normalised pixels, got "
                f"dtype {pixel_values.dtype}. Run the clip through `EVLVideoProcessor` first."
            )
        batch_size, num_frames, num_channels, height, width = pixel_values.shape
        if batch_size == 0 or num_frames == 0:
            raise EVLInputError(f"`pixel_values` is empty: shape {tuple(pixel_values.shape)}, expected {expected}.")
        if num_channels != vision_config.num_channels:
            raise EVLInputError(
                f"`pixel_values` has {num_channels} channels in dimension 2, the backbone expects "
                f"{vision_config.num_channels}: expected shape {expected}, got {tuple(pixel_values.shape)}."
            )
        if height != self.config.frame_size or width != self.config.frame_size:
            raise EVLInputError(
                f"Frames are {height}x{width}, but this model's backbone and cross-frame attention tables are built "
                f"for {self.config.frame_size}x{self.config.frame_size}. Resize/crop the clip to that size "
                "(`EVLVideoProcessor` does)."
            )
        if not (is_tracing(pixel_values) or pixel_values.is_meta):
            # Only where there are values to read: not in a compiled graph, nor for fake (memory estimation) or meta
            # (shape inference) tensors. The extremes are finite exactly when every value is (NaN propagates to
            # both): one reduction, where `isfinite(...).all()` makes several passes and writes clip-sized masks.
            smallest, largest = torch.aminmax(pixel_values)
            if not (torch.isfinite(smallest) and torch.isfinite(largest)):
                raise EVLInputError("`pixel_values` contains NaN or infinite values.")

    def check_autocast(self) -> None:
        """Refuse a float16 decoder under bf16 CPU autocast, or the reverse, with an error that says what to do: CPU
        autocast cannot mix the two half-precision dtypes, and the forward would stop deep inside (a mixed-dtype
        LayerNorm, or autocast's "Unexpected floating ScalarType", as for any transformers model cast that way on
        the CPU). Other devices' autocast is left to run as it does. A half-precision backbone with a float32 decoder
        is fine on any device: the backbone runs outside autocast (`_backbone_autocast`)."""
        decoder_dtype = self.decoder.query.dtype
        if self.decoder.query.device.type == "cpu" and _autocast_to_other_half_precision("cpu", decoder_dtype):
            decoder_name = str(decoder_dtype).removeprefix("torch.")
            autocast_name = str(torch.get_autocast_dtype("cpu")).removeprefix("torch.")
            raise ValueError(
                f"The decoder is {decoder_name}, but CPU autocast is on with {autocast_name}: autocast cannot mix "
                f"float16 and bfloat16. Keep the decoder in float32 and cast the backbone alone (`backbone_dtype`), or "
                f"run under autocast to {decoder_name}."
            )

    def extract_backbone_features(self, pixel_values: torch.Tensor) -> EVLBackboneFeatures:
        """
        Run the backbone once over every frame and return what the decoder reads from its last `decoder_num_layers`
        blocks: each block's output (all tokens) and, when cross-frame attention is used, the attention maps between
        neighbouring frames computed from that block's own attention queries and keys. Both come in the decoder's
        dtype; the maps' scores are computed in the backbone's. `pixel_values` is checked as the forward checks it:
        features of frames the model refuses would otherwise be cached.
        """
        self.check_pixel_values(pixel_values)
        self.check_autocast()
        return self._extract_backbone_features(pixel_values, self.decoder.query.dtype)

    def reduced_precision_inference_dtype(self) -> torch.dtype | None:
        """
        The dtype the decoder's cross-frame module computes in at inference: a frozen float16/bfloat16 backbone's
        (`backbone_dtype`) when no gradient is recorded and the decoder is float32, `None` (the decoder's own dtype)
        otherwise. That module is the decoder's one large matmul; next to a backbone that fast, it would cost a
        third of the decoder in float32. The rest of the decoder (elementwise work, LayerNorms, the attention of a
        single query) is no faster in bf16 on CPUs and stays in float32, as does training. `None` too under autocast
        to the other half-precision dtype (see `_backbone_autocast`): autocast then sets the module's dtype.
        """
        backbone_dtype = self.vision_model.dtype
        device_type = self.vision_model.device.type
        if (
            backbone_dtype in (torch.float16, torch.bfloat16)
            and self.config.freeze_backbone
            and self.decoder.query.dtype == torch.float32
            and not torch.is_grad_enabled()
            and not _autocast_to_other_half_precision(device_type, backbone_dtype)
        ):
            return backbone_dtype
        return None

    def _extract_backbone_features(self, pixel_values: torch.Tensor, maps_dtype: torch.dtype) -> EVLBackboneFeatures:
        block_features, block_maps = self._backbone_features_per_block(pixel_values, maps_dtype)
        return EVLBackboneFeatures(
            frame_features=torch.stack(block_features, dim=1),
            cross_frame_maps=torch.stack(block_maps, dim=1) if block_maps is not None else None,
        )

    def _backbone_features_per_block(
        self, pixel_values: torch.Tensor, maps_dtype: torch.dtype
    ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """What `extract_backbone_features` returns, unstacked: per block the decoder reads, its output
        `(batch_size, num_frames, tokens, hidden)` in the decoder's dtype (float32 unless the whole model was cast),
        whatever the backbone's, and its maps `(batch_size, num_frames, 2, patches, patches)` in `maps_dtype`, the
        dtype the cross-frame module computes in (see `reduced_precision_inference_dtype`; `None` without
        cross-frame attention). The decoder reads them as they are, so the forward copies no feature into a stack."""
        batch_size, num_frames = pixel_values.shape[:2]
        block_outputs, block_maps = [], []

        def as_clips(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.view(batch_size, num_frames, *tensor.shape[1:])

        def read_block(output: torch.Tensor, query: torch.Tensor | None, key: torch.Tensor | None) -> None:
            block_outputs.append(output)
            if query is not None:
                # Right after the block, so its queries and keys are freed before the next block runs instead of
                # all being held through the rest of the backbone (a sixth of the forward's peak memory).
                block_maps.append(
                    cross_frame_attention_maps(as_clips(query), as_clips(key), self.config.num_prefix_tokens).to(
                        maps_dtype
                    )
                )

        self._backbone_blocks(pixel_values.flatten(0, 1), read_block)
        # Cast once the backbone is done: a reduced-precision backbone's outputs are held in its dtype until then.
        return [as_clips(output).to(self.decoder.query.dtype) for output in block_outputs], block_maps or None

    def _run_backbone(self, frames: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """
        The backbone over independent frames `(N, C, H, W)`: the outputs `(N, tokens, hidden)` of the blocks the
        decoder reads, and, with cross-frame attention, those blocks' queries and keys `(N, tokens, heads, head_dim)`
        (empty lists otherwise), in the backbone's dtype. Frames never interact here, so a long video can be run in
        any batches of frames (`evl_hf.timeline`).
        """
        block_outputs, queries, keys = [], [], []

        def keep(output: torch.Tensor, query: torch.Tensor | None, key: torch.Tensor | None) -> None:
            block_outputs.append(output)
            if query is not None:
                queries.append(query)
                keys.append(key)

        self._backbone_blocks(frames, keep)
        return block_outputs, queries, keys

    def _backbone_blocks(
        self,
        frames: torch.Tensor,
        read_block: Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None], None],
    ) -> None:
        """
        Run the backbone over independent frames `(N, C, H, W)` and call `read_block(output, query, key)` right
        after each block the decoder reads: its output `(N, tokens, hidden)` and, with cross-frame attention, the
        queries and keys `(N, tokens, heads, head_dim)` it attended with (`None` otherwise), in the backbone's dtype,
        under the backbone's grad mode.
        """
        backbone = self.vision_model
        family = backbone_family(self.config.vision_config)
        layers = family.blocks(backbone)
        first_used = len(layers) - self.config.decoder_num_layers
        need_query_key = self.config.use_temporal_cross_attention
        heads = self.config.vision_config.num_attention_heads
        # A frozen backbone runs without autograd, unless something in it asks for a gradient: its input (saliency
        # maps), or tensors made trainable in it (PEFT adapters, a block unfrozen by hand), as `requires_grad` decides
        # what trains everywhere in transformers.
        grad_enabled = torch.is_grad_enabled() and (
            not self.config.freeze_backbone
            or frames.requires_grad
            or any(parameter.requires_grad for parameter in backbone.parameters())
        )
        # The backbone's own modules, called in its own forward's order (its final norm, pooler or head unused): no
        # hook or shared state, so the forward is one graph under `torch.compile` and safe in concurrent threads.
        with torch.set_grad_enabled(grad_enabled), _backbone_autocast(frames.device.type, backbone.dtype):
            hidden_states = family.embed(backbone, frames.to(backbone.dtype))
            for index, layer in enumerate(layers):
                query = key = None
                if index >= first_used and need_query_key:
                    # The block, from its own modules, returning the q/k it attends with (projected once). They are
                    # outputs of the checkpointed function, so they keep their graph when a trainable block is
                    # checkpointed, reentrant or not.
                    if layer.gradient_checkpointing and layer.training:
                        hidden_states, query, key = layer._gradient_checkpointing_func(
                            family.block_with_query_key, layer, hidden_states
                        )
                    else:
                        hidden_states, query, key = family.block_with_query_key(layer, hidden_states)
                    query, key = query.unflatten(-1, (heads, -1)), key.unflatten(-1, (heads, -1))
                else:
                    hidden_states = layer(hidden_states, None)
                if index >= first_used:
                    read_block(hidden_states, query, key)

    def check_backbone_features(
        self,
        frame_features: torch.Tensor,
        cross_frame_maps: torch.Tensor | None,
        cross_frame_features: torch.Tensor | None = None,
    ) -> None:
        """Validate precomputed features (e.g. from a feature cache) against this model's configuration."""
        config = self.config
        num_patches = config.patch_grid[0] * config.patch_grid[1]
        num_tokens = config.num_prefix_tokens + num_patches
        if frame_features.ndim != 5 or frame_features.shape[1] != config.decoder_num_layers or frame_features.shape[
            3:
        ] != (num_tokens, config.vision_config.hidden_size):
            raise EVLInputError(
                f"`frame_features` must be (batch_size, {config.decoder_num_layers}, num_frames, {num_tokens}, "
                f"{config.vision_config.hidden_size}), got {tuple(frame_features.shape)}."
            )
        if cross_frame_features is not None:
            if not config.use_temporal_cross_attention or cross_frame_maps is not None:
                raise EVLInputError(
                    "`cross_frame_features` replace `cross_frame_maps` in a model with cross-frame attention: give one."
                )
            if cross_frame_features.shape != frame_features.shape:
                raise EVLInputError(
                    f"`cross_frame_features` must have the shape of `frame_features` {tuple(frame_features.shape)}, "
                    f"got {tuple(cross_frame_features.shape)}."
                )
        elif config.use_temporal_cross_attention:
            expected = (*frame_features.shape[:3], 2, num_patches, num_patches)
            if cross_frame_maps is None or tuple(cross_frame_maps.shape) != expected:
                shape = None if cross_frame_maps is None else tuple(cross_frame_maps.shape)
                raise EVLInputError(f"`cross_frame_maps` must be {expected} for this model, got {shape}.")

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        frame_features: torch.Tensor | None = None,
        cross_frame_maps: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        cross_frame_features: torch.Tensor | None = None,
        **kwargs,
    ) -> EVLModelOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_frames, num_channels, height, width)`):
            Normalised frames, e.g. from [`EVLVideoProcessor`].
        frame_features (`torch.FloatTensor` of shape `(batch_size, decoder_num_layers, num_frames, num_prefix_tokens + num_patches, hidden_size)`, *optional*):
            Precomputed backbone features (`extract_backbone_features`, or a feature cache) instead of `pixel_values`.
        cross_frame_maps (`torch.FloatTensor` of shape `(batch_size, decoder_num_layers, num_frames, 2, num_patches, num_patches)`, *optional*):
            Precomputed cross-frame attention maps, with `frame_features` when cross-frame attention is used.
        cross_frame_features (`torch.FloatTensor` of the shape of `frame_features`, *optional*):
            Instead of `cross_frame_maps`: the cross-frame attention module's output itself (e.g. computed once per
            frame for many overlapping clips; the module is linear in each direction's map, see
            `EVLCrossFrameAttention.direction_features`).

        Example (a tiny random model; a converted checkpoint loads with `EVLModel.from_pretrained(path)`):

        ```python
        >>> import torch
        >>> from transformers import CLIPVisionConfig
        >>> from evl_hf import EVLConfig, EVLModel

        >>> vision_config = CLIPVisionConfig(
        ...     hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        ...     patch_size=8,
        ... )
        >>> config = EVLConfig(
        ...     vision_config=vision_config, num_frames=4, decoder_num_layers=2, decoder_qkv_dim=32,
        ...     decoder_num_heads=4,
        ... )
        >>> model = EVLModel(config).eval()
        >>> clip = torch.randn(2, 4, 3, 32, 32)  # (batch_size, num_frames, channels, height, width)
        >>> with torch.no_grad():
        ...     outputs = model(clip, output_attentions=True)
        >>> outputs.pooler_output.shape  # the video embedding
        torch.Size([2, 32])
        >>> outputs.attentions[0].shape  # (batch_size, decoder_num_heads, 1, num_frames * (1 + num_patches)): 1 class token
        torch.Size([2, 4, 1, 68])
        >>> features = model.extract_backbone_features(clip)  # cacheable: the frozen backbone's share of the work
        >>> with torch.no_grad():
        ...     cached = model(frame_features=features.frame_features, cross_frame_maps=features.cross_frame_maps)
        >>> torch.allclose(cached.pooler_output, outputs.pooler_output, atol=1e-6)
        True

        ```
        """
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        self.check_autocast()
        maps_dtype = self.reduced_precision_inference_dtype() or self.decoder.query.dtype
        if frame_features is not None and pixel_values is not None:
            raise EVLInputError(
                "Give either `pixel_values` or precomputed `frame_features`, not both: the model would use only one."
            )
        if frame_features is None:
            if cross_frame_maps is not None or cross_frame_features is not None:
                given = "cross_frame_maps" if cross_frame_maps is not None else "cross_frame_features"
                raise EVLInputError(
                    f"`{given}` are precomputed backbone features: pass them with `frame_features`, not with "
                    "`pixel_values` (the model computes its own from the frames)."
                )
            self.check_pixel_values(pixel_values)
            frame_features, cross_frame_maps = self._backbone_features_per_block(pixel_values, maps_dtype)
        else:
            self.check_backbone_features(frame_features, cross_frame_maps, cross_frame_features)
            frame_features = frame_features.to(self.decoder.query.dtype)
            cross_frame_maps = cross_frame_maps.to(maps_dtype) if cross_frame_maps is not None else None
        if cross_frame_features is not None:
            kwargs["cross_frame_features"] = cross_frame_features.to(self.decoder.query.dtype)
        return self._decode(
            frame_features,
            cross_frame_maps,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )

    # Outputs are recorded around the decoder only: the backbone's blocks, called directly by
    # `extract_backbone_features`, carry their own model's recorders, which would otherwise add their states to EVL's.
    @capture_outputs
    def _decode(
        self,
        frame_features: torch.Tensor | Sequence[torch.Tensor],
        cross_frame_maps: torch.Tensor | Sequence[torch.Tensor] | None,
        **kwargs,
    ) -> EVLModelOutput:
        query = self.decoder(frame_features, cross_frame_maps, **kwargs).last_hidden_state
        return EVLModelOutput(last_hidden_state=query, pooler_output=query[:, 0])


class EVLForVideoClassification(EVLPreTrainedModel):
    """
    EVL with its classification head (LayerNorm, dropout, linear) on the video embedding.

    `pixel_values` is `(batch_size, num_frames, channels, height, width)`, or `(batch_size, num_views, num_frames,
    channels, height, width)` for multi-view evaluation: every view is classified and the returned `logits`
    (`(batch_size, num_labels)`) combine the views' predictions, as `config.problem_type` reads them:

    - single-label classification: the log of the view-averaged softmax probabilities (the authors' protocol), so
      `logits.softmax(-1)` is that average;
    - multi-label classification: the logit of the view-averaged sigmoid probabilities, so `logits.sigmoid()` is that
      average;
    - regression: the mean of the views' outputs;
    - no head (`num_labels=0`, `logits` are the video embeddings): the mean of the views' embeddings.

    The loss is that of the combined prediction. An unset `problem_type` is inferred as transformers' classification
    losses do (`num_labels == 1`: regression; float `labels`: multi-label; otherwise single-label).
    """

    # `forward` takes `num_items_in_batch` from `Trainer` (the label elements other than -100 over the accumulated
    # batch, and over all processes with `average_tokens_across_devices`) and then returns the sum over the items
    # divided by it, so that `Trainer` leaves out its own division by the accumulation steps: micro-batches and
    # processes add up to the loss of the whole batch, whatever the number of -100 labels in each.
    accepts_loss_kwargs = True

    def __init__(self, config: EVLConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.evl = EVLModel(config)
        hidden_size = config.vision_config.hidden_size
        self.fc_norm = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.evl.get_input_embeddings()

    def classify(self, video_embedding: torch.Tensor) -> torch.Tensor:
        """The classification head: `(batch_size, hidden_size)` video embeddings to `(batch_size, num_labels)` logits."""
        return self.classifier(self.dropout(self.fc_norm(video_embedding)))

    @classmethod
    def from_backbone_pretrained(cls, pretrained_model_name_or_path: str, **config_kwargs) -> "EVLForVideoClassification":
        """
        Build a new EVL model around a pretrained image backbone (a Hub id or a local directory) of one of the
        families in `evl_hf.backbone_families`: a `CLIPVisionModel` or a whole `CLIPModel` (e.g.
        `"openai/clip-vit-base-patch16"`), a `SiglipVisionModel` or a whole `SiglipModel` (SigLIP 2 at a fixed
        resolution too), `Dinov2Model`, `Dinov2WithRegistersModel` or `ViTModel`; of a two-tower model only the vision
        tower is loaded. A DINOv2 backbone runs at its image processor's crop size (`preprocessor_config.json`, 224
        for the released ones) unless `image_size=` (or `config.image_size`) says otherwise. The decoder and head are freshly initialised; `config_kwargs` go to `EVLConfig` (e.g. `num_frames`,
        `id2label`, `label2id`). `preset=NAME` takes the other fields from one of `EVL_PRESETS`; `config=` gives a
        complete `EVLConfig` instead (its `vision_config` must describe this backbone: one that differs from the
        backbone's own in an architecture field is an `EVLCheckpointError` naming the fields). As with
        `from_pretrained`, `dtype` (or `torch_dtype`) loads the backbone in that dtype and casts the whole model to
        it, a `device_map` naming one device moves the model there, and the Hub arguments (`revision`, `token`,
        `subfolder`, ...) reach the backbone's files; `from_pretrained`'s other loading arguments are refused by name.
        The model is returned in evaluation mode, as `from_pretrained` returns one.

        Any other kind of checkpoint raises a `ValueError`; one whose vision tensors are missing, extra or of the
        wrong shape raises `EVLCheckpointError`, so no backbone weight is ever left randomly initialised.
        """
        hub_kwargs = {key: config_kwargs.pop(key) for key in _BACKBONE_LOADING_ARGUMENTS if key in config_kwargs}
        # Loading arguments, applied to the model built: never fields of its configuration.
        dtype = config_kwargs.pop("dtype", None)
        torch_dtype = config_kwargs.pop("torch_dtype", None)  # the older name
        dtype = dtype if dtype is not None else torch_dtype
        device = _single_device(config_kwargs.pop("device_map", None))
        # As `from_pretrained` (whose model refuses an argument no config field takes), but by name: anything else
        # would be written into the configuration, and so into config.json.
        unknown = sorted(set(config_kwargs) - _EVL_CONFIG_ARGUMENTS)
        if unknown:
            raise ValueError(
                f"{', '.join(f'`{key}`' for key in unknown)}: neither a field of `EVLConfig` nor an argument "
                "`from_backbone_pretrained` takes (it builds a new model around the backbone: `dtype`, a `device_map` "
                "naming one device and the Hub's arguments apply, `from_pretrained`'s other loading arguments do not)."
            )
        preset = config_kwargs.pop("preset", None)
        # A copy, as `from_pretrained` takes one: the crop, attention and backbone set below are this model's only.
        config = copy.deepcopy(config_kwargs.pop("config", None))
        backbone_dtype = config.backbone_dtype if config is not None else config_kwargs.get("backbone_dtype")
        if dtype is not None and backbone_dtype == "float32":
            hub_kwargs["dtype"] = torch.float32  # the backbone kept in float32 keeps its weights exact
        elif dtype is not None:
            hub_kwargs["dtype"] = dtype  # the tower loads in it ("auto": its checkpoint's dtype)
        backbone = cls._load_backbone(pretrained_model_name_or_path, hub_kwargs)
        # A backbone that resizes its position embeddings (DINOv2) runs at its image processor's crop, the frames that
        # processor gives, rather than at the size its config declares (518), unless `image_size` is given; with
        # `config=` too (built from `AutoConfig`, its `image_size` is unset).
        image_size_given = config.image_size is not None if config is not None else "image_size" in config_kwargs
        crop_size = None
        if not image_size_given and backbone_family(backbone.config).interpolates_position_embeddings:
            crop_size = processor_crop_size(pretrained_model_name_or_path, **hub_kwargs)
        if crop_size is not None and config is None:
            config_kwargs["image_size"] = crop_size
        if config is not None:
            if config_kwargs or preset is not None:
                raise ValueError("Pass either `config` or configuration fields/`preset`, not both.")
            differences = _architecture_differences(config.vision_config, backbone.config)
            if differences:
                raise EVLCheckpointError(
                    f"{pretrained_model_name_or_path}: `config.vision_config` does not describe this backbone, whose "
                    "weights would run in another architecture:"
                    + "".join(f"\n  {difference}" for difference in differences)
                    + "\nLeave `config=` out (the backbone's own configuration is used), or build it with the "
                    "backbone's (`EVLConfig(vision_config=AutoConfig.from_pretrained(...), ...)`, its `.vision_config` "
                    "for a two-tower checkpoint)."
                )
            if crop_size is not None:
                config.image_size = crop_size
        elif preset is not None:
            config = EVLConfig.from_preset(preset, vision_config=backbone.config, **config_kwargs)
        else:
            config = EVLConfig(vision_config=backbone.config, **config_kwargs)
        # "auto" keeps a model built in another dtype than float32 in it, as `from_pretrained` does: no conflict.
        if dtype is not None and config.backbone_dtype not in (None, "float32", "auto"):
            raise ValueError("`dtype` casts the whole model and `backbone_dtype` the backbone alone: give one of them.")
        if "attn_implementation" in hub_kwargs:
            config._attn_implementation = hub_kwargs["attn_implementation"]
        model = cls(config)
        if dtype is not None:
            model_dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
            model_dtype = backbone.dtype if model_dtype == "auto" else model_dtype
            model.to(model_dtype)
            model.config.dtype = model_dtype
            model.evl._apply_backbone_freeze()  # a `backbone_dtype="float32"` backbone back in float32
        model.evl.vision_model.load_state_dict(backbone.state_dict())
        # config.json goes to the Hub with the model: the backbone is named there by its Hub id, never a local path.
        base_model = hub_repo_id(pretrained_model_name_or_path)
        model.config.vision_config._name_or_path = base_model or ""
        if base_model is not None:
            model.config.base_model = base_model
        elif hasattr(model.config, "base_model"):
            del model.config.base_model  # a `config=` of another model's names its backbone
        # In evaluation mode, as `from_pretrained` returns a model: the dropout would otherwise change every inference
        # call's logits (`Trainer` switches training mode on itself).
        model.eval()
        return model if device is None else model.to(device)

    @staticmethod
    def _load_backbone(pretrained_model_name_or_path, hub_kwargs: dict) -> PreTrainedModel:
        """
        Load the vision tower, strictly: a transformers `from_pretrained` builds its model from any config and leaves
        every tensor it cannot find randomly initialised, so a ConvNeXt or an EVL checkpoint would train on noise.
        """
        name = str(pretrained_model_name_or_path)
        model_type = checkpoint_model_type(pretrained_model_name_or_path, **hub_kwargs)
        family = family_of_checkpoint(model_type)
        if family is None:
            hint = (
                " It is a whole EVL model: load it with `EVLForVideoClassification.from_pretrained`."
                if model_type == EVLConfig.model_type
                else ""
            )
            raise ValueError(
                f"{name} is a `{model_type}` checkpoint, not an image backbone EVL can read: `from_backbone_pretrained` "
                f"supports {supported_checkpoint_types()}.{hint}"
            )
        # transformers' loading report is logged only with a problem: a two-tower checkpoint's text tower, left out on
        # purpose, would otherwise be listed tensor by tensor as UNEXPECTED ("not ok if you expect identical arch").
        with _loading_report_logged_on_error():
            # Shape mismatches are collected and reported below rather than raised by the loader.
            backbone, info = family.from_pretrained(
                pretrained_model_name_or_path, output_loading_info=True, ignore_mismatched_sizes=True, **hub_kwargs
            )
            problems = {
                "missing": sorted(info["missing_keys"]),
                "unexpected": sorted(
                    key for key in info["unexpected_keys"] if not key.startswith(family.unused_prefixes)
                ),
                "shape mismatch": [
                    f"{key}: checkpoint {tuple(found)} vs model {tuple(expected)}"
                    for key, found, expected in sorted(info["mismatched_keys"], key=lambda item: item[0])
                ],
            }
            if any(problems.values()):
                raise EVLCheckpointError(
                    f"{name}: the `{model_type}` checkpoint does not hold exactly a {family.name} vision tower; refusing "
                    "to leave randomly initialised backbone weights in place."
                    + "".join(f"\n  {kind}: {keys}" for kind, keys in problems.items() if keys)
                )
        return backbone

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        frame_features: torch.Tensor | None = None,
        cross_frame_maps: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        cross_frame_features: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        **kwargs,
    ) -> ImageClassifierOutput:
        r"""
        pixel_values (`torch.FloatTensor`):
            `(batch_size, num_frames, channels, height, width)`, or `(batch_size, num_views, num_frames, channels,
            height, width)`: the views' predictions are then combined (see the class docstring), and each of
            `hidden_states` and `attentions` gets a views dimension after the batch one, e.g. `(batch_size, num_views,
            1, hidden_size)`.
        frame_features, cross_frame_maps, cross_frame_features (*optional*):
            Precomputed backbone features instead of `pixel_values`, see [`EVLModel.forward`].
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Labels for the loss. With `config.num_labels == 1` a regression (MSE) loss is computed, otherwise a
            classification loss (cross-entropy, or BCE for `problem_type="multi_label_classification"`).
        num_items_in_batch (`torch.Tensor` or `int`, *optional*):
            Passed by `Trainer`: the number of label elements other than -100 in the whole (accumulated) batch. The
            loss is then the sum over this batch's items divided by it, rather than their mean.

        Example (a tiny random model; a converted checkpoint loads with `EVLForVideoClassification.from_pretrained`,
        and `EVLVideoProcessor` makes `pixel_values` from a video file):

        ```python
        >>> import torch
        >>> from transformers import CLIPVisionConfig
        >>> from evl_hf import EVLConfig, EVLForVideoClassification

        >>> vision_config = CLIPVisionConfig(
        ...     hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        ...     patch_size=8,
        ... )
        >>> config = EVLConfig(
        ...     vision_config=vision_config, num_frames=4, decoder_num_layers=2, decoder_qkv_dim=32,
        ...     decoder_num_heads=4, num_labels=3,
        ... )
        >>> model = EVLForVideoClassification(config).eval()
        >>> clip = torch.randn(2, 4, 3, 32, 32)  # (batch_size, num_frames, channels, height, width)
        >>> with torch.no_grad():
        ...     outputs = model(clip, labels=torch.tensor([0, 2]))
        >>> outputs.logits.shape
        torch.Size([2, 3])

        >>> views = torch.randn(2, 3, 4, 3, 32, 32)  # three crops of each clip: (batch_size, num_views, ...)
        >>> with torch.no_grad():
        ...     outputs = model(views, output_hidden_states=True)
        >>> outputs.logits.shape  # one prediction per clip: the log of the views' mean softmax
        torch.Size([2, 3])
        >>> outputs.hidden_states[-1].shape  # (batch_size, num_views, 1, hidden_size)
        torch.Size([2, 3, 1, 32])

        ```
        """
        num_views = None
        if isinstance(pixel_values, torch.Tensor) and pixel_values.ndim == 6:
            num_views = pixel_values.shape[1]
            pixel_values = pixel_values.flatten(0, 1)
        outputs: EVLModelOutput = self.evl(
            pixel_values,
            frame_features=frame_features,
            cross_frame_maps=cross_frame_maps,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            cross_frame_features=cross_frame_features,
            # The output object whatever `config.return_dict` says: only this model's own result becomes a tuple.
            return_dict=True,
            **kwargs,
        )
        logits = self.classify(outputs.pooler_output)
        hidden_states, attentions = outputs.hidden_states, outputs.attentions
        if num_views is not None:
            logits = self._combine_views(logits.unflatten(0, (-1, num_views)), labels)

            def per_view(states):
                if states is None:
                    return None
                return tuple(state if state is None else state.unflatten(0, (-1, num_views)) for state in states)

            hidden_states, attentions = per_view(hidden_states), per_view(attentions)

        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config, num_items_in_batch=num_items_in_batch)
            if num_items_in_batch is not None and self.config.problem_type != "single_label_classification":
                # transformers' MSE and BCE losses take no `num_items_in_batch`: their mean over the label elements
                # (those `Trainer` counts), times their number, is the sum over the items.
                loss = loss * labels.numel() / num_items_in_batch

        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=hidden_states, attentions=attentions)

    def problem_type_for(self, labels: torch.Tensor | None) -> str:
        """
        `config.problem_type`, or when it is unset the one transformers' classification losses infer from `labels`
        (and set on the first forward with labels): regression for one label, multi-label for float labels, else
        single-label. Only the labels' dtype counts, so unusable (-100) and unlabeled (-1) clips may be among them.
        """
        problem_type = problem_type_without_labels(self.config)
        if problem_type is not None:
            return problem_type
        if labels is not None and labels.dtype not in (torch.long, torch.int):
            return "multi_label_classification"
        return "single_label_classification"

    def _combine_views(self, logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """(batch_size, num_views, num_labels) per-view logits -> (batch_size, num_labels), see the class docstring."""
        problem_type = self.problem_type_for(labels)
        if problem_type == "regression" or self.num_labels == 0:
            # Without a head (`num_labels=0`) the logits are the video embeddings: no class scores to combine.
            return logits.mean(1)
        # In log space, so that confident views give finite logits: log(mean_v p_v) = logsumexp_v(log p_v) - log(V).
        views = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float64 stays float64
        if problem_type == "multi_label_classification":
            # logit(p) = log(p) - log(1 - p), with p the mean sigmoid and 1 - p the mean of sigmoid(-x).
            combined = torch.logsumexp(nn.functional.logsigmoid(views), 1) - torch.logsumexp(
                nn.functional.logsigmoid(-views), 1
            )
        else:
            combined = torch.logsumexp(views.log_softmax(-1), 1) - math.log(views.shape[1])
        return combined.to(logits.dtype)


__all__ = [
    "EVLBackboneFeatures",
    "EVLCheckpointError",
    "EVLForVideoClassification",
    "EVLInputError",
    "EVLModel",
    "EVLModelOutput",
    "EVLPreTrainedModel",
    "cross_frame_attention_maps",
]
