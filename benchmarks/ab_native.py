"""Two builds of the native kernels, interleaved in one process: which is faster on this machine.

A shared machine's read rate drifts by a third or more within minutes (docs/inference.md), more
than most kernel changes move a timing, so two builds timed one after the other, each in its own
process, compare the machine's phases rather than the code. This loads both builds' `_native`
modules into one process and lets them take turns, case by case, on the same weights (each going
first in every other round: a second run finds some of the first's memory in cache), then prints
the median and range of every case per build (and writes JSON with --json).

    git worktree add /tmp/before HEAD~1 && (cd /tmp/before && python setup.py build_ext --inplace)
    python benchmarks/ab_native.py /tmp/before/src/gptoss/ops/_native*.so src/gptoss/ops/_native*.so

Cases, the 20b shape, bf16 activations: the MoE call at one token (4 of 32 experts, batch-1
decode; GB/s of expert bytes), at a 128-token prompt (GFLOP/s), and `ops.linear` on bf16 q_proj
weights at 4 rows (a decode batch; GB/s) and 128 rows (a prompt; GFLOP/s). With --checkpoint, also
the prefill of a 128-token prompt through that model and the decode of 16 tokens after it at batch 1
(tok/s; e.g. the random 20b checkpoint that benchmarks/decode.py writes; --int8 for its int8
attention and head), and with --batch the engine's decode steps of that many sequences. The Python
around the kernels is this tree's for both builds; --threads 1 takes the second core (and whatever
else runs on it) out of the comparison, --cpu-time the preemptions by other work on the first.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from decode import SCALE_RANGE  # (benchmarks/ is on sys.path when this script runs)
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from gptoss import ops
from gptoss.model import Visibility
from gptoss.ops import decode

HIDDEN = INTER = 2880
EXPERTS, TOP_K = 32, 4
EXPERT_BYTES = (2 * INTER + HIDDEN) * (HIDDEN // 32) * 17  # MXFP4 blocks and scales of one expert


class _WithIsa:
    """A build from before `isa()` existed, answering it as `set_isa('best')` does."""

    def __init__(self, module: ModuleType) -> None:
        self._module, self._isa = module, module.set_isa("best")

    def isa(self) -> str:
        return self._isa

    def __getattr__(self, name: str) -> object:
        return getattr(self._module, name)


class _MasksFromPositions:
    """A build from before the attention read positions (issue 33), whose attention entry points take
    a (batch, 1, tokens, keys) byte mask: this tree's calls (query positions, key positions or 0,
    window) handed to it with the mask those positions give, built once per pass and kind of layer
    as the cache built it then (the last two, full and sliding, kept by content)."""

    def __init__(self, module: object) -> None:
        self._module = module
        self._masks: dict[tuple, torch.Tensor] = {}

    def __getattr__(self, name: str) -> object:
        return getattr(self._module, name)

    def _mask(self, batch: int, tokens: int, keys: int, q_pos: int, k_pos: int, window: int) -> torch.Tensor:
        def read(address: int, n: int) -> torch.Tensor:
            return torch.frombuffer((ctypes.c_int64 * n).from_address(address), dtype=torch.int64).clone()

        queries = read(q_pos, batch * tokens).view(batch, tokens)
        positions = read(k_pos, batch * keys).view(batch, keys) if k_pos else None
        key = (
            queries.numpy().tobytes(),
            None if positions is None else positions.numpy().tobytes(),
            window,
            keys,
        )
        if key not in self._masks:
            if len(self._masks) == 2:
                del self._masks[next(iter(self._masks))]
            visible = Visibility(queries, positions, None if window == ops.NO_WINDOW else window)
            self._masks[key] = visible.mask(keys).contiguous()
        return self._masks[key]

    def sink_attention(self, *args: object) -> None:
        *head, q_pos, k_pos, window, sinks, out = args
        batch, tokens, keys = head[2], head[4], head[10]
        mask = self._mask(batch, tokens, keys, q_pos, k_pos, window)
        self._module.sink_attention(*head, mask.data_ptr(), batch, sinks, out)

    def paged_attention(self, *args: object) -> None:
        *head, q_pos, k_pos, window, sinks, out = args
        batch, tokens, keys = head[2], head[4], head[12]
        mask = self._mask(batch, tokens, keys, q_pos, k_pos, window)
        self._module.paged_attention(*head, mask.data_ptr(), batch, sinks, out)

    def attention_step(self, *args: object) -> None:
        *head, q_pos, k_pos, window, rows, h, logits = args
        batch, keys = head[3], head[11]
        mask = self._mask(batch, 1, keys, q_pos, k_pos, window)
        self._module.attention_step(*head, mask.data_ptr(), batch, rows, h, logits)


def load_build(path: Path, label: str, masks: bool = False) -> object:
    """The extension at path as its own module. Under a name of its own: loaded as
    gptoss.ops._native, a build Python has already imported under that name comes back as the
    module loaded last, its functions replaced (CPython reuses single-phase extension modules).
    A build whose attention reads masks is given this tree's positions as masks (unless `masks`)."""
    spec = importlib.util.spec_from_file_location(f"ab_native_{label}._native", path)
    if spec is None or spec.loader is None:
        raise SystemExit(
            f"{path}: not a loadable extension module (build it: python setup.py build_ext --inplace)"
        )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    build = module if hasattr(module, "isa") else _WithIsa(module)
    return build if masks or not reads_masks(build) else _MasksFromPositions(build)


