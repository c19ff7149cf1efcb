"""gptoss: the gpt-oss model family — exact model math, checkpoints, inference, serving, training."""

from gptoss.checkpoint import load_model, save_model
from gptoss.config import PRESETS, ModelConfig, get_config
from gptoss.inference import SamplingParams, Session, generate, generate_stream
from gptoss.model import GptOss
from gptoss.tokenizer import get_tokenizer

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "GptOss",
    "ModelConfig",
    "SamplingParams",
    "Session",
    "generate",
    "generate_stream",
    "get_config",
    "get_tokenizer",
    "load_model",
    "save_model",
]
