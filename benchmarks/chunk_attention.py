"""A prompt chunk's attention at a long context, several builds of the native module in one process
(this tree's first): builds whose attention reads positions, and builds from before issue 33 whose
attention reads the (T, S) byte mask the cache built per pass.

For each context length the builds take turns (going first in turn, round by round) on the same
20b-shaped full layer (64 query heads over 8 key/value heads of 64 dims, bf16, a paged cache in
blocks of 32): what the cache builds per pass for the kernels (the full and sliding layers' boolean
masks, as `KVCache.begin` made them, or the query positions and the sliding layers' key positions,
as it makes them now), then one full layer's paged attention of the chunk over the whole context.
A chunk's cost is that build plus 12 such layers (the 20b's full layers; its sliding ones attend
over 128 + T keys). Timed in CPU time (`time.process_time`) on one thread, so that a shared
machine's other work shows less. Before timing, every build runs cache-shaped cases (rows at
different starts, a wrapped ring, a decode step), and all outputs, these and the timed chunks',
must agree bit for bit with this tree's.

    python benchmarks/chunk_attention.py [OTHER.so ...] [--contexts 8192 32768] [--json F]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from ab_native import load_build, reads_masks  # (benchmarks/ is on sys.path when this script runs)
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from gptoss import ops
from gptoss.model import Visibility

HEADS, KV_HEADS, DIM, PAGE, WINDOW, FULL_LAYERS = 64, 8, 64, 32, 128, 12
BF16 = ops.DTYPE_CODES[torch.bfloat16]


class Paged:
    """Rows of keys and values in blocks (KVH, PAGE, D), and their (rows, blocks) address tables."""

    def __init__(self, rows: int, keys: int, g: torch.Generator) -> None:
        blocks = -(-keys // PAGE)
        self.k = torch.randn(rows, blocks, KV_HEADS, PAGE, DIM, generator=g).bfloat16()
        self.v = torch.randn(rows, blocks, KV_HEADS, PAGE, DIM, generator=g).bfloat16()
        step = KV_HEADS * PAGE * DIM * 2
        offsets = torch.arange(rows * blocks, dtype=torch.int64).view(rows, blocks) * step
        self.k_pages, self.v_pages = offsets + self.k.data_ptr(), offsets + self.v.data_ptr()
        self.keys, self.blocks = keys, blocks


def old_masks(starts: list[int], tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What `KVCache.begin` built before: the full layers' (R, 1, T, S) and the sliding layers'
    (R, 1, T, ring + T) masks."""
    start = torch.tensor(starts)[:, None]
    query = (start + torch.arange(tokens))[:, None, :, None]
    full = torch.arange(max(starts) + tokens) <= query
    key_positions = ring_positions(starts, tokens)[:, None, None, :]
    distance = query - key_positions
    return full, (key_positions >= 0) & (distance >= 0) & (distance < WINDOW)


def ring_positions(starts: list[int], tokens: int) -> torch.Tensor:
    """A sliding layer's key positions for a pass (R, ring [+ T]), as `KVCache.begin` makes them."""
    start = torch.tensor(starts)[:, None]
    slot = torch.arange(WINDOW)
    newest = start - 1 + (tokens == 1)
    ring = slot + WINDOW * torch.div(newest - slot, WINDOW, rounding_mode="floor")
    return ring if tokens == 1 else torch.cat([ring, start + torch.arange(tokens)], dim=1)


