"""Live: a server with speculative decoding answers what a server without it answers, and reports
acceptance and tokens per forward pass in /metrics."""

from __future__ import annotations

import os

import httpx
import pytest
import torch

from gptoss import ops
from gptoss.inference import ModelRunner
from gptoss.inference.optimize import prepare_for_inference
from test_server_support import MODEL, live_server, tiny_server_model

pytestmark = pytest.mark.skipif(
    not ops.native_available() and not os.environ.get("GPTOSS_REQUIRE_NATIVE"),
    reason="native kernels not built: bit-for-bit verification is a property of the native path",
)

PROMPT = "The lighthouse keeper counted the ships, one by one, and wrote each name down. " * 6


@pytest.fixture(scope="module")
def model():
    return prepare_for_inference(tiny_server_model().to(torch.bfloat16))


def answers(model, tmp_path, **settings) -> tuple[list[str], str]:
    runner = ModelRunner(model, max_batch=2, context=1024, prefill_chunk=64)
    with live_server(runner, tmp_path, **settings) as live:
        client = live.client()
        texts = [
            client.completions.create(model=MODEL, prompt=PROMPT[i:], max_tokens=40, temperature=0)
            .choices[0]
            .text
            for i in range(3)
        ]
        texts.append(
            client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0.7, seed=5)
            .choices[0]
            .text
        )
        return texts, httpx.get(f"{live.url}/metrics").text


def test_speculative_server_answers_the_same_and_reports_acceptance(model, tmp_path):
    plain, plain_metrics = answers(model, tmp_path / "plain")
    fast, metrics = answers(model, tmp_path / "spec", speculative="suffix")
    assert fast == plain
    assert "gptoss_speculative" not in plain_metrics
    values = {
        line.split()[0]: float(line.split()[1])
        for line in metrics.splitlines()
        if line.startswith("gptoss_speculative")
    }
    assert values["gptoss_speculative_verify_passes_total"] > 0
    assert 0 <= values["gptoss_speculative_acceptance"] <= 1
    assert values["gptoss_speculative_tokens_per_forward"] >= 1
    assert (
        values["gptoss_speculative_emitted_tokens_total"]
        >= values["gptoss_speculative_accepted_tokens_total"]
    )
