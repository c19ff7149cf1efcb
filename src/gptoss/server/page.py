"""The chat page at ``/``: plain HTML, CSS and JavaScript in this package (no build step, no CDN),
talking to the server's own /v1/chat/completions stream."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

ASSETS_PATH = "/ui"
_FILES = Path(__file__).parent / "web"


def install(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(_FILES / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount(ASSETS_PATH, StaticFiles(directory=_FILES), name="ui")
