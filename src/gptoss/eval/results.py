"""One result shape for every task: headline metrics, a breakdown, counts and the settings used;
written as JSON and shown as a table."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


@dataclass
class EvalResult:
    task: str
    model: str
    metrics: dict[str, float]  # the headline numbers, e.g. {"accuracy": 0.62} or {"pass@1": 0.4}
    counts: dict[str, int] = field(default_factory=dict)  # questions, samples, tokens, ...
    breakdown: dict[str, dict[str, float]] = field(default_factory=dict)  # per subject / per problem
    config: dict[str, Any] = field(default_factory=dict)  # the settings that produced it
    files: dict[str, str] = field(default_factory=dict)  # files the run wrote
    # One dict per question or sample, for auditing; written as JSONL, not part of the JSON summary.
    records: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "records"}

    def write_records(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            f.writelines(json.dumps(record) + "\n" for record in self.records)
        self.files["records"] = str(path)
        return path

    def write_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)  # a reader never sees half a file
        return path

    def print(self, console: Console | None = None, breakdown_rows: int = 100) -> None:
        """The summary table, then the breakdown (at most `breakdown_rows` rows) if there is one."""
        console = console or Console()
        summary = Table(title=f"{self.task} · {self.model}", show_header=False)
        summary.add_column(style="bold")
        summary.add_column(justify="right")
        for name, value in self.metrics.items():
            summary.add_row(name, _format(value))
        for name, value in self.counts.items():
            summary.add_row(name, f"{value:,}")
        console.print(summary)
        if not self.breakdown or breakdown_rows <= 0:
            return
        columns = list(next(iter(self.breakdown.values())))
        detail = Table(title=f"{self.task} by {self.config.get('breakdown', 'group')}")
        detail.add_column("")
        for column in columns:
            detail.add_column(column, justify="right")
        for name, row in list(self.breakdown.items())[:breakdown_rows]:
            detail.add_row(name, *(_format(row.get(c)) for c in columns))
        if len(self.breakdown) > breakdown_rows:
            detail.caption = f"{len(self.breakdown) - breakdown_rows} more rows in the JSON results"
        console.print(detail)


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "" if value is None else str(value)
