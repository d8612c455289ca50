"""Budgets at inference in transformers: `with beam_budget(model, avg_k=1.5): model.generate(...)`.

A trained adapter serves many budgets: every masked layer's `threshold` override replaces the
trained threshold while the block runs. A budget in experts (`avg_k`) is mapped to a threshold
through the adapter's threshold -> Avg-K curve (`beam-moe calibrate`, or the end of `beam-moe
train`), by the same rules and with the same messages as vLLM's per-request `beam_avg_k` and
`beam_threshold` (beam_moe/threshold_curve.py). A sequence gives each batch row its own budget.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from beam_moe.attach import get_attachment
from beam_moe.errors import BeamError
from beam_moe.threshold_curve import AVG_K_FIELD, THRESHOLD_FIELD, ThresholdCurve, requested_threshold

Budget = float | Sequence[float] | Tensor


def _values(name: str, value: Budget) -> tuple[list[Any], bool]:
    """(the values, whether one per row): a number, or a sequence / 1-D tensor of them."""
    if isinstance(value, Tensor):
        if value.dim() > 1:
            raise BeamError(
                f"{name} must be a number or one number per batch row, got a {value.dim()}-D tensor"
            )
        return value.reshape(-1).tolist(), value.dim() == 1
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        return [value], False
    return list(value), True


def budget_thresholds(
    avg_k: Budget | None = None, threshold: Budget | None = None, curve: ThresholdCurve | None = None
) -> float | list[float]:
    """The threshold (one number, or a list with one per batch row) that a budget asks for.

    Each value goes through `requested_threshold`, so a transformers budget is refused exactly
    where a vLLM request would be; a message names the argument and, for a list, the row.
    """
    if avg_k is None and threshold is None:
        raise BeamError("beam_budget needs avg_k (kept experts per token) or threshold")
    if avg_k is not None and threshold is not None:
        raise BeamError("beam_budget takes avg_k or threshold, not both")
    name, field = ("avg_k", AVG_K_FIELD) if avg_k is not None else ("threshold", THRESHOLD_FIELD)
    values, per_row = _values(name, avg_k if avg_k is not None else threshold)
    if not values:
        raise BeamError(f"{name} is an empty sequence; give one value per batch row")
    found = []
    for row, value in enumerate(values):
        try:
            found.append(requested_threshold({field: value}, curve))
        except BeamError as e:
            where = f"{name}[{row}]" if per_row else name
            raise BeamError(f"beam_budget {where}: {e}") from None
    return found if per_row else found[0]


def threshold_curve(model: nn.Module) -> ThresholdCurve | None:
    """The threshold -> Avg-K curve of the adapter on `model` (None when it was never calibrated)."""
    return get_attachment(model).threshold_curve


@contextmanager
def beam_budget(
    model: nn.Module, *, avg_k: Budget | None = None, threshold: Budget | None = None
) -> Iterator[float | list[float]]:
    """Run `model` at a budget inside the block; yields the threshold(s) it runs at.

    `avg_k` (kept routed experts per token, read through the adapter's calibrated curve) or
    `threshold` (keep a slot when sigmoid(z) >= it): one number for the whole batch, or a
    sequence with one value per batch row (every token of a row, padding included, runs at that
    row's threshold; in `generate` too). The previous thresholds come back on exit, so blocks
    nest. Baselines set with `set_routing_policy` ignore it: they do not read thresholds.
    """
    attachment = get_attachment(model)
    chosen = budget_thresholds(avg_k, threshold, attachment.threshold_curve)
    previous = [layer.threshold for layer in attachment.layers]
    try:
        for layer in attachment.layers:
            if isinstance(chosen, list):
                device = layer.family.router_weight(layer.router).device
                layer.threshold = torch.tensor(chosen, dtype=torch.float32, device=device)
            else:
                layer.threshold = chosen
        yield chosen
    finally:
        for layer, before in zip(attachment.layers, previous, strict=True):
            layer.threshold = before
