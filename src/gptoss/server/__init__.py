"""An OpenAI-compatible HTTP server for gpt-oss models (see docs/serving.md): thin adapters over
the engine core in `gptoss.inference`."""

from gptoss.server.app import create_app, serve
from gptoss.server.service import ServerSettings
from gptoss.server.store import ResponseStore

__all__ = ["ResponseStore", "ServerSettings", "create_app", "serve"]
