"""Batched decode beside its bandwidth bound, from the experts actually routed; and whether the MoE
kernel reads an expert's weights once for all the rows routed to it.

    python benchmarks/batch_decode.py --model /path/to/gpt-oss-20b --batch 1 4 16 --steps 16
    python benchmarks/batch_decode.py --kernel        # mxfp4_moe at 1-16 rows per expert, 20b shape

A decode step of B sequences reads the dense weights and the output head once, the KV cache of every
row, and each expert that at least one row routes to, once (if the kernel reads it once for all its
rows). The read bound is those bytes divided by the read bandwidth measured in the same run
(`decode.resident_bandwidth`). The routed experts are counted per step and layer from the router's
top-k, so the bound is that of this run's routing, not of an assumed one. A step also multiplies
every row by its active weights (2 FLOP per active parameter and token, the attention over a short
cache aside): the compute bound is the rate of PyTorch's bf16 GEMM on the model's shapes
(`long_context.gemm_rate`), measured in the same run, divided by that. Whichever bound is lower is
the one a step can reach ("of bound"). The in-process engine step (ModelRunner + Engine, as
`generate_stream` drives it) is timed per decode step.

`--kernel` times one MoE layer of the model's shape (random MXFP4 experts) with every row routed to
the same top-k experts, at 1, 2, 4, 8 and 16 rows: the bytes read are the same at every row count,
so a kernel that reads each expert once per call keeps about the same time as rows are added.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from decode import resident_bandwidth  # (benchmarks/ is on sys.path when this script runs)
from long_context import gemm_rate
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from gptoss import get_config, load_model, ops
from gptoss.config import MXFP4_BLOCK, MXFP4_BYTES_PER_BLOCK, ModelConfig
from gptoss.inference import SamplingParams
from gptoss.inference.engine import Engine, SequenceRequest
from gptoss.inference.optimize import prepare_for_inference
from gptoss.inference.runner import ModelRunner


def expert_bytes(config: ModelConfig, dtype_bytes: int = 2) -> int:
    h, i = config.hidden_size, config.intermediate_size
    return 3 * h * i // MXFP4_BLOCK * MXFP4_BYTES_PER_BLOCK + (2 * i + h) * dtype_bytes


def shared_bytes(config: ModelConfig, dtype_bytes: int = 2) -> int:
    """What every step reads once whatever the batch: attention, routers, norms, the output head."""
    h = config.hidden_size
    layer = (config.attention_params() + config.router_params() + 2 * h) * dtype_bytes
    return config.num_hidden_layers * layer + (config.vocab_size * h + h) * dtype_bytes


class RoutedExperts:
    """Counts the distinct experts of every router top-k (one per layer and step) while active."""

    def __init__(self, config: ModelConfig) -> None:
        self.experts, self.k = config.num_local_experts, config.num_experts_per_tok
        self.counts: list[int] = []
        self._topk = torch.topk

    def __enter__(self) -> RoutedExperts:
        def recording(x: torch.Tensor, k: int, *args: Any, **kwargs: Any) -> Any:
            out = self._topk(x, k, *args, **kwargs)
            if x.dim() == 2 and x.shape[-1] == self.experts and k == self.k:
                self.counts.append(int(out.indices.unique().numel()))
            return out

        torch.topk = recording
        return self

    def __exit__(self, *exc: object) -> None:
        torch.topk = self._topk


def run_batch(model: Any, batch: int, steps: int, prompt_len: int) -> dict[str, Any]:
    config = model.config
    runner = ModelRunner(model, batch, prompt_len + steps + 2)
    engine = Engine(runner, prefill_budget=batch * prompt_len, default_stop_ids=[])
    params = SamplingParams(max_tokens=steps + 1, temperature=0, stop_token_ids=[])
    for b in range(batch):
        ids = [(977 * b + 31 * i) % 199_000 + 1 for i in range(prompt_len)]
        prompt = runner.fit_prompt(ids)[:prompt_len]  # a trimmed vocabulary spells some ids in bytes
        engine.add(SequenceRequest(prompt, params, b))
    engine.step()  # prefill and the first tokens
    while len(engine.running) < batch:
        engine.step()
    times = []
    with RoutedExperts(config) as routed:
        for _ in tqdm(range(steps), desc=f"batch {batch}", leave=False):
            start = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - start)
    held = sum(runner.cache.lengths[: len(engine.running)])
    kv_used = runner.cache.pool.used * runner.cache.pool.block_bytes / 2**30
    layers = config.num_hidden_layers
    per_step = [sum(routed.counts[i : i + layers]) for i in range(0, len(routed.counts), layers)]
    kv = config.kv_cache_bytes_per_token(2) // layers * (layers - config.num_sliding_layers) * held
    kv += config.num_sliding_layers * 2 * config.kv_dim * 2 * min(config.sliding_window, prompt_len) * batch
    step_bytes = shared_bytes(config) + expert_bytes(config) * sum(per_step) / len(per_step) + kv
    while engine.has_work:
        engine.step()
    median = sorted(times)[len(times) // 2]
    return {
        "batch": batch,
        "steps": steps,
        "step_ms_median": median * 1000,
        "tok_s": batch / median,
        "experts_per_layer": sum(per_step) / len(per_step) / layers,
        "step_gb": step_bytes / 1e9,
        "kv_cache_gib_used": kv_used,
    }


def kernel_check(config: ModelConfig, rows: list[int], seconds: float = 1.0) -> list[dict[str, Any]]:
    """One MoE layer of `config`'s shape, every row routed to experts 0..k-1."""
    from gptoss.ops import mxfp4_moe

    gen = torch.Generator().manual_seed(0)
    experts, hidden, inter = config.num_local_experts, config.hidden_size, config.intermediate_size
    k = config.num_experts_per_tok

    def packed(out: int, inp: int) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = torch.randint(0, 256, (experts, out, inp // 32, 16), dtype=torch.uint8, generator=gen)
        return blocks, torch.randint(118, 127, (experts, out, inp // 32), dtype=torch.uint8, generator=gen)

    gate_up, down = packed(2 * inter, hidden), packed(hidden, inter)
    gate_up_bias = torch.zeros(experts, 2 * inter, dtype=torch.bfloat16)
    down_bias = torch.zeros(experts, hidden, dtype=torch.bfloat16)
    out = []
    for n in rows:
        x = torch.randn(n, hidden, generator=gen).to(torch.bfloat16)
        idx = torch.arange(k).repeat(n, 1)
        weight = torch.full((n, k), 1.0 / k, dtype=torch.bfloat16)
        args = (
            x,
            idx,
            weight,
            *gate_up,
            gate_up_bias,
            *down,
            down_bias,
            config.swiglu_alpha,
            config.swiglu_limit,
        )

        def call(args: tuple = args) -> torch.Tensor:
            return mxfp4_moe(*args)

        call()
        calls, start = 0, time.perf_counter()
        best = float("inf")
        while time.perf_counter() - start < seconds or calls < 5:
            t = time.perf_counter()
            call()
            best = min(best, time.perf_counter() - t)
            calls += 1
        read = k * expert_bytes(config)
        out.append({"rows_per_expert": n, "ms": best * 1000, "gb_s_if_read_once": read / best / 1e9})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="checkpoint directory (the batch runs)")
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--kernel", action="store_true", help="the MoE kernel check (no checkpoint needed)")
    parser.add_argument("--shape", default="gpt-oss-20b", help="preset whose shape --kernel uses")
    parser.add_argument("--json", type=Path, default=Path("batch_decode.json"))
    args = parser.parse_args()
    console = Console()
    report: dict[str, Any] = {"load_average": os.getloadavg(), "cpus": os.cpu_count()}
    if args.kernel:
        if not ops.native_available():
            raise SystemExit("the native kernels are not built: python setup.py build_ext --inplace")
        report["kernel"] = kernel_check(get_config(args.shape), [1, 2, 4, 8, 16])
        table = Table(title=f"mxfp4_moe, {args.shape} shape, every row on the same experts")
        for column in ("rows per expert", "ms", "GB/s if each expert is read once"):
            table.add_column(column, justify="right")
        for r in report["kernel"]:
            table.add_row(str(r["rows_per_expert"]), f"{r['ms']:.2f}", f"{r['gb_s_if_read_once']:.1f}")
        console.print(table)
    if args.model:
        model = prepare_for_inference(load_model(args.model))
        report["rss_after_load_gib"] = psutil.Process().memory_info().rss / 2**30
        levels = []
        for batch in args.batch:
            before = resident_bandwidth(model)
            level = run_batch(model, batch, args.steps, args.prompt_len)
            bandwidth = max(before, resident_bandwidth(model))
            level["bandwidth_gb_s"] = bandwidth / 1e9
            level["bound_tok_s"] = batch * bandwidth / 1e9 / level["step_gb"]
            level["gemm_gflop_s"] = gemm_rate(model.config, rows=512) / 1e9
            level["compute_bound_tok_s"] = level["gemm_gflop_s"] * 1e9 / (2 * model.config.active_params())
            # (the read probe gives 0 for a model too small to time it on)
            bound = min(b for b in (level["bound_tok_s"], level["compute_bound_tok_s"]) if b > 0)
            level["of_bound"] = level["tok_s"] / bound
            levels.append(level)
            console.print(level)
        report["levels"] = levels
        report["rss_end_gib"] = psutil.Process().memory_info().rss / 2**30
        table = Table(title=f"batched decode, in process ({Path(args.model).name})")
        for column in (
            "batch",
            "step ms",
            "tok/s",
            "experts/layer",
            "GB/step",
            "GB/s",
            "read bound tok/s",
            "GEMM GFLOP/s",
            "compute bound tok/s",
            "of bound",
        ):
            table.add_column(column, justify="right")
        for lv in levels:
            table.add_row(
                str(lv["batch"]), f"{lv['step_ms_median']:.0f}", f"{lv['tok_s']:.2f}",
                f"{lv['experts_per_layer']:.1f}", f"{lv['step_gb']:.2f}", f"{lv['bandwidth_gb_s']:.1f}",
                f"{lv['bound_tok_s']:.2f}", f"{lv['gemm_gflop_s']:.0f}", f"{lv['compute_bound_tok_s']:.2f}",
                f"{lv['of_bound']:.0%}",
            )  # fmt: skip
        console.print(table)
    report["load_average_end"] = os.getloadavg()
    args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
