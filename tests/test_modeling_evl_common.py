"""
transformers' own model contract (`ModelTesterMixin` from the installed release's `tests/test_modeling_common.py`)
run against EVL. The test files come from transformers' PyPI source distribution (see
`tools/fetch_transformers_tests.py`, which `scripts/install.sh` runs); they are not part of this repository, and this
module never downloads them: without them its collection fails, saying how to fetch them.

That source distribution ships `test_modeling_common.py` but not two helper modules it imports:
`tests/exporters/test_export.py` (the `ExportTesterMixin` base class, torch.export checks) and
`tests/generation/test_utils.py` (`GenerationTesterMixin`, only for models that generate). They are stood in for by
empty classes below; torch.export of EVL is checked by `test_torch_export` in this file instead.
"""

import os
import shutil
import subprocess
import sys
import types
import unittest
from pathlib import Path

import pytest
import torch
import transformers


REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY / "tools"))
from fetch_transformers_tests import DEFAULT_ROOT, PACKAGE  # noqa: E402


UPSTREAM_TESTS = DEFAULT_ROOT / transformers.__version__
if not (UPSTREAM_TESTS / PACKAGE / "test_modeling_common.py").is_file():
    pytest.fail(
        f"transformers {transformers.__version__}'s own test files (ModelTesterMixin) are missing from "
        f"{UPSTREAM_TESTS / PACKAGE}: run scripts/install.sh, or `python tools/fetch_transformers_tests.py`, once "
        "with access to PyPI (they come from transformers' source distribution). The tests never download them.",
        pytrace=False,
    )
sys.path.insert(0, str(UPSTREAM_TESTS))
for name, attribute in (("exporters.test_export", "ExportTesterMixin"), ("generation.test_utils", "GenerationTesterMixin")):
    parent = types.ModuleType(f"{PACKAGE}.{name.split('.')[0]}")
    module = types.ModuleType(f"{PACKAGE}.{name}")
    setattr(module, attribute, type(attribute, (), {}))
    sys.modules.setdefault(parent.__name__, parent)
    sys.modules.setdefault(module.__name__, module)

from transformers.models.auto.modeling_auto import (  # noqa: E402
    MODEL_FOR_VIDEO_CLASSIFICATION_MAPPING_NAMES,
    MODEL_MAPPING_NAMES,
)
from transformers_upstream_tests.test_modeling_common import (  # noqa: E402
    ModelTesterMixin,
    floats_tensor,
)

from transformers import Dinov2WithRegistersConfig, SiglipVisionConfig  # noqa: E402

from evl_hf import EVLConfig, EVLForVideoClassification, EVLModel  # noqa: E402
from helpers import tiny_vision_config  # noqa: E402


def test_missing_transformers_test_files_stop_collection_with_instructions(tmp_path):
    """A clean clone, offline, before `scripts/install.sh`: a collection error that says what to run, no download."""
    for name in ("tests/test_modeling_evl_common.py", "tests/conftest.py", "tests/helpers.py",
                 "tools/fetch_transformers_tests.py"):  # fmt: skip
        (tmp_path / name).parent.mkdir(exist_ok=True)
        shutil.copy(REPOSITORY / name, tmp_path / name)
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_FIND_LINKS="", PIP_CONFIG_FILE=os.devnull)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert "run scripts/install.sh" in output, output[-3000:]
    assert "pip download" not in output and "CalledProcessError" not in output, output[-3000:]  # no download tried
    assert not (tmp_path / ".cache").exists()
    assert "tools/fetch_transformers_tests.py" in (REPOSITORY / "scripts" / "install.sh").read_text()


# A model that lives inside transformers is listed in these name tables; `AutoModel.register` (what `import evl_hf`
# does) fills the lazy mappings only. The mixin reads the tables to know the base model and the classifier's labels.
MODEL_MAPPING_NAMES.setdefault("evl", "EVLModel")
MODEL_FOR_VIDEO_CLASSIFICATION_MAPPING_NAMES.setdefault("evl", "EVLForVideoClassification")


