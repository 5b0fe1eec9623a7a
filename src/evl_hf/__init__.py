"""evl-hf: EVL ("Frozen CLIP Models are Efficient Video Learners") as a native Hugging Face transformers model.

Importing the package registers EVL with `AutoConfig`, `AutoModel`, `AutoModelForVideoClassification` and
`AutoVideoProcessor` (and so with `pipeline("video-classification")`), and makes `EVLVideoClassificationPipeline` the
`"video-classification"` pipeline (transformers' own for every other model; for EVL it honours `frame_sampling_rate`
and `batch_size`), and registers the `"video-timeline"` pipeline (labels over time for long videos). Saved
checkpoints also carry `auto_map`, so `trust_remote_code=True` loads them where this package is not installed (there
the pipeline is transformers' own: the processor's saved sampling rate, no batching).
"""

from transformers import AutoConfig, AutoModel, AutoModelForVideoClassification, AutoVideoProcessor

from .allocator import keep_freed_memory
from .configuration_evl import EVL_PRESETS, EVLConfig
from .explain import EVLExplanation, explain
from .modeling_evl import (
    EVLBackboneFeatures,
    EVLCheckpointError,
    EVLForVideoClassification,
    EVLInputError,
    EVLModel,
    EVLModelOutput,
    EVLPreTrainedModel,
)
from .pipeline_evl import EVLVideoClassificationPipeline, register_pipeline
from .timeline import EVLVideoTimelinePipeline, plot_timeline, video_timeline
from .timeline import register_pipeline as register_timeline_pipeline
from .video_decoding_evl import EVLVideoDecodingError, decode_video, resolve_decoding_backend
from .video_processing_evl import EVLVideoProcessor, sample_frame_indices


__version__ = "0.1.0"

AutoConfig.register("evl", EVLConfig, exist_ok=True)
AutoModel.register(EVLConfig, EVLModel, exist_ok=True)
AutoModelForVideoClassification.register(EVLConfig, EVLForVideoClassification, exist_ok=True)
AutoVideoProcessor.register(EVLConfig, EVLVideoProcessor, exist_ok=True)

EVLConfig.register_for_auto_class()
EVLModel.register_for_auto_class("AutoModel")
EVLForVideoClassification.register_for_auto_class("AutoModelForVideoClassification")
EVLVideoProcessor.register_for_auto_class("AutoVideoProcessor")
register_pipeline()
register_timeline_pipeline()

__all__ = [
    "EVL_PRESETS",
    "EVLBackboneFeatures",
    "EVLCheckpointError",
    "EVLConfig",
    "EVLExplanation",
    "EVLForVideoClassification",
    "EVLInputError",
    "EVLModel",
    "EVLModelOutput",
    "EVLPreTrainedModel",
    "EVLVideoClassificationPipeline",
    "EVLVideoDecodingError",
    "EVLVideoProcessor",
    "EVLVideoTimelinePipeline",
    "decode_video",
    "explain",
    "keep_freed_memory",
    "plot_timeline",
    "resolve_decoding_backend",
    "sample_frame_indices",
    "video_timeline",
]
