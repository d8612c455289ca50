"""The sparsity knob: a fixed beta (the paper's L1 weight), or a controller that aims at an Avg-K.

The paper trades quality for sparsity with beta alone; which beta gives which Avg-K depends on the
model and the data. `BudgetController` turns the question around: it measures Avg-K (kept routed
experts per token, averaged over MoE layers) at every step and moves beta until Avg-K settles at
the target. It is a PI controller on the normalised error e = (Avg-K - target) / K:

    integral += ki * e
    beta      = integral + kp * e

The proportional term reacts at once and damps the loop (the heads' Avg-K responds to beta with
the optimizer's lag); the integral finds the beta at which the task loss's pull to keep experts
balances the regulariser. It is the multiplier of the constraint Avg-K = target, so it may go
slightly below zero where the task loss alone would take Avg-K under the target.
"""

from __future__ import annotations

import math
from typing import Any

from beam_moe.errors import BeamError


class FixedBeta:
    """beta stays what the user gave."""

    def __init__(self, beta: float) -> None:
        self.beta = float(beta)

    def update(self, avg_k: float) -> float:
        return self.beta

    def state_dict(self) -> dict[str, Any]:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.beta = float(state["beta"])


class BudgetController:
    """Adjusts beta every step so that the measured Avg-K settles at `target`."""

    def __init__(self, target: float, top_k: int, kp: float = 0.5, ki: float = 0.01) -> None:
        check_target(target, top_k)
        self.target = float(target)
        self.top_k = int(top_k)
        self.kp = float(kp)
        self.ki = float(ki)
        self.integral = 0.0
        self.beta = self.kp * (self.top_k - self.target) / self.top_k

    def update(self, avg_k: float) -> float:
        """Feed the Avg-K measured at this step; returns the beta for the next step."""
        if not math.isfinite(avg_k):
            return self.beta
        error = (avg_k - self.target) / self.top_k
        self.integral += self.ki * error
        self.beta = self.integral + self.kp * error
        return self.beta

    def state_dict(self) -> dict[str, Any]:
        return {"beta": self.beta, "integral": self.integral, "target": self.target}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.beta = float(state["beta"])
        self.integral = float(state["integral"])


def check_target(target: float, top_k: int) -> None:
    """Refuse an Avg-K target the model cannot reach (BEAM only removes experts from the Top-K)."""
    if not (math.isfinite(target) and 0 < target <= top_k):
        raise BeamError(
            f"target Avg-K {target} is out of range: it must be > 0 and at most the model's Top-K ({top_k}), "
            "since the masks only switch off experts the router chose"
        )
