"""`gptoss ...` — parse arguments, call the library, print. No logic lives here."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from gptoss.checkpoint import checkpoint_facts, model_config
from gptoss.config import PRESETS, ModelConfig


def model_facts(model: str) -> tuple[ModelConfig, dict]:
    """The config of a preset or checkpoint directory, plus facts about its stored files."""
    config = model_config(model)
    return config, checkpoint_facts(model) if Path(model).is_dir() else {}


def _human(n: float, suffixes: tuple[str, ...] = ("", "K", "M", "B", "T")) -> str:
    """1234567 → "1.23M"; parameters count in B(illions), FLOPs pass SI suffixes."""
    for suffix in suffixes[:-1]:
        if abs(n) < 1000:
            return f"{n:.2f}{suffix}" if suffix else f"{n:g}"
        n /= 1000
    return f"{n:.2f}{suffixes[-1]}"


_SI = ("", "K", "M", "G", "T", "P")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def cmd_info(args: argparse.Namespace) -> int:
    config, facts = model_facts(args.model)
    report = config.summary(args.context) | facts
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    table = Table(title=f"{report['name']} ({report['kind']})", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    experts = (
        f"{report['experts']} × width {report['intermediate_size']}, {report['experts_per_token']} active"
        if config.is_moe
        else f"dense MLP, width {report['intermediate_size']}"
    )
    rows = [
        (
            "layers",
            f"{report['layers']} ({report['sliding_layers']} sliding, window {config.sliding_window})",
        ),
        ("hidden size", str(report["hidden_size"])),
        (
            "attention",
            f"{report['attention_heads']} q heads / {report['kv_heads']} kv heads × {config.head_dim}",
        ),
        ("MLP", experts),
        ("vocabulary", f"{report['vocab_size']:,}"),
        ("context", f"{report['context']:,}"),
        ("total parameters", f"{report['total_params']:,} ({_human(report['total_params'])})"),
        ("active parameters", f"{report['active_params']:,} ({_human(report['active_params'])})"),
        ("weights, bf16", _gib(report["weight_bytes_bf16"])),
        ("weights, MXFP4 experts", _gib(report["weight_bytes_mxfp4_experts"])),
        ("KV cache per token (bf16)", f"{report['kv_cache_bytes_per_token_bf16'] / 2**10:.1f} KiB"),
        (
            f"KV cache at {report['kv_cache_context']:,} tokens",
            f"{_gib(report['kv_cache_bytes_bf16'])} (no window reuse: "
            f"{_gib(report['kv_cache_bytes_bf16_no_window'])})",
        ),
        ("FLOPs per token (first)", f"{_human(report['flops_per_token_first'], _SI)}FLOP"),
        (
            f"FLOPs per token at {report['kv_cache_context']:,}",
            f"{_human(report['flops_per_token_at_context'], _SI)}FLOP",
        ),
    ]
    if facts:
        rows.append(
            ("checkpoint", f"{facts['checkpoint_format']}, {_gib(facts['checkpoint_bytes'])} on disk")
        )
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptoss", description="The gpt-oss model family.")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="shape, parameters, memory, KV cache and FLOPs of a model")
    info.add_argument("model", help=f"a checkpoint directory or a preset ({', '.join(PRESETS)})")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.add_argument("--context", type=int, default=None, help="context length for KV cache and FLOPs")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"gptoss: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
