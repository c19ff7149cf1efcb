"""Prefill and decode speed, peak memory and the memory-bandwidth roofline, ours beside transformers.

    python benchmarks/decode.py                      # nano and a random 20b-shaped MXFP4 checkpoint
    python benchmarks/decode.py --models nano --batch 1 8 --json decode.json
    python benchmarks/decode.py --models nano --engines ours --long-context   # fill 131,072 tokens

Every (model, engine) runs in a fresh subprocess so that its peak RSS is its own. The 20b-shaped
checkpoint (random weights, MXFP4 experts, ~13 GB) is written once, tensor by tensor, under --dir
(default /tmp/gptoss-bench; never inside the repository). The roofline divides the bandwidth of a
large copy, measured in the same run, by the bytes one decoded token reads (from the config).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file
from tqdm import tqdm

from gptoss import ModelConfig, get_config
from gptoss.checkpoint import INDEX_FILE, MXFP4_QUANTIZATION_CONFIG, hf_tensor_map
from gptoss.config import MXFP4_BLOCK, MXFP4_BYTES_PER_BLOCK
from gptoss.model import GptOss
from gptoss.mxfp4 import MXFP4Experts

MODELS = {"nano": "gpt-oss-nano", "20b": "gpt-oss-20b"}
# Exponents around 2^-7 give weights of magnitude ~0.01-0.05, like a trained model's experts.
SCALE_RANGE = (118, 122)


# ---------------------------------------------------------------------- the random checkpoint
def write_random_checkpoint(config: ModelConfig, directory: Path, seed: int = 0) -> Path:
    """A Hugging Face MXFP4 checkpoint of `config` with random weights, one shard per layer.

    Tensors are generated shard by shard, so memory holds one layer at a time (~0.4 GB for 20b).
    """
    if (directory / "config.json").is_file():
        return directory
    tmp = directory.with_name(directory.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = GptOss(config).to(torch.bfloat16)
        for block in model.model.layers:
            block.mlp.experts = MXFP4Experts(config)
    specs = {name: entry.tensor for name, entry in hf_tensor_map(model).items()}
    groups: dict[str, list[str]] = {}
    for name in specs:
        layer = name.split(".")[2] if name.startswith("model.layers.") else name.split(".")[0]
        groups.setdefault(layer, []).append(name)
    generator = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for i, names in enumerate(tqdm(groups.values(), desc=f"writing {directory.name}", unit="shard")):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {name: _random_tensor(name, specs[name], config, generator) for name in names}
        save_file(shard, tmp / fname, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in shard.values())
        weight_map.update(dict.fromkeys(names, fname))
        del shard
    (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    hf = config.to_hf() | {"dtype": "bfloat16", "quantization_config": MXFP4_QUANTIZATION_CONFIG}
    (tmp / "config.json").write_text(json.dumps(hf, indent=2))
    tmp.rename(directory)
    return directory


def _random_tensor(
    name: str, meta: torch.Tensor, config: ModelConfig, generator: torch.Generator
) -> torch.Tensor:
    shape = tuple(meta.shape)
    if name.endswith("_blocks"):
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    if name.endswith("_scales"):
        return torch.randint(*SCALE_RANGE, shape, dtype=torch.uint8, generator=generator)
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    if name.endswith("bias") and "router" not in name:
        return torch.zeros(shape, dtype=torch.bfloat16)
    std = 1.0 if name.endswith("sinks") else config.initializer_range
    return (torch.randn(shape, generator=generator) * std).to(torch.bfloat16)


# ---------------------------------------------------------------------- the arithmetic
def decode_bytes_per_token(
    config: ModelConfig, context: int, dtype_bytes: int = 2, mxfp4: bool = True
) -> int:
    """Bytes one decoded token reads at batch 1: the active weights (MXFP4 experts where packed,
    biases in `dtype_bytes`), the output head, and the KV cache of `context` earlier tokens."""
    h, i = config.hidden_size, config.intermediate_size
    matrices = 3 * h * i
    packed = matrices // MXFP4_BLOCK * MXFP4_BYTES_PER_BLOCK if mxfp4 else matrices * dtype_bytes
    expert = packed + (2 * i + h) * dtype_bytes
    layer = (
        config.attention_params() + config.router_params() + 2 * h
    ) * dtype_bytes + config.experts_per_token * expert
    head = (config.vocab_size * h + h) * dtype_bytes
    return config.num_hidden_layers * layer + head + config.kv_cache_bytes(context, dtype_bytes)


def memory_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second of a large tensor copy (read + write), the best of a few."""
    src = torch.ones(int(gib * 2**30) // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best


# ---------------------------------------------------------------------- one measurement (subprocess)
def _prompts(config: ModelConfig, batch: int, length: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, min(config.vocab_size, 199_998), (batch, length), generator=g).tolist()


def run_ours(spec: dict[str, Any]) -> dict[str, Any]:
    from gptoss import load_model
    from gptoss.inference import SamplingParams, generate_stream
    from gptoss.inference.optimize import prepare_for_inference, quantize_int8

    start = time.perf_counter()
    model = load_model(spec["path"], dtype=getattr(torch, spec["dtype"]))
    prepare_for_inference(model)
    results: dict[str, Any] = {"load_s": time.perf_counter() - start, "rss_after_load_gib": _rss_gib()}
    if spec["int8"]:
        # Quality: KL(bf16 ‖ int8) of next-token distributions along one prompt, teacher-forced;
        # first with the output head alone in int8, then with attention too.
        ids = torch.tensor(_prompts(model.config, 1, spec["prompt_len"]))
        with torch.no_grad():
            reference = torch.log_softmax(model(ids).float(), dim=-1)
            quantize_int8(model, attention=False)
            results["int8_head_kl"] = _kl(reference, model(ids))
            quantize_int8(model)
            results["int8_kl"] = _kl(reference, model(ids))
    params = SamplingParams(max_tokens=spec["new_tokens"], temperature=0, stop_token_ids=[])
    warm = generate_stream(model, _prompts(model.config, 1, 8), SamplingParams(max_tokens=4, temperature=0))
    for _ in warm:  # first calls allocate and warm caches; keep that out of the timings
        pass
    for batch in spec["batches"]:
        prompts = _prompts(model.config, batch, spec["prompt_len"])
        start = time.perf_counter()
        first = None
        n = 0
        for _ in generate_stream(model, prompts, params):
            n += 1
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        decoded = n - batch  # the first token of each sequence comes out of prefill
        results[f"b{batch}"] = {
            "prefill_tok_s": batch * spec["prompt_len"] / (first - start),
            "decode_tok_s": decoded / (end - first) if decoded else None,
        }
    return results


def _kl(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean KL(p ‖ q) over positions, p given as log-probabilities, q as logits."""
    q = torch.log_softmax(logits.float(), dim=-1)
    return (reference.exp() * (reference - q)).sum(-1).mean().item()


def run_long_context(spec: dict[str, Any]) -> dict[str, Any]:
    """One prompt that fills the whole context (YaRN to 131,072 tokens), then decoding at its end."""
    from gptoss import load_model
    from gptoss.inference import SamplingParams, generate_stream

    model = load_model(spec["path"], dtype=getattr(torch, spec["dtype"]))
    context = model.config.max_position_embeddings
    prompt = _prompts(model.config, 1, context - spec["new_tokens"] + 1)[0]
    params = SamplingParams(max_tokens=spec["new_tokens"], temperature=0, stop_token_ids=[])
    start = time.perf_counter()
    times = [time.perf_counter() for _ in generate_stream(model, [prompt], params)]
    return {
        "load_s": 0.0,
        "rss_after_load_gib": _rss_gib(),
        "context": context,
        "b1": {
            "prefill_tok_s": len(prompt) / (times[0] - start),
            "decode_tok_s": (len(times) - 1) / (times[-1] - times[0]),
        },
    }


def run_transformers(spec: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["path"], dtype=getattr(torch, spec["dtype"])).eval()
    results = {"load_s": time.perf_counter() - start, "rss_after_load_gib": _rss_gib()}
    config = get_config(MODELS[spec["model"]])
    with torch.inference_mode():
        model.generate(torch.tensor(_prompts(config, 1, 8)), max_new_tokens=4, do_sample=False)
        for batch in spec["batches"]:
            ids = torch.tensor(_prompts(config, batch, spec["prompt_len"]))
            kwargs = {"do_sample": False, "eos_token_id": None, "pad_token_id": 0, "min_new_tokens": 0}
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=1, **kwargs)
            prefill = time.perf_counter() - start
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=spec["new_tokens"], **kwargs)
            total = time.perf_counter() - start
            results[f"b{batch}"] = {
                "prefill_tok_s": batch * spec["prompt_len"] / prefill,
                "decode_tok_s": batch * (spec["new_tokens"] - 1) / max(total - prefill, 1e-9),
            }
    return results


def _rss_gib(field: str = "VmRSS") -> float:
    """Resident memory (anonymous plus mapped file pages) now, or its peak with field="VmHWM".

    /proc rather than getrusage: ru_maxrss survives exec, so it would report the parent's peak.
    """
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    return kib / 2**20


def worker(spec: dict[str, Any]) -> None:
    torch.manual_seed(0)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    run = {"transformers": run_transformers, "ours": run_ours, "long": run_long_context}[spec["engine"]]
    results = run(spec)
    results["peak_rss_gib"] = _rss_gib("VmHWM")
    # Other work on the machine distorts timings (threads wait for descheduled peers): keep the record.
    results["load_average_after"] = os.getloadavg()[0]
    print("RESULT " + json.dumps(results), flush=True)


def measure(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one measurement in a fresh Python process; its peak RSS is its own."""
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    load = os.getloadavg()[0]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in run.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line.removeprefix("RESULT ")) | {"load_average_before": load}
    return {"error": (run.stderr.strip().splitlines() or ["no output"])[-1][:200]}


# ---------------------------------------------------------------------- the report
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/gptoss-bench"), help="where checkpoints go")
    parser.add_argument("--engines", nargs="+", default=["ours", "ours-int8", "transformers"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per measurement")
    parser.add_argument("--json", type=Path, default=None, help="default: DIR/decode.json")
    parser.add_argument(
        "--long-context", action="store_true", help="also fill nano's whole 131,072-token context once"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return

    console = Console(width=200)
    bandwidth = memory_bandwidth()
    threads = torch.get_num_threads()
    console.print(f"memory bandwidth (1 GiB copy): {bandwidth / 1e9:.1f} GB/s, {threads} threads")
    report: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "bandwidth_gb_s": bandwidth / 1e9,
        "runs": [],
    }
    for key in args.models:
        config = get_config(MODELS[key])
        path = write_random_checkpoint(config, args.dir / f"{MODELS[key]}-random-mxfp4")
        bytes_per_token = decode_bytes_per_token(config, args.prompt_len + args.new_tokens)
        roofline = bandwidth / bytes_per_token
        for engine in args.engines:
            spec = {
                "model": key,
                "path": str(path),
                "engine": "transformers" if engine == "transformers" else "ours",
                "dtype": "bfloat16",
                "int8": engine == "ours-int8",
                "batches": args.batch,
                "prompt_len": args.prompt_len,
                "new_tokens": args.new_tokens,
                "threads": args.threads,
            }
            if engine == "transformers" and not _fits_in_memory(config):
                need = config.weight_bytes(2) / 2**30
                result = {
                    "error": f"does not fit: transformers expands MXFP4 to {need:.0f} GiB of bf16 on CPU"
                }
            else:
                console.print(f"[dim]{key} / {engine} ...[/dim]")
                result = measure(spec, args.timeout)
            run = {"model": key, "engine": engine, "roofline_tok_s": roofline, "spec": spec} | result
            report["runs"].append(run)
    if args.long_context:
        config = get_config(MODELS["nano"])
        path = write_random_checkpoint(config, args.dir / f"{MODELS['nano']}-random-mxfp4")
        spec = {
            "model": "nano",
            "path": str(path),
            "engine": "long",
            "dtype": "bfloat16",
            "new_tokens": 8,
            "threads": args.threads,
        }
        console.print("[dim]nano / ours at 131,072 tokens ...[/dim]")
        result = measure(spec, args.timeout)
        roofline = bandwidth / decode_bytes_per_token(config, config.max_position_embeddings)
        report["runs"].append({"model": "nano-131k", "engine": "ours", "roofline_tok_s": roofline} | result)
    _print_table(console, report, args.batch)
    out = args.json or args.dir / "decode.json"
    out.write_text(json.dumps(report, indent=2))
    console.print(f"wrote {out}")


def _fits_in_memory(config: ModelConfig) -> bool:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return config.weight_bytes(2) < 0.8 * total


def _print_table(console: Console, report: dict[str, Any], batches: list[int]) -> None:
    table = Table(title=f"decode benchmark ({report['bandwidth_gb_s']:.1f} GB/s copy bandwidth)")
    for column in ["model", "engine", "load s", "RSS loaded GiB", "peak RSS GiB"]:
        table.add_column(column)
    for b in batches:
        table.add_column(f"prefill tok/s b{b}", justify="right")
        table.add_column(f"decode tok/s b{b}", justify="right")
    table.add_column("b1 decode / roofline tok/s", justify="right")
    table.add_column("int8 KL head / all", justify="right")
    table.add_column("load avg", justify="right")
    for run in report["runs"]:
        if "error" in run:
            table.add_row(run["model"], run["engine"], f"[red]{run['error']}[/red]")
            continue
        cells = [run["model"], run["engine"], f"{run['load_s']:.1f}"]
        cells += [f"{run['rss_after_load_gib']:.2f}", f"{run['peak_rss_gib']:.2f}"]
        for b in batches:
            r = run.get(f"b{b}", {})
            cells += [_num(r.get("prefill_tok_s")), _num(r.get("decode_tok_s"))]
        b1 = run.get("b1", {}).get("decode_tok_s")
        cells.append(f"{b1 / run['roofline_tok_s']:.0%} of {run['roofline_tok_s']:.1f}" if b1 else "-")
        cells.append(f"{run['int8_head_kl']:.1e} / {run['int8_kl']:.1e}" if "int8_kl" in run else "")
        cells.append(f"{run['load_average_before']:.1f}-{run['load_average_after']:.1f}")
        table.add_row(*cells)
    console.print(table)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:,.2f}"


if __name__ == "__main__":
    main()
