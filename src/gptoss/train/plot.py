"""Loss curves of one or more runs, from their `metrics.jsonl`, drawn to a PNG."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gptoss.train.trainer import METRICS


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of `RUN_DIR/metrics.jsonl`, one per logged step."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a `gptoss train` run directory?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path | None = None) -> Path:
    """Training (and validation) loss, learning rate, and MoE auxiliary losses against the step.

    Writes `out` (default: `loss.png` in the first run directory) and returns its path.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: works on headless machines
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("`gptoss plot` needs matplotlib: pip install matplotlib") from exc

    runs = {Path(d).name or str(d): read_metrics(d) for d in run_dirs}
    moe = any("aux_loss" in r for records in runs.values() for r in records)
    fig, axes = plt.subplots(1, 3 if moe else 2, figsize=(15 if moe else 10, 4), squeeze=False)
    loss_ax, lr_ax = axes[0][0], axes[0][1]
    for name, records in runs.items():
        steps = [r["step"] for r in records]
        (line,) = loss_ax.plot(steps, [r["loss"] for r in records], label=f"{name} train", lw=1)
        val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        if val:
            loss_ax.plot(*zip(*val, strict=True), "o--", color=line.get_color(), label=f"{name} val", ms=3)
        lr_ax.plot(steps, [r["lr"] for r in records], color=line.get_color(), label=name, lw=1)
        if moe:
            aux = [(r["step"], r["aux_loss"], r["z_loss"]) for r in records if "aux_loss" in r]
            if aux:
                s, balance, z = zip(*aux, strict=True)
                axes[0][2].plot(s, balance, color=line.get_color(), label=f"{name} load balance", lw=1)
                axes[0][2].plot(s, z, color=line.get_color(), ls=":", label=f"{name} z-loss", lw=1)
    loss_ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="loss")
    lr_ax.set(xlabel="step", ylabel="learning rate", title="schedule")
    axes_used = [loss_ax, lr_ax]
    if moe:
        axes[0][2].set(xlabel="step", title="router losses")
        axes_used.append(axes[0][2])
    for ax in axes_used:
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    out = Path(out) if out else Path(run_dirs[0]) / "loss.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
