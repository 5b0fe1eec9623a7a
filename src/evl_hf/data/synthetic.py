"""
A synthetic motion data set whose classes only temporal order can tell apart.

Every clip shows one object (a random-coloured bar with a notch, so rotation is visible) on a noisy background. Each
class changes exactly one attribute monotonically over time; the other attributes are drawn at random and held:

    moving_left / moving_right        horizontal position
    moving_up / moving_down           vertical position
    growing / shrinking               size
    rotating_clockwise / rotating_anticlockwise   angle
    appearing / disappearing          opacity

The classes come in time-reversed pairs, and the attribute values of any single frame are drawn from the same range
for every class, so no single frame reveals the class, and a model that sees frames as an unordered set (EVL with
its temporal modules switched off) cannot separate the two classes of a pair.

    python -m evl_hf.data.synthetic --out DIR [--train_per_class 40 --validation_per_class 10 --test_per_class 10]

writes mp4 clips (PyAV, H.264) in videofolder layout: `DIR/{train,validation,test}/<class>/<clip>.mp4`.

    python -m evl_hf.data.synthetic --sequence long.mp4 [--sequence_classes moving_left,growing,...] [--size 48]

writes one longer video of consecutive clips of those classes, for `python -m evl_hf.timeline`.

The output is reproducible. Each clip draws from its own generator,
`np.random.default_rng([seed, split_id, class_id, index])` (split_id: position in `SPLITS`, class_id: position in
`MOTION_CLASSES`), so a clip's content depends only on (seed, split, class, index): adding clips to a split, or
leaving out classes, keeps every other clip the same. The encoder runs on one thread (`write_video`: x264 and the
RGB-to-YUV conversion both run on a single thread), so the same seed gives the same bytes on the same machine and
library build, whatever number of CPUs the process gets. If you leave PyAV at its default (`thread_count=0`, as many
threads as there are CPUs), x264 picks its thread count, and with it its slices and its output, from the CPU count
once frames are about 128 pixels tall or more. The mp4 muxer writes no creation time (its fields stay 0). The x264
and Lavf version strings in each file are fixed for one build, so another PyAV/FFmpeg build can give other bytes.
"""

import argparse
import json
from pathlib import Path

import numpy as np

from ..cpu_info import cpu_flags


MOTION_CLASSES = (
    "moving_left", "moving_right", "moving_up", "moving_down", "growing", "shrinking",
    "rotating_clockwise", "rotating_anticlockwise", "appearing", "disappearing",
)  # fmt: skip

SPLITS = ("train", "validation", "test")

# Each class sweeps one attribute over [low, high] (or [high, low]); static attributes are drawn from the same range.
_RANGES = {"x": (0.25, 0.75), "y": (0.25, 0.75), "size": (0.12, 0.3), "angle": (0.0, np.pi), "opacity": (0.15, 1.0)}
_SWEEPS = {
    "moving_left": ("x", -1), "moving_right": ("x", 1), "moving_up": ("y", -1), "moving_down": ("y", 1),
    "growing": ("size", 1), "shrinking": ("size", -1), "rotating_clockwise": ("angle", 1),
    "rotating_anticlockwise": ("angle", -1), "appearing": ("opacity", 1), "disappearing": ("opacity", -1),
}  # fmt: skip


