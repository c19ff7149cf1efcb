"""The one training loop: pretraining and fine-tuning, `nano` on a laptop or a 90b under torchrun.

    trainer = Trainer(TrainConfig(data="data/", model="gpt-oss-nano", out="runs/nano", steps=1000))
    trainer.fit()

What a run learns is an `Objective`: this rank's micro-batches of (inputs, targets) for each step and
for validation. `Pretraining` reads windows of token shards; supervised fine-tuning
(`gptoss.train.sft`) gives harmony conversations whose targets are masked outside the assistant's
turn, and a model with LoRA adapters applied from outside. The loss is the same for both: summed
cross-entropy over the learned targets (`loss.causal_lm_loss`), divided by the step's learned targets
on all ranks, plus the MoE routers' auxiliary losses.

Each optimizer step's micro-batches accumulate gradients and FSDP averages them over ranks, so the
update is the same for any world size. Batches are a function of (seed, step), and the checkpoint
holds everything else, so `resume` continues exactly where the run stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import time
import tomllib
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from torch import Tensor
from torch.distributed.fsdp import register_fsdp_forward_method
from tqdm import tqdm

from gptoss.checkpoint import load_checkpoint, model_config
from gptoss.config import ModelConfig
from gptoss.model import GptOss, Router
from gptoss.train.checkpoints import (
    DamagedCheckpoint,
    checkpoint_dirs,
    latest_checkpoint,
    load_training_checkpoint,
    save_training_checkpoint,
)
from gptoss.train.data import Batches, TokenSplit, validation_windows
from gptoss.train.loss import IGNORE_INDEX, causal_lm_loss
from gptoss.train.parallelize import (
    DistInfo,
    all_reduce_mean,
    clip_grad_norm_,
    init_distributed,
    parallelize,
    shutdown,
)
from gptoss.train.plan import GPUS, train_flops_per_token
from gptoss.trimmed_vocab import trim_vocabulary

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class TrainConfig:
    """Everything a pretraining run needs. Load from TOML/YAML with `load_train_config`."""

    data: str = _help("dataset directory written by `gptoss prepare-data`", default="")
    model: str = _help(
        "preset name, checkpoint directory (its weights are the start), or a config.json file",
        default="gpt-oss-nano",
    )
    out: str = _help("run directory: metrics.jsonl and checkpoints/", default="runs/nano")
    model_overrides: dict[str, Any] = _help(
        "ModelConfig fields to change on top of `model` (a table in the config file)", default_factory=dict
    )
    steps: int = _help("optimizer steps in the whole run", default=1000)
    seq_len: int = _help("tokens per training window", default=1024)
    batch_size: int = _help("windows per optimizer step, all ranks together", default=32)
    micro_batch_size: int = _help("windows per forward pass on one rank", default=8)
    sampling: str = _help("'shuffled' (each window once per epoch) or 'random' windows", default="shuffled")
    lr: float = _help("peak learning rate", default=3e-4)
    min_lr_ratio: float = _help("final learning rate as a fraction of the peak", default=0.1)
    warmup_steps: int = _help("linear warmup steps before the cosine decay", default=100)
    weight_decay: float = _help("AdamW weight decay (matrices only; not biases, norms, sinks)", default=0.1)
    beta1: float = _help("AdamW beta1", default=0.9)
    beta2: float = _help("AdamW beta2", default=0.95)
    eps: float = _help("AdamW epsilon", default=1e-8)
    grad_clip: float = _help("clip the global gradient norm to this (0: no clipping)", default=1.0)
    aux_loss_coef: float = _help("MoE load-balancing loss coefficient", default=0.01)
    z_loss_coef: float = _help("MoE router z-loss coefficient", default=0.001)
    seed: int = _help("seeds initialisation and data order", default=0)
    precision: str = _help("'auto' (bf16 on GPU, fp32 on CPU), 'bf16' or 'fp32'", default="auto")
    activation_checkpointing: bool = _help("recompute each block in the backward pass", default=False)
    compile: bool = _help("torch.compile each block", default=False)
    expert_parallel: int = _help(
        "split each MoE layer's experts over this many ranks (tokens travel by all-to-all; equal to "
        "tensor_parallel: over its ranks, which share tokens)",
        default=1,
    )
    tensor_parallel: int = _help("split attention by head over this many ranks (they share data)", default=1)
    fused_loss: bool = _help(
        "output head and cross-entropy in chunks, never the whole (tokens × vocab) logits", default=True
    )
    device: str = _help("'auto', 'cpu', 'cuda'", default="auto")
    eval_every: int = _help("validation every N steps (0: only at the end)", default=100)
    eval_windows: int = _help("validation windows (a fixed set from the val split)", default=64)
    save_every: int = _help("checkpoint every N steps and at the end (0: never)", default=500)
    keep_last: int = _help("checkpoints to keep", default=3)
    hf_model: bool = _help("also write the model in HF layout into each checkpoint", default=True)
    peak_tflops: float | None = _help(
        "device peak for MFU (default: the GPU's bf16 peak, or a measured matmul on CPU)", default=None
    )
    progress: bool = _help("show a progress bar", default=True)
    resume: bool = _help("continue from the latest checkpoint in `out`", default=False)

    def __post_init__(self) -> None:
        problems = []
        if self.sampling not in ("shuffled", "random"):
            problems.append(f"sampling must be 'shuffled' or 'random', not {self.sampling!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            problems.append(f"precision must be 'auto', 'bf16' or 'fp32', not {self.precision!r}")
        for name in ("steps", "seq_len", "batch_size", "micro_batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be positive")
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_train_config(path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """A `TrainConfig` from a TOML or YAML file (flat keys), with `overrides` applied on top."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError as exc:
                raise ImportError("YAML training configs need PyYAML: pip install pyyaml") from exc
            values = yaml.safe_load(text) or {}
        else:
            values = tomllib.loads(text)
    values |= overrides
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown training options {unknown}; known: {', '.join(sorted(known))}")
    return TrainConfig(**values)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One `--option` per `TrainConfig` field (dict fields live only in the config file)."""
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        hint = hints[f.name]
        if typing.get_origin(hint) is dict:
            continue
        flag = "--" + f.name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": f.metadata["help"]}
        if hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            if isinstance(hint, types.UnionType):  # `float | None`
                hint = next(a for a in typing.get_args(hint) if a is not type(None))
            parser.add_argument(flag, type=hint, **kwargs)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The config file named by `args.config` (if any) overridden by the options given."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    return load_train_config(getattr(args, "config", None), **overrides)


# ---------------------------------------------------------------------- schedule and optimizer
def lr_multiplier(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1 over `warmup` steps, then cosine decay to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: GptOss, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, with weight decay on matrices only (not biases, norms,
    sinks).

    The fused kernel (CPU and GPU) makes one pass over parameters and moments where the foreach one
    makes one per operation, and the step is memory-bound.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]  # all but a LoRA run's frozen base
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps, fused=True
    )


# ---------------------------------------------------------------------- MoE auxiliary losses
class RouterLosses:
    """Load-balancing and z-losses from every router's logits, captured with forward hooks.

    model.py stays pure math: the hooks record each router's logits (N, E) and chosen experts (N, k)
    while `capture()` is active, so recomputation under activation checkpointing (which runs during
    backward, outside `capture()`) adds nothing.
    """

    def __init__(self, model: GptOss) -> None:
        self.records: list[tuple[Tensor, Tensor]] = []
        self.recording = False
        self.routers = [m for m in model.modules() if isinstance(m, Router)]
        for router in self.routers:
            router.register_forward_hook(self._hook)

    def _hook(self, module: Router, inputs: Any, outputs: tuple[Tensor, Tensor, Tensor]) -> None:
        if self.recording:
            self.records.append((outputs[0], outputs[1]))

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        self.records.clear()
        self.recording = True
        try:
            yield
        finally:
            self.recording = False

    def losses(self, real: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(load-balancing loss, z-loss), each averaged over layers; zeros for a dense model.

        Load balance (Switch Transformer): E · Σ_e f_e · P_e with f_e the fraction of routing slots
        that went to expert e and P_e its mean router probability; 1.0 when perfectly balanced.
        z-loss (ST-MoE): mean squared log-sum-exp of the logits, which keeps them from drifting large.
        `real` (B, T) bool: only those tokens count (padding is routed too, but is not data); as
        weights rather than a selection, so nothing is read back to the host.
        """
        if not self.records:
            zero = torch.zeros(())
            return zero, zero
        balance, z = [], []
        for logits, chosen in self.records:
            logits = logits.float()
            experts = logits.shape[-1]
            k = chosen.shape[-1]
            # (N,) token weights: 1 for data, 0 for padding
            weight = logits.new_ones(len(logits)) if real is None else real.reshape(-1).float()
            tokens = weight.sum()
            slots = torch.bincount(chosen.reshape(-1), weight.repeat_interleave(k), minlength=experts)
            fraction = slots / (tokens * k)
            probs = (torch.softmax(logits, dim=-1) * weight[:, None]).sum(0) / tokens
            z.append((torch.logsumexp(logits, dim=-1).pow(2) * weight).sum() / tokens)
            balance.append(experts * (fraction * probs).sum())
        self.records.clear()
        return torch.stack(balance).mean(), torch.stack(z).mean()


