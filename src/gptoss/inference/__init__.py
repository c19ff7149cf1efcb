"""Inference: the engine core (KV cache, runner, sampler, stops, grammar constraints), offline
batched generation, persistent sessions, and the threaded engine that servers drive."""

from gptoss.inference.async_engine import AsyncEngine, EngineError, QueueFull, TokenStream
from gptoss.inference.cache import ContextFullError, KVCache
from gptoss.inference.engine import (
    Engine,
    SequenceFailure,
    SequenceRequest,
    Session,
    TokenEvent,
    generate,
    generate_stream,
)
from gptoss.inference.prefix_cache import PrefixCache
from gptoss.inference.runner import ModelRunner, Runner
from gptoss.inference.sampling import SamplingParams

__all__ = [
    "AsyncEngine",
    "ContextFullError",
    "Engine",
    "EngineError",
    "KVCache",
    "ModelRunner",
    "PrefixCache",
    "QueueFull",
    "Runner",
    "SamplingParams",
    "SequenceFailure",
    "SequenceRequest",
    "Session",
    "TokenEvent",
    "TokenStream",
    "generate",
    "generate_stream",
]
