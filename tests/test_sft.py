"""Supervised fine-tuning: data and masks, padding, the loop, outputs, the CLI (finetune, merge)."""

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gptoss.train.loss
from conftest import random_model, tiny_config
from gptoss.checkpoint import load_model, save_checkpoint
from gptoss.cli import main
from gptoss.quant.mxfp4 import quantize_experts
from gptoss.tokenizer import Tokenizer, get_tokenizer
from gptoss.train.checkpoints import checkpoint_dirs
from gptoss.train.lora import load_lora
from gptoss.train.loss import IGNORE_INDEX, causal_lm_loss, linear_cross_entropy
from gptoss.train.sft import (
    Example,
    SFTConfig,
    collate,
    encode_conversation,
    evaluate,
    finetune,
    load_examples,
    load_sft_config,
    split_validation,
    step_indices,
)
from gptoss.trimmed_vocab import set_vocabulary
from gptoss.vocab import VocabularyFit, choose_vocabulary

# The whole o200k id space (harmony renders real token ids), kept cheap by a narrow model.
FULL_VOCAB = dict(vocab_size=201088, hidden_size=32, head_dim=8, intermediate_size=32)

WEATHER = {
    "tools": [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather of a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ],
    "messages": [
        {"role": "system", "content": "You answer questions about the weather."},
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "Hi! Ask me about the weather."},
        {"role": "user", "content": "What is the weather in Oslo?"},
        {
            "role": "assistant",
            "thinking": "I should look it up.",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "rainy, 7 degrees"},
        {"role": "assistant", "content": "It is rainy in Oslo, 7 degrees."},
    ],
}


# One thread for every test here (the bitwise comparisons need equal thread counts everywhere).
pytestmark = pytest.mark.usefixtures("one_thread")


def sums(i: int) -> dict:
    return {
        "messages": [
            {"role": "system", "content": "Answer with the number only."},
            {"role": "user", "content": f"What is {i} plus {i + 1}?"},
            {"role": "assistant", "reasoning": f"{i} + {i + 1} = {2 * i + 1}.", "content": str(2 * i + 1)},
        ]
    }


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sft")
    return {
        "train": write_jsonl(root / "train.jsonl", [sums(i) for i in range(16)]),
        "val": write_jsonl(root / "val.jsonl", [sums(i) for i in range(40, 44)]),
    }


def message_roles(tokens: list[int]) -> list[str]:
    """The role of the message each token belongs to, read from the rendered headers themselves."""
    tokenizer, roles, role = get_tokenizer(), [], "?"
    for i, token in enumerate(tokens):
        if token == Tokenizer.START:
            header = tokens[i + 1 : tokens.index(Tokenizer.MESSAGE, i)]
            text = tokenizer.decode(header)
            role = "tool" if text.startswith("functions.") else text.split("<|")[0].split()[0]
        roles.append(role)
    return roles


