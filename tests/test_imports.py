"""The package's import graph: no cycle among module-level imports, and every module importable on
its own, first, in a fresh interpreter (an import that works only after some other module was
loaded hides a cycle or a missing dependency)."""

import ast
import subprocess
import sys
from pathlib import Path

import gptoss

PACKAGE = Path(gptoss.__file__).parent


def module_names() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ["gptoss", *path.relative_to(PACKAGE).with_suffix("").parts]
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def module_level_imports(name: str, modules: set[str], own: bool = True) -> set[str]:
    """The package's modules that `name` imports when it loads (function bodies left out: they run
    later), each `from a import b` counted as a.b where that is a module, else as a; with `own`
    False, the other libraries' modules it imports instead."""
    path = PACKAGE.joinpath(*name.split(".")[1:])
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    found = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                for a in child.names:
                    submodule = f"{child.module}.{a.name}"
                    found.add(submodule if submodule in modules else child.module)
            visit(child)

    visit(ast.parse(path.read_text()))
    if not own:
        return {m for m in found if m.split(".")[0] != "gptoss"}
    return {m for m in found if m in modules and m != name}


def test_no_import_cycle():
    modules = set(module_names())
    graph = {m: module_level_imports(m, modules) for m in modules}
    state: dict[str, str] = {}

    def walk(m: str, trail: list[str]) -> None:
        state[m] = "open"
        for dep in sorted(graph[m]):
            assert state.get(dep) != "open", "import cycle: " + " → ".join([*trail, m, dep])
            if dep not in state:
                walk(dep, [*trail, m])
        state[m] = "done"

    for m in sorted(modules):
        if m not in state:
            walk(m, [])


# One interpreter loads the other libraries once, then forks a child per module of the package: each
# child imports that module first and alone.
FORK_EACH = """
import importlib, os, sys, traceback
libraries, names = sys.argv[1].split(","), sys.argv[2:]
for library in libraries:
    try:
        importlib.import_module(library)
    except ImportError:  # (optional dependencies; the child that needs one reports it)
        pass
failed = []
for name in names:
    pid = os.fork()
    if pid == 0:
        try:
            __import__(name)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1] != 0:
        failed.append(name)
print("FAILED:", " ".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_alone_in_a_fresh_interpreter():
    names = module_names()
    libraries = set().union(*(module_level_imports(n, set(names), own=False) for n in names))
    result = subprocess.run(
        [sys.executable, "-c", FORK_EACH, ",".join(sorted(libraries)), *names],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=PACKAGE.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
