"""Metrics shipped with evl-hf, loadable offline through `evaluate` by path."""

from pathlib import Path


VIDEO_ACCURACY_PATH = str(Path(__file__).parent / "video_accuracy")


def load_video_accuracy(**kwargs):
    """`evaluate.load` of the packaged top-k video accuracy metric (no Hub access needed)."""
    import evaluate

    return evaluate.load(VIDEO_ACCURACY_PATH, **kwargs)
