"""What a grammar costs while decoding: the per-token mask time (median, p99) and decode tokens/s with
and without a JSON Schema on the final answer, at batch 1 and 16, through the engine core.

    python benchmarks/constrained.py                       # the bundled model, batch 1 and 16
    python benchmarks/constrained.py --batch 1 --tokens 128 --json constrained.json
    python benchmarks/constrained.py --model path/to/gpt-oss-20b --batch 1 16 --tokens 32 --rounds 3

Each batch runs the same prompt (the harmony chat with the schema's "# Response Formats" section)
with and without the grammar, `--tokens` tokens per sequence, stop tokens ignored so that every
row decodes to the end (a grammar that is complete lets any token through, so the masked share is
reported too). The mask time is that of `GrammarConstraint.allowed` (llguidance's bitmask and its
conversion to a boolean tensor); the decode rate includes it and the sampler's masking. "mask time"
is the masks' share of the decode wall time: on a shared machine the tok/s of two runs drift apart
by more than the masks cost (and the outputs differ, so a mixture-of-experts model reads different
experts), so that share is the steadier measure of the overhead.

The free and the constrained run alternate `--rounds` times (the machine's drift then falls on
both alike); the table gives each one's median tok/s over the rounds, also from the median step
time (a step's median shrugs off the bursts of other jobs), and the median of the rounds' ratios of
the latter, with their range. A prefix cache holds the prompt, so only the first run prefills it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from gptoss import load_model
from gptoss.inference import Engine, ModelRunner, PrefixCache, SamplingParams, SequenceRequest
from gptoss.inference.grammar import GrammarConstraint, llg_tokenizer
from gptoss.inference.optimize import prepare_for_inference
from gptoss.server.prompting import JsonFormat, ToolChoice, build_prompt

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}


class TimedConstraint(GrammarConstraint):
    """A grammar constraint that records how long each mask takes and whether it masked. A batch's
    masks are computed together (`prepare_batch`): each row is charged an equal share of that."""

    def __init__(self, grammar: str, rows: tuple[int, ...] | None, times: list[float], masked: list[bool]):
        super().__init__(grammar, rows)
        self.times, self.masked = times, masked
        self.share = 0.0  # this row's part of the last batch computation

    @staticmethod
    def prepare_batch(constraints) -> None:
        start = time.perf_counter()
        GrammarConstraint.prepare_batch(constraints)
        for constraint in constraints:
            constraint.share = (time.perf_counter() - start) / len(constraints)

    def allowed(self) -> torch.Tensor | None:
        start = time.perf_counter()
        mask = super().allowed()
        self.times.append(time.perf_counter() - start + self.share)
        self.share = 0.0
        self.masked.append(mask is not None)
        return mask


def run(runner: ModelRunner, prompt, batch: int, tokens: int, constrained: bool) -> dict:
    engine = Engine(runner, prefill_budget=runner.context)
    times: list[float] = []
    masked: list[bool] = []
    grammar = prompt.grammar.grammar(tokens) if constrained else None
    for i in range(batch):
        params = SamplingParams(max_tokens=tokens, seed=i, stop_token_ids=())
        constraint = TimedConstraint(grammar, runner.token_rows, times, masked) if grammar else None
        engine.add(SequenceRequest(prompt.tokens, params, i, constraint))
    while engine.waiting:  # prefill every prompt first: only decoding is timed
        engine._admit([])
    generated = 0
    steps: list[float] = []  # seconds of each step that decoded the whole batch
    start = time.perf_counter()
    with tqdm(total=batch * tokens, desc=f"batch {batch} {'schema' if constrained else 'free'}") as bar:
        while engine.has_work:
            step_start = time.perf_counter()
            n = len(engine.step())
            if n == batch:
                steps.append(time.perf_counter() - step_start)
            generated += n
            bar.update(n)
    seconds = time.perf_counter() - start
    out = {
        "batch": batch,
        "schema": constrained,
        "tokens": generated,
        "tok_s": generated / seconds,
        # a step's median time shrugs off the bursts of other jobs on a shared machine
        "step_tok_s": batch / float(np.median(steps)),
    }
    if times:
        us = np.array(times) * 1e6
        out |= {
            "mask_median_us": float(np.median(us)),
            "mask_p99_us": float(np.percentile(us, 99)),
            "masked_share": float(np.mean(masked)),
            "mask_time_share": float(np.sum(times) / seconds),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="gptoss-nano")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3, help="free and constrained runs alternated")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = prepare_for_inference(load_model(args.model))
    runner = ModelRunner(model, max_batch=max(args.batch), context=2048, prefix_cache=PrefixCache(2**30))
    prompt = build_prompt(
        runner,
        [{"role": "user", "content": "Describe a person called Ada who lives in Paris."}],
        tools=[],
        tool_choice=ToolChoice("none"),
        reasoning_effort="low",
        json_format=JsonFormat("person", SCHEMA),
    )
    start = time.perf_counter()
    llg_tokenizer(runner.token_rows)
    setup = time.perf_counter() - start
    results = []
    for batch in args.batch:
        for constrained in (False, True):
            run(runner, prompt, batch, 8, constrained)  # warm-up
        rounds = {False: [], True: []}
        for _ in range(args.rounds):
            for constrained in (False, True):
                rounds[constrained].append(run(runner, prompt, batch, args.tokens, constrained))
        ratios = [s["step_tok_s"] / f["step_tok_s"] for f, s in zip(rounds[False], rounds[True], strict=True)]
        for constrained, runs in rounds.items():
            summary = {
                key: float(np.median([r[key] for r in runs]))
                for key in runs[0]
                if key not in ("batch", "schema")
            }
            summary |= {"batch": batch, "schema": constrained, "rounds": runs}
            if constrained:
                summary |= {"ratio_median": float(np.median(ratios)), "ratios": ratios}
            results.append(summary)
    table = Table(
        title=f"{args.model}: decode with and without a JSON Schema ({torch.get_num_threads()} threads, "
        f"median of {args.rounds} alternated rounds)"
    )
    columns = (
        "batch",
        "schema",
        "tok/s",
        "tok/s (median step)",
        "vs free (range)",
        "mask median µs",
        "mask p99 µs",
        "masked share",
        "mask time",
    )
    for column in columns:
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(
            str(r["batch"]),
            "yes" if r["schema"] else "no",
            f"{r['tok_s']:.1f}",
            f"{r['step_tok_s']:.1f}",
            f"{r['ratio_median'] - 1:+.1%} ({min(r['ratios']) - 1:+.1%}..{max(r['ratios']) - 1:+.1%})"
            if r["schema"]
            else "",
            f"{r.get('mask_median_us', 0):.0f}" if r["schema"] else "",
            f"{r.get('mask_p99_us', 0):.0f}" if r["schema"] else "",
            f"{r.get('masked_share', 0):.0%}" if r["schema"] else "",
            f"{r.get('mask_time_share', 0):.1%}" if r["schema"] else "",
        )
    Console(width=150).print(table)
    print(f"llguidance tokenizer for this vocabulary: {setup:.2f} s (once per process)")
    if args.json:
        args.json.write_text(
            json.dumps({"model": args.model, "tokenizer_s": setup, "runs": results}, indent=2)
        )


if __name__ == "__main__":
    main()