def reads_masks(build: object) -> bool:
    """Whether a build's attention reads a (T, S) mask (one from before issue 33), not positions."""
    return "positions" not in (build.sink_attention.__doc__ or "")


@dataclass
class Case:
    name: str
    unit: str  # "GB/s", "GFLOP/s" or "tok/s"
    amount: float  # bytes, FLOPs or tokens one call of `run` handles
    run: Callable[[], object]
    per: float = 1e9  # units of amount in one of `unit`'s
    timed: bool = False  # run returns its own seconds (what it does first is not part of the case)


def _expert_stack(gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    def mxfp4(out: int, inp: int) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = torch.randint(0, 256, (EXPERTS, out, inp // 32, 16), dtype=torch.uint8, generator=gen)
        scales = torch.randint(*SCALE_RANGE, (EXPERTS, out, inp // 32), dtype=torch.uint8, generator=gen)
        return blocks, scales

    gate_up, down = mxfp4(2 * INTER, HIDDEN), mxfp4(HIDDEN, INTER)
    zeros = (
        torch.zeros(EXPERTS, 2 * INTER, dtype=torch.bfloat16),
        torch.zeros(EXPERTS, HIDDEN, dtype=torch.bfloat16),
    )
    return (*gate_up, zeros[0], *down, zeros[1])


def cases(layers: int, gen: torch.Generator) -> list[Case]:
    stacks = [_expert_stack(gen) for _ in range(layers)]  # ~0.4 GB each: every call reads from DRAM
    weights = [
        torch.empty(4096, HIDDEN, dtype=torch.bfloat16).uniform_(-0.05, 0.05, generator=gen)
        for _ in range(24)
    ]

    def moe(tokens: int, routings: int) -> Callable[[], object]:
        """Every stack with each of `routings` random choices of experts (enough calls to time)."""
        x = torch.randn(tokens, HIDDEN, generator=gen).to(torch.bfloat16)
        choices = [
            torch.stack([torch.randperm(EXPERTS, generator=gen)[:TOP_K] for _ in range(tokens)])
            for _ in range(routings)
        ]
        weight = torch.full((tokens, TOP_K), 1 / TOP_K, dtype=torch.bfloat16)
        return lambda: [
            ops.mxfp4_moe(x, idx, weight, *stack, alpha=1.702, limit=7.0)
            for idx in choices
            for stack in stacks
        ]

    def dense(rows: int, passes: int) -> Callable[[], object]:
        x = torch.randn(rows, HIDDEN, generator=gen).to(torch.bfloat16)
        return lambda: [ops.linear(x, w) for _ in range(passes) for w in weights]

    return [
        Case("MoE, 1 token (decode)", "GB/s", 16 * layers * TOP_K * EXPERT_BYTES, moe(1, 16)),
        Case(
            "MoE, 128 tokens (prompt)", "GFLOP/s", layers * 128 * TOP_K * 2 * 3 * HIDDEN * INTER, moe(128, 1)
        ),
        Case("bf16 q_proj, 4 rows", "GB/s", 4 * 24 * 4096 * HIDDEN * 2, dense(4, 4)),
        Case("bf16 q_proj, 128 rows", "GFLOP/s", 24 * 2 * 128 * 4096 * HIDDEN, dense(128, 1)),
    ]


DECODE_TOKENS = 16
STEP_PROMPT, STEP_RUN = 64, 2


def model_cases(checkpoint: Path, int8: bool, batches: list[int]) -> list[Case]:
    """A 128-token prompt through the model at checkpoint, into a fresh cache each time; greedy
    decoding of DECODE_TOKENS tokens after it, timed from the first token to the last; and for each
    of `batches`, STEP_RUN engine steps of that many sequences (64-token prompts, prefilled once
    before the first round; the sequences grow by a token a step through the rounds)."""
    from gptoss import load_model
    from gptoss.inference import SamplingParams, generate_stream
    from gptoss.inference.cache import KVCache
    from gptoss.inference.engine import Engine, SequenceRequest
    from gptoss.inference.optimize import prepare_for_inference
    from gptoss.inference.runner import ModelRunner, forward_hidden

    model = prepare_for_inference(load_model(checkpoint), int8=int8)
    prompt = torch.arange(128)[None] % model.config.vocab_size
    params = SamplingParams(max_tokens=DECODE_TOKENS + 1, temperature=0, stop_token_ids=[])

    def prefill() -> object:
        cache = KVCache(model.config, 1, 256, dtype=torch.bfloat16)
        return model.lm_head(forward_hidden(model, cache, prompt, slice(0, 1))[:, -1])

    def decode() -> float:
        times = [time.perf_counter() for _ in generate_stream(model, prompt.tolist(), params)]
        return times[-1] - times[0]

    def steps(batch: int) -> Callable[[], object]:
        runner = ModelRunner(model, batch, STEP_PROMPT + STEP_RUN * 64)
        engine = Engine(runner, prefill_budget=batch * STEP_PROMPT, default_stop_ids=[])
        params = SamplingParams(max_tokens=STEP_RUN * 64, temperature=0, stop_token_ids=[])
        for b in range(batch):
            ids = [(977 * b + 31 * i) % 199_000 + 1 for i in range(STEP_PROMPT)]
            engine.add(SequenceRequest(runner.fit_prompt(ids)[:STEP_PROMPT], params, b))
        while len(engine.running) < batch:
            engine.step()
        return lambda: [engine.step() for _ in range(STEP_RUN)]

    kind = "int8" if int8 else "bf16"
    return [
        Case(f"prefill, 128 tokens (checkpoint, {kind})", "tok/s", 128, prefill, per=1),
        Case(f"decode, batch 1 (checkpoint, {kind})", "tok/s", DECODE_TOKENS, decode, per=1, timed=True),
    ] + [
        Case(f"decode steps, batch {b} (checkpoint, {kind})", "tok/s", b * STEP_RUN, steps(b), per=1)
        for b in batches
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("before", type=Path, help="the first build's _native*.so")
    parser.add_argument("after", type=Path, help="the second build's _native*.so")
    parser.add_argument(
        "--rounds", type=int, default=6, help="turns each build takes per case (even: each first as often)"
    )
    parser.add_argument(
        "--layers", type=int, default=3, help="MoE weight stacks cycled through (~0.4 GB each)"
    )
    parser.add_argument("--threads", type=int, default=None, help="threads (default: PyTorch's)")
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="also time a prompt's prefill and decode"
    )
    parser.add_argument("--int8", action="store_true", help="the checkpoint's attention and head in int8")
    parser.add_argument(
        "--batch",
        type=int,
        nargs="*",
        default=[],
        help="with --checkpoint: decode steps of these batches too",
    )
    parser.add_argument(
        "--cases", default="", help="only the cases whose name contains this (e.g. 'decode steps')"
    )
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time by CPU time (with --threads 1: other work on the cores does not count)",
    )
    parser.add_argument(
        "--before-bf16-rows",
        type=int,
        default=None,
        help="ops.BF16_DENSE_ROWS while the first build runs (a tree from before a change of it)",
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.before.resolve() == args.after.resolve():
        raise SystemExit("before and after are the same file")
    builds = {name: load_build(path, name) for name, path in (("before", args.before), ("after", args.after))}
    if args.threads:
        ops.set_num_threads(args.threads)
    rates: dict[tuple[str, str], list[float]] = {}
    clock = time.process_time if args.cpu_time else time.perf_counter
    bf16_rows = ops.BF16_DENSE_ROWS
    with torch.no_grad():
        all_cases = cases(args.layers, torch.Generator().manual_seed(0))
        if args.checkpoint:
            all_cases += model_cases(args.checkpoint, args.int8, args.batch)
        all_cases = [case for case in all_cases if args.cases in case.name]
        for round_ in tqdm(range(args.rounds + 1), desc="rounds (the first warms up)"):
            for case in all_cases:
                # in turn first: the second of two runs of a case finds some of its memory still in
                # cache (on a CPU with a large L3, up to ~12% faster with the same code)
                order = list(builds.items())
                for name, build in order if round_ % 2 else order[::-1]:
                    ops._native = decode._native = build  # (the decode step's module binds its own name)
                    if args.before_bf16_rows is not None:
                        ops.BF16_DENSE_ROWS = args.before_bf16_rows if name == "before" else bf16_rows
                    start = clock()
                    result = case.run()
                    seconds = result if case.timed else clock() - start
                    rate = case.amount / seconds / case.per
                    rates.setdefault((case.name, name), []).append(rate)
    table = Table(
        title=f"two builds interleaved, {torch.get_num_threads()} threads, median (range) of {args.rounds}"
    )
    for column in ("case", "unit", "before", "after", "after / before"):
        table.add_column(column)
    report = []
    for case in all_cases:
        measured = {name: rates[(case.name, name)][1:] for name in builds}  # round 0 warmed up
        medians = {name: statistics.median(v) for name, v in measured.items()}
        cells = [f"{medians[n]:.1f} ({min(v):.1f}-{max(v):.1f})" for n, v in measured.items()]
        table.add_row(case.name, case.unit, *cells, f"{medians['after'] / medians['before']:.2f}")
        report.append({"case": case.name, "unit": case.unit, **{n: v for n, v in measured.items()}})
    Console().print(table)
    if args.json:
        args.json.write_text(
            json.dumps({"before": str(args.before), "after": str(args.after), "cases": report}, indent=1)
        )


if __name__ == "__main__":
    main()
