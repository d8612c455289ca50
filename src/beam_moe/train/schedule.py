"""The learning-rate schedule of both training loops: mask training (train/loop.py) and the
reference MoE's pretraining (refmoe/pretrain.py), so that the two cannot drift apart."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class WarmupCosine:
    """Linear warm-up over `warmup` steps, the peak until `decay_start`, then cosine decay to
    `min_ratio` x the peak at step `total` (and after it).

    Mask training holds the peak while the budget controller still moves beta and decays once beta
    is frozen (`decay_start` = the settle phase); pretraining decays right after the warm-up
    (`decay_start` 0). `warmup_reaches_peak`: the last warm-up step is at the peak (pretraining,
    `(step + 1) / warmup`) or one short of it (mask training, `(step + 1) / (warmup + 1)`).
    Called as `schedule(step)` it is the factor that `torch.optim.lr_scheduler.LambdaLR` wants;
    `schedule(step, peak)` is the learning rate itself.
    """

    total: int
    warmup: int
    min_ratio: float
    decay_start: int = 0
    warmup_reaches_peak: bool = True

    def __call__(self, step: int, peak: float = 1.0) -> float:
        if step < self.warmup:
            return peak * (step + 1) / (self.warmup if self.warmup_reaches_peak else self.warmup + 1)
        start = max(self.decay_start, self.warmup)
        if step < start:
            return peak
        progress = (step - start) / max(1, self.total - start)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return peak * (self.min_ratio + (1.0 - self.min_ratio) * cosine)
