"""Generation: chunked prefill into a KV cache, then batched decoding with per-sequence stops.

`generate_stream` is the engine; `generate` collects its tokens; `Session` keeps one sequence's
cache alive between calls (multi-turn chat, where each turn prefills only its new tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from gptoss.inference.cache import ContextFullError, KVCache
from gptoss.inference.sampling import Sampler, SamplingParams
from gptoss.model import GptOss
from gptoss.vocab import fit_tokens

Detokenize = Callable[[Sequence[int]], str]
FinishReason = Literal["stop", "length"]

DEFAULT_PREFILL_CHUNK = 512
# Attention scores of one prefill chunk (fp32, a few live copies) may take about this much memory:
# at long contexts the chunk shrinks so that peak memory stays bounded whatever the prompt length.
ATTENTION_SCORE_BUDGET = 1 << 30


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of sequence `index` (the position of its prompt in the batch)."""

    index: int
    token: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] | None = None
    finish_reason: FinishReason | None = None  # set on the sequence's last token
    stop: int | str | None = None  # the stop token id or stop string that ended it


# ---------------------------------------------------------------------- forward passes
def model_dtype(model: GptOss) -> torch.dtype:
    return model.model.embed_tokens.weight.dtype


def model_device(model: GptOss) -> torch.device:
    return model.model.embed_tokens.weight.device


def forward_hidden(model: GptOss, cache: KVCache, tokens: Tensor, rows: slice) -> Tensor:
    """Run tokens (R, T) of cache rows `rows` through the blocks; hidden states (R, T, H)."""
    positions = cache.begin(rows, tokens.shape[1])
    try:
        hidden = model.model(tokens, positions, cache)
    except BaseException:
        cache.abort()  # an interrupted pass leaves half-written ring buffers
        raise
    cache.end()
    return hidden


