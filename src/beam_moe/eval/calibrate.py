"""Calibrating a baseline's parameter so that it keeps a target Avg-K on given text (bisection)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from beam_moe.attach import set_routing_policy
from beam_moe.errors import BeamError
from beam_moe.eval.baselines import get_baseline, model_top_k
from beam_moe.eval.perplexity import PerplexityResult, perplexity
from beam_moe.eval.text import TextSource, read_texts


@dataclass
class CalibrationResult:
    """The parameter found, the Avg-K it gives on the calibration text, and every value tried.

    reached: |avg_k - target| <= tolerance; False when the target lies outside what the baseline
    can reach (Top-P and threshold skipping always keep at least one expert) or, for Top-K pruning,
    between two whole numbers.
    """

    baseline: str
    param: float
    avg_k: float
    target_avg_k: float
    reached: bool
    tried: list[tuple[float, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        document = asdict(self)
        document["tried"] = [{"param": p, "avg_k": k} for p, k in self.tried]
        return document


def measure(
    model: nn.Module, tokenizer, texts: list[str], baseline: str, value: float, seed: int, **kwargs: Any
) -> PerplexityResult:
    """Perplexity and Avg-K of `model` under baseline `baseline` at `value` (the heads decide again after)."""
    policy = get_baseline(baseline).policy(value, model_top_k(model), seed)
    set_routing_policy(model, policy)
    try:
        return perplexity(model, tokenizer, texts, **kwargs)
    finally:
        set_routing_policy(model, None)


def calibrate(
    model: nn.Module,
    tokenizer,
    baseline: str,
    target_avg_k: float,
    data: TextSource,
    *,
    tolerance: float = 0.01,
    max_steps: int = 16,
    max_tokens: int | None = 4096,
    max_length: int = 512,
    batch_size: int = 4,
    seed: int = 0,
) -> CalibrationResult:
    """The value of `baseline`'s parameter whose Avg-K on `data` is closest to `target_avg_k`.

    Continuous parameters: bisection (Avg-K is monotone in the parameter up to the small feedback
    of earlier layers' masks on later layers' routing), stopping within `tolerance`. Top-K pruning:
    the whole numbers around the target. `max_tokens` caps the calibration text.
    """
    spec = get_baseline(baseline)
    top_k = model_top_k(model)
    if not (0.0 <= target_avg_k <= top_k) or math.isnan(target_avg_k):
        raise BeamError(f"the target Avg-K must lie between 0 and Top-K = {top_k}, got {target_avg_k}")
    texts = read_texts(data)
    kwargs = dict(max_tokens=max_tokens, max_length=max_length, batch_size=batch_size)
    tried: list[tuple[float, float]] = []

    def avg_k_at(value: float) -> float:
        result = measure(model, tokenizer, texts, baseline, value, seed, **kwargs)
        tried.append((value, float(result.avg_k)))
        return float(result.avg_k)

    if spec.integer:
        for value in sorted({math.floor(target_avg_k), math.ceil(target_avg_k)}):
            avg_k_at(float(value))
    else:
        low, high = float(spec.low), float(spec.upper(top_k))
        for value in (low, high):
            avg_k_at(value)
        for _ in range(max_steps):
            best = min(tried, key=lambda t: abs(t[1] - target_avg_k))
            if abs(best[1] - target_avg_k) <= tolerance:
                break
            middle = (low + high) / 2
            keeps_too_many = avg_k_at(middle) > target_avg_k
            if keeps_too_many == spec.increasing:
                high = middle
            else:
                low = middle
    param, avg_k = min(tried, key=lambda t: (abs(t[1] - target_avg_k), t[0]))
    return CalibrationResult(
        baseline=baseline,
        param=param,
        avg_k=avg_k,
        target_avg_k=float(target_avg_k),
        reached=abs(avg_k - target_avg_k) <= tolerance,
        tried=tried,
    )
