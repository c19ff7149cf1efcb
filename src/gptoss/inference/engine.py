"""The engine core: one step function that every generation path drives.

`Engine.step` admits waiting prompts (chunked prefill up to a token budget, so running streams are
never stalled for long), decodes one token for every running sequence, samples the whole batch at
once, and checks each sequence's stops. `generate_stream`/`generate` (offline batches), `Session`
(a multi-turn conversation whose cache stays), `gptoss chat`, evaluation, benchmarks and the HTTP
server (`AsyncEngine`, which runs `step` in a thread) all go through it.

Failures are per sequence: a prompt that cannot be prefilled, a row that cannot be sampled, a stop
check that raises — each ends its own sequence with an error and leaves the others untouched. Only
a failed decode pass (the model itself failing) takes down the sequences that were in it.
"""

from __future__ import annotations

import codecs
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import Tensor

from gptoss.inference.cache import CacheFullError, ContextFullError, KVCache
from gptoss.inference.runner import DEFAULT_PREFILL_CHUNK, BatchLogits, ModelRunner, RowMark, Runner
from gptoss.inference.sampling import Choice, SampleError, Sampler, SamplingParams, TokenConstraint
from gptoss.inference.speculative import Speculation, Verifier
from gptoss.inference.stops import StopStrings
from gptoss.model import GptOss
from gptoss.vocab import fit_tokens

log = logging.getLogger(__name__)

TokenBytes = Callable[[int], bytes]
FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of sequence `index` (the position of its prompt in the batch)."""

    index: int
    token: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] | None = None
    finish_reason: FinishReason | None = None  # set on the sequence's last token
    stop: int | str | None = None  # the stop token id or stop string that ended it
    cached_tokens: int | None = None  # on the first token: prompt tokens the prefix cache gave


@dataclass(frozen=True)
class SequenceFailure:
    """Sequence `index` ended with an error; it produces no more tokens."""

    index: int
    message: str


@dataclass(frozen=True)
class SequenceRequest:
    """One sequence to generate. `params.stop_token_ids` None means the engine's default stops."""

    prompt: Sequence[int]
    params: SamplingParams
    index: int = 0  # reported back in every TokenEvent (the choice index)
    constraint: TokenConstraint | None = None
    keep: bool = False  # when it ends, park it (its cache stays) instead of releasing it


@dataclass(eq=False)
class _Seq:
    id: int
    request: SequenceRequest
    stop_ids: frozenset[int]
    pending: list[int]  # tokens still to prefill
    context_used: int  # tokens of this sequence in the cache after its prefill
    generated: list[int] = field(default_factory=list)
    stops: StopStrings | None = None
    utf8: Any = None  # incremental decoder for stop strings
    cancelled: bool = False
    cached: int | None = None  # prompt tokens the prefix cache gave (None: not looked up yet)


Output = TokenEvent | SequenceFailure


