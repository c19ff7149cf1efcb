"""One stream through the server against in-process decoding, alternated in one process.

    python benchmarks/serve_overhead.py --model /path/to/gpt-oss-20b --tokens 32 --rounds 2

The model is loaded once. Each round times `generate_stream` (ms per token after the first), then
the real server on 127.0.0.1 (uvicorn with the app `gptoss serve` builds: default context, KV budget
and prefix cache) driven by `benchmarks/serve.py --url ... --concurrency 1` in a subprocess (its
TPOT: ms per output token after the first, as a client sees it); one last `generate_stream` closes
the run, so every server figure lies between two in-process ones taken minutes apart at most. Inside
the server, the engine thread's `Engine.step` is timed too: TPOT minus that step is what the
server costs beside the engine (HTTP, SSE, the event loop).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
import uvicorn
from rich.console import Console
from rich.table import Table

from gptoss import load_model
from gptoss.inference import SamplingParams
from gptoss.inference.engine import generate_stream
from gptoss.inference.optimize import prepare_for_inference
from gptoss.inference.prefix_cache import PrefixCache, default_budget_bytes
from gptoss.inference.runner import ModelRunner
from gptoss.server.app import DEFAULT_MAX_BATCH, create_app
from gptoss.server.service import ServerSettings
from gptoss.tokenizer import get_tokenizer

SENTENCE = "Write a long story about a lighthouse keeper who finds a message in a bottle. "  # as serve.py


def in_process_ms(model: Any, prompt: list[int], tokens: int) -> float:
    """Median ms between the tokens of one `generate_stream` sequence (greedy, no stop)."""
    params = SamplingParams(max_tokens=tokens, temperature=0.0, stop_token_ids=[])
    with torch.inference_mode():
        times = [time.perf_counter() for _ in generate_stream(model, [prompt], params)]
    return statistics.median(b - a for a, b in zip(times, times[1:], strict=False)) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="gpt-oss-nano", help="checkpoint directory or preset")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--port", type=int, default=18932)
    parser.add_argument("--json", type=Path, default=Path("serve_overhead.json"))
    args = parser.parse_args()
    console = Console()
    model = prepare_for_inference(load_model(args.model))
    prompt = get_tokenizer().encode(SENTENCE * 4, allowed_special="all")

    runner = ModelRunner(model, max_batch=DEFAULT_MAX_BATCH, context=model.config.max_position_embeddings)
    runner.prefix_cache = PrefixCache(default_budget_bytes("cpu"))
    app = create_app(runner, ServerSettings(model_name="m"))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=args.port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.1)
    engine = app.state.service.engine.engine  # the AsyncEngine's Engine, stepped by its thread
    steps: list[float] = []
    plain_step = engine.step

    def timed_step() -> Any:
        start = time.perf_counter()
        out = plain_step()
        steps.append(time.perf_counter() - start)
        return out

    engine.step = timed_step
    client = [
        sys.executable, str(Path(__file__).with_name("serve.py")), "--url", f"http://127.0.0.1:{args.port}",
        "--model", "m", "--concurrency", "1", "--max-tokens", str(args.tokens), "--rounds", "2",
    ]  # fmt: skip
    in_process_ms(model, prompt, args.tokens)  # warm-up: first-touch costs belong to neither side
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            before = in_process_ms(model, prompt, args.tokens)
            steps.clear()
            out = Path(tmp) / "serve.json"
            subprocess.run([*client, "--json", str(out)], check=True, capture_output=True)
            level = json.loads(out.read_text())["levels"][0]
            rounds.append(
                {
                    "in_process_ms": before,
                    "server_tpot_ms": level["tpot_ms"]["p50"],
                    "server_engine_step_ms": statistics.median(steps) * 1000,
                    "load_average": os.getloadavg(),
                }
            )
            console.print(f"round {r}: {rounds[-1]}")
        after = in_process_ms(model, prompt, args.tokens)
    server.should_exit = True
    for r, level in enumerate(rounds):
        following = rounds[r + 1]["in_process_ms"] if r + 1 < len(rounds) else after
        level["in_process_after_ms"] = following
        level["server_of_in_process"] = (level["in_process_ms"] + following) / 2 / level["server_tpot_ms"]
    args.json.write_text(json.dumps({"model": args.model, "tokens": args.tokens, "rounds": rounds}, indent=2))
    table = Table(title=f"one stream, {Path(args.model).name}: in process against the server")
    for column in ("round", "in-process ms/token", "server TPOT ms", "server engine step ms", "after",
                   "server speed / in-process"):  # fmt: skip
        table.add_column(column, justify="right")
    for r, lv in enumerate(rounds):
        table.add_row(
            str(r), f"{lv['in_process_ms']:.1f}", f"{lv['server_tpot_ms']:.1f}",
            f"{lv['server_engine_step_ms']:.1f}", f"{lv['in_process_after_ms']:.1f}",
            f"{lv['server_of_in_process']:.0%}",
        )  # fmt: skip
    console.print(table)
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