def loss_of(model, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    with torch.no_grad():
        return causal_lm_loss(model, inputs, targets).item()


# ---------------------------------------------------------------------- the masked fused loss
@pytest.mark.parametrize("frozen_head", [False, True])
def test_fused_loss_skips_ignored_targets(frozen_head, monkeypatch):
    monkeypatch.setattr(gptoss.train.loss, "CHUNK_ELEMENTS", 4096)  # several chunks
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(40, 16, generator=generator, requires_grad=True)
    weight = torch.randn(300, 16, generator=generator).mul_(0.1).requires_grad_(not frozen_head)
    targets = torch.randint(0, 300, (40,), generator=generator)
    targets[::3] = IGNORE_INDEX
    fused = linear_cross_entropy(hidden, weight, targets)
    (fused_hidden,) = torch.autograd.grad(fused, hidden, retain_graph=not frozen_head)
    plain = F.cross_entropy(hidden @ weight.T, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused_hidden, torch.autograd.grad(plain, hidden)[0], rtol=1e-5, atol=1e-6)
    assert (fused_hidden[::3] == 0).all()  # ignored rows get no gradient
    if frozen_head:
        assert not fused.grad_fn.next_functions[1][0]  # the frozen head is not in the graph
    else:
        plain = F.cross_entropy(hidden @ weight.T, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        torch.testing.assert_close(
            torch.autograd.grad(fused, weight)[0], torch.autograd.grad(plain, weight)[0], rtol=1e-5, atol=1e-6
        )
    everything_ignored = linear_cross_entropy(hidden, weight, torch.full((40,), IGNORE_INDEX))
    assert (
        everything_ignored.item() == 0 and torch.autograd.grad(everything_ignored, hidden)[0].abs().sum() == 0
    )


# ---------------------------------------------------------------------- data and masks
def test_loss_ignores_system_user_tool_and_earlier_turns():
    tokens, mask = encode_conversation(WEATHER)
    example = Example(np.array(tokens), np.array(mask), "weather")
    roles = message_roles(tokens)
    assert {"system", "developer", "user", "tool", "assistant"} <= set(roles)
    tokenizer = get_tokenizer()
    learned = tokenizer.decode([t for t, m in zip(tokens, mask, strict=True) if m])
    assert "I should look it up." in learned and '{"city": "Oslo"}' in learned
    assert "It is rainy in Oslo" in learned
    for text in ("weather in Oslo?", "rainy, 7 degrees", "Hi! Ask me", "answer questions", "Current weather"):
        assert text not in learned

    model = random_model(tiny_config(**FULL_VOCAB))
    inputs, targets = collate([example], pad_id=0)

    def with_targets_changed(positions: list[int]) -> float:
        changed = example.tokens.copy()
        changed[positions] = (changed[positions] + 1000) % 199998  # other ordinary tokens
        return loss_of(model, inputs, collate([Example(changed, example.mask, "x")], pad_id=0)[1])

    base = with_targets_changed([])
    earlier_answer = tokens.index(Tokenizer.START, tokens.index(tokenizer.encode("Hello")[0]))
    last_user = max(i for i, r in enumerate(roles) if r == "user")
    not_learned = [i for i, r in enumerate(roles) if i > 0 and (r != "assistant" or i < last_user)]
    assert earlier_answer + 5 in not_learned  # the first turn's answer is context only
    assert with_targets_changed(not_learned) == base
    final_answer = len(tokens) - 3  # a token of "It is rainy in Oslo, 7 degrees."
    reasoning = tokens.index(tokenizer.encode(" look")[0])
    for position in (final_answer, reasoning, len(tokens) - 1):  # ... and <|return|>
        assert roles[position] == "assistant"
        assert with_targets_changed([position]) != pytest.approx(base, abs=1e-3)


def test_thinking_is_the_analysis_channel():
    record = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "thinking": "Greet.", "content": "Hello"},
        ]
    }
    text = get_tokenizer().decode(encode_conversation(record)[0])
    assert "<|channel|>analysis<|message|>Greet.<|end|>" in text
    assert text.endswith("<|channel|>final<|message|>Hello<|return|>")


def test_bad_jsonl_is_reported_with_its_line(tmp_path):
    good = json.dumps(sums(1))
    cases = {
        "not json": [good, "", '{"messages": [}'],
        "no messages": [good, '{"text": "hello"}'],
        "bad role": [good, json.dumps({"messages": [{"role": "robot", "content": "x"}]})],
        "nothing to learn": [json.dumps({"messages": [{"role": "user", "content": "x"}]})],
        "no function": [json.dumps({"messages": [{"role": "assistant", "tool_calls": [{"id": "1"}]}]})],
    }
    expected = {
        "not json": r":3: not valid JSON",
        "no messages": r':2: expected an object with a "messages" list',
        "bad role": r":2: unsupported chat message role 'robot'",
        "nothing to learn": r":1: no assistant message",
        "no function": r":1: a message lacks the field 'function'",
    }
    for name, lines in cases.items():
        path = write_jsonl(tmp_path / f"{name}.jsonl", lines)
        with pytest.raises(ValueError, match=expected[name]):
            load_examples(path, seq_len=512)


