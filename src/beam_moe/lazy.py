"""Package attributes that load on first use (a module `__getattr__`, PEP 562).

The root package and `beam_moe.train` keep their public names in modules that import torch or the
training loop; this imports each name's home module only when the name is first read.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_attributes(package: str, homes: dict[str, str]) -> Callable[[str], Any]:
    """A `__getattr__` for `package`: `name` comes from `package.<homes[name]>`, imported on first
    read and then kept in the package's namespace (later reads do not come here)."""

    def __getattr__(name: str) -> Any:
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{homes[name]}"), name)
        vars(sys.modules[package])[name] = value
        return value

    return __getattr__
