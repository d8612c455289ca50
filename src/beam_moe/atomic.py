"""Writes that a crash cannot leave half done, published with the modes the process umask asks for.

Staging uses `tempfile` (private 0700 folders and 0600 files) and some writers create private files
too (safetensors), so what is published gets its mode set explicitly: new folders 0777 & ~umask,
new files 0666 & ~umask (as `git` and `pip` do); a folder or file that is replaced keeps the mode
it had, and a hard link (a base model's weights in a merged checkpoint) keeps its source's.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import stat
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


def process_umask() -> int:
    """The process umask, read without changing it where Linux's /proc shows it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish_mode(path: Path, *, folder: bool) -> int:
    """The mode `path` should get: the one it has when it exists, else the umask's default."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        return (0o777 if folder else 0o666) & ~process_umask()


def _apply_umask(root: Path) -> None:
    """Give every folder and file written under `root` the mode the umask asks for (links excepted)."""
    umask = process_umask()
    for folder, folders, files in os.walk(root):
        for name in folders:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, 0o777 & ~umask)
        for name in files:
            path = os.path.join(folder, name)
            info = os.lstat(path)
            if stat.S_ISREG(info.st_mode) and info.st_nlink == 1:
                os.chmod(path, (0o777 if info.st_mode & stat.S_IXUSR else 0o666) & ~umask)


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
def atomic_directory(path: str | Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a staging folder; on success it replaces `path` in one step, on error it is removed.

    Files already in `path` that the new contents do not replace are carried over (hard links),
    so a folder can hold an adapter beside other files; `replace=True` drops them instead (a
    command's output replaced as a whole). A crash leaves `path` as it was before or as it is
    after, never in between. The published folder keeps the mode `path` had, or gets the umask's.
    """
    path = Path(path).absolute()
    if path.exists() and not path.is_dir():  # refused before anything is written
        raise BeamError(f"{path} exists and is not a folder; choose another output folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield staging
        _apply_umask(staging)
        if path.exists():
            if not path.is_dir():
                raise BeamError(f"{path} exists and is not a folder; choose another output folder")
            if not replace:
                _carry_over(path, staging)
            os.chmod(staging, publish_mode(path, folder=True))
            _fsync_tree(staging)
            if not _exchange(staging, path):
                old = path.with_name(f".{path.name}.old-{staging.name.rsplit('-', 1)[-1]}")
                os.rename(path, old)
                os.rename(staging, path)
                staging = old
        else:
            os.chmod(staging, publish_mode(path, folder=True))
            _fsync_tree(staging)
            os.rename(staging, path)
            return
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file through a temporary file and one rename; the mode as `publish_mode` says."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = publish_mode(path, folder=False)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