# ---------------------------------------------------------------------- what a run learns
class Batch(NamedTuple):
    """One micro-batch."""

    inputs: Tensor  # (B, T) token ids
    targets: Tensor  # (B, T) next-token ids, `IGNORE_INDEX` where nothing is learned
    real: Tensor | None = None  # (B, T) bool, False on padding (None: no padding)


@dataclass
class StepBatch:
    """This rank's micro-batches of one optimizer step, and counts over the whole step (all ranks)."""

    micro_batches: list[Batch]
    targets: int  # learned targets: the loss is their mean
    tokens: int  # tokens read, for throughput


class Objective(Protocol):
    """What a run learns from: a dataset cut into micro-batches, with the targets to learn.

    Every rank must get the same number of micro-batches (FSDP gathers each block at every forward),
    and a step's batches must be a function of the step alone, so a resumed run repeats them.
    """

    def step(self, step: int, rank: int, world_size: int) -> StepBatch: ...

    def validation(self, rank: int, world_size: int) -> list[Batch]: ...


class Pretraining:
    """Windows of `seq_len + 1` tokens from the shards of `config.data`: every token is a target."""

    def __init__(self, config: TrainConfig, info: DistInfo, model_config: ModelConfig) -> None:
        world = info.data_ranks
        if config.batch_size % (config.micro_batch_size * world):
            raise ValueError(
                f"batch_size ({config.batch_size}) must be a multiple of micro_batch_size "
                f"({config.micro_batch_size}) × data-parallel ranks ({world})"
            )
        self.micro_batch_size, self.seq_len = config.micro_batch_size, config.seq_len
        train_tokens = TokenSplit(config.data, "train")
        if train_tokens.vocab_size > model_config.vocab_size:
            raise ValueError(
                f"{config.data} was tokenized with {train_tokens.vocab_size} ids but the model has "
                f"only {model_config.vocab_size}"
            )
        val_tokens = TokenSplit(config.data, "val")
        self.val_windows = validation_windows(val_tokens, config.seq_len, config.eval_windows)
        if len(self.val_windows) < world and info.is_main:
            log.info(
                "no validation: the val split of %s holds %d window(s) of %d tokens for %d rank(s) "
                "(prepare the data with a larger --val-fraction to get one)",
                config.data,
                len(self.val_windows),
                config.seq_len + 1,
                world,
            )
        self.batches = Batches(train_tokens, config.seq_len, config.batch_size, config.seed, config.sampling)

    def _micro_batches(self, windows: np.ndarray) -> list[Batch]:
        if not len(windows):  # a validation split too short for every rank to get a window
            return []
        micros = torch.from_numpy(windows).split(self.micro_batch_size)
        return [Batch(micro[:, :-1], micro[:, 1:]) for micro in micros]

    def step(self, step: int, rank: int, world_size: int) -> StepBatch:
        count = self.batches.batch_size * self.seq_len
        return StepBatch(self._micro_batches(self.batches.batch(step, rank, world_size)), count, count)

    def validation(self, rank: int, world_size: int) -> list[Batch]:
        per_rank = len(self.val_windows) // world_size
        return self._micro_batches(self.val_windows[rank * per_rank : (rank + 1) * per_rank])


