"""Verify pass: several tokens of one sequence in one forward pass (up to `EXACT_ROWS` of them),
each computed as decoding would compute it.

A chunk of a prompt gives each position's logits too, but through other kernels than one-token
decoding (GEMMs whose rounding depends on the number of rows, a concatenated ring for the sliding
layers), so its numbers differ from decoding's in the last bits, and greedy output could change at a
near-tie. A verify pass instead feeds the tokens as the *rows* of a decode step: every row holds one
token of the same sequence at its own position, the dense and expert kernels compute each row as
they compute a decode step's (at most `EXACT_ROWS` rows a call, where their per-row sums do not
depend on the row count), and attention gives each row the keys decoding would have given it:

- full layers: the sequence's keys up to the row's position (the row does not see later slots: an
  unseen key adds an exact zero to the softmax and is skipped in the weighted sum, so the result
  equals attending over the shorter cache);
- sliding layers: the ring as it stands after that row's token was written, slot for slot (one
  small copy of the ring per row), so that the softmax sums its terms in decoding's order.

Rejected tokens are then taken back (`RingSave.restore`): full layers give back the blocks past the
kept tokens (positions past a sequence's length are not seen until overwritten), sliding layers get
back the ring slots the pass overwrote, saved before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gptoss.inference.cache import ContextFullError, KVCache
from gptoss.inference.speculative import EXACT_ROWS
from gptoss.model import GptOss, Visibility


class QueryRows:
    """`KVCache` row `row` as a verify pass of `n` tokens at positions start..start+n-1 reads and
    writes it: the model's cache protocol (`update`), and what a native decode step asks of a cache
    (`dtype`, `decode_view`). The row's blocks for those positions must be reserved."""

    def __init__(self, cache: KVCache, row: int, start: int, n: int) -> None:
        self.cache, self.row, self.start, self.n = cache, row, start, n
        self.dtype = cache.dtype
        device = cache.pool.device
        self.positions = start + torch.arange(n, device=device)  # (n,)
        query = self.positions[:, None]  # (n, 1): one token a row
        self.full = Visibility(query)  # keys at positions 0 .. start + n - 1
        # Each row's ring as decoding reads it: slot s holds the latest position ≡ s (mod ring)
        # up to the row's own, unseen if that lies outside the window or before the sequence.
        slot = torch.arange(cache.ring, device=device)
        key_positions = slot + cache.ring * torch.div(query - slot, cache.ring, rounding_mode="floor")
        self.sliding = Visibility(query, key_positions, cache.window)  # (n, ring)
        self.ring_slots = self.positions % cache.ring

    def decode_view(self, layer_idx: int) -> None:
        return None  # (the rows are one sequence's: a decode step's view of every row does not apply)

    def update(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Visibility]:
        """Store the rows' keys and values (n, KVH, 1, D); return what each row attends over."""
        new_k, new_v = k[:, :, 0].transpose(0, 1), v[:, :, 0].transpose(0, 1)  # (KVH, n, D)
        if not self.cache.sliding[layer_idx]:
            end = self.start + self.n
            self.cache.write_layer(layer_idx, self.row, self.start, new_k, new_v)
            keys, values = self.cache.read_layer(layer_idx, self.row, end)
            shape = (self.n, -1, -1, -1)
            return keys[None].expand(shape), values[None].expand(shape), self.full
        ring_k, ring_v = self.cache.rings[layer_idx]
        keys, values = ring_k[self.row], ring_v[self.row]
        rings_k = keys.expand(self.n, -1, -1, -1).clone()  # (n, KVH, ring, D)
        rings_v = values.expand(self.n, -1, -1, -1).clone()
        for j, slot in enumerate(self.ring_slots.tolist()):
            rings_k[j:, :, slot] = new_k[:, j]
            rings_v[j:, :, slot] = new_v[:, j]
        keys[:, self.ring_slots] = new_k
        values[:, self.ring_slots] = new_v
        return rings_k, rings_v, self.sliding


@dataclass
class RingSave:
    """The sliding layers' ring slots that a verify pass of one row overwrites, as they were."""

    row: int
    start: int  # the row's length before the pass
    fed: int  # tokens the pass fed
    saved: list[tuple[Tensor, Tensor] | None]  # per layer: (keys, values) (KVH, fed, D), None if full

    @classmethod
    def take(cls, cache: KVCache, row: int, start: int, fed: int) -> RingSave:
        slots = (start + torch.arange(fed, device=cache.pool.device)) % cache.ring
        saved = [
            (cache.rings[i][0][row][:, slots].clone(), cache.rings[i][1][row][:, slots].clone())
            if sliding
            else None
            for i, sliding in enumerate(cache.sliding)
        ]
        return cls(row, start, fed, saved)

    def restore(self, cache: KVCache, kept: int) -> None:
        """Keep the pass's first `kept` tokens: the row's length, blocks and rings as if only those
        were fed. (A pass feeds at most a ring's worth of tokens, so no slot was written twice.)"""
        if kept < self.fed:
            slots = (self.start + torch.arange(kept, self.fed, device=cache.pool.device)) % cache.ring
            for i, saved in enumerate(self.saved):
                if saved is not None:
                    cache.rings[i][0][self.row][:, slots] = saved[0][:, kept:]
                    cache.rings[i][1][self.row][:, slots] = saved[1][:, kept:]
        cache.truncate(self.row, self.start + kept)


def max_fed(cache: KVCache, row: int) -> int:
    """The most tokens one verify pass of `row` may feed: a ring's worth (so that rejected slots can
    be restored) and what the row has room for (its capacity and the cache's memory budget)."""
    return min(cache.ring, cache.room(row))


@torch.inference_mode()
def verify(model: GptOss, cache: KVCache, row: int, tokens: list[int]) -> tuple[Tensor, RingSave]:
    """Feed `tokens` to cache row `row` as decoding would one by one; the next-token logits after
    each (len(tokens), V) and what `RingSave.restore` needs to take some back."""
    start, fed = cache.lengths[row], len(tokens)
    if not 1 <= fed <= max_fed(cache, row):
        raise ContextFullError(f"a verify pass of {fed} tokens does not fit row {row} at length {start}")
    if row in cache.broken:
        raise RuntimeError("a row of this pass was left by an interrupted forward pass; clear it first")
    cache.reserve(row, start + fed)
    save = RingSave.take(cache, row, start, fed)
    device = cache.pool.device
    logits = []
    try:
        for first in range(0, fed, EXACT_ROWS):
            group = tokens[first : first + EXACT_ROWS]
            at = start + first
            view = QueryRows(cache, row, at, len(group))
            ids = torch.tensor(group, device=device)[:, None]  # (n, 1): one row per token
            hidden = model.model(ids, view.positions[:, None], view)[:, -1]
            cache.lengths[row] = at + len(group)
            logits.append(model.lm_head(hidden))
    except BaseException:
        cache.broken.add(row)  # rings half-written, as after an interrupted decode step
        raise
    return torch.cat(logits), save
