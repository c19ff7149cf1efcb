"""Prefill and decode speed, peak memory and the memory-bandwidth roofline, ours beside transformers
and llama.cpp (vs_llama_cpp.py); and micro-benchmarks of the CPU kernels in GB/s of weights read,
beside the measured read bandwidth.

    python benchmarks/decode.py                      # nano and a random 20b-shaped MXFP4 checkpoint
    python benchmarks/decode.py --models 20b --engines ours --batch 1 --repeats 1
    python benchmarks/decode.py --models nano --batch 1 8 --json decode.json
    python benchmarks/decode.py --models nano --engines ours --long-context   # fill 131,072 tokens
    python benchmarks/decode.py kernels              # kernel GB/s; --threads N, --json FILE
    python benchmarks/decode.py --models 20b --engines ours llama.cpp --batch 1   # see vs_llama_cpp.py

Every (model, engine) runs in a fresh subprocess so that its peak RSS is its own. The 20b-shaped
checkpoint (random weights, MXFP4 experts, ~13 GB) is written once, tensor by tensor, under --dir
(default /tmp/gptoss-bench; never inside the repository). The roofline divides the read bandwidth
(the faster of a PyTorch sum and our bf16 matvec over 1 GiB) by the bytes one decoded token reads
(from the config). A shared machine's bandwidth drifts by a third over minutes, so every run gets
its own, the largest of: the same measurement just before its subprocess starts and just after it
ends, and (our engine, MXFP4 experts) our matvec over ~1 GiB of the model's own expert bytes inside
the run, before the first timed generation and after each one. That ratio (best decode over the
largest read rate of the run) is the strict one; when a run straddles a change of bandwidth it is
unfair either way, so each generation is also set beside its own roofline, from the faster of the
read rates measured just before and just after it ("per generation": median, and the range).

The kernel section cycles through enough distinct weight matrices (at least 256 MiB, 8× a 32 MiB
L3) that every call reads its weights from DRAM, as decoding does.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file
from tqdm import tqdm
from vs_llama_cpp import ENGINES as LLAMA_ENGINES  # (benchmarks/ is on sys.path when this script runs)
from vs_llama_cpp import measure as measure_llama_cpp
from vs_llama_cpp import source_tree as llama_cpp_tree

from gptoss import ModelConfig, get_config
from gptoss.checkpoint import INDEX_FILE, MXFP4_QUANTIZATION_CONFIG, hf_tensor_map
from gptoss.config import MXFP4_BLOCK, MXFP4_BYTES_PER_BLOCK
from gptoss.model import GptOss
from gptoss.quant.mxfp4 import MXFP4Experts, unpack

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


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second of the fastest read of `gib` we have, the traffic of decoding: summing an
    fp32 tensor with PyTorch, or streaming a bf16 matrix through our native matvec, which reads
    faster on some machines, both on 2 MiB pages where the system has them (as the loader puts
    weights: ~5% faster reads than 4 KiB pages here). The larger makes the roofline the stricter."""
    from gptoss import ops
    from gptoss.ops.pages import use_huge_pages

    src = torch.empty(int(gib * 2**30) // 4)
    use_huge_pages([src])  # on the pages the loader gives weights: the faster read
    src.fill_(1)
    rates = [src.numel() * 4 / _best_time(src.sum, repeats)]
    del src
    if ops.native_available():
        weight = torch.empty(int(gib * 2**30) // 2 // 4096, 4096, dtype=torch.bfloat16)
        use_huge_pages([weight])
        weight.fill_(1)
        x = torch.ones(1, 4096, dtype=torch.bfloat16)
        rates.append(weight.numel() * 2 / _best_time(lambda: ops.linear(x, weight), repeats))
    return max(rates)


def _best_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # first touch and warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def resident_bandwidth(model: GptOss, gib: float = 1.0, repeats: int = 3) -> float:
    """Bytes per second of the faster of two reads of `gib` of the model's MXFP4 expert bytes (the
    first layers' gate_up blocks): our bf16 matvec over them as rows of the hidden width, and a
    PyTorch sum over them as int64 (as read_bandwidth: whichever is faster on this machine). The
    read rate of the very memory a decode reads, measured inside the run without allocating
    anything (so the run's peak RSS stays the model's). 0 where the experts are not MXFP4, the
    native kernels are missing, or the model has less than half of `gib` of them (small matrices
    measure call overheads, not bandwidth)."""
    from gptoss import ops

    experts = [getattr(block.mlp, "experts", None) for block in model.model.layers]
    if not ops.native_available() or not all(isinstance(e, MXFP4Experts) for e in experts):
        return 0.0
    blocks: list[torch.Tensor] = []
    for e in experts:
        if sum(b.numel() for b in blocks) >= gib * 2**30:
            break
        blocks.append(e.gate_up_proj_blocks)
    total = sum(b.numel() for b in blocks)
    if total < gib * 2**29:
        return 0.0
    width = model.config.hidden_size
    rows = [b.view(torch.bfloat16).view(-1, width) for b in blocks]
    x = torch.ones(1, width, dtype=torch.bfloat16)
    seconds = _best_time(lambda: [ops.linear(x, r) for r in rows], repeats)
    if all(b.numel() % 8 == 0 and b.storage_offset() % 8 == 0 for b in blocks):
        words = [b.view(-1).view(torch.int64) for b in blocks]
        seconds = min(seconds, _best_time(lambda: [w.sum() for w in words], repeats))
    return total / seconds


def copy_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second of a large tensor copy, reads and writes counted (for reference)."""
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
    from gptoss.inference.optimize import prepare_for_inference
    from gptoss.quant.int8 import quantize_int8

    start = time.perf_counter()
    model = load_model(spec["path"], dtype=getattr(torch, spec["dtype"]))
    prepare_for_inference(model)
    results: dict[str, Any] = {"load_s": time.perf_counter() - start, "rss_after_load_gib": _rss_gib()}
    results["huge_pages_gib"] = _huge_pages_gib()
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
    before = resident_bandwidth(model)  # and again after every timed generation: the drift
    bandwidth = before
    for batch in spec["batches"]:
        prompts = _prompts(model.config, batch, spec["prompt_len"])
        prefill_s, decode_s, generations = [], [], []
        for _ in range(spec["repeats"]):
            start = time.perf_counter()
            times = [time.perf_counter() for _ in generate_stream(model, prompts, params)]
            prefill_s.append(times[0] - start)  # the first token of each sequence comes out of prefill
            decode_s.append(times[-1] - times[0])
            after = resident_bandwidth(model)
            bandwidth = max(bandwidth, after)
            decoded = len(times) - batch
            if decoded and max(before, after):  # beside the faster read rate just before and after it
                rate = {"decode_tok_s": decoded / decode_s[-1], "bandwidth_gb_s": max(before, after) / 1e9}
                generations.append(rate)
            before = after
        results[f"b{batch}"] = {
            "prefill_tok_s": batch * spec["prompt_len"] / min(prefill_s),
            "decode_tok_s": decoded / min(decode_s) if decoded else None,
            "generations": generations,
        }
    results["resident_bandwidth_gb_s"] = bandwidth / 1e9
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
            prefill = total = float("inf")
            for _ in range(spec["repeats"]):
                start = time.perf_counter()
                model.generate(ids, max_new_tokens=1, **kwargs)
                prefill = min(prefill, time.perf_counter() - start)
                start = time.perf_counter()
                model.generate(ids, max_new_tokens=spec["new_tokens"], **kwargs)
                total = min(total, time.perf_counter() - start)
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


def _huge_pages_gib() -> float:
    """Memory of this process on 2 MiB pages (gptoss/ops/pages.py), 0 where /proc does not say."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            kib = next((int(line.split()[1]) for line in f if line.startswith("AnonHugePages:")), 0)
    except OSError:
        return 0.0
    return kib / 2**20


def worker(spec: dict[str, Any]) -> None:
    from gptoss import ops

    torch.manual_seed(0)
    if spec.get("threads"):
        ops.set_num_threads(spec["threads"])
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


# ---------------------------------------------------------------------- kernel micro-benchmarks
KERNEL_WORKING_SET = 256 * 2**20  # distinct weight bytes cycled through: 8× a 32 MiB L3


def _mxfp4_weights(out: int, inp: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = torch.randint(0, 256, (out, inp // MXFP4_BLOCK, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(*SCALE_RANGE, (out, inp // MXFP4_BLOCK), dtype=torch.uint8, generator=gen)
    return blocks, scales


def _bf16_weight(out: int, inp: int, gen: torch.Generator) -> tuple[torch.Tensor]:
    return (torch.empty(out, inp, dtype=torch.bfloat16).uniform_(-0.05, 0.05, generator=gen),)


def _int8_weight(out: int, inp: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    weight = torch.randint(-127, 128, (out, inp), dtype=torch.int8, generator=gen)
    return weight, torch.rand(out, generator=gen).to(torch.bfloat16) / 1000


@dataclass
class KernelCase:
    kernel: str
    impl: str
    shape: tuple[int, int]  # (out, in) of the weights, for the FLOP count
    rows: int
    make: Callable[[torch.Generator], tuple[torch.Tensor, ...]]  # one set of weights
    call: Callable[..., torch.Tensor]  # call(x, *weights)
    reference: bool = False  # the slow PyTorch path: one call on one set


def _expert_weights(hidden: int, inter: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    gate_up_bias = torch.zeros(2 * inter, dtype=torch.bfloat16)
    down_bias = torch.zeros(hidden, dtype=torch.bfloat16)
    gate_up, down = _mxfp4_weights(2 * inter, hidden, gen), _mxfp4_weights(hidden, inter, gen)
    return *gate_up, gate_up_bias, *down, down_bias


def kernel_cases(rows: list[int], config: ModelConfig) -> list[KernelCase]:
    """Decode-shaped calls of every kernel beside PyTorch's own, then the prefill-shaped ones, at
    the shapes of `config` (the 20b's)."""
    from gptoss import ops

    hidden, inter, q_dim, vocab = (
        config.hidden_size,
        config.intermediate_size,
        config.q_dim,
        config.vocab_size,
    )

    def mxfp4(out: int, inp: int) -> Callable[[torch.Generator], tuple[torch.Tensor, ...]]:
        return lambda gen: _mxfp4_weights(out, inp, gen)

    def dense(make: Callable, out: int) -> Callable[[torch.Generator], tuple[torch.Tensor, ...]]:
        return lambda gen: make(out, hidden, gen)

    def experts(gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        return _expert_weights(hidden, inter, gen)

    def expert(x: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        return ops.mxfp4_expert(x, *weights, alpha=config.swiglu_alpha, limit=config.swiglu_limit)

    gate_up, down, fused = (2 * inter, hidden), (hidden, inter), (2 * inter + hidden, hidden)
    int8pack = getattr(torch.ops.aten, "_weight_int8pack_mm", None)
    cases = []
    for n in rows:
        cases += [
            KernelCase("mxfp4 gate_up", "native", gate_up, n, mxfp4(*gate_up), ops.mxfp4_linear),
            KernelCase("mxfp4 down", "native", down, n, mxfp4(*down), ops.mxfp4_linear),
            KernelCase("mxfp4 expert: gate_up, SwiGLU, down", "native", fused, n, experts, expert),
        ]
        for name, out in (("q_proj", q_dim), ("lm_head", vocab)):
            bf16, int8 = dense(_bf16_weight, out), dense(_int8_weight, out)
            cases += [
                KernelCase(f"bf16 {name}", "native", (out, hidden), n, bf16, ops.linear),
                KernelCase(f"bf16 {name}", "torch F.linear", (out, hidden), n, bf16, F.linear),
                KernelCase(f"int8 {name}", "native", (out, hidden), n, int8, ops.int8_linear),
            ]
            if int8pack is not None:
                cases.append(
                    KernelCase(f"int8 {name}", "torch _weight_int8pack_mm", (out, hidden), n, int8, int8pack)
                )
    # The PyTorch reference that the MXFP4 kernel replaces, and prefill-sized calls: 16 tokens per
    # expert is a 128-token prompt's average (4 of 32 experts per token); beside it, the bf16 GEMM a
    # dequantize-then-multiply path would run at best (its dequantization not counted).
    cases += [
        KernelCase(
            "mxfp4 gate_up", "torch dequantize+matmul", gate_up, 1, mxfp4(*gate_up), _reference_mxfp4, True
        ),
        KernelCase("mxfp4 expert: gate_up, SwiGLU, down", "native", fused, 16, experts, expert),
        KernelCase(
            "bf16 gate_up (prefill)", "torch F.linear", gate_up, 16, dense(_bf16_weight, 2 * inter), F.linear
        ),
    ]
    return cases


def _reference_mxfp4(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return x @ unpack(blocks, scales, x.dtype)


def time_kernel(case: KernelCase, min_seconds: float = 1.0) -> dict[str, Any]:
    """GB/s of weight bytes read by one kernel, cycling through distinct weight sets (DRAM-bound)."""
    gen = torch.Generator().manual_seed(0)
    first = case.make(gen)
    per_set = sum(t.numel() * t.element_size() for t in first)  # weights, scales and biases
    count = 1 if case.reference else max(1, -(-KERNEL_WORKING_SET // per_set))
    sets = [first] + [case.make(gen) for _ in range(count - 1)]
    x = torch.randn(case.rows, case.shape[1], generator=gen).to(torch.bfloat16)
    with torch.no_grad():
        for w in sets:  # first touch, and one call each before timing
            case.call(x, *w)
        calls, start = 0, time.perf_counter()
        while True:
            for w in sets:
                case.call(x, *w)
            calls += len(sets)
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds or case.reference:
                break
    seconds = elapsed / calls
    return {
        "kernel": case.kernel,
        "impl": case.impl,
        "shape": list(case.shape),
        "rows": case.rows,
        "weight_mib_per_call": per_set / 2**20,
        "distinct_sets": count,
        "ms_per_call": seconds * 1e3,
        "gb_s": per_set / seconds / 1e9,
        "gflop_s": 2 * case.rows * case.shape[0] * case.shape[1] / seconds / 1e9,
    }


def run_kernels(args: argparse.Namespace, console: Console) -> None:
    from gptoss import ops

    if args.threads:
        ops.set_num_threads(args.threads)
    read, copy = read_bandwidth(), copy_bandwidth()
    isa = ops.set_isa("best") if ops.native_available() else "not built"
    report: dict[str, Any] = {
        "machine": _machine(),
        "threads": torch.get_num_threads(),
        "isa": isa,
        "read_bandwidth_gb_s": read / 1e9,
        "copy_bandwidth_gb_s": copy / 1e9,
        "load_average_before": os.getloadavg()[0],
        "kernels": [],
    }
    cases = kernel_cases(args.rows, get_config(MODELS["20b"]))
    for case in tqdm(cases, desc="kernels", unit="case", disable=not sys.stderr.isatty()):
        if case.impl == "native" and not ops.native_available():
            continue
        report["kernels"].append(time_kernel(case))
    report["load_average_after"] = os.getloadavg()[0]

    title = (
        f"CPU kernels, bf16 activations, {report['threads']} threads, ISA {isa}: read bandwidth "
        f"{read / 1e9:.1f} GB/s (best of sum and bf16 matvec, 1 GiB), "
        f"copy {copy / 1e9:.1f} GB/s (read+write of 1 GiB); "
        f"load average {report['load_average_before']:.1f}-{report['load_average_after']:.1f}"
    )
    table = Table(title=title)
    for column in ["kernel", "impl", "weight (out×in)", "rows", "MiB/call", "sets", "ms/call"]:
        table.add_column(column, justify="left" if column in ("kernel", "impl") else "right")
    for column in ["GB/s", "% of read BW", "GFLOP/s"]:
        table.add_column(column, justify="right")
    for k in report["kernels"]:
        table.add_row(
            k["kernel"], k["impl"], "×".join(map(str, k["shape"])), str(k["rows"]),
            f"{k['weight_mib_per_call']:.1f}", str(k["distinct_sets"]), f"{k['ms_per_call']:.3f}",
            f"{k['gb_s']:.1f}", f"{k['gb_s'] / report['read_bandwidth_gb_s']:.0%}", f"{k['gflop_s']:.1f}",
        )  # fmt: skip
    console.print(table)
    out = args.json or args.dir / "kernels.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    console.print(f"wrote {out}")


def _machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__}


# ---------------------------------------------------------------------- the report
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "section", nargs="?", choices=["models", "kernels"], default="models",
        help="end-to-end models (default) or kernel micro-benchmarks",
    )  # fmt: skip
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/gptoss-bench"), help="where checkpoints go")
    parser.add_argument(
        "--engines", nargs="+", default=["ours", "ours-int8", "transformers"],
        choices=["ours", "ours-int8", "transformers", *LLAMA_ENGINES],
    )  # fmt: skip
    parser.add_argument(
        "--llama-cpp", type=Path, default=None,
        help="a llama.cpp source tree for the llama.cpp engines (default: fetched into DIR from PyPI)",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs per figure")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch and native threads (default: torch's)"
    )
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 4], help="kernels: activation rows")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per measurement")
    parser.add_argument("--json", type=Path, default=None, help="default: DIR/decode.json (DIR/kernels.json)")
    parser.add_argument(
        "--long-context", action="store_true", help="also fill nano's whole 131,072-token context once"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return

    console = Console(width=200)
    if args.section == "kernels":
        run_kernels(args, console)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    bandwidth = read_bandwidth()
    threads = torch.get_num_threads()
    console.print(
        f"read bandwidth (best of sum and bf16 matvec, 1 GiB): {bandwidth / 1e9:.1f} GB/s, {threads} threads"
    )
    report: dict[str, Any] = {"machine": _machine(), "bandwidth_gb_s": bandwidth / 1e9, "runs": []}
    for key in args.models:
        config = get_config(MODELS[key])
        path = write_random_checkpoint(config, args.dir / f"{MODELS[key]}-random-mxfp4")
        bytes_per_token = decode_bytes_per_token(config, args.prompt_len + args.new_tokens)
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
                "repeats": args.repeats,
            }
            if engine in LLAMA_ENGINES:
                if args.batch != [1]:
                    console.print(f"[dim]{engine}: batch 1 only (llama-bench decodes one sequence)[/dim]")
                tree = llama_cpp_tree(args.llama_cpp, args.dir, console)
                console.print(f"[dim]{key} / {engine} ...[/dim]")
                before = read_bandwidth()
                result = measure_llama_cpp(
                    path, engine, tree, args.dir, threads, args.prompt_len, args.new_tokens,
                    args.repeats, args.timeout, console,
                )  # fmt: skip
                run_bandwidth = max(before, read_bandwidth())
                spec = {"model": key, "path": str(path), "engine": engine, "threads": threads}
            elif engine == "transformers" and not _fits_in_memory(config):
                need = config.weight_bytes(2) / 2**30
                result = {
                    "error": f"does not fit: transformers expands MXFP4 to {need:.0f} GiB of bf16 on CPU"
                }
                run_bandwidth = bandwidth
            else:
                console.print(f"[dim]{key} / {engine} ...[/dim]")
                before = read_bandwidth()
                result = measure(spec, args.timeout)
                run_bandwidth = max(before, read_bandwidth(), result.get("resident_bandwidth_gb_s", 0) * 1e9)
            run = {
                "model": key,
                "engine": engine,
                "bandwidth_gb_s": run_bandwidth / 1e9,
                "roofline_tok_s": run_bandwidth / bytes_per_token,
                "bytes_per_token": bytes_per_token,
                "spec": spec,
            } | result
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
        before = read_bandwidth()
        result = measure(spec, args.timeout)
        run_bandwidth = max(before, read_bandwidth())
        roofline = run_bandwidth / decode_bytes_per_token(config, config.max_position_embeddings)
        run = {"model": "nano-131k", "engine": "ours", "bandwidth_gb_s": run_bandwidth / 1e9}
        report["runs"].append(run | {"roofline_tok_s": roofline} | result)
    _print_table(console, report, args.batch)
    for run in report["runs"]:
        if "note" in run:
            console.print(f"{run['model']} / {run['engine']}: {run['note']}")
    out = args.json or args.dir / "decode.json"
    out.write_text(json.dumps(report, indent=2))
    console.print(f"wrote {out}")


def _fits_in_memory(config: ModelConfig) -> bool:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return config.weight_bytes(2) < 0.8 * total


def _print_table(console: Console, report: dict[str, Any], batches: list[int]) -> None:
    start = report["bandwidth_gb_s"]
    title = f"decode benchmark (read bandwidth {start:.1f} GB/s at the start; each run's own beside it)"
    table = Table(title=title)
    for column in ["model", "engine", "load s", "RSS loaded GiB", "of it 2 MiB pages", "peak RSS GiB"]:
        table.add_column(column)
    for b in batches:
        table.add_column(f"prefill tok/s b{b}", justify="right")
        table.add_column(f"decode tok/s b{b}", justify="right")
    table.add_column("run's read GB/s", justify="right")
    table.add_column("b1 decode / roofline tok/s", justify="right")
    table.add_column("b1 per generation", justify="right")
    table.add_column("int8 KL head / all", justify="right")
    table.add_column("load avg", justify="right")
    for run in report["runs"]:
        if "error" in run:
            table.add_row(run["model"], run["engine"], f"[red]{run['error']}[/red]")
            continue
        cells = [run["model"], run["engine"], _num(run.get("load_s"))]
        memory = [run.get("rss_after_load_gib"), run.get("huge_pages_gib"), run["peak_rss_gib"]]
        cells += [_num(m) for m in memory]
        for b in batches:
            r = run.get(f"b{b}", {})
            cells += [_num(r.get("prefill_tok_s")), _num(r.get("decode_tok_s"))]
        b1 = run.get("b1", {}).get("decode_tok_s")
        cells.append(f"{run['bandwidth_gb_s']:.1f}")
        cells.append(f"{b1 / run['roofline_tok_s']:.0%} of {run['roofline_tok_s']:.1f}" if b1 else "-")
        cells.append(_per_generation(run.get("b1", {}).get("generations", []), run.get("bytes_per_token", 0)))
        cells.append(f"{run['int8_head_kl']:.1e} / {run['int8_kl']:.1e}" if "int8_kl" in run else "")
        load = [run.get("load_average_before"), run.get("load_average_after")]
        cells.append(f"{load[0]:.1f}-{load[1]:.1f}" if None not in load else "-")
        table.add_row(*cells)
    console.print(table)


def _per_generation(generations: list[dict[str, float]], bytes_per_token: int) -> str:
    """Each generation's decode over its own roofline: the median, and the range."""
    if not generations or not bytes_per_token:
        return "-"
    ratios = sorted(g["decode_tok_s"] * bytes_per_token / (g["bandwidth_gb_s"] * 1e9) for g in generations)
    return f"{ratios[len(ratios) // 2]:.0%} ({ratios[0]:.0%}-{ratios[-1]:.0%})"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:,.2f}"


if __name__ == "__main__":
    main()
