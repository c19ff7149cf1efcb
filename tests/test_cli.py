"""The `gptoss` console script, run as a user runs it."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import random_model, tiny_config
from gptoss import get_config, save_model
from gptoss.quant.mxfp4 import quantize_experts

GPTOSS = shutil.which("gptoss") or str(Path(sys.executable).with_name("gptoss"))


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([GPTOSS, *args], capture_output=True, text=True, timeout=120)


def test_info_json_for_every_preset():
    for name in ("gpt-oss-20b", "gpt-oss-120b", "gpt-oss-15b", "gpt-oss-90b", "gpt-oss-nano"):
        result = run("info", name, "--json")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        config = get_config(name)
        assert report["total_params"] == config.total_params()
        assert report["active_params"] == config.active_params()
        assert report["kv_cache_bytes_bf16"] == config.kv_cache_bytes()


def test_info_table_reads_like_a_model_card():
    result = run("info", "gpt-oss-20b")
    assert result.returncode == 0, result.stderr
    assert "20,914,757,184 (20.91B)" in result.stdout
    assert "3,608,307,264 (3.61B)" in result.stdout
    assert "12.82 GiB" in result.stdout  # weights with MXFP4 experts


def test_info_on_a_checkpoint_directory(tmp_path):
    save_model(quantize_experts(random_model(tiny_config())), tmp_path / "tiny-mxfp4")
    result = run("info", str(tmp_path / "tiny-mxfp4"), "--json", "--context", "64")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["total_params"] == tiny_config().total_params()
    assert report["checkpoint_format"].startswith("mxfp4 experts")
    assert report["kv_cache_context"] == 64


def test_info_on_something_unknown_fails_clearly():
    result = run("info", "gpt-oss-7b")
    assert result.returncode == 2
    assert "neither a checkpoint directory nor a preset" in result.stderr
    assert "gpt-oss-nano" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_imports_no_torch():
    """`gptoss --help` (and the parser of every command but train and finetune) loads neither torch
    nor the libraries behind the commands: each command imports what it uses when it runs."""
    script = (
        "import sys, contextlib, io\n"
        "from gptoss.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    try:\n"
        "        main(['--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "assert 'finetune' in out.getvalue()\n"
        "heavy = sorted(m for m in ('torch', 'numpy', 'openai', 'fastapi', 'tiktoken') if m in sys.modules)\n"
        "print(heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_serve_rejects_a_negative_prefix_cache_before_loading(capsys):
    from gptoss.cli import main

    assert main(["serve", "gptoss-nano", "--prefix-cache-gib", "-1"]) == 2
    assert "--prefix-cache-gib must be 0 (off) or more, got -1.0" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--kv-cache-gib", "0"], "--kv-cache-gib must be more than 0, got 0.0"),
        (["--max-model-len", "0"], "--max-model-len must be at least 1, got 0"),
    ],
)
def test_serve_rejects_a_kv_budget_or_context_it_cannot_use_before_loading(capsys, option, message):
    from gptoss.cli import main

    assert main(["serve", "gptoss-nano", *option]) == 2
    assert message in capsys.readouterr().err
