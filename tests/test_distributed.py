"""Expert and tensor parallelism against one process: gloo ranks on CPU (torch.multiprocessing).

Each test starts its ranks once and runs several layouts in them (starting processes is what costs
here); rank 0 writes what every layout computed, and the test compares it with the same model run
in this process.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from conftest import free_port, random_model, tiny_config
from gptoss import load_model
from gptoss.cli import main
from gptoss.distributed import parallelize_for_inference
from gptoss.inference import Engine, ModelRunner, SamplingParams, SequenceFailure, SequenceRequest, generate
from gptoss.inference.mirror import MirroredRunner, control_group, follow
from gptoss.quant.mxfp4 import quantize_experts
from gptoss.train.checkpoints import latest_checkpoint
from gptoss.train.parallelize import check_degrees, clip_grad_norm_, init_distributed, parallelize
from gptoss.train.plot import read_metrics
from gptoss.train.trainer import TrainConfig, Trainer, train
from test_train import base_config, markov_data, tiny_model_file, torchrun  # noqa: F401 (fixtures)

# One thread per process: ranks share two cores, and OpenMP barriers between threads stall them.
pytestmark = pytest.mark.usefixtures("one_thread")

SEQ, WINDOWS = 12, 8  # each step: 8 windows of 12 tokens, split over the data-parallel ranks
LR = 0.5


def model_for(case: str) -> torch.nn.Module:
    """The tiny MoE (4 experts, top 2), fp32; "skewed": every token routed to experts 0 and 1, so
    experts 2 and 3 (and the ranks holding them) get no tokens at all; "one": top 1, every token
    routed to expert 3 alone."""
    model = random_model(tiny_config(num_experts_per_tok=1 if case == "one" else 2), seed=3).train()
    bias = {"skewed": [6.0, 5.0, -6.0, -6.0], "one": [-6.0, -6.0, -6.0, 6.0]}.get(case)
    if bias is not None:
        with torch.no_grad():
            for block in model.model.layers:
                block.mlp.router.weight.mul_(1e-3)
                block.mlp.router.bias.copy_(torch.tensor(bias))
    return model


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, 320, (WINDOWS, SEQ + 1), generator=torch.Generator().manual_seed(step))


def loss_of(model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    logits = model(windows[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())


def whole(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def train_two_steps(model: torch.nn.Module, rank: int, ranks: int, reduce: bool) -> dict:
    """Loss and gradients of step 1, clipped SGD, loss of step 2; each rank on its slice."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    out: dict = {}
    for step in (1, 2):
        per = WINDOWS // ranks
        loss = loss_of(model, batch(step)[rank * per : (rank + 1) * per])
        loss.backward()
        value = loss.detach().clone()
        if reduce:
            dist.all_reduce(value)
            value /= dist.get_world_size()
        out[f"loss{step}"] = float(value)
        if step == 1:
            out["grads"] = {name: whole(p.grad).clone() for name, p in model.named_parameters()}
            out["grad_norm"] = float(clip_grad_norm_(model, 1.0))
            optimizer.step()
            optimizer.zero_grad()
    return out


def reference(case: str) -> dict:
    return train_two_steps(model_for(case), 0, 1, reduce=False)


