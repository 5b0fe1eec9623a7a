import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import save_tiny_classifier


SETUP_PY = Path(__file__).resolve().parents[1] / "setup.py"


def test_the_requirement_is_setup_py_pin():
    """The bound the remote code checks is the one pip enforces for the installed package."""
    from evl_hf.transformers_requirement import TRANSFORMERS_REQUIREMENT

    pins = re.findall(r'"(transformers[<>=!][^"]*)"', SETUP_PY.read_text())
    assert pins == [TRANSFORMERS_REQUIREMENT], pins


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_classifier(tmp_path_factory.mktemp("evl-tiny"), {0: "a", 1: "b", 2: "c", 3: "d", 4: "e"})


def test_remote_code_on_an_older_transformers_names_the_version_it_needs(checkpoint, tmp_path):
    """A user of transformers 5.17 (faked: the distribution's version as importlib.metadata reports it) loading a
    saved checkpoint with trust_remote_code gets an ImportError naming the required and found versions and the pip
    command, from every entry point, instead of a missing internal transformers name."""
    assert (checkpoint / "transformers_requirement.py").is_file(), sorted(os.listdir(checkpoint))
    script = f"""
import importlib.metadata, json
real_version = importlib.metadata.version
importlib.metadata.version = lambda name: "5.17.0" if name == "transformers" else real_version(name)
from transformers import AutoConfig, AutoModelForVideoClassification, AutoVideoProcessor, pipeline

checkpoint = {str(checkpoint)!r}
errors = {{}}
for name, load in (
    ("AutoConfig", lambda: AutoConfig.from_pretrained(checkpoint, trust_remote_code=True)),
    ("AutoModelForVideoClassification", lambda: AutoModelForVideoClassification.from_pretrained(checkpoint, trust_remote_code=True)),
    ("AutoVideoProcessor", lambda: AutoVideoProcessor.from_pretrained(checkpoint, trust_remote_code=True)),
    ("pipeline", lambda: pipeline("video-classification", model=checkpoint, trust_remote_code=True)),
):
    try:
        load()
    except ImportError as error:
        errors[name] = str(error)
    else:
        errors[name] = None
print(json.dumps(errors))
"""
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    for name, message in errors.items():
        assert message is not None, f"{name} loaded on a faked transformers 5.17"
        assert "transformers>=5.24,<6" in message and "found transformers==5.17.0" in message, (name, message)
        assert 'pip install -U "transformers>=5.24,<6"' in message, (name, message)
