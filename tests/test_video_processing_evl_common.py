"""
transformers' own video-processor contract (`VideoProcessingTestMixin` from the installed release's
`tests/test_video_processing_common.py`) run against `EVLVideoProcessor`, unchanged. The file comes from transformers'
PyPI source distribution (see `tools/fetch_transformers_tests.py`); it is not part of this repository.
"""

import sys
import unittest
from pathlib import Path

from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD


sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from fetch_transformers_tests import fetch  # noqa: E402


sys.path.insert(0, str(fetch()))
from transformers_upstream_tests.test_video_processing_common import (  # noqa: E402
    VideoProcessingTestMixin,
    prepare_video_inputs,
)

from evl_hf import EVLVideoProcessor  # noqa: E402


class EVLVideoProcessingTester:
    """The sizes transformers' video-processor tests use (`shortest_edge` 20, an 18x18 crop, 8-frame clips)."""

    def __init__(self, parent, batch_size=5, num_frames=8, num_channels=3, min_resolution=30, max_resolution=80):
        self.parent = parent
        self.batch_size = batch_size
        self.num_frames = num_frames
        self.num_channels = num_channels
        self.min_resolution = min_resolution
        self.max_resolution = max_resolution
        self.size = {"shortest_edge": 20}
        self.crop_size = {"height": 18, "width": 18}

    def prepare_video_processor_dict(self):
        return {
            "do_resize": True, "size": self.size, "do_center_crop": True, "crop_size": self.crop_size,
            "do_normalize": True, "image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD,
            "do_convert_rgb": True,
        }  # fmt: skip

    def expected_output_video_shape(self, videos):
        return self.num_frames, self.num_channels, self.crop_size["height"], self.crop_size["width"]

    def prepare_video_inputs(self, equal_resolution=False, return_tensors="pil"):
        return prepare_video_inputs(
            batch_size=self.batch_size, num_frames=self.num_frames, num_channels=self.num_channels,
            min_resolution=self.min_resolution, max_resolution=self.max_resolution, equal_resolution=equal_resolution,
            return_tensors=return_tensors,
        )  # fmt: skip


class EVLVideoProcessingTest(VideoProcessingTestMixin, unittest.TestCase):
    fast_video_processing_class = EVLVideoProcessor
    input_name = "pixel_values"
    test_cast_dtype = True

    def setUp(self):
        super().setUp()
        self.video_processor_tester = EVLVideoProcessingTester(self)

    @property
    def video_processor_dict(self):
        return self.video_processor_tester.prepare_video_processor_dict()
