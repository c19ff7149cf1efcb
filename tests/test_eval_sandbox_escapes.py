"""Escapes tried against the HumanEval sandbox: filling the disk through /tmp and /dev/shm, reading
another process's command line (a server's --api-key) from /proc, reading the project and the home
directory. Each must be contained where the namespaces exist (the result's `isolation` says so);
where they do not, the test says which layer is missing instead of passing silently."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import gptoss
from gptoss.eval import SandboxLimits, run_python

LIMITS = SandboxLimits(timeout=20.0, memory_bytes=512 * 2**20, scratch_bytes=32 * 2**20)


# Whether this machine lets an unprivileged process make user, mount and PID namespaces, probed
# apart from the sandbox: where it does, the sandbox must have used them (no skip hides a failure).
NAMESPACE_PROBE = """
import ctypes
print(ctypes.CDLL(None, use_errno=True).unshare(0x10000000 | 0x20000 | 0x20000000) == 0)
"""


@pytest.fixture(scope="module")
def isolation() -> dict:
    probe = subprocess.run([sys.executable, "-c", NAMESPACE_PROBE], capture_output=True, text=True)
    report = run_python("pass", LIMITS).isolation
    if probe.stdout.strip() != "True":
        pytest.skip(
            f"no namespaces on this machine: the sandbox runs with {report} (docs/evaluation.md says "
            "which protections remain)"
        )
    assert (report["filesystem"], report["processes"]) == ("private", "namespace"), report
    return report


def test_scratch_space_is_private_bounded_and_gone_after_the_run(isolation):
    token = uuid.uuid4().hex
    code = f"""
import errno, os
written = 0
try:
    for place in ("/tmp", "/dev/shm", "/var/tmp"):
        for i in range(24):  # 8 MiB each: 576 MiB if nothing stopped it
            with open(f"{{place}}/{token}-{{i}}", "wb") as f:
                f.write(b"x" * 8 * 2**20)
            written += 8
except OSError as exc:
    print("stopped", errno.errorcode[exc.errno], written)
"""
    result = run_python(code, LIMITS)
    assert result.status == "passed", result.stderr
    word, code_name, written = result.stdout.split()
    assert (word, code_name) == ("stopped", "ENOSPC") and int(written) <= 32
    for place in ("/tmp", "/dev/shm", "/var/tmp"):
        assert not [name for name in os.listdir(place) if token in name]  # nothing reached the host


def test_other_processes_and_their_command_lines_are_invisible(isolation):
    secret = f"sk-{uuid.uuid4().hex}"
    # A process with a secret in its command line, as `gptoss serve --api-key ...` has.
    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "--api-key", secret])
    try:
        code = """
import os
pids = [p for p in os.listdir("/proc") if p.isdigit()]
keys = []
for pid in pids:
    try:
        args = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\\0")
    except OSError:
        continue
    keys += [args[i + 1].decode() for i, arg in enumerate(args[:-1]) if arg == b"--api-key"]
print("keys", keys)
print(len(pids), os.getpid())
"""
        result = run_python(code, LIMITS)
    finally:
        server.kill()
        server.wait()
    assert result.status == "passed", result.stderr
    keys, counts = result.stdout.splitlines()
    count, own_pid = counts.split()
    assert keys == "keys []" and secret not in result.stdout
    assert int(count) <= 3 and int(own_pid) <= 3  # its namespace's init, itself


def test_the_project_and_home_directories_cannot_be_read(isolation):
    package = Path(gptoss.__file__).resolve().parent
    project = next((p for p in package.parents if (p / "pyproject.toml").is_file()), package)
    home = Path.home()
    assert (project / "pyproject.toml").is_file() or (package / "__init__.py").is_file()
    code = f"""
import os
for path in ({str(project / "pyproject.toml")!r}, {str(package / "__init__.py")!r}):
    try:
        open(path).read()
        print("read", path)
    except OSError as exc:
        print("refused", type(exc).__name__)
print("home", os.listdir({str(home)!r}) if os.path.isdir({str(home)!r}) else [])
"""
    result = run_python(code, LIMITS)
    assert result.status == "passed", result.stderr
    assert "read " not in result.stdout
    assert result.stdout.splitlines()[-1] == "home []"


def test_every_host_mount_is_read_only_even_for_the_programs_own_user(isolation, tmp_path):
    code = """
import errno, os
for path in ("/etc/gptoss-sandbox-probe", "/usr/gptoss-sandbox-probe", "/var/gptoss-sandbox-probe"):
    try:
        open(path, "w").write("x")
        print("wrote", path)
    except OSError as exc:
        print("refused", errno.errorcode[exc.errno])
"""
    result = run_python(code, LIMITS)
    assert result.status == "passed", result.stderr
    assert result.stdout.split() == ["refused", "EROFS"] * 3 or "wrote" not in result.stdout
    assert not any(Path(p).exists() for p in ("/etc/gptoss-sandbox-probe", "/usr/gptoss-sandbox-probe"))


def test_the_isolation_report_names_every_layer(isolation):
    """Whatever this machine allows, the report says what the program ran with."""
    assert {"network", "processes", "filesystem", "uid"} <= set(isolation)
    assert isolation["network"] in ("namespace", "guard-only")
    assert isolation["processes"] in ("namespace", "namespace, no /proc", "shared")
