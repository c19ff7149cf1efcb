"""Training `nano` on 1, 2 and 4 CPU processes (gloo): FSDP, expert parallel and tensor parallel.

    python benchmarks/train_parallel.py                       # every layout, table + JSON
    python benchmarks/train_parallel.py --layouts 1 2:ep2 --steps 3 --json parallel.json

Each layout is a `torchrun` of the real `Trainer` (the same global batch at every layout: 8 windows
of 128 tokens in micro-batches of 2, fp32). After `--warmup` steps, `--steps` steps are timed
(median step → tokens/s), then one more step runs under a dispatch mode that reads every
collective PyTorch issues (FSDP's all-gathers and reduce-scatters, the experts' all-to-alls, and as
"other" tensor parallelism's all-reduces, DTensor's gathers and the metrics' all-reduces) and adds
up the bytes each rank sends to the others, as a ring or a pairwise exchange moves them. The plan's
all-to-all and tensor-parallel predictions (`gptoss.train.plan`, uniform routing, fp32 activations
here) are printed beside the measured bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from rich.console import Console
from rich.table import Table
from torch.utils._python_dispatch import TorchDispatchMode

from gptoss.train.data import write_dataset
from gptoss.train.plan import communication_per_micro_batch
from gptoss.train.trainer import TrainConfig, Trainer

LAYOUTS = ("1", "2:fsdp", "2:ep2", "2:tp2", "2:tp2ep2", "4:fsdp", "4:ep2", "4:ep4")
SEQ_LEN, BATCH, MICRO = 128, 8, 2


class CommBytes(TorchDispatchMode):
    """Bytes this rank sends per kind of collective, from the collectives' own arguments.

    Written by hand because PyTorch's `CommDebugMode` counts collectives but not their bytes.
    """

    def __init__(self, ep: int) -> None:
        super().__init__()
        self.ep, self.ep_rank = ep, dist.get_rank() % ep  # expert-parallel groups: runs of `ep` ranks
        self.sent: dict[str, float] = {}

    def add(self, kind: str, nbytes: float) -> None:
        self.sent[kind] = self.sent.get(kind, 0.0) + nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = func.name()
        # (An op the mode sees runs with the mode off: collectives it calls inside are not seen.)
        if name.endswith("all_to_all_single") or name == "c10d::alltoall_base_":
            functional = name.startswith("_c10d_functional")
            inp = args[0] if functional else args[1]
            splits = list(args[2] if functional else args[4])
            row = inp.element_size() * (inp[0].numel() if inp.dim() > 1 else 1)
            kept = splits[self.ep_rank] if splits else inp.shape[0] // self.ep  # (even split)
            self.add("all_to_all", (inp.shape[0] - kept) * row)
        elif name == "c10d::_allgather_base_":
            out, inp = args[0], args[1]
            self.add("fsdp", inp.numel() * inp.element_size() * (out.numel() // inp.numel() - 1))
        elif name == "c10d::_reduce_scatter_base_":
            out, inp = args[0], args[1]
            ranks = inp.numel() // out.numel()
            self.add("fsdp", inp.numel() * inp.element_size() * (ranks - 1) / ranks)
        elif name in ("c10d::allreduce_", "_c10d_functional::all_reduce"):
            # (no group size in the op: every all-reduce here spans all ranks, or a TP group of all)
            world = dist.get_world_size()
            tensors = args[0] if isinstance(args[0], list | tuple) else [args[0]]
            self.add("other", sum(t.numel() * t.element_size() for t in tensors) * 2 * (world - 1) / world)
        elif name == "_c10d_functional::all_gather_into_tensor":  # DTensor redistributions
            inp, ranks = args[0], args[1]
            self.add("other", inp.numel() * inp.element_size() * (ranks - 1))
        return func(*args, **(kwargs or {}))


def parse(layout: str) -> tuple[int, int, int]:
    """ "4:ep2" → (processes 4, ep 2, tp 1); "2:tp2ep2" → (2, 2, 2)."""
    procs, _, kind = layout.partition(":")
    degrees = {name: int(degree) for name, degree in re.findall(r"(ep|tp)(\d+)", kind)}
    return int(procs), degrees.get("ep", 1), degrees.get("tp", 1)


def worker(args: argparse.Namespace) -> None:
    procs, ep, tp = parse(args.layout)
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(
            data=args.data,
            model="gpt-oss-nano",
            out=out,
            steps=args.warmup + args.steps + 1,
            seq_len=SEQ_LEN,
            batch_size=BATCH,
            micro_batch_size=MICRO,
            precision="fp32",
            save_every=0,
            eval_every=0,
            progress=False,
            device="cpu",
            expert_parallel=ep,
            tensor_parallel=tp,
        )
        trainer = Trainer(config)
        times, losses = [], []
        for _ in range(args.warmup + args.steps):
            start = time.perf_counter()
            losses.append(trainer.train_step()["loss"])
            times.append(time.perf_counter() - start)
        counter = CommBytes(ep) if procs > 1 else None
        if counter is not None:
            with counter:
                trainer.train_step()
        sent = counter.sent if counter else {}
        gathered = [sent] if procs == 1 else [None] * procs
        if procs > 1:
            dist.all_gather_object(gathered, sent)
        if trainer.info.is_main:
            step = statistics.median(times[args.warmup :])
            mean = {
                k: statistics.mean(g.get(k, 0.0) for g in gathered) for k in ("all_to_all", "fsdp", "other")
            }
            Path(args.result).write_text(
                json.dumps(
                    {
                        "layout": args.layout,
                        "processes": procs,
                        "ep": ep,
                        "tp": tp,
                        "step_s": step,
                        "tokens_per_s": BATCH * SEQ_LEN / step,
                        "losses": losses,
                        "sent_bytes_per_step": mean,
                    }
                )
            )
        trainer.close()


def predicted(procs: int, ep: int, tp: int) -> dict[str, float]:
    """The plan's bytes per rank and step: fp32 activations, no checkpointing, the windows of the
    rank's data-parallel slice (BATCH · tp / procs windows of SEQ_LEN tokens)."""
    from gptoss.checkpoint import model_config

    tokens = BATCH * tp // procs * SEQ_LEN
    return communication_per_micro_batch(model_config("gpt-oss-nano"), procs, tokens, ep, tp, False, 4)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), help=f"from {', '.join(LAYOUTS)}")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path("train_parallel.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--layout", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        rng = np.random.default_rng(0)
        write_dataset(
            data,
            {"train": rng.integers(0, 50_000, 200_000), "val": rng.integers(0, 50_000, 5_000)},
            201088,
            199999,
        )
        for layout in args.layouts:
            procs, ep, tp = parse(layout)
            result = Path(tmp) / f"{layout.replace(':', '_')}.json"
            own = [sys.argv[0], "--worker", "--layout", layout, "--data", str(data), "--result", str(result)]
            own += ["--warmup", str(args.warmup), "--steps", str(args.steps)]
            command = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={procs}",
            ]
            env = os.environ | {"OMP_NUM_THREADS": "1"}
            done = subprocess.run([*command, *own], env=env, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{layout} failed:\n{done.stderr[-4000:]}")
            row = json.loads(result.read_text())
            plan = predicted(procs, ep, tp)
            row["predicted_bytes"] = {
                "all_to_all": plan["all_to_all"],
                "tensor_parallel": plan["tensor_parallel"],
            }
            rows.append(row)
            print(f"{layout}: {row['tokens_per_s']:.0f} tok/s", file=sys.stderr)

    table = Table(
        title=f"nano, {BATCH} × {SEQ_LEN} tokens per step, fp32, gloo on {os.cpu_count()} CPU cores"
    )
    for column in (
        "layout",
        "tok/s",
        "step",
        "all-to-all sent",
        "plan's all-to-all",
        "FSDP sent",
        "TP/other sent",
        "plan's TP",
        "loss 1",
    ):
        table.add_column(column, justify="right")
    mib = 2**20
    for row in rows:
        sent = row["sent_bytes_per_step"]
        table.add_row(
            row["layout"],
            f"{row['tokens_per_s']:.0f}",
            f"{row['step_s']:.2f} s",
            f"{sent.get('all_to_all', 0) / mib:.2f} MiB",
            f"{row['predicted_bytes']['all_to_all'] / mib:.2f} MiB",
            f"{sent.get('fsdp', 0) / mib:.1f} MiB",
            f"{sent.get('other', 0) / mib:.2f} MiB",
            f"{row['predicted_bytes']['tensor_parallel'] / mib:.2f} MiB",
            f"{row['losses'][0]:.6f}",
        )
    Console(width=140).print(table)
    report = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__, "rows": rows}
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
