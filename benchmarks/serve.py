"""Serving throughput and latency at several numbers of concurrent streams.

    python benchmarks/serve.py                                   # nano, 1/4/16/64 streams, greedy
    python benchmarks/serve.py --concurrency 1 16 --temperature 1 --endpoint chat
    python benchmarks/serve.py --url http://127.0.0.1:8000 --model my-model   # a running server

Unless --url is given, it starts `gptoss serve MODEL` (random weights for a preset) on 127.0.0.1 in
a subprocess, so the numbers are those of the production path: HTTP, SSE, scheduler, model. Each
of C clients sends --rounds streaming requests back to back; tokens are the server's own usage
counts. Reported per concurrency: aggregate tokens/s, time to first token (TTFT), inter-token
latency (ITL, between stream chunks), time per output token after the first (TPOT: the decode
step as a client sees it) and request latency percentiles, and the throughput ratio
against one stream; for a server it started, its resident memory at idle (after start, before the
first request) and the peak of each level (sampled every 0.2 s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import torch
from rich.console import Console
from rich.table import Table

SENTENCE = "Write a long story about a lighthouse keeper who finds a message in a bottle. "  # 17 tokens


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def one_request(client: httpx.AsyncClient, args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": args.model,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    prompt = SENTENCE * args.prompt_repeat
    if args.endpoint == "chat":
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": prompt}]
    else:
        path, body["prompt"] = "/v1/completions", prompt
    start = time.perf_counter()
    chunk_times, tokens = [], 0
    async with client.stream("POST", path, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            # Parse only the usage chunk: the client shares the CPU with the server under test.
            if '"usage": {' in line:
                tokens = json.loads(line.removeprefix("data: "))["usage"]["completion_tokens"]
            elif line.startswith("data: {"):
                chunk_times.append(time.perf_counter())
    end = time.perf_counter()
    # Time per output token after the first (vLLM's TPOT): a chunk may carry several tokens (one
    # whose bytes end no character releases no text), so the gaps between chunks overstate it.
    decoding = chunk_times[-1] - chunk_times[0] if len(chunk_times) > 1 else float("nan")
    return {
        "tokens": tokens,
        "tpot": decoding / (tokens - 1) if tokens > 1 else float("nan"),
        "ttft": (chunk_times[0] - start) if chunk_times else float("nan"),
        "itl": [b - a for a, b in zip(chunk_times, chunk_times[1:], strict=False)],
        "latency": end - start,
    }


async def run_level(url: str, concurrency: int, args: argparse.Namespace) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=concurrency + 4)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits, headers=headers) as client:
        await one_request(client, args)  # warm-up

        async def worker() -> list[dict[str, Any]]:
            return [await one_request(client, args) for _ in range(args.rounds)]

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker() for _ in range(concurrency))) for r in rs]
        wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    itl = [x for r in results for x in r["itl"]]
    ms = 1000.0
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "tokens": tokens,
        "seconds": wall,
        "tokens_per_s": tokens / wall,
        "ttft_ms": {f"p{q}": percentile([r["ttft"] for r in results], q) * ms for q in (50, 90, 99)},
        "itl_ms": {f"p{q}": percentile(itl, q) * ms for q in (50, 90, 99)},
        "tpot_ms": {f"p{q}": percentile([r["tpot"] for r in results], q) * ms for q in (50, 90, 99)},
        "latency_s": {f"p{q}": percentile([r["latency"] for r in results], q) for q in (50, 90, 99)},
    }


class PeakRSS:
    """The largest resident set size of process `pid` while active, sampled in a thread."""

    def __init__(self, pid: int, every: float = 0.2) -> None:
        self.process, self.every, self.peak = psutil.Process(pid), every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(self.every)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args: argparse.Namespace, db: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "gptoss.cli", "serve", args.model, "--port", str(port)]
    command += ["--max-batch", str(max(args.concurrency)), "--responses-db", str(db), *args.server_arg]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"gptoss serve exited:\n{server.stderr.read()}")
        if time.monotonic() > deadline:
            server.kill()
            raise RuntimeError("gptoss serve did not start within 10 minutes")
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return server, url
        except httpx.TransportError:
            time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="gpt-oss-nano", help="preset or checkpoint (or the served name)")
    parser.add_argument("--url", default=None, help="benchmark this running server instead of starting one")
    parser.add_argument("--api-key", default=os.environ.get("GPTOSS_API_KEY"))
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16, 64])
    parser.add_argument("--rounds", type=int, default=2, help="requests each client sends in turn")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument(
        "--prompt-repeat",
        type=int,
        default=4,
        help="the prompt is a 17-token sentence this many times (every request the same: after the "
        "warm-up, the prefix cache gives it)",
    )
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    parser.add_argument("--json", type=Path, default=Path("serve.json"))
    parser.add_argument(
        "--server-arg", action="append", default=[], help="an option for gptoss serve (repeat for several)"
    )
    args = parser.parse_args()

    console = Console()
    server = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.url:
            url = args.url
        else:
            console.print(f"starting gptoss serve {args.model} ...")
            server, url = start_server(args, Path(tmp) / "responses.sqlite3")
            args.model = Path(args.model).name
        memory: dict[str, float] = {}
        try:
            if server is not None:
                time.sleep(2)  # (the server has just answered its first /health)
                memory["rss_idle_gib"] = psutil.Process(server.pid).memory_info().rss / 2**30
                console.print(f"server resident at idle: {memory['rss_idle_gib']:.2f} GiB")
            levels = []
            for c in args.concurrency:
                with PeakRSS(server.pid if server else os.getpid()) as rss:
                    levels.append(asyncio.run(run_level(url, c, args)))
                if server is not None:
                    levels[-1]["rss_peak_gib"] = rss.peak / 2**30
                console.print(
                    f"{c:3d} streams: {levels[-1]['tokens_per_s']:8.1f} tok/s"
                    + (f", server peak {rss.peak / 2**30:.2f} GiB" if server else "")
                )
            if server is not None:
                memory["rss_after_gib"] = psutil.Process(server.pid).memory_info().rss / 2**30
        finally:
            if server is not None:
                server.terminate()
                server.wait(timeout=60)

    base = next((lv["tokens_per_s"] for lv in levels if lv["concurrency"] == 1), None)
    for level in levels:
        level["speedup_vs_1"] = level["tokens_per_s"] / base if base else None
    report = {
        "model": args.model,
        "endpoint": args.endpoint,
        "max_tokens": args.max_tokens,
        "prompt_repeat": args.prompt_repeat,
        "temperature": args.temperature,
        "rounds": args.rounds,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "load_average": os.getloadavg(),
        },
        "server_args": args.server_arg,
        "memory": memory,
        "levels": levels,
    }
    args.json.write_text(json.dumps(report, indent=2))

    table = Table(
        title=f"serving {args.model} ({args.endpoint}, {args.max_tokens} tokens, T={args.temperature})"
    )
    for column in (
        "streams",
        "tok/s",
        "× 1 stream",
        "TTFT p50/p90/p99 ms",
        "ITL p50/p90/p99 ms",
        "TPOT p50/p90 ms",
        "latency p50/p99 s",
    ):
        table.add_column(column, justify="right")
    for lv in levels:
        table.add_row(
            str(lv["concurrency"]),
            f"{lv['tokens_per_s']:.1f}",
            f"{lv['speedup_vs_1']:.2f}" if lv["speedup_vs_1"] else "-",
            "/".join(f"{lv['ttft_ms'][p]:.0f}" for p in ("p50", "p90", "p99")),
            "/".join(f"{lv['itl_ms'][p]:.1f}" for p in ("p50", "p90", "p99")),
            "/".join(f"{lv['tpot_ms'][p]:.1f}" for p in ("p50", "p90")),
            f"{lv['latency_s']['p50']:.2f}/{lv['latency_s']['p99']:.2f}",
        )
    console.print(table)
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