def _worker(rank: int, world: int, port: int, layouts: list, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    results = {}
    for name, kind, case, ep, tp in layouts:
        if kind == "train":
            info = init_distributed("cpu", expert_parallel=ep, tensor_parallel=tp)
            model = parallelize(model_for(case), info)
            results[name] = train_two_steps(model, info.data_rank, info.data_ranks, reduce=True)
            experts = model.get_parameter("model.layers.0.mlp.experts.gate_up_proj")
            results[name]["experts_local"] = tuple(experts.to_local().shape) if ep > 1 else None
        elif kind == "mirror":
            model = inference_model(case)
            parallelize_for_inference(model, tensor_parallel=tp, expert_parallel=ep)
            results[name] = mirror_phases(model, rank)
        else:
            model = inference_model(case)
            parallelize_for_inference(model, tensor_parallel=tp, expert_parallel=ep)
            results[name] = infer(model)
        dist.barrier()
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        torch.save(gathered, out)
    dist.barrier()
    dist.destroy_process_group()


def run_ranks(world: int, layouts: list, tmp_path: Path) -> list[dict]:
    port = free_port()
    out = str(tmp_path / "results.pt")
    mp.spawn(_worker, args=(world, port, layouts, out), nprocs=world, join=True)
    return torch.load(out, weights_only=False)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def assert_matches(got: dict, want: dict) -> None:
    for key in ("loss1", "loss2", "grad_norm"):
        assert got[key] == pytest.approx(want[key], rel=1e-5), key
    assert got["grads"].keys() == want["grads"].keys()
    for name, grad in want["grads"].items():
        assert relative_error(got["grads"][name], grad) < 1e-5, name


# ---------------------------------------------------------------------- inference
PROMPTS = [[5, 17, 42, 9, 100, 7], [3, 250, 11]]


def inference_model(case: str) -> torch.nn.Module:
    model = random_model(tiny_config(), seed=5)
    if case == "mxfp4":
        quantize_experts(model)
    return model.eval()


@torch.no_grad()
def infer(model: torch.nn.Module) -> dict:
    ids = torch.tensor([PROMPTS[0] * 2])
    tokens = generate(model, PROMPTS, max_new_tokens=12, temperature=0.0, stop_token_ids=())
    packed = [
        (str(b.dtype), tuple(b.shape)) for b in model.buffers() if b.dtype == torch.uint8 and b.dim() == 4
    ][:1]
    return {"logits": model(ids), "tokens": tokens, "packed": packed}


# ---------------------------------------------------------------------- one engine, mirrored
IDLE, CONTROL_TIMEOUT = 3.0, 2.0  # seconds: idle longer than a collective may wait


def mirror_phases(model: torch.nn.Module, rank: int) -> dict:
    """Rank 0 drives an engine over a `MirroredRunner`, rank 1 follows. Rank 1's runner has one row
    where rank 0's has two: a second sequence at once fails on rank 1 only."""
    group = control_group(CONTROL_TIMEOUT)
    runner = ModelRunner(model, max_batch=2 if rank == 0 else 1, context=64, kv_budget_bytes=2**24)
    if rank != 0:
        follow(runner, group)
        return {"followed": True}
    mirrored = MirroredRunner(runner, group, heartbeat=CONTROL_TIMEOUT / 4)
    engine = Engine(mirrored)
    params = SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=())

    def run(prompts: list[list[int]]) -> list:
        outputs: list = [[] for _ in prompts]
        for i, prompt in enumerate(prompts):
            engine.add(SequenceRequest(prompt, params, i))
        while engine.has_work:
            for _, event in engine.step():
                outputs[event.index] = (
                    event.message
                    if isinstance(event, SequenceFailure)
                    else [*outputs[event.index], event.token]
                )
        return outputs

    out = {"alone": [run([p])[0] for p in PROMPTS]}
    time.sleep(IDLE)  # only heartbeats reach rank 1 meanwhile
    out["after_idle"] = run([PROMPTS[0]])[0]
    out["one_rank_fails"] = run(PROMPTS)  # the second prompt finds no row on rank 1
    try:  # a call that fails on every rank: rank 0's own error
        mirrored.prefill(99, [], last=True)
    except ValueError as exc:
        out["every_rank_fails"] = str(exc)
    mirrored.release(99)
    out["after_failures"] = run([PROMPTS[1]])[0]
    mirrored.close()
    return out