class Engine:
    """Continuous batching over a `Runner`: sequences join and leave one decode batch at every step.

    Not thread-safe: one thread calls `add`, `cancel` and `step` (the server's `AsyncEngine` owns
    that thread). `step` returns `(sequence id, TokenEvent or SequenceFailure)` pairs.
    """

    def __init__(
        self,
        runner: Runner,
        *,
        prefill_budget: int = DEFAULT_PREFILL_CHUNK,
        default_stop_ids: Sequence[int] = (),
        token_bytes: TokenBytes | None = None,
        on_decode: Callable[[int], None] | None = None,
        speculation: Speculation | None = None,
    ) -> None:
        if speculation is not None and not isinstance(runner, Verifier):
            name = type(runner).__name__
            raise ValueError(f"{name} cannot verify proposed tokens: speculation needs a ModelRunner")
        self.runner = runner
        # Speculation serves a batch of one sequence: a batch of several already reads each weight
        # once for all of them, and a verify pass of its own per sequence would read it again.
        self.speculation = speculation
        self.prefill_budget = prefill_budget  # prompt tokens prefilled per step, at most
        self.default_stop_ids = frozenset(default_stop_ids)
        self._token_bytes = token_bytes
        self.on_decode = on_decode  # called with the batch size of every decode step
        self.waiting: deque[_Seq] = deque()  # the head may be partly prefilled
        self.running: list[_Seq] = []  # decoding; row r of the sampler is running[r]
        self.parked: dict[int, _Seq] = {}  # finished with `keep`: their cache stays
        self.sampler = Sampler(vocab_size=runner.vocab_size, device=_device_of(runner))
        self._ids = itertools.count()

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ requests
    def check(self, request: SequenceRequest) -> None:
        """Raise ValueError if `request` can never run here (checked before anything is queued)."""
        n = len(request.prompt)
        if n == 0:
            raise ValueError("a prompt must hold at least one token")
        if n > self.runner.context:
            raise ContextFullError(f"a prompt of {n} tokens exceeds the context of {self.runner.context}")
        bad = next((t for t in request.prompt if not 0 <= t < self.runner.vocab_size), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{self.runner.vocab_size - 1})")

    def add(self, request: SequenceRequest) -> int:
        """Queue a sequence; its id names it in `step`'s outputs and in `cancel`."""
        self.check(request)
        seq = self._new_seq(next(self._ids), request, list(request.prompt), len(request.prompt))
        self.waiting.append(seq)
        return seq.id

    def hold(self, request: SequenceRequest) -> int:
        """Register a parked sequence without running it: its owner prefills it through the runner
        (`Session` does) and later `resume`s it."""
        seq_id = next(self._ids)
        self.parked[seq_id] = self._new_seq(seq_id, replace(request, keep=True), [], 0)
        return seq_id

    def resume(self, seq_id: int, request: SequenceRequest, held: int) -> None:
        """Generate for parked sequence `seq_id`, whose cache holds `held` tokens (its prompt is
        `request.prompt`), as `request` says."""
        if held > self.runner.context:
            raise ContextFullError(f"the sequence holds {held} tokens; the context is {self.runner.context}")
        del self.parked[seq_id]
        seq = self._new_seq(seq_id, replace(request, keep=True), [], held)
        seq.cached = 0  # its row already holds the prompt
        self.waiting.append(seq)

    def _new_seq(self, seq_id: int, request: SequenceRequest, pending: list[int], used: int) -> _Seq:
        params = request.params
        stop_ids = (
            self.default_stop_ids if params.stop_token_ids is None else frozenset(params.stop_token_ids)
        )
        seq = _Seq(seq_id, request, stop_ids, pending, used)
        if params.stop:
            seq.stops = StopStrings(params.stop)
            seq.utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        return seq

    def cancel(self, seq_id: int) -> None:
        """Stop `seq_id` at the next step (its later tokens are not produced)."""
        for seq in itertools.chain(self.waiting, self.running):
            if seq.id == seq_id:
                seq.cancelled = True

    def finish_now(self, seq_id: int) -> None:
        """End `seq_id` at once, between steps (parked if its request said `keep`)."""
        self.cancel(seq_id)
        self._drop_cancelled()

    # ------------------------------------------------------------------ the step
    def step(self) -> list[tuple[int, Output]]:
        """Admit, decode one token for the batch, sample, check stops."""
        out: list[tuple[int, Output]] = []
        self._drop_cancelled()
        self._admit(out)
        if self.running:
            self._decode(out)
        return out

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self.running if s.cancelled]:
            self._end(seq)
        for seq in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(seq)
            self._end(seq, prefilling=True)

    def _admit(self, out: list[tuple[int, Output]]) -> None:
        """Prefill waiting prompts, at most `prefill_budget` tokens, while the batch has room.
        A prompt prefilled to its end joins the batch; its first token comes with the decode."""
        budget = self.prefill_budget
        while self.waiting and len(self.running) < self.runner.max_batch:
            seq = self.waiting[0]
            try:
                if seq.cached is None:  # restored tokens cost no prefill, so no budget either
                    if not self.runner.admits(len(seq.pending)):
                        return  # it waits until running sequences give memory back
                    seq.cached = self.runner.reuse(seq.id, seq.pending)
                    seq.pending = seq.pending[seq.cached :]
                n = min(budget, len(seq.pending))
                if n == 0 and seq.pending:
                    return  # the budget is spent
                chunk, seq.pending = seq.pending[:n], seq.pending[n:]
                last = not seq.pending
                self.runner.prefill(seq.id, chunk, last)
            except Exception as exc:  # this prompt's failure: the rows of the others are untouched
                log.exception("prefill of sequence %d failed", seq.id)
                self.waiting.popleft()
                self._end(seq, prefilling=True, release=True)
                out.append((seq.id, SequenceFailure(seq.request.index, f"prefill failed: {_describe(exc)}")))
                continue
            budget -= n
            if not last:
                return
            self.waiting.popleft()
            self.running.append(seq)
            self.sampler.join(seq.request.params, seq.request.prompt, seq.request.constraint)
            if self.speculation is not None:
                self.speculation.proposer.start(seq.id, seq.request.prompt)

    def _decode(self, out: list[tuple[int, Output]]) -> None:
        fed = [s.id for s in self.running if s.generated]
        starved = set(self.runner.starved(fed)) if fed else set()
        for seq in [s for s in self.running if s.id in starved]:
            message = (
                "the KV cache is full: no memory is left for this sequence to grow; retry with fewer tokens"
            )
            out.append((seq.id, SequenceFailure(seq.request.index, message)))
            self._end(seq, release=True)
        batch = self.running
        if not batch:
            return
        alone = len(batch) == 1 and bool(batch[0].generated) and self.speculation is not None
        started = time.perf_counter()  # a lone sequence's steps are timed whole, sampling included
        if alone and self._speculate(batch[0], out, started):
            return
        self._decode_batch(out)
        if alone and self.speculation is not None:
            self.speculation.timed(1, time.perf_counter() - started)
            self.speculation.stats.decode_passes += 1

    def _decode_batch(self, out: list[tuple[int, Output]]) -> None:
        batch = self.running
        try:
            logits = self.runner.decode({s.id: s.generated[-1] if s.generated else None for s in batch})
        except Exception as exc:  # the model failed: every sequence of the pass is lost
            log.exception("decode step failed")
            for seq in list(batch):
                out.append(
                    (seq.id, SequenceFailure(seq.request.index, f"generation failed: {_describe(exc)}"))
                )
                self._end(seq, release=True)
            return
        if self.on_decode is not None:
            self.on_decode(len(batch))
        ids = [s.id for s in batch]
        stacked = (
            logits.stacked(ids) if isinstance(logits, BatchLogits) else torch.stack([logits[s] for s in ids])
        )
        choices = self.sampler.sample(stacked)
        self.sampler.observe([c.token if not isinstance(c, SampleError) else None for c in choices])
        for seq, choice in zip(list(batch), choices, strict=True):
            if isinstance(choice, SampleError):
                out.append((seq.id, SequenceFailure(seq.request.index, choice.message)))
                self._end(seq, release=True)
                continue
            seq.generated.append(choice.token)
            try:
                reason, stop = self._finish_reason(seq)
            except Exception as exc:
                out.append(
                    (seq.id, SequenceFailure(seq.request.index, f"stop check failed: {_describe(exc)}"))
                )
                self._end(seq, release=True)
                continue
            cached = seq.cached if len(seq.generated) == 1 else None
            event = TokenEvent(
                seq.request.index, choice.token, choice.logprob, choice.top_logprobs, reason, stop, cached
            )
            out.append((seq.id, event))
            if self.speculation is not None:
                self.speculation.proposer.extend(seq.id, [choice.token])
            if reason is not None:
                self._end(seq)

    def _speculate(self, seq: _Seq, out: list[tuple[int, Output]], started: float) -> bool:
        """One step of the batch's only sequence through a verify pass of its last token and the
        proposed ones; False (nothing done) when no proposal is worth verifying now.

        Each position is sampled exactly as plain decoding samples it (the row's processors and its
        generator, in order), and a proposed token is kept when the sample equals it: greedy output
        and seeded samples are the tokens plain decoding gives."""
        assert self.speculation is not None and isinstance(self.runner, Verifier)
        remaining = seq.request.params.max_tokens - len(seq.generated)  # tokens it may still emit
        limit = min(remaining, self.runner.verify_room(seq.id)) - 1
        drafts = self.speculation.draft(seq.id, limit)
        if not drafts:
            return False
        fed = [seq.generated[-1], *drafts]
        try:
            logits = self.runner.verify(seq.id, fed)
        except Exception as exc:  # as a failed decode pass: the sequence is lost
            log.exception("verify pass failed")
            out.append((seq.id, SequenceFailure(seq.request.index, f"generation failed: {_describe(exc)}")))
            self._end(seq, release=True)
            return True
        if self.on_decode is not None:
            self.on_decode(1)
        emitted, accepted, reason, failure = 0, 0, None, None
        for j in range(len(fed)):
            choice = self.sampler.sample(logits[j : j + 1])[0]
            if isinstance(choice, SampleError):
                failure = choice.message
                break
            self.sampler.observe([choice.token])
            seq.generated.append(choice.token)
            emitted += 1
            try:
                reason, stop = self._finish_reason(seq)
            except Exception as exc:
                failure = f"stop check failed: {_describe(exc)}"
                break
            out.append((seq.id, self._event(seq, choice, reason, stop)))
            if reason is not None or j == len(drafts) or choice.token != drafts[j]:
                break
            accepted += 1
        self.runner.settle(seq.id, emitted)  # the cache keeps the fed tokens that were emitted
        self.speculation.verified(seq.id, len(drafts), accepted, emitted)
        self.speculation.timed(len(fed), time.perf_counter() - started)
        self.speculation.proposer.extend(seq.id, seq.generated[len(seq.generated) - emitted :])
        if failure is not None:
            out.append((seq.id, SequenceFailure(seq.request.index, failure)))
            self._end(seq, release=True)
        elif reason is not None:
            self._end(seq)
        return True

    @staticmethod
    def _event(seq: _Seq, choice: Choice, reason: FinishReason | None, stop: int | str | None) -> TokenEvent:
        return TokenEvent(seq.request.index, choice.token, choice.logprob, choice.top_logprobs, reason, stop)

    def _finish_reason(self, seq: _Seq) -> tuple[FinishReason | None, int | str | None]:
        """Whether the newest token ends `seq`: a stop token, a stop string, or no more room."""
        token = seq.generated[-1]
        if token in seq.stop_ids:
            return "stop", token
        if seq.stops is not None:
            _, found = seq.stops.push(seq.utf8.decode(self.token_bytes(token)))
            if found is not None:
                return "stop", found
        # The last sampled token is never fed back, so the cache needs room only for the others.
        full = seq.context_used + len(seq.generated) >= self.runner.context + 1
        if len(seq.generated) >= seq.request.params.max_tokens or full:
            return "length", None
        return None, None

    def _end(self, seq: _Seq, prefilling: bool = False, release: bool = False) -> None:
        """Take `seq` out of the batch: parked if its request asked to keep it, else released."""
        if not prefilling:
            r = self.running.index(seq)
            del self.running[r]
            self.sampler.keep([i for i in range(len(self.sampler)) if i != r])
        if self.speculation is not None:
            self.speculation.forget(seq.id)
        if seq.request.keep and not release:
            if not prefilling:
                self.runner.park(seq.id)
            self.parked[seq.id] = seq
        else:
            self.runner.release(seq.id)

    def reset(self) -> None:
        self.runner.reset()
        if self.speculation is not None:
            for seq in self.running:
                self.speculation.forget(seq.id)
        self.waiting.clear()
        self.running.clear()
        self.parked.clear()
        self.sampler.keep([])

    def set_token_bytes(self, token_bytes: TokenBytes) -> None:
        """How token ids become bytes for stop strings (default: the o200k_harmony tokenizer)."""
        self._token_bytes = token_bytes

    def token_bytes(self, token: int) -> bytes:
        if self._token_bytes is None:
            from gptoss.tokenizer import get_tokenizer

            self._token_bytes = get_tokenizer().decode_single_token_bytes
        return self._token_bytes(token)


