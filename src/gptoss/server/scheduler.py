"""Continuous batching: requests join and leave one running decode batch at every step.

One background thread owns the `Runner`. Each step it prefills waiting prompts up to a token
budget (a long prompt takes several steps, so running streams are never stalled for long), then
decodes one token for every running sequence. Tokens go back to the asyncio side through
`TokenStream`s; a stream that is cancelled (client gone, stop string seen) frees its slot at the
next step. A bounded waiting queue turns overload into `QueueFull` instead of unbounded latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gptoss.inference import SamplingParams, TokenEvent
from gptoss.inference.sampling import Sampler
from gptoss.server.runner import Runner

log = logging.getLogger(__name__)

DEFAULT_MAX_QUEUE = 256


class QueueFull(Exception):
    """The waiting queue is full: retry later."""


class EngineError(RuntimeError):
    """The model failed while this sequence was running."""


class PrefixConstraint:
    """The generated tokens must begin with one of `choices`; after that, decoding is free.

    This forces a tool-call header (``tool_choice`` "required" or a named function): only tokens
    that keep the output on some choice's path are allowed.
    """

    def __init__(self, choices: Sequence[Sequence[int]]) -> None:
        if not choices or not all(choices):
            raise ValueError("a prefix constraint needs at least one non-empty choice")
        self.choices = [tuple(c) for c in choices]

    def allowed(self, generated: Sequence[int]) -> list[int] | None:
        """Tokens allowed next after `generated`, or None when decoding is free."""
        k = len(generated)
        allowed = set()
        for c in self.choices:
            n = min(k, len(c))
            if tuple(generated[:n]) != c[:n]:
                continue
            if n == len(c):  # a whole choice is written
                return None
            allowed.add(c[k])
        return sorted(allowed) or None  # off every path (cannot happen when masking): stop constraining

    def mask(self, logits: Tensor, generated: Sequence[int]) -> Tensor:
        """`logits` (V,) with every disallowed token at -inf."""
        allowed = self.allowed(generated)
        if allowed is None:
            return logits
        index = torch.tensor(allowed, device=logits.device)
        masked = torch.full_like(logits, float("-inf"))
        masked[index] = logits[index]
        return masked


@dataclass(frozen=True)
class SequenceRequest:
    """One sequence to generate. `params.stop_token_ids` must be set (no model default here)."""

    prompt: Sequence[int]
    params: SamplingParams
    index: int = 0  # reported back in every TokenEvent (the choice index)
    constraint: PrefixConstraint | None = None


@dataclass
class _Failure:
    message: str


class TokenStream:
    """The asyncio end of one request's sequences: iterate for their `TokenEvent`s (told apart by
    `index`) until every sequence has finished; `cancel()` stops them early."""

    def __init__(self, scheduler: Scheduler, loop: asyncio.AbstractEventLoop) -> None:
        self._scheduler = scheduler
        self.loop = loop
        self.queue: asyncio.Queue[TokenEvent | _Failure] = asyncio.Queue()
        self.sequences: dict[int, _Seq] = {}  # by choice index
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None
        self.tokens = 0  # events yielded so far

    def cancel(self, index: int | None = None) -> None:
        """Stop sequence `index`, or all of them; their later events are not delivered."""
        seqs = list(self.sequences.values()) if index is None else [self.sequences[index]]
        self._scheduler.cancel(seqs)

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        running = {i for i, s in self.sequences.items() if not s.cancelled}
        while running:
            item = await self.queue.get()
            if isinstance(item, _Failure):
                raise EngineError(item.message)
            if item.index in running:
                if self.first_token_at is None:
                    self.first_token_at = time.monotonic()
                self.tokens += 1
                yield item
                if item.finish_reason is not None:
                    running.discard(item.index)
            running -= {i for i, s in self.sequences.items() if s.cancelled}


@dataclass(eq=False)
class _Seq:
    id: int
    request: SequenceRequest
    stop_ids: frozenset[int]
    stream: TokenStream
    sampler: Sampler | None = None  # built in the scheduler thread, for the first token
    generated: list[int] = field(default_factory=list)
    prefilled: int = 0  # prompt tokens already in the runner
    cancelled: bool = False


@dataclass
class SchedulerStats:
    running: int = 0  # sequences in the decode batch
    waiting: int = 0  # sequences queued for prefill


class Scheduler:
    """Runs a `Runner` in a background thread for many concurrent sequences."""

    def __init__(
        self,
        runner: Runner,
        max_queue: int = DEFAULT_MAX_QUEUE,
        prefill_budget: int = 512,
        on_decode: Callable[[int], None] | None = None,
    ) -> None:
        self.runner = runner
        self.max_queue = max_queue
        self.prefill_budget = prefill_budget  # prompt tokens prefilled per step, at most
        self.on_decode = on_decode  # called with the batch size of every decode step
        self.stats = SchedulerStats()
        self._cond = threading.Condition()
        self._waiting: deque[_Seq] = deque()  # the head may be partly prefilled
        self._running: dict[int, _Seq] = {}  # decoding, in runner order of arrival
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="gptoss-scheduler", daemon=True)
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
        """Queue the sequences of one request (all or none); raises QueueFull when the waiting
        queue has no room for them."""
        stream = TokenStream(self, asyncio.get_running_loop())
        with self._cond:
            if len(self._waiting) + len(requests) > self.max_queue:
                raise QueueFull(f"{len(self._waiting)} sequences are waiting (limit {self.max_queue})")
            for request in requests:
                if request.params.stop_token_ids is None:
                    raise ValueError("SequenceRequest.params.stop_token_ids must be set")
                if not 0 < len(request.prompt) <= self.runner.context:
                    raise ValueError(f"a prompt must hold 1 to {self.runner.context} tokens")
                seq = _Seq(next(self._ids), request, frozenset(request.params.stop_token_ids), stream)
                stream.sequences[request.index] = seq
                self._waiting.append(seq)
            self.stats.waiting = len(self._waiting)
            self._cond.notify()
        return stream

    def cancel(self, seqs: Sequence[_Seq]) -> None:
        with self._cond:
            for seq in seqs:
                seq.cancelled = True
            self._cond.notify()

    # ------------------------------------------------------------------ the scheduler thread
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self._running:
                    self._cond.wait()
                if self._stopping:
                    break
            out: list[tuple[_Seq, TokenEvent | _Failure]] = []
            try:
                self._step(out)
            except Exception as exc:  # a failed forward pass must not take the server down
                log.exception("generation step failed")
                self._fail_in_flight(out, f"generation failed: {type(exc).__name__}")
            self._deliver(out)
        with self._cond:
            everyone = list(self._waiting) + list(self._running.values())
            self._waiting.clear()
            self._running.clear()
        self._deliver([(s, _Failure("the server is shutting down")) for s in everyone])

    def _step(self, out: list[tuple[_Seq, TokenEvent | _Failure]]) -> None:
        for seq in [s for s in self._running.values() if s.cancelled]:
            self._finish(seq)
        with self._cond:
            for seq in [s for s in self._waiting if s.cancelled]:
                self._waiting.remove(seq)
                if seq.prefilled:
                    self.runner.release(seq.id)
        self._admit()
        if self._running:
            batch = list(self._running.values())
            logits = self.runner.decode({s.id: s.generated[-1] if s.generated else None for s in batch})
            self._sample(batch, [logits[s.id] for s in batch], out)
            if self.on_decode is not None:
                self.on_decode(len(batch))
        with self._cond:
            self.stats.running, self.stats.waiting = len(self._running), len(self._waiting)

    def _admit(self) -> None:
        """Prefill waiting prompts, at most `prefill_budget` tokens, while the batch has room.
        A prompt prefilled to its end joins the batch; its first token comes with the decode."""
        budget = self.prefill_budget
        while budget > 0 and len(self._running) < self.runner.max_batch:
            with self._cond:
                if not self._waiting:
                    return
                seq = self._waiting[0]  # only this thread removes entries, so it stays the head
            prompt = seq.request.prompt
            n = min(budget, len(prompt) - seq.prefilled)
            last = seq.prefilled + n == len(prompt)
            chunk = prompt[seq.prefilled : seq.prefilled + n]
            seq.prefilled += n  # before the pass: should it fail, this sequence fails with it
            self.runner.prefill(seq.id, chunk, last)
            budget -= n
            if not last:
                return
            with self._cond:
                self._waiting.popleft()
            self._running[seq.id] = seq

    def _sample(
        self, batch: list[_Seq], logits: list[Tensor], out: list[tuple[_Seq, TokenEvent | _Failure]]
    ) -> None:
        for seq, row in zip(batch, logits, strict=True):
            if seq.request.constraint is not None:
                row = seq.request.constraint.mask(row, seq.generated)
            if seq.sampler is None:
                seq.sampler = Sampler(
                    [seq.request.params], [seq.request.prompt], self.runner.vocab_size, row.device
                )
            choice = seq.sampler.sample(row[None])[0]
            seq.sampler.observe([choice.token])
            seq.generated.append(choice.token)
            reason, stop = None, None
            if choice.token in seq.stop_ids:
                reason, stop = "stop", choice.token
            elif len(seq.generated) >= seq.request.params.max_tokens or (
                len(seq.request.prompt) + len(seq.generated) > self.runner.context
            ):
                reason = "length"
            index = seq.request.index
            out.append(
                (seq, TokenEvent(index, choice.token, choice.logprob, choice.top_logprobs, reason, stop))
            )
            if reason is not None:
                self._finish(seq)

    def _finish(self, seq: _Seq) -> None:
        self.runner.release(seq.id)
        del self._running[seq.id]

    def _fail_in_flight(self, out: list[tuple[_Seq, TokenEvent | _Failure]], message: str) -> None:
        """After a failed step the runner's caches are suspect: fail every sequence in them."""
        with self._cond:
            victims = list(self._running.values())
            if self._waiting and self._waiting[0].prefilled:
                victims.append(self._waiting.popleft())
            self.stats.waiting = len(self._waiting)
        self._running.clear()
        self.runner.reset()
        out[:] = [(s, e) for s, e in out if s not in victims]
        out.extend((s, _Failure(message)) for s in victims)

    @staticmethod
    def _deliver(out: list[tuple[_Seq, TokenEvent | _Failure]]) -> None:
        """Hand events to their streams' event loops, one wake-up per loop per step."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, TokenEvent | _Failure]]] = {}
        for seq, item in out:
            if not seq.cancelled:
                by_loop.setdefault(seq.stream.loop, []).append((seq.stream.queue, item))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
                loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[asyncio.Queue, TokenEvent | _Failure]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)
