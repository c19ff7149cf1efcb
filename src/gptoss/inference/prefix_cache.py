"""Prefix caching: a prompt that begins like an earlier sequence starts from that sequence's cache.

A cached state must be restored bit for bit, or a hit would change the logits. Full-attention
layers keep every position, so their keys and values for a prefix can be copied into any row. The
sliding layers keep only a ring of the last `window` positions, so their state at length `s` exists
only where a sequence stood at `s` between two forward passes: the cache snapshots the rings there
(the end of every prefill chunk and of every generation) and a hit restores the newest snapshot at
or before the shared prefix, never one beyond it. Restoring at a pass boundary of the run that made
the entry (and never at a position inside one of its chunks) is also what keeps the full layers
exact: a chunk's matmuls round differently for different chunk lengths, so keys computed inside a
longer chunk would differ in the last bits from those of a prefill cut at the hit.

Entries form a tree: each node is one sequence's own tokens and full-layer keys/values from the
point where it branched from its parent's snapshot (a hit copies the parent's data, so the shared
part is stored once and every restored row holds exactly what the entry's run held). A memory
budget evicts least-recently-used leaves; a node that a live sequence continues is pinned.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gptoss.inference.cache import KVCache, available_bytes


@dataclass(eq=False)
class Snapshot:
    rings: Tensor  # (sliding layers, 2, KVH, ring, D): every sliding layer's keys and values
    hidden: Tensor | None  # (H,) the last token's hidden state, where the run had it (prefill)

    @property
    def nbytes(self) -> int:
        return _nbytes(self.rings) + (0 if self.hidden is None else _nbytes(self.hidden))


@dataclass(eq=False)
class Node:
    """One sequence's tokens at positions [start, start + len(tokens)) and their full-layer keys
    and values; `start` is a snapshot of `parent` (0 and the root for a sequence with no hit)."""

    parent: Node | None
    start: int
    tokens: list[int] = field(default_factory=list)
    kv: Tensor | None = None  # (full layers, 2, KVH, len(tokens), D)
    snapshots: dict[int, Snapshot] = field(default_factory=dict)  # length → rings there
    children: list[Node] = field(default_factory=list)
    pins: int = 0
    used: int = 0  # LRU clock

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)

    @property
    def nbytes(self) -> int:
        kv = 0 if self.kv is None else _nbytes(self.kv)
        return kv + sum(s.nbytes for s in self.snapshots.values())


@dataclass(frozen=True)
class Hit:
    node: Node | None  # None: nothing cached for this prompt
    length: int  # tokens restored

    @property
    def hidden(self) -> Tensor | None:
        return None if self.node is None else self.node.snapshots[self.length].hidden


@dataclass
class PrefixCacheStats:
    hits: int = 0  # lookups that restored at least one token
    misses: int = 0
    hit_tokens: int = 0  # prompt tokens restored instead of prefilled
    evictions: int = 0  # entries dropped for the memory budget


class PrefixCache:
    """Cached prefixes of the sequences of one `KVCache` layout, within `budget_bytes` of memory."""

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes <= 0:
            raise ValueError(f"the prefix cache budget must be positive, got {budget_bytes} bytes")
        self.budget_bytes = budget_bytes
        self.root = Node(None, 0)
        # Kept as counts (not computed from the tree) so that another thread may read them safely.
        self.nbytes = 0
        self.entries = 0  # snapshots held: the points a prompt can resume from
        self.stats = PrefixCacheStats()
        self._clock = itertools.count(1)

    # ------------------------------------------------------------------ lookup and restore
    def lookup(self, prompt: Sequence[int]) -> Hit:
        """The newest snapshot whose tokens begin `prompt` (at most all of it; all of it only
        where the snapshot kept the last hidden state, which gives the first logits)."""
        prompt = list(prompt)
        best = Hit(None, 0)
        stack = list(self.root.children)
        while stack:
            node = stack.pop()
            if node.start >= len(prompt) or node.tokens[0] != prompt[node.start]:
                continue
            end = node.start + _common_length(node.tokens, prompt[node.start :])
            for s, snap in node.snapshots.items():
                usable = s < len(prompt) or snap.hidden is not None
                if best.length < s <= end and usable:
                    best = Hit(node, s)
            stack += [c for c in node.children if c.start <= end]
        if best.node is None:
            self.stats.misses += 1
        else:
            self.stats.hits += 1
            self.stats.hit_tokens += best.length
            now = next(self._clock)
            for node in _path(best.node):
                node.used = now
        return best

    def restore(self, hit: Hit, cache: KVCache, row: int) -> None:
        """Make cache row `row` hold exactly what the hit's sequence held at `hit.length`."""
        cache.clear_row(row)
        if hit.node is None:
            return
        upto = hit.length
        # From the hit's node back to the root's child: the first write takes every block the row
        # needs (or raises CacheFullError before writing anything).
        for node in _path(hit.node):
            cache.write_full(row, node.start, node.kv[:, :, :, : upto - node.start])
            upto = node.start
        cache.write_rings(row, hit.node.snapshots[hit.length].rings)
        cache.lengths[row] = hit.length
        cache.broken.discard(row)

    # ------------------------------------------------------------------ storing
    def extend(
        self,
        node: Node | None,
        parent: Node,
        start: int,
        tokens: Sequence[int],
        cache: KVCache,
        row: int,
        hidden: Tensor | None,
    ) -> Node | None:
        """Record that cache row `row` holds `tokens` (all of its positions, from 0) and snapshot
        its rings there. `node` is the row's own node from an earlier call (None the first time),
        `parent`/`start` the snapshot it was restored from. Returns the row's node (pinned), or
        None when the row holds nothing beyond `start`."""
        length = cache.lengths[row]
        if length <= start or (node is not None and length in node.snapshots):
            return node
        if node is None:
            node = Node(parent, start, pins=1)
            parent.children.append(node)
        else:
            self.nbytes -= node.nbytes
        new = slice(node.end, length)
        if new.start < new.stop:
            kv = cache.read_full(row, new.start, new.stop)
            node.kv = kv if node.kv is None else torch.cat([node.kv, kv], dim=3)
            node.tokens += tokens[new]
        rings = cache.read_rings(row)
        node.snapshots[length] = Snapshot(rings, None if hidden is None else hidden.clone())
        self.entries += 1
        node.used = next(self._clock)
        self.nbytes += node.nbytes
        self._evict()
        return node

    def pin(self, node: Node) -> None:
        node.pins += 1

    def unpin(self, node: Node) -> None:
        node.pins -= 1
        self._evict()

    def _evict(self) -> None:
        """Drop least-recently-used unpinned leaves until the entries fit the budget."""
        while self.nbytes > self.budget_bytes:
            leaves = [n for n in self._nodes() if not n.children and n.pins == 0]
            if not leaves:
                return  # what remains is in use; it goes when its sequences end
            victim = min(leaves, key=lambda n: n.used)
            victim.parent.children.remove(victim)
            self.nbytes -= victim.nbytes
            self.entries -= len(victim.snapshots)
            self.stats.evictions += 1

    def _nodes(self) -> list[Node]:
        out, stack = [], list(self.root.children)
        while stack:
            node = stack.pop()
            out.append(node)
            stack += node.children
        return out


# The default budget: a share of the memory available once the model is in place, capped so that
# a large machine does not hand most of its memory to old conversations.
DEFAULT_SHARE = 0.25
DEFAULT_CAP_BYTES = 8 * 2**30


def default_budget_bytes(device: torch.device | str) -> int:
    """A quarter of the memory available now on `device` (call it after loading), at most 8 GiB."""
    return int(min(available_bytes(device) * DEFAULT_SHARE, DEFAULT_CAP_BYTES))


def _path(node: Node) -> list[Node]:
    """`node` and its ancestors, the root excluded, newest first."""
    out = []
    while node.parent is not None:
        out.append(node)
        node = node.parent
    return out


def _common_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    # Compare in big slices first: a conversation's next prompt usually repeats the whole entry.
    lo, step = 0, 1024
    while lo < n:
        hi = min(lo + step, n)
        if a[lo:hi] == b[lo:hi]:
            lo = hi
            continue
        return lo + next(i for i, (x, y) in enumerate(zip(a[lo:hi], b[lo:hi], strict=True)) if x != y)
    return n


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()
