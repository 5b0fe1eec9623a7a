"""Metrics shipped with evl-hf, loadable offline through `evaluate` by path."""

from pathlib import Path


VIDEO_ACCURACY_PATH = str(Path(__file__).parent / "video_accuracy")


def load_video_accuracy(**kwargs):
    """`evaluate.load` of the packaged top-k video accuracy metric (no Hub access needed)."""
    try:
        import evaluate
    except ImportError as error:  # an optional extra: say how to get it
        raise ImportError('The video accuracy metric needs evaluate: pip install "evl-hf[train]"') from error

    return evaluate.load(VIDEO_ACCURACY_PATH, **kwargs)
