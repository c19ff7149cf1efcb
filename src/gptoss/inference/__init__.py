"""Inference: KV cache, sampling, batched generation and persistent sessions."""

from gptoss.inference.cache import ContextFullError, KVCache
from gptoss.inference.engine import Session, TokenEvent, generate, generate_stream
from gptoss.inference.sampling import SamplingParams

__all__ = [
    "ContextFullError",
    "KVCache",
    "SamplingParams",
    "Session",
    "TokenEvent",
    "generate",
    "generate_stream",
]
