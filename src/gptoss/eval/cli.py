"""`gptoss eval MODEL --task mmlu|humaneval|perplexity` — parse, call `gptoss.eval`, print, write."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from rich.console import Console

from gptoss.config import PRESETS

TASKS = ("mmlu", "humaneval", "perplexity")


def add_eval_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="MMLU, HumanEval or perplexity of a local model or an OpenAI-compatible endpoint",
        description="Results go to OUTPUT/TASK-MODEL.json, per-question/sample records next to it "
        "(a HumanEval run resumes from its samples file).",
    )
    p.add_argument(
        "model",
        nargs="?",
        help=f"a checkpoint directory or a preset ({', '.join(PRESETS)}); omit with --endpoint",
    )
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--output", default="eval-results", help="directory for results (default eval-results)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of tables")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--limit", type=int, default=None, help="MMLU: questions per subject; HumanEval: problems")

    local = p.add_argument_group("local model")
    local.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    local.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    local.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    local.add_argument("--max-length", type=int, default=None, help="longest input in tokens (default 8192)")

    remote = p.add_argument_group("endpoint")
    remote.add_argument(
        "--endpoint", default=None, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1"
    )
    remote.add_argument("--api-key", default=None, help="default: $OPENAI_API_KEY")
    remote.add_argument(
        "--served-model", default=None, help="model name on the server (default: its only one)"
    )
    remote.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    remote.add_argument(
        "--top-logprobs", type=int, default=20, help="MMLU: next-token alternatives asked for"
    )

    data = p.add_argument_group("mmlu and perplexity")
    data.add_argument(
        "--data", default=None, help="MMLU directory/file, or a text file / token shard / dataset dir"
    )
    data.add_argument(
        "--split", default=None, help="MMLU: test (default), val; token datasets: val (default)"
    )
    data.add_argument(
        "--shots", type=int, default=5, help="MMLU: worked examples from the dev split (default 5)"
    )
    data.add_argument("--subjects", default=None, help="MMLU: comma-separated subjects (default all)")
    data.add_argument(
        "--window", type=int, default=None, help="perplexity: tokens read at once (default 2048)"
    )
    data.add_argument("--stride", type=int, default=None, help="perplexity: window step (default window/2)")
    data.add_argument(
        "--max-eval-tokens", type=int, default=None, help="perplexity: score only the first N tokens"
    )

    code = p.add_argument_group("humaneval")
    code.add_argument(
        "--mode", choices=["chat", "raw"], default="chat", help="harmony chat or raw completion"
    )
    code.add_argument("--samples", type=int, default=1, help="samples per problem, n (default 1)")
    code.add_argument(
        "--k", default="1,10,100", help="pass@k values reported where k <= n (default 1,10,100)"
    )
    code.add_argument("--temperature", type=float, default=None, help="default 0 for n=1, else 0.8")
    code.add_argument("--top-p", type=float, default=1.0)
    code.add_argument("--max-tokens", type=int, default=None, help="default 2048 (chat) / 512 (raw)")
    code.add_argument("--reasoning-effort", choices=["low", "medium", "high"], default=None)
    code.add_argument("--seed", type=int, default=0)
    code.add_argument("--timeout", type=float, default=10.0, help="seconds per program (default 10)")
    code.add_argument("--memory-mb", type=int, default=1024, help="address space per program (default 1024)")
    code.add_argument("--workers", type=int, default=None, help="programs run at once (default: CPU cores)")
    code.add_argument(
        "--problems", default=None, help="a HumanEval-format JSONL(.gz) instead of the bundled one"
    )
    p.set_defaults(func=cmd_eval)


def _slug(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "model"


def _load(args: argparse.Namespace):  # noqa: ANN202 - an EvalModel; imports are lazy
    if args.endpoint:
        from gptoss.eval.endpoint import EndpointModel

        return EndpointModel(
            args.endpoint,
            model=args.served_model,
            api_key=args.api_key,
            concurrency=args.concurrency,
            top_logprobs=args.top_logprobs,
        )
    if not args.model:
        raise ValueError("give a MODEL (checkpoint directory or preset) or --endpoint URL")
    import torch

    from gptoss.checkpoint import load_model
    from gptoss.eval.models import LocalModel
    from gptoss.inference.optimize import prepare_for_inference

    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = prepare_for_inference(load_model(args.model, device=args.device, dtype=dtype))
    return LocalModel(
        model, name=Path(args.model).name, batch_size=args.batch_size, max_length=args.max_length
    )


def cmd_eval(args: argparse.Namespace) -> int:
    from gptoss.eval.endpoint import EndpointUnsupported

    try:
        return _run(args)
    except (EndpointUnsupported, ImportError) as exc:
        print(f"gptoss eval: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.task in ("mmlu", "perplexity") and not args.data:
        raise ValueError(f"--task {args.task} needs --data PATH (nothing is downloaded)")
    model = _load(args)
    out = Path(args.output)
    stem = f"{args.task}-{_slug(model.name)}"
    progress = not args.quiet
    if args.task == "mmlu":
        from gptoss.eval.mmlu import run_mmlu

        subjects = [s.strip() for s in args.subjects.split(",")] if args.subjects else None
        result = run_mmlu(
            model,
            args.data,
            shots=args.shots,
            split=args.split or "test",
            subjects=subjects,
            limit=args.limit,
            progress=progress,
        )
        result.write_records(out / f"{stem}-predictions.jsonl")
    elif args.task == "humaneval":
        from gptoss.eval.humaneval import run_humaneval
        from gptoss.eval.sandbox import SandboxLimits

        stem = f"{args.task}-{args.mode}-{_slug(model.name)}"
        result = run_humaneval(
            model,
            samples=args.samples,
            ks=[int(k) for k in args.k.split(",")],
            chat=args.mode == "chat",
            temperature=args.temperature,
            top_p=args.top_p,
            max_tokens=args.max_tokens,
            reasoning_effort=args.reasoning_effort,
            seed=args.seed,
            limits=SandboxLimits(timeout=args.timeout, memory_bytes=args.memory_mb * 2**20),
            workers=args.workers,
            samples_path=out / f"{stem}-samples.jsonl",
            problem_file=args.problems,
            limit=args.limit,
            progress=progress,
        )
    else:
        from gptoss.eval.perplexity import run_perplexity

        result = run_perplexity(
            model,
            args.data,
            window=args.window,
            stride=args.stride,
            split=args.split or "val",
            max_tokens=args.max_eval_tokens,
            progress=progress,
        )
    result.files["results"] = str(out / f"{stem}.json")
    result.write_json(out / f"{stem}.json")
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        result.print(Console(), breakdown_rows=0 if args.task == "humaneval" else 60)
        for kind, path in result.files.items():
            print(f"{kind}: {path}")
    return 0
