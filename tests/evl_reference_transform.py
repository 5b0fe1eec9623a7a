"""
A literal port of the EVL authors' evaluation input pipeline (OpenGVLab/efficient-video-recognition,
`video_dataset/dataset.py`: `VideoDataset.__getitem__` with `random_sample=False`, `_generate_spatial_crops`,
`_generate_temporal_crops`), written from their code rather than from `evl_hf`, as the oracle the processor is tested
against. The steps and their order are theirs:

1. decode every frame with PyAV, keyed by `pts`, in `pts` order; convert each to RGB;
2. `float() / 255`, then `(x - mean) / std`, on `(T, H, W, C)`;
3. permute to `(C, T, H, W)` and resize the short side to `spatial_size` with `F.interpolate(..., mode="bilinear",
   align_corners=False)` (no antialias), the long side `long * spatial_size // short`;
4. spatial crops: 1 (offsets `(size - spatial_size) // 2`) or 3 (`0, margin // 2, margin` along the long side);
5. for each spatial crop, temporal crops: a window of `(num_frames - 1) * sampling_rate + 1` frames (a shorter video
   is padded with its last frame), one view at `slide // 2`, several at `round(slide / (views - 1) * i)`.

Views come out spatial-major, `(C, T, spatial_size, spatial_size)` each, as theirs do.

One liberty, for memory only: steps 2-4 act on each frame independently, so they are applied to the frames that step
5 keeps rather than to the whole decoded video (a 720p clip of 132 frames would be 1.5 GB of floats). No step mixes
frames, so the result is the same.
"""

import av
import numpy as np
import torch


def decode_all_frames(path) -> list:
    """Every frame of the first video stream, in presentation order (a dict keyed by pts, as theirs)."""
    frames = {}
    container = av.open(str(path))
    for frame in container.decode(video=0):
        frames[frame.pts] = frame
    container.close()
    return [frames[key] for key in sorted(frames.keys())]


def temporal_crop_indices(num_decoded: int, num_frames: int, sampling_rate: int, num_temporal_views: int):
    """The frame indices `_generate_temporal_crops` takes for each view (indices into the padded video)."""
    seg_len = (num_frames - 1) * sampling_rate + 1
    padded = list(range(num_decoded))
    if num_decoded < seg_len:
        padded = padded + [num_decoded - 1] * (seg_len - num_decoded)
    slide_len = len(padded) - seg_len
    views = []
    for i in range(num_temporal_views):
        if num_temporal_views == 1:
            st = slide_len // 2
        else:
            st = round(slide_len / (num_temporal_views - 1) * i)
        views.append(padded[st : st + num_frames * sampling_rate : sampling_rate])
    return views


def normalise_and_resize(rgb_frames: list[np.ndarray], spatial_size: int, mean, std) -> torch.Tensor:
    """Steps 2-3 on `(H, W, 3)` uint8 frames: returns `(C, T, new_height, new_width)` floats."""
    frames = torch.as_tensor(np.stack(rgb_frames))
    frames = frames.float() / 255.0
    frames = (frames - torch.Tensor(mean)) / torch.Tensor(std)
    frames = frames.permute(3, 0, 1, 2)  # C, T, H, W
    if frames.size(-2) < frames.size(-1):
        new_width = frames.size(-1) * spatial_size // frames.size(-2)
        new_height = spatial_size
    else:
        new_height = frames.size(-2) * spatial_size // frames.size(-1)
        new_width = spatial_size
    return torch.nn.functional.interpolate(frames, size=(new_height, new_width), mode="bilinear", align_corners=False)


def spatial_crops(frames: torch.Tensor, spatial_size: int, num_spatial_views: int) -> list[torch.Tensor]:
    """`_generate_spatial_crops` on `(C, T, H, W)`."""
    if num_spatial_views == 1:
        assert min(frames.size(-2), frames.size(-1)) >= spatial_size
        h_st = (frames.size(-2) - spatial_size) // 2
        w_st = (frames.size(-1) - spatial_size) // 2
        return [frames[:, :, h_st : h_st + spatial_size, w_st : w_st + spatial_size]]
    assert num_spatial_views == 3 and min(frames.size(-2), frames.size(-1)) == spatial_size
    crops = []
    margin = max(frames.size(-2), frames.size(-1)) - spatial_size
    for st in (0, margin // 2, margin):
        ed = st + spatial_size
        if frames.size(-2) > frames.size(-1):
            crops.append(frames[:, :, st:ed, :])
        else:
            crops.append(frames[:, :, :, st:ed])
    return crops


def authors_evaluation_views(path, num_frames=8, sampling_rate=16, spatial_size=224, num_temporal_views=1,
                             num_spatial_views=1, mean=(0.45,) * 3, std=(0.225,) * 3) -> torch.Tensor:  # fmt: skip
    """
    The authors' evaluation input for the video at `path`: `(num_spatial_views * num_temporal_views, C, T, S, S)`,
    spatial-major (for each spatial crop, its temporal crops). Their defaults for mean/std are 0.45/0.225; the
    released CLIP checkpoints are evaluated with CLIP's, passed on their command line.
    """
    decoded = decode_all_frames(path)
    views = []
    windows = temporal_crop_indices(len(decoded), num_frames, sampling_rate, num_temporal_views)
    # Steps 2-4 per window (see the module docstring); step 5 then reads the window's frames in order.
    per_window = []
    for window in windows:
        rgb = [decoded[index].to_rgb().to_ndarray() for index in window]
        per_window.append(spatial_crops(normalise_and_resize(rgb, spatial_size, mean, std), spatial_size,
                                        num_spatial_views))  # fmt: skip
    for spatial in range(num_spatial_views):
        for temporal in range(num_temporal_views):
            views.append(per_window[temporal][spatial])
    return torch.stack(views)
