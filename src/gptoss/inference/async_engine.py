"""The engine for asyncio servers: `Engine.step` in one background thread, tokens delivered to
`TokenStream`s on the event loop.

Requests join and leave the running batch at every step. A stream that is cancelled (client gone,
stop string seen) frees its slot at the next step. A bounded waiting queue turns overload into
`QueueFull` instead of unbounded latency; a request that could never fit it is a `ValueError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from gptoss.inference.engine import Engine, SequenceFailure, SequenceRequest, TokenEvent
from gptoss.inference.runner import DEFAULT_PREFILL_CHUNK, Runner
from gptoss.inference.speculative import Speculation

log = logging.getLogger(__name__)

DEFAULT_MAX_QUEUE = 256
T = TypeVar("T")


class QueueFull(Exception):
    """The waiting queue is full: retry later."""


class EngineError(RuntimeError):
    """A sequence of this stream failed; the message says why."""


class TokenStream:
    """The asyncio end of one request's sequences: iterate for their `TokenEvent`s (told apart by
    `index`) until every sequence has finished; `cancel()` stops them early."""

    def __init__(self, engine: AsyncEngine, loop: asyncio.AbstractEventLoop) -> None:
        self._engine = engine
        self.loop = loop
        self.queue: asyncio.Queue[TokenEvent | SequenceFailure] = asyncio.Queue()
        self.seq_ids: dict[int, int] = {}  # choice index → engine sequence id
        self.cancelled: set[int] = set()  # choice indices
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None
        self.tokens = 0  # events yielded so far
        self.cached_tokens: dict[int, int] = {}  # choice index → prompt tokens the prefix cache gave

    @property
    def cached(self) -> int:
        """Prompt tokens the prefix cache gave, the fewest among the sequences (known once each
        has its first token)."""
        return min(self.cached_tokens.values(), default=0)

    def cancel(self, index: int | None = None) -> None:
        """Stop sequence `index`, or all of them; their later events are not delivered."""
        indices = list(self.seq_ids) if index is None else [index]
        self.cancelled.update(indices)
        self._engine.cancel([self.seq_ids[i] for i in indices])

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        running = set(self.seq_ids) - self.cancelled
        while running:
            item = await self.queue.get()
            if isinstance(item, SequenceFailure):
                raise EngineError(item.message)
            if item.index in running:
                if item.cached_tokens is not None:
                    self.cached_tokens[item.index] = item.cached_tokens
                if self.first_token_at is None:
                    self.first_token_at = time.monotonic()
                self.tokens += 1
                yield item
                if item.finish_reason is not None:
                    running.discard(item.index)
            running -= self.cancelled


@dataclass
class EngineStats:
    running: int = 0  # sequences in the decode batch
    waiting: int = 0  # sequences queued for prefill


class AsyncEngine:
    """Runs an `Engine` in a background thread for many concurrent streams."""

    def __init__(
        self,
        runner: Runner,
        max_queue: int = DEFAULT_MAX_QUEUE,
        prefill_budget: int = DEFAULT_PREFILL_CHUNK,
        on_decode: Callable[[int], None] | None = None,
        speculation: Speculation | None = None,
    ) -> None:
        self.runner = runner
        self.max_queue = max_queue
        self.engine = Engine(
            runner, prefill_budget=prefill_budget, on_decode=on_decode, speculation=speculation
        )
        self.stats = EngineStats()
        self._cond = threading.Condition()
        self._incoming: list[tuple[SequenceRequest, TokenStream]] = []
        self._cancels: list[int] = []
        self._calls: list[tuple[Callable[[], Any], asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._streams: dict[int, TokenStream] = {}  # engine sequence id → stream (thread-owned)
        self._queued = 0  # sequences submitted and not yet running or finished
        self._thread: threading.Thread | None = None
        self._stopping = False

    @property
    def on_decode(self) -> Callable[[int], None] | None:
        return self.engine.on_decode

    @on_decode.setter
    def on_decode(self, callback: Callable[[int], None] | None) -> None:
        self.engine.on_decode = callback

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="gptoss-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # ------------------------------------------------------------------ the asyncio side
    def submit(self, requests: Sequence[SequenceRequest]) -> TokenStream:
        """Queue the sequences of one request (all or none). Raises ValueError for a request that
        can never run here, QueueFull when the waiting queue has no room for it now."""
        if len(requests) > self.max_queue:
            raise ValueError(
                f"this request holds {len(requests)} sequences, more than this server ever queues "
                f"({self.max_queue}); send fewer prompts or a smaller n"
            )
        for request in requests:
            if request.params.stop_token_ids is None:
                raise ValueError("SequenceRequest.params.stop_token_ids must be set")
            self.engine.check(request)
        stream = TokenStream(self, asyncio.get_running_loop())
        with self._cond:
            if self._queued + len(requests) > self.max_queue:
                raise QueueFull(f"{self._queued} sequences are waiting (limit {self.max_queue})")
            for request in requests:
                self._incoming.append((request, stream))
                stream.seq_ids[request.index] = -1  # assigned by the engine thread
            self._queued += len(requests)
            self.stats.waiting = self._queued
            self._cond.notify()
        return stream

    async def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the engine thread between two steps (work on the model that is not a
        sequence, e.g. scoring a prompt): the model is never used by two threads at once."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        with self._cond:
            self._calls.append((fn, loop, future))
            self._cond.notify()
        return await future

    def cancel(self, seq_ids: Sequence[int]) -> None:
        with self._cond:
            self._cancels.extend(seq_ids)
            self._cond.notify()

    # ------------------------------------------------------------------ the engine thread
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        engine = self.engine
        while True:
            with self._cond:
                while not (
                    self._stopping or self._incoming or self._cancels or self._calls or engine.has_work
                ):
                    self._cond.wait()
                if self._stopping:
                    break
                incoming, self._incoming = self._incoming, []
                cancels, self._cancels = self._cancels, []
                calls, self._calls = self._calls, []
            for fn, loop, future in calls:
                _run_call(fn, loop, future)
            out: list[tuple[TokenStream, TokenEvent | SequenceFailure]] = []
            self._take(incoming, cancels, out)
            try:
                step = engine.step()
            except Exception as exc:  # a bug in the step itself: fail what it held, keep serving
                log.exception("engine step failed")
                step = [
                    (seq.id, SequenceFailure(seq.request.index, f"generation failed: {type(exc).__name__}"))
                    for seq in [*engine.running, *engine.waiting]
                ]
                engine.reset()
            out += [(self._streams[seq_id], item) for seq_id, item in step if seq_id in self._streams]
            self._deliver(out)
        with self._cond:
            incoming, self._incoming = self._incoming, []
            calls, self._calls = self._calls, []
        for _, loop, future in calls:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, future, None, RuntimeError("the server is shutting down"))
        streams = {id(s): s for s in [*self._streams.values(), *(s for _, s in incoming)]}
        self._deliver([(s, SequenceFailure(-1, "the server is shutting down")) for s in streams.values()])

    def _take(
        self,
        incoming: list[tuple[SequenceRequest, TokenStream]],
        cancels: list[int],
        out: list[tuple[TokenStream, TokenEvent | SequenceFailure]],
    ) -> None:
        for request, stream in incoming:
            if request.index in stream.cancelled:
                continue
            try:
                seq_id = self.engine.add(request)
            except ValueError as exc:  # checked at submit: only a runner that changed could get here
                out.append((stream, SequenceFailure(request.index, str(exc))))
                continue
            stream.seq_ids[request.index] = seq_id
            self._streams[seq_id] = stream
            if request.index in stream.cancelled:  # cancelled while it was being added
                self.engine.cancel(seq_id)
        for seq_id in cancels:
            if seq_id >= 0:
                self.engine.cancel(seq_id)

    def _deliver(self, out: list[tuple[TokenStream, TokenEvent | SequenceFailure]]) -> None:
        """Hand events to their streams' event loops, one wake-up per loop per step."""
        engine = self.engine
        live = {s.id for s in engine.running} | {s.id for s in engine.waiting}
        for seq_id in [s for s in self._streams if s not in live]:
            del self._streams[seq_id]
        with self._cond:
            self._queued = len(engine.waiting) + sum(1 for _ in self._incoming)
            self.stats.running, self.stats.waiting = len(engine.running), self._queued
        by_loop: dict[
            asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, TokenEvent | SequenceFailure]]
        ] = {}
        for stream, item in out:
            if item.index not in stream.cancelled:
                by_loop.setdefault(stream.loop, []).append((stream.queue, item))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
                loop.call_soon_threadsafe(_put_all, items)


def _run_call(fn: Callable[[], Any], loop: asyncio.AbstractEventLoop, future: asyncio.Future) -> None:
    try:
        result, error = fn(), None
    except Exception as exc:  # handed to the awaiting coroutine
        result, error = None, exc
    with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
        loop.call_soon_threadsafe(_settle, future, result, error)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # the awaiting request was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _put_all(items: list[tuple[asyncio.Queue, TokenEvent | SequenceFailure]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)
