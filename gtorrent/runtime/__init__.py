"""The model runtime: ONNX Runtime sessions for decoder-only causal LMs in the optimum export layout."""

from .files import ModelFiles, bundled_model_path, locate_model, model_id
from .model import GenerationParams, GenerationResult, LanguageModel
from .providers import gpu_usable
from .sampling import SamplingParams
from .score import AnswerScore, ScoreError, credibility_of, epoch_credibility, score_answer

__all__ = [
    "AnswerScore",
    "GenerationParams",
    "GenerationResult",
    "LanguageModel",
    "ModelFiles",
    "SamplingParams",
    "ScoreError",
    "bundled_model_path",
    "credibility_of",
    "epoch_credibility",
    "gpu_usable",
    "locate_model",
    "model_id",
    "score_answer",
]