def _device_of(runner: Runner) -> torch.device:
    model = getattr(runner, "model", None)
    return model.model.embed_tokens.weight.device if isinstance(model, GptOss) else torch.device("cpu")


def _describe(exc: BaseException) -> str:
    """What a client may see of an internal failure: its kind (the details go to the log), or the
    message of a limit the client can act on."""
    if isinstance(exc, (CacheFullError, ContextFullError)):
        return str(exc)
    return type(exc).__name__


# ---------------------------------------------------------------------- offline generation
def generate_stream(
    model: GptOss,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams] | None = None,
    *,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    token_bytes: TokenBytes | None = None,
    speculation: Speculation | None = None,
) -> Iterator[TokenEvent]:
    """Generate continuations of token-id `prompts` together, yielding each token as it is sampled.

    `params` applies to every prompt, or gives one `SamplingParams` per prompt. Each sequence ends
    on its own stop (see `SamplingParams`); its last event carries `finish_reason`. Stop strings
    are matched on the text of `token_bytes` (default: the o200k_harmony tokenizer's bytes).
    `speculation` (`gptoss.inference.speculative.speculation("suffix")`) verifies proposed tokens
    while one sequence decodes alone; the tokens are the same.
    """
    params = params or SamplingParams()
    params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    if len(params) != len(prompts):
        raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
    if not prompts:
        return
    context = model.config.max_position_embeddings
    runner_prompts = [_fit_prompt(model, p, context) for p in prompts]
    # The last sampled token is never fed back, so a sequence needs prompt + max_tokens - 1 slots.
    need = max(len(p) + q.max_tokens - 1 for p, q in zip(runner_prompts, params, strict=True))
    runner = ModelRunner(model, len(prompts), min(need, context), prefill_chunk)
    # Every prompt is prefilled before the first decode step (each alone: rows of different
    # lengths need no padding, and a chunk of one long prompt already keeps the matrix units busy).
    engine = Engine(
        runner,
        prefill_budget=sum(map(len, runner_prompts)),
        default_stop_ids=[model.config.eos_token_id],
        token_bytes=token_bytes,
        speculation=speculation,
    )
    for i, (prompt, p) in enumerate(zip(runner_prompts, params, strict=True)):
        engine.add(SequenceRequest(prompt, p, i))
    while engine.has_work:
        for _, event in engine.step():
            if isinstance(event, SequenceFailure):
                raise RuntimeError(f"sequence {event.index}: {event.message}")
            yield event


