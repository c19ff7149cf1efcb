"""`gptoss ...` — parse arguments, call the library, print. No logic lives here."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from gptoss.config import DEFAULT_MODEL, PRESETS, ModelConfig
from gptoss.eval.cli import add_eval_command

if TYPE_CHECKING:
    from rich.console import Console

    from gptoss.inference.speculative import Speculation

# Commands import what they use when they run (torch, the engine, the trainer, the server): the
# parser itself, and `gptoss --help`, stay fast. Options built from the trainers' config classes are
# added only to the command being parsed.


def model_facts(model: str) -> tuple[ModelConfig, dict]:
    """The config of a preset or checkpoint directory, plus facts about its stored files."""
    from gptoss.checkpoint import checkpoint_facts, model_config, resolve_model

    config = model_config(model)
    path = resolve_model(model)
    return config, checkpoint_facts(path) if Path(path).is_dir() else {}


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
    from rich.console import Console
    from rich.table import Table

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
        (
            "vocabulary",
            f"{report['vocab_size']:,}"
            + (
                f" ids, {report['vocab_rows']:,} with rows (trimmed)"
                if report["vocab_rows"] != report["vocab_size"]
                else ""
            ),
        ),
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
        rows.append(("license", facts["license"]))
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    return 0


# ---------------------------------------------------------------------- generate and chat
_DTYPES = ("float32", "bfloat16", "float16")


def _load_for_inference(args: argparse.Namespace):  # noqa: ANN202 - a GptOss, imported lazily
    import torch

    from gptoss.inference.optimize import load_for_inference

    dtype = getattr(torch, args.dtype) if args.dtype else None
    tp, ep = getattr(args, "tp", 1), getattr(args, "ep", 1)
    return load_for_inference(args.model, args.device, dtype, args.int8, tp, ep)


def _sampling_params(args: argparse.Namespace):  # noqa: ANN202 - SamplingParams, imported lazily
    from gptoss.inference import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from rich.console import Console

    from gptoss.harmony import ReasoningDelta, StreamParser, TextDelta
    from gptoss.inference import generate_stream
    from gptoss.inference.chat import HARMONY_STOP_TOKENS, TextDecoder, harmony_prompt
    from gptoss.tokenizer import get_tokenizer

    model = _load_for_inference(args)
    params = _sampling_params(args)
    quiet = int(os.environ.get("RANK", "0")) != 0  # under torchrun: every rank decodes, rank 0 prints
    out = Console(highlight=False, quiet=quiet)
    err = Console(stderr=True, highlight=False, style="dim", quiet=quiet)
    if params.seed is None and params.temperature > 0 and (args.tp > 1 or args.ep > 1):
        from gptoss.distributed import shared_seed

        params = replace(params, seed=shared_seed())
        err.out(f"sampling seed {params.seed} (the same on every rank; --seed {params.seed} repeats this)")
    if args.raw:
        prompt = get_tokenizer().encode(args.prompt, allowed_special="all")
        decoder = TextDecoder()
        for event in generate_stream(model, [prompt], params, speculation=_speculation(args)):
            out.out(decoder.feed(event.token), end="")
        out.out(decoder.flush())
        return 0
    prompt = harmony_prompt(args.prompt, args.reasoning_effort, args.system)
    parser = StreamParser()
    params = replace(params, stop_token_ids=HARMONY_STOP_TOKENS)
    events = generate_stream(model, [prompt], params, speculation=_speculation(args))
    for event in (e for token_event in events for e in parser.feed(token_event.token)):
        if isinstance(event, TextDelta):
            out.out(event.text, end="")
        elif isinstance(event, ReasoningDelta) and args.show_reasoning:
            err.out(event.text, end="")
    parser.finish()
    out.out("")
    return 0


class _ReplyView:
    """Shows one streamed reply: reasoning dimmed while it streams (the last lines only), then
    folded into one line once the answer starts; `/show` prints it in full afterwards."""

    TAIL_LINES = 6

    def __init__(self, console: Console) -> None:
        from rich.live import Live

        self.console = console
        self.reasoning = ""
        self._thinking = ""  # reasoning of the block being streamed
        self._live = (
            Live(console=console, transient=True, refresh_per_second=12) if console.is_terminal else None
        )

    def on_reasoning(self, text: str) -> None:
        from rich.text import Text

        if not self._thinking and self._live is not None:
            self._live.start()
        self._thinking += text
        self.reasoning += text
        if self._live is not None:
            tail = "\n".join(self._thinking.splitlines()[-self.TAIL_LINES :])
            self._live.update(Text(tail, style="dim"))

    def on_text(self, text: str) -> None:
        self._fold()
        self.console.out(text, end="", highlight=False)

    def close(self) -> None:
        self._fold()
        self.console.out("")

    def _fold(self) -> None:
        if not self._thinking:
            return
        if self._live is not None:
            self._live.stop()
        words = len(self._thinking.split())
        self.console.print(f"[dim]▸ reasoning, {words} words (/show to expand)[/dim]")
        self._thinking = ""


CHAT_HELP = "/reset  forget the conversation · /effort low|medium|high · /show  last reasoning · /exit"


def cmd_chat(args: argparse.Namespace) -> int:
    from rich.console import Console

    from gptoss.harmony import ReasoningDelta, TextDelta
    from gptoss.inference import ContextFullError
    from gptoss.inference.chat import ChatSession

    model = _load_for_inference(args)
    context = min(args.context, model.config.max_position_embeddings)
    chat = ChatSession(
        model,
        args.reasoning_effort,
        args.system,
        capacity=context,
        params=_sampling_params(args),
        speculation=_speculation(args),
    )
    console = Console(highlight=False)
    interactive = console.is_terminal
    kv = model.config.kv_cache_bytes(context, chat.session.cache.dtype.itemsize) / 2**20
    console.print(
        f"[dim]{model.config.name}: context {context:,} tokens (KV cache up to {kv:,.0f} MiB, taken as "
        f"the conversation grows). {CHAT_HELP}[/dim]"
    )
    last_reasoning = ""
    while True:
        try:
            line = input("» " if interactive else "").strip()
        except EOFError:
            return 0
        except KeyboardInterrupt:
            console.print()
            return 0
        if not line:
            continue
        command, _, argument = line.partition(" ")
        if command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            chat.reset()
            console.print("[dim]conversation reset[/dim]")
        elif command == "/effort":
            try:
                chat.set_reasoning_effort(argument.strip())
                console.print(f"[dim]reasoning effort: {chat.reasoning_effort}[/dim]")
            except ValueError as exc:
                console.print(f"[red]{exc}[/red]")
        elif command == "/show":
            console.print(last_reasoning or "(no reasoning yet)", style="dim")
        elif command.startswith("/"):
            console.print(f"[red]unknown command {command}[/red]; {CHAT_HELP}")
        else:
            view = _ReplyView(console)
            try:
                for event in chat.send(line):
                    if isinstance(event, ReasoningDelta):
                        view.on_reasoning(event.text)
                    elif isinstance(event, TextDelta):
                        view.on_text(event.text)
            except KeyboardInterrupt:
                console.print("[dim](stopped)[/dim]")
            except ContextFullError as exc:
                console.print(f"[red]{exc}[/red] — /reset to start over")
            finally:
                view.close()
            last_reasoning = view.reasoning
            console.print(f"[dim]{chat.num_tokens:,} / {context:,} tokens[/dim]")


def _add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        nargs="?",
        default=DEFAULT_MODEL,
        help=f"a checkpoint directory, a .gguf file, or a preset ({', '.join(PRESETS)}; random weights); "
        f"default: the bundled {DEFAULT_MODEL}",
    )


def _add_inference_arguments(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    _add_model_argument(parser)
    parser.add_argument(
        "--max-tokens", type=int, default=max_tokens, help="most tokens to generate per reply"
    )
    parser.add_argument("--temperature", type=float, default=1.0, help="0 is greedy (default 1.0)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1: off)")
    parser.add_argument(
        "--top-k", type=int, default=0, help="sample among the k most likely (default 0: off)"
    )
    parser.add_argument("--seed", type=int, default=None, help="same seed, same output")
    parser.add_argument("--reasoning-effort", choices=["low", "medium", "high"], default="medium")
    parser.add_argument("--system", default=None, help="instructions (harmony's developer message)")
    parser.add_argument("--dtype", choices=_DTYPES, default=None, help="default: the checkpoint's own")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--int8", action="store_true", help="int8 weights for attention and output head")
    _add_speculative_argument(parser)
    parser.add_argument(
        "--draft-tokens",
        type=int,
        default=None,
        help="most proposed tokens one pass verifies (default 7; fewer when they do not pay)",
    )


def _add_speculative_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--speculative",
        choices=["off", "ngram", "suffix"],  # (gptoss.inference.speculative.PROPOSERS)
        default="off",
        help="speculative decoding: propose tokens from the prompt and earlier output (ngram: prompt "
        "lookup; suffix: suffix decoding, also over recent requests) and verify several per pass; "
        "the output is the same (default: off)",
    )


def _add_parallel_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tp", type=int, default=1, help="under torchrun: split attention by head over the N processes"
    )
    parser.add_argument(
        "--ep", type=int, default=1, help="under torchrun: split MoE experts over the N processes"
    )


def _speculation(args: argparse.Namespace) -> Speculation | None:
    from gptoss.inference.speculative import DEFAULT_MAX_DRAFT, speculation

    draft = DEFAULT_MAX_DRAFT if args.draft_tokens is None else args.draft_tokens
    if not 1 <= draft <= 64:
        raise SystemExit(f"--draft-tokens must lie in 1..64, got {draft}")
    return speculation(args.speculative, max_draft=draft)


# ---------------------------------------------------------------------- serve (gptoss.server)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(text: str) -> float:
    """Seconds in "30d", "12h", "90m", "45s" or a plain number of seconds."""
    number, unit = (text[:-1], text[-1]) if text[-1:] in _UNITS else (text, "s")
    try:
        seconds = float(number) * _UNITS[unit]
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive duration such as 30d, 12h or 90m")
    return seconds


def cmd_serve(args: argparse.Namespace) -> int:
    import torch

    from gptoss.server import serve

    serve(
        args.model,
        host=args.host,
        port=args.port,
        api_keys=tuple(args.api_key or ()),
        served_model_name=args.served_model_name,
        device=args.device,
        dtype=getattr(torch, args.dtype) if args.dtype else None,
        int8=args.int8,
        max_batch=args.max_batch,
        context=args.max_model_len,
        kv_cache_gib=args.kv_cache_gib,
        prefix_cache_gib=args.prefix_cache_gib,
        max_queue=args.max_queue,
        max_request_bytes=args.max_request_bytes,
        responses_db=args.responses_db,
        responses_ttl=args.responses_ttl,
        responses_max_bytes=args.responses_max_mb * 2**20,
        speculative=args.speculative,
        tensor_parallel=args.tp,
        expert_parallel=args.ep,
    )
    return 0


def _add_serve_command(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat, completions, responses)")
    _add_model_argument(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--api-key",
        action="append",
        help="require this bearer key; repeat for several, each seeing only its own stored responses "
        "(default: $GPTOSS_API_KEY, comma-separated)",
    )
    serve.add_argument("--served-model-name", default=None, help="model id for clients (default: dir name)")
    serve.add_argument(
        "--max-batch", type=int, default=32, help="sequences decoded together, at most (default 32)"
    )
    serve.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="tokens per sequence, prompt included (default: the model's context)",
    )
    serve.add_argument(
        "--kv-cache-gib",
        type=float,
        default=None,
        help="memory for the KV cache, taken as sequences grow; when it is full new requests wait "
        "(default: half of the memory available after loading)",
    )
    serve.add_argument("--max-queue", type=int, default=256, help="sequences waiting before a 429")
    serve.add_argument("--max-request-bytes", type=int, default=8 * 2**20, help="largest request body")
    serve.add_argument("--responses-db", default=None, help="SQLite file for stored responses")
    serve.add_argument(
        "--responses-ttl",
        type=_duration,
        default="30d",
        help="how long responses are kept (30d, 12h, 90m)",
    )
    serve.add_argument("--responses-max-mb", type=int, default=1024, help="stored responses' size cap")
    serve.add_argument(
        "--prefix-cache-gib",
        type=float,
        default=None,
        help="memory for cached prompt prefixes (default: a quarter of the free memory, at most 8; 0: off)",
    )
    serve.add_argument("--dtype", choices=_DTYPES, default=None, help="default: the checkpoint's own")
    serve.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    serve.add_argument("--int8", action="store_true", help="weight-only int8 attention and output head")
    _add_speculative_argument(serve)
    _add_parallel_arguments(serve)
    serve.set_defaults(func=cmd_serve)


# ---------------------------------------------------------------------- training (gptoss.train)
def cmd_prepare_data(args: argparse.Namespace) -> int:
    from gptoss.train.data import prepare_data

    manifest = prepare_data(
        args.inputs,
        args.out,
        val_fraction=args.val_fraction,
        workers=args.workers,
        shard_tokens=args.shard_tokens,
        text_field=args.text_field,
        pattern=args.pattern,
        progress=not args.quiet,
    )
    for split, facts in manifest["splits"].items():
        shards = len(facts["shards"])
        print(f"{split}: {facts['tokens']:,} tokens, {facts['documents']:,} documents, {shards} shards")
    print(f"wrote {Path(args.out) / 'manifest.json'}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from gptoss.train.trainer import config_from_args, train

    train(config_from_args(args))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from gptoss.train.plot import plot_runs

    print(f"wrote {plot_runs(args.runs, args.out)}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from gptoss.checkpoint import model_config
    from gptoss.train.plan import plan_training, recommend_layout

    options = {"gpu": args.gpu, "mfu": args.mfu, "seq_len": args.seq_len, "micro_batch": args.micro_batch}
    if args.recommend:
        return _print_layouts(
            [recommend_layout(model_config(m), args.tokens, args.gpus, **options) for m in args.models], args
        )
    plans = [
        plan_training(model_config(m), args.tokens, args.gpus, ep=args.ep, tp=args.tp, **options)
        for m in args.models
    ]
    if args.json:
        print(json.dumps(plans, indent=2))
        return 0
    first = plans[0]
    table = Table(
        title=f"{_human(args.tokens)} tokens on {args.gpus:,} × {first['gpu']} at {args.mfu:.0%} MFU, "
        f"sequence {args.seq_len:,} × micro-batch {args.micro_batch}"
    )
    table.add_column("")
    for plan in plans:
        table.add_column(f"{plan['model']} ({plan['kind']})", justify="right")
    memory = [
        ("weights fp32 (sharded)", "weights_fp32"),
        ("gradients fp32 (sharded)", "grads_fp32"),
        ("AdamW moments fp32 (sharded)", "optimizer_fp32"),
        ("gathered bf16 blocks", "gathered_blocks_bf16"),
        ("output head + loss (chunked)", "output_head_loss"),
        ("activations, no checkpointing", "activations_no_checkpointing"),
        ("activations, per-block checkpointing", "activations_per_block_checkpointing"),
        ("total per GPU, no checkpointing", "total_no_checkpointing"),
        ("total per GPU, per-block checkpointing", "total_per_block_checkpointing"),
    ]
    rows = [
        ("total / active parameters", lambda p: f"{_human(p['total_params'])} / {_human(p['active_params'])}")
    ]
    rows += [(label, lambda p, key=key: f"{p['memory_gib'][key]:,.1f} GiB") for label, key in memory]
    rows += [
        ("activation checkpointing needed", lambda p: p["activation_checkpointing"]),
        (
            "longest sequence: none / per block",
            lambda p: f"{p['max_seq_len_no_checkpointing']:,} / {p['max_seq_len_per_block_checkpointing']:,}",
        ),
        ("training FLOPs per token", lambda p: f"{_human(p['train_flops_per_token'], _SI)}FLOP"),
        ("all-to-all per micro-batch", lambda p: _gib(p["bytes_per_micro_batch"]["all_to_all"])),
        ("FSDP traffic per micro-batch", lambda p: _gib(p["bytes_per_micro_batch"]["fsdp"])),
        ("estimated step (compute / total)", _step_cell),
        ("total FLOPs", lambda p: f"{p['total_flops']:.3g}"),
        ("wall clock", lambda p: f"{p['wall_clock_days']:,.1f} days"),
        ("GPU-hours", lambda p: f"{p['gpu_hours']:,.0f}"),
    ]
    for label, cell in rows:
        table.add_row(label, *(cell(p) for p in plans))
    Console().print(table)
    layout = f"expert parallel {args.ep} × FSDP" if args.ep > 1 else "FSDP over all GPUs"
    if args.tp > 1:
        split = "attention and experts" if args.ep == args.tp else "attention"
        layout = f"tensor parallel {args.tp} ({split}) × FSDP"
    print(f"{first['gpu_memory_gib']} GiB per GPU; {layout}, AdamW, bf16 compute, flash attention")
    return 0


def _step_cell(plan: dict) -> str:
    seconds = plan["seconds_per_micro_batch"]
    return f"{seconds['compute']:.2f} / {seconds['step']:.2f} s"


def _print_layouts(reports: list[dict], args: argparse.Namespace) -> int:
    """`gptoss plan --recommend`: every layout of each model, the recommended one marked."""
    from rich.console import Console
    from rich.table import Table

    if args.json:
        print(json.dumps(reports, indent=2))
        return 0
    console = Console(width=120)
    for report in reports:
        table = Table(title=f"{report['model']}: {_human(args.tokens)} tokens on {args.gpus:,} GPUs")
        for column in ("layout", "memory", "checkpointing", "all-to-all", "FSDP", "step", ""):
            table.add_column(column, justify="left" if column == "layout" else "right", no_wrap=True)
        for plan in report["layouts"]:
            ep, tp = plan["layout"]["ep"], plan["layout"]["tp"]
            name = f"EP {ep} × FSDP {args.gpus // ep}" if ep > 1 else f"TP {tp} × FSDP {args.gpus // tp}"
            if ep > 1 and tp > 1:
                name = f"EP = TP {ep} × FSDP {args.gpus // ep}"
            memory = plan["memory_gib"][
                "total_no_checkpointing"
                if plan["activation_checkpointing"] == "none"
                else "total_per_block_checkpointing"
            ]
            table.add_row(
                "FSDP" if ep == tp == 1 else name,
                f"{memory:,.1f} GiB",
                plan["activation_checkpointing"],
                _gib(plan["bytes_per_micro_batch"]["all_to_all"]),
                _gib(plan["bytes_per_micro_batch"]["fsdp"]),
                f"{plan['seconds_per_micro_batch']['step']:.2f} s",
                "<- recommended" if plan["layout"] == report["recommended"] else "",
            )
        console.print(table)
    print(
        "memory, traffic and estimated step per GPU and micro-batch; NVLink inside 8-GPU nodes, "
        "a 400 Gb/s NIC per GPU between them"
    )
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from gptoss.train.sft import finetune, sft_config_from_args

    result = finetune(sft_config_from_args(args))
    val = result["val_loss"]
    print(
        f"{result['mode']} fine-tuning, {result['steps']} steps: train loss {result['train_loss']:.4f}"
        + (f", val loss {result['initial_val_loss']:.4f} → {val:.4f}" if val is not None else "")
    )
    print(f"wrote {result['output']}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from gptoss.train.lora import merge_adapter

    print(f"wrote {merge_adapter(args.base, args.adapter, args.out)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from gptoss.gguf import export

    for path in export(args.model, args.out, args.outtype, args.ollama, progress=not args.quiet):
        print(f"wrote {path}")
    return 0


def _add_export_command(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser("export", help="write a model as GGUF for llama.cpp, LM Studio or Ollama")
    export.add_argument("model", help="a checkpoint directory, a .gguf file or a preset (random weights)")
    export.add_argument(
        "out", nargs="?", default=None, help="the .gguf file to write (default with --ollama: DIR/NAME.gguf)"
    )
    export.add_argument(
        "--outtype", choices=["bf16", "f16", "f32", "q8_0"], default="bf16",
        help="type of the matrices other than MXFP4 experts (default bf16)",
    )  # fmt: skip
    export.add_argument(
        "--ollama", metavar="DIR", default=None, help="also write DIR/Modelfile for `ollama create`"
    )
    export.add_argument("--quiet", action="store_true", help="no progress bar")
    export.set_defaults(func=cmd_export)


def _add_training_commands(sub: argparse._SubParsersAction, command: str | None) -> None:
    prep = sub.add_parser("prepare-data", help="tokenize text, JSONL or Parquet into uint32 token shards")
    prep.add_argument("inputs", nargs="+", help="files or directories (.jsonl/.parquet: a `text` field)")
    prep.add_argument("--out", required=True, help="dataset directory to write")
    prep.add_argument("--val-fraction", type=float, default=0.005, help="documents held out (default 0.005)")
    prep.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    prep.add_argument("--shard-tokens", type=int, default=2**27, help="tokens per shard file")
    prep.add_argument("--text-field", default="text", help="JSONL field / Parquet column holding the text")
    prep.add_argument("--pattern", default=None, help="in directories, only files matching a glob ('*.py')")
    prep.add_argument("--quiet", action="store_true", help="no progress bar")
    prep.set_defaults(func=cmd_prepare_data)

    train = sub.add_parser(
        "train",
        help="pretrain a model (run under torchrun for several processes)",
        description="Options override the --config file, which overrides the defaults.",
    )
    if command == "train":
        from gptoss.train.trainer import add_config_arguments

        train.add_argument("--config", default=None, help="a TOML or YAML file of training options")
        add_config_arguments(train)
    train.set_defaults(func=cmd_train)

    plot = sub.add_parser("plot", help="draw the loss curves of training runs to a PNG")
    plot.add_argument("runs", nargs="+", help="run directories (holding metrics.jsonl)")
    plot.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/loss.png)")
    plot.set_defaults(func=cmd_plot)

    plan = sub.add_parser("plan", help="memory, FLOPs and GPU-hours of a pretraining run at scale")
    plan.add_argument("models", nargs="+", help=f"presets or checkpoint directories ({', '.join(PRESETS)})")
    plan.add_argument("--tokens", type=float, required=True, help="training tokens, e.g. 15e12")
    plan.add_argument("--gpus", type=int, required=True, help="number of GPUs")
    plan.add_argument("--gpu", default="h100", choices=["a100", "h100", "h200", "b200"])
    plan.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed (default 0.4)")
    plan.add_argument("--seq-len", type=int, default=4096, help="training sequence length (default 4096)")
    plan.add_argument("--micro-batch", type=int, default=1, help="sequences per GPU per pass (default 1)")
    plan.add_argument("--ep", type=int, default=1, help="expert parallel degree (default 1)")
    plan.add_argument("--tp", type=int, default=1, help="tensor parallel degree for attention (default 1)")
    plan.add_argument("--recommend", action="store_true", help="compare the layouts and recommend one")
    plan.add_argument("--json", action="store_true", help="print JSON instead of a table")
    plan.set_defaults(func=cmd_plan)

    finetune = sub.add_parser(
        "finetune",
        help="supervised fine-tuning on harmony conversations (JSONL), full or LoRA",
        description="Options override the --config file, which overrides the defaults.",
    )
    if command == "finetune":
        from gptoss.train.sft import add_sft_arguments

        add_sft_arguments(finetune)
    finetune.set_defaults(func=cmd_finetune)

    merge = sub.add_parser("merge", help="merge a LoRA adapter into its base model, as a new checkpoint")
    merge.add_argument("base", help="the base model: checkpoint directory (or preset)")
    merge.add_argument("adapter", help="the adapter directory `gptoss finetune` wrote")
    merge.add_argument("out", help="checkpoint directory to write")
    merge.set_defaults(func=cmd_merge)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command; the options of `train` and `finetune` (built from their config
    classes, behind torch) only when `command` names one of them."""
    parser = argparse.ArgumentParser(prog="gptoss", description="The gpt-oss model family.")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="shape, parameters, memory, KV cache and FLOPs of a model")
    _add_model_argument(info)
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.add_argument("--context", type=int, default=None, help="context length for KV cache and FLOPs")
    info.set_defaults(func=cmd_info)

    generate = sub.add_parser("generate", help="complete one prompt, streaming the answer")
    _add_inference_arguments(generate, max_tokens=1024)
    generate.add_argument("prompt", help="the user message (with --raw: the text to continue)")
    generate.add_argument("--raw", action="store_true", help="plain completion of the text, no chat format")
    generate.add_argument("--show-reasoning", action="store_true", help="print the reasoning (to stderr)")
    _add_parallel_arguments(generate)
    generate.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive multi-turn chat")
    _add_inference_arguments(chat, max_tokens=4096)
    chat.add_argument("--context", type=int, default=32768, help="tokens the conversation may reach")
    chat.set_defaults(func=cmd_chat)

    _add_serve_command(sub)
    _add_export_command(sub)
    _add_training_commands(sub, command)
    add_eval_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"gptoss: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
