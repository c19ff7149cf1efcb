"""The trainer: losses, schedule, config files, MoE losses, checkpoints and exact resume."""

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gptoss.train.loss
from conftest import random_model, tiny_config
from gptoss import load_model
from gptoss.train.checkpoints import checkpoint_dirs, export_hf_model, latest_checkpoint
from gptoss.train.data import write_dataset
from gptoss.train.loss import linear_cross_entropy
from gptoss.train.plot import plot_runs, read_metrics
from gptoss.train.trainer import (
    RouterLosses,
    TrainConfig,
    Trainer,
    add_config_arguments,
    config_from_args,
    load_train_config,
    lr_multiplier,
    resolve_model_config,
    train,
)

GPTOSS = shutil.which("gptoss") or str(Path(sys.executable).with_name("gptoss"))
VOCAB = 320
# One thread per process, in here and in the processes we start: on a small machine shared with
# other jobs, OpenMP barriers between two threads stall for whole scheduler slices (a nano step took
# 2.5-7 s with two threads, 1-1.3 s with one, under load). Bitwise comparisons also need every run
# to use the same thread count.
ONE_THREAD = os.environ | {"OMP_NUM_THREADS": "1"}


# One thread for every test here (the bitwise comparisons need equal thread counts everywhere).
pytestmark = pytest.mark.usefixtures("one_thread")


def markov_tokens(n: int, seed: int) -> np.ndarray:
    """A stream over 40 of the ids where each id has 3 successors: learnable, entropy about ln 3."""
    rng = np.random.default_rng(0)
    successors = rng.integers(2, 42, size=(VOCAB, 3))
    draws = np.random.default_rng(seed).integers(0, 3, size=n)
    out = np.empty(n, dtype=np.int64)
    out[0] = 2
    for i in range(1, n):
        out[i] = successors[out[i - 1], draws[i]]
    return out


@pytest.fixture(scope="module")
def markov_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("markov")
    write_dataset(path, {"train": markov_tokens(40_000, 1), "val": markov_tokens(4_000, 2)}, VOCAB, eot_id=1)
    return path


@pytest.fixture(scope="module")
def tiny_model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny.json"
    path.write_text(json.dumps(tiny_config().to_hf()))
    return path


def base_config(data: Path, model: Path, out: Path, **changes) -> TrainConfig:
    """6 steps of 8 windows × 32 tokens, two micro-batches each, checkpoints at 2, 4, 6."""
    values = dict(
        data=str(data),
        model=str(model),
        out=str(out),
        steps=6,
        seq_len=32,
        batch_size=8,
        micro_batch_size=4,
        lr=1e-2,
        warmup_steps=2,
        eval_every=3,
        eval_windows=16,
        save_every=2,
        progress=False,
    )
    return TrainConfig(**(values | changes))


