"""The KV cache: full-attention layers in blocks taken from a pool as sequences grow, sliding layers
in a ring buffer of their window per row.

Each of the B rows is one sequence with its own length, so rows of different lengths decode
together without padding: a token's position is its rotary position and its place in the cache.
The engine brackets every forward pass with `begin` (which rows, how many new tokens) and `end`;
attention calls `update` once per layer in between, as `gptoss.model.KVCache` specifies.

Full layers keep every position, so they hold most of the memory at long contexts. A row holds them
in a table of blocks of `block_size` positions (position p in block p // block_size), all full
layers of a position in one block, taken from a `BlockPool` when a pass needs them and given back
when the row is cleared: a sequence costs what it holds, not `capacity`. The pool's budget bounds
the memory; a pass that needs a block the budget does not allow raises `CacheFullError` before
anything is written, so the caller can end or defer that sequence alone. A sliding layer's ring is
small (window × KV width per row) and is allocated with the rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from gptoss.config import SLIDING, ModelConfig
from gptoss.model import Visibility

DEFAULT_BLOCK_SIZE = 32


class ContextFullError(ValueError):
    """A sequence would grow beyond the capacity of its cache."""


class CacheFullError(RuntimeError):
    """The KV cache's memory budget has no block left for a sequence to grow."""


class BlockPool:
    """Blocks of `shape` (full layers, 2, KVH, block_size, D), allocated when taken and freed when
    given back, at most `max_blocks` at once (None: no limit)."""

    def __init__(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str, max_blocks: int | None
    ) -> None:
        self.shape, self.dtype, self.device = shape, dtype, torch.device(device)
        self.max_blocks = max_blocks
        self.blocks: dict[int, Tensor] = {}
        self._free_ids: list[int] = []
        self._next_id = 0
        # What tables pad with: rows of one step have different block counts, and a kernel reads a
        # rectangular table (no query sees the pad's positions, so its contents are never used).
        self.pad = self._new()

    def _new(self) -> Tensor:
        # Zeros, not empty: attention multiplies an unseen position's value by a zero probability,
        # and uninitialised memory may hold NaN (0 · NaN = NaN).
        return torch.zeros(self.shape, dtype=self.dtype, device=self.device)

    @property
    def block_bytes(self) -> int:
        return self.pad.numel() * self.pad.element_size()

    @property
    def used(self) -> int:
        return len(self.blocks)

    @property
    def free(self) -> int | None:
        """Blocks that may still be taken (None: no limit)."""
        return None if self.max_blocks is None else self.max_blocks - self.used

    def take(self, n: int) -> list[int]:
        """`n` new blocks (all or none)."""
        if self.free is not None and n > self.free:
            raise CacheFullError(
                f"the KV cache is full: {n} more blocks needed, {self.free} of {self.max_blocks} free "
                f"({self.max_blocks * self.block_bytes / 2**30:.2f} GiB budget)"
            )
        ids = []
        for _ in range(n):
            if self._free_ids:
                block = self._free_ids.pop()
            else:
                block, self._next_id = self._next_id, self._next_id + 1
            self.blocks[block] = self._new()
            ids.append(block)
        return ids

    def give(self, ids: list[int]) -> None:
        for block in ids:
            del self.blocks[block]
            self._free_ids.append(block)


@dataclass
class _Step:
    rows: list[int]
    positions: Tensor  # (R, T) position of every new token
    starts: list[int]  # each row's length before the pass
    ring_slots: Tensor  # (R, T) the sliding layers' ring slot of every new token
    ring_start: int | None  # the ring slot of the rows' common start, if they share one
    full_len: int  # full layers attend over positions [0, full_len)
    full: Visibility  # the queries' positions; key s at position s
    sliding: Visibility  # the positions of the ring's keys (R, ring), then the new ones for T > 1
    tables: Tensor | None = None  # (full layers, 2, R, blocks) block addresses, built for decode_view


