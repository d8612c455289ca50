"""`BeamConfig`: everything that defines a BEAM adapter, JSON-serialisable and validated."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from beam_moe.errors import BeamError
from beam_moe.mask import HEADS

INITS = ("zeros", "normal")
BACKENDS = ("auto", "grouped", "native", "reference", "triton")


def _as_float(value: Any) -> float | None:
    """A JSON number as a float (inf past float's range); None for anything else, booleans included."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


@dataclass
class BeamConfig:
    """How the mask heads are built and applied.

    head:        "router" (default): z = x · W_m plus a learned multiple of the router's own
                 relative weight log(g_k / max g) and an offset, so that training starts from
                 threshold skipping at the budget and learns where to depart from it (mask.py);
                 "linear": the paper's head z = x · W_m. A fresh head of either kind keeps every
                 expert (the base model exactly).
    threshold:   keep a Top-K slot when sigmoid(z) >= threshold (the paper's 0.5).
    init:        "zeros" (keep every expert, so an untrained adapter is the base model) or "normal".
    init_std:    standard deviation for init="normal".
    bias:        give the mask head a bias (the paper has none).
    renormalize: rescale the kept weights so they sum to the Top-K sum (off: the paper keeps g * keep).
    backend:     expert execution backend at inference; "auto" picks the fastest that runs here.
    layers:      indices (in model order) of the MoE blocks to attach to; None means all of them.
    """

    threshold: float = 0.5
    head: str = "router"
    init: str = "zeros"
    init_std: float = 0.02
    bias: bool = False
    renormalize: bool = False
    backend: str = "auto"
    layers: list[int] | None = field(default=None)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        threshold = _as_float(self.threshold)
        if threshold is None:
            raise BeamError(f"threshold must be a number in (0, 1), got {self.threshold!r:.60}")
        if not 0.0 < threshold < 1.0:  # also refuses NaN
            raise BeamError(
                f"threshold must lie strictly between 0 and 1 (sigmoid(z) >= threshold), got {threshold}; "
                "the paper uses 0.5"
            )
        self.threshold = threshold
        if not isinstance(self.head, str) or self.head not in HEADS:
            raise BeamError(
                f"head must be one of {', '.join(HEADS)} ('router': router-aware; 'linear': the paper's "
                f"head), got {self.head!r:.60}"
            )
        if self.init not in INITS:
            raise BeamError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        init_std = _as_float(self.init_std)
        if init_std is None or not 0.0 <= init_std < math.inf:
            raise BeamError(f"init_std must be a finite number >= 0, got {self.init_std!r:.60}")
        self.init_std = init_std
        for name in ("bias", "renormalize"):
            if not isinstance(getattr(self, name), bool):
                raise BeamError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.backend not in BACKENDS:
            raise BeamError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.layers is not None:
            if not isinstance(self.layers, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers
            ):
                raise BeamError(
                    f"layers must be a list of MoE block indices >= 0 or null, got {self.layers!r}"
                )
            self.layers = sorted(set(self.layers))

    @property
    def logit_threshold(self) -> float:
        """The same rule on the mask logit: sigmoid(z) >= t  <=>  z >= log(t / (1 - t))."""
        return math.log(self.threshold / (1.0 - self.threshold))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BeamConfig:
        if not isinstance(data, dict):
            raise BeamError(f"a BEAM config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BeamError(f"unknown BEAM config keys {unknown}; valid keys are {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str | Path = "<string>") -> BeamConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise BeamError(f"{source}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from e
        return cls.from_dict(data)