def _fit_prompt(model: GptOss, prompt: Sequence[int], context: int) -> list[int]:
    if not prompt:
        raise ValueError("a prompt must hold at least one token")
    _check_tokens(prompt, model.config.vocab_size)
    fitted = fit_tokens(model, prompt)
    if len(fitted) > context:
        raise ContextFullError(f"a prompt of {len(fitted)} tokens exceeds the model's context of {context}")
    return fitted


def _check_tokens(tokens: Sequence[int], vocab_size: int) -> None:
    bad = next((t for t in tokens if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"token id {bad} is outside the vocabulary (0..{vocab_size - 1})")


def generate(
    model: GptOss,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    *,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    token_bytes: TokenBytes | None = None,
    speculation: Speculation | None = None,
    **sampling: Any,
) -> list[list[int]]:
    """The new tokens of each prompt (stop tokens included). Temperature 0 is greedy.

    Further keyword arguments are `SamplingParams` fields (top_p, top_k, min_p, seed, stop, ...).
    """
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, **sampling)
    outputs: list[list[int]] = [[] for _ in prompts]
    for event in generate_stream(
        model, prompts, params, prefill_chunk=prefill_chunk, token_bytes=token_bytes, speculation=speculation
    ):
        outputs[event.index].append(event.token)
    return outputs