def test_long_conversations_are_cut_or_dropped(tmp_path, caplog):
    long_question = {
        "messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}]
    }
    path = write_jsonl(tmp_path / "d.jsonl", [sums(1), long_question])
    examples = load_examples(path, seq_len=200)
    assert len(examples) == 1 and examples[0].source.endswith(":1")
    assert "dropped 1 conversations" in caplog.text and "(lines 2)" in caplog.text
    cut = load_examples(path, seq_len=len(examples[0]) - 3)[0]  # the answer loses its last tokens
    assert len(cut) == len(examples[0]) - 2 and 0 < cut.learned < examples[0].learned


def test_padding_changes_nothing_and_masks_the_pads():
    model = random_model(tiny_config(**FULL_VOCAB))
    a, b = (
        Example(np.array(t), np.array(m), str(i))
        for i, (t, m) in enumerate(map(encode_conversation, (sums(3), WEATHER)))
    )
    inputs, targets = collate([a, b], pad_id=7)
    assert inputs.shape == targets.shape == (2, len(b) - 1)
    assert (inputs[0, len(a) - 1 :] == 7).all() and (targets[0, len(a) - 1 :] == -100).all()
    assert (targets != -100).sum() == a.learned + b.learned
    together = loss_of(model, inputs, targets)
    alone = sum(loss_of(model, *collate([e], pad_id=7)) for e in (a, b))
    assert together == pytest.approx(alone, rel=1e-5)


def test_validation_split_and_epoch_order():
    examples = [Example(np.arange(4), np.ones(4, bool), str(i)) for i in range(20)]
    train, val = split_validation(examples, 0.1, seed=0)
    assert len(val) == 2 and len(train) == 18 and not {e.source for e in val} & {e.source for e in train}
    assert split_validation(examples, 0.1, seed=0) == (train, val)
    order = [i for step in range(4) for i in step_indices(18, 9, step, seed=3)]
    assert sorted(order[:18]) == list(range(18)) and sorted(order[18:]) == list(range(18))
    assert order[:18] != order[18:]  # each epoch reshuffled


