"""Prefill and decode at long contexts beside the machine's compute and bandwidth rooflines.

    python benchmarks/long_context.py --model PATH --lengths 128 1024       # one process, alternating
    python benchmarks/long_context.py --model PATH --lengths 128 8192 --json runs.json   # appends

One process loads the model (`load_model`, `prepare_for_inference`) and, for each round, prefills a
random prompt of every length in turn (short and long alternate, so a drift of the shared machine
hits both) and decodes `--new-tokens` greedy tokens after it through `generate_stream`, the public
path. Beside them, in the same process:

- the compute roofline: PyTorch's bf16 GEMM (`F.linear`) on the model's shapes (q, k, v, o, the
  experts' gate_up and down as dense bf16 matrices) with `--gemm-rows` activation rows, best of
  several, measured before the first prompt and after the last; a prompt of L tokens needs
  `prefill_flops(L)` (every position's projections and experts, its attention over the positions
  before it, the output head once), so the roofline is the faster GEMM rate over that;
- the bandwidth roofline of decoding after L tokens: the read rate of the model's own expert bytes
  (`decode.resident_bandwidth`) over the bytes one decoded token reads (weights, and the KV cache
  of its context), measured before and after every generation.

`--ab OTHER.so` loads another build of the native module (benchmarks/ab_native.py) and lets it take
turns with this tree's, prompt by prompt (each first in every other round), so that two builds
are compared in one process, on one machine phase. `--profile` times every kind of operation of
each prefill (the `gptoss.ops` calls, wrapped) and prints where its time went.

`--json FILE` appends this run to FILE (a list of runs), so that a long benchmark can be split into
several short processes and read together: `--table FILE` prints every run in FILE.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from decode import _machine, _prompts, _rss_gib, decode_bytes_per_token, resident_bandwidth
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from gptoss import ModelConfig, ops


def prefill_flops(config: ModelConfig, length: int) -> int:
    """FLOPs of prefilling `length` tokens from an empty cache: `flops_per_token` of every position
    over the positions up to it, less the output head of all but the last (prefill needs one
    token's logits)."""
    head = 2 * config.embedding_rows * config.hidden_size
    return sum(config.flops_per_token(p) for p in range(1, length + 1)) - (length - 1) * head


def gemm_shapes(config: ModelConfig) -> list[tuple[int, int, int]]:
    """(out, in, uses per token) of one layer's products: q, k, v, o and each routed expert's."""
    h, i = config.hidden_size, config.intermediate_size
    experts = config.experts_per_token
    return [
        (config.q_dim, h, 1), (config.kv_dim, h, 2), (h, config.q_dim, 1),
        (2 * i, h, experts), (h, i, experts),
    ]  # fmt: skip


def gemm_rate(config: ModelConfig, rows: int, repeats: int = 5) -> float:
    """FLOP/s of PyTorch's bf16 GEMM over one layer's products for `rows` tokens (each shape's best
    of `repeats`, weighted by how often a token uses it)."""
    gen = torch.Generator().manual_seed(0)
    flops, seconds = 0.0, 0.0
    for out, inp, uses in gemm_shapes(config):
        x = torch.randn(rows, inp, generator=gen).to(torch.bfloat16)
        w = (torch.randn(out, inp, generator=gen) * 0.02).to(torch.bfloat16)
        F.linear(x, w)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            F.linear(x, w)
            best = min(best, time.perf_counter() - start)
        flops += uses * 2 * rows * out * inp
        seconds += uses * best
    return flops / seconds


class OpTimer:
    """Seconds and FLOPs per kind of operation, from the `gptoss.ops` calls a forward pass makes
    (wrapped while `with` lasts): q/k/v projections (`linears`), the o projection, router and head
    (`linear`, told apart by their output width), attention, experts, norms, rotary and the cache's
    `update` (where a prefill chunk's keys are stored and gathered)."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.seconds: dict[str, float] = {}
        self.flops: dict[str, float] = {}
        self._saved: list[tuple[Any, str, Any]] = []
        self._depth = 0

    def _linear_kind(self, out: int) -> str:
        c = self.config
        return {c.hidden_size: "o_proj", c.num_local_experts: "router"}.get(out, "head")

    def _flops(self, name: str, args: tuple) -> tuple[str, float]:
        c = self.config
        if name == "linears":
            rows = args[0].numel() // args[0].shape[-1]
            return "qkv_proj", sum(2.0 * rows * w.shape[0] * w.shape[1] for w, _, _ in args[1])
        if name == "linear":
            rows, w = args[0].numel() // args[0].shape[-1], args[1]
            return self._linear_kind(w.shape[0]), 2.0 * rows * w.shape[0] * w.shape[1]
        if name in ("sink_attention", "paged_attention"):  # (paged: a full layer's chunk over its blocks)
            q = args[0]
            visible, keys = (
                (args[3], args[1].shape[2])
                if name == "sink_attention"
                else (args[1].visible, args[1].attended)
            )
            pairs = visible.mask(keys).expand(q.shape[0], 1, q.shape[2], keys).sum().item()
            return "attention", 4.0 * q.shape[1] * q.shape[3] * pairs
        if name == "mxfp4_moe":
            tokens = args[1].numel()
            return "experts", 2.0 * tokens * 3 * c.hidden_size * c.intermediate_size
        return name, 0.0

    def _wrap(self, owner: Any, name: str) -> None:
        fn = getattr(owner, name)
        self._saved.append((owner, name, fn))

        def timed(*args: Any, **kwargs: Any) -> Any:
            if self._depth:  # inside another timed call (`linears` falls back to `linear`)
                return fn(*args, **kwargs)
            self._depth += 1
            start = time.perf_counter()
            try:
                result = fn(*args, **kwargs)
            finally:
                self._depth -= 1
            seconds = time.perf_counter() - start
            kind, flops = self._flops(name, args[1:] if name == "update" else args)
            self.seconds[kind] = self.seconds.get(kind, 0.0) + seconds
            self.flops[kind] = self.flops.get(kind, 0.0) + flops
            return result

        setattr(owner, name, timed)

    def __enter__(self) -> OpTimer:
        from gptoss.inference.cache import KVCache

        for name in ("linears", "linear", "sink_attention", "mxfp4_moe", "rms_norm", "rotary_"):
            self._wrap(ops, name)
        self._wrap(ops.decode, "paged_attention")
        self._wrap(KVCache, "update")
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, name, fn in reversed(self._saved):
            setattr(owner, name, fn)


def run(args: argparse.Namespace, console: Console, save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """The measurements; `save(report)` after every prompt (a run cut short keeps what it did)."""
    from gptoss import load_model
    from gptoss.inference import SamplingParams, generate_stream
    from gptoss.inference.optimize import prepare_for_inference

    if args.threads:
        ops.set_num_threads(args.threads)
    start = time.perf_counter()
    model = prepare_for_inference(load_model(args.model, dtype=torch.bfloat16))
    config = model.config
    report: dict[str, Any] = {
        "machine": _machine(),
        "model": str(args.model),
        "threads": torch.get_num_threads(),
        "isa": ops._native.isa() if ops.native_available() else None,
        "load_s": time.perf_counter() - start,
        "lengths": args.lengths,
        "new_tokens": args.new_tokens,
    }
    for _ in generate_stream(model, _prompts(config, 1, 8), SamplingParams(max_tokens=4, temperature=0)):
        pass  # first calls allocate and warm caches
    report["gemm_before_gflop_s"] = gemm_rate(config, args.gemm_rows) / 1e9
    console.print(
        f"bf16 GEMM, model shapes, {args.gemm_rows} rows: {report['gemm_before_gflop_s']:.0f} GFLOP/s"
    )
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, stop_token_ids=[])
    generations = []
    bandwidth = resident_bandwidth(model)
    builds = {"this": ops._native}
    if args.ab:
        from ab_native import load_build

        builds["other"] = load_build(args.ab, "other")
    steps = [
        (r, length, build)
        for r in range(args.rounds)
        for length in args.lengths
        for build in (list(builds) if r % 2 == 0 else list(builds)[::-1])
    ]
    for r, length, build in tqdm(steps, desc="prompts", unit="prompt"):
        ops._native = ops.decode._native = builds[build]
        prompt = _prompts(config, 1, length)[0]
        timer = OpTimer(config) if args.profile else contextlib.nullcontext()
        start = time.perf_counter()
        with timer:  # (prefill only: the first token comes out of it)
            stream = generate_stream(model, [prompt], params)
            times = [time.perf_counter()]
            next(stream)
            times[0] = time.perf_counter()
        times += [time.perf_counter() for _ in stream]
        after = resident_bandwidth(model)
        read = max(bandwidth, after)
        generations.append({
            "round": r,
            "length": length,
            "build": build,
            "prefill_s": times[0] - start,
            "prefill_tok_s": length / (times[0] - start),
            "decode_tok_s": (len(times) - 1) / (times[-1] - times[0]),
            "bandwidth_gb_s": read / 1e9,
            "decode_roofline_tok_s": read / decode_bytes_per_token(config, length + args.new_tokens),
            "prefill_gflop": prefill_flops(config, length) / 1e9,
        })  # fmt: skip
        if args.profile:
            generations[-1]["ops"] = {
                k: {"s": timer.seconds[k], "flops": timer.flops[k]} for k in timer.seconds
            }
        bandwidth = after
        report["generations"] = generations
        save(report)
    ops._native = ops.decode._native = builds["this"]
    report["gemm_after_gflop_s"] = gemm_rate(config, args.gemm_rows) / 1e9
    report["generations"] = generations
    report["peak_rss_gib"] = _rss_gib("VmHWM")
    return report


def print_table(console: Console, runs: list[dict[str, Any]]) -> None:
    table = Table(title="long context: prefill and decode beside the rooflines (batch 1, greedy)")
    for column in (
        "run", "build", "prompt", "prefill tok/s", "GEMM GFLOP/s (before, after)", "prefill roofline tok/s",
        "of roofline", "decode tok/s", "decode / after shortest", "GB/s", "decode roofline", "of roofline",
    ):  # fmt: skip
        table.add_column(column, justify="right")
    for i, report in enumerate(runs):
        gens = report["generations"]
        # a run cut short has no GEMM rate after it
        gemm = max(report["gemm_before_gflop_s"], report.get("gemm_after_gflop_s", 0.0))
        for j, g in enumerate(gens):
            # decode after this prompt over decode after the nearest shortest prompt of its build
            build = g.get("build", "this")
            short = [
                k
                for k, h in enumerate(gens)
                if h["length"] == min(report["lengths"]) and h.get("build", "this") == build
            ]
            near = gens[min(short, key=lambda k: abs(k - j))]["decode_tok_s"]
            roofline = g["length"] / (g["prefill_gflop"] / gemm)
            table.add_row(
                f"{i}.{g['round']}", g.get("build", "this"), f"{g['length']:,}", f"{g['prefill_tok_s']:.1f}",
                f"{report['gemm_before_gflop_s']:.0f}, {report.get('gemm_after_gflop_s', 0):.0f}",
                f"{roofline:.0f}", f"{g['prefill_tok_s'] / roofline:.0%}",
                f"{g['decode_tok_s']:.2f}", f"{g['decode_tok_s'] / near:.0%}",
                f"{g['bandwidth_gb_s']:.1f}", f"{g['decode_roofline_tok_s']:.2f}",
                f"{g['decode_tok_s'] / bound:.0%}" if (bound := g["decode_roofline_tok_s"]) else "-",
            )  # fmt: skip
    console.print(table)
    for i, report in enumerate(runs):
        for g in report["generations"]:
            if "ops" not in g:
                continue
            build = g.get("build", "this")
            ops_table = Table(
                title=f"run {i}.{g['round']} ({build}): prefill of {g['length']:,} tokens by operation"
            )
            for column in ("operation", "s", "share", "GFLOP/s"):
                ops_table.add_column(column, justify="right")
            rows = sorted(g["ops"].items(), key=lambda kv: -kv[1]["s"])
            other = g["prefill_s"] - sum(op["s"] for _, op in rows)
            for name, op in [*rows, ("(between: Python, PyTorch)", {"s": other, "flops": 0})]:
                rate = f"{op['flops'] / op['s'] / 1e9:.0f}" if op["flops"] and op["s"] > 0 else ""
                ops_table.add_row(name, f"{op['s']:.2f}", f"{op['s'] / g['prefill_s']:.0%}", rate)
            console.print(ops_table)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="a checkpoint directory (e.g. a random 20b)")
    parser.add_argument("--lengths", nargs="+", type=int, default=[128, 1024, 8192])
    parser.add_argument("--rounds", type=int, default=1, help="times every length is run, in turn")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--gemm-rows", type=int, default=512, help="activation rows of the GEMM roofline")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--ab", type=Path, default=None,
        help="another build of the native module (_native*.so) taking turns with this tree's",
    )  # fmt: skip
    parser.add_argument(
        "--profile", action="store_true", help="time each kind of operation of every prefill (slower)"
    )
    parser.add_argument("--json", type=Path, default=None, help="append this run to FILE")
    parser.add_argument("--table", type=Path, default=None, help="print the runs of FILE and exit")
    args = parser.parse_args()
    console = Console(width=200)
    if args.table:
        print_table(console, json.loads(args.table.read_text()))
        return
    if args.model is None:
        parser.error("--model PATH is required (or --table FILE)")
    earlier = json.loads(args.json.read_text()) if args.json and args.json.exists() else []

    def save(report: dict[str, Any]) -> None:
        if args.json:
            args.json.write_text(json.dumps([*earlier, report], indent=2))

    report = run(args, console, save)
    save(report)
    if args.json:
        console.print(f"wrote {args.json}")
    print_table(console, [report])


if __name__ == "__main__":
    main()
