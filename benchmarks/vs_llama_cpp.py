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
