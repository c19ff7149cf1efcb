"""Prefix caching on a multi-turn agent transcript: time to first token per turn, cache on and off.

    python benchmarks/prefix_cache.py                          # bundled nano, ~4,000 tokens
    python benchmarks/prefix_cache.py --model gpt-oss-20b --dtype bfloat16   # random 20b weights

The transcript is a tool loop (a call, a long tool result, the next call ...) replayed turn by turn
through the engine, as the server runs it: each turn's prompt is the whole conversation so far,
rendered by harmony. For every turn it reports the time to the first token with the prefix cache
off (the whole prompt prefilled) and on, and beside them the time to prefill only the turn's new
tokens in a row that already holds the rest (a `Session` that never left: the floor a prefix cache
can reach). The target is turn N with the cache within 1.5x of that floor. Each time is the best of
--repeats runs, the three taken in turn (the repeats of the cached run end in another token, so
that none of them finds the whole prompt stored by the one before).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from gptoss import load_model
from gptoss.harmony import chat_messages_to_harmony, render_for_completion
from gptoss.inference import ModelRunner, SamplingParams
from gptoss.inference.engine import Engine, SequenceRequest, Session
from gptoss.inference.optimize import prepare_for_inference
from gptoss.inference.prefix_cache import PrefixCache

TOOLS = [
    {
        "name": "read_file",
        "description": "Read a file of the repository.",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]},
    }
]
SOURCE = (
    "def handler(request):\n    # Parse the body, check the token, dispatch to the route.\n"
    "    body = json.loads(request.body)\n    if not check(body['token']):\n        return 401\n"
    "    return ROUTES[body['route']](body)\n\n"
)


def transcript(turns: int, result_chars: int) -> list[list[dict[str, Any]]]:
    """The chat messages before each turn of an agent reading files one after another."""
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You are a coding agent. Read files with the tool, then answer."},
        {"role": "user", "content": "Find where requests are authenticated in this repository."},
    ]
    out = [list(messages)]
    for i in range(turns - 1):
        call = {
            "id": f"call_{i}",
            "type": "function",
            "function": {"name": "read_file", "arguments": json.dumps({"path": f"src/module_{i}.py"})},
        }
        body = (f"# src/module_{i}.py\n" + SOURCE * (result_chars // len(SOURCE) + 1))[:result_chars]
        messages += [
            {"role": "assistant", "reasoning_content": f"Look at module {i} next.", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": f"call_{i}", "content": body},
        ]
        out.append(list(messages))
    return out


def first_token_seconds(engine: Engine, prompt: list[int], max_tokens: int) -> float:
    start = time.perf_counter()
    engine.add(SequenceRequest(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0)))
    first = None
    while engine.has_work:
        if engine.step() and first is None:
            first = time.perf_counter() - start
    return first


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="gptoss-nano")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    parser.add_argument("--turns", type=int, default=12)
    parser.add_argument("--result-chars", type=int, default=720, help="length of each tool result")
    parser.add_argument("--max-tokens", type=int, default=8, help="tokens generated per turn")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs per time")
    parser.add_argument("--out", default="prefix_cache.json")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model = prepare_for_inference(
        load_model(args.model, dtype=getattr(torch, args.dtype) if args.dtype else None)
    )
    context = model.config.max_position_embeddings
    probe = ModelRunner(model, 1, 16)
    prompts = [
        probe.fit_prompt(render_for_completion(chat_messages_to_harmony(m, TOOLS)))
        for m in transcript(args.turns, args.result_chars)
    ]
    if len(prompts[-1]) + args.max_tokens > context:
        raise SystemExit(f"the transcript reaches {len(prompts[-1])} tokens, beyond the context of {context}")
    del probe
    # Three runners hold a whole KV cache each: sized to the transcript, not the model's context.
    context = len(prompts[-1]) + args.max_tokens

    cold = Engine(ModelRunner(model, 1, context), prefill_budget=context)
    warm_runner = ModelRunner(model, 1, context, prefix_cache=PrefixCache(4 << 30))
    warm = Engine(warm_runner, prefill_budget=context)
    session = Session(model, context, prefill_chunk=context)
    rows = []
    for n, prompt in enumerate(tqdm(prompts, desc="turns")):
        new = prompt[len(prompts[n - 1]) :] if n else prompt
        mark = session.mark() if n else None
        off = on = floor = float("inf")
        cached = 0
        # Interleaved, so that the three columns see the same moments of a shared machine.
        for r in range(args.repeats):
            off = min(off, first_token_seconds(cold, prompt, args.max_tokens))
            before = warm_runner.prefix_cache.stats.hit_tokens
            on = min(
                on, first_token_seconds(warm, [*prompt[:-1], prompt[r - 1]] if r else prompt, args.max_tokens)
            )
            if r == 0:
                cached = warm_runner.prefix_cache.stats.hit_tokens - before
            if mark is None:
                session.reset()
            else:
                session.rewind(mark)
            session.append(new)
            start = time.perf_counter()
            session.feed()
            session.next_logits()
            floor = min(floor, time.perf_counter() - start)
        rows.append(
            {"turn": n + 1, "prompt_tokens": len(prompt), "new_tokens": len(new), "cached_tokens": cached,
             "ttft_off_s": off, "ttft_on_s": on, "new_tokens_only_s": floor, "on_over_floor": on / floor}
        )  # fmt: skip

    table = Table(title=f"prefix cache, {args.model} ({platform.processor() or platform.machine()})")
    for column in ("turn", "prompt", "new", "cached", "TTFT off", "TTFT on", "new only", "on / new only"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(
            str(r["turn"]), str(r["prompt_tokens"]), str(r["new_tokens"]), str(r["cached_tokens"]),
            f"{r['ttft_off_s'] * 1e3:.0f} ms", f"{r['ttft_on_s'] * 1e3:.0f} ms",
            f"{r['new_tokens_only_s'] * 1e3:.0f} ms", f"{r['on_over_floor']:.2f}x",
        )  # fmt: skip
    Console().print(table)
    Path(args.out).write_text(json.dumps({"model": args.model, "turns": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
