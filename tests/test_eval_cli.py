"""`gptoss eval` on a local checkpoint: results JSON, per-sample records, resumption, tables."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from gptoss import save_model
from gptoss.cli import main
from test_cli import GPTOSS
from test_eval_mmlu import CSV_LAYOUT, real_vocab_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_model(real_vocab_model(), tmp_path_factory.mktemp("ckpt") / "tiny-eval")


def run_json(capsys, *args: str) -> dict:
    assert main(["eval", *args, "--json", "--quiet"]) == 0
    return json.loads(capsys.readouterr().out)


def test_mmlu_on_a_checkpoint(checkpoint, tmp_path, capsys):
    result = run_json(
        capsys,
        str(checkpoint),
        "--task",
        "mmlu",
        "--data",
        str(CSV_LAYOUT),
        "--shots",
        "2",
        "--subjects",
        "astronomy",
        "--output",
        str(tmp_path),
    )
    assert result["model"] == "tiny-eval" and result["config"]["shots"] == 2
    assert result["counts"]["questions"] == 3 and list(result["breakdown"]) == ["astronomy"]
    assert (tmp_path / "mmlu-tiny-eval.json").exists()
    assert len((tmp_path / "mmlu-tiny-eval-predictions.jsonl").read_text().splitlines()) == 3


def test_humaneval_on_a_checkpoint_resumes_without_generating_again(checkpoint, tmp_path, capsys):
    args = [
        str(checkpoint),
        "--task",
        "humaneval",
        "--mode",
        "raw",
        "--limit",
        "2",
        "--samples",
        "2",
        "--temperature",
        "1.0",
        "--max-tokens",
        "4",
        "--k",
        "1,2",
        "--timeout",
        "5",
        "--output",
        str(tmp_path),
    ]
    first = run_json(capsys, *args)
    samples = tmp_path / "humaneval-raw-tiny-eval-samples.jsonl"
    records = samples.read_text()
    assert len(records.splitlines()) == 4
    assert set(first["metrics"]) == {"pass@1", "pass@2"}
    assert first["counts"]["samples"] == 4 and first["files"]["samples"] == str(samples)
    second = run_json(capsys, *args)
    assert samples.read_text() == records  # nothing was generated or run again
    assert second["metrics"] == first["metrics"]


def test_humaneval_chat_mode_through_harmony(checkpoint, tmp_path, capsys):
    result = run_json(
        capsys,
        str(checkpoint),
        "--task",
        "humaneval",
        "--limit",
        "1",
        "--max-tokens",
        "4",
        "--reasoning-effort",
        "low",
        "--output",
        str(tmp_path),
    )
    assert result["config"]["chat"] is True and result["config"]["reasoning_effort"] == "low"
    [record] = [json.loads(line) for line in Path(result["files"]["samples"]).read_text().splitlines()]
    assert record["passed"] is False  # four random tokens do not solve HumanEval/0


def test_missing_data_is_a_clear_error(checkpoint, capsys):
    assert main(["eval", str(checkpoint), "--task", "mmlu"]) == 2
    assert "needs --data PATH" in capsys.readouterr().err


def test_the_console_script_prints_a_table(checkpoint, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("A short text to measure. " * 8)
    result = subprocess.run(
        [
            GPTOSS,
            "eval",
            str(checkpoint),
            "--task",
            "perplexity",
            "--data",
            str(text),
            "--window",
            "16",
            "--output",
            str(tmp_path / "out"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "perplexity · tiny-eval" in result.stdout
    assert "bits_per_byte" in result.stdout
    saved = json.loads((tmp_path / "out" / "perplexity-tiny-eval.json").read_text())
    assert saved["config"]["window"] == 16 and saved["config"]["stride"] == 8
    assert saved["counts"]["bytes"] == len(text.read_bytes())
