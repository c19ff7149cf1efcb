"""Supervised fine-tuning on harmony conversations: full fine-tuning or LoRA, on the one Trainer.

    result = finetune(SFTConfig(model="ckpt/", data="chats.jsonl", out="runs/sft", lora_rank=16))
    result["val_loss"], result["output"]        # runs/sft/adapter (LoRA) or runs/sft/model (full)

Data is JSONL, one OpenAI-style conversation per line: `{"messages": [...]}` with optional `tools`
and `reasoning_effort`. Assistant turns may carry `reasoning` (or `reasoning_content`, `thinking`),
which becomes the analysis channel, and `tool_calls`; tool results are `"role": "tool"` messages.
Each conversation is rendered by `harmony.render_for_training`, whose mask marks the tokens of the
final assistant turn: only those are learned.

Batching: one conversation per row, padded on the right to the longest row of its micro-batch (rows
of a step are sorted by length first, so little is padding). Causal attention means padding never
reaches a real token, and no conversation attends to another: there is no packing, which would need
an attention mask across document boundaries that the model's forward does not take. The loss is the
mean over every learned token of the step, however the step splits into micro-batches and ranks.

The loop is `gptoss.train.trainer.Trainer`'s: this module gives it the conversations (`Conversations`)
and the model with its adapters, so fine-tuning runs under torchrun with FSDP2, checkpoints and
resumes (`save_every`, `resume`), and adds the MoE routers' auxiliary losses, as pretraining does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import tomllib
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from gptoss.checkpoint import load_model, save_checkpoint
from gptoss.config import DEFAULT_MODEL
from gptoss.harmony import chat_messages_to_harmony, render_for_training
from gptoss.model import GptOss
from gptoss.quant.mxfp4 import dequantize_experts
from gptoss.tokenizer import get_tokenizer
from gptoss.train.checkpoints import full_model_copy
from gptoss.train.lora import DEFAULT_TARGETS, LoRAConfig, apply_lora, save_lora, trainable_parameters
from gptoss.train.loss import IGNORE_INDEX, causal_lm_loss
from gptoss.train.parallelize import init_distributed
from gptoss.train.trainer import METRICS, Batch, StepBatch, TrainConfig, Trainer, use_bf16
from gptoss.vocab import VocabularyFit

log = logging.getLogger(__name__)

RESULT = "result.json"


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class SFTConfig:
    """Everything a fine-tuning run needs. Load from TOML with `load_sft_config`."""

    data: str = _help('JSONL file of {"messages": [...]} conversations', default="")
    model: str = _help(
        "checkpoint directory to fine-tune (or a preset: random weights); default: the bundled model",
        default=DEFAULT_MODEL,
    )
    out: str = _help("output directory: model/ or adapter/, metrics.jsonl, result.json", default="runs/sft")
    val_data: str = _help(
        "JSONL file of validation conversations (default: hold out val_fraction)", default=""
    )
    val_fraction: float = _help("share of `data` held out for validation without val_data", default=0.05)
    lora_rank: int = _help("LoRA rank (0: full fine-tuning)", default=16)
    lora_alpha: float = _help("LoRA alpha: adapters are scaled by alpha / rank", default=32.0)
    lora_dropout: float = _help("dropout on the adapters' input", default=0.0)
    lora_targets: list[str] = _help(
        "name patterns of the LoRA targets: linears (q_proj, self_attn.*) and expert tensors "
        "(mlp.experts.gate_up_proj, mlp.experts.*)",
        default_factory=lambda: list(DEFAULT_TARGETS),
    )
    steps: int = _help("optimizer steps (0: as many as `epochs` passes over the data take)", default=0)
    epochs: float = _help("passes over the training conversations when steps is 0", default=1.0)
    seq_len: int = _help("longest conversation in tokens; longer ones are cut at the end", default=2048)
    batch_size: int = _help("conversations per optimizer step", default=8)
    micro_batch_size: int = _help("conversations per forward pass (gradients accumulate)", default=4)
    lr: float | None = _help("peak learning rate (default: 2e-4 with LoRA, 2e-5 for full)", default=None)
    min_lr_ratio: float = _help("final learning rate as a fraction of the peak", default=0.1)
    warmup_steps: int = _help("linear warmup steps before the cosine decay", default=10)
    weight_decay: float = _help("AdamW weight decay (matrices only)", default=0.0)
    beta1: float = _help("AdamW beta1", default=0.9)
    beta2: float = _help("AdamW beta2", default=0.999)
    eps: float = _help("AdamW epsilon", default=1e-8)
    grad_clip: float = _help("clip the global gradient norm to this (0: no clipping)", default=1.0)
    aux_loss_coef: float = _help("MoE load-balancing loss coefficient", default=0.01)
    z_loss_coef: float = _help("MoE router z-loss coefficient", default=0.001)
    precision: str = _help("'auto' (bf16 on GPU, fp32 on CPU), 'bf16' or 'fp32'", default="auto")
    activation_checkpointing: bool = _help("recompute each block in the backward pass", default=False)
    device: str = _help("'auto', 'cpu', 'cuda'", default="auto")
    seed: int = _help("seeds the adapters, the validation split and the data order", default=0)
    eval_every: int = _help("validation loss every N steps (and always at the end; 0: end only)", default=50)
    save_every: int = _help(
        "checkpoint every N steps and at the end, so that --resume can continue the run (0: never)",
        default=0,
    )
    keep_last: int = _help("checkpoints to keep", default=1)
    resume: bool = _help("continue from the latest checkpoint in `out`", default=False)
    save_dtype: str = _help("full fine-tuning: 'auto' (the base's dtype), 'bf16' or 'fp32'", default="auto")
    progress: bool = _help("show a progress bar", default=True)

    def __post_init__(self) -> None:
        problems = []
        if self.precision not in ("auto", "bf16", "fp32"):
            problems.append(f"precision must be 'auto', 'bf16' or 'fp32', not {self.precision!r}")
        if self.save_dtype not in ("auto", "bf16", "fp32"):
            problems.append(f"save_dtype must be 'auto', 'bf16' or 'fp32', not {self.save_dtype!r}")
        for name in ("seq_len", "batch_size", "micro_batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be positive")
        if self.steps < 0 or self.epochs <= 0 or self.lora_rank < 0:
            problems.append("steps and lora_rank must not be negative, epochs must be positive")
        if not 0 <= self.val_fraction < 1:
            problems.append(f"val_fraction must lie in [0, 1), not {self.val_fraction}")
        if problems:
            raise ValueError("invalid SFTConfig: " + "; ".join(problems))
        if self.lr is None:
            self.lr = 2e-4 if self.lora_rank else 2e-5

    def lora(self) -> LoRAConfig | None:
        if not self.lora_rank:
            return None
        return LoRAConfig(self.lora_rank, self.lora_alpha, self.lora_dropout, list(self.lora_targets))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_sft_config(path: str | Path | None = None, **overrides: Any) -> SFTConfig:
    """An `SFTConfig` from a TOML file (flat keys), with `overrides` applied on top."""
    values = tomllib.loads(Path(path).read_text()) if path is not None else {}
    values |= overrides
    known = {f.name for f in dataclasses.fields(SFTConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown fine-tuning options {unknown}; known: {', '.join(sorted(known))}")
    return SFTConfig(**values)


def add_sft_arguments(parser: argparse.ArgumentParser) -> None:
    """`--config` plus one `--option` per `SFTConfig` field; options given override the file."""
    parser.add_argument("--config", default=None, help="a TOML file of fine-tuning options")
    hints = typing.get_type_hints(SFTConfig)
    for f in dataclasses.fields(SFTConfig):
        hint = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": f.metadata["help"]}
        if hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif typing.get_origin(hint) is list:
            parser.add_argument(flag, nargs="+", **kwargs)
        else:
            if isinstance(hint, types.UnionType):  # `float | None`
                hint = next(a for a in typing.get_args(hint) if a is not type(None))
            parser.add_argument(flag, type=hint, **kwargs)


def sft_config_from_args(args: argparse.Namespace) -> SFTConfig:
    names = {f.name for f in dataclasses.fields(SFTConfig)}
    return load_sft_config(args.config, **{k: v for k, v in vars(args).items() if k in names})


# ---------------------------------------------------------------------- data
@dataclass(frozen=True)
class Example:
    """One rendered conversation: token ids (n,) and the loss mask (n,), True on tokens to learn."""

    tokens: np.ndarray
    mask: np.ndarray
    source: str  # where it came from: "FILE:LINE"

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def learned(self) -> int:
        """Tokens this conversation teaches (the first token is never a target)."""
        return int(self.mask[1:].sum())


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) of every non-blank line; a ValueError naming FILE:LINE on bad input."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg}, column {exc.colno})") from None
            if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
                raise ValueError(f'{path}:{number}: expected an object with a "messages" list')
            yield number, record


def _chat_message(message: Any) -> Mapping[str, Any]:
    if not isinstance(message, dict):
        raise ValueError(f"a message must be an object, not {message!r}")
    if message.get("role") == "assistant" and "thinking" in message and "reasoning" not in message:
        return {**message, "reasoning": message["thinking"]}
    return message


def encode_conversation(record: Mapping[str, Any]) -> tuple[list[int], list[bool]]:
    """Harmony tokens of one JSONL record and their loss mask; ValueError when it is malformed."""
    messages = [_chat_message(m) for m in record["messages"]]
    harmony = chat_messages_to_harmony(
        messages, record.get("tools"), reasoning_effort=record.get("reasoning_effort", "medium")
    )
    tokens, mask = render_for_training(harmony)
    if not any(mask):
        raise ValueError("no assistant message after the last user message: nothing to learn")
    return tokens, mask


def _respell(fit: VocabularyFit, tokens: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tokens a trimmed vocabulary lacks, spelled in bytes (`gptoss.vocab`), the mask following them."""
    outside = np.flatnonzero(~fit.has_row[tokens])
    if not len(outside):
        return tokens, mask
    lengths = np.ones(len(tokens), dtype=np.int64)
    tokenizer = get_tokenizer()
    lengths[outside] = [len(tokenizer.decode_single_token_bytes(int(tokens[i]))) for i in outside]
    return fit(tokens), np.repeat(mask, lengths)


