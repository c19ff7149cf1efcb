"""Training throughput on `nano`: our trainer and model beside transformers' GptOssForCausalLM.

    python benchmarks/train.py                             # fp32 and bf16 autocast, 128 × 8 tokens
    python benchmarks/train.py --precision fp32 --steps 10 --json train.json

Both models run in the very same loop: a `Trainer` (batches, cross-entropy, clipping, fused AdamW,
schedule) whose model is ours for one engine and transformers' for the other, from the same weights
on the same batches (the "same losses" column is the largest difference between their losses).
Each precision runs in a fresh subprocess; inside it the two engines' steps alternate, so that a
machine shared with other work slows both alike, and the median step time is reported. MFU divides
the model FLOPs (3 × forward, from the config) by a large matmul's throughput measured in the same
process and dtype. The MoE auxiliary losses are off for both (transformers' routers are not
hooked), so both minimise the same loss. Our trainer computes the output head and cross-entropy in
chunks (`fused_loss`, its default); `--no-fused-loss` measures our model with plain logits.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

from gptoss.checkpoint import hf_state_dict
from gptoss.train.data import write_dataset
from gptoss.train.trainer import RouterLosses, TrainConfig, Trainer, build_optimizer, lr_multiplier

ENGINES = ("transformers", "gptoss")


class HFCausalLM(nn.Module):
    """transformers' model behind our call signature: ids (B, T) → logits (B, T, V)."""

    def __init__(self, trainer: Trainer) -> None:
        super().__init__()
        from transformers import GptOssConfig, GptOssForCausalLM

        hf_config = GptOssConfig(**trainer.model_config.to_hf())
        hf_config._attn_implementation = "eager"  # sinks need eager attention in transformers
        self.hf = GptOssForCausalLM(hf_config).to(trainer.device)
        missing, unexpected = self.hf.load_state_dict(hf_state_dict(trainer.model), strict=False)
        if missing or unexpected:
            raise RuntimeError(f"weights do not map onto transformers: {missing} {unexpected}")
        self.hf.train()

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.hf(input_ids=input_ids, use_cache=False).logits


def make_trainer(engine: str, args: argparse.Namespace, out: str) -> Trainer:
    config = TrainConfig(
        data=args.data,
        model="gpt-oss-nano",
        out=out,
        steps=args.warmup + args.steps,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        micro_batch_size=args.batch_size,
        precision=args.precision,
        compile=args.compile and engine == "gptoss",
        save_every=0,
        progress=False,
        device=args.device,
        # transformers' model gives no router logits to our hooks: the same objective for both
        aux_loss_coef=0.0,
        z_loss_coef=0.0,
        # transformers' model gives logits only (no `hidden_states` for the chunked head + loss)
        fused_loss=not args.no_fused_loss and engine == "gptoss",
    )
    trainer = Trainer(config)  # same seed: both engines start from the same weights
    if engine == "transformers":
        trainer.model = HFCausalLM(trainer)
        trainer.router_losses = RouterLosses(trainer.model)  # finds none: transformers' routers differ
        trainer.optimizer = build_optimizer(trainer.model, config)
        trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(
            trainer.optimizer,
            lambda s: lr_multiplier(s, config.warmup_steps, config.steps, config.min_lr_ratio),
        )
    return trainer


def worker(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Both engines at one precision, their steps interleaved so that both see the same machine."""
    with tempfile.TemporaryDirectory(prefix="gptoss-bench-train-") as out:  # nothing is saved there
        trainers = {engine: make_trainer(engine, args, out) for engine in ENGINES}
    records: dict[str, list[dict]] = {engine: [] for engine in ENGINES}
    for _ in range(args.warmup + args.steps):
        for engine, trainer in trainers.items():
            records[engine].append(trainer.train_step())
    results = []
    for engine, trainer in trainers.items():
        timed = records[engine][args.warmup :]
        step = statistics.median(r["step_time_s"] for r in timed)
        tokens = trainer.config.batch_size * trainer.config.seq_len
        results.append(
            {
                "engine": engine,
                "precision": args.precision,
                "compile": trainer.config.compile,
                "fused_loss": engine == "gptoss" and trainer.config.fused_loss,
                "tokens_per_step": tokens,
                "step_time_s": step,
                "step_times_s": [r["step_time_s"] for r in timed],
                "tokens_per_s": tokens / step,
                "mfu": statistics.median(r["mfu"] for r in timed),
                "peak_tflops_measured": trainer.peak / 1e12,
                "losses": [r["loss"] for r in records[engine]],
            }
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--compile", action="store_true", help="torch.compile our blocks")
    parser.add_argument("--no-fused-loss", action="store_true", help="our model with plain logits + loss")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--engine", choices=["both"], help=argparse.SUPPRESS)  # worker mode
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.engine:
        args.precision = args.precision[0]
        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps(worker(args)))
        return

    with tempfile.TemporaryDirectory(prefix="gptoss-bench-data-") as data:
        # Token ids over the whole vocabulary; speed does not depend on what the text says.
        tokens = np.random.default_rng(0).integers(
            0, 201088, size=max(200_000, 4 * args.batch_size * args.seq_len)
        )
        write_dataset(data, {"train": tokens}, vocab_size=201088, eot_id=199999)
        results = []
        for precision in args.precision:
            command = [sys.executable, __file__, "--engine", "both", "--precision", precision, "--data", data]
            command += ["--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size)]
            command += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device]
            command += ["--compile"] if args.compile else []
            command += ["--no-fused-loss"] if args.no_fused_loss else []
            command += ["--threads", str(args.threads)] if args.threads else []
            start = time.perf_counter()
            out = subprocess.run(command, capture_output=True, text=True, check=False)
            if out.returncode:
                raise SystemExit(f"{precision} failed:\n{out.stderr[-3000:]}")
            results += json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{precision}: {time.perf_counter() - start:.0f}s", file=sys.stderr)

    machine = platform.processor() or platform.machine()
    threads = args.threads or torch.get_num_threads()
    title = f"nano training, {args.batch_size} × {args.seq_len} tokens per step, {machine}, {threads} threads"
    table = Table(title=title)
    for column in (
        "engine",
        "precision",
        "tokens/s",
        "step (median)",
        "MFU",
        "vs transformers",
        "same losses",
    ):
        table.add_column(column, justify="right")
    by_precision = {(r["engine"], r["precision"]): r for r in results}
    for r in results:
        baseline = by_precision[("transformers", r["precision"])]
        r["speedup_vs_transformers"] = r["tokens_per_s"] / baseline["tokens_per_s"]
        table.add_row(
            r["engine"]
            + (" (compiled)" if r["compile"] else "")
            + (" (fused loss)" if r["fused_loss"] else ""),
            r["precision"],
            f"{r['tokens_per_s']:,.0f}",
            f"{r['step_time_s'] * 1000:,.0f} ms",
            f"{r['mfu']:.1%}",
            f"{r['speedup_vs_transformers']:.2f}×",
            f"{max(abs(a - b) for a, b in zip(r['losses'], baseline['losses'], strict=True)):.1e}",
        )
    Console().print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
