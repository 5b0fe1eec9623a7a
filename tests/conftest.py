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