# ---------------------------------------------------------------------- model and MFU
def resolve_model_config(config: TrainConfig) -> ModelConfig:
    """The ModelConfig named by `config.model` (preset, checkpoint dir or config.json file)."""
    path = Path(config.model)
    if path.is_file():
        model = ModelConfig.from_hf(json.loads(path.read_text()), name=path.stem)
    else:
        model = model_config(config.model)
    overrides = dict(config.model_overrides)
    if "num_hidden_layers" in overrides:
        # The preset's layer pattern has its old length: rebuild it unless one is given.
        overrides.setdefault("layer_types", None)
    return model.replace(**overrides) if overrides else model


def _has_weights(source: str) -> bool:
    path = Path(source)
    return path.is_dir() and any(path.glob("*.safetensors"))


def build_model(
    config: TrainConfig, info: DistInfo, param_dtype: torch.dtype | None, model: GptOss | None = None
) -> GptOss:
    """The model given (a fine-tuning run's, adapters and all), else `config.model` initialised
    (seeded) or loaded; then parallelized onto `info.device`."""
    if model is not None:
        model.train()
    elif _has_weights(config.model):
        if config.model_overrides:
            raise ValueError("model_overrides cannot change a model whose weights are loaded")
        model = load_checkpoint(config.model, dtype=torch.float32, dequantize=True).train()
    elif info.sharded and info.device.type == "cuda":
        # Too big for one host at scale: build on the meta device, shard, then allocate each rank's
        # shard and initialise it through DTensor's RNG (the same on every rank for one seed).
        torch.manual_seed(config.seed)
        with torch.device("meta"):
            model = trim_vocabulary(GptOss(resolve_model_config(config)))
        parallelize(model, info, **_wrapping(config), param_dtype=param_dtype)
        model.to_empty(device=info.device)
        model.init_weights()
        return model.train()
    else:
        # The full model on every rank, seeded the same: identical to one process at any world size.
        model = trim_vocabulary(GptOss(resolve_model_config(config)))
        model.init_weights(torch.Generator().manual_seed(config.seed))
        model.train()
    if not info.sharded:
        model.to(info.device)
    return parallelize(model, info, **_wrapping(config), param_dtype=param_dtype)


