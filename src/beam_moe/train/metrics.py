"""Where training reports go: metrics.jsonl in the output folder, TensorBoard when installed, a
progress bar; and the named running sums a step's metrics are computed from."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from beam_moe.atomic import atomic_write_text
from beam_moe.errors import require

METRICS_FILE = "metrics.jsonl"


class DeviceSums:
    """Named running sums kept on the device, read on the host in one go.

    Each name is a scalar (`size` None) or a vector of `size` values (e.g. one per MoE layer).
    `add` stays on the device; `totals` sums over processes in one collective and copies
    everything to the host in one `.tolist()`, so a step costs one host synchronisation, not
    one per metric.
    """

    def __init__(self, device: torch.device | str, **sizes: int | None) -> None:
        self._sizes = sizes
        self._sums = {name: torch.zeros(size or 1, device=device) for name, size in sizes.items()}

    def add(self, scale: float = 1.0, **values: Tensor) -> None:
        """Add `scale` x each value (detached, as float32) to the sum of its name."""
        for name, value in values.items():
            self._sums[name] += scale * value.detach().float().reshape(self._sums[name].shape)

    def totals(self, reduce: Callable[[Tensor], Tensor] | None = None, **after: Tensor) -> dict[str, Any]:
        """The sums on the host: floats for scalars, lists for vectors. `reduce` (e.g. a sum over
        processes) sees all of them at once; `after` are scalars that are already global (a
        gradient norm) and only come along in the same copy to the host."""
        flat = torch.cat([self._sums[name] for name in self._sizes])
        if reduce is not None:
            flat = reduce(flat)
        extra = [value.detach().float().reshape(1).to(flat.device) for value in after.values()]
        values = torch.cat([flat, *extra]).tolist()
        out: dict[str, Any] = {}
        start = 0
        for name, size in self._sizes.items():
            chunk = values[start : start + (size or 1)]
            out[name] = chunk if size is not None else chunk[0]
            start += size or 1
        out.update(zip(after, values[start:], strict=True))
        return out


def tensorboard_available() -> bool:
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return False
    return True


class MetricsLog:
    """Appends one JSON object per line; on resume, drops the lines after the checkpoint's step.

    Only the main process writes (`enabled`).
    """

    def __init__(self, output: Path, enabled: bool, tensorboard: bool | None) -> None:
        self.path = output / METRICS_FILE
        self.enabled = enabled
        self._writer = None
        if enabled and (tensorboard or (tensorboard is None and tensorboard_available())):
            require("tensorboard", "train", "tensorboard=True")
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(output / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Keep only the records up to `step` (what the checkpoint being resumed had seen)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [
            line for line in self.path.read_text().splitlines() if json.loads(line).get("step", 0) <= step
        ]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer is not None:
            prefix = "val/" if record.get("split") == "val" else "train/"
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "split") and math.isfinite(value):
                    self._writer.add_scalar(prefix + key, value, record["step"])
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class Progress:
    """A tqdm bar with loss, Avg-K, beta and tokens/s (tqdm adds the ETA); silent when disabled."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total, initial=initial, desc="beam-moe train", unit="step", dynamic_ncols=True
            )

    def update(self, record: dict[str, Any]) -> None:
        if self._bar is None:
            return
        self._bar.set_postfix(
            loss=f"{record['loss']:.4f}",
            avg_k=f"{record['avg_k']:.2f}",
            beta=f"{record['beta']:.3g}",
            tok_s=f"{record['tokens_per_s']:.0f}",
            refresh=False,
        )
        self._bar.update(1)

    def write(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
