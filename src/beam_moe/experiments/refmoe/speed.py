"""Time of the MoE layers inside a real forward pass: the stock model against the BEAM model.

Forward hooks on every MoE block measure the seconds spent inside the blocks (router, mask head,
experts); the rest of the forward (attention, norms, the LM head) is timed too. Methods run
interleaved call by call on the same held-out token windows (`bench.timing.interleaved_medians`),
and medians over the rounds are reported, so a burst of load from another process hits every
method alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from beam_moe.bench.timing import interleaved_medians
from beam_moe.families import family_for


class MoETimer:
    """Sums the wall time spent inside the model's MoE blocks during one forward."""

    def __init__(self, model: nn.Module) -> None:
        self.seconds = 0.0
        self._started: list[float] = []
        self._handles = []
        for _, block in family_for(model).find_blocks(model):
            self._handles.append(block.register_forward_pre_hook(self._enter))
            self._handles.append(block.register_forward_hook(self._leave))

    def _enter(self, module: nn.Module, args: Any) -> None:
        self._started.append(time.perf_counter())

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        self.seconds += time.perf_counter() - self._started.pop()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _timed_forward(
    model: nn.Module, timer: MoETimer, inputs: list[torch.Tensor], moe_seconds: list[float]
) -> Callable[[int], object]:
    """One forward on draw `d` (no grad, no cache); appends the seconds spent in the MoE blocks."""

    def run(draw: int) -> None:
        timer.seconds = 0.0
        with torch.no_grad():
            model(input_ids=inputs[draw % len(inputs)], use_cache=False)
        moe_seconds.append(timer.seconds)

    return run


def time_moe_layers(
    models: dict[str, nn.Module],
    windows: list[list[int]],
    token_counts: list[int],
    *,
    rounds: int = 15,
    budget_s: float = 30.0,
) -> dict[str, Any]:
    """Median seconds per forward, in the MoE layers and in total, for each model and token count.

    Each forward is one sequence of `T` tokens, the first `T` of a held-out window (windows rotate
    between rounds). Returns {"tokens": {T: {name: {"moe_ms", "forward_ms"}}}, "ratios": ...}:
    `ratios[T]["moe_speedup"]` is the first model's MoE time over each other model's.
    """
    device = next(iter(models.values())).parameters().__next__().device
    timers = {name: MoETimer(model) for name, model in models.items()}
    results: dict[str, Any] = {"tokens": {}, "ratios": {}}
    try:
        for count in token_counts:
            inputs = [torch.tensor([w[:count]], device=device) for w in windows if len(w) >= count]
            if not inputs:
                continue
            moe: dict[str, list[float]] = {name: [] for name in models}
            totals = interleaved_medians(
                {name: _timed_forward(models[name], timers[name], inputs, moe[name]) for name in models},
                device,
                draws=len(inputs),
                rounds=rounds,
                budget_s=budget_s,
            )
            row = {
                name: {
                    "moe_ms": 1e3 * statistics.median(moe[name][len(inputs) :] or moe[name]),
                    "forward_ms": 1e3 * totals[name],
                }
                for name in models
            }
            results["tokens"][str(count)] = row
            first = next(iter(models))
            results["ratios"][str(count)] = {
                name: {
                    "moe_speedup": row[first]["moe_ms"] / max(row[name]["moe_ms"], 1e-12),
                    "forward_speedup": row[first]["forward_ms"] / max(row[name]["forward_ms"], 1e-12),
                }
                for name in models
                if name != first
            }
    finally:
        for timer in timers.values():
            timer.remove()
    results["rounds"] = rounds
    results["threads"] = torch.get_num_threads()
    return results