@pytest.fixture(scope="module")
def reference_dir(markov_data, tiny_model_file, tmp_path_factory) -> Path:
    """The uninterrupted run that resumed and distributed runs must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train(base_config(markov_data, tiny_model_file, out))
    return out


@pytest.fixture(scope="module")
def reference_run(reference_dir) -> list[dict]:
    return read_metrics(reference_dir)


DETERMINISTIC = ("step", "loss", "aux_loss", "z_loss", "lr", "grad_norm", "tokens", "val_loss")


def deterministic(records: list[dict]) -> list[dict]:
    return [{k: r[k] for k in DETERMINISTIC if k in r} for r in records]


# ---------------------------------------------------------------------- schedule, config
def test_warmup_then_cosine_to_the_floor():
    lrs = [lr_multiplier(s, warmup=10, total=110, min_ratio=0.1) for s in range(111)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55)  # half way through the decay
    assert lrs[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))


def test_config_file_then_command_line(tmp_path):
    (tmp_path / "run.toml").write_text(
        'data = "d"\nsteps = 50\nlr = 1e-3\nactivation_checkpointing = true\n'
        "[model_overrides]\nnum_hidden_layers = 2\n"
    )
    (tmp_path / "run.yaml").write_text("data: d\nsteps: 50\nsampling: random\n")
    config = load_train_config(tmp_path / "run.toml", steps=7)
    assert (config.data, config.steps, config.lr, config.activation_checkpointing) == ("d", 7, 1e-3, True)
    assert config.model_overrides == {"num_hidden_layers": 2}
    model = resolve_model_config(dataclasses.replace(config, model="gpt-oss-nano"))
    assert model.num_hidden_layers == 2 and len(model.layer_types) == 2 and model.hidden_size == 256
    assert load_train_config(tmp_path / "run.yaml").sampling == "random"
    with pytest.raises(ValueError, match="unknown training options"):
        load_train_config(tmp_path / "run.toml", stpes=3)
    with pytest.raises(ValueError, match="sampling"):
        load_train_config(sampling="sorted")

    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    add_config_arguments(parser)
    args = parser.parse_args(
        ["--config", str(tmp_path / "run.toml"), "--lr", "0.01", "--no-activation-checkpointing"]
    )
    config = config_from_args(args)
    assert (config.steps, config.lr, config.activation_checkpointing) == (50, 0.01, False)
    assert config.micro_batch_size == TrainConfig().micro_batch_size  # untouched options keep defaults


# ---------------------------------------------------------------------- MoE losses
def test_load_balance_is_one_when_balanced_and_grows_when_not():
    model = random_model(tiny_config())
    losses = RouterLosses(model)
    experts, k = 4, 2
    # Uniform logits, each expert chosen equally often.
    losses.records = [(torch.zeros(8, experts), torch.arange(16).reshape(8, k) % experts)]
    balance, z = losses.losses()
    assert balance.item() == pytest.approx(1.0)
    assert z.item() == pytest.approx(math.log(experts) ** 2)
    # Every token routed to experts 0 and 1, which also get most of the probability.
    logits = torch.tensor([[3.0, 3.0, 0.0, 0.0]]).repeat(8, 1)
    losses.records = [(logits, torch.tensor([[0, 1]]).repeat(8, 1))]
    assert losses.losses()[0].item() > 1.5


def test_padding_positions_leave_the_router_losses_unchanged():
    losses = RouterLosses(random_model(tiny_config()))
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 4, generator=generator)  # (B, T, E): the second row has 2 pads
    chosen = torch.randint(0, 4, (2, 6, 2), generator=generator)
    real = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    losses.records = [(logits.flatten(0, 1), chosen.flatten(0, 1))]
    padded = losses.losses(real)
    losses.records = [(logits[real], chosen[real])]
    data_only = losses.losses()
    for got, want in zip(padded, data_only, strict=True):
        torch.testing.assert_close(got, want)
    losses.records = [(logits.flatten(0, 1), chosen.flatten(0, 1))]
    assert losses.losses()[0] != pytest.approx(padded[0].item())  # the pads would have counted


def test_router_hooks_capture_each_layer_once_even_with_checkpointing():
    model = random_model(tiny_config()).train()
    from gptoss.train.parallelize import apply_activation_checkpointing

    apply_activation_checkpointing(model)
    assert [n for n, _ in model.named_parameters()] == [
        n for n, _ in random_model(tiny_config()).named_parameters()
    ]
    losses = RouterLosses(model)
    ids = torch.randint(0, VOCAB, (2, 9))
    with losses.capture():
        out = model(ids)
    assert len(losses.records) == 3  # one per layer
    balance, z = losses.losses()
    (out.sum() + balance + z).backward()  # recomputation during backward records nothing
    assert losses.records == []
    assert model.model.layers[0].mlp.router.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------- fused output head + loss
@pytest.mark.parametrize("mode", ["fp32", "autocast", "bf16"])
def test_chunked_linear_cross_entropy_equals_the_plain_one(mode, monkeypatch):
    monkeypatch.setattr(gptoss.train.loss, "CHUNK_ELEMENTS", 4096)  # 16-token chunks: many of them
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(70, 32, generator=generator)
    weight = torch.randn(300, 32, generator=generator) * 0.1
    targets = torch.randint(0, 300, (70,), generator=generator)
    if mode == "bf16":  # FSDP's mixed precision hands the head bf16 tensors
        hidden, weight = hidden.bfloat16(), weight.bfloat16()
    context = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "autocast" else contextlib.nullcontext()

    def run(loss_fn):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with context:
            loss = loss_fn(h, w)
        (loss * 0.5).backward()
        return loss.detach(), h.grad, w.grad

    fused = run(lambda h, w: linear_cross_entropy(h, w, targets))
    plain = run(lambda h, w: F.cross_entropy((h @ w.T).float(), targets, reduction="sum"))
    # fp32: the same arithmetic up to summation order. bf16: the gradient passes through bf16
    # once where plain autograd keeps the fp32 softmax gradient a little longer.
    tolerance = 1e-5 if mode == "fp32" else 1e-2
    for got, want in zip(fused, plain, strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(
            got.float(), want.float(), rtol=tolerance, atol=tolerance * want.abs().max().item()
        )
    with torch.no_grad():  # evaluation: the loss alone
        torch.testing.assert_close(
            linear_cross_entropy(hidden, weight, targets), plain[0].float(), rtol=1e-3, atol=0
        )


# ---------------------------------------------------------------------- training
def test_loss_falls_and_everything_is_logged(reference_run, tmp_path_factory):
    losses = [r["loss"] for r in reference_run]
    assert losses[0] == pytest.approx(math.log(VOCAB), abs=0.1)  # an untrained model is uniform
    assert losses[-1] < losses[0] - 1.0
    first = reference_run[0]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "aux_loss", "z_loss"):
        assert key in first and math.isfinite(first[key])
    assert [r["step"] for r in reference_run] == list(range(1, 7))
    assert [("val_loss" in r) for r in reference_run] == [False, False, True, False, False, True]
    assert reference_run[-1]["val_loss"] < reference_run[2]["val_loss"]
    assert reference_run[-1]["tokens"] == 6 * 8 * 32


def test_metrics_file_checkpoints_and_hf_model(reference_run, markov_data, tiny_model_file, tmp_path):
    out = tmp_path / "run"
    config = base_config(markov_data, tiny_model_file, out, steps=5, keep_last=2)
    trainer = Trainer(config)
    records = trainer.fit()
    trainer.close()
    assert deterministic(read_metrics(out)) == deterministic(records)
    assert [p.name for p in checkpoint_dirs(out)] == ["step_00000004", "step_00000005"]  # last 2 kept
    last = latest_checkpoint(out)
    assert json.loads((last / "trainer.json").read_text())["step"] == 5
    # The model part is a plain HF checkpoint that load_model reads back exactly.
    saved = load_model(last / "model")
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        assert torch.equal(saved(ids), trainer.model.eval()(ids))
    with pytest.raises(ValueError, match="--resume"):
        Trainer(config)  # a second run into the same directory must not clobber it


def test_accumulation_checkpointing_and_fused_loss_do_not_change_the_step(
    reference_run, markov_data, tiny_model_file, tmp_path
):
    def run(name, **change):
        config = base_config(markov_data, tiny_model_file, tmp_path / name, steps=3, save_every=0, **change)
        return train(config)

    def same(a, b):
        for got, want in zip(a, b, strict=True):
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)

    same(run("checkpointed", activation_checkpointing=True), reference_run[:3])
    same(run("plain logits", fused_loss=False), reference_run[:3])
    # The load-balancing loss is computed per micro-batch (its f·P product is not linear in the
    # batch), so splitting the batch differently only leaves the step unchanged without it.
    two = run("2 x 4", aux_loss_coef=0.0)
    same(run("1 x 8", micro_batch_size=8, aux_loss_coef=0.0), two)
    same(run("4 x 2", micro_batch_size=2, aux_loss_coef=0.0), two)
    assert not (tmp_path / "4 x 2" / "checkpoints").exists()  # save_every=0: never


def test_a_dense_member_trains_and_saves(markov_data, tmp_path):
    (tmp_path / "dense.json").write_text(json.dumps(tiny_config(num_local_experts=0).to_hf()))
    config = base_config(markov_data, tmp_path / "dense.json", tmp_path / "run", steps=2, eval_every=2)
    trainer = Trainer(config)
    records = trainer.fit()
    trainer.close()
    assert "aux_loss" not in records[-1] and math.isfinite(records[-1]["val_loss"])
    saved = load_model(latest_checkpoint(tmp_path / "run") / "model")
    assert not saved.config.is_moe
    ids = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        assert torch.equal(saved(ids), trainer.model.eval()(ids))


class Crash(Exception):
    pass


def test_resume_after_a_crash_is_bitwise_identical(reference_run, markov_data, tiny_model_file, tmp_path):
    config = base_config(markov_data, tiny_model_file, tmp_path / "run")
    trainer = Trainer(config)
    real_step = trainer.train_step

    def crash_after_step_5():
        if trainer.step == 5:
            raise Crash
        return real_step()

    trainer.train_step = crash_after_step_5
    with pytest.raises(Crash):
        trainer.fit()
    trainer.close()
    assert latest_checkpoint(tmp_path / "run").name == "step_00000004"
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3, 4, 5]

    resumed = train(dataclasses.replace(config, resume=True))
    assert [r["step"] for r in resumed] == [5, 6]
    # Bitwise on CPU: same batches (a function of the step), same state, deterministic kernels.
    assert deterministic(resumed) == deterministic(reference_run[4:])
    assert deterministic(read_metrics(tmp_path / "run")) == deterministic(reference_run)


KILLER = """
import os, signal, sys
from pathlib import Path