# ---------------------------------------------------------------------- a persistent sequence
@dataclass(frozen=True)
class Mark:
    """A point in a `Session` to rewind to (see `Session.mark`)."""

    length: int
    row: RowMark


class Session:
    """One growing sequence whose keys and values stay cached between generations.

    `append` queues tokens, `stream` prefills the queue and generates, through the same engine step
    as every other path (the sequence is parked between calls). Generated tokens enter the cache
    as decoding feeds them back, except the last one: a stop token is dropped (the caller knows what
    closes its message) and any other last token is queued for the next call.
    """

    def __init__(
        self,
        model: GptOss,
        capacity: int | None = None,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        speculation: Speculation | None = None,
    ) -> None:
        self.model = model
        self.runner = ModelRunner(model, 1, capacity or model.config.max_position_embeddings, prefill_chunk)
        self.engine = Engine(
            self.runner,
            prefill_budget=self.runner.context,
            default_stop_ids=[model.config.eos_token_id],
            speculation=speculation,
        )
        self.tokens: list[int] = []  # in the cache, in order
        self.pending: list[int] = []  # queued, not yet in the cache
        self.prefilled = 0  # tokens that went through prefill, over the session's life
        self._seq: int | None = None  # the engine's (parked) sequence, once something was prefilled

    @property
    def capacity(self) -> int:
        return self.runner.context

    @property
    def cache(self) -> KVCache:
        return self.runner.cache

    def append(self, tokens: Sequence[int]) -> None:
        _check_tokens(tokens, self.model.config.vocab_size)
        tokens = self.runner.fit_prompt(tokens)
        total = len(self.tokens) + len(self.pending) + len(tokens)
        if total > self.capacity:
            raise ContextFullError(
                f"the conversation would reach {total} tokens, more than the {self.capacity} this "
                "session holds; start a new one"
            )
        self.pending.extend(tokens)

    def feed(self) -> None:
        """Prefill the queued tokens now."""
        if not self.runner.cache.valid:  # an interrupted pass: rebuild from the tokens we know
            self.reset_cache()
        if not self.pending:
            return
        if self._seq is None:
            self._seq = self.engine.hold(SequenceRequest(self.pending, SamplingParams()))
        self.runner.prefill(self._seq, self.pending, last=False)
        self.prefilled += len(self.pending)
        self.tokens += self.pending
        self.pending = []

    def reset_cache(self) -> None:
        self.pending = self.tokens + self.pending
        self.tokens = []
        if self._seq is not None:
            self.runner.release(self._seq)
            self.engine.parked.pop(self._seq, None)
            self._seq = None

    @torch.inference_mode()
    def next_logits(self) -> Tensor:
        """The next-token logits (V,) after the cached tokens (once they are fed)."""
        hidden = self.runner.hidden.get(self._seq) if self._seq is not None else None
        if hidden is None or self.pending:
            raise ValueError("no logits yet: feed() the queued tokens first")
        return self.model.lm_head(hidden)

    def mark(self) -> Mark:
        """Remember the current point (after `feed`); `rewind` returns to it, dropping what followed."""
        if self.pending:
            raise ValueError("feed() the queued tokens before taking a mark")
        if self._seq is None:
            raise ValueError("nothing to mark: append() and feed() tokens first")
        return Mark(len(self.tokens), self.runner.mark(self._seq))

    def rewind(self, mark: Mark) -> None:
        if mark.length > len(self.tokens) or self._seq is None:
            raise ValueError("this mark lies ahead of the session (was it taken before a reset?)")
        self.runner.rewind(self._seq, mark.row)
        self.tokens = self.tokens[: mark.length]
        self.pending = []

    def reset(self) -> None:
        self.pending = []
        self.tokens = []
        self.reset_cache()

    def stream(self, params: SamplingParams, token_bytes: TokenBytes | None = None) -> Iterator[TokenEvent]:
        """Prefill what is queued, then generate; yields each token (index 0) as it is sampled."""
        self.feed()
        if self._seq is None:
            raise ValueError("nothing to continue from: append() tokens first")
        if token_bytes is not None:
            self.engine.set_token_bytes(token_bytes)
        self.engine.resume(self._seq, SequenceRequest(self.tokens, params, 0), held=len(self.tokens))
        seq = self.engine.waiting[-1]
        cached = len(self.tokens)
        try:
            while self.engine.has_work:
                for _, event in self.engine.step():
                    if isinstance(event, SequenceFailure):
                        raise RuntimeError(event.message)
                    yield event
        finally:
            # Whether it finished or the caller stopped early: all but the newest token are fed
            # (lengths advance only when a pass completes, so this holds after an interruption too).
            row = self.runner.row_of.get(self._seq)
            fed = self.runner.cache.lengths[row] - cached if row is not None else 0
            self.tokens += seq.generated[:fed]
            rest = seq.generated[fed:]
            if rest and rest[-1] in seq.stop_ids:
                rest = rest[:-1]
            self.pending = rest
            if row is None or not self.runner.cache.valid:  # rebuilt from the tokens at the next feed
                self.engine.reset()
                self._seq = None
                self.pending = self.tokens + self.pending
                self.tokens = []
            elif self._seq not in self.engine.parked:
                self.engine.finish_now(self._seq)
