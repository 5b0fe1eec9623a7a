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
A web demo of an EVL checkpoint (Gradio; `pip install "evl-hf[app]"`): upload a video or pick an example clip, and see
its top-k labels, its labels over time (the `"video-timeline"` pipeline) and the attention heatmaps.

    python -m evl_hf.app --model DIR [--host 127.0.0.1] [--port 7860] [--top_k 5] [--examples DIR] [--window_stride 1]
                         [--frame_sampling_rate N]

On Hugging Face Spaces (the Gradio SDK), an `app.py` of one line serves the same page:

    from evl_hf.app import build_demo; build_demo("path/or/hub-id").launch()
"""

import argparse
import dataclasses
import html
import os
import re
import tempfile
from pathlib import Path


# Gradio reads this when it is imported and when a Blocks is made: no telemetry, no version check.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

try:
    import gradio as gr
except ImportError as error:  # an optional extra: say how to get it
    raise ImportError('The web demo needs Gradio: pip install "evl-hf[app]"') from error

from PIL import Image
from transformers import pipeline
from transformers.utils import logging

# Importing this module imports evl_hf first, which registers EVL's "video-classification" and "video-timeline"
# pipelines.
from .devices import device_argument
from .explain import explain
from .modeling_evl import problem_type_without_labels
from .timeline import plot_timeline, window_frame_sampling_rate
from .video_decoding_evl import VIDEO_SUFFIXES, EVLVideoDecodingError


logger = logging.get_logger(__name__)


def find_examples(examples_dir: str | os.PathLike) -> list[str]:
    """The video files under `examples_dir` (any depth, e.g. a videofolder's `<class>/<clip>.mp4`; by suffix,
    `VIDEO_SUFFIXES`), sorted."""
    directory = Path(examples_dir)
    if not directory.is_dir():
        raise ValueError(f"{examples_dir}: no such directory (of example clips).")
    examples = sorted(str(path) for path in directory.rglob("*") if path.suffix.lower() in VIDEO_SUFFIXES)
    if not examples:
        logger.warning(f"{examples_dir}: no video files ({', '.join(VIDEO_SUFFIXES)}) under it, so no examples.")
    return examples


def build_demo(
    model_dir: str | os.PathLike,
    examples_dir: str | os.PathLike | None = None,
    top_k: int = 5,
    window_stride: int = 1,
    device: str | None = None,
    frame_sampling_rate: int | None = None,
) -> gr.Blocks:
    """
    The demo page for the EVL checkpoint `model_dir` (a directory or a Hub id), as a `gr.Blocks` to `.launch()`.

    The model is loaded here, once, and shared by every request: the top-k labels come from
    `pipeline("video-classification")` (the checkpoint's own frame sampling, whatever the video's length), the
    timeline from `pipeline("video-timeline")` over the whole video (windows `window_stride` sampled frames apart),
    the heatmaps from `evl_hf.explain` (the decoder query's attention over the clip the classifier read).
    `examples_dir`: a folder of video clips offered as examples. `frame_sampling_rate`: the decoded frames between two
    of a timeline window's frames, by default the checkpoint's processor's stride; a processor that samples uniformly
    or by fps has none, and needs it.
    """
    checked = {"top_k": top_k, "window_stride": window_stride}
    if frame_sampling_rate is not None:
        checked["frame_sampling_rate"] = frame_sampling_rate
    for name, value in checked.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")  # not at the first request
    classifier = pipeline("video-classification", model=str(model_dir), device=device)
    timeline = pipeline("video-timeline", model=classifier.model, video_processor=classifier.video_processor)
    # Here, not at every request: a checkpoint whose processor has no fixed stride needs `frame_sampling_rate`.
    frame_sampling_rate = window_frame_sampling_rate(classifier.video_processor, frame_sampling_rate)
    examples = find_examples(examples_dir) if examples_dir is not None else []

    regression = problem_type_without_labels(classifier.model.config) == "regression"
    num_outputs = len(classifier.model.config.id2label)
    outputs = f"{num_outputs} {'output' if num_outputs == 1 else 'outputs'}, a regression" if regression else (
        f"{num_outputs} {'class' if num_outputs == 1 else 'classes'}"
    )  # fmt: skip
    # A regression's outputs are values, not a ranking of classes: all of them are shown and drawn (a value left
    # out of a window's top-k would be drawn as 0 there).
    shown = num_outputs if regression else top_k

    def heatmaps(video: str) -> Image.Image:
        explanation = explain(classifier.model, classifier.video_processor, video, top_k=shown)
        # Titled with the upload's name, not its path in Gradio's temporary folder.
        explanation = dataclasses.replace(explanation, video_name=Path(video).name)
        # Read back into memory, so that no file is left behind per request.
        with tempfile.TemporaryDirectory() as directory:
            with Image.open(explanation.save_figure(Path(directory) / "heatmaps.png")) as image:
                return image.copy()

    def analyse(video: str | None):
        if video is None:
            raise gr.Error("Upload a video or pick an example first.")
        try:
            labels = classifier(video, top_k=shown)
            windows = timeline(
                video, window_stride=window_stride, frame_sampling_rate=frame_sampling_rate, top_k=shown
            )
            heatmap_grid = heatmaps(video)
        except EVLVideoDecodingError as error:
            # The message names the problem ("not a readable video file", "a still image"...); the upload's
            # temporary folder means nothing to the user, its file name does.
            message = str(error).replace(video, Path(video).name)
            raise gr.Error(html.escape(f"Cannot read this video: {message}")) from None
        figure = plot_timeline(windows, num_classes=shown)
        return {entry["label"]: entry["score"] for entry in labels}, figure, heatmap_grid

    with gr.Blocks(title="EVL video classification", analytics_enabled=False) as demo:
        gr.Markdown(
            f"# EVL video classification\n"
            f"Model: `{model_dir}` ({outputs}). Upload a video or pick an "
            f"example clip, then press **Classify**."
        )
        with gr.Row():
            with gr.Column():
                video = gr.Video(label="Video", sources=["upload"], elem_id="video")
                submit = gr.Button("Classify", variant="primary", elem_id="submit")
                if examples:
                    gr.Examples(examples=[[path] for path in examples], inputs=video, label="Example clips")
            with gr.Column():
                if regression:
                    # The model's values, not probabilities: a `gr.Label` would show 3.7 as a confidence of 370%.
                    labels = gr.JSON(label="Predicted values (regression)", elem_id="labels")
                else:
                    labels = gr.Label(num_top_classes=top_k, label=f"Top {top_k} labels", elem_id="labels")
        timeline_plot = gr.Plot(label="Labels over time (the whole video)", elem_id="timeline")
        heatmap_image = gr.Image(
            label="Where the decoder looked (attention per decoder layer, over the frames it read)", type="pil",
            format="png", interactive=False, elem_id="heatmaps",
        )  # fmt: skip
        submit.click(analyse, inputs=video, outputs=[labels, timeline_plot, heatmap_image])
    return demo


def _file_size(text: str) -> str:
    """`--max_file_size` as Gradio reads it (a positive whole number and b, kb, mb, gb or tb), checked before the
    model is loaded."""
    if not re.fullmatch(r"[1-9][0-9]*\s*(b|kb|mb|gb|tb)", text.strip(), flags=re.IGNORECASE):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 500mb or 2gb (a whole number and b/kb/mb/gb/tb)")
    return text.strip()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m evl_hf.app", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="an EVL checkpoint: a directory or a Hub id")
    parser.add_argument("--host", default="127.0.0.1", help="the address to serve on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--top_k", type=int, default=5, help="labels shown, and classes drawn on the timeline")
    parser.add_argument("--examples", default=None, help="a folder of example clips to offer")
    parser.add_argument("--window_stride", type=int, default=1, help="sampled frames between timeline windows")
    parser.add_argument(
        "--frame_sampling_rate",
        type=int,
        default=None,
        help="decoded frames between two of a timeline window's frames (default: the checkpoint's processor's stride; "
        "needed where that processor samples uniformly or by fps)",
    )
    parser.add_argument("--device", default=None, type=device_argument, help="e.g. cuda:0 (default: CPU)")
    parser.add_argument(
        "--max_file_size",
        default="1gb",
        type=_file_size,
        help="the largest upload accepted: a whole number and a unit, e.g. 200mb (Gradio refuses larger ones)",
    )
    args = parser.parse_args(argv)
    try:
        demo = build_demo(
            args.model,
            args.examples,
            top_k=args.top_k,
            window_stride=args.window_stride,
            device=args.device,
            frame_sampling_rate=args.frame_sampling_rate,
        )
    except (ValueError, OSError) as error:  # a bad setting, or a checkpoint that cannot be loaded: one line
        parser.exit(1, f"{parser.prog}: error: {error}\n")
    # No share link (it would open a tunnel through Gradio's servers); errors other than a bad upload's still show
    # their message in the page.
    demo.launch(
        server_name=args.host, server_port=args.port, share=False, show_error=True, max_file_size=args.max_file_size
    )


if __name__ == "__main__":
    main()
