"""Avg-K inside a vLLM worker: counters, a periodic log line, and an RPC to read them.

Each worker process counts the (token, expert) pairs its BEAM layers keep, the rows their experts
computed and which expert backend computed them (per layer), with beam-moe's own `BeamStats`, over
real forward passes only (vLLM's warm-up and profiling passes carry no attention metadata and are
skipped). Reading them:

- the log: every `BEAM_MOE_LOG_INTERVAL` seconds (default 10; 0 turns it off) a worker that served
  tokens logs "BEAM: Avg-K 1.23 of 8 ..." through vLLM's logger;
- Python: start the engine with `worker_extension_cls=WORKER_EXTENSION`, then `engine_stats(llm)` and
  `reset_engine_stats(llm)` (see `beam_moe.serving.vllm`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import torch
from torch import Tensor

from beam_moe.routing import MaskedRouting
from beam_moe.stats import BeamStats

LOG_INTERVAL_ENV = "BEAM_MOE_LOG_INTERVAL"
WORKER_EXTENSION = "beam_moe.serving.vllm.stats.BeamWorkerExtension"
DEFAULT_LABEL = "default"
"""The budget label of requests that ask for none (the checkpoint's threshold)."""
_logger = logging.getLogger("vllm.beam_moe")


class ServingStats:
    """The BEAM layers of the model in this process and their counters."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.log = True
        self.layer_names: list[str] = []
        self.top_k: list[int] = []
        self.stats = BeamStats([], [])
        self._last_log = time.monotonic()
        self._tokens_at_last_log = 0
        self._kept_at_last_log = 0

    def clear(self, log: bool = True) -> None:
        """Forget the layers (a new model is being built in this process); `log` for one rank of a group."""
        with self._lock:
            self.log = log
            self.layer_names, self.top_k = [], []
            self._reset()

    def add_layer(self, name: str, top_k: int) -> int:
        """Register a BEAM layer; returns its index for `add`."""
        with self._lock:
            self.layer_names.append(name)
            self.top_k.append(top_k)
            self._reset()
            return len(self.layer_names) - 1

    def _reset(self) -> None:
        self.stats = BeamStats(self.layer_names, self.top_k)
        self.budgets: dict[str, list[Any]] = {}  # label -> [token-layers, kept pairs (float or tensor)]
        self._tokens_at_last_log = self._kept_at_last_log = 0

    def reset(self) -> None:
        with self._lock:
            self._reset()

    def add(
        self,
        layer: int,
        routing: MaskedRouting,
        rows: Tensor | int,
        backend: str,
        labels: tuple[Tensor, list[str]] | None = None,
    ) -> None:
        """Count one real forward pass of a BEAM layer: its routing, the rows its experts computed,
        the backend that computed them, and (`labels`: each token's budget) the pairs kept per budget."""
        with self._lock:
            self.stats.add_routing(layer, routing.keep, routing.ids, routing.soft, routing.weights)
            self.stats.add_rows(layer, rows, backend)
            self._add_budgets(routing.keep, labels)
        if layer == len(self.layer_names) - 1:
            self._maybe_log()

    def _add_budgets(self, keep: Tensor, labels: tuple[Tensor, list[str]] | None) -> None:
        """Kept pairs and token-layers per budget label ('default': the checkpoint's threshold).

        A step without budgets adds a device tensor (no host sync per layer); `summary` reads it.
        """
        if labels is None:
            names, tokens, kept = [DEFAULT_LABEL], [keep.shape[0]], [keep.sum(dtype=torch.float64)]
        else:
            ids, names = labels
            tokens = torch.bincount(ids, minlength=len(names)).tolist()
            kept = torch.bincount(ids, weights=keep.sum(dim=-1).double(), minlength=len(names)).tolist()
        for name, n, k in zip(names, tokens, kept, strict=True):
            if n:
                counts = self.budgets.setdefault(name, [0, 0.0])
                counts[0] += n
                counts[1] += k

    def summary(self) -> dict[str, Any]:
        with self._lock:
            summary = self.stats.to_dict()
            budgets = {
                name: {"avg_k": float(k) / n, "tokens": n // max(len(self.layer_names), 1)}
                for name, (n, k) in self.budgets.items()
            }
        summary["layers"] = len(self.layer_names)
        summary["budgets"] = budgets
        return summary

    def _maybe_log(self) -> None:
        interval = float(os.environ.get(LOG_INTERVAL_ENV, "10"))
        now = time.monotonic()
        if not self.log or interval <= 0 or now - self._last_log < interval:
            return
        self._last_log = now
        summary = self.summary()
        tokens, kept = summary["tokens"], summary["kept_pairs"]
        new_tokens = tokens - self._tokens_at_last_log
        if new_tokens <= 0:
            return
        layers = max(summary["layers"], 1)
        recent = (kept - self._kept_at_last_log) / (new_tokens * layers)
        self._tokens_at_last_log, self._kept_at_last_log = tokens, kept
        _logger.info(
            "BEAM: Avg-K %.3f of %s routed experts per token over the last %d tokens "
            "(%.3f over %d tokens since start; rows computed %d of %d routed pairs)",
            recent,
            summary["top_k"],
            new_tokens,
            summary["avg_k"],
            tokens,
            summary["computed_rows"],
            summary["routed_pairs"],
        )
        if set(summary["budgets"]) - {DEFAULT_LABEL}:
            _logger.info(
                "BEAM: Avg-K per requested budget since start: %s",
                ", ".join(
                    f"{name} -> {b['avg_k']:.3f} ({b['tokens']} tokens)"
                    for name, b in summary["budgets"].items()
                ),
            )


SERVING_STATS = ServingStats()


class BeamWorkerExtension:
    """Mixed into vLLM's worker (`worker_extension_cls=WORKER_EXTENSION`) so `collective_rpc` reaches the counters."""

    def beam_stats(self) -> dict[str, Any]:
        return SERVING_STATS.summary()

    def beam_reset_stats(self) -> None:
        SERVING_STATS.reset()