def test_trimmed_vocabulary_respells_tokens_and_their_mask(tmp_path, data):
    tokens, mask = encode_conversation(sums(5))
    kept = choose_vocabulary(np.bincount(tokens[: len(tokens) // 2]), 300)  # later tokens often missing
    fit = VocabularyFit(kept)
    example = load_examples(data["train"], 512, fit)[5]
    tokenizer = get_tokenizer()
    assert fit.has_row[example.tokens].all() and len(example) > len(tokens)
    assert tokenizer.decode(example.tokens.tolist()) == tokenizer.decode(tokens)
    learned = [t for t, m in zip(tokens, mask, strict=True) if m]
    assert tokenizer.decode(example.tokens[example.mask].tolist()) == tokenizer.decode(learned)

    model = random_model(tiny_config(**FULL_VOCAB, vocab_rows=len(kept), tie_word_embeddings=True))
    set_vocabulary(model, torch.from_numpy(kept))
    config = SFTConfig(
        data=str(data["train"]), out=str(tmp_path / "run"), lora_rank=0, steps=2, batch_size=4, progress=False
    )
    result = finetune(config, model=model)
    assert np.isfinite(result["val_loss"])
    assert evaluate(load_model(result["output"]), load_examples(data["train"], 512, fit)) == pytest.approx(
        evaluate(model, load_examples(data["train"], 512, fit)), rel=1e-5
    )


# ---------------------------------------------------------------------- the loop
def test_full_fine_tuning_lowers_the_loss_and_writes_a_checkpoint(tmp_path, data):
    model = random_model(tiny_config(**FULL_VOCAB))
    examples = load_examples(data["train"], 512)
    before = evaluate(model, examples)
    config = SFTConfig(
        data=str(data["train"]),
        val_data=str(data["val"]),
        out=str(tmp_path / "run"),
        lora_rank=0,
        steps=12,
        batch_size=4,
        micro_batch_size=2,
        lr=3e-3,
        warmup_steps=2,
        eval_every=5,
        progress=False,
    )
    result = finetune(config, model=model)
    after = evaluate(model, examples)
    assert after < before - 1.0, (before, after)
    assert result["val_loss"] < result["initial_val_loss"]
    assert result["mode"] == "full"
    assert (result["train_conversations"], result["val_conversations"]) == (16, 4)

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    assert [r["step"] for r in records if "val_loss" in r] == [5, 10, 12]
    assert {"loss", "lr", "grad_norm", "learned_tokens", "tokens_per_s"} <= set(records[0])
    assert json.loads((tmp_path / "run" / "result.json").read_text()) == result
    assert evaluate(load_model(result["output"]), examples) == pytest.approx(after, rel=1e-5)


def test_finetune_and_merge_from_the_cli_on_an_mxfp4_base(tmp_path, data):
    base_dir = save_checkpoint(quantize_experts(random_model(tiny_config(**FULL_VOCAB))), tmp_path / "base")
    (tmp_path / "sft.toml").write_text(
        f'model = "{base_dir}"\ndata = "{data["train"]}"\nval_fraction = 0.25\nlora_rank = 4\n'
        'lora_targets = ["self_attn.*", "mlp.experts.*"]\nbatch_size = 4\nlr = 1e-2\nwarmup_steps = 1\n'
        'precision = "bf16"\nsteps = 100\n'
    )
    out = tmp_path / "run"
    options = ["--out", str(out), "--steps", "6", "--no-progress"]
    assert main(["finetune", "--config", str(tmp_path / "sft.toml"), *options]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 6 and result["mode"] == "lora"  # the option overrides the file
    assert result["val_loss"] < result["initial_val_loss"]
    adapter = Path(result["output"])
    adapter_bytes = sum(f.stat().st_size for f in adapter.iterdir())
    assert adapter_bytes < sum(f.stat().st_size for f in base_dir.iterdir()) / 20

    assert main(["merge", str(base_dir), str(adapter), str(tmp_path / "merged")]) == 0
    ids = torch.randint(0, 199998, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = load_lora(load_model(base_dir), adapter).eval()(ids)
        merged = load_model(tmp_path / "merged")(ids)
    assert (adapted - load_model(base_dir)(ids)).abs().max() > 1e-3  # training moved the adapters
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)


def test_config_file_errors(tmp_path):
    (tmp_path / "bad.toml").write_text("lora_rnk = 4\n")
    with pytest.raises(ValueError, match=r"unknown fine-tuning options \['lora_rnk'\]"):
        load_sft_config(tmp_path / "bad.toml")
    with pytest.raises(ValueError, match="precision"):
        SFTConfig(precision="fp16")
    assert SFTConfig(lora_rank=0).lr == 2e-5 and SFTConfig().lr == 2e-4
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):  # before loading any model
        finetune(SFTConfig(data=str(tmp_path / "missing.jsonl"), model="no-such-model"))


def test_lora_run_leaves_the_base_untouched(tmp_path, data):
    model = random_model(tiny_config(**FULL_VOCAB))
    base = copy.deepcopy(model)
    targets = ["q_proj", "mlp.experts.*"]
    config = SFTConfig(
        data=str(data["train"]),
        out=str(tmp_path / "run"),
        lora_rank=2,
        lora_targets=targets,
        steps=2,
        lr=1e-2,
    )
    finetune(config, model=model)
    adapted = dict(model.named_parameters())
    for name, param in base.named_parameters():
        torch.testing.assert_close(adapted[name], param, rtol=0, atol=0)
    assert any(p.abs().sum() > 0 for n, p in adapted.items() if n.endswith("lora_B"))


# ---------------------------------------------------------------------- torchrun + FSDP2, kill -9 + resume
# The processes started here run on one thread, as this module does (bitwise comparisons need it).
ONE_THREAD = os.environ | {"OMP_NUM_THREADS": "1"}
DETERMINISTIC = ("step", "loss", "aux_loss", "z_loss", "lr", "grad_norm", "learned_tokens", "val_loss")


def deterministic(records: list[dict]) -> list[dict]:
    return [{k: r[k] for k in DETERMINISTIC if k in r} for r in records]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A narrow model with rows for the ids of the data (a trimmed vocabulary): the 201,088-row
    head would be most of every step otherwise."""
    counts = np.bincount([t for i in [*range(16), *range(40, 44)] for t in encode_conversation(sums(i))[0]])
    kept = choose_vocabulary(counts, 400)
    model = random_model(tiny_config(**FULL_VOCAB, vocab_rows=len(kept)))
    set_vocabulary(model, torch.from_numpy(kept))
    return save_checkpoint(model, tmp_path_factory.mktemp("base") / "base")


def finetune_args(base_dir: Path, data: dict[str, Path], out: Path, mode: str, *extra: str) -> list[str]:
    """Four conversations a step in micro-batches of one, so each of two ranks accumulates two."""
    lora = ["--lora-rank", "4", "--lora-targets", "self_attn.*", "mlp.experts.*"] if mode == "lora" else []
    return ["finetune", "--model", str(base_dir), "--data", str(data["train"]),
            "--val-data", str(data["val"]), "--out", str(out), "--lora-rank", "0", *lora,
            "--batch-size", "4", "--micro-batch-size", "1", "--lr", "1e-2", "--warmup-steps", "1",
            "--eval-every", "2", "--no-progress", *extra]  # fmt: skip


def trained_tensors(run: Path, mode: str) -> dict[str, torch.Tensor]:
    if mode == "lora":
        from safetensors.torch import load_file

        return load_file(run / "adapter" / "adapter_model.safetensors")
    return load_model(run / "model").state_dict()


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_finetune_on_two_ranks_with_fsdp_matches_one_process(mode, base_dir, data, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(finetune_args(base_dir, data, one, mode, "--steps", "3")) == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run(
        [*torchrun, "-m", "gptoss.cli", *finetune_args(base_dir, data, two, mode, "--steps", "3")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 ranks" in result.stderr
    # Each rank takes half the conversations of a step and FSDP averages the gradients: the same
    # update up to the order of float additions, amplified a little by three Adam steps.
    got, want = metrics(two), metrics(one)
    assert [r["step"] for r in got] == [1, 2, 3] and [r["step"] for r in got if "val_loss" in r] == [2, 3]
    for a, b in zip(got, want, strict=True):
        assert a["learned_tokens"] == b["learned_tokens"]
        for key in ("loss", "aux_loss", "z_loss", "grad_norm", "val_loss"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5), key
    got_result, want_result = (json.loads((run / "result.json").read_text()) for run in (two, one))
    assert got_result["initial_val_loss"] == pytest.approx(want_result["initial_val_loss"], rel=1e-6)
    assert got_result["trainable_params"] == want_result["trainable_params"]
    # What the shards trained is gathered into the same output as one process writes.
    got_tensors, want_tensors = trained_tensors(two, mode), trained_tensors(one, mode)
    assert got_tensors.keys() == want_tensors.keys()
    for name, tensor in want_tensors.items():
        torch.testing.assert_close(got_tensors[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_finetune_killed_and_resumed_reproduces_its_losses_bitwise(base_dir, data, tmp_path):
    # LoRA: its checkpoints hold the adapters and their moments, not the frozen base. Dropout on the
    # adapters draws random numbers, so the checkpoints' RNG states must be restored too.
    mode = "lora"
    extra = ["--steps", "6", "--save-every", "2", "--lora-dropout", "0.1"]
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert main(finetune_args(base_dir, data, reference, mode, *extra)) == 0

    command = [sys.executable, "-m", "gptoss.cli", *finetune_args(base_dir, data, run, mode, *extra)]
    victim = subprocess.Popen(command, env=ONE_THREAD, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not ((run / "metrics.jsonl").is_file() and len(metrics(run)) >= 3):  # past the step-2 checkpoint
        assert victim.poll() is None, victim.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the run did not reach step 3"
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=30) == -signal.SIGKILL
    victim.stderr.close()
    assert not (run / "result.json").exists() and checkpoint_dirs(run)  # it died mid-run, after a checkpoint

    assert main(finetune_args(base_dir, data, run, mode, *extra, "--resume")) == 0
    assert deterministic(metrics(run)) == deterministic(metrics(reference))
    got_result, want_result = (json.loads((r / "result.json").read_text()) for r in (run, reference))
    for key in ("train_loss", "val_loss", "initial_val_loss", "steps"):
        assert got_result[key] == want_result[key], key
    got_tensors, want_tensors = trained_tensors(run, mode), trained_tensors(reference, mode)
    for name, tensor in want_tensors.items():
        assert torch.equal(got_tensors[name], tensor), name