def prefill_chunk_length(model: GptOss, start: int, remaining: int, prefill_chunk: int) -> int:
    """Tokens to prefill next: `prefill_chunk`, fewer when the attention scores would grow too big."""
    heads = model.config.num_attention_heads
    per_token = 3 * 4 * heads * (start + min(remaining, prefill_chunk))  # fp32 scores, ~3 copies
    return max(1, min(remaining, prefill_chunk, ATTENTION_SCORE_BUDGET // per_token))


@torch.no_grad()
def prefill(
    model: GptOss, cache: KVCache, row: int, tokens: Sequence[int], prefill_chunk: int = DEFAULT_PREFILL_CHUNK
) -> Tensor:
    """Append `tokens` to cache row `row` in chunks; return the next-token logits (V,) after them."""
    if not tokens:
        raise ValueError("nothing to prefill: the token list is empty")
    ids = torch.tensor(list(tokens), dtype=torch.long, device=model_device(model))
    done = 0
    while done < len(ids):
        n = prefill_chunk_length(model, cache.lengths[row], len(ids) - done, prefill_chunk)
        hidden = forward_hidden(model, cache, ids[None, done : done + n], slice(row, row + 1))
        done += n
    return model.lm_head(hidden[0, -1])  # only the last position needs the output head


# ---------------------------------------------------------------------- the decode loop
@dataclass
class _Sequence:
    index: int
    params: SamplingParams
    stop_ids: frozenset[int]
    tokens: list[int] = field(default_factory=list)  # generated so far

    def finish(
        self, detokenize: Detokenize | None, room: bool
    ) -> tuple[FinishReason | None, int | str | None]:
        """Whether the newest token ends this sequence; `room`: the cache can take another token."""
        token = self.tokens[-1]
        if token in self.stop_ids:
            return "stop", token
        if self.params.stop:
            assert detokenize is not None
            # A stop string not seen before must end in the newest token: decode only a tail long
            # enough to hold the longest one (a character is at most 4 bytes, a token at least 1).
            tail = detokenize(self.tokens[-(4 * max(map(len, self.params.stop)) + 2) :])
            for s in self.params.stop:
                if s in tail:
                    return "stop", s
        if len(self.tokens) >= self.params.max_tokens or not room:
            return "length", None
        return None, None


def _decode(
    model: GptOss,
    cache: KVCache,
    sampler: Sampler,
    sequences: list[_Sequence],
    logits: Tensor,
    detokenize: Detokenize | None,
) -> Iterator[TokenEvent]:
    """Sample from `logits` (R, V), feed the tokens back, repeat until every sequence has finished.

    Row r of the cache, the sampler and `sequences[r]` always describe the same sequence; finished
    ones are dropped from all three, so the batch shrinks instead of computing dead rows.
    """
    while True:
        choices = sampler.sample(logits)
        sampler.observe([c.token for c in choices])
        keep = []
        for r, (seq, choice) in enumerate(zip(sequences, choices, strict=True)):
            seq.tokens.append(choice.token)
            reason, stop = seq.finish(detokenize, room=cache.lengths[r] < cache.capacity)
            yield TokenEvent(seq.index, choice.token, choice.logprob, choice.top_logprobs, reason, stop)
            if reason is None:
                keep.append(r)
        if not keep:
            return
        if len(keep) < len(sequences):
            cache.keep(keep)
            sampler.keep(keep)
            sequences = [sequences[r] for r in keep]
        last = torch.tensor([[s.tokens[-1]] for s in sequences], device=model_device(model))  # (R, 1)
        with torch.no_grad():
            logits = model.lm_head(forward_hidden(model, cache, last, slice(0, len(sequences)))[:, -1])


# ---------------------------------------------------------------------- public API
def _check_tokens(tokens: Sequence[int], vocab_size: int) -> None:
    bad = next((t for t in tokens if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"token id {bad} is outside the vocabulary (0..{vocab_size - 1})")


def _check_prompt(prompt: Sequence[int], vocab_size: int, context: int) -> None:
    if not prompt:
        raise ValueError("a prompt must hold at least one token")
    _check_tokens(prompt, vocab_size)
    if len(prompt) > context:
        raise ContextFullError(f"a prompt of {len(prompt)} tokens exceeds the model's context of {context}")


def _stop_ids(model: GptOss, params: SamplingParams) -> frozenset[int]:
    ids = params.stop_token_ids
    return frozenset([model.config.eos_token_id] if ids is None else ids)


def _default_detokenize(params: Sequence[SamplingParams], detokenize: Detokenize | None) -> Detokenize | None:
    if detokenize is None and any(p.stop for p in params):
        from gptoss.tokenizer import get_tokenizer

        return get_tokenizer().decode
    return detokenize


def generate_stream(
    model: GptOss,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams] | None = None,
    *,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    detokenize: Detokenize | None = None,
) -> Iterator[TokenEvent]:
    """Generate continuations of token-id `prompts` together, yielding each token as it is sampled.

    `params` applies to every prompt, or gives one `SamplingParams` per prompt. Each sequence ends
    on its own stop (see `SamplingParams`); its last event carries `finish_reason`. Stop strings
    are matched on text from `detokenize` (default: the o200k_harmony tokenizer).
    """
    params = params or SamplingParams()
    params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    if len(params) != len(prompts):
        raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
    if not prompts:
        return
    config = model.config
    prompts = [fit_tokens(model, prompt) for prompt in prompts]
    for prompt in prompts:
        _check_prompt(prompt, config.vocab_size, config.max_position_embeddings)
    detokenize = _default_detokenize(params, detokenize)

    # The last sampled token is never fed back, so a sequence needs prompt + max_tokens - 1 slots.
    need = max(len(p) + q.max_tokens - 1 for p, q in zip(prompts, params, strict=True))
    cache = KVCache(
        config,
        len(prompts),
        min(need, config.max_position_embeddings),
        model_dtype(model),
        model_device(model),
    )
    # Each prompt prefills alone: rows of different lengths need no padding, and a chunk of one
    # long prompt already keeps the matrix units busy.
    logits = torch.stack([prefill(model, cache, r, p, prefill_chunk) for r, p in enumerate(prompts)])
    sampler = Sampler(params, prompts, config.vocab_size, model_device(model))
    sequences = [_Sequence(i, p, _stop_ids(model, p)) for i, p in enumerate(params)]
    yield from _decode(model, cache, sampler, sequences, logits, detokenize)


def generate(
    model: GptOss,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    *,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    detokenize: Detokenize | None = None,
    **sampling: Any,
) -> list[list[int]]:
    """The new tokens of each prompt (stop tokens included). Temperature 0 is greedy.

    Further keyword arguments are `SamplingParams` fields (top_p, top_k, min_p, seed, stop, ...).
    """
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, **sampling)
    outputs: list[list[int]] = [[] for _ in prompts]
    for event in generate_stream(model, prompts, params, prefill_chunk=prefill_chunk, detokenize=detokenize):
        outputs[event.index].append(event.token)
    return outputs


# ---------------------------------------------------------------------- a persistent sequence
@dataclass(frozen=True)
class Mark:
    """A point in a `Session` to rewind to (see `Session.mark`)."""

    length: int
    rings: list[tuple[Tensor, Tensor]]
    logits: Tensor | None


class Session:
    """One growing sequence whose keys and values stay cached between generations.

    `append` queues tokens, `stream` prefills the queue and generates. Generated tokens enter the
    cache as decoding feeds them back, except the last one: a stop token is dropped (the caller
    knows what closes its message) and any other last token is queued for the next call.
    """

    def __init__(
        self, model: GptOss, capacity: int | None = None, prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    ) -> None:
        self.model = model
        self.prefill_chunk = prefill_chunk
        capacity = capacity or model.config.max_position_embeddings
        self.cache = KVCache(model.config, 1, capacity, model_dtype(model), model_device(model))
        self.tokens: list[int] = []  # in the cache, in order
        self.pending: list[int] = []  # queued, not yet in the cache
        self.prefilled = 0  # tokens that went through prefill, over the session's life
        self._logits: Tensor | None = None  # next-token logits after `tokens`

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    def append(self, tokens: Sequence[int]) -> None:
        _check_tokens(tokens, self.model.config.vocab_size)
        tokens = fit_tokens(self.model, tokens)
        if len(self.tokens) + len(self.pending) + len(tokens) > self.capacity:
            raise ContextFullError(
                f"the conversation would reach {len(self.tokens) + len(self.pending) + len(tokens)} tokens, "
                f"more than the {self.capacity} this session holds; start a new one"
            )
        self.pending.extend(tokens)

    def feed(self) -> None:
        """Prefill the queued tokens now."""
        if not self.cache.valid:  # an interrupted pass: rebuild from the tokens we know
            self.cache.reset()
            self.pending = self.tokens + self.pending
            self.tokens = []
        if self.pending:
            self._logits = prefill(self.model, self.cache, 0, self.pending, self.prefill_chunk)
            self.prefilled += len(self.pending)
            self.tokens += self.pending
            self.pending = []

    def mark(self) -> Mark:
        """Remember the current point (after `feed`); `rewind` returns to it, dropping what followed.

        Full-attention slots past the mark are simply overwritten later, but sliding layers reuse
        their ring slots, so the mark keeps a copy of the rings (window × KV width per layer: small).
        """
        if self.pending:
            raise ValueError("feed() the queued tokens before taking a mark")
        rings = [
            (k.clone(), v.clone())
            for k, v, sliding in zip(self.cache.keys, self.cache.values, self.cache.sliding, strict=True)
            if sliding
        ]
        return Mark(len(self.tokens), rings, self._logits)

    def rewind(self, mark: Mark) -> None:
        if mark.length > len(self.tokens):
            raise ValueError("this mark lies ahead of the session (was it taken before a reset?)")
        rings = iter(mark.rings)
        for i, sliding in enumerate(self.cache.sliding):
            if sliding:
                k, v = next(rings)
                self.cache.keys[i].copy_(k)
                self.cache.values[i].copy_(v)
        self.cache.lengths[0] = mark.length
        self.tokens = self.tokens[: mark.length]
        self.pending = []
        self._logits = mark.logits

    def reset(self) -> None:
        self.cache.reset()
        self.tokens, self.pending, self._logits = [], [], None

    def stream(self, params: SamplingParams, detokenize: Detokenize | None = None) -> Iterator[TokenEvent]:
        """Prefill what is queued, then generate; yields each token (index 0) as it is sampled."""
        self.feed()
        if self._logits is None:
            raise ValueError("nothing to continue from: append() tokens first")
        sequence = _Sequence(0, params, _stop_ids(self.model, params))
        sampler = Sampler([params], [self.tokens], self.model.config.vocab_size, model_device(self.model))
        cached = len(self.tokens)
        try:
            yield from _decode(
                self.model,
                self.cache,
                sampler,
                [sequence],
                self._logits[None],
                _default_detokenize([params], detokenize),
            )
        finally:
            # Whether it finished or the caller stopped early: the fed tokens are in the cache now.
            # (lengths advance only when a pass completes, so this holds after an interruption too)
            fed = self.cache.lengths[0] - cached
            self.tokens += sequence.tokens[:fed]
            rest = sequence.tokens[fed:]
            if rest and rest[-1] in sequence.stop_ids:
                rest = rest[:-1]
            self.pending = rest
            self._logits = None
