"""The model side of the engine: sequences in KV-cache rows, next-token logits out.

`Runner` is the seam between the engine's scheduling and a model. `ModelRunner` is the production
one: a `KVCache` in which every sequence owns a row from its first prefill chunk to its release.
The rows of the sequences that decode together are always the first R rows, so that a decode step
is one pass over `rows[0:R]`; a newcomer is prefilled, chunk by chunk, in a free row above them and
moved to row R when it joins (a copy only when rows shifted while it was prefilled). A newcomer's
first logits come out of the next decode step's output-head matmul, batched with everyone else's:
at 201,088 tokens the head is the largest weight, too large to read once more for a single row.
Tests may drive the engine with a runner that scripts its logits, which runs the real scheduler,
sampler, parser and HTTP layer through exact token sequences.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from gptoss.inference.cache import DEFAULT_BLOCK_SIZE, CacheFullError, KVCache, default_budget_bytes
from gptoss.inference.native import prompt_scores_in_memory
from gptoss.inference.prefix_cache import Node, PrefixCache
from gptoss.inference.verify import RingSave, max_fed, verify
from gptoss.model import GptOss
from gptoss.vocab import fit_tokens, token_rows

log = logging.getLogger(__name__)

DEFAULT_PREFILL_CHUNK = 512
# Attention scores of one prefill chunk (fp32, a few live copies) may take about this much memory:
# at long contexts the chunk shrinks so that peak memory stays bounded whatever the prompt length
# (where PyTorch's attention makes them; the native prompt attention holds a few rows at a time).
ATTENTION_SCORE_BUDGET = 1 << 30


class Runner(Protocol):
    """Next-token logits for sequences identified by integer ids.

    A sequence is prefilled (one or more chunks, the last with ``last=True``), which makes it join
    the decode batch; from then on every `decode` call gives its next-token logits, together with
    every other sequence of the batch, until `release`. Only one sequence is prefilled at a time.
    """

    vocab_size: int
    context: int  # tokens one sequence may hold: prompt + generated
    max_batch: int  # sequences that decode together
    token_rows: tuple[int, ...] | None  # the ids a trimmed vocabulary keeps (None: all of them)

    def fit_prompt(self, tokens: Sequence[int]) -> list[int]:
        """`tokens` as the model reads them (a trimmed vocabulary spells ids it lacks in bytes)."""
        ...

    def admits(self, tokens: int) -> bool:
        """Whether a new sequence of `tokens` prompt tokens may start now (else it waits for memory
        that running sequences will give back). Raises `CacheFullError` for one that never can."""
        ...

    def starved(self, seqs: Sequence[int]) -> list[int]:
        """Those of `seqs` (decoding sequences about to take a token) for which memory runs out:
        they must end before the next `decode`, which the others then take."""
        ...

    def reuse(self, seq: int, prompt: Sequence[int]) -> int:
        """Start new sequence `seq` of `prompt` from the longest cached prefix of it; returns how
        many of its tokens are already in place (0 without a prefix cache). Its `prefill` calls
        then bring the rest."""
        ...

    def prefill(self, seq: int, tokens: Sequence[int], last: bool) -> None:
        """Append prompt tokens of `seq`; with `last`, it joins the decode batch."""
        ...

    def decode(self, tokens: Mapping[int, int | None]) -> Mapping[int, Tensor]:
        """One step for every sequence of the batch (`tokens` names them all): append its new
        token, or None for one that joined since the last step and has none yet. Returns the
        next-token logits (V,) of each."""
        ...

    def release(self, seq: int) -> None:
        """Forget `seq` (finished, cancelled, or dropped mid-prefill)."""
        ...

    def reset(self) -> None:
        """Forget every sequence (after a failed forward pass)."""
        ...


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
        cache.abort()  # an interrupted pass leaves half-written ring buffers in these rows
        raise
    cache.end()
    return hidden


def prefill_chunk_length(model: GptOss, start: int, remaining: int, prefill_chunk: int) -> int:
    """Tokens to prefill next: `prefill_chunk`, fewer when the attention scores would grow too big."""
    if not prompt_scores_in_memory(model):
        return min(remaining, prefill_chunk)
    heads = model.config.num_attention_heads
    per_token = 3 * 4 * heads * (start + min(remaining, prefill_chunk))  # fp32 scores, ~3 copies
    return max(1, min(remaining, prefill_chunk, ATTENTION_SCORE_BUDGET // per_token))


@torch.inference_mode()
def prefill(
    model: GptOss,
    cache: KVCache,
    row: int,
    tokens: Sequence[int],
    prefill_chunk: int,
    each_chunk: Callable[[int, Tensor], None] | None = None,
) -> Tensor:
    """Append `tokens` to cache row `row` in chunks; the hidden state (H,) after the last one.
    `each_chunk(start, hidden)` sees every chunk's hidden states (T, H), `start` its first index.

    The one prefill loop: the engine's runner and every caller of the model with a cache use it."""
    if not tokens:
        raise ValueError("nothing to prefill: the token list is empty")
    ids = torch.tensor(list(tokens), dtype=torch.long, device=model_device(model))
    done = 0
    while done < len(ids):
        n = prefill_chunk_length(model, cache.lengths[row], len(ids) - done, prefill_chunk)
        hidden = forward_hidden(model, cache, ids[None, done : done + n], slice(row, row + 1))
        if each_chunk is not None:
            each_chunk(done, hidden[0])
        done += n
    return hidden[0, -1]


