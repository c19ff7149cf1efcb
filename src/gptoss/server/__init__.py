"""An OpenAI-compatible HTTP server for gpt-oss models (see docs/serving.md)."""

from gptoss.server.app import create_app, serve
from gptoss.server.runner import ModelRunner, Runner
from gptoss.server.scheduler import PrefixConstraint, QueueFull, Scheduler, SequenceRequest, TokenStream
from gptoss.server.service import ServerSettings
from gptoss.server.store import ResponseStore

__all__ = [
    "ModelRunner",
    "PrefixConstraint",
    "QueueFull",
    "ResponseStore",
    "Runner",
    "Scheduler",
    "SequenceRequest",
    "ServerSettings",
    "TokenStream",
    "create_app",
    "serve",
]
