"""Training on the unlucky path: a corpus too small for a validation split, and resuming from
checkpoints that were truncated, bit-flipped or partly deleted (each named, the newest intact one
used instead), through the real `gptoss` command line."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_config
from gptoss.cli import main
from gptoss.tokenizer import Tokenizer
from gptoss.train.checkpoints import (
    MANIFEST,
    DamagedCheckpoint,
    checkpoint_dirs,
    export_hf_model,
    verify_checkpoint,
)
from gptoss.train.data import write_dataset
from gptoss.train.plot import read_metrics
from gptoss.train.trainer import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


# ---------------------------------------------------------------------- a 66-document corpus
def test_a_66_document_corpus_prepares_and_trains_to_the_end(tmp_path, capsys, caplog):
    """`prepare-data` at --val-fraction 0.05 leaves this corpus no validation document (its 66
    keys all hash to train); `train` must still run every step and write its final checkpoint."""
    rng = np.random.default_rng(0)
    words = [
        "the",
        "a",
        "model",
        "learns",
        "tokens",
        "from",
        "text",
        "and",
        "data",
        "every",
        "step",
        "of",
        "training",
    ]
    corpus = tmp_path / "corpus21.jsonl"
    with corpus.open("w") as f:
        for _ in range(66):
            f.write(json.dumps({"text": " ".join(rng.choice(words, size=40))}) + "\n")
    code, out = run_cli(
        ["prepare-data", str(corpus), "--out", str(tmp_path / "data"), "--val-fraction", "0.05", "--quiet"],
        capsys,
    )
    assert code == 0, out
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["splits"]["val"]["tokens"] == 0 and manifest["splits"]["train"]["documents"] == 66

    model = tmp_path / "model.json"
    config = tiny_config(vocab_size=Tokenizer.N_VOCAB, hidden_size=32, head_dim=16, intermediate_size=32)
    model.write_text(json.dumps(config.to_hf()))
    args = ["train", "--data", str(tmp_path / "data"), "--model", str(model), "--out", str(tmp_path / "run")]
    args += ["--steps", "3", "--seq-len", "16", "--batch-size", "2", "--micro-batch-size", "2"]
    args += ["--eval-every", "1", "--save-every", "2", "--no-progress", "--no-hf-model"]
    with caplog.at_level(logging.INFO):
        code, out = run_cli(args, capsys)
    assert code == 0, out
    no_validation = [r for r in caplog.records if "no validation" in r.getMessage()]
    assert len(no_validation) == 1 and "--val-fraction" in no_validation[0].getMessage()
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3] and not any("val_loss" in r for r in records)
    final = checkpoint_dirs(tmp_path / "run")[-1]
    assert final.name == "step_00000003" and verify_checkpoint(final) is None

    code, out = run_cli([*args[:-4], "--steps", "4", "--no-progress", "--no-hf-model", "--resume"], capsys)
    assert code == 0, out
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3, 4]


# ---------------------------------------------------------------------- damaged checkpoints
VOCAB = 320


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[TrainConfig, Path]:
    """3 steps, a checkpoint after each (step_1, step_2, step_3)."""
    root = tmp_path_factory.mktemp("damage")
    rng = np.random.default_rng(0)
    write_dataset(
        root / "data", {"train": rng.integers(2, VOCAB, 4000), "val": rng.integers(2, VOCAB, 400)}, VOCAB, 1
    )
    (root / "model.json").write_text(json.dumps(tiny_config().to_hf()))
    config = TrainConfig(
        data=str(root / "data"),
        model=str(root / "model.json"),
        out=str(root / "run"),
        steps=3,
        seq_len=16,
        batch_size=4,
        micro_batch_size=4,
        eval_every=0,
        save_every=1,
        hf_model=False,
        progress=False,
    )
    train(config)
    return config, root / "run"


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 8):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def distcp(step: Path) -> Path:
    return next((step / "state").glob("*.distcp"))


# What is done to the newest checkpoint, and what the warning must name.
DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated .distcp": (lambda s: truncate(distcp(s)), ".distcp has"),
    "flipped .distcp": (lambda s: flip(distcp(s)), "does not match its SHA-256"),
    "deleted state/.metadata": (lambda s: (s / "state" / ".metadata").unlink(), ".metadata is missing"),
    "truncated state/.metadata": (lambda s: truncate(s / "state" / ".metadata"), ".metadata has"),
    "truncated rng": (lambda s: truncate(s / "rng" / "rank_00000.pt"), "rank_00000.pt has"),
    "truncated trainer.json": (lambda s: truncate(s / "trainer.json"), "trainer.json has"),
    "truncated manifest": (lambda s: truncate(s / MANIFEST), "manifest.json is unreadable"),
    # Without a manifest nothing is verified up front; loading still names the damage.
    "no manifest, truncated .distcp": (
        lambda s: ((s / MANIFEST).unlink(), truncate(distcp(s))),
        "state cannot be loaded",
    ),
    "no manifest, truncated rng": (
        lambda s: ((s / MANIFEST).unlink(), truncate(s / "rng" / "rank_00000.pt")),
        "rank_00000.pt cannot be loaded",
    ),
    "no manifest, truncated trainer.json": (
        lambda s: ((s / MANIFEST).unlink(), truncate(s / "trainer.json")),
        "trainer.json cannot be read",
    ),
}


def copy_run(finished_run, tmp_path) -> tuple[TrainConfig, Path]:
    config, run = finished_run
    shutil.copytree(run, tmp_path / "run")
    return dataclasses.replace(config, out=str(tmp_path / "run"), steps=4, resume=True), tmp_path / "run"


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_resumed(
    case, finished_run, tmp_path, caplog
):
    config, run = copy_run(finished_run, tmp_path)
    damage, named = DAMAGE[case]
    damage(checkpoint_dirs(run)[-1])
    with caplog.at_level(logging.INFO):
        resumed = train(config)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step_00000003 is damaged" in w and named in w for w in warnings), warnings
    assert any("resumed from" in r.getMessage() and "step_00000002" in r.getMessage() for r in caplog.records)
    assert [r["step"] for r in resumed] == [3, 4]
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]
    assert [verify_checkpoint(step) for step in checkpoint_dirs(run)] == [
        None,
        None,
        None,
    ]  # step 3 rewritten


def test_resume_from_the_intact_previous_checkpoint_matches_an_undamaged_resume(finished_run, tmp_path):
    config, run = copy_run(finished_run, tmp_path / "damaged")
    flip(distcp(checkpoint_dirs(run)[-1]))
    damaged = train(config)
    clean_config, clean_run = copy_run(finished_run, tmp_path / "clean")
    shutil.rmtree(checkpoint_dirs(clean_run)[-1])
    clean = train(clean_config)
    assert [(r["step"], r["loss"]) for r in damaged] == [(r["step"], r["loss"]) for r in clean]


def test_a_torn_metrics_line_is_dropped_on_resume(finished_run, tmp_path, caplog):
    config, run = copy_run(finished_run, tmp_path)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 5.1')  # a crash mid-write
    with caplog.at_level(logging.WARNING):
        train(config)
    assert any("dropped 1 unreadable line" in r.getMessage() for r in caplog.records)
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]


def test_every_checkpoint_damaged_is_one_clear_error_naming_each(finished_run, tmp_path, capsys):
    config, run = copy_run(finished_run, tmp_path)
    steps = checkpoint_dirs(run)
    truncate(distcp(steps[0]))
    (steps[1] / "state" / ".metadata").unlink()
    flip(steps[2] / "trainer.json")
    args = ["train", "--data", config.data, "--model", config.model, "--out", str(run), "--resume"]
    args += [
        "--steps",
        "4",
        "--seq-len",
        "16",
        "--batch-size",
        "4",
        "--micro-batch-size",
        "4",
        "--no-progress",
    ]
    code, out = run_cli(args, capsys)
    assert code == 2
    assert "no intact checkpoint" in out and "Traceback" not in out
    for step, problem in zip(steps, (".distcp has", ".metadata is missing", "SHA-256"), strict=True):
        assert f"{step.name}: " in out and problem in out
    assert "--out" in out  # the way forward


def test_exporting_a_damaged_checkpoint_names_the_damage(finished_run, tmp_path):
    _, run = finished_run
    shutil.copytree(checkpoint_dirs(run)[-1], tmp_path / "step")
    flip(distcp(tmp_path / "step"))
    with pytest.raises(DamagedCheckpoint, match=r"\.distcp does not match its SHA-256"):
        export_hf_model(tmp_path / "step", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