def _draw_frame(state: dict, colour: np.ndarray, background: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """One (size, size, 3) uint8 frame of the notched bar in `state` (x, y, size, angle, opacity) on a noisy
    background."""
    grid_y, grid_x = np.mgrid[0:size, 0:size] / size
    dx, dy = grid_x - state["x"], grid_y - state["y"]
    cos, sin = np.cos(state["angle"]), np.sin(state["angle"])
    along, across = cos * dx + sin * dy, -sin * dx + cos * dy
    half = state["size"] / 2
    bar = (np.abs(along) < half) & (np.abs(across) < half / 2.5)
    # A notch at one end breaks the bar's 180-degree symmetry, so clockwise and anticlockwise differ.
    notch = (along > half * 0.45) & (np.abs(across) < half / 2.5) & (across > 0)
    shape = (bar & ~notch).astype(np.float64)[..., None]
    noise = rng.normal(0, 0.03, size=(size, size, 1))
    image = background + noise + shape * state["opacity"] * (colour - background)
    return np.clip(image * 255, 0, 255).astype(np.uint8)


def render_clip(label: str, num_frames: int = 16, size: int = 64, rng: np.random.Generator | None = None) -> np.ndarray:
    """Render one clip of class `label` as (num_frames, size, size, 3) uint8."""
    rng = rng or np.random.default_rng()
    attribute, direction = _SWEEPS[label]
    state = {name: rng.uniform(low, high) for name, (low, high) in _RANGES.items()}
    low, high = _RANGES[attribute]
    # The sweep covers a random sub-interval of at least 60% of the range, so its ends are not class-specific.
    span = rng.uniform(0.6, 1.0) * (high - low)
    start = rng.uniform(low, high - span)
    sweep = np.linspace(start, start + span, num_frames)
    if direction < 0:
        sweep = sweep[::-1]
    colour = rng.uniform(0.3, 1.0, size=3)
    background = rng.uniform(0.0, 0.25)
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    for t in range(num_frames):
        state[attribute] = sweep[t]
        frames[t] = _draw_frame(state, colour, background, size, rng)
    return frames


FRAME_ATTRIBUTES = tuple(_RANGES)


def render_frames(count: int, size: int = 64, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """
    `count` independent single frames, each with every attribute drawn uniformly over its range (as a clip draws the
    attributes it holds; the one a clip sweeps is spread over its range a little less evenly, more often near the
    middle), and their attributes: (count, size, size, 3) uint8 and (count, len(FRAME_ATTRIBUTES)) float32, each
    attribute scaled to [0, 1] over its range. They carry no class, and no class's clips are drawn: the demo pretrains
    its small image backbone on them, as CLIP is pretrained on images before EVL reads its frozen features.
    """
    rng = rng or np.random.default_rng()
    frames = np.empty((count, size, size, 3), dtype=np.uint8)
    attributes = np.empty((count, len(FRAME_ATTRIBUTES)), dtype=np.float32)
    for index in range(count):
        state = {name: rng.uniform(low, high) for name, (low, high) in _RANGES.items()}
        frames[index] = _draw_frame(state, rng.uniform(0.3, 1.0, size=3), rng.uniform(0.0, 0.25), size, rng)
        attributes[index] = [(state[name] - low) / (high - low) for name, (low, high) in _RANGES.items()]
    return frames, attributes


def _x264_deterministic_options() -> dict:
    # x264's AVX-512 code gives different bytes from run to run for the same frames (seen on an AMD EPYC with
    # AVX-512), so where the CPU has it the encoder is held to its AVX2 code, which is present on any such CPU.
    return {"x264-params": "asm=AVX2"} if {"avx512f", "avx2"} <= cpu_flags() else {}


_X264_DETERMINISTIC_OPTIONS = _x264_deterministic_options()


def write_video(path: Path, frames: np.ndarray, fps: int = 16) -> Path:
    """Encode (T, H, W, 3) uint8 frames as H.264 mp4 with PyAV (no system ffmpeg needed)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        # One thread: x264's automatic thread count (and so its slicing) depends on the CPU count and the frame
        # height, and PyAV hands the same count to the RGB-to-YUV conversion; at these sizes one thread is as fast.
        stream.codec_context.thread_count = 1
        stream.options = {"crf": "18", "preset": "veryfast", **_X264_DETERMINISTIC_OPTIONS}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def generate_motion_dataset(
    out: str | Path,
    train_per_class: int = 40,
    validation_per_class: int = 10,
    test_per_class: int = 10,
    num_frames: int = 16,
    size: int = 64,
    seed: int = 0,
    classes: tuple[str, ...] = MOTION_CLASSES,
) -> Path:
    """Write the data set in videofolder layout and a `labels.json` with the class names; return `out`.

    The same arguments give the same bytes; a clip depends only on (seed, split, class, index), see the module docstring.
    """
    out = Path(out)
    for split_id, (split, count) in enumerate(zip(SPLITS, (train_per_class, validation_per_class, test_per_class))):
        for label in classes:
            class_id = MOTION_CLASSES.index(label)
            for index in range(count):
                # One generator per clip, so a clip depends only on (seed, split, class, index).
                rng = np.random.default_rng([seed, split_id, class_id, index])
                write_video(out / split / label / f"{label}_{index:04d}.mp4", render_clip(label, num_frames, size, rng))
    (out / "labels.json").write_text(json.dumps(list(classes)))
    return out


def generate_motion_sequence(
    path: str | Path,
    classes: tuple[str, ...] = MOTION_CLASSES,
    clips_per_class: int = 2,
    num_frames: int = 16,
    size: int = 64,
    seed: int = 0,
) -> Path:
    """One longer video of consecutive clips, `clips_per_class` of each class in `classes` order, for the timeline:
    its labels change at known times (every `clips_per_class * num_frames` frames, at 16 fps). Its clips come from
    generators of their own (`[seed, len(SPLITS), class_id, index]`), so they are none of the data set's."""
    frames = []
    for label in classes:
        class_id = MOTION_CLASSES.index(label)
        for index in range(clips_per_class):
            frames.append(render_clip(label, num_frames, size, np.random.default_rng([seed, len(SPLITS), class_id, index])))
    return write_video(Path(path), np.concatenate(frames))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="the data set's folder")
    parser.add_argument("--sequence", help="instead: one video of consecutive clips of --sequence_classes (an .mp4 path)")
    parser.add_argument("--sequence_classes", default=",".join(MOTION_CLASSES), help="comma-separated, in order")
    parser.add_argument("--clips_per_class", type=int, default=2, help="for --sequence")
    parser.add_argument("--train_per_class", type=int, default=40)
    parser.add_argument("--validation_per_class", type=int, default=10)
    parser.add_argument("--test_per_class", type=int, default=10)
    parser.add_argument("--num_frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.sequence:
        classes = tuple(args.sequence_classes.split(","))
        unknown = sorted(set(classes) - set(MOTION_CLASSES))
        if unknown:
            parser.error(f"unknown classes {unknown}; the classes are {', '.join(MOTION_CLASSES)}")
        path = generate_motion_sequence(args.sequence, classes, args.clips_per_class, args.num_frames, args.size, args.seed)
        print(f"Wrote {len(classes) * args.clips_per_class} clips of {', '.join(classes)} to {path}")
        return
    if not args.out:
        parser.error("give --out (a data set) or --sequence (one video)")
    out = generate_motion_dataset(
        args.out, args.train_per_class, args.validation_per_class, args.test_per_class, args.num_frames, args.size,
        args.seed,
    )  # fmt: skip
    print(f"Wrote the synthetic motion data set to {out}")


if __name__ == "__main__":
    main()
