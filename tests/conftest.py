import os


# Nothing in the tests may reach the network; set before transformers/huggingface_hub read their environment.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import sys
from pathlib import Path

import pytest
import torch


sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(min(2, torch.get_num_threads()))

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = FIXTURES / "evl-original-tiny"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return GOLDEN


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory) -> Path:
    """A tiny random CLIP vision tower saved like a Hub checkpoint, loaded the way a user loads openai/clip-*."""
    from helpers import save_tiny_backbone

    return save_tiny_backbone(tmp_path_factory.mktemp("clip-tiny"))


@pytest.fixture(params=["pyav", "torchcodec"])
def decoding_backend(request) -> str:
    """Run a decoding test with each backend. torchcodec is part of the test install: if it cannot load, fail, never skip."""
    from evl_hf.video_decoding_evl import _torchcodec_can_decode_video

    if request.param == "torchcodec" and not _torchcodec_can_decode_video():
        pytest.fail(
            "torchcodec cannot decode video here: install the torchcodec matching torch (scripts/install.sh pins it) "
            "and FFmpeg's shared libraries (apt-get install ffmpeg)."
        )
    return request.param


@pytest.fixture(scope="module")
def coded_clip(tmp_path_factory) -> Path:
    """A 300-frame H.264 clip whose frames carry their index (`helpers.frame_index` reads it back)."""
    from helpers import index_coded_frames, write_clip

    return write_clip(tmp_path_factory.mktemp("clips") / "coded.mp4", index_coded_frames(300), gop=12)
