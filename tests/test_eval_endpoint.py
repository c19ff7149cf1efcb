"""Endpoint mode against our own OpenAI-compatible server, started live on 127.0.0.1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gptoss.cli import main
from gptoss.eval import (
    EndpointModel,
    EndpointUnsupported,
    LocalModel,
    load_problems,
    run_humaneval,
    run_mmlu,
    run_perplexity,
)
from gptoss.inference import ModelRunner
from test_eval_humaneval import FAST
from test_eval_mmlu import CSV_LAYOUT, scripted_gpt_oss
from test_server_support import MODEL, ScriptedRunner, harmony, live_server

PREFERENCE = {" A": 1.0, " B": 2.0, " C": 4.0, " D": 3.0}


@pytest.fixture(scope="module")
def scripted_model():
    return scripted_gpt_oss(PREFERENCE)


@pytest.fixture(scope="module")
def model_server(scripted_model, tmp_path_factory):
    runner = ModelRunner(scripted_model, max_batch=4, context=1024, prefill_chunk=256)
    with live_server(runner, tmp_path_factory.mktemp("eval-model")) as server:
        yield server


class CountingRunner(ScriptedRunner):
    """Records how many sequences were in the server at once."""

    most_active = 0

    def prefill(self, seq, tokens, last):
        out = super().prefill(seq, tokens, last)
        self.most_active = max(self.most_active, len(self.active))
        return out


@pytest.fixture(scope="module")
def problems():
    return load_problems()[:4]


@pytest.fixture(scope="module")
def coder_server(problems, tmp_path_factory):
    """A server whose "model" writes each problem's canonical solution (HumanEval/3 wrong): as a
    harmony final answer in chat, as raw text with a trailing extra function in completions."""

    def script(prompt: str) -> list[int]:
        problem = next(p for p in problems if p["prompt"].strip() in prompt)
        body = problem["canonical_solution"] if problem["task_id"] != "HumanEval/3" else "    return 0\n"
        if "<|start|>user" in prompt:
            answer = f"```python\n{problem['prompt']}{body}```"
            return harmony(
                f"<|channel|>analysis<|message|>Easy.<|end|><|start|>assistant<|channel|>final<|message|>{answer}"
            )
        return harmony(body + "\n\ndef unrelated():\n    return 1\n")

    runner = CountingRunner(script, step_seconds=0.01)
    with live_server(runner, tmp_path_factory.mktemp("eval-coder")) as server:
        server.runner = runner
        yield server


def test_mmlu_through_the_endpoint_matches_the_local_model(model_server, scripted_model):
    endpoint = EndpointModel(f"{model_server.url}/v1", concurrency=4)
    assert endpoint.name == MODEL  # the server's only model, found through /v1/models
    remote = run_mmlu(endpoint, CSV_LAYOUT, shots=5, progress=False)
    local = run_mmlu(LocalModel(scripted_model), CSV_LAYOUT, shots=5, progress=False)
    assert remote.metrics == pytest.approx(local.metrics)
    assert remote.counts["unscored"] == 0
    for r, loc in zip(remote.records, local.records, strict=True):
        assert r["prediction"] == loc["prediction"] == "C"
        assert [r["logprobs"][k] for k in "ABCD"] == pytest.approx(
            [loc["logprobs"][k] for k in "ABCD"], abs=1e-3
        )


def test_letters_outside_the_top_logprobs_score_minus_infinity(model_server):
    endpoint = EndpointModel(f"{model_server.url}/v1", top_logprobs=2)
    [[a, b, c, d]] = endpoint.multiple_choice([("Question?\nAnswer:", (" A", " B", " C", " D"))])
    assert (a, b) == (float("-inf"), float("-inf"))
    assert c > d > -10


def test_perplexity_through_the_endpoint_matches_the_local_model(model_server, scripted_model, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("Some text to score, long enough to need several windows of sixteen tokens. " * 3)
    remote = run_perplexity(EndpointModel(f"{model_server.url}/v1"), text, window=16, progress=False)
    local = run_perplexity(LocalModel(scripted_model), text, window=16, progress=False)
    assert remote.metrics == pytest.approx(local.metrics, rel=1e-4)


def test_perplexity_says_clearly_when_a_server_cannot_score_prompts(coder_server, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("Some text to score.")
    with pytest.raises(EndpointUnsupported, match="does not return log-probabilities of the prompt"):
        run_perplexity(EndpointModel(f"{coder_server.url}/v1", model=MODEL), text, window=16, progress=False)


def test_humaneval_chat_through_the_endpoint_runs_requests_concurrently(coder_server, tmp_path):
    endpoint = EndpointModel(f"{coder_server.url}/v1", model=MODEL, concurrency=4)
    samples = tmp_path / "samples.jsonl"
    result = run_humaneval(endpoint, limit=4, samples_path=samples, limits=FAST, progress=False)
    assert result.metrics == {"pass@1": 0.75}
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    assert [r["passed"] for r in records] == [True, True, True, False]
    assert all(r["response"].startswith("```python") for r in records)  # the final answer, no reasoning
    assert coder_server.runner.most_active > 1


def test_humaneval_raw_completions_are_cut_at_the_stop_sequences(coder_server):
    endpoint = EndpointModel(f"{coder_server.url}/v1", model=MODEL, concurrency=2)
    result = run_humaneval(endpoint, chat=False, limit=4, limits=FAST, progress=False)
    assert result.metrics == {"pass@1": 0.75}


def test_the_cli_evaluates_an_endpoint_and_writes_json(model_server, tmp_path, capsys):
    out = tmp_path / "results"
    code = main(
        [
            "eval",
            "--endpoint",
            f"{model_server.url}/v1",
            "--task",
            "mmlu",
            "--data",
            str(CSV_LAYOUT),
            "--output",
            str(out),
            "--json",
            "--quiet",
        ]
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((out / f"mmlu-{MODEL}.json").read_text())
    assert printed == saved
    assert saved["counts"]["questions"] == 7 and saved["task"] == "mmlu"
    predictions = (out / f"mmlu-{MODEL}-predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 7 and json.loads(predictions[0])["prediction"] == "C"
    assert Path(saved["files"]["results"]) == out / f"mmlu-{MODEL}.json"


def test_the_cli_reports_an_unsupported_task_without_a_traceback(coder_server, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("Some text to score.")
    code = main(
        [
            "eval",
            "--endpoint",
            f"{coder_server.url}/v1",
            "--task",
            "perplexity",
            "--data",
            str(text),
            "--window",
            "16",
            "--output",
            str(tmp_path),
            "--quiet",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "need a local model" in err and "Traceback" not in err
