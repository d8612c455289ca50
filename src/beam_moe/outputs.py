"""The one rule for what a command may write over, checked before any work starts.

Every command that writes an output (`--output`) refuses one that already exists unless it is
given `--overwrite`, so an earlier result is never lost by accident. A folder is replaced only
when it holds the command's own earlier result: a non-empty folder that the command did not
write is refused even with `--overwrite`. A single file (`eval --output FILE`) named with
`--overwrite` is replaced.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from beam_moe.errors import BeamError

OVERWRITE_HELP = "replace an earlier result in --output (a folder only when this command wrote it)"


def check_output_folder(
    path: str | Path,
    *,
    overwrite: bool,
    ours: str | Callable[[Path], bool],
    what: str,
    option: str = "--output",
) -> Path:
    """Refuse an output folder the command must not write into; writes nothing.

    `ours` says whether a folder holds this command's earlier result: a file name inside it, or
    a test. `what` names that result in the messages ("a quickstart report").
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise BeamError(f"{option} {path} exists and is not a folder; choose another {option}")
    if not path.is_dir() or not any(path.iterdir()):
        return path
    is_ours = (path / ours).is_file() if isinstance(ours, str) else ours(path)
    if not is_ours:
        raise BeamError(
            f"{option} {path} is not empty and is not {what}; choose another {option} "
            f"(a folder that is not {what} is never overwritten, even with --overwrite)"
        )
    if not overwrite:
        raise BeamError(
            f"{option} {path} already holds {what}; pass --overwrite to replace it, or choose another {option}"
        )
    return path


def check_output_file(path: str | Path | None, *, overwrite: bool, option: str = "--output") -> Path | None:
    """Refuse an existing output file unless `overwrite`; a folder in its place is always refused."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        raise BeamError(f"{option} {path} is a folder; name a file, e.g. {path / 'result.json'}")
    if path.exists() and not overwrite:
        raise BeamError(
            f"{option} {path} already exists; pass --overwrite to replace it, or choose another {option}"
        )
    return path