@dataclass
class _Tracked:
    """A sequence whose states go to the prefix cache: every token in its row, and the node it
    continues (the hit's, pinned) and its own node once it stored one (pinned too)."""

    tokens: list[int]
    base: Node
    start: int
    own: Node | None = None


class BatchLogits(Mapping[int, Tensor]):
    """A decode step's next-token logits by sequence id, kept as the one (R, V) tensor the output
    head wrote, so that a caller reading the whole batch in the runner's order takes no copy."""

    def __init__(self, ids: Sequence[int], logits: Tensor) -> None:
        self.ids = list(ids)
        self.logits = logits
        self._row = {s: r for r, s in enumerate(self.ids)}

    def __getitem__(self, seq: int) -> Tensor:
        return self.logits[self._row[seq]]

    def __iter__(self) -> Iterator[int]:
        return iter(self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    def stacked(self, ids: Sequence[int]) -> Tensor:
        """The logits (len(ids), V) of `ids`, in that order."""
        if list(ids) == self.ids:
            return self.logits
        return self.logits[[self._row[s] for s in ids]]


@dataclass(frozen=True)
class RowMark:
    """A point in a parked sequence to rewind to (see `ModelRunner.mark`)."""

    length: int
    rings: Tensor  # the sliding layers' rings there (`KVCache.read_rings`)
    hidden: Tensor | None


class ModelRunner:
    """A `Runner` on a real `GptOss` model and one `KVCache` of `max_batch` rows.

    The cache's full layers take blocks as sequences grow, within `kv_budget_bytes` (None: a share
    of the memory free now, see `cache.default_budget_bytes`): a new sequence starts only when its
    prompt fits beside what the running ones hold (`admits`), and one that finds no room to grow
    mid-generation is named by `starved`, so that it alone ends. Besides the
    `Runner` protocol it can `park` a finished sequence (its row, keys and values stay, and a later
    `prefill` continues it) and `mark`/`rewind` a parked one: multi-turn sessions use that.

    With a `prefix_cache`, every sequence started by `reuse` leaves its states there (at the end of
    each prefill call and when it is released or parked) and begins from the longest one that its
    prompt shares.
    """

    def __init__(
        self,
        model: GptOss,
        max_batch: int,
        context: int,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        prefix_cache: PrefixCache | None = None,
        kv_budget_bytes: int | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
    ) -> None:
        config = model.config
        self.model = model.eval()
        self.vocab_size = config.vocab_size
        self.token_rows = token_rows(model)
        self.context = min(context, config.max_position_embeddings)
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        device = model_device(model)
        budget = default_budget_bytes(device) if kv_budget_bytes is None else kv_budget_bytes
        self.kv_budget_bytes = budget
        self.cache = KVCache(config, max_batch, self.context, model_dtype(model), device, block_size, budget)
        self.row_of: dict[int, int] = {}  # every sequence holding a row
        self.running: list[int] = []  # the decode batch: sequence of rows 0..R-1
        self.hidden: dict[int, Tensor] = {}  # last hidden state of sequences not in the batch
        self.joined: set[int] = set()  # joined since the last decode: no token to feed yet
        self.prefix_cache = prefix_cache
        self.tracked: dict[int, _Tracked] = {}  # sequences that store states in the prefix cache
        self._verifying: RingSave | None = None  # the last verify pass, until it is settled
        self._verified_tokens: list[int] = []
        # Every `generate` call makes a runner: its size is worth a line only when debugging (the
        # server states its own at start).
        log.debug(
            "KV cache: %d sequences × %d tokens, budget %.2f GiB", max_batch, self.context, budget / 2**30
        )

    def fit_prompt(self, tokens: Sequence[int]) -> list[int]:
        return fit_tokens(self.model, tokens)

    def length(self, seq: int) -> int:
        """Tokens of `seq` in the cache."""
        return self.cache.lengths[self.row_of[seq]]

    def admits(self, tokens: int) -> bool:
        cache = self.cache
        # Room for the prompt and, for every sequence that decodes, the block it may take next.
        need = cache.blocks_for(tokens) + len(self.running) + 1
        limit = cache.pool.max_blocks
        if limit is not None and cache.blocks_for(tokens) > limit:
            raise CacheFullError(
                f"a prompt of {tokens} tokens needs more KV-cache memory than its budget holds "
                f"({limit * cache.block_size} tokens); send a shorter one (or give the cache more "
                "memory: kv_budget_bytes, gptoss serve --kv-cache-gib)"
            )
        alone = not self.running and not self.joined  # nobody will give memory back
        if cache.can_take(need) or (alone and cache.can_take(cache.blocks_for(tokens))):
            return True
        if alone:
            raise CacheFullError(
                f"the KV cache has no room for a prompt of {tokens} tokens beside the sequences it keeps"
            )
        return False

    def starved(self, seqs: Sequence[int]) -> list[int]:
        cache = self.cache
        growing = [
            s
            for s in seqs
            if cache.blocks_for(cache.lengths[self.row_of[s]] + 1) > len(cache.tables[self.row_of[s]])
        ]
        free = cache.pool.free
        out: list[int] = []
        # The newest sequences give way: their memory goes to the others.
        while free is not None and len(growing) > free:
            seq = growing.pop()
            out.append(seq)
            free += len(cache.tables[self.row_of[seq]])
        return out

    def reuse(self, seq: int, prompt: Sequence[int]) -> int:
        if seq in self.row_of:
            raise RuntimeError(f"sequence {seq} has already started")
        row = self._claim_row(seq)
        if self.prefix_cache is None:
            return 0
        hit = self.prefix_cache.lookup(prompt)
        self.prefix_cache.restore(hit, self.cache, row)
        base = hit.node or self.prefix_cache.root
        self.prefix_cache.pin(base)
        self.tracked[seq] = _Tracked(list(prompt[: hit.length]), base, hit.length)
        if hit.length == len(prompt):  # the whole prompt: its first logits come from the snapshot
            self.hidden[seq] = hit.hidden.clone()
        return hit.length

    def prefill(self, seq: int, tokens: Sequence[int], last: bool) -> None:
        if seq in self.running:
            raise RuntimeError(f"sequence {seq} is decoding; it cannot be prefilled")
        if seq not in self.row_of:
            self._claim_row(seq)
        if tokens:
            self.hidden[seq] = prefill(self.model, self.cache, self.row_of[seq], tokens, self.prefill_chunk)
            tracked = self.tracked.get(seq)
            if tracked is not None:
                tracked.tokens += tokens
                self._store(seq, self.hidden[seq])
        if not last:
            return
        if seq not in self.hidden:
            raise ValueError(f"sequence {seq} has no prefilled token to continue from")
        self._move_to(seq, len(self.running))
        self.running.append(seq)
        self.joined.add(seq)

    @torch.inference_mode()
    def decode(self, tokens: Mapping[int, int | None]) -> Mapping[int, Tensor]:
        if set(tokens) != set(self.running):
            raise ValueError("decode needs every sequence of the batch")
        # Newcomers were appended last, so the rows that take a token are a prefix of the batch.
        fed = len(self.running) - len(self.joined)
        if any(tokens[s] is None for s in self.running[:fed]) or any(
            tokens[s] is not None for s in self.joined
        ):
            raise ValueError("a token is needed exactly for the sequences that did not just join")
        hidden = []
        if fed:
            ids = torch.tensor([[tokens[s]] for s in self.running[:fed]], device=model_device(self.model))
            hidden.append(forward_hidden(self.model, self.cache, ids, slice(0, fed))[:, -1])
            for s in self.running[:fed]:
                if s in self.tracked:
                    self.tracked[s].tokens.append(tokens[s])
        if self.joined:
            hidden.append(torch.stack([self.hidden.pop(s) for s in self.running[fed:]]))
        logits = self.model.lm_head(torch.cat(hidden))  # (R, V): one pass over the head for all
        self.joined.clear()
        return BatchLogits(self.running, logits)

    def score(self, tokens: Sequence[int], top: int = 0):  # noqa: ANN201 - PromptScores, imported lazily
        """Log-probabilities of prompt `tokens` (see `gptoss.inference.scoring`), in a cache of their
        own: the sequences in this runner's rows are untouched."""
        from gptoss.inference.scoring import score_tokens  # (scoring builds on this module's prefill)

        return score_tokens(self.model, tokens, top, self.prefill_chunk)

    # ------------------------------------------------------------------ speculative decoding
    def verify_room(self, seq: int) -> int:
        """The most tokens `verify` may feed decoding sequence `seq` now (0 if it cannot verify)."""
        if seq not in self.running or seq in self.joined:
            return 0
        return max_fed(self.cache, self.row_of[seq])

    def verify(self, seq: int, tokens: Sequence[int]) -> Tensor:
        """Feed `tokens` (its last sampled token, then proposed ones) to decoding sequence `seq`, a
        forward pass per `EXACT_ROWS` of them; row j of the result (len(tokens), V) is the logits
        that `decode` would give after tokens[:j+1] — the same numbers, bit for bit, on the native
        CPU path. `settle` must follow."""
        if seq not in self.running or seq in self.joined:
            raise ValueError(f"sequence {seq} is not decoding with a token to feed")
        logits, self._verifying = verify(self.model, self.cache, self.row_of[seq], list(tokens))
        self._verified_tokens = list(tokens)
        return logits

    def settle(self, seq: int, kept: int) -> None:
        """Keep the first `kept` tokens of `seq`'s last `verify` in its cache, take back the rest."""
        save: RingSave | None = self._verifying
        if save is None or self.row_of.get(seq) != save.row:
            raise RuntimeError(f"sequence {seq} has no verify pass to settle")
        save.restore(self.cache, kept)
        self._verifying = None
        if seq in self.tracked:
            self.tracked[seq].tokens += self._verified_tokens[:kept]

    def release(self, seq: int) -> None:
        self._store(seq, None)
        self._untrack(seq)
        if seq in self.running:
            self._leave_batch(seq)
        row = self.row_of.pop(seq, None)
        if row is not None:
            self.cache.clear_row(row)
        self.hidden.pop(seq, None)

    def park(self, seq: int) -> None:
        """Take `seq` out of the decode batch but keep its row: a later `prefill` continues it.
        Its last sampled token was not fed, so it has no hidden state until it is prefilled."""
        self._store(seq, None)
        self._leave_batch(seq)

    def reset(self) -> None:
        for seq in list(self.tracked):
            self._untrack(seq)
        self.cache.reset()
        self.row_of, self.running = {}, []
        self.hidden.clear()
        self.joined.clear()

    # ------------------------------------------------------------------ marks (parked sequences)
    def mark(self, seq: int) -> RowMark:
        """Remember where parked `seq` is; `rewind` returns to it, dropping what followed.

        Full-attention positions past the mark are dropped on rewind, but sliding layers reuse
        their ring slots, so the mark keeps a copy of the rings (window × KV width per layer: small).
        """
        row = self.row_of[seq]
        hidden = self.hidden.get(seq)
        return RowMark(
            self.cache.lengths[row], self.cache.read_rings(row), None if hidden is None else hidden.clone()
        )

    def rewind(self, seq: int, mark: RowMark) -> None:
        self._untrack(seq)  # its row no longer follows the tokens it stored
        row = self.row_of[seq]
        if mark.length > self.cache.lengths[row]:
            raise ValueError("this mark lies ahead of the sequence (was it taken before a reset?)")
        self.cache.write_rings(row, mark.rings)
        self.cache.truncate(row, mark.length)
        self.hidden.pop(seq, None)
        if mark.hidden is not None:
            self.hidden[seq] = mark.hidden

    # ------------------------------------------------------------------ prefix cache
    def _store(self, seq: int, hidden: Tensor | None) -> None:
        """Snapshot `seq`'s row into the prefix cache (a pass boundary: lengths move only there)."""
        tracked = self.tracked.get(seq)
        row = self.row_of.get(seq)
        if tracked is None or row is None or row in self.cache.broken or self.prefix_cache is None:
            return
        tracked.own = self.prefix_cache.extend(
            tracked.own, tracked.base, tracked.start, tracked.tokens, self.cache, row, hidden
        )

    def _untrack(self, seq: int) -> None:
        tracked = self.tracked.pop(seq, None)
        if tracked is None or self.prefix_cache is None:
            return
        if tracked.own is not None:
            self.prefix_cache.unpin(tracked.own)
        self.prefix_cache.unpin(tracked.base)

    # ------------------------------------------------------------------ rows
    def _claim_row(self, seq: int) -> int:
        free = sorted(set(range(self.max_batch)) - set(self.row_of.values()))
        if not free:
            raise RuntimeError("every row of the KV cache is taken")
        self.row_of[seq] = free[0]
        self.cache.clear_row(free[0])
        return free[0]

    def _leave_batch(self, seq: int) -> None:
        if self.joined:
            raise RuntimeError("a sequence may leave the batch only between a decode and the next prefill")
        last = self.running[-1]
        self._swap(seq, last)  # keep decoding rows contiguous: the last row fills the hole
        self.running[self.running.index(seq)] = last
        self.running.pop()

    def _move_to(self, seq: int, row: int) -> None:
        """Put `seq` in `row`; whoever held that row takes `seq`'s old one."""
        holder = next((s for s, r in self.row_of.items() if r == row), None)
        if holder is None:
            self.cache.move_row(self.row_of[seq], row)
            self.row_of[seq] = row
        elif holder != seq:
            self._swap(seq, holder)

    def _swap(self, a: int, b: int) -> None:
        if a != b:
            self.cache.swap_rows(self.row_of[a], self.row_of[b])
            self.row_of[a], self.row_of[b] = self.row_of[b], self.row_of[a]