def load_examples(path: str | Path, seq_len: int, fit: VocabularyFit | None = None) -> list[Example]:
    """Every conversation of a JSONL file, rendered (and respelled for a trimmed vocabulary).

    Conversations longer than `seq_len` + 1 tokens are cut at the end; those left with nothing to
    learn are dropped, with a warning that counts them.
    """
    examples, dropped = [], []
    for number, record in read_jsonl(path):
        try:
            tokens, mask = encode_conversation(record)
        except KeyError as exc:
            raise ValueError(f"{path}:{number}: a message lacks the field {exc}") from None
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}:{number}: {exc}") from None
        tokens, mask = np.asarray(tokens, dtype=np.int64), np.asarray(mask, dtype=bool)
        if fit is not None:
            tokens, mask = _respell(fit, tokens, mask)
        example = Example(tokens[: seq_len + 1], mask[: seq_len + 1], f"{path}:{number}")
        if example.learned:
            examples.append(example)
        else:
            dropped.append(number)
    if dropped:
        log.warning(
            "%s: dropped %d conversations whose assistant turn starts after %d tokens (lines %s); "
            "raise seq_len to keep them",
            path,
            len(dropped),
            seq_len,
            ", ".join(map(str, dropped[:5])) + (", ..." if len(dropped) > 5 else ""),
        )
    if not examples:
        raise ValueError(f"{path} holds no conversation to learn from")
    return examples


