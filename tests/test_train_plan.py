"""`gptoss plan`: memory, checkpointing, FLOPs and GPU-hours of a run at scale, on paper."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_config
from gptoss import get_config
from gptoss.train.plan import (
    GPUS,
    communication_per_micro_batch,
    plan_training,
    recommend_layout,
    train_flops_per_token,
)

GPTOSS = shutil.which("gptoss") or str(Path(sys.executable).with_name("gptoss"))


def test_flops_are_three_forwards_averaged_over_positions():
    config = tiny_config(layer_types=["full_attention"] * 3)
    for seq_len in (1, 7, 64):
        mean = sum(config.flops_per_token(c) for c in range(1, seq_len + 1)) / seq_len
        assert train_flops_per_token(config, seq_len) == pytest.approx(3 * mean)
    # Full layers grow linearly with the context, so the mean is the value half way.
    assert train_flops_per_token(config, 65) == pytest.approx(3 * config.flops_per_token(33))


def test_moe_flops_come_from_active_parameters():
    dense, moe = get_config("gpt-oss-15b"), get_config("gpt-oss-90b")
    for config in (dense, moe):
        per_token = train_flops_per_token(config, 4096)
        assert 6 * config.active_params() < per_token < 1.2 * 6 * config.active_params()
    assert train_flops_per_token(moe, 4096) < 6 * moe.total_params() / 4


def test_memory_shards_over_gpus_and_time_follows_the_flops():
    config = get_config("gpt-oss-90b")
    small, big = plan_training(config, 15e12, 256), plan_training(config, 15e12, 1024)
    for key in ("weights_fp32", "grads_fp32", "optimizer_fp32"):
        assert small["memory_gib"][key] == pytest.approx(4 * big["memory_gib"][key])
    assert big["memory_gib"]["optimizer_fp32"] * 2**30 == pytest.approx(8 * config.total_params() / 1024)
    assert big["total_flops"] == pytest.approx(big["train_flops_per_token"] * 15e12)
    seconds = big["total_flops"] / (1024 * GPUS["h100"].bf16_tflops * 1e12 * 0.4)
    assert big["wall_clock_days"] == pytest.approx(seconds / 86400)
    assert big["gpu_hours"] == pytest.approx(seconds * 1024 / 3600)
    assert small["gpu_hours"] == pytest.approx(big["gpu_hours"])  # same work, 4x longer on 1/4 the GPUs
    faster = plan_training(config, 15e12, 1024, gpu="b200", mfu=0.5)
    assert faster["wall_clock_days"] == pytest.approx(big["wall_clock_days"] * 989 / 2250 * 0.4 / 0.5)


def test_checkpointing_is_asked_for_when_activations_do_not_fit():
    dense, moe = get_config("gpt-oss-15b"), get_config("gpt-oss-90b")
    assert plan_training(dense, 15e12, 1024, seq_len=4096)["activation_checkpointing"] == "none"
    assert plan_training(moe, 15e12, 1024, seq_len=4096)["activation_checkpointing"] == "per block"
    assert plan_training(dense, 15e12, 1024, seq_len=131072)["activation_checkpointing"] == "does not fit"
    assert plan_training(dense, 15e12, 1024, gpu="b200", seq_len=8192)["activation_checkpointing"] == "none"
    plan = plan_training(dense, 15e12, 1024)
    longest = plan["max_seq_len_no_checkpointing"]
    assert plan_training(dense, 15e12, 1024, seq_len=longest)["activation_checkpointing"] == "none"
    assert plan_training(dense, 15e12, 1024, seq_len=longest + 64)["activation_checkpointing"] == "per block"


def test_bad_arguments_are_refused():
    with pytest.raises(KeyError, match="unknown GPU"):
        plan_training(get_config("gpt-oss-15b"), 1e12, 8, gpu="v100")
    with pytest.raises(ValueError, match="mfu"):
        plan_training(get_config("gpt-oss-15b"), 1e12, 8, mfu=1.5)


def test_plan_command():
    command = [GPTOSS, "plan", "gpt-oss-15b", "gpt-oss-90b", "--tokens", "15e12", "--gpus", "1024"]
    table = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    assert "gpt-oss-90b" in table.stdout and "GPU-hours" in table.stdout
    report = json.loads(subprocess.run([*command, "--json"], capture_output=True, text=True).stdout)
    assert [r["model"] for r in report] == ["gpt-oss-15b", "gpt-oss-90b"]
    assert report[1] == plan_training(get_config("gpt-oss-90b"), 15e12, 1024)


# ---------------------------------------------------------------------- expert / tensor parallel layouts
def test_expert_parallelism_gathers_a_share_of_the_experts_and_sends_tokens():
    config = get_config("gpt-oss-90b")
    fsdp, ep8 = plan_training(config, 15e12, 1024), plan_training(config, 15e12, 1024, ep=8)
    experts_per_block = config.num_local_experts * config.expert_params()
    saved = fsdp["memory_gib"]["gathered_blocks_bf16"] - ep8["memory_gib"]["gathered_blocks_bf16"]
    assert saved * 2**30 == pytest.approx(2 * 2 * experts_per_block * (1 - 1 / 8))  # two bf16 blocks
    for key in ("weights_fp32", "grads_fp32", "optimizer_fp32"):  # still sharded over every GPU
        assert ep8["memory_gib"][key] == pytest.approx(fsdp["memory_gib"][key])
    # Each (token, expert) pair leaves for another GPU 7 times in 8, and comes back: forward,
    # backward and the checkpointed forward again (this plan needs per-block checkpointing).
    assert ep8["activation_checkpointing"] == "per block"
    pairs = 4096 * config.num_experts_per_tok * config.num_hidden_layers
    want = 2 * 3 * pairs * config.hidden_size * 2 * 7 / 8
    assert ep8["bytes_per_micro_batch"]["all_to_all"] == pytest.approx(want)
    assert fsdp["bytes_per_micro_batch"]["all_to_all"] == 0
    assert ep8["bytes_per_micro_batch"]["fsdp"] < fsdp["bytes_per_micro_batch"]["fsdp"] / 5
    tp = plan_training(get_config("gpt-oss-15b"), 15e12, 1024, tp=8)
    assert tp["bytes_per_micro_batch"]["tensor_parallel"] > 0
    assert tp["layout"] == {"ep": 1, "tp": 8, "fsdp_experts": 1024, "fsdp_dense": 128}


def test_expert_and_tensor_parallelism_on_the_same_gpus_move_no_tokens():
    config = get_config("gpt-oss-90b")
    tp8, both = plan_training(config, 15e12, 1024, tp=8), plan_training(config, 15e12, 1024, ep=8, tp=8)
    assert both["layout"] == {"ep": 8, "tp": 8, "fsdp_experts": 128, "fsdp_dense": 128}
    assert both["bytes_per_micro_batch"]["all_to_all"] == 0
    # A GPU keeps the activations of its experts' pairs only: here it no longer needs checkpointing.
    assert tp8["activation_checkpointing"] == "per block" and both["activation_checkpointing"] == "none"
    saved = tp8["memory_gib"]["gathered_blocks_bf16"] - both["memory_gib"]["gathered_blocks_bf16"]
    assert saved * 2**30 == pytest.approx(2 * 2 * config.num_local_experts * config.expert_params() * 7 / 8)
    # Beside attention's all-reduces, per MoE layer: the experts' partial sums in each forward (two
    # with checkpointing) and the gradients to the tokens (h) and routing weights (k) in backward.
    h, k, layers, tokens = config.hidden_size, config.num_experts_per_tok, config.num_hidden_layers, 4096
    for checkpointing, forwards in ((False, 1), (True, 2)):
        alone = communication_per_micro_batch(config, 1024, tokens, 1, 8, checkpointing)
        shared = communication_per_micro_batch(config, 1024, tokens, 8, 8, checkpointing)
        moe = (forwards + 1 + k / h) * layers * tokens * h * 2 * 2 * 7 / 8
        assert shared["tensor_parallel"] - alone["tensor_parallel"] == pytest.approx(moe)


def test_recommended_layouts():
    ninety = recommend_layout(get_config("gpt-oss-90b"), 15e12, 1024)
    assert ninety["recommended"]["ep"] == 8 and ninety["recommended"]["tp"] == 1
    assert {(p["layout"]["ep"], p["layout"]["tp"]) for p in ninety["layouts"]} >= {
        (1, 1),
        (8, 1),
        (1, 8),
        (8, 8),
    }
    # The dense member has no experts; splitting only its attention is not worth it.
    assert recommend_layout(get_config("gpt-oss-15b"), 15e12, 1024)["recommended"] == {
        "ep": 1, "tp": 1, "fsdp_experts": 1024, "fsdp_dense": 1024,
    }  # fmt: skip
    big = recommend_layout(get_config("gpt-oss-120b"), 15e12, 1024)
    assert big["recommended"]["ep"] > 1


def test_layouts_that_do_not_divide_are_refused():
    ninety, dense = get_config("gpt-oss-90b"), get_config("gpt-oss-15b")
    with pytest.raises(ValueError, match="must divide the experts"):
        plan_training(ninety, 1e12, 1024, ep=32)  # 48 experts
    with pytest.raises(ValueError, match="must divide the experts"):
        plan_training(dense, 1e12, 1024, ep=2)
    with pytest.raises(ValueError, match="ep 2 with tp 4: together they split the same GPUs"):
        plan_training(ninety, 1e12, 1024, ep=2, tp=4)
    with pytest.raises(ValueError, match="divisors of the GPU count"):
        plan_training(ninety, 1e12, 12, ep=8)


def test_plan_command_with_layouts():
    command = [GPTOSS, "plan", "gpt-oss-90b", "--tokens", "15e12", "--gpus", "1024"]
    table = subprocess.run([*command, "--recommend"], capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    assert "EP 8 × FSDP 128" in table.stdout and "recommended" in table.stdout
    report = json.loads(
        subprocess.run([*command, "--ep", "8", "--json"], capture_output=True, text=True).stdout
    )
    assert report[0] == plan_training(get_config("gpt-oss-90b"), 15e12, 1024, ep=8)
    bad = subprocess.run([*command, "--ep", "5"], capture_output=True, text=True)
    assert bad.returncode == 2 and "ep (5) and tp (1) must be positive divisors" in bad.stderr
