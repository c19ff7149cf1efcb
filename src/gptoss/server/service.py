"""What every generating endpoint does: check the model, budget the tokens, submit, and run the
token stream to its end (or to the client's disconnect)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.responses import StreamingResponse

from gptoss.inference import (
    AsyncEngine,
    EngineError,
    QueueFull,
    Runner,
    SamplingParams,
    SequenceRequest,
    TokenEvent,
    TokenStream,
)
from gptoss.inference.async_engine import DEFAULT_MAX_QUEUE
from gptoss.inference.scoring import PromptScores
from gptoss.inference.speculative import speculation
from gptoss.server.errors import APIError, error_body
from gptoss.server.metrics import Metrics
from gptoss.server.store import DEFAULT_MAX_BYTES, DEFAULT_TTL_SECONDS, ResponseStore
from gptoss.tokenizer import cache_dir

log = logging.getLogger(__name__)

# How often a non-streaming request checks whether its client is still there.
DISCONNECT_POLL_SECONDS = 0.25
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(frozen=True)
class ServerSettings:
    model_name: str
    api_keys: tuple[str, ...] = ()  # none: no authentication; each key sees only its own responses
    max_queue: int = DEFAULT_MAX_QUEUE  # sequences waiting for a slot before requests get 429
    max_request_bytes: int = 8 * 2**20
    prefill_budget: int = 512  # prompt tokens prefilled per scheduler step
    responses_db: str | Path | None = None  # None: <gptoss cache>/responses.sqlite3
    responses_ttl: float = DEFAULT_TTL_SECONDS
    responses_max_bytes: int = DEFAULT_MAX_BYTES
    speculative: str = "off"  # proposer for speculative decoding of lone streams: off, ngram, suffix


class Service:
    """The server's shared state, and the steps common to chat, completions and responses."""

    def __init__(self, runner: Runner, settings: ServerSettings) -> None:
        self.settings = settings
        self.runner = runner
        self.engine = AsyncEngine(
            runner, settings.max_queue, settings.prefill_budget, speculation=speculation(settings.speculative)
        )
        self.metrics = Metrics(self.engine)
        self.engine.on_decode = self.metrics.batch_size.observe
        self.store = ResponseStore(
            settings.responses_db or cache_dir() / "responses.sqlite3",
            settings.responses_ttl,
            settings.responses_max_bytes,
        )
        self.created = int(time.time())
        self.fingerprint = f"fp_gptoss_{runner.context}"

    def check_model(self, name: str) -> None:
        if name != self.settings.model_name:
            raise APIError(
                404,
                f"The model {name!r} does not exist; this server serves {self.settings.model_name!r}.",
                param="model",
                code="model_not_found",
            )

    def completion_budget(self, prompt_tokens: int, requested: int | None, param: str) -> int:
        """Tokens the completion may take: as `requested`, else whatever the context leaves."""
        context = self.runner.context
        if prompt_tokens == 0:
            raise APIError(400, "the prompt is empty", param="prompt")
        wanted = requested if requested is not None else max(context - prompt_tokens, 0)
        if prompt_tokens + max(wanted, 1) > context:
            raise APIError(
                400,
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{prompt_tokens + wanted} tokens ({prompt_tokens} in the prompt, {wanted} for the "
                f"completion). Please reduce the prompt or the completion length ({param}).",
                param=param,
                code="context_length_exceeded",
            )
        return wanted

    def submit(self, requests: list[SequenceRequest]) -> TokenStream:
        try:
            stream = self.engine.submit(requests)
        except ValueError as exc:
            raise APIError(400, str(exc)) from None
        except QueueFull as exc:
            raise APIError(
                429,
                f"The server is at capacity ({exc}); retry shortly.",
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            ) from None
        self.metrics.prompt_tokens.inc(sum(len(r.prompt) for r in requests))
        return stream

    async def run(self, request: Request, stream: TokenStream, on_event: Callable[[TokenEvent], Any]) -> None:
        """Feed every event to `on_event` until the stream ends; cancel it if the client leaves."""

        async def consume() -> None:
            async for event in stream:
                on_event(event)

        task = asyncio.ensure_future(consume())
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
                if not task.done() and await request.is_disconnected():
                    raise APIError(499, "the client closed the request", code="client_closed_request")
            task.result()
        except EngineError as exc:
            raise APIError(500, str(exc), code="engine_error") from None
        finally:
            if not task.done():
                task.cancel()
            stream.cancel()
            self._observe(stream)

    async def score(self, tokens: Sequence[int], top: int) -> PromptScores:
        """Log-probabilities of the prompt `tokens` (and the `top` alternatives at each), computed
        off the event loop."""
        score = getattr(self.runner, "score", None)
        if score is None:
            raise APIError(
                400, "this server cannot score prompts (its runner offers no score())", param="echo"
            )
        try:
            return await self.engine.call(lambda: score(tokens, top))
        except ValueError as exc:
            raise APIError(400, str(exc), param="prompt") from None

    def event_stream(self, stream: TokenStream, events: AsyncIterator[str]) -> StreamingResponse:
        """An SSE response. Starlette cancels `events` when the client disconnects; the
        `finally` then frees the sequences' slots."""

        async def body() -> AsyncIterator[str]:
            try:
                async for line in events:
                    yield line
            except EngineError as exc:  # headers are sent: report the failure inside the stream
                yield sse(error_body(str(exc), "server_error", code="engine_error"))
                yield sse("[DONE]")
            except APIError as exc:
                yield sse(exc.body())
                yield sse("[DONE]")
            except Exception:  # a bug of ours: the client still gets an error event and the end
                log.exception("streaming a response failed")
                yield sse(error_body("The server failed while streaming this response.", "server_error"))
                yield sse("[DONE]")
            finally:
                stream.cancel()
                self._observe(stream)

        return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)

    def _observe(self, stream: TokenStream) -> None:
        self.metrics.completion_tokens.inc(stream.tokens)
        if stream.first_token_at is not None:
            self.metrics.ttft.observe(stream.first_token_at - stream.submitted_at)


async def get_service(request: Request) -> Service:
    # async, so that FastAPI calls it on the event loop instead of a worker thread
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


def sampling_params(
    body: Any, max_tokens: int, choice: int, logprobs: int | None, stop_token_ids: frozenset[int]
) -> SamplingParams:
    """The sampling controls of a chat or completions request, for choice number `choice`
    (choices get consecutive seeds, so that `n` > 1 gives different but reproducible answers)."""
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k,
            min_p=body.min_p,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            repetition_penalty=body.repetition_penalty,
            logit_bias={int(k): v for k, v in (body.logit_bias or {}).items()},
            seed=None if body.seed is None else body.seed + choice,
            stop_token_ids=sorted(stop_token_ids),
            logprobs=logprobs,
        )
    except ValueError as exc:
        raise APIError(400, str(exc)) from None


def check_logit_bias(bias: dict[int, float] | None, vocab_size: int) -> None:
    for token in bias or {}:
        if not 0 <= int(token) < vocab_size:
            raise APIError(400, f"logit_bias token {token} is outside the vocabulary", param="logit_bias")


def sse(data: Any, event: str | None = None) -> str:
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
