"""Speculative decoding: what a verify pass costs, and what it gives on editing-style work.

    python benchmarks/speculative.py workload                       # bundled nano: editing workload
    flock /work/notes/20b.lock timeout 900 python benchmarks/speculative.py verify-cost \\
        --model /path/to/gpt-oss-20b                                # cost of k = 1..8, upper bound

`workload` runs three tasks on the bundled model, each with speculation off, n-gram lookup (up to
--draft proposed tokens every pass) and suffix decoding (adaptive: fewer tokens, or none, when they
do not pay), the modes taken in turn --repeats times (the machine is shared, so the runs interleave
and the table gives the median and the spread): rewrite a Python file with a small change, summarise
a page and quote it, a multi-turn tool loop (a `Session`: each turn appends a tool result that
repeats earlier text). Decode tok/s counts the tokens after the first over the time after it (the
prompt's prefill is the same in every mode). Every run checks that the tokens equal the run
without speculation.

`verify-cost` loads a checkpoint (the 20b: ~13 GB), prefills a prompt, and times a decode step
against verify passes of k = 1..8 proposed tokens (k+1 fed), interleaved, each pass taken back after
it is timed; then an upper bound where every proposal is right: a request repeated, the suffix
proposer holding the earlier run's output, against the same request without speculation.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from gptoss import load_model
from gptoss.inference import ModelRunner, SamplingParams, Session, generate_stream
from gptoss.inference.optimize import prepare_for_inference
from gptoss.inference.speculative import Speculation, speculation
from gptoss.ops import set_num_threads
from gptoss.tokenizer import get_tokenizer

ROOT = Path(__file__).resolve().parent.parent
MODES = ("off", "ngram", "suffix")


def mode(name: str, draft: int) -> Speculation | None:
    # n-gram at a fixed draft length shows what the proposals are worth; suffix adapts (the default)
    return speculation(name, max_draft=draft, adaptive=name != "ngram")


def decode_rate(events: Any) -> tuple[list[int], float]:
    """The tokens of a stream and the seconds from its first token to its last."""
    tokens, first = [], None
    for event in events:
        tokens.append(event.token)
        if first is None:
            first = time.perf_counter()
    return tokens, time.perf_counter() - (first or time.perf_counter())


# ---------------------------------------------------------------------- the editing workload
def tasks(tokenizer: Any) -> dict[str, Any]:
    """Each task: a function (model, speculation) → (tokens, decode seconds)."""
    source = (ROOT / "src/gptoss/inference/stops.py").read_text()
    page = (ROOT / "docs/inference.md").read_text()[:3000]

    def one(prompt: str, max_tokens: int):
        ids = tokenizer.encode(prompt, allowed_special="all")

        def run(model, spec):
            params = SamplingParams(max_tokens=max_tokens, temperature=0, stop_token_ids=[])
            return decode_rate(generate_stream(model, [ids], params, speculation=spec))

        return run

    def tool_loop(model, spec):
        session = Session(model, capacity=8192, speculation=spec)
        tokens, seconds = [], 0.0
        session.append(tokenizer.encode("You are a coding agent. Read files, then fix the bug.\n"))
        for turn in range(4):
            result = source[turn * 300 : turn * 300 + 1200]
            session.append(tokenizer.encode(f"\ncall read_file(stops.py) ->\n{result}\nassistant: "))
            params = SamplingParams(max_tokens=40, temperature=0, stop_token_ids=[])
            out, s = decode_rate(session.stream(params))
            tokens += out
            seconds += s
        return tokens, seconds

    return {
        "rewrite a file": one(
            f"Rename StopStrings to StopMatcher in this file.\n\n{source}\n\nThe file, renamed:\n\n"
            + source[:60],
            160,
        ),
        "summarise and quote": one(f"{page}\n\nSummary, quoting the page:\n\n" + page[:80], 128),
        "tool loop (4 turns)": tool_loop,
    }


def workload(args: argparse.Namespace) -> dict[str, Any]:
    model = prepare_for_inference(load_model(args.model))
    tokenizer = get_tokenizer()
    results: dict[str, Any] = {}
    work = tasks(tokenizer)
    bar = tqdm(total=len(work) * args.repeats * len(MODES), desc="workload")
    for task, run in work.items():
        rates: dict[str, list[float]] = {m: [] for m in MODES}
        stats: dict[str, Any] = {}
        reference = None
        for _ in range(args.repeats):
            for name in MODES:
                spec = mode(name, args.draft)
                tokens, seconds = run(model, spec)
                if reference is None:
                    reference = tokens
                if tokens != reference:
                    raise SystemExit(f"{task}, {name}: the tokens differ from the run without speculation")
                rates[name].append((len(tokens) - 1) / seconds)
                if spec is not None:
                    s = spec.stats
                    stats[name] = {
                        "acceptance": s.acceptance,
                        "tokens_per_forward": s.tokens_per_forward,
                        "verify_passes": s.verify_passes,
                        "decode_passes": s.decode_passes,
                    }
                bar.update()
        results[task] = {"tokens": len(reference or []), "tok_s": rates, "speculation": stats}
    bar.close()
    table = Table(title=f"speculative decoding, {args.model}, greedy, {args.repeats} interleaved runs")
    for column in (
        "task",
        "mode",
        "acceptance",
        "tokens/forward",
        "decode tok/s (median, min-max)",
        "speedup",
    ):
        table.add_column(column)
    for task, r in results.items():
        base = statistics.median(r["tok_s"]["off"])
        for name in MODES:
            rates = r["tok_s"][name]
            s = r["speculation"].get(name, {})
            table.add_row(
                task,
                name,
                f"{s['acceptance']:.2f}" if s else "-",
                f"{s['tokens_per_forward']:.2f}" if s else "1.00",
                f"{statistics.median(rates):.1f} ({min(rates):.1f}-{max(rates):.1f})",
                f"{statistics.median(rates) / base:.2f}x",
            )
    Console().print(table)
    return results


# ---------------------------------------------------------------------- verify cost on a checkpoint
def verify_cost(args: argparse.Namespace) -> dict[str, Any]:
    model = prepare_for_inference(load_model(args.model))
    ids = model.model.token_ids if model.model.trimmed else torch.arange(model.config.vocab_size)
    ids = ids[(ids >= 1000) & (ids < 199998)]  # ordinary text tokens (no specials)
    g = torch.Generator().manual_seed(0)

    def draw(n: int) -> list[int]:
        return ids[torch.randint(0, len(ids), (n,), generator=g)].tolist()

    prompt = draw(args.prompt)
    runner = ModelRunner(model, 1, args.prompt + 16 + args.repeats * 10)  # each round keeps 9 tokens
    runner.prefill(0, prompt, last=True)
    runner.decode({0: None})
    fed = draw(9)
    times: dict[int, list[float]] = {k: [] for k in range(0, 9)}
    for _ in tqdm(range(args.repeats), desc="verify cost"):
        for k in range(0, 9):
            start = time.perf_counter()
            if k == 0:
                runner.decode({0: fed[0]})  # one token: the plain decode step
            else:
                runner.verify(0, fed[: k + 1])
                runner.settle(0, 1)
            times[k].append(time.perf_counter() - start)
    one = statistics.median(times[0])
    table = Table(title=f"verify cost, {args.model}, prompt {args.prompt}, {args.repeats} interleaved runs")
    # On a shared machine the fastest run is the least disturbed one: both ratios are given.
    for column in ("proposed k", "fed", "ms (median, min-max)", "x decode (medians)", "x decode (minima)"):
        table.add_column(column)
    for k, t in times.items():
        table.add_row(
            str(k) if k else "0 (decode)",
            str(k + 1),
            f"{statistics.median(t) * 1e3:.0f} ({min(t) * 1e3:.0f}-{max(t) * 1e3:.0f})",
            f"{statistics.median(t) / one:.2f}",
            f"{min(t) / min(times[0]):.2f}",
        )
    Console().print(table)
    return {"seconds": times, "upper_bound": upper_bound(model, prompt[:64], args)}


def upper_bound(model: Any, prompt: list[int], args: argparse.Namespace) -> dict[str, Any]:
    """Every proposal right: a request repeated, its earlier output in the suffix proposer's text of
    recent requests. (A prompt that merely contains the continuation does not make a model with
    random weights repeat it: its output depends on the whole context.)"""
    params = SamplingParams(max_tokens=args.tokens, temperature=0, stop_token_ids=[])
    continuation, _ = decode_rate(generate_stream(model, [prompt], params))
    rates: dict[str, list[float]] = {"off": [], "suffix": []}
    stats = {}
    for _ in range(3):
        for name in rates:
            spec = mode(name, args.draft)
            if spec is not None:
                spec.proposer.start(-1, prompt + continuation)
                spec.proposer.finish(-1)  # the earlier request
            tokens, seconds = decode_rate(generate_stream(model, [prompt], params, speculation=spec))
            if tokens != continuation:
                raise SystemExit("upper bound: the tokens differ from the run without speculation")
            rates[name].append((len(tokens) - 1) / seconds)
            if spec is not None:
                stats = {
                    "acceptance": spec.stats.acceptance,
                    "tokens_per_forward": spec.stats.tokens_per_forward,
                }
    Console().print(
        f"upper bound (the request repeated, {args.tokens} tokens): off {rates['off']} tok/s, "
        f"suffix {rates['suffix']} tok/s, {stats}"
    )
    return {"tok_s": rates, "speculation": stats}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("workload")
    w.add_argument("--model", default="gptoss-nano")
    w.add_argument("--repeats", type=int, default=3)
    v = sub.add_parser("verify-cost")
    v.add_argument("--model", required=True)
    v.add_argument("--prompt", type=int, default=256, help="prompt tokens before the timed passes")
    v.add_argument("--repeats", type=int, default=5)
    v.add_argument("--tokens", type=int, default=24, help="tokens of the upper-bound run")
    for p in (w, v):
        p.add_argument("--draft", type=int, default=7, help="most proposed tokens a pass verifies")
        p.add_argument("--threads", type=int, default=None, help="kernel threads (default: torch's)")
        p.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        set_num_threads(args.threads)
    results = workload(args) if args.command == "workload" else verify_cost(args)
    record = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": platform.processor(), **results}
    out = args.json or Path(__file__).with_name(f"speculative-{args.command}.json")
    out.write_text(json.dumps(record, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