class EVLModelTester:
    def __init__(self, parent, batch_size=2, num_frames=3, image_size=32, patch_size=8, hidden_size=32,
                 num_backbone_layers=3, decoder_num_layers=2, decoder_num_heads=4, decoder_qkv_dim=32, num_labels=4,
                 is_training=True, backbone="clip"):  # fmt: skip
        self.parent = parent
        self.backbone = backbone
        self.batch_size = batch_size
        self.num_frames = num_frames
        self.image_size = image_size
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.num_backbone_layers = num_backbone_layers
        self.decoder_num_layers = decoder_num_layers
        self.decoder_qkv_dim = decoder_qkv_dim
        self.num_labels = num_labels
        self.is_training = is_training
        # What the common tests read: the decoder's layers, heads and query length. Hidden states are the decoder's
        # query states (one per layer plus the initial query).
        self.num_hidden_layers = decoder_num_layers
        self.num_attention_heads = decoder_num_heads
        self.seq_length = 1
        self.expected_num_hidden_layers = decoder_num_layers + 1
        num_prefix_tokens = {"clip": 1, "siglip": 0, "dinov2_with_registers": 3}[backbone]
        self.key_length = num_frames * ((image_size // patch_size) ** 2 + num_prefix_tokens)

    def get_vision_config(self):
        shape = dict(hidden_size=self.hidden_size, num_hidden_layers=self.num_backbone_layers,
                     patch_size=self.patch_size, image_size=self.image_size)  # fmt: skip
        if self.backbone == "siglip":
            return SiglipVisionConfig(intermediate_size=64, num_attention_heads=4, **shape)
        if self.backbone == "dinov2_with_registers":
            return Dinov2WithRegistersConfig(intermediate_size=64, num_attention_heads=4, num_register_tokens=2, **shape)
        return tiny_vision_config(**shape)

    def get_config(self) -> EVLConfig:
        return EVLConfig(
            vision_config=self.get_vision_config(),
            num_frames=self.num_frames,
            decoder_num_layers=self.decoder_num_layers,
            decoder_num_heads=self.num_attention_heads,
            decoder_qkv_dim=self.decoder_qkv_dim,
            num_labels=self.num_labels,
        )  # fmt: skip

    def prepare_config_and_inputs(self):
        pixel_values = floats_tensor([self.batch_size, self.num_frames, 3, self.image_size, self.image_size])
        labels = torch.randint(0, self.num_labels, (self.batch_size,))
        return self.get_config(), pixel_values, labels

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values, _ = self.prepare_config_and_inputs()
        return config, {"pixel_values": pixel_values}


class EVLModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (EVLModel, EVLForVideoClassification)
    # As for transformers' own vision models (VideoMAE, CLIP vision, ViViT): no token embeddings to resize.
    test_resize_embeddings = False
    test_torch_exportable = False  # ExportTesterMixin is not in the source distribution; see test_torch_export
    _is_composite = True

    def setUp(self):
        self.model_tester = EVLModelTester(self)

    def test_model_get_set_embeddings(self):
        # As transformers' vision tests: the input "embedding" is the backbone's patch embedding (CLIP's and SigLIP's
        # convolution, DINOv2's module around one).
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config)
            embedding = model.get_input_embeddings()
            self.assertIs(embedding, model.base_model.vision_model.get_input_embeddings())
            self.assertIsInstance(embedding, torch.nn.Conv2d if self.model_tester.backbone != "dinov2_with_registers" else torch.nn.Module)
            self.assertIsNone(model.get_output_embeddings())

    @unittest.skip(reason="EVL does not use inputs_embeds (pixel input only), like transformers' vision models")
    def test_inputs_embeds(self):
        pass

    @unittest.skip(reason="EVL does not use inputs_embeds (pixel input only), like transformers' vision models")
    def test_inputs_embeds_matches_input_ids(self):
        pass

    def test_torch_export(self):
        model = EVLForVideoClassification(self.model_tester.get_config()).eval()
        _, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        with torch.no_grad():
            expected = model(**inputs).logits
            program = torch.export.export(model, args=(), kwargs=inputs, strict=False)
            torch.testing.assert_close(program.module()(**inputs).logits, expected, atol=1e-5, rtol=1e-5)


class EVLSiglipModelTest(EVLModelTest):
    """The same contract with a SigLIP backbone (no class token)."""

    def setUp(self):
        self.model_tester = EVLModelTester(self, backbone="siglip")


class EVLDinov2WithRegistersModelTest(EVLModelTest):
    """The same contract with a DINOv2 backbone with registers (class token and two registers before the patches)."""

    def setUp(self):
        self.model_tester = EVLModelTester(self, backbone="dinov2_with_registers")