def new_positions(starts: list[int], tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What `KVCache.begin` builds now: the queries' positions (R, T) and the sliding layers' keys'."""
    return torch.tensor(starts)[:, None] + torch.arange(tokens), ring_positions(starts, tokens)


def attend(
    build, paged: Paged, q: torch.Tensor, sinks: torch.Tensor, sight: tuple, masks: bool
) -> torch.Tensor:
    """One paged attention call of `build`: sight = (mask,) if it reads masks, else (visibility,)."""
    R, H, T, D = q.shape
    out = torch.empty_like(q)
    head = (
        q.data_ptr(),
        BF16,
        R,
        H,
        T,
        D,
        paged.k_pages.data_ptr(),
        paged.v_pages.data_ptr(),
        paged.blocks,
        PAGE,
    )
    head += (BF16, KV_HEADS, paged.keys)
    if masks:
        (mask,) = sight
        build.paged_attention(*head, mask.data_ptr(), mask.shape[0], sinks.data_ptr(), out.data_ptr())
    else:
        (visible,) = sight
        queries, keys, window = ops.native_sight(visible, R, T, paged.keys)
        key_at = 0 if keys is None else keys.data_ptr()
        build.paged_attention(*head, queries.data_ptr(), key_at, window, sinks.data_ptr(), out.data_ptr())
    return out


def check_bits(builds: dict, g: torch.Generator) -> bool:
    """Every build on cache-shaped cases (full layers' chunks and decode steps over rows at different
    starts, a sliding layer's ring (empty, partly filled, wrapped) and chunk): the same bits."""
    sinks = torch.randn(HEADS, generator=g) * 2
    same = True
    for starts, tokens in [([0, 37, 300], 45), ([5, 130, 900], 1), ([700], 64), ([0, 1000], 17)]:
        q = torch.randn(len(starts), HEADS, tokens, DIM, generator=g).bfloat16()
        full_mask, sliding_mask = old_masks(starts, tokens)
        positions, ring = new_positions(starts, tokens)
        full = Paged(len(starts), max(starts) + tokens, g)
        sliding = Paged(len(starts), ring.shape[1], g)
        for paged, mask, visible in (
            (full, full_mask, Visibility(positions)),
            (sliding, sliding_mask, Visibility(positions, ring, WINDOW)),
        ):
            outs = [
                attend(build, paged, q, sinks, (mask,) if masks else (visible,), masks)
                for build, masks in builds.values()
            ]
            same &= all(torch.equal(outs[0], out) for out in outs)
    return bool(same)


def turn(
    build, masks: bool, paged: Paged, q: torch.Tensor, sinks: torch.Tensor
) -> tuple[float, float, torch.Tensor]:
    """One chunk of one build: CPU seconds of what the cache builds, of one full layer's attention;
    the attention's output. The chunk's queries are the context's last positions."""
    starts, T = [paged.keys - q.shape[2]], q.shape[2]
    start = time.process_time()
    if masks:
        sight: tuple = (old_masks(starts, T)[0],)
    else:
        sight = (Visibility(new_positions(starts, T)[0]),)
    built = time.process_time()
    out = attend(build, paged, q, sinks, sight, masks)
    return built - start, time.process_time() - built, out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "others",
        type=Path,
        nargs="*",
        help="other builds of the native module (_native*.so), named 1, 2, ...",
    )
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    builds = {"this": (ops._native, False)}  # name: (module, whether its attention reads masks)
    for i, path in enumerate(args.others, 1):
        build = load_build(path, str(i), masks=True)
        builds[str(i)] = (build, reads_masks(build))
        print(f"{i}: {path} ({'masks' if builds[str(i)][1] else 'positions'})")
    ops.set_num_threads(1)
    for build, _ in builds.values():
        build.num_threads(1)
    g = torch.Generator().manual_seed(0)
    same = check_bits(builds, g)
    print(f"bits equal on cache-shaped cases: {same}")
    sinks = torch.randn(HEADS, generator=g) * 2
    results = []
    for context in args.contexts:
        T, paged = args.chunk, Paged(1, context, g)
        q = torch.randn(1, HEADS, T, DIM, generator=g).bfloat16()
        times: dict[str, dict[str, list[float]]] = {n: {"build": [], "attention": []} for n in builds}
        outs = {}
        for r in tqdm(range(args.rounds), desc=f"{context} keys"):
            names = list(builds)
            for name in names[r % len(names) :] + names[: r % len(names)]:
                t_build, t_attn, outs[name] = turn(*builds[name], paged, q, sinks)
                times[name]["build"].append(t_build)
                times[name]["attention"].append(t_attn)
        same &= all(torch.equal(outs["this"], out) for out in outs.values())
        flops = 4.0 * HEADS * DIM * sum(min(s + 1, context) for s in range(context - T, context))
        for name, t in times.items():
            build, attention = statistics.median(t["build"]), statistics.median(t["attention"])
            results.append(
                {
                    "context": context, "build": name, "mask_or_positions_ms": 1e3 * build,
                    "attention_ms": 1e3 * attention, "attention_gflops": flops / attention / 1e9,
                    "chunk_ms": 1e3 * (build + FULL_LAYERS * attention),
                    "attention_range_ms": [1e3 * min(t["attention"]), 1e3 * max(t["attention"])],
                }
            )  # fmt: skip
    table = Table(title=f"a {args.chunk}-token chunk, one thread, CPU time, median of {args.rounds}")
    for column in ("context", "build", "mask / positions ms", "attention ms (range)", "GFLOP/s", "chunk ms"):
        table.add_column(column, justify="right")
    for r in results:
        low, high = r["attention_range_ms"]
        table.add_row(
            str(r["context"]), r["build"], f"{r['mask_or_positions_ms']:.2f}",
            f"{r['attention_ms']:.0f} ({low:.0f}-{high:.0f})", f"{r['attention_gflops']:.0f}",
            f"{r['chunk_ms']:.0f}",
        )  # fmt: skip
    Console().print(table)
    print(f"bits equal, cases and timed chunks: {same}")
    if args.json:
        args.json.write_text(json.dumps({"bits_equal": same, "results": results}, indent=2))


if __name__ == "__main__":
    main()
