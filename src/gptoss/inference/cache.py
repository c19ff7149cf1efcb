"""A preallocated KV cache: full-attention layers hold the whole context, sliding layers a ring
buffer of their window.

Each of the B rows is one sequence with its own length, so rows of different lengths decode
together without padding: a token's cache slot and its rotary position are the same number. The
engine brackets every forward pass with `begin` (which rows, how many new tokens) and `end`;
attention calls `update` once per layer in between, as `gptoss.model.KVCache` specifies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gptoss.config import SLIDING, ModelConfig


class ContextFullError(ValueError):
    """A sequence would grow beyond the capacity of its cache."""


@dataclass
class _Step:
    rows: slice
    positions: Tensor  # (R, T) position (= full-layer slot) of every new token
    start: int | None  # the rows' common length before the pass, if they share one
    ring_slots: Tensor  # (R, T) the sliding layers' ring slot of every new token
    ring_start: int | None  # the ring slot of `start`, if the rows share one
    full_len: int  # full layers attend over slots [0, full_len)
    full_mask: Tensor  # (R, 1, T, full_len)
    sliding_mask: Tensor  # (R, 1, T, ring + T), or (R, 1, 1, ring) for one token (see begin)
    shared_slot: bool  # one token for every row of the cache, all at the common length `start`


class KVCache:
    """Keys and values of `batch_size` sequences of up to `capacity` tokens each.

    Memory is `batch_size · config.kv_cache_bytes(capacity, dtype bytes)`, allocated up front so a
    long generation never reallocates (and never fails half way for lack of memory).
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        capacity: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if not 0 < capacity <= config.max_position_embeddings:
            raise ValueError(
                f"cache capacity must lie in 1..{config.max_position_embeddings} (the model's context), "
                f"got {capacity}"
            )
        self.capacity = capacity
        self.window = config.sliding_window
        # A window longer than the capacity never wraps, so the ring need not exceed the capacity.
        self.ring = min(config.sliding_window, capacity)
        self.sliding = [t == SLIDING for t in config.layer_types]
        heads, dim = config.num_key_value_heads, config.head_dim
        # Zeros, not empty: a masked slot still multiplies its value by a zero probability, and
        # uninitialised memory may hold NaN (0 · NaN = NaN).
        self.keys = [
            torch.zeros(batch_size, heads, self.ring if s else capacity, dim, dtype=dtype, device=device)
            for s in self.sliding
        ]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.lengths = [0] * batch_size  # tokens stored per row
        self.broken: set[int] = set()  # rows left by an interrupted pass (see `abort`)
        self._step: _Step | None = None

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    @property
    def valid(self) -> bool:
        """No row was left half-written by an interrupted pass."""
        return not self.broken

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the stored keys and values."""
        return self.keys[0].dtype

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    # ------------------------------------------------------------------ one forward pass
    def begin(self, rows: slice, num_tokens: int) -> Tensor:
        """Start a forward pass of `num_tokens` new tokens for each row in `rows`.

        Returns their positions (R, T), which the model needs for rotary embeddings. Masks are
        built here once per pass and shared by every layer of the same kind.
        """
        if self.broken.intersection(range(*rows.indices(self.batch_size))):
            raise RuntimeError("a row of this pass was left by an interrupted forward pass; clear it first")
        starts = self.lengths[rows]
        if not starts:
            raise ValueError(f"rows {rows} select no sequence of a cache of {self.batch_size}")
        if max(starts) + num_tokens > self.capacity:
            raise ContextFullError(
                f"a sequence of {max(starts)} tokens cannot take {num_tokens} more: the cache holds "
                f"{self.capacity} tokens per sequence"
            )
        device = self.keys[0].device
        start = torch.tensor(starts, device=device)[:, None]  # (R, 1)
        positions = start + torch.arange(num_tokens, device=device)  # (R, T)
        query = positions[:, None, :, None]  # (R, 1, T, 1)

        full_len = max(starts) + num_tokens
        full_mask = torch.arange(full_len, device=device) <= query  # causal; slot = position

        # Sliding layers attend over the ring as it was before this pass, then the new tokens:
        # a chunk longer than the window would otherwise overwrite keys its first tokens need. One
        # token (decode) is written first and the ring alone attended over, without a copy: its
        # slot held the one position that has just left the window.
        slot = torch.arange(self.ring, device=device)
        newest = start - 1 + (num_tokens == 1)  # the latest position in the ring the pass reads
        ring_positions = slot + self.ring * torch.div(newest - slot, self.ring, rounding_mode="floor")
        if num_tokens > 1:
            ring_positions = torch.cat([ring_positions, positions], dim=1)
        key_positions = ring_positions[:, None, None, :]  # (R, 1, 1, ring [+ T])
        distance = query - key_positions
        sliding_mask = (key_positions >= 0) & (distance >= 0) & (distance < self.window)

        common = starts[0] if len(set(starts)) == 1 else None
        ring_start = None if common is None else common % self.ring
        every_row = rows.indices(self.batch_size) == (0, self.batch_size, 1)
        shared_slot = num_tokens == 1 and common is not None and every_row
        self._step = _Step(
            rows, positions, common, positions % self.ring, ring_start, full_len, full_mask, sliding_mask,
            shared_slot,
        )  # fmt: skip
        return positions

    def update(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Store new keys/values (R, KVH, T, D); return what layer `layer_idx` attends over."""
        step = self._step
        if step is None:
            raise RuntimeError("KVCache.update called outside begin()/end()")
        cached_k, cached_v = self.keys[layer_idx][step.rows], self.values[layer_idx][step.rows]  # views
        T = k.shape[2]
        if not self.sliding[layer_idx]:
            _write(cached_k, step.positions, step.start, k)
            _write(cached_v, step.positions, step.start, v)
            n = step.full_len
            return cached_k[:, :, :n], cached_v[:, :, :n], step.full_mask
        if T == 1:
            _write(cached_k, step.ring_slots, step.ring_start, k)
            _write(cached_v, step.ring_slots, step.ring_start, v)
            return cached_k, cached_v, step.sliding_mask
        keys = torch.cat([cached_k, k], dim=2)  # (R, KVH, ring + T, D)
        values = torch.cat([cached_v, v], dim=2)
        last = min(T, self.ring)  # only the newest `ring` tokens stay
        slots = step.ring_slots[:, -last:]
        _write(cached_k, slots, None, k[:, :, -last:])
        _write(cached_v, slots, None, v[:, :, -last:])
        return keys, values, step.sliding_mask

    def shared_slot(self, layer_idx: int) -> tuple[Tensor, Tensor, int, int, Tensor] | None:
        """For a kernel that stores a one-token pass's key and value itself (`ops.decode`): layer
        `layer_idx`'s whole key and value tensors, the slot that every row's new token goes to, how
        many slots from the first the layer attends over, and its mask; the same writes and reads
        as `update`. None unless the pass is one token for every row of the cache, all at one length."""
        step = self._step
        if step is None or not step.shared_slot:
            return None
        if self.sliding[layer_idx]:
            return self.keys[layer_idx], self.values[layer_idx], step.ring_start, self.ring, step.sliding_mask
        return self.keys[layer_idx], self.values[layer_idx], step.start, step.full_len, step.full_mask

    def end(self) -> None:
        """Finish the pass: the rows now hold their new tokens."""
        if self._step is None:
            raise RuntimeError("KVCache.end called without begin()")
        rows, added = self._step.rows, self._step.positions.shape[1]
        for i in range(*rows.indices(self.batch_size)):
            self.lengths[i] += added
        self._step = None

    def abort(self) -> None:
        """A pass failed half way: some layers' rings already hold its tokens, so its rows are
        unusable until cleared (full-layer slots past `lengths` would be harmless). Other rows
        are untouched."""
        if self._step is not None:
            self.broken.update(range(*self._step.rows.indices(self.batch_size)))
        self._step = None

    # ------------------------------------------------------------------ rows
    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (in this order), e.g. to drop finished sequences from a batch."""
        index = torch.tensor(rows, device=self.keys[0].device, dtype=torch.long)
        self.keys = [t.index_select(0, index) for t in self.keys]
        self.values = [t.index_select(0, index) for t in self.values]
        self.lengths = [self.lengths[i] for i in rows]

    def clear_row(self, row: int) -> None:
        """Forget the sequence of `row` (stale slots are masked until overwritten)."""
        self.lengths[row] = 0
        self.broken.discard(row)

    def copy_row(self, src: int, dst: int) -> None:
        """Copy the sequence of row `src` into row `dst` (full layers: only the filled slots)."""
        n = self.lengths[src]
        for sliding, k, v in zip(self.sliding, self.keys, self.values, strict=True):
            slots = slice(None) if sliding else slice(0, n)
            k[dst, :, slots] = k[src, :, slots]
            v[dst, :, slots] = v[src, :, slots]
        self.lengths[dst] = n
        if src in self.broken:
            self.broken.add(dst)
        else:
            self.broken.discard(dst)

    def swap_rows(self, a: int, b: int) -> None:
        """Exchange the sequences of rows `a` and `b`."""
        n = max(self.lengths[a], self.lengths[b])
        for sliding, k, v in zip(self.sliding, self.keys, self.values, strict=True):
            slots = slice(None) if sliding else slice(0, n)
            for t in (k, v):
                held = t[a, :, slots].clone()
                t[a, :, slots] = t[b, :, slots]
                t[b, :, slots] = held
        self.lengths[a], self.lengths[b] = self.lengths[b], self.lengths[a]
        broken_a, broken_b = a in self.broken, b in self.broken
        self.broken -= {a, b}
        self.broken |= {r for r, was in ((a, broken_b), (b, broken_a)) if was}

    def reset(self) -> None:
        """Forget every sequence (stale slots are masked until overwritten, so nothing is cleared)."""
        self.lengths = [0] * self.batch_size
        self.broken.clear()
        self._step = None


def _write(cache: Tensor, slots: Tensor, first: int | None, new: Tensor) -> None:
    """cache[r, :, slots[r, t]] = new[r, :, t] for cache (R, KVH, S, D), slots (R, T), new (R, KVH, T, D).

    `first`: the slot of every row's first new token when they share one and the rest follow it
    (no wrap), which makes the write one slice copy (a decode step, most prefills)."""
    T = new.shape[2]
    if first is not None and first + T <= cache.shape[2]:
        cache[:, :, first : first + T].copy_(new)
        return
    rows = torch.arange(cache.shape[0], device=cache.device)[:, None]
    # Advanced indices around a slice put their dims first: the target reads (R, T, KVH, D).
    cache[rows, :, slots] = new.transpose(1, 2)