import gptoss.train.checkpoints as checkpoints
from gptoss.train.trainer import load_train_config, train

real_save_model, saves = checkpoints.save_model, []


def save_model_then_die(model, directory, *args, **kwargs):
    saves.append(directory)
    if len(saves) == 2:  # the step-4 checkpoint: its optimizer state is on disk, the model half-written
        Path(directory).mkdir(parents=True)
        (Path(directory) / "model.safetensors").write_bytes(b"half a tensor")
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save_model(model, directory, *args, **kwargs)


checkpoints.save_model = save_model_then_die
train(load_train_config(sys.argv[1]))
"""


def test_a_checkpoint_killed_mid_write_never_replaces_the_last_good_one(
    reference_run, markov_data, tiny_model_file, tmp_path
):
    out = tmp_path / "run"
    config = base_config(markov_data, tiny_model_file, out)
    (tmp_path / "run.toml").write_text(
        "\n".join(
            f"{k} = {json.dumps(v)}" for k, v in config.to_dict().items() if isinstance(v, str | int | float)
        )
    )
    killed = subprocess.run(
        [sys.executable, "-c", KILLER, str(tmp_path / "run.toml")],
        capture_output=True,
        text=True,
        timeout=120,
        env=ONE_THREAD,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [".tmp-step_00000004", "step_00000002"]
    assert (root / ".tmp-step_00000004" / "state").is_dir()  # it really died mid-write
    assert latest_checkpoint(out).name == "step_00000002"
    load_model(root / "step_00000002" / "model")  # the last good checkpoint is intact

    result = subprocess.run(
        [GPTOSS, "train", "--config", str(tmp_path / "run.toml"), "--resume"],
        capture_output=True,
        text=True,
        timeout=120,
        env=ONE_THREAD,
    )
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stderr and "step_00000002" in result.stderr
    assert not (root / ".tmp-step_00000004").exists()  # cleaned by the next save
    assert deterministic(read_metrics(out)) == deterministic(reference_run)


def test_plot_draws_a_png(reference_run, markov_data, tiny_model_file, tmp_path):
    out = tmp_path / "run"
    train(base_config(markov_data, tiny_model_file, out, steps=3, save_every=0))
    png = plot_runs([out])
    assert png == out / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


# ---------------------------------------------------------------------- torchrun + FSDP2 (gloo)
def torchrun(nproc: int, config: TrainConfig, *extra: str) -> subprocess.CompletedProcess:
    options = []
    for key, value in config.to_dict().items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            options.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, str | int | float):
            options += [flag, str(value)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    result = subprocess.run(
        [*command, "-m", "gptoss.cli", "train", *options, *extra], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def two_rank_run(markov_data, tiny_model_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp") / "run"
    torchrun(2, base_config(markov_data, tiny_model_file, out))
    return out


def test_two_ranks_with_fsdp_match_one_process(reference_run, reference_dir, two_rank_run):
    records = read_metrics(two_rank_run)
    assert [r["step"] for r in records] == list(range(1, 7))
    # Same global batch: each rank takes half the windows and FSDP averages the gradients. Only the
    # order of float additions differs (the reduce-scatter sums two halves), so the runs agree to
    # float32 rounding, amplified a little by six Adam steps: 1e-5 relative.
    for got, want in zip(records, reference_run, strict=True):
        for key in ("loss", "aux_loss", "z_loss", "grad_norm", "val_loss"):
            if key in want:
                assert got[key] == pytest.approx(want[key], rel=1e-5), key
    last = latest_checkpoint(two_rank_run)
    assert sorted(p.name for p in (last / "state").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    # The HF-layout model is gathered from the shards into one ordinary checkpoint.
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        got = load_model(last / "model")(ids)
        want = load_model(latest_checkpoint(reference_dir) / "model")(ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_sharded_state_exports_to_the_same_hf_model(two_rank_run, tmp_path):
    last = latest_checkpoint(two_rank_run)
    exported = load_model(export_hf_model(last, tmp_path / "exported"))
    gathered = load_model(last / "model")
    for (name, a), (_, b) in zip(exported.state_dict().items(), gathered.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_a_two_rank_checkpoint_resumes_in_one_process(markov_data, tiny_model_file, two_rank_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(two_rank_run, out)
    shutil.rmtree(out / "checkpoints" / "step_00000006")  # as if the run had died after step 5
    resumed = train(base_config(markov_data, tiny_model_file, out, resume=True))
    assert [r["step"] for r in resumed] == [5, 6]
    for got, want in zip(resumed, read_metrics(two_rank_run)[4:], strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)


# ---------------------------------------------------------------------- a real corpus, the real CLI
def test_nano_learns_python_from_the_standard_library(tmp_path):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    data, run = tmp_path / "data", tmp_path / "run"

    def gptoss(*args):
        result = subprocess.run(
            [GPTOSS, *map(str, args)], capture_output=True, text=True, timeout=300, env=ONE_THREAD
        )
        assert result.returncode == 0, result.stderr
        return result

    gptoss("prepare-data", stdlib / "json", stdlib / "email", "--pattern", "*.py", "--out", data,
           "--val-fraction", "0.1", "--workers", "1", "--quiet")  # fmt: skip
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["splits"]["train"]["tokens"] > 50_000 and manifest["splits"]["val"]["tokens"] > 1_000
    # Short windows and few steps keep it to seconds: 110M parameters, most in the 201,088-row tables.
    gptoss("train", "--data", data, "--model", "gpt-oss-nano", "--out", run, "--steps", 8,
           "--seq-len", 32, "--batch-size", 4, "--micro-batch-size", 4, "--lr", 6e-3, "--warmup-steps", 1,
           "--eval-every", 4, "--eval-windows", 4, "--save-every", 0, "--no-progress")  # fmt: skip
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, 9))
    uniform = math.log(201088)
    assert records[0]["loss"] == pytest.approx(uniform, abs=0.3)
    assert np.mean([r["loss"] for r in records[-2:]]) < uniform - 2.5
    assert records[-1]["val_loss"] < records[3]["val_loss"] < uniform - 1.0
    gptoss("plot", run)
    assert (run / "loss.png").is_file()