def split_validation(
    examples: list[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """(train, val): a seeded random `fraction` of the conversations (at least one) held out."""
    if fraction == 0 or len(examples) < 2:
        return examples, []
    order = np.random.default_rng(seed).permutation(len(examples))
    count = min(max(1, round(fraction * len(examples))), len(examples) - 1)
    held = set(order[:count].tolist())
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def collate(examples: Sequence[Example], pad_id: int) -> tuple[Tensor, Tensor]:
    """inputs (B, T) and targets (B, T) for conversations padded to the longest; targets are token
    ids where learned and IGNORE_INDEX elsewhere (prompt tokens and padding)."""
    width = max(len(e) for e in examples) - 1
    inputs = torch.full((len(examples), width), pad_id, dtype=torch.int64)
    targets = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.int64)
    for row, e in enumerate(examples):
        n = len(e) - 1
        inputs[row, :n] = torch.from_numpy(e.tokens[:-1])
        targets[row, :n] = torch.from_numpy(np.where(e.mask[1:], e.tokens[1:], IGNORE_INDEX))
    return inputs, targets


def micro_batches(examples: Sequence[Example], size: int) -> list[list[Example]]:
    """Longest first, `size` at a time: rows of similar length share a micro-batch."""
    ordered = sorted(examples, key=len, reverse=True)
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


def step_indices(count: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The conversations of optimizer step `step`: epochs of seeded permutations, read in order."""
    positions = range(step * batch_size, (step + 1) * batch_size)
    orders = {e: np.random.default_rng([seed, e]).permutation(count) for e in {p // count for p in positions}}
    return [int(orders[p // count][p % count]) for p in positions]


# ---------------------------------------------------------------------- what the trainer learns
class Conversations:
    """The fine-tuning objective: conversations padded into micro-batches, assistant tokens learned.

    A step's conversations (`step_indices`) are sorted longest first and dealt to the ranks in turn,
    so ranks get equal counts of similar lengths; each rank cuts its share into micro-batches.
    """

    def __init__(
        self, train: Sequence[Example], val: Sequence[Example], config: SFTConfig, pad_id: int
    ) -> None:
        self.train, self.val, self.config, self.pad_id = train, val, config, pad_id

    def _share(self, examples: Sequence[Example], rank: int, world_size: int) -> list[Batch]:
        mine = sorted(examples, key=len, reverse=True)[rank::world_size]
        batches = []
        for micro in micro_batches(mine, self.config.micro_batch_size):
            inputs, targets = collate(micro, self.pad_id)
            lengths = torch.tensor([len(e) - 1 for e in micro])
            batches.append(Batch(inputs, targets, torch.arange(inputs.shape[1]) < lengths[:, None]))
        return batches

    def step(self, step: int, rank: int, world_size: int) -> StepBatch:
        chosen = step_indices(len(self.train), self.config.batch_size, step, self.config.seed)
        examples = [self.train[i] for i in chosen]
        return StepBatch(
            self._share(examples, rank, world_size),
            targets=sum(e.learned for e in examples),
            tokens=sum(len(e) for e in examples),
        )

    def validation(self, rank: int, world_size: int) -> list[Batch]:
        batches = self._share(self.val, rank, world_size)
        # Every rank runs as many forward passes as the busiest (FSDP gathers weights in each):
        # a rank with fewer conversations adds one-token batches with nothing to learn.
        busiest = math.ceil(math.ceil(len(self.val) / world_size) / self.config.micro_batch_size)
        nothing = Batch(torch.full((1, 1), self.pad_id), torch.full((1, 1), IGNORE_INDEX))
        return batches + [nothing] * (busiest - len(batches))


# ---------------------------------------------------------------------- model
def prepare_model(model: GptOss, config: SFTConfig, bf16: bool) -> LoRAConfig | None:
    """Make `model` trainable as `config` says, in place; return the LoRA config (None: full).

    Full fine-tuning trains fp32 master weights (MXFP4 experts dequantized). LoRA freezes the base
    in the compute dtype and adds fp32 adapters (MXFP4 experts dequantized only where adapted).
    """
    lora = config.lora()
    if lora is None:
        dequantize_experts(model, torch.float32)
        model.float().requires_grad_(True)
        return None
    model.to(torch.bfloat16 if bf16 else torch.float32)
    targets = apply_lora(model, lora)
    log.info(
        "LoRA rank %d on %d targets: %s trainable parameters",
        lora.rank,
        len(targets),
        f"{trainable_parameters(model):,}",
    )
    return lora


@torch.no_grad()
def evaluate(
    model: GptOss, examples: Sequence[Example], micro_batch_size: int = 8, bf16: bool = False
) -> float:
    """Mean cross-entropy (nats) per learned token of `examples` (the model in eval mode meanwhile)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    for micro in micro_batches(examples, micro_batch_size):
        inputs, targets = (t.to(device) for t in collate(micro, model.config.pad_token_id))
        with autocast:
            total += causal_lm_loss(model, inputs, targets)
        count += sum(e.learned for e in micro)
    model.train(was_training)
    return float(total) / count


# ---------------------------------------------------------------------- the run
def _save_dtype(config: SFTConfig, base: torch.dtype) -> torch.dtype:
    return {"auto": base, "bf16": torch.bfloat16, "fp32": torch.float32}[config.save_dtype]


def train_config(config: SFTConfig, steps: int) -> TrainConfig:
    """The trainer's options of a fine-tuning run: those the two configs share, `steps` resolved."""
    shared = {f.name for f in dataclasses.fields(TrainConfig)} & {
        f.name for f in dataclasses.fields(SFTConfig)
    }
    # The result is written as model/ or adapter/ at the end, not into every checkpoint.
    return TrainConfig(
        **{name: getattr(config, name) for name in shared} | {"steps": steps, "hf_model": False}
    )


def finetune(config: SFTConfig, model: GptOss | None = None) -> dict[str, Any]:
    """Fine-tune `config.model` (or the `model` given) on `config.data`; write the result to `out`.

    Writes `out/model` (full fine-tuning: a checkpoint directory, in `save_dtype`) or `out/adapter`
    (LoRA: the adapters alone), `metrics.jsonl` (one record per step) and `result.json`, which is
    also returned: final train and validation loss, the validation loss before training, paths.
    A `model` passed in is trained in place (full fine-tuning leaves it in `save_dtype`). Under
    torchrun every rank calls it: FSDP2 shards the model, each rank takes its share of every step.
    """
    if not config.data:
        raise ValueError("no training data: set `data` (a JSONL file of conversations)")
    for path in filter(None, (config.data, config.val_data)):
        if not Path(path).is_file():
            raise FileNotFoundError(f"no such data file: {path}")
    info = init_distributed(config.device)
    if config.batch_size % info.world_size:
        raise ValueError(
            f"batch_size ({config.batch_size}) must be a multiple of the world size ({info.world_size})"
        )
    torch.manual_seed(config.seed)
    if model is None:
        model = load_model(config.model, device=info.device)
    model.to(info.device)
    base_dtype = model.lm_head.weight.dtype
    lora = prepare_model(model, config, use_bf16(config.precision, info.device))
    trainable = trainable_parameters(model)

    fit = VocabularyFit(model.model.token_ids.cpu()) if model.config.vocab_rows is not None else None
    train = load_examples(config.data, config.seq_len, fit)
    if config.val_data:
        val = load_examples(config.val_data, config.seq_len, fit)
    else:
        train, val = split_validation(train, config.val_fraction, config.seed)
    steps = config.steps or max(1, math.ceil(config.epochs * len(train) / config.batch_size))
    out = Path(config.out)
    if info.is_main:
        log.info(
            "fine-tuning %s (%s) on %d conversations (%d for validation), %d steps on %s",
            model.config.name,
            f"LoRA rank {lora.rank}" if lora else "full",
            len(train),
            len(val),
            steps,
            info.device,
        )
        out.mkdir(parents=True, exist_ok=True)
        (out / "sft_config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")

    objective = Conversations(train, val, config, model.config.pad_token_id)
    trainer = Trainer(train_config(config, steps), objective, model=model)
    try:
        history = trainer.fit(validate_first=True)
        trainer.model.eval()
        output = _write_output(trainer, config, lora is not None, base_dtype)
    finally:
        trainer.close()
    last = history[-1] if history else json.loads((out / METRICS).read_text().splitlines()[-1])
    result = {
        "train_loss": last["loss"],
        "val_loss": last.get("val_loss"),
        "initial_val_loss": trainer.initial_val_loss,
        "steps": steps,
        "train_conversations": len(train),
        "val_conversations": len(val),
        "trainable_params": trainable,
        "mode": "lora" if lora else "full",
        "output": str(output),
        "metrics": str(out / METRICS),
    }
    if info.is_main:
        (out / RESULT).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _write_output(trainer: Trainer, config: SFTConfig, lora: bool, base_dtype: torch.dtype) -> Path:
    """Save the fine-tuned model (full) or its adapters (LoRA) from rank 0, gathered from the shards
    when there are several ranks (every rank must call this)."""
    model, info = trainer.model, trainer.info
    if not lora:
        if info.sharded:
            model = full_model_copy(model)
        directory = Path(config.out) / "model"
        return (
            save_checkpoint(model.to(_save_dtype(config, base_dtype)), directory)
            if info.is_main
            else directory
        )
    parameters = None
    if info.sharded:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        parameters = get_model_state_dict(model, options=options)
    directory = Path(config.out) / "adapter"
    return save_lora(model, directory, config.model, parameters) if info.is_main else directory
