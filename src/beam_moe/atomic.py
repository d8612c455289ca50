"""Writes that a crash cannot leave half done."""

from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from beam_moe.errors import BeamError

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2); False where the system can't."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _fsync_tree(root: Path) -> None:
    for path in [*root.rglob("*"), root]:
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _carry_over(old: Path, new: Path) -> None:
    """Hard-link what `old` holds and `new` does not, so unrelated files survive the swap untouched."""
    for entry in old.iterdir():
        target = new / entry.name
        if target.exists() or target.is_symlink():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, target, symlinks=True, copy_function=os.link)
        else:
            try:
                os.link(entry, target, follow_symlinks=False)
            except OSError:
                shutil.copy2(entry, target, follow_symlinks=False)


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a staging folder; on success it replaces `path` in one step, on error it is removed.

    Files already in `path` that the new contents do not replace are carried over (hard links),
    so a folder can hold an adapter beside other files. A crash leaves `path` as it was before
    or as it is after, never in between.
    """
    path = Path(path).absolute()
    if path.exists() and not path.is_dir():  # refused before anything is written
        raise BeamError(f"{path} exists and is not a folder; choose another output folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield staging
        if path.exists():
            if not path.is_dir():
                raise BeamError(f"{path} exists and is not a folder; choose another output folder")
            _carry_over(path, staging)
            _fsync_tree(staging)
            if not _exchange(staging, path):
                old = path.with_name(f".{path.name}.old-{staging.name.rsplit('-', 1)[-1]}")
                os.rename(path, old)
                os.rename(staging, path)
                staging = old
        else:
            _fsync_tree(staging)
            os.rename(staging, path)
            return
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file through a temporary file and one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
