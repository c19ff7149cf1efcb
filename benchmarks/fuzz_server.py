"""Fuzz the server's OpenAPI spec with schemathesis: every operation, valid and invalid requests.

    python benchmarks/fuzz_server.py                          # the bundled gptoss-nano, 100 examples each
    python benchmarks/fuzz_server.py --examples 500 --json fuzz.json
    python benchmarks/fuzz_server.py --url http://127.0.0.1:8000 --model my-model   # a running server

Unless --url is given, it starts `gptoss serve` (the bundled model) on 127.0.0.1 in a subprocess.
Requests are generated from the server's own /openapi.json, in schemathesis' positive mode (bodies
the schema allows) and negative mode (bodies it forbids). The `model` field is pinned to the served
model, so that valid requests reach generation instead of stopping at 404, and token budgets are
capped so each one finishes in milliseconds. Any 5xx is a failure: the table counts status codes per
operation and the 5xx cases are printed with their request bodies. Exit status 1 if there was one.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from rich.console import Console
from rich.table import Table
from schemathesis import GenerationMode
from tqdm import tqdm

# Body fields that set how much is generated, capped so every valid request is quick.
BUDGET_FIELDS = {"max_tokens": 8, "max_completion_tokens": 8, "max_output_tokens": 8, "n": 2, "best_of": 2}
CHAT_BUDGETS = ("max_tokens", "max_completion_tokens")
REQUEST_TIMEOUT = 60.0
SLOW_SECONDS = 5.0  # reported apart: a capped request should take milliseconds


def pin(case: Any, model: str) -> None:
    """Point a generated request at the served model, with a small token budget."""
    body = case.body
    if not isinstance(body, dict):
        return
    if isinstance(body.get("model"), str):
        body["model"] = model
    for field, cap in BUDGET_FIELDS.items():
        value = body.get(field)
        if isinstance(value, int | float) and not isinstance(value, bool) and value > cap:  # 296.0 is an int
            body[field] = cap
    # Without a budget (absent or null) a request may fill the context: give one (other endpoints
    # ignore the field).
    if all(body.get(field) is None for field in CHAT_BUDGETS):
        body["max_tokens"] = BUDGET_FIELDS["max_tokens"]
    if body.get("max_output_tokens") is None:
        body["max_output_tokens"] = BUDGET_FIELDS["max_output_tokens"]
    if case.operation.path.startswith("/api/"):  # Ollama's budget: options.num_predict
        options = body.get("options")
        if options is None:
            body["options"] = options = {}
        if isinstance(options, dict):
            predict = options.get("num_predict")
            if not isinstance(predict, int | float) or isinstance(predict, bool) or not 0 <= predict <= 8:
                options["num_predict"] = 8


def send(case: Any, base_url: str, model: str) -> tuple[int | str, str, float]:
    """(status code or "no response", response text, seconds) of one generated request."""
    pin(case, model)
    start = time.perf_counter()
    try:
        response = case.call(base_url=base_url, timeout=REQUEST_TIMEOUT)
        status, text = response.status_code, response.text[:500]
    except requests.RequestException as exc:  # no answer at all: as bad as a 5xx
        status, text = "no response", repr(exc)
    return status, text, time.perf_counter() - start


def fuzz_operation(
    operation: Any, mode: GenerationMode, base_url: str, model: str, examples: int, derandomize: bool
) -> dict:
    """`examples` requests of one operation in one mode: status counts, failures and slow ones."""
    out: dict[str, Any] = {"counts": collections.Counter(), "server_errors": [], "slow": []}

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        derandomize=derandomize,
    )
    @given(operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        status, text, seconds = send(case, base_url, model)
        out["counts"][str(status)] += 1
        failed = status == "no response" or status >= 500
        if failed or seconds > SLOW_SECONDS:
            out["server_errors" if failed else "slow"].append(
                {
                    "operation": operation.label,
                    "mode": mode.value,
                    "status": status,
                    "seconds": round(seconds, 2),
                    "body": case.body if isinstance(case.body, dict | list | str) else repr(case.body),
                    "query": case.query,
                    "path": case.path_parameters,
                    "response": text,
                }
            )

    run()
    return out


def fuzz(
    base_url: str, model: str, examples: int, progress: bool = True, derandomize: bool = False
) -> dict[str, Any]:
    """Run every operation of the server's spec `examples` times per mode; return the counts.
    `derandomize`: the same requests on every run (for a test), instead of fresh ones."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    results: dict[str, Any] = {"server_errors": [], "slow": [], "no_cases": []}
    jobs = [(op, mode) for op in operations for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]
    for operation, mode in tqdm(jobs, desc="operations × modes", disable=not progress):
        try:
            done = fuzz_operation(operation, mode, base_url, model, examples, derandomize)
        except Unsatisfiable:  # no request of this mode exists (a route without inputs has no invalid one)
            results["no_cases"].append(f"{operation.label} ({mode.value})")
            continue
        counts[operation.label].update(done["counts"])
        results["server_errors"] += done["server_errors"]
        results["slow"] += done["slow"]
    return {
        "model": model,
        "examples_per_mode": examples,
        "requests": sum(sum(c.values()) for c in counts.values()),
        **results,
        "status_counts": {op: dict(sorted(c.items())) for op, c in counts.items()},
    }


def start_server(extra: list[str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "gptoss.cli", "serve", *extra, "--port", str(port)]
    log = open(Path(tempfile.gettempdir()) / f"gptoss-fuzz-server-{port}.log", "w")  # noqa: SIM115
    print(f"server log: {log.name}", file=sys.stderr)
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"`{' '.join(command)}` did not come up")
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return server, url
        except httpx.TransportError:
            time.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="a running server (default: start `gptoss serve` on the bundled model)")
    parser.add_argument("--model", help="the served model id (default: asked from /v1/models)")
    parser.add_argument("--examples", type=int, default=100, help="requests per operation and mode")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    server = None
    url = args.url
    if url is None:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        server, url = start_server([])
    try:
        model = args.model or httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        results = fuzz(url, model, args.examples)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    table = Table(title=f"schemathesis on {url} ({model}), {results['requests']} requests")
    table.add_column("operation")
    table.add_column("status codes")
    for operation, statuses in results["status_counts"].items():
        table.add_row(operation, ", ".join(f"{code}: {n}" for code, n in statuses.items()))
    console = Console()
    console.print(table)
    failures, slow = len(results["server_errors"]), len(results["slow"])
    console.print(f"5xx or no response: {failures}; slower than {SLOW_SECONDS:g} s: {slow}")
    for error in results["server_errors"] + results["slow"]:
        console.print(error)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=repr) + "\n")
    return 1 if results["server_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
