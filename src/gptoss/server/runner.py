"""The model side of the server: sequences in KV-cache slots, next-token logits out.

`Runner` is the seam between the scheduler and a model. `ModelRunner` is the production one: a
`KVCache` whose first R rows are the R sequences decoding together, plus a one-row staging cache
where a newcomer's prompt is prefilled chunk by chunk (so a half-prefilled prompt never sits in the
decode batch) before it is copied into the first free row. A newcomer's first logits come out of
the next decode step's output-head matmul, batched with everyone else's: at 201,088 tokens the
head is the largest weight, too large to read once more for a single row. Tests pass a runner
that scripts its logits, which drives the real scheduler, parser and HTTP layer through exact token
sequences.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Protocol

import torch
from torch import Tensor

from gptoss.inference import KVCache
from gptoss.inference.engine import forward_hidden, model_device, model_dtype, prefill_chunk_length
from gptoss.model import GptOss
from gptoss.vocab import fit_tokens

log = logging.getLogger(__name__)

DEFAULT_CONTEXT = 8192
DEFAULT_MAX_BATCH = 32
DEFAULT_PREFILL_CHUNK = 512


class Runner(Protocol):
    """Next-token logits for sequences identified by integer ids.

    A sequence is prefilled (one or more chunks, the last with ``last=True``), which makes it join
    the decode batch; from then on every `decode` call gives its next-token logits, together with
    every other sequence of the batch, until `release`. Only one sequence is prefilled at a time.
    """

    vocab_size: int
    context: int  # tokens one sequence may hold: prompt + generated
    max_batch: int  # sequences that decode together

    def fit_prompt(self, tokens: Sequence[int]) -> list[int]:
        """`tokens` as the model reads them (a trimmed vocabulary spells ids it lacks in bytes)."""
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


class ModelRunner:
    """A `Runner` on a real `GptOss` model and `KVCache`s.

    Memory is `(max_batch + 1) · config.kv_cache_bytes(context)`, allocated up front.
    """

    def __init__(
        self,
        model: GptOss,
        max_batch: int = DEFAULT_MAX_BATCH,
        context: int | None = None,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    ) -> None:
        config = model.config
        self.model = model.eval()
        self.vocab_size = config.vocab_size
        self.context = min(context or DEFAULT_CONTEXT, config.max_position_embeddings)
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        dtype, device = model_dtype(model), model_device(model)
        self.cache = KVCache(config, max_batch, self.context, dtype, device)
        self.staging = KVCache(config, 1, self.context, dtype, device)
        self.rows: list[int] = []  # sequence id of each decoding row, rows 0..R-1
        self.staged: int | None = None  # the sequence in the staging cache
        self.joined: dict[int, Tensor] = {}  # newcomers' last hidden state, until the next decode
        log.info(
            "KV cache: %d sequences × %d tokens, %.2f GiB",
            max_batch,
            self.context,
            (self.cache.nbytes + self.staging.nbytes) / 2**30,
        )

    @torch.inference_mode()
    def fit_prompt(self, tokens: Sequence[int]) -> list[int]:
        return fit_tokens(self.model, tokens)

    def prefill(self, seq: int, tokens: Sequence[int], last: bool) -> None:
        if self.staged != seq:
            if self.staged is not None:
                raise RuntimeError(f"sequence {self.staged} is still being prefilled")
            if len(self.rows) >= self.max_batch:
                raise RuntimeError("the decode batch is full")
            self.staging.reset()
            self.staged = seq
        ids = torch.tensor(list(tokens), dtype=torch.long, device=self.cache.keys[0].device)
        done, hidden = 0, None
        while done < len(ids):
            n = prefill_chunk_length(self.model, self.staging.lengths[0], len(ids) - done, self.prefill_chunk)
            hidden = forward_hidden(self.model, self.staging, ids[None, done : done + n], slice(0, 1))
            done += n
        if not last:
            return
        if hidden is None:
            raise ValueError("the last prefill chunk holds no token")
        _copy_row(self.staging, 0, self.cache, len(self.rows))
        self.rows.append(seq)
        self.joined[seq] = hidden[0, -1]
        self.staged = None

    @torch.inference_mode()
    def decode(self, tokens: Mapping[int, int | None]) -> Mapping[int, Tensor]:
        if len(tokens) != len(self.rows) or set(tokens) != set(self.rows):
            raise ValueError("decode needs every sequence of the batch")
        # Newcomers were appended last, so the rows that take a token are a prefix of the batch.
        fed = len(self.rows) - len(self.joined)
        if any(tokens[s] is None for s in self.rows[:fed]) or any(tokens[s] is not None for s in self.joined):
            raise ValueError("a token is needed exactly for the sequences that did not just join")
        hidden = []
        if fed:
            ids = torch.tensor([[tokens[s]] for s in self.rows[:fed]], device=self.cache.keys[0].device)
            hidden.append(forward_hidden(self.model, self.cache, ids, slice(0, fed))[:, -1])
        if self.joined:
            hidden.append(torch.stack(list(self.joined.values())))
        logits = self.model.lm_head(torch.cat(hidden))  # (R, V): one pass over the head for all
        self.joined.clear()
        return {s: logits[r] for r, s in enumerate(self.rows)}

    def release(self, seq: int) -> None:
        if seq == self.staged:
            self.staged = None
            return
        if self.joined:
            raise RuntimeError("release a sequence only between a decode and the next prefill")
        row = self.rows.index(seq)
        last = len(self.rows) - 1
        if row != last:  # keep decoding rows contiguous: the last row fills the hole
            _copy_row(self.cache, last, self.cache, row)
            self.rows[row] = self.rows[last]
        self.rows.pop()
        self.cache.lengths[last] = 0

    def reset(self) -> None:
        self.cache.reset()
        self.staging.reset()
        self.rows, self.staged = [], None
        self.joined.clear()


def _copy_row(src: KVCache, src_row: int, dst: KVCache, dst_row: int) -> None:
    """Copy one sequence between caches of equal capacity (full layers: only the filled slots)."""
    n = src.lengths[src_row]
    for sliding, sk, sv, dk, dv in zip(src.sliding, src.keys, src.values, dst.keys, dst.values, strict=True):
        slots = slice(None) if sliding else slice(0, n)
        dk[dst_row, :, slots] = sk[src_row, :, slots]
        dv[dst_row, :, slots] = sv[src_row, :, slots]
    dst.lengths[dst_row] = n
