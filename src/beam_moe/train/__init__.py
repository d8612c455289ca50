"""Training BEAM: `beam-moe train` and its Python API.

from beam_moe.train import TrainConfig, train
result = train(TrainConfig(model="path/to/moe", data=["chat.jsonl"], output="runs/beam", target_avg_k=2.0))
result.output, result.metrics["val_avg_k"]

Read top to bottom: config (the options), data (records -> token blocks), objectives (lm, distill),
budget (beta or an Avg-K target), trainable (what trains), loop (the steps), schedule (the
learning rate), checkpointing (resume exactly), metrics (logs), output (the finished folder and
rebuilding from it).
"""

from typing import TYPE_CHECKING

from beam_moe.lazy import lazy_attributes

# Loaded on first use, as the root package does: reading a run's folder (`train.output`,
# `train.checkpointing`) must not import the training loop.
_HOME = {
    "BudgetController": "budget",
    "calibrate_router_heads": "budget",
    "calibrate_threshold": "budget",
    "measure_avg_k": "budget",
    "TrainConfig": "config",
    "Trainer": "loop",
    "TrainResult": "loop",
    "train": "loop",
}


__getattr__ = lazy_attributes(__name__, _HOME)


if TYPE_CHECKING:
    from beam_moe.train.budget import (
        BudgetController,
        calibrate_router_heads,
        calibrate_threshold,
        measure_avg_k,
    )
    from beam_moe.train.config import TrainConfig
    from beam_moe.train.loop import Trainer, TrainResult, train

__all__ = [
    "BudgetController",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "calibrate_router_heads",
    "calibrate_threshold",
    "measure_avg_k",
    "train",
]
