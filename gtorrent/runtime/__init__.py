"""The model runtime: ONNX Runtime sessions for decoder-only causal LMs in the optimum export layout."""

from .files import ModelFiles, bundled_model_path, locate_model, model_id
from .model import GenerationParams, GenerationResult, LanguageModel
from .providers import gpu_usable
from .sampling import SamplingParams

__all__ = [
    "GenerationParams",
    "GenerationResult",
    "LanguageModel",
    "ModelFiles",
    "SamplingParams",
    "bundled_model_path",
    "gpu_usable",
    "locate_model",
    "model_id",
]
