"""The FastAPI application: `create_app(runner, settings)`, and `serve(...)` to run it with uvicorn.

`create_app` takes a `Runner` rather than a model: production passes a `ModelRunner`, tests may pass
a runner that scripts its output. Everything between the HTTP request and the runner is the same.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import uvicorn
from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gptoss.inference import ModelRunner, Runner
from gptoss.inference.cache import default_budget_bytes as kv_default_bytes
from gptoss.inference.mirror import MirroredRunner, agree, control_group, follow
from gptoss.inference.optimize import load_for_inference
from gptoss.inference.prefix_cache import PrefixCache, default_budget_bytes
from gptoss.inference.runner import model_device
from gptoss.server import anthropic, chat, ollama, page, responses, tokenize
from gptoss.server.errors import APIError, error_response, install_error_handlers
from gptoss.server.metrics import MetricsMiddleware
from gptoss.server.schemas import ModelCard, ModelList
from gptoss.server.service import ServerSettings, Service, ServiceDep
from gptoss.server.store import owner_of

log = logging.getLogger(__name__)

API_KEY_ENV = "GPTOSS_API_KEY"
DEFAULT_MAX_BATCH = 32  # sequences that decode together (memory is the KV budget's business)
# The chat page and its files load without a key: the page asks for it and sends it with each call.
PUBLIC_PATHS = frozenset({"/health", "/"})
PUBLIC_PREFIXES = (page.ASSETS_PATH + "/",)


class Gate:
    """The door, before any routing. With API keys, every route but /health and the chat page
    needs ``Authorization: Bearer <key>`` or Anthropic's ``x-api-key: <key>`` (docs and 404s
    included, hence middleware rather than a route dependency); the key's digest goes to
    `request.state.owner`, which owns stored responses. Request bodies over `max_bytes` get
    413: at once when Content-Length says so, else as soon as the streamed body passes the limit.
    (FastAPI's own `max_body_size` answers in plain text, not in the APIs' error shapes.)"""

    def __init__(self, app: ASGIApp, api_keys: tuple[str, ...], max_bytes: int) -> None:
        self.app = app
        self.owners = {key.encode(): owner_of(key) for key in api_keys}
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        error = self._check(scope)
        if error is not None:
            await error_response(scope["path"], error)(scope, receive, send)
            return
        scope.setdefault("state", {})["owner"] = self._owner(scope)
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:  # FastAPI turns this into our 413 error reply
                raise HTTPException(413)
            return message

        await self.app(scope, limited_receive, send)

    def _check(self, scope: Scope) -> APIError | None:
        headers = Headers(scope=scope)
        path = scope["path"]
        if self.owners and path not in PUBLIC_PATHS and not path.startswith(PUBLIC_PREFIXES):
            given = _given_key(headers)
            if not any(secrets.compare_digest(given, key) for key in self.owners):
                return APIError(
                    401,
                    "Incorrect or missing API key: send it as 'Authorization: Bearer <key>' "
                    "or 'x-api-key: <key>'.",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            return APIError(
                413, f"The request body is larger than the {self.max_bytes} bytes this server accepts."
            )
        return None

    def _owner(self, scope: Scope) -> str:
        return self.owners.get(_given_key(Headers(scope=scope)), "")


def _given_key(headers: Headers) -> bytes:
    scheme, _, token = headers.get("authorization", "").partition(" ")  # schemes ignore case
    return (token.strip() if scheme.lower() == "bearer" else headers.get("x-api-key", "")).encode()


def create_app(runner: Runner, settings: ServerSettings) -> FastAPI:
    """The OpenAI-compatible app for `runner`. The engine thread runs while the app's lifespan
    does (uvicorn starts and stops it)."""
    service = Service(runner, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.engine.start()
        try:
            yield
        finally:
            service.engine.stop()
            service.store.close()
            if isinstance(runner, MirroredRunner):
                runner.close()  # the other ranks return once no call can come any more

    app = FastAPI(
        title="gptoss",
        summary="OpenAI-compatible API for gpt-oss models",
        lifespan=lifespan,
    )
    app.state.service = service
    install_error_handlers(app)
    app.include_router(chat.router)
    app.include_router(responses.router)
    app.include_router(anthropic.router)
    app.include_router(ollama.router)
    app.include_router(tokenize.router)
    page.install(app)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models", response_model=ModelList)
    async def list_models(service: ServiceDep) -> ModelList:
        return ModelList(data=[_card(service)])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard)
    async def get_model(model_id: str, service: ServiceDep) -> ModelCard:
        service.check_model(model_id)
        return _card(service)

    @app.get("/metrics", response_class=Response)
    async def metrics(service: ServiceDep) -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(Gate, api_keys=settings.api_keys, max_bytes=settings.max_request_bytes)
    app.add_middleware(MetricsMiddleware, metrics=service.metrics)  # outermost: counts 401s too
    return app


def _card(service: Service) -> ModelCard:
    return ModelCard(
        id=service.settings.model_name, created=service.created, max_model_len=service.runner.context
    )


def serve(
    model: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_keys: tuple[str, ...] = (),
    served_model_name: str | None = None,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    int8: bool = False,
    max_batch: int = DEFAULT_MAX_BATCH,
    context: int | None = None,
    kv_cache_gib: float | None = None,
    prefix_cache_gib: float | None = None,
    tensor_parallel: int = 1,
    expert_parallel: int = 1,
    **settings: Any,
) -> None:
    """Load `model` (a checkpoint directory or preset name) and serve it until interrupted.

    `api_keys` default to $GPTOSS_API_KEY (several keys separated by commas); `context` is the
    tokens one sequence may hold (None: the model's context); `kv_cache_gib` bounds the KV cache
    (None: half of what is available after loading); `prefix_cache_gib` is the prefix cache's memory
    (None: a quarter of what is available after loading, at most 8 GiB; 0: no prefix cache); other
    keyword arguments are `ServerSettings` fields.

    Under torchrun, `tensor_parallel` / `expert_parallel` (each 1 or the number of processes) split
    the model over the processes: rank 0 serves HTTP and runs the engine, the other ranks repeat its
    model calls (`gptoss.inference.mirror`) and return when it stops. Both budgets are then per
    process, rank 0's (ranks on one host share its memory).
    """
    if prefix_cache_gib is not None and prefix_cache_gib < 0:
        raise ValueError(f"--prefix-cache-gib must be 0 (off) or more, got {prefix_cache_gib}")
    if kv_cache_gib is not None and kv_cache_gib <= 0:
        raise ValueError(f"--kv-cache-gib must be more than 0, got {kv_cache_gib}")
    if context is not None and context < 1:
        raise ValueError(f"--max-model-len must be at least 1, got {context}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and tensor_parallel == expert_parallel == 1:
        raise ValueError(
            f"under torchrun ({world} processes) serve splits the model: pass --tp {world} and/or "
            f"--ep {world}, or run gptoss serve without torchrun"
        )
    loaded = load_for_inference(model, device, dtype, int8, tensor_parallel, expert_parallel)
    group = control_group() if world > 1 else None
    # Ranks on one host share its memory; every rank's cache must take the same blocks: rank 0 decides.
    sharing = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if model_device(loaded).type == "cpu" else 1
    kv_budget = None if kv_cache_gib is None else int(kv_cache_gib * 2**30)
    if group is not None:
        kv_budget = agree(kv_budget or kv_default_bytes(model_device(loaded)) // sharing, group)
    runner = ModelRunner(
        loaded,
        max_batch=max_batch,
        context=context or loaded.config.max_position_embeddings,
        kv_budget_bytes=kv_budget,
    )
    if prefix_cache_gib is None:
        budget = default_budget_bytes(model_device(loaded)) // sharing
    else:
        budget = int(prefix_cache_gib * 2**30)
    if group is not None:
        budget = agree(budget, group)
    if budget > 0:
        runner.prefix_cache = PrefixCache(budget)
    if group is not None and dist.get_rank() != 0:
        follow(runner, group)
        dist.destroy_process_group()
        return
    log.info(
        "KV cache: up to %d sequences × %d tokens, %.2f GiB budget (%d tokens), taken in blocks of %d as "
        "sequences grow",
        max_batch,
        runner.context,
        runner.kv_budget_bytes / 2**30,
        runner.kv_budget_bytes // max(runner.cache.pool.block_bytes, 1) * runner.cache.block_size,
        runner.cache.block_size,
    )
    if budget > 0:
        log.info("prefix cache: %.2f GiB", budget / 2**30)
    name = served_model_name or Path(str(model)).name
    api_keys = api_keys or tuple(k for k in os.environ.get(API_KEY_ENV, "").split(",") if k)
    served = runner if group is None else MirroredRunner(runner, group)
    app = create_app(served, ServerSettings(model_name=name, api_keys=api_keys, **settings))
    if host not in ("127.0.0.1", "localhost", "::1") and not api_keys:
        log.warning("serving on %s without an API key: anyone who can reach this port can use it", host)
    uvicorn.run(app, host=host, port=port, log_level="info")
