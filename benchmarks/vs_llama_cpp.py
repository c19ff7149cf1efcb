"""llama.cpp on the same machine and checkpoint: the comparison rows of benchmarks/decode.py.

    python benchmarks/decode.py --models 20b --engines ours llama.cpp --batch 1
    python benchmarks/decode.py --models 20b --engines ours-int8 llama.cpp-q8_0 --batch 1 \\
        --llama-cpp ~/src/llama.cpp

llama.cpp is not a dependency of gptoss. --llama-cpp names a llama.cpp source tree; without it the
one inside the llama-cpp-python source distribution is fetched from PyPI into --dir. Its
llama-bench is built there with CMake if missing (GGML_NATIVE: the CPU's own instruction sets;
several minutes on 2 cores), and the random checkpoint is converted with the tree's own
convert_hf_to_gguf.py: the experts stay MXFP4 as stored, attention and the output head are bf16
(engine llama.cpp) or Q8_0 (llama.cpp-q8_0, the counterpart of ours-int8). The checkpoint has no
tokenizer files, so a tokenizer.json is written from our o200k_harmony vocabulary first.

llama-bench times a 128-token prompt at an empty context (pp) and the new tokens at the prompt's
depth (tg, -d), as our engine decodes after its prompt; each figure is the best of its repetitions
(llama-bench's samples), as ours is. The peak RSS is the llama-bench process's (os.wait4).

Run as a script, it checks GGUF interoperability both ways instead (a table, and JSON in --json):

    python benchmarks/vs_llama_cpp.py                    # the bundled model and a random nano
    python benchmarks/vs_llama_cpp.py --models bundled nano 20b

- ours → llama.cpp: the model exported by `gptoss export` runs in llama.cpp (through the
  llama-cpp-python bindings of the same source distribution, against the libllama built beside
  llama-bench) and must give our greedy tokens on a few harmony prompts (one longer than the
  sliding window); the table also shows the
  largest difference of the first step's logits, and whether llama.cpp's tokenizer, reading the
  vocabulary from our file, splits a few texts into our ids.
- llama.cpp → ours: the checkpoint converted by llama.cpp's convert_hf_to_gguf.py loads with
  `gptoss.load_model` into the same tensors, bit for bit, and the same logits. (Not for the bundled
  model: its vocabulary is trimmed, which the converter does not know.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from gptoss.tokenizer import write_hf_tokenizer

# engine name → convert_hf_to_gguf.py --outtype (the dtype of everything that is not an expert)
ENGINES = {"llama.cpp": "bf16", "llama.cpp-q8_0": "q8_0"}


def source_tree(given: Path | None, work_dir: Path, console: Console) -> Path:
    """The llama.cpp tree to use: `given`, or the one in llama-cpp-python's sdist under work_dir."""
    if given is not None:
        tree = given.expanduser()
        if not (tree / "convert_hf_to_gguf.py").is_file() or not (tree / "CMakeLists.txt").is_file():
            raise SystemExit(
                f"--llama-cpp {tree}: not a llama.cpp source tree (no convert_hf_to_gguf.py and "
                "CMakeLists.txt there); give the tree's top directory, or leave the option out to "
                "fetch one from PyPI"
            )
        return tree
    found = sorted(work_dir.glob("llama_cpp_python-*/vendor/llama.cpp"))
    if found:
        return found[-1]
    console.print("[dim]fetching llama-cpp-python's source distribution from PyPI ...[/dim]")
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        fetch = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                 "--dest", tmp, "llama-cpp-python"]  # fmt: skip
        _run(fetch, work_dir / "pip-download.log", "pip download llama-cpp-python")
        (sdist,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        with tarfile.open(sdist) as archive:
            archive.extractall(work_dir, filter="data")
    return sorted(work_dir.glob("llama_cpp_python-*/vendor/llama.cpp"))[-1]


def bench_binary(tree: Path, console: Console) -> Path:
    """llama-bench of `tree`, built with CMake (native instruction sets, no network code) if missing."""
    binary = tree / "build" / "bin" / "llama-bench"
    if binary.is_file():
        return binary
    console.print(f"[dim]building llama-bench in {tree} (logs: {tree}/llama-bench-*.log) ...[/dim]")
    configure = ["cmake", "-S", str(tree), "-B", str(tree / "build"), "-DCMAKE_BUILD_TYPE=Release",
                 "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                 "-DLLAMA_BUILD_SERVER=OFF"]  # fmt: skip
    _run(configure, tree / "llama-bench-configure.log", "cmake configure (no cmake? pip install cmake)")
    jobs = str(os.cpu_count() or 1)
    build = ["cmake", "--build", str(tree / "build"), "-j", jobs, "--target", "llama-bench"]
    _run(build, tree / "llama-bench-build.log", "cmake build")
    return binary


def gguf_file(checkpoint: Path, tree: Path, outtype: str, work_dir: Path, console: Console) -> Path:
    """The checkpoint as GGUF (experts MXFP4, the rest `outtype`), converted once, written under a
    temporary name and renamed when whole."""
    out = work_dir / f"{checkpoint.name}-{outtype}.gguf"
    if out.is_file():
        return out
    console.print(f"[dim]converting {checkpoint.name} to {out.name} ...[/dim]")
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        staged = Path(tmp) / "checkpoint"
        staged.mkdir()
        for item in checkpoint.iterdir():
            (staged / item.name).symlink_to(item.resolve())
        write_hf_tokenizer(staged)
        partial = Path(tmp) / out.name
        convert = [sys.executable, str(tree / "convert_hf_to_gguf.py"), str(staged),
                   "--outtype", outtype, "--outfile", str(partial)]  # fmt: skip
        env = os.environ | {"PYTHONPATH": str(tree / "gguf-py")}
        _run(convert, work_dir / f"{out.name}.log", "convert_hf_to_gguf.py", env=env)
        partial.rename(out)
    return out


def measure(
    checkpoint: Path, engine: str, tree: Path, work_dir: Path, threads: int, prompt_len: int,
    new_tokens: int, repeats: int, timeout: float, console: Console,
) -> dict[str, Any]:  # fmt: skip
    """Prefill and decode tok/s (best of `repeats`) and peak RSS of llama-bench on the checkpoint."""
    binary = bench_binary(tree, console)
    model = gguf_file(checkpoint, tree, ENGINES[engine], work_dir, console)
    cmd = [str(binary), "-m", str(model), "-t", str(threads), "-r", str(repeats), "-o", "json",
           "-p", str(prompt_len), "-n", str(new_tokens), "-d", f"0,{prompt_len}"]  # fmt: skip
    result = _bench(cmd, timeout)
    if result.get("returncode", 0) < 0:  # killed by a signal: its AMX Q8_0 kernel, at ldtilecfg (a Xeon)
        note = f"llama-bench died of signal {-result['returncode']} with repacked weights; ran --repack 0"
        result = _bench([*cmd, "--repack", "0"], timeout) | {"note": note}
    if "tests" not in result:
        return {"error": result["error"]}
    tests = result.pop("tests")

    def best(n_prompt: int, n_gen: int, depth: int) -> float | None:
        for test in tests:
            if (test["n_prompt"], test["n_gen"], test["n_depth"]) == (n_prompt, n_gen, depth):
                return max(test["samples_ts"])
        return None

    prefill, decode = best(prompt_len, 0, 0), best(0, new_tokens, prompt_len)
    return result | {
        "b1": {"prefill_tok_s": prefill, "decode_tok_s": decode, "generations": []},
        "llama_cpp_build": tests[0].get("build_commit"),
        "gguf": str(model),
        "gguf_gib": model.stat().st_size / 2**30,
    }


def _bench(cmd: list[str], timeout: float) -> dict[str, Any]:
    """Run llama-bench; its JSON, wall time and peak RSS, or the error."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(cmd, stdout=out, stderr=err)
        deadline = start + timeout
        while (waited := os.wait4(process.pid, os.WNOHANG))[0] == 0:
            if time.perf_counter() > deadline:
                process.kill()
                os.wait4(process.pid, 0)
                return {"error": f"llama-bench timed out after {timeout:.0f} s"}
            time.sleep(0.2)
        _, status, usage = waited
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode(errors="replace")
    if process.returncode != 0:
        last = (stderr.strip().splitlines() or ["no output"])[-1][:200]
        return {"returncode": process.returncode, "error": f"llama-bench exit {process.returncode}: {last}"}
    return {
        "tests": json.loads(stdout),
        "wall_s": time.perf_counter() - start,
        "peak_rss_gib": usage.ru_maxrss / 2**20,  # KiB on Linux
    }


def _run(cmd: list[str], log: Path, what: str, env: dict[str, str] | None = None) -> None:
    """Run a setup step with its output in `log`; on failure stop with the log's tail."""
    with log.open("w") as sink:
        done = subprocess.run(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise SystemExit(f"{what} failed (exit {done.returncode}); log: {log}\n{tail}")


# ---------------------------------------------------------------------- GGUF interoperability
INTEROP_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence why the sky is blue.",
    # longer than the 128-token sliding window, so that the windowed layers' masks are compared too
    "Summarize this in one line: "
    + " ".join(
        f"Step {i}: the river carried the boat past the mill, the bridge and the old stone tower."
        for i in range(1, 11)
    ),
)
TOKENIZER_TEXTS = (
    "Hello, world! It's 2025 and the café serves crème brûlée.",
    "def mxfp4(x):\n    return x  # 4-bit 🙂 Привет 世界",
    "<|start|>user<|message|>Hi<|end|><|start|>assistant",
)
# Runs in its own process with llama-cpp-python on its path; job on stdin, results on stdout.
_LLAMA_CPP_JOB = r"""
import json, sys
import numpy as np
from llama_cpp import Llama
job = json.load(sys.stdin)
llm = Llama(model_path=job["model"], n_ctx=job["n_ctx"], n_threads=job["threads"], logits_all=True,
            verbose=False)
out = {"tokenized": [llm.tokenize(t.encode(), add_bos=False, special=True) for t in job["texts"]], "runs": []}
for prompt in job["prompts"]:
    llm.reset()
    llm.eval(prompt)
    first = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
    tokens = []
    for _ in range(job["new_tokens"]):
        tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([tokens[-1]])
    out["runs"].append({"tokens": tokens, "first_logits": first.tolist()})
print(json.dumps(out))
"""


def bindings_env(tree: Path, work_dir: Path, console: Console) -> dict[str, str]:
    """The environment of a Python process that imports llama-cpp-python's bindings (from the
    source distribution `tree` came in) against the libllama built in `tree`."""
    sdist = tree.parent.parent
    if not (sdist / "llama_cpp" / "llama_cpp.py").is_file():
        raise SystemExit(
            f"{tree} did not come with llama-cpp-python's bindings; leave out --llama-cpp to check "
            "interoperability with the tree of its PyPI source distribution"
        )
    library = bench_binary(tree, console).parent / "libllama.so"  # built beside llama-bench
    deps = work_dir / "llama-cpp-python-deps"
    if not (deps / "diskcache").is_dir():  # the one import of the bindings that gptoss lacks
        install = [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(deps), "diskcache"]
        _run(install, work_dir / "pip-diskcache.log", "pip install diskcache")
    return os.environ | {
        "LLAMA_CPP_LIB_PATH": str(library.parent),
        "PYTHONPATH": f"{sdist}{os.pathsep}{deps}",
    }


def run_llama_cpp(env: dict[str, str], job: dict[str, Any], timeout: float) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", _LLAMA_CPP_JOB], input=json.dumps(job), env=env,
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"llama.cpp failed on {job['model']} (exit {done.returncode}): {tail}")
    return json.loads(done.stdout)


def _prompts(model: Any) -> list[list[int]]:
    """The interop prompts as harmony chat prompts, in ids `model` can read."""
    from gptoss.harmony import chat_messages_to_harmony, render_for_completion
    from gptoss.vocab import fit_tokens

    messages = ([{"role": "user", "content": text}] for text in INTEROP_PROMPTS)
    return [fit_tokens(model, render_for_completion(chat_messages_to_harmony(m))) for m in messages]


def ours_to_llama_cpp(
    checkpoint: Path, outtype: str, env: dict[str, str], work_dir: Path, new_tokens: int, threads: int,
    timeout: float,
) -> dict[str, Any]:  # fmt: skip
    """Export the checkpoint with gptoss (its non-expert matrices `outtype`, our model computing in
    that type too), take our greedy tokens and first logits, then run the GGUF in llama.cpp (the
    model freed first: a 20b is loaded by one side at a time)."""
    import gc

    import numpy as np
    import torch

    from gptoss.checkpoint import load_model
    from gptoss.gguf import save_gguf
    from gptoss.inference import generate
    from gptoss.tokenizer import get_tokenizer

    model = load_model(checkpoint, dtype=torch.float32 if outtype == "f32" else None)
    path = save_gguf(model, work_dir / f"{checkpoint.name}-gptoss-{outtype}.gguf", outtype)
    trimmed = model.config.vocab_rows is not None
    ids = model.model.token_ids.tolist() if trimmed else list(range(model.config.vocab_size))
    row = {token_id: i for i, token_id in enumerate(ids)}
    prompts = _prompts(model)
    ours = [[row[t] for t in tokens] for tokens in generate(model, prompts, new_tokens, temperature=0)]
    with torch.no_grad():
        # logits over the file's rows after the prompt and after each of our greedy tokens
        steps = [
            model(torch.tensor([p + [ids[r] for r in mine]]))[0, len(p) - 1 :, torch.tensor(ids)]
            .float()
            .numpy()
            for p, mine in zip(prompts, ours, strict=True)
        ]
    del model
    gc.collect()

    job = {
        "model": str(path), "n_ctx": 1024, "threads": threads, "new_tokens": new_tokens,
        "prompts": [[row[t] for t in prompt] for prompt in prompts], "texts": list(TOKENIZER_TEXTS),
    }  # fmt: skip
    theirs = run_llama_cpp(env, job, timeout)
    results = []
    for mine, logits, run in zip(ours, steps, theirs["runs"], strict=True):
        agree = next(
            (i for i, (a, b) in enumerate(zip(mine, run["tokens"], strict=False)) if a != b), len(mine)
        )
        results.append({
            "ours": mine,
            "llama_cpp": run["tokens"][: len(mine)],
            "equal": agree == len(mine),
            "tokens_agreeing": agree,
            # where they part: how far ahead our token was of llama.cpp's in our own logits
            "our_margin_where_they_part": None if agree == len(mine)
            else float(logits[agree, mine[agree]] - logits[agree, run["tokens"][agree]]),
            "first_logits_max_abs_diff": float(np.abs(logits[0] - np.array(run["first_logits"])).max()),
            "first_logits_max_abs": float(np.abs(logits[0]).max()),
        })  # fmt: skip
    # A trimmed vocabulary is written as its own rows, whose merges split text differently from our
    # byte spelling of the ids it lacks: only a full vocabulary's tokenization can be compared.
    tokenizer = get_tokenizer()
    ours_tokenized = [tokenizer.encode(text, allowed_special="all") for text in TOKENIZER_TEXTS]
    return {
        "gguf": str(path),
        "gguf_mib": path.stat().st_size / 2**20,
        "outtype": outtype,
        "prompts": results,
        "greedy_equal": sum(r["equal"] for r in results),
        "tokenizer_equal": None
        if trimmed
        else sum(a == b for a, b in zip(ours_tokenized, theirs["tokenized"], strict=True)),
        "tokenizer_texts": len(TOKENIZER_TEXTS),
    }


def _digest_and_logits(model: Any) -> tuple[dict[str, str], list[Any]]:
    import hashlib

    import torch

    digests = {
        name: hashlib.sha256(t.detach().contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()
        for name, t in model.state_dict().items()
    }
    with torch.no_grad():
        logits = [model(torch.tensor([p]))[0].float() for p in _prompts(model)]
    return digests, logits


def llama_cpp_to_ours(checkpoint: Path, tree: Path, work_dir: Path, console: Console) -> dict[str, Any]:
    """Convert `checkpoint` with llama.cpp's converter, load the GGUF in gptoss, and compare with the
    checkpoint loaded directly: every tensor (by SHA-256, one model in memory at a time) and the
    logits of the interop prompts at every position."""
    import gc

    from gptoss.checkpoint import load_model

    theirs_path = gguf_file(checkpoint, tree, "bf16", work_dir, console)
    model = load_model(checkpoint)
    direct = _digest_and_logits(model)
    del model
    gc.collect()
    model = load_model(theirs_path)
    theirs = _digest_and_logits(model)
    del model
    diff = max(float((a - b).abs().max()) for a, b in zip(direct[1], theirs[1], strict=True))
    return {
        "gguf": str(theirs_path),
        "tensors_bit_equal": direct[0] == theirs[0],
        "logits_max_abs_diff": diff,
    }


def same_in_llama_cpp(
    a: Path, b: Path, env: dict[str, str], new_tokens: int, threads: int, timeout: float
) -> dict[str, Any]:
    """Run two full-vocabulary GGUFs in llama.cpp on the interop prompts, one after the other (no
    model in this process: a 20b fits where two copies would not): greedy tokens and first logits."""
    import numpy as np

    from gptoss.harmony import chat_messages_to_harmony, render_for_completion

    prompts = [
        render_for_completion(chat_messages_to_harmony([{"role": "user", "content": t}]))
        for t in INTEROP_PROMPTS
    ]
    job = {"n_ctx": 1024, "threads": threads, "new_tokens": new_tokens, "prompts": prompts, "texts": []}
    runs = [run_llama_cpp(env, job | {"model": str(path)}, timeout)["runs"] for path in (a, b)]
    from gptoss.gguf import _open  # the files' tensors and vocabularies, compared byte for byte

    files = [_open(path) for path in (a, b)]
    tensors = [{t.name: t for t in f.tensors} for f in files]

    def raw(t: Any) -> Any:
        return np.asarray(t.data).view(np.uint8)

    same = [
        name for name, t in tensors[0].items()
        if name in tensors[1] and t.tensor_type == tensors[1][name].tensor_type
        and np.array_equal(raw(t), raw(tensors[1][name]))
    ]  # fmt: skip
    vocab_keys = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")
    return {
        "a": str(a),
        "b": str(b),
        "tensors": [len(t) for t in tensors],
        "tensors_byte_equal": len(same),
        "vocabulary_equal": all(files[0].fields.get(k) == files[1].fields.get(k) for k in vocab_keys),
        "greedy_equal": sum(x["tokens"] == y["tokens"] for x, y in zip(*runs, strict=True)),
        "prompts": len(prompts),
        "first_logits_max_abs_diff": max(
            float(np.abs(np.array(x["first_logits"]) - np.array(y["first_logits"])).max())
            for x, y in zip(*runs, strict=True)
        ),
    }


def main() -> None:
    import argparse

    import torch

    parser = argparse.ArgumentParser(description="GGUF interoperability of gptoss and llama.cpp")
    parser.add_argument(
        "--models",
        nargs="+",
        default=["bundled", "nano"],
        choices=["bundled", "nano", "20b"],
        help="bundled: gptoss-nano (trimmed vocabulary); nano/20b: random MXFP4 checkpoints",
    )
    parser.add_argument("--dir", type=Path, default=Path("/tmp/gptoss-bench"), help="work directory")
    parser.add_argument("--llama-cpp", type=Path, default=None, help="a llama.cpp source tree (see above)")
    parser.add_argument(
        "--outtypes", nargs="+", default=["bf16"], choices=["bf16", "f32"],
        help="types of the exported non-expert matrices (our model computes in the same type)",
    )  # fmt: skip
    parser.add_argument(
        "--compare", nargs=2, type=Path, metavar=("A.gguf", "B.gguf"), default=None,
        help="instead: whether llama.cpp computes the same on two GGUFs (e.g. `gptoss export`'s and "
        "convert_hf_to_gguf.py's of one checkpoint)",
    )  # fmt: skip
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--json", type=Path, default=None, help="default: DIR/interop.json")
    args = parser.parse_args()  # fmt: skip
    console = Console()
    args.dir.mkdir(parents=True, exist_ok=True)
    tree = source_tree(args.llama_cpp, args.dir, console)
    env = bindings_env(tree, args.dir, console)
    threads = torch.get_num_threads()
    if args.compare:
        result = same_in_llama_cpp(*args.compare, env, args.new_tokens, threads, args.timeout)
        console.print(
            f"llama.cpp on {args.compare[0].name} and {args.compare[1].name}: greedy tokens equal on "
            f"{result['greedy_equal']}/{result['prompts']} prompts × {args.new_tokens}, first logits max "
            f"|diff| {result['first_logits_max_abs_diff']:.3g}; tensors byte-equal "
            f"{result['tensors_byte_equal']} (of {result['tensors'][0]} and {result['tensors'][1]}), "
            + ("vocabulary equal" if result["vocabulary_equal"] else "vocabulary DIFFERENT")
        )
        return

    from decode import MODELS, write_random_checkpoint  # noqa: PLC0415 - decode.py imports this module

    from gptoss import get_config
    from gptoss.checkpoint import bundled_model_dir

    report: dict[str, Any] = {"llama_cpp": str(tree), "models": {}}
    for key in args.models:
        if key == "bundled":
            checkpoint = bundled_model_dir()
        else:
            checkpoint = write_random_checkpoint(
                get_config(MODELS[key]), args.dir / f"{MODELS[key]}-random-mxfp4"
            )
        entry: dict[str, Any] = {"ours_to_llama_cpp": {}}
        for outtype in args.outtypes:
            console.print(f"[dim]{key}: gptoss export ({outtype}) → llama.cpp ...[/dim]")
            entry["ours_to_llama_cpp"][outtype] = ours_to_llama_cpp(
                checkpoint, outtype, env, args.dir, args.new_tokens, threads, args.timeout
            )
        if key != "bundled":
            console.print(f"[dim]{key}: convert_hf_to_gguf.py → gptoss ...[/dim]")
            entry["llama_cpp_to_ours"] = llama_cpp_to_ours(checkpoint, tree, args.dir, console)
        report["models"][key] = entry

    table = Table(title=f"GGUF interop with llama.cpp ({tree.parent.parent.name})")
    for column in ("model", "export", "greedy tokens equal", "first-logit max |diff|", "tokenizer equal",
                   "their GGUF: tensors", "their GGUF: logit max |diff|"):  # fmt: skip
        table.add_column(column)
    for key, entry in report["models"].items():
        back = entry.get("llama_cpp_to_ours")
        for outtype, out in entry["ours_to_llama_cpp"].items():
            tokenizer = out["tokenizer_equal"]
            table.add_row(
                key,
                outtype,
                f"{out['greedy_equal']}/{len(out['prompts'])} prompts × {args.new_tokens} "
                f"(agreeing: {', '.join(str(p['tokens_agreeing']) for p in out['prompts'])})",
                f"{max(p['first_logits_max_abs_diff'] for p in out['prompts']):.3g} "
                f"(of {max(p['first_logits_max_abs'] for p in out['prompts']):.3g})",
                "- (trimmed)" if tokenizer is None else f"{tokenizer}/{out['tokenizer_texts']}",
                "-" if back is None else ("bit-equal" if back["tensors_bit_equal"] else "DIFFER"),
                "-" if back is None else f"{back['logits_max_abs_diff']:.3g}",
            )
    console.print(table)
    out = args.json or args.dir / "interop.json"
    out.write_text(json.dumps(report, indent=2))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