def _wrapping(config: TrainConfig) -> dict[str, bool]:
    return {"activation_checkpointing": config.activation_checkpointing, "compile": config.compile}


def use_bf16(precision: str, device: torch.device) -> bool:
    """Whether to compute in bf16: asked for, or 'auto' on a GPU that has it."""
    return precision == "bf16" or (
        precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )


def peak_flops(device: torch.device, dtype: torch.dtype, override_tflops: float | None = None) -> float:
    """Peak FLOP/s of one device for MFU: given, the GPU's dense bf16 figure, or measured on CPU.

    A CPU has no published peak we could look up, so its peak is the best of a few large matmuls in
    the training dtype: MFU on CPU is then relative to what this machine's matmul actually reaches.
    """
    if override_tflops:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        for key, spec in GPUS.items():
            if key in name:
                return spec.bf16_tflops * 1e12
    n = 1024
    a = torch.randn(n, n, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ a
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


# ---------------------------------------------------------------------- the trainer
class Trainer:
    """Builds model, optimizer, schedule and data from a `TrainConfig`; `fit()` runs the steps.

    `objective` says what to learn (default: `Pretraining` on `config.data`); `model`, if given, is
    trained instead of building `config.model` (fine-tuning passes its base, adapters applied).
    """

    def __init__(
        self, config: TrainConfig, objective: Objective | None = None, model: GptOss | None = None
    ) -> None:
        self.config = config
        self.info = init_distributed(config.device, config.expert_parallel, config.tensor_parallel)
        torch.manual_seed(config.seed)
        self.device = self.info.device
        self.run_dir = Path(config.out)
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if latest_checkpoint(self.run_dir) and not config.resume:
            raise ValueError(
                f"{self.run_dir} already holds checkpoints: pass --resume to continue that run, or choose "
                "another --out"
            )
        bf16 = use_bf16(config.precision, self.device)
        self.compute_dtype = torch.bfloat16 if bf16 else torch.float32
        # Sharded: FSDP's mixed-precision policy casts the gathered weights; one process: autocast.
        param_dtype = self.compute_dtype if bf16 and self.info.sharded else None
        self.autocast = bf16 and not self.info.sharded

        self.model_config = model.config if model is not None else resolve_model_config(config)
        self.objective = objective or Pretraining(config, self.info, self.model_config)
        self.model = build_model(config, self.info, param_dtype, model)
        if self.info.sharded:
            # The fused loss reads the hidden states and the head's weight outside `forward`.
            register_fsdp_forward_method(self.model, "hidden_states")
        # A LoRA run checkpoints what it trains, not the frozen base it was given.
        self.trainable_only = any(not p.requires_grad for p in self.model.parameters())
        self.router_losses = RouterLosses(self.model)
        self.optimizer = build_optimizer(self.model, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: lr_multiplier(step, config.warmup_steps, config.steps, config.min_lr_ratio),
        )
        self.step = 0
        self.tokens_seen = 0
        self.initial_val_loss: float | None = None  # before the first step, when `fit` was asked for it
        self.flops_per_token = train_flops_per_token(self.model_config, config.seq_len)
        self.peak = peak_flops(self.device, self.compute_dtype, config.peak_tflops)

    # ------------------------------------------------------------------ state
    def trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "scheduler": self.scheduler.state_dict(),
            "data": {
                "seed": self.config.seed,
                "next_batch": self.step,
                "sampling": self.config.sampling,
                "seq_len": self.config.seq_len,
                "batch_size": self.config.batch_size,
            },
            "initial_val_loss": self.initial_val_loss,
            "world_size": self.info.world_size,
            "config": self.config.to_dict(),
            "model_config": self.model_config.to_hf(),
        }

    def save(self) -> Path:
        return save_training_checkpoint(
            self.run_dir,
            self.step,
            self.model,
            self.optimizer,
            self.trainer_state(),
            self.info,
            keep_last=self.config.keep_last,
            hf_model=self.config.hf_model,
            trainable_only=self.trainable_only,
        )

    def resume(self) -> Path | None:
        """Restore the newest intact checkpoint of the run directory, if there is one.

        A damaged checkpoint is skipped with a warning that names what is wrong with it, and the
        next older one is tried; if every one is damaged, `DamagedCheckpoint` lists them all.
        """
        problems = []
        for path in reversed(checkpoint_dirs(self.run_dir)):
            try:
                self._restore(path)
            except DamagedCheckpoint as exc:
                problems.append(f"{path.name}: {exc}")
                if self.info.is_main:
                    log.warning("checkpoint %s is damaged, skipping it: %s", path.name, exc)
                continue
            return path
        if problems:
            raise DamagedCheckpoint(
                f"no intact checkpoint in {self.run_dir / 'checkpoints'} ({'; '.join(problems)}); "
                "start over with another --out, or move the damaged checkpoints away to train from scratch"
            )
        return None

    def _restore(self, path: Path) -> None:
        state = load_training_checkpoint(
            path, self.model, self.optimizer, self.info, trainable_only=self.trainable_only
        )
        try:
            self.scheduler.load_state_dict(state["scheduler"])
            self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
            self.initial_val_loss = state.get("initial_val_loss")
            data = state["data"]
            changed = {
                k: (data[k], v)
                for k in ("seed", "sampling", "seq_len", "batch_size")
                if data[k] != (v := getattr(self.config, k))
            }
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DamagedCheckpoint(f"{path / 'trainer.json'} lacks a valid {exc}") from exc
        if changed and self.info.is_main:
            log.warning("resuming with changed data settings %s: batches will differ from the run's", changed)

    def _truncate_metrics(self, step: int) -> None:
        """Drop records logged after the checkpoint (those steps run again), and a line torn by a
        crash mid-write."""
        path = self.run_dir / METRICS
        if not path.is_file():
            return
        kept, torn = [], 0
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
                step_of = int(record["step"])
            except (ValueError, KeyError, TypeError):
                torn += 1
                continue
            if step_of <= step:
                kept.append(line)
        if torn:
            log.warning("dropped %d unreadable line(s) of %s (a write cut short by a crash)", torn, path)
        path.write_text("".join(line + "\n" for line in kept))

    # ------------------------------------------------------------------ steps
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _to_device(self, batch: Batch) -> Batch:
        if self.device.type != "cuda":
            return batch
        return Batch(
            *(None if t is None else t.pin_memory().to(self.device, non_blocking=True) for t in batch)
        )

    def _loss(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """Summed cross-entropy of one micro-batch (call under autocast and router capture)."""
        return causal_lm_loss(self.model, inputs, targets, fused=self.config.fused_loss)

    def train_step(self) -> dict[str, float]:
        """One optimizer step on batch `self.step`; returns its metrics (global means over ranks)."""
        config, world = self.config, self.info.data_ranks  # tensor-parallel peers share their data
        start = time.perf_counter()
        batch = self.objective.step(self.step, self.info.data_rank, world)
        # FSDP averages gradients over ranks: scaling each rank's sum by world / (the step's learned
        # targets) makes the update the mean over every learned target, however the step is split.
        scale = world / batch.targets
        micros = len(batch.micro_batches)
        sums = torch.zeros(3, device=self.device)  # cross-entropy sum, load balance, z-loss
        for micro in batch.micro_batches:
            inputs, targets, real = self._to_device(micro)
            with self._autocast(), self.router_losses.capture():
                ce = self._loss(inputs, targets)
            balance, z = (t.to(self.device) / micros for t in self.router_losses.losses(real))
            loss = ce * scale + config.aux_loss_coef * balance + config.z_loss_coef * z
            loss.backward()
            sums += torch.stack([ce.detach(), balance.detach(), z.detach()])
        clip = config.grad_clip if config.grad_clip > 0 else float("inf")
        grad_norm = clip_grad_norm_(self.model, clip)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        means = all_reduce_mean(sums, self.info).tolist()
        elapsed = time.perf_counter() - start
        self.step += 1
        self.tokens_seen += batch.tokens
        metrics = {
            "step": self.step,
            "loss": means[0] * world / batch.targets,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens": self.tokens_seen,
            "learned_tokens": batch.targets,
            "tokens_per_s": batch.tokens / elapsed,
            "mfu": batch.tokens * self.flops_per_token / elapsed / (self.peak * self.info.world_size),
            "step_time_s": elapsed,
        }
        if self.router_losses.routers:
            metrics |= {"aux_loss": means[1], "z_loss": means[2]}
        return metrics

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean cross-entropy per learned target of the validation batches (None when there are none)."""
        was_training = self.model.training
        self.model.eval()
        sums = torch.zeros(2, device=self.device, dtype=torch.float64)  # cross-entropy, targets
        for micro in self.objective.validation(self.info.data_rank, self.info.data_ranks):
            inputs, targets, _ = self._to_device(micro)
            with self._autocast():
                sums[0] += self._loss(inputs, targets)
            sums[1] += (targets != IGNORE_INDEX).sum()
        self.model.train(was_training)
        total, count = all_reduce_mean(sums, self.info).tolist()
        return total / count if count else None

    # ------------------------------------------------------------------ the loop
    def fit(self, validate_first: bool = False) -> list[dict[str, Any]]:
        """Run (or continue) training to `config.steps`; return the metrics logged by this call.

        `validate_first`: measure the validation loss before the first step (`initial_val_loss`,
        kept in checkpoints so a resumed run still knows it).
        """
        config, main = self.config, self.info.is_main
        if config.resume:
            path = self.resume()
            if main:
                log.info(
                    "resumed from %s" if path else "no checkpoint in %s: starting fresh", path or self.run_dir
                )
        if validate_first and self.step == 0:
            self.initial_val_loss = self.evaluate()
        if main:
            self._truncate_metrics(self.step)
            log.info(
                "%s: %s params (%s active, %s trained), %d ranks on %s, %s",
                self.model_config.name,
                f"{self.model_config.total_params():,}",
                f"{self.model_config.active_params():,}",
                f"{sum(p.numel() for group in self.optimizer.param_groups for p in group['params']):,}",
                self.info.world_size,
                self.device,
                self.compute_dtype,
            )
            (self.run_dir / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        history: list[dict[str, Any]] = []
        bar = tqdm(total=config.steps, initial=self.step, unit="step", disable=not (main and config.progress))
        with open(self.run_dir / METRICS, "a") if main else contextlib.nullcontext() as out:
            while self.step < config.steps:
                metrics = self.train_step()
                last = self.step == config.steps
                if (config.eval_every and self.step % config.eval_every == 0) or last:
                    val = self.evaluate()
                    if val is not None:
                        metrics["val_loss"] = val
                history.append(metrics)
                if main:
                    # Logged before the checkpoint: a run killed while saving loses no record that
                    # resuming (which drops records after its checkpoint) would not write again.
                    out.write(json.dumps(metrics) + "\n")
                    out.flush()
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{metrics['loss']:.3f}",
                        lr=f"{metrics['lr']:.2e}",
                        tok_s=f"{metrics['tokens_per_s']:,.0f}",
                        mfu=f"{metrics['mfu']:.1%}",
                    )
                if config.save_every and (self.step % config.save_every == 0 or last):
                    self.save()
        bar.close()
        return history

    def close(self) -> None:
        shutdown(self.info)


def train(config: TrainConfig) -> list[dict[str, Any]]:
    """Train as `config` says (under torchrun, on every rank); return this process's metrics."""
    trainer = Trainer(config)
    try:
        return trainer.fit()
    finally:
        trainer.close()
