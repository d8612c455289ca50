"""The threshold -> Avg-K curve of a trained adapter, and per-request budgets read through it.

One trained adapter serves many budgets: raising the mask threshold (keep a slot when
sigmoid(z) >= threshold) keeps fewer experts. `beam-moe calibrate` (and the end of `beam-moe
train`) measures Avg-K over a grid of thresholds on some text and stores the curve with the adapter
and in the exported checkpoint; a request that asks for a budget in experts (`beam_avg_k`) is
mapped to a threshold by monotone interpolation of this curve, one that asks for a threshold
(`beam_threshold`) gets it as is. The same rules serve vLLM (per request) and transformers (per
batch row), so both refuse the same values with the same messages.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from beam_moe.errors import BeamError

AVG_K_FIELD = "beam_avg_k"
THRESHOLD_FIELD = "beam_threshold"
REQUEST_FIELDS = (AVG_K_FIELD, THRESHOLD_FIELD)
DEFAULT_LOGITS = tuple(x / 2 for x in range(-16, 17))
"""The calibration grid in logit space, logit(threshold) = -8, -7.5, ..., 8 (33 thresholds from
3.4e-4 to 0.99966, 0.5 included): a mask head's logits sit on this scale, so an even logit grid
resolves the curve where it bends."""
DEFAULT_THRESHOLDS = tuple(1.0 / (1.0 + math.exp(-x)) for x in DEFAULT_LOGITS)


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


@dataclass
class ThresholdCurve:
    """Avg-K measured at each of a grid of thresholds.

    thresholds: strictly increasing, in (0, 1).
    avg_k:      overall Avg-K (kept routed experts per token, averaged over the masked layers) at
                each threshold, as measured (noise may make it rise slightly where it should fall;
                interpolation uses its running minimum, which never rises).
    top_k:      the router's Top-K (Avg-K at a threshold that keeps everything).
    layers:     per masked layer (by name), its Avg-K at each threshold.
    measured_on: what the curve was measured on: {"text": ..., "tokens": ...}.
    """

    thresholds: list[float]
    avg_k: list[float]
    top_k: int
    layers: dict[str, list[float]] = field(default_factory=dict)
    measured_on: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.thresholds = [float(t) for t in self.thresholds]
        self.avg_k = [float(k) for k in self.avg_k]
        if len(self.thresholds) < 2 or len(self.thresholds) != len(self.avg_k):
            raise BeamError(
                "a threshold curve needs at least two thresholds and one Avg-K per threshold, got "
                f"{len(self.thresholds)} thresholds and {len(self.avg_k)} Avg-K values"
            )
        if any(not 0.0 < t < 1.0 for t in self.thresholds) or any(
            b <= a for a, b in zip(self.thresholds[:-1], self.thresholds[1:], strict=True)
        ):
            raise BeamError("a threshold curve's thresholds must be strictly increasing and lie in (0, 1)")
        if any(not 0.0 <= k <= self.top_k + 1e-6 for k in self.avg_k):
            raise BeamError(f"a threshold curve's Avg-K values must lie in [0, Top-K = {self.top_k}]")
        for name, values in self.layers.items():
            if len(values) != len(self.thresholds):
                raise BeamError(
                    f"layer {name} of the threshold curve has {len(values)} values, not one per threshold"
                )

    @property
    def envelope(self) -> list[float]:
        """Avg-K made non-increasing in the threshold (running minimum), the curve budgets are read from."""
        out: list[float] = []
        for k in self.avg_k:
            out.append(k if not out else min(out[-1], k))
        return out

    @property
    def avg_k_range(self) -> tuple[float, float]:
        """(smallest, largest) Avg-K a budget may ask for."""
        envelope = self.envelope
        return envelope[-1], envelope[0]

    def threshold_for(self, avg_k: float) -> float:
        """The threshold whose Avg-K is `avg_k`: linear between grid points in logit(threshold).

        On a flat stretch (several thresholds give the same Avg-K) the smallest threshold is taken.
        A budget outside the measured range is refused with the range in the message.
        """
        low, high = self.avg_k_range
        if math.isnan(avg_k) or not low - 1e-9 <= avg_k <= high + 1e-9:
            raise BeamError(
                f"{AVG_K_FIELD} must lie between {low:.3f} and {high:.3f}, the Avg-K range this checkpoint "
                f"was calibrated over (thresholds {self.thresholds[0]:.4g} to {self.thresholds[-1]:.4g}); "
                f"got {avg_k}; recalibrate with a wider grid (`beam-moe calibrate`) to widen it"
            )
        envelope = self.envelope
        for i in range(len(envelope)):
            if envelope[i] <= avg_k:
                if i == 0 or envelope[i] == avg_k:
                    return self.thresholds[i]
                upper, lower = envelope[i - 1], envelope[i]  # upper > avg_k > lower
                share = (upper - avg_k) / (upper - lower)
                a, b = _logit(self.thresholds[i - 1]), _logit(self.thresholds[i])
                return 1.0 / (1.0 + math.exp(-(a + share * (b - a))))
        return self.thresholds[-1]

    def avg_k_at(self, threshold: float) -> float:
        """The expected Avg-K at `threshold` (the envelope, linear in logit(threshold); clamped at the ends)."""
        envelope = self.envelope
        if threshold <= self.thresholds[0]:
            return envelope[0]
        if threshold >= self.thresholds[-1]:
            return envelope[-1]
        x = _logit(threshold)
        for i in range(1, len(self.thresholds)):
            if threshold <= self.thresholds[i]:
                a, b = _logit(self.thresholds[i - 1]), _logit(self.thresholds[i])
                share = (x - a) / (b - a)
                return envelope[i - 1] + share * (envelope[i] - envelope[i - 1])
        return envelope[-1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "thresholds": self.thresholds,
            "avg_k": self.avg_k,
            "top_k": self.top_k,
            "layers": self.layers,
            "measured_on": self.measured_on,
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "the threshold curve") -> ThresholdCurve:
        if not isinstance(data, dict):
            raise BeamError(f"{source} must be an object, got {type(data).__name__}")
        try:
            return cls(
                thresholds=list(data["thresholds"]),
                avg_k=list(data["avg_k"]),
                top_k=int(data["top_k"]),
                layers={str(k): [float(x) for x in v] for k, v in (data.get("layers") or {}).items()},
                measured_on=dict(data.get("measured_on") or {}),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise BeamError(f"{source} does not parse ({type(e).__name__}: {e}); recalibrate") from e
        except BeamError as e:
            raise BeamError(f"{source}: {e}") from e


def requested_budget(args: Mapping[str, Any] | None) -> tuple[str, float] | None:
    """(field, value) of the budget a request asks for, checked as far as no curve is needed; None
    when it asks neither. vLLM API servers that do not hold the curve check this much.

    Raises BeamError naming the field for a value that is not a number, a threshold outside (0, 1),
    or both fields.
    """
    if not args:
        return None
    given = [name for name in REQUEST_FIELDS if args.get(name) is not None]
    if not given:
        return None
    if len(given) == 2:
        raise BeamError(f"ask for {AVG_K_FIELD} or {THRESHOLD_FIELD}, not both")
    name = given[0]
    value = _number(args[name])
    if value is None:
        raise BeamError(f"{name} must be a number, got {args[name]!r:.60}")
    if name == THRESHOLD_FIELD and not 0.0 < value < 1.0:
        raise BeamError(
            f"{THRESHOLD_FIELD} must lie strictly between 0 and 1 (keep a slot when sigmoid(z) >= it), "
            f"got {value}"
        )
    return name, value


def requested_threshold(args: Mapping[str, Any] | None, curve: ThresholdCurve | None) -> float | None:
    """The threshold a request asks for through `beam_threshold` or `beam_avg_k`; None when it asks neither.

    Raises BeamError naming the field for what `requested_budget` refuses, a budget outside the
    calibrated range, or a budget on a checkpoint with no curve.
    """
    asked = requested_budget(args)
    if asked is None:
        return None
    name, value = asked
    if name == THRESHOLD_FIELD:
        return value
    if curve is None:
        raise BeamError(
            f"{AVG_K_FIELD} needs a calibrated checkpoint (a threshold -> Avg-K curve); run "
            f"`beam-moe calibrate` on the adapter and export it again, or ask for {THRESHOLD_FIELD}"
        )
    return curve.threshold_for(value)
