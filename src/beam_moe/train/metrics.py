"""Where training reports go: metrics.jsonl in the output folder, TensorBoard when installed, a progress bar."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from beam_moe.atomic import atomic_write_text
from beam_moe.errors import require

METRICS_FILE = "metrics.jsonl"


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