@dataclass(frozen=True)
class DecodeView:
    """Where a one-token pass's layer reads and writes, for a kernel that does both (`ops.decode`):
    each row's blocks of `block_size` positions as byte addresses (R, blocks) int64 of keys and of
    values, each block (KVH, block_size, D); the position (R,) int64 each row's new token goes to;
    how many positions the queries attend over; and which of them each query sees."""

    keys: Tensor
    values: Tensor
    block_size: int
    kv_heads: int
    slots: Tensor
    attended: int
    visible: Visibility


class KVCache:
    """Keys and values of `batch_size` sequences of up to `capacity` tokens each, full layers in
    blocks within `budget_bytes` (None: no limit)."""

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        capacity: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        block_size: int = DEFAULT_BLOCK_SIZE,
        budget_bytes: int | None = None,
    ) -> None:
        if not 0 < capacity <= config.max_position_embeddings:
            raise ValueError(
                f"cache capacity must lie in 1..{config.max_position_embeddings} (the model's context), "
                f"got {capacity}"
            )
        if block_size < 1:
            raise ValueError(f"the KV block size must be at least 1 token, got {block_size}")
        self.capacity = capacity
        self.block_size = block_size
        self.window = config.sliding_window
        # A window longer than the capacity never wraps, so the ring need not exceed the capacity.
        self.ring = min(config.sliding_window, capacity)
        self.sliding = [t == SLIDING for t in config.layer_types]
        self.full_index = {layer: i for i, layer in enumerate(n for n, s in enumerate(self.sliding) if not s)}
        heads, dim = config.num_key_value_heads, config.head_dim
        self.kv_heads = heads
        shape = (len(self.full_index), 2, heads, block_size, dim)
        block_bytes = torch.finfo(dtype).bits // 8 * torch.Size(shape).numel()
        # (A model of sliding layers only takes no blocks, whatever the budget.)
        max_blocks = None if budget_bytes is None or not block_bytes else budget_bytes // block_bytes
        if max_blocks is not None and max_blocks < 1:
            raise CacheFullError(
                f"a KV-cache budget of {budget_bytes} bytes holds no block of {block_bytes} bytes "
                f"({block_size} tokens); give it more memory"
            )
        self.pool = BlockPool(shape, dtype, device, max_blocks)
        # Zeros, not empty: see BlockPool._new.
        self.rings = {
            layer: (
                torch.zeros(batch_size, heads, self.ring, dim, dtype=dtype, device=device),
                torch.zeros(batch_size, heads, self.ring, dim, dtype=dtype, device=device),
            )
            for layer, s in enumerate(self.sliding)
            if s
        }
        # Each row's ring as a one-block table for `DecodeView`: (batch, 1) byte addresses.
        row_bytes = heads * self.ring * dim * (torch.finfo(dtype).bits // 8)
        rows = torch.arange(batch_size, dtype=torch.int64)[:, None] * row_bytes
        self._ring_tables = {
            layer: (rows + k.data_ptr(), rows + v.data_ptr()) for layer, (k, v) in self.rings.items()
        }
        # Byte offset of layer j's keys (j, 0) and values (j, 1) in a block.
        element = torch.finfo(dtype).bits // 8
        self._offsets = torch.tensor(
            [[(2 * j + kv) * heads * block_size * dim * element for kv in (0, 1)] for j in range(shape[0])],
            dtype=torch.int64,
        )
        self.tables: list[list[int]] = [[] for _ in range(batch_size)]  # each row's block ids
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
        return self.pool.dtype

    @property
    def nbytes(self) -> int:
        """Memory held now: the rings and the blocks in use."""
        rings = sum(t.numel() * t.element_size() for pair in self.rings.values() for t in pair)
        return rings + self.pool.used * self.pool.block_bytes

    def blocks_for(self, tokens: int) -> int:
        """Blocks a sequence of `tokens` tokens holds."""
        return -(-tokens // self.block_size) if self.full_index else 0

    def can_take(self, blocks: int) -> bool:
        """Whether the budget allows `blocks` more blocks now."""
        free = self.pool.free
        return free is None or blocks <= free

    # ------------------------------------------------------------------ one forward pass
    def begin(self, rows: slice, num_tokens: int) -> Tensor:
        """Start a forward pass of `num_tokens` new tokens for each row in `rows`.

        Returns their positions (R, T), which the model needs for rotary embeddings. Which keys a
        query sees is described here once per pass, from positions ((R, T) and a sliding layer's
        (R, ring + T)), and shared by every layer of the same kind: no (T, S) object, only
        PyTorch's attention builds its mask from them when it runs. Raises
        `CacheFullError` (and changes nothing) when the rows need more blocks than the budget has.
        """
        first, stop, stride = rows.indices(self.batch_size)
        if stride != 1:
            raise ValueError(f"a pass takes consecutive rows, got {rows}")
        indices = list(range(first, stop))
        if self.broken.intersection(indices):
            raise RuntimeError("a row of this pass was left by an interrupted forward pass; clear it first")
        if not indices:
            raise ValueError(f"rows {rows} select no sequence of a cache of {self.batch_size}")
        starts = [self.lengths[i] for i in indices]
        if max(starts) + num_tokens > self.capacity:
            raise ContextFullError(
                f"a sequence of {max(starts)} tokens cannot take {num_tokens} more: the cache holds "
                f"{self.capacity} tokens per sequence"
            )
        needed = [
            max(self.blocks_for(s + num_tokens) - len(self.tables[i]), 0)
            for i, s in zip(indices, starts, strict=True)
        ]
        new = self.pool.take(sum(needed))
        for i, n in zip(indices, needed, strict=True):
            self.tables[i] += new[:n]
            new = new[n:]
        device = self.pool.device
        start = torch.tensor(starts, device=device)[:, None]  # (R, 1)
        positions = start + torch.arange(num_tokens, device=device)  # (R, T)
        full_len = max(starts) + num_tokens

        # Sliding layers attend over the ring as it was before this pass, then the new tokens:
        # a chunk longer than the window would otherwise overwrite keys its first tokens need. One
        # token (decode) is written first and the ring alone attended over, without a copy: its
        # slot held the one position that has just left the window.
        slot = torch.arange(self.ring, device=device)
        newest = start - 1 + (num_tokens == 1)  # the latest position in the ring the pass reads
        ring_positions = slot + self.ring * torch.div(newest - slot, self.ring, rounding_mode="floor")
        if num_tokens > 1:
            ring_positions = torch.cat([ring_positions, positions], dim=1)  # (R, ring [+ T])

        ring_start = starts[0] % self.ring if len(set(starts)) == 1 else None
        self._step = _Step(
            indices,
            positions,
            starts,
            positions % self.ring,
            ring_start,
            full_len,
            Visibility(positions),
            Visibility(positions, ring_positions, self.window),
        )
        return positions

    def update(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Visibility]:
        """Store new keys/values (R, KVH, T, D); return what layer `layer_idx` attends over."""
        step = self._step
        if step is None:
            raise RuntimeError("KVCache.update called outside begin()/end()")
        if not self.sliding[layer_idx]:
            j = self.full_index[layer_idx]
            self._write_blocks(j, step, k, v)
            return (*self._gather(j, step), step.full)
        ring_k, ring_v = self.rings[layer_idx]
        cached_k, cached_v = _rows_of(ring_k, step.rows), _rows_of(ring_v, step.rows)
        T = k.shape[2]
        if T == 1:
            _write(cached_k, step.ring_slots, step.ring_start, k)
            _write(cached_v, step.ring_slots, step.ring_start, v)
            return cached_k, cached_v, step.sliding
        keys = torch.cat([cached_k, k], dim=2)  # (R, KVH, ring + T, D)
        values = torch.cat([cached_v, v], dim=2)
        last = min(T, self.ring)  # only the newest `ring` tokens stay
        slots = step.ring_slots[:, -last:]
        _write(cached_k, slots, None, k[:, :, -last:])
        _write(cached_v, slots, None, v[:, :, -last:])
        return keys, values, step.sliding

    def _write_blocks(self, j: int, step: _Step, k: Tensor, v: Tensor) -> None:
        """Full layer j's new keys and values (R, KVH, T, D) into each row's blocks."""
        T, bs, blocks = k.shape[2], self.block_size, self.pool.blocks
        for r, (row, start) in enumerate(zip(step.rows, step.starts, strict=True)):
            table, t = self.tables[row], 0
            while t < T:
                b, o = divmod(start + t, bs)
                n = min(bs - o, T - t)
                block = blocks[table[b]]
                block[j, 0, :, o : o + n] = k[r, :, t : t + n]
                block[j, 1, :, o : o + n] = v[r, :, t : t + n]
                t += n

    def _gather(self, j: int, step: _Step) -> tuple[Tensor, Tensor]:
        """Full layer j's keys and values (R, KVH, full_len, D) of the pass's rows, copied out of
        their blocks (positions a row does not hold are zeros, and seen by none of its queries)."""
        n = self.blocks_for(step.full_len)
        blocks = self.pool.blocks
        _, _, heads, bs, dim = self.pool.shape
        out = torch.zeros(len(step.rows), 2, heads, n * bs, dim, dtype=self.dtype, device=self.pool.device)
        for r, row in enumerate(step.rows):
            table = self.tables[row][:n]
            stacked = torch.stack([blocks[b][j] for b in table], dim=2)  # (2, KVH, blocks, bs, D)
            out[r, :, :, : len(table) * bs] = stacked.flatten(2, 3)
        return out[:, 0, :, : step.full_len], out[:, 1, :, : step.full_len]

    def decode_view(self, layer_idx: int) -> DecodeView | None:
        """Layer `layer_idx`'s `DecodeView` during a one-token pass (the same writes and reads as
        `update`), for a kernel that takes the new token's keys and values itself; else None."""
        step = self._step
        if step is None or step.positions.shape[1] != 1:
            return None
        if self.sliding[layer_idx]:
            k, v = self._ring_tables[layer_idx]
            rows = slice(step.rows[0], step.rows[-1] + 1)
            return DecodeView(
                k[rows], v[rows], self.ring, self.kv_heads, step.ring_slots, self.ring, step.sliding
            )
        return self._full_view(step, layer_idx)

    def prompt_view(self, layer_idx: int) -> DecodeView | None:
        """During a pass of several tokens, full layer `layer_idx`'s blocks as a `DecodeView`
        (positions (R, T), keys at their own positions), for a kernel that attends over them where
        they lie once `store` has written the pass's keys and values; None for a sliding layer (its
        chunk attends over the ring as it was and the new keys, a copy `update` makes)."""
        step = self._step
        if step is None or self.sliding[layer_idx]:
            return None
        return self._full_view(step, layer_idx)

    def _full_view(self, step: _Step, layer_idx: int) -> DecodeView:
        if step.tables is None:
            width = self.blocks_for(step.full_len)
            pad, blocks = self.pool.pad.data_ptr(), self.pool.blocks
            addresses = [
                [blocks[b].data_ptr() for b in self.tables[row][:width]]
                + [pad] * (width - len(self.tables[row]))
                for row in step.rows
            ]
            base = torch.tensor(addresses, dtype=torch.int64)  # (R, blocks)
            step.tables = base + self._offsets[:, :, None, None]
        j = self.full_index[layer_idx]
        return DecodeView(
            step.tables[j, 0],
            step.tables[j, 1],
            self.block_size,
            self.kv_heads,
            step.positions,
            step.full_len,
            step.full,
        )

    def store(self, layer_idx: int, k: Tensor, v: Tensor) -> None:
        """Write a pass's new keys and values (R, KVH, T, D) of layer `layer_idx` where its
        `decode_view` (one token) or `prompt_view` (a full layer) says, for a kernel that then reads
        them there (`update` without the gather)."""
        step = self._step
        if step is None or (step.positions.shape[1] != 1 and self.sliding[layer_idx]):
            raise RuntimeError(
                "KVCache.store takes a full layer's keys, or a one-token pass's, inside begin()/end()"
            )
        if not self.sliding[layer_idx]:
            self._write_blocks(self.full_index[layer_idx], step, k, v)
            return
        ring_k, ring_v = self.rings[layer_idx]
        _write(_rows_of(ring_k, step.rows), step.ring_slots, step.ring_start, k)
        _write(_rows_of(ring_v, step.rows), step.ring_slots, step.ring_start, v)

    def end(self) -> None:
        """Finish the pass: the rows now hold their new tokens."""
        if self._step is None:
            raise RuntimeError("KVCache.end called without begin()")
        added = self._step.positions.shape[1]
        for i in self._step.rows:
            self.lengths[i] += added
        self._step = None

    def abort(self) -> None:
        """A pass failed half way: some layers' rings already hold its tokens, so its rows are
        unusable until cleared (full-layer positions past `lengths` would be harmless). Other
        rows are untouched."""
        if self._step is not None:
            self.broken.update(self._step.rows)
        self._step = None

    # ------------------------------------------------------------------ rows
    def clear_row(self, row: int) -> None:
        """Forget the sequence of `row`: its blocks go back to the pool (stale ring slots lie at
        positions its queries do not see until they are overwritten)."""
        self.truncate(row, 0)
        self.broken.discard(row)

    def truncate(self, row: int, length: int) -> None:
        """Keep the first `length` tokens of `row` (its full layers; the caller restores the rings
        of that point, see `read_rings`), giving back the blocks past them."""
        keep = self.blocks_for(length)
        self.pool.give(self.tables[row][keep:])
        del self.tables[row][keep:]
        self.lengths[row] = length

    def move_row(self, src: int, dst: int) -> None:
        """Move the sequence of row `src` into empty row `dst` (the blocks change hands, not memory)."""
        if self.lengths[dst] or self.tables[dst]:
            raise RuntimeError(f"row {dst} still holds a sequence; clear it first")
        self.tables[dst], self.tables[src] = self.tables[src], []
        for k, v in self.rings.values():
            k[dst], v[dst] = k[src], v[src]
        self.lengths[dst], self.lengths[src] = self.lengths[src], 0
        if src in self.broken:
            self.broken.add(dst)
        self.broken.discard(src)

    def swap_rows(self, a: int, b: int) -> None:
        """Exchange the sequences of rows `a` and `b`."""
        self.tables[a], self.tables[b] = self.tables[b], self.tables[a]
        for pair in self.rings.values():
            for t in pair:
                held = t[a].clone()
                t[a] = t[b]
                t[b] = held
        self.lengths[a], self.lengths[b] = self.lengths[b], self.lengths[a]
        broken_a, broken_b = a in self.broken, b in self.broken
        self.broken -= {a, b}
        self.broken |= {r for r, was in ((a, broken_b), (b, broken_a)) if was}

    def reset(self) -> None:
        """Forget every sequence: every block goes back to the pool."""
        for row in range(self.batch_size):
            self.truncate(row, 0)
        self.broken.clear()
        self._step = None

    # ------------------------------------------------------------------ a row's state (snapshots)
    def read_full(self, row: int, start: int, stop: int) -> Tensor:
        """Full layers' keys and values of `row` at positions [start, stop): a copy
        (full layers, 2, KVH, stop - start, D)."""
        bs, blocks, table = self.block_size, self.pool.blocks, self.tables[row]
        parts = []
        for b in range(start // bs, self.blocks_for(stop)):
            lo, hi = max(start - b * bs, 0), min(stop - b * bs, bs)
            parts.append(blocks[table[b]][:, :, :, lo:hi])
        if not parts:
            _, two, heads, _, dim = self.pool.shape
            return torch.empty(len(self.full_index), two, heads, 0, dim, dtype=self.dtype)
        return torch.cat(parts, dim=3)

    def reserve(self, row: int, length: int) -> None:
        """Take the blocks `row` lacks to hold `length` tokens (`CacheFullError` if the budget has
        none: nothing is taken then)."""
        missing = self.blocks_for(length) - len(self.tables[row])
        if missing > 0:
            self.tables[row] += self.pool.take(missing)

    def room(self, row: int) -> int:
        """How many more tokens `row` can hold now: its capacity, and the blocks the budget allows."""
        free = self.pool.free
        by_capacity = self.capacity - self.lengths[row]
        if free is None or not self.full_index:
            return by_capacity
        held = len(self.tables[row]) * self.block_size - self.lengths[row]
        return min(by_capacity, held + free * self.block_size)

    def write_layer(self, layer_idx: int, row: int, start: int, k: Tensor, v: Tensor) -> None:
        """Full layer `layer_idx`'s keys and values (KVH, n, D) at positions [start, start + n) of
        `row`, whose blocks must be reserved."""
        j, bs, blocks, table = self.full_index[layer_idx], self.block_size, self.pool.blocks, self.tables[row]
        for b in range(start // bs, self.blocks_for(start + k.shape[1])):
            lo, hi = max(start - b * bs, 0), min(start + k.shape[1] - b * bs, bs)
            blocks[table[b]][j, 0, :, lo:hi] = k[:, b * bs + lo - start : b * bs + hi - start]
            blocks[table[b]][j, 1, :, lo:hi] = v[:, b * bs + lo - start : b * bs + hi - start]

    def read_layer(self, layer_idx: int, row: int, stop: int) -> tuple[Tensor, Tensor]:
        """Full layer `layer_idx`'s keys and values (KVH, stop, D) of `row`'s first `stop` positions."""
        j, blocks = self.full_index[layer_idx], self.pool.blocks
        kv = torch.cat([blocks[b][j] for b in self.tables[row][: self.blocks_for(stop)]], dim=2)
        return kv[0, :, :stop], kv[1, :, :stop]

    def write_full(self, row: int, start: int, kv: Tensor) -> None:
        """Put full layers' keys and values kv (full layers, 2, KVH, n, D) at positions
        [start, start + n) of `row`, taking the blocks it lacks (`CacheFullError` if the budget
        has none: nothing is written then)."""
        stop, bs = start + kv.shape[3], self.block_size
        self.reserve(row, stop)
        blocks, table = self.pool.blocks, self.tables[row]
        for b in range(start // bs, self.blocks_for(stop)):
            lo, hi = max(start - b * bs, 0), min(stop - b * bs, bs)
            blocks[table[b]][:, :, :, lo:hi] = kv[:, :, :, b * bs + lo - start : b * bs + hi - start]

    def read_rings(self, row: int) -> Tensor:
        """The sliding layers' rings of `row`: a copy (sliding layers, 2, KVH, ring, D)."""
        if not self.rings:
            return torch.empty(0)
        return torch.stack([torch.stack([k[row], v[row]]) for k, v in self.rings.values()])

    def write_rings(self, row: int, rings: Tensor) -> None:
        """Restore rings that `read_rings` returned."""
        for j, (k, v) in enumerate(self.rings.values()):
            k[row] = rings[j, 0]
            v[row] = rings[j, 1]


def _rows_of(t: Tensor, rows: list[int]) -> Tensor:
    """The view t[rows] of consecutive rows."""
    return t[rows[0] : rows[-1] + 1]


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


# The default budget: a share of the memory available once the model is in place, leaving the rest
# to the prefix cache (a quarter of it), activations and whatever else runs on the machine.
DEFAULT_SHARE = 0.5


def available_bytes(device: torch.device | str) -> int:
    """Memory that `device` can still give: free GPU memory, or the system's available memory
    (free plus reclaimable page cache) on a CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def default_budget_bytes(device: torch.device | str) -> int:
    """The KV cache's default budget: half of what `device` has available now (call it after loading)."""
    return int(available_bytes(device) * DEFAULT_SHARE)
