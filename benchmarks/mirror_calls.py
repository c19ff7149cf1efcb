"""What one mirrored runner call costs in messages (`gptoss.inference.mirror`), against the same
exchange through `broadcast_object_list` + `gather_object`: 2 gloo processes on this host.

    python benchmarks/mirror_calls.py                 # starts itself under torchrun, table + JSON
    python benchmarks/mirror_calls.py --calls 500 --json mirror.json

A call is a decode step's message (8 sequences' tokens) sent by rank 0 and every rank's report
back; no model runs. The two exchanges alternate in blocks (`--rounds`), so machine load hits both
alike; the table gives the median over rounds of the mean per call.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist
from rich.console import Console
from rich.table import Table

from gptoss.inference.mirror import call_report, receive_message, send_message

MESSAGE = ("decode", ({seq: 1000 + seq for seq in range(8)},))


def ours(group: dist.ProcessGroup, rank: int, ranks: int) -> None:
    if rank == 0:
        send_message(MESSAGE, group)
    else:
        receive_message(group)
    reports = [torch.empty(2, dtype=torch.int64) for _ in range(ranks)] if rank == 0 else None
    dist.gather(call_report(False, None), reports, dst=0, group=group)


def objects(group: dist.ProcessGroup, rank: int, ranks: int) -> None:
    box = [MESSAGE if rank == 0 else None]
    dist.broadcast_object_list(box, src=0, group=group)
    reports = [None] * ranks if rank == 0 else None
    dist.gather_object((None, None), reports, dst=0, group=group)


def measure(args: argparse.Namespace) -> None:
    dist.init_process_group("gloo")
    group = dist.new_group(backend="gloo")
    rank, ranks = dist.get_rank(), dist.get_world_size()
    exchanges = {"mirror (frame + gather)": ours, "broadcast_object_list + gather_object": objects}
    times: dict[str, list[float]] = {name: [] for name in exchanges}
    for _ in range(args.rounds):
        for name, exchange in exchanges.items():
            start = time.perf_counter()
            for _ in range(args.calls):
                exchange(group, rank, ranks)
            times[name].append((time.perf_counter() - start) / args.calls)
    if rank == 0:
        rows = {name: 1e3 * statistics.median(t[1:]) for name, t in times.items()}  # first: warmup
        table = Table(title=f"one mirrored call, {ranks} gloo processes, median of {args.rounds - 1} rounds")
        table.add_column("exchange")
        table.add_column("ms per call", justify="right")
        for name, ms in rows.items():
            table.add_row(name, f"{ms:.3f}")
        Console().print(table)
        load = os.getloadavg()[0]
        print(f"load average while measuring: {load:.1f} on {os.cpu_count()} CPUs")
        if args.json:
            report = {"ms_per_call": rows, "ranks": ranks, "calls": args.calls, "load": load}
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300, help="calls per round")
    parser.add_argument("--rounds", type=int, default=7, help="rounds of each exchange (the first warms up)")
    parser.add_argument("--json", default="mirror_calls.json", help="where to write the figures")
    args = parser.parse_args()
    if "WORLD_SIZE" in os.environ:
        measure(args)
        return
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    subprocess.run([*command, __file__, *sys.argv[1:]], check=True, env=env)


if __name__ == "__main__":
    main()