# ---------------------------------------------------------------------- the tests
def test_two_ranks_expert_and_tensor_parallel_match_one_process(tmp_path):
    layouts = [
        ("ep2", "train", "random", 2, 1),
        ("ep2-skewed", "train", "skewed", 2, 1),
        ("ep2-one-expert", "train", "one", 2, 1),
        ("tp2", "train", "random", 1, 2),
        ("tp2-ep2", "train", "random", 2, 2),
        ("tp2-ep2-skewed", "train", "skewed", 2, 2),
        ("infer-tp2-ep2", "infer", "mxfp4", 2, 2),
        ("infer-ep2-dense", "infer", "random", 2, 1),
        ("mirror-tp2-ep2", "mirror", "mxfp4", 2, 2),
    ]
    ranks = run_ranks(2, layouts, tmp_path)
    for name, kind, case, ep, _ in layouts:
        if kind == "train":
            assert_matches(ranks[0][name], reference(case))
            if ep > 1:  # each rank holds half of the 4 experts: (2, hidden, 2 · intermediate)
                assert ranks[1][name]["experts_local"] == (2, 64, 128)
    with torch.no_grad():
        for name, case in (("infer-tp2-ep2", "mxfp4"), ("infer-ep2-dense", "random")):
            want = infer(inference_model(case))
            for rank in ranks:
                torch.testing.assert_close(rank[name]["logits"], want["logits"], rtol=1e-5, atol=1e-6)
                assert rank[name]["tokens"] == want["tokens"], name
    # MXFP4 experts stay packed: 2 of the 4 experts' uint8 blocks on each rank.
    assert ranks[1]["infer-tp2-ep2"]["packed"] == [("torch.uint8", (2, 128, 2, 16))]
    # One engine on rank 0, its runner calls repeated on rank 1: each prompt's tokens as one
    # process decodes it alone, also after an idle spell longer than the calls' group timeout and
    # after failures (on rank 1 only, named to the sequence; on every rank, rank 0's own error).
    with torch.no_grad():
        want = [generate(inference_model("mxfp4"), [p], 12, 0.0, stop_token_ids=())[0] for p in PROMPTS]
    got = ranks[0]["mirror-tp2-ep2"]
    assert got["alone"] == want and got["after_idle"] == want[0] and got["after_failures"] == want[1]
    assert got["one_rank_fails"] == [want[0], "prefill failed: RuntimeError"]
    assert got["every_rank_fails"] == "sequence 99 has no prefilled token to continue from"
    assert ranks[1]["mirror-tp2-ep2"] == {"followed": True}


def test_four_ranks_expert_and_tensor_parallel_with_fsdp_match_one_process(tmp_path):
    layouts = [
        ("ep2-fsdp2", "train", "random", 2, 1),
        ("ep4-skewed", "train", "skewed", 4, 1),
        ("tp2-fsdp2", "train", "random", 1, 2),
        ("tp2-ep2-fsdp2", "train", "random", 2, 2),
    ]
    ranks = run_ranks(4, layouts, tmp_path)
    for name, _, case, _, _ in layouts:
        assert_matches(ranks[0][name], reference(case))


# ---------------------------------------------------------------------- the trainer under torchrun
def ep_config(data: Path, model: Path, out: Path, **changes) -> TrainConfig:
    """4 steps of 8 windows in micro-batches of 2 (the same micro-batches at 1, 2 or 4 ranks, so the
    router losses do not change with the layout), checkpoints at 2 and 4."""
    return base_config(data, model, out, steps=4, micro_batch_size=2, eval_every=2, **changes)


