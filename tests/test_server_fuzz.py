"""A short schemathesis pass over the server's OpenAPI spec: `gptoss serve` on the bundled model,
live on 127.0.0.1, every operation with valid and invalid requests, and not one 5xx. The longer
run is `python benchmarks/fuzz_server.py` (its figures are in benchmarks/NOTES.md)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import httpx

from conftest import gptoss_serve

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from fuzz_server import fuzz  # noqa: E402  (a script of benchmarks/, shared with this test)


def test_fuzzing_the_openapi_spec_gives_no_5xx(tmp_path):
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    with gptoss_serve(
        ["--responses-db", str(tmp_path / "responses.sqlite3")], env, tmp_path / "serve.log"
    ) as port:
        url = f"http://127.0.0.1:{port}"
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        results = fuzz(url, model, examples=4, progress=False, derandomize=True)
    assert results["requests"] >= 40  # every operation was reached
    assert not any(
        "5" in code[:1] or code == "no response" for c in results["status_counts"].values() for code in c
    )
    assert results["server_errors"] == []
