"""Package attributes imported on first use (PEP 562): `import gptoss` and `gptoss --help` do not
pay for torch and every library behind the package's entry points until one is used."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable


def lazy_attributes(package: str, origins: dict[str, tuple[str, ...]]) -> Callable[[str], object]:
    """A module `__getattr__` for `package`: each name in `origins[module]` is imported from that
    module when first asked for, then kept in the package."""
    where = {name: module for module, names in origins.items() for name in names}

    def __getattr__(name: str) -> object:  # noqa: N807 (the module hook's name)
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where[name]), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
