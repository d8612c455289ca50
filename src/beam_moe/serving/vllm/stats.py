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
from collections.abc import Callable
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
        self.step_labels: Callable[[int, torch.device], tuple[Tensor, list[str]] | None] | None = None
        """Each token's budget label in the current step (the plugin sets it to the request budgets')."""
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
        self._pending: list[tuple[int, MaskedRouting, Tensor | int, str]] = []
        self._last_layer = len(self.layer_names) - 1
        self.stats = BeamStats(self.layer_names, self.top_k)
        self.budgets: dict[str, list[Any]] = {}  # label -> [token-layers, kept pairs], labelled steps only
        self._tokens_at_last_log = self._kept_at_last_log = 0

    def reset(self) -> None:
        with self._lock:
            self._reset()

    def add(self, layer: int, routing: MaskedRouting, rows: Tensor | int, backend: str) -> None:
        """Queue one real forward pass of a BEAM layer (its routing, the rows its experts computed and
        the backend that computed them); the step's last BEAM layer counts the queue.

        Counting once per step instead of once per layer matters on a CPU at decode: between two
        layers the weights streamed through the caches evict this code, and each cold pass through
        it cost ~0.3 ms a layer; one pass per step runs warm after its first entry.
        """
        self._pending.append((layer, routing, rows, backend))
        if layer == self._last_layer:
            self._count_pending(step_labels=True)
            self._maybe_log()

    def _count_pending(self, step_labels: bool = False) -> None:
        """Count the queued passes. `step_labels`: called inside the step that queued them, so the
        requests' budget labels of this step apply to entries with its number of tokens."""
        pending, self._pending = self._pending, []
        labels = None
        if step_labels and pending and self.step_labels is not None:
            keep = pending[-1][1].keep
            labels = self.step_labels(keep.shape[0], keep.device)
        with self._lock:
            for layer, routing, rows, backend in pending:
                keep = routing.keep
                self.stats.add_routing(
                    layer, keep, routing.ids, routing.soft, routing.weights, routing.all_kept
                )
                self.stats.add_rows(layer, rows, backend)
                if labels is not None and labels[0].shape[0] == keep.shape[0]:
                    self._add_budgets(keep, labels)

    def _add_budgets(self, keep: Tensor, labels: tuple[Tensor, list[str]]) -> None:
        """Kept pairs and token-layers per budget label, for steps in which some request asked for
        a budget. Steps without any are not counted here: `summary` gives them to 'default' as the
        whole model's counts less every labelled one (no device op per layer for them)."""
        ids, names = labels
        tokens = torch.bincount(ids, minlength=len(names)).tolist()
        kept = torch.bincount(ids, weights=keep.sum(dim=-1).double(), minlength=len(names)).tolist()
        for name, n, k in zip(names, tokens, kept, strict=True):
            if n:
                counts = self.budgets.setdefault(name, [0, 0.0])
                counts[0] += n
                counts[1] += k

    def summary(self) -> dict[str, Any]:
        self._count_pending()
        with self._lock:
            summary = self.stats.to_dict()
            counts = {name: list(nk) for name, nk in self.budgets.items()}
            unlabelled = [
                self.stats.token_layers - sum(n for n, _ in counts.values()),
                summary["kept_pairs"] - sum(k for _, k in counts.values()),
            ]
        if unlabelled[0]:
            default = counts.setdefault(DEFAULT_LABEL, [0, 0.0])
            default[0] += unlabelled[0]
            default[1] += unlabelled[1]
        layers = max(len(self.layer_names), 1)
        budgets = {
            name: {"avg_k": float(k) / n, "tokens": n // layers} for name, (n, k) in counts.items() if n
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
