"""A reference KV cache for tests: every row preallocated to its capacity, contiguous (the layout the
paged `gptoss.inference.KVCache` replaced), with the same positions and the same sliding-layer rings, so
that the paged cache's results can be compared with it bit for bit."""

import torch
from torch import Tensor

from gptoss.config import SLIDING
from gptoss.model import Visibility


class ContiguousCache:
    def __init__(self, config, batch_size: int, capacity: int, dtype=torch.float32) -> None:
        self.window = config.sliding_window
        self.ring = min(config.sliding_window, capacity)
        self.sliding = [t == SLIDING for t in config.layer_types]
        heads, dim = config.num_key_value_heads, config.head_dim
        self.keys = [
            torch.zeros(batch_size, heads, self.ring if s else capacity, dim, dtype=dtype)
            for s in self.sliding
        ]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.lengths = [0] * batch_size
        self._step = None

    def begin(self, rows: slice, num_tokens: int) -> Tensor:
        starts = self.lengths[rows]
        start = torch.tensor(starts)[:, None]
        positions = start + torch.arange(num_tokens)
        full_len = max(starts) + num_tokens
        slot = torch.arange(self.ring)
        newest = start - 1 + (num_tokens == 1)
        ring_positions = slot + self.ring * torch.div(newest - slot, self.ring, rounding_mode="floor")
        if num_tokens > 1:
            ring_positions = torch.cat([ring_positions, positions], dim=1)
        full, sliding = Visibility(positions), Visibility(positions, ring_positions, self.window)
        self._step = (rows, positions, full_len, full, sliding)
        return positions

    def update(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Visibility]:
        rows, positions, full_len, full, sliding = self._step
        cached_k, cached_v = self.keys[layer_idx][rows], self.values[layer_idx][rows]
        T = k.shape[2]
        if not self.sliding[layer_idx]:
            _write(cached_k, positions, k)
            _write(cached_v, positions, v)
            return cached_k[:, :, :full_len], cached_v[:, :, :full_len], full
        ring_slots = positions % self.ring
        if T == 1:
            _write(cached_k, ring_slots, k)
            _write(cached_v, ring_slots, v)
            return cached_k, cached_v, sliding
        keys, values = torch.cat([cached_k, k], dim=2), torch.cat([cached_v, v], dim=2)
        last = min(T, self.ring)
        _write(cached_k, ring_slots[:, -last:], k[:, :, -last:])
        _write(cached_v, ring_slots[:, -last:], v[:, :, -last:])
        return keys, values, sliding

    def end(self) -> None:
        rows, positions = self._step[0], self._step[1]
        for i in range(*rows.indices(len(self.lengths))):
            self.lengths[i] += positions.shape[1]
        self._step = None

    def clear_row(self, row: int) -> None:
        self.lengths[row] = 0

    def swap_rows(self, a: int, b: int) -> None:
        for t in self.keys + self.values:
            held = t[a].clone()
            t[a] = t[b]
            t[b] = held
        self.lengths[a], self.lengths[b] = self.lengths[b], self.lengths[a]


def _write(cache: Tensor, slots: Tensor, new: Tensor) -> None:
    rows = torch.arange(cache.shape[0])[:, None]
    cache[rows, :, slots] = new.transpose(1, 2)