def test_a_checkpoint_saved_at_ep2_resumes_at_ep1_and_ep4(markov_data, tiny_model_file, tmp_path):  # noqa: F811
    run = tmp_path / "ep2"
    torchrun(2, ep_config(markov_data, tiny_model_file, run, expert_parallel=2))
    saved = read_metrics(run)
    assert [r["step"] for r in saved] == [1, 2, 3, 4]
    # DCP stores the experts' global shapes: no file of the checkpoint says how they were split.
    for layout in ("ep1", "ep4"):
        out = tmp_path / layout
        shutil.copytree(run, out)
        shutil.rmtree(out / "checkpoints" / "step_00000004")  # as if the run had died after step 3
        config = ep_config(markov_data, tiny_model_file, out, resume=True)
        if layout == "ep1":
            resumed = train(config)
        else:
            torchrun(4, dataclasses.replace(config, expert_parallel=4))
            resumed = read_metrics(out)[2:]
        assert [r["step"] for r in resumed] == [3, 4]
        for got, want in zip(resumed, saved[2:], strict=True):
            for key in ("loss", "aux_loss", "z_loss", "grad_norm", "val_loss"):
                if key in want:
                    assert got[key] == pytest.approx(want[key], rel=1e-5), (layout, key)
    # The HF-layout model gathered from the expert shards is the one process's model.
    ids = torch.randint(0, 320, (2, 12))
    with torch.no_grad():
        got = load_model(latest_checkpoint(run) / "model")(ids)
        want = load_model(latest_checkpoint(tmp_path / "ep1") / "model")(ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_generate_under_torchrun_with_tp_and_ep_prints_what_one_process_prints(capsys):
    args = [
        "generate",
        "gptoss-nano",
        "Once upon a time",
        "--raw",
        "--max-tokens",
        "12",
        "--temperature",
        "0",
    ]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run(
        [*command, "-m", "gptoss.cli", *args, "--tp", "2", "--ep", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert main(args) == 0
    alone = capsys.readouterr().out
    assert result.stdout == alone and len(alone.strip()) > 0  # printed once (rank 0), the same text
    # Sampling without a seed: rank 0 draws one for every rank (else their tokens would part), and
    # says which: one process sampling with it prints the same text.
    sampled = [*args[:-1], "1", "--dtype", "float32", "--max-tokens", "24"]
    result = subprocess.run(
        [*command, "-m", "gptoss.cli", *sampled, "--tp", "2"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    seed = re.search(r"sampling seed (\d+) \(the same on every rank", result.stderr)
    assert seed is not None, result.stderr[-3000:]
    capsys.readouterr()
    assert main([*sampled, "--seed", seed[1]]) == 0
    assert result.stdout == capsys.readouterr().out
    # Degrees the launch does not provide are refused with the fix, before any model is loaded.
    assert main([*args, "--tp", "2"]) == 2
    assert "--tp 2 must equal the number of processes (1) or be 1" in capsys.readouterr().err


def test_degrees_the_launch_cannot_provide_are_refused(markov_data, tiny_model_file, tmp_path):  # noqa: F811
    for option, message in (
        (
            {"expert_parallel": 2},
            "expert_parallel 2 must be a positive divisor of the number of processes (1)",
        ),
        ({"tensor_parallel": 3}, "tensor_parallel 3 must be a positive divisor"),
    ):
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            Trainer(base_config(markov_data, tiny_model_file, tmp_path / "run", **option))
    with pytest.raises(ValueError, match="together they split the same ranks .* so they must be equal"):
        check_degrees(4, expert_parallel=2, tensor_parallel=4)


def test_the_trainer_with_tensor_parallelism_matches_one_process(markov_data, tiny_model_file, tmp_path):  # noqa: F811
    # The two ranks split attention by head (and, in the second run, the experts too) and take the
    # same windows: the micro-batches of one process.
    one = tmp_path / "one"
    config = base_config(markov_data, tiny_model_file, one, steps=3, save_every=3, eval_every=3)
    want = train(config)
    for layout, ep in (("tp2", 1), ("tp2-ep2", 2)):
        torchrun(
            2, dataclasses.replace(config, out=str(tmp_path / layout), tensor_parallel=2, expert_parallel=ep)
        )
        got = read_metrics(tmp_path / layout)
        assert [r["step"] for r in got] == [1, 2, 3]
        for a, b in zip(got, want, strict=True):
            for key in ("loss", "aux_loss", "z_loss", "grad_norm", "val_loss"):
                if key in b:
                    assert a[key] == pytest.approx(b[key], rel=1e-5), (layout, key)
    # The checkpoint holds whole tensors: the HF-layout model is the one process's.
    ids = torch.randint(0, 320, (2, 12))
    with torch.no_grad():
        got = load_model(latest_checkpoint(tmp_path / "tp2-ep2") / "model")(ids)
        want = load_model(latest_checkpoint(one) / "model")(ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
