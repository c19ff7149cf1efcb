"""gptoss: the gpt-oss model family — exact model math, checkpoints, inference, serving, training."""

from gptoss._lazy import lazy_attributes

__version__ = "0.1.0"

_ORIGINS = {
    "gptoss.checkpoint": ("load_model", "save_model"),
    "gptoss.config": ("PRESETS", "ModelConfig", "get_config"),
    "gptoss.inference": ("SamplingParams", "Session", "generate", "generate_stream"),
    "gptoss.model": ("GptOss",),
    "gptoss.tokenizer": ("get_tokenizer",),
}
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
__getattr__ = lazy_attributes(__name__, _ORIGINS)
