"""The sparsity knob: a fixed beta (the paper's L1 weight), a controller that aims at an Avg-K, and
calibration of the head to a budget before and after training.

The paper trades quality for sparsity with beta alone; which beta gives which Avg-K depends on the
model, the data and the objective. `BudgetController` turns the question around: it moves beta
until the measured Avg-K (kept routed experts per token, averaged over MoE layers) settles at the
target. It works in log space on the relative error of a smoothed Avg-K,

    ema   <- smoothing x ema + (1 - smoothing) x Avg-K(step)       (training batches are noisy)
    e     =  clip((ema - target) / target, -1, 1)                   (the same scale at 6 and at 0.5)
    I     <- clip(I + ki x clip(e, -1/2, 1/2), log beta_min, log beta_max)
    beta  =  exp(I + kp x e)                                        (always > 0)

Anti-windup three ways: the integral is clamped to beta's range, it grows by at most ki / 2 per
step, and it does not integrate while the smoothed Avg-K lags behind the raw one on the other
side of the target. The last matters at the start of a linear head: it keeps every expert, the
first steps take it below the target within a few batches, and an integral fed by the lagging
average would keep climbing and overshoot for the rest of the run.

so beta moves by the same factor for the same relative miss whether the target is 6 or 0.5 of 8,
and the slope of Avg-K in beta (which flattens as beta grows) does not slow the loop down. The
training loop freezes beta for the last `settle` fraction of the run so that the heads settle at
a fixed trade-off, then `calibrate_threshold` moves the serve-time threshold so that Avg-K lands
on the target exactly (the adapter records both).

A router-aware head (`BeamConfig.head = "router"`) is first put at the operating point of
threshold skipping at the target (`calibrate_router_heads`), so training starts at the baseline
and the loss can only move it where that pays.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from beam_moe.attach import get_attachment
from beam_moe.errors import BeamError, BeamWarning
from beam_moe.mask import ROUTER_FEATURE_FLOOR, router_feature

CONTROLLER_DEFAULTS: dict[str, float] = {"kp": 1.0, "ki": 0.1, "smoothing": 0.9}
BETA_RANGE = (1e-4, 1e3)
INTEGRATION_CLIP = 0.5


def initial_beta(target: float, top_k: int) -> float:
    """A first guess at the beta that holds Avg-K at `target`: K / (2 target^2).

    Measured on the reference MoE with distillation (beta settled near 0.1 at Avg-K 4 of 8, 1 at 2
    and 3-6 at 1.0-1.3): the task loss's pull to keep experts grows fast as the budget tightens. The
    controller corrects the guess; a good one only shortens the transient.
    """
    return top_k / (2.0 * target**2)


class FixedBeta:
    """beta stays what the user gave."""

    def __init__(self, beta: float) -> None:
        self.beta = float(beta)
        self.frozen = True

    def update(self, avg_k: float) -> float:
        return self.beta

    def freeze(self) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.beta = float(state["beta"])


class BudgetController:
    """Moves beta every step so that the smoothed Avg-K settles at `target` (module docstring)."""

    def __init__(
        self,
        target: float,
        top_k: int,
        kp: float = CONTROLLER_DEFAULTS["kp"],
        ki: float = CONTROLLER_DEFAULTS["ki"],
        smoothing: float = CONTROLLER_DEFAULTS["smoothing"],
        beta_init: float | None = None,
    ) -> None:
        check_target(target, top_k)
        beta_init = initial_beta(target, top_k) if beta_init is None else beta_init
        if not (kp >= 0 and ki >= 0 and 0 <= smoothing < 1 and beta_init > 0):
            raise BeamError(
                f"controller gains must be kp >= 0, ki >= 0, 0 <= smoothing < 1 and beta_init > 0, "
                f"got kp={kp}, ki={ki}, smoothing={smoothing}, beta_init={beta_init}"
            )
        self.target = float(target)
        self.top_k = int(top_k)
        self.kp, self.ki, self.smoothing = float(kp), float(ki), float(smoothing)
        self.log_beta_range = (math.log(BETA_RANGE[0]), math.log(BETA_RANGE[1]))
        self.integral = _clip(math.log(beta_init), *self.log_beta_range)
        self.ema: float | None = None
        self.frozen = False
        self.beta = math.exp(self.integral)

    def update(self, avg_k: float) -> float:
        """Feed the Avg-K measured at this step; returns the beta for the next step."""
        if not math.isfinite(avg_k):
            return self.beta
        self.ema = avg_k if self.ema is None else self.smoothing * self.ema + (1 - self.smoothing) * avg_k
        if self.frozen:
            return self.beta
        error = _clip((self.ema - self.target) / self.target, -1.0, 1.0)
        if error * (avg_k - self.target) > 0:
            step = self.ki * _clip(error, -INTEGRATION_CLIP, INTEGRATION_CLIP)
            self.integral = _clip(self.integral + step, *self.log_beta_range)
        self.beta = math.exp(_clip(self.integral + self.kp * error, *self.log_beta_range))
        return self.beta

    def freeze(self) -> None:
        """Hold beta where it is from now on (the settle phase)."""
        self.frozen = True

    def state_dict(self) -> dict[str, Any]:
        return {
            "beta": self.beta,
            "integral": self.integral,
            "ema": self.ema,
            "frozen": self.frozen,
            "target": self.target,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.beta = float(state["beta"])
        self.integral = float(state["integral"])
        self.ema = None if state.get("ema") is None else float(state["ema"])
        self.frozen = bool(state.get("frozen", False))


def _clip(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


def check_target(target: float, top_k: int) -> None:
    """Refuse an Avg-K target the model cannot reach (BEAM only removes experts from the Top-K)."""
    if not (math.isfinite(target) and 0 < target <= top_k):
        raise BeamError(
            f"target Avg-K {target} is out of range: it must be > 0 and at most the model's Top-K ({top_k}), "
            "since the masks only switch off experts the router chose"
        )


TARGET_TOLERANCE = 0.10


def target_outcome(final: dict[str, Any], target: float, warn: bool = True) -> dict[str, Any]:
    """Whether a run's final Avg-K (validation, else calibration, else the last training batches)
    lies within ±10% of its target; a miss warns (BeamWarning) with what to change."""
    source, avg_k = next(
        ((k, final[k]) for k in ("val_avg_k", "calibration_avg_k", "avg_k") if final.get(k) is not None),
        (None, None),
    )
    if avg_k is None:
        return {}
    reached = abs(avg_k - target) <= TARGET_TOLERANCE * target
    if warn and not reached:
        where = {"val_avg_k": "validation", "calibration_avg_k": "calibration", "avg_k": "training"}[source]
        if avg_k > target:
            advice = (
                "the heads still keep too many experts: train longer (--max-steps / --epochs) or raise "
                "--lr or --controller-kp"
            )
            if "calibration_avg_k" not in final:
                advice += ", and leave the serve-time calibration on (drop --no-calibrate)"
        else:
            advice = "the heads switch off too many experts: lower --lr or --controller-kp, or train longer"
        warnings.warn(
            f"Avg-K ended at {avg_k:.2f} on the {where} text, outside ±{TARGET_TOLERANCE:.0%} of the "
            f"target {target:g}; {advice}",
            BeamWarning,
            stacklevel=2,
        )
    return {"final_avg_k": avg_k, "target_reached": reached}


# Calibration ------------------------------------------------------------------------------------


@torch.no_grad()
def measure_avg_k(model: nn.Module, batches: Sequence[dict[str, Tensor]]) -> float:
    """Avg-K of `model` (eval mode, masked experts skipped) over the real tokens of `batches`."""
    layers = get_attachment(model).layers
    was_training = model.training
    model.eval()
    kept = torch.zeros(len(layers), dtype=torch.float64)
    tokens = 0.0
    try:
        for batch in batches:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            real = batch["attention_mask"].reshape(-1).bool()
            kept += torch.stack(
                [layer.last_keep[real.to(layer.last_keep.device)].sum().cpu() for layer in layers]
            )
            tokens += float(real.sum())
    finally:
        model.train(was_training)
    return float((kept / max(tokens, 1.0)).mean())


def bisect_knob(
    avg_k_at: Callable[[float], float],
    low: float,
    high: float,
    target: float,
    *,
    increasing: bool,
    steps: int = 14,
    tolerance: float = 0.005,
    near: tuple[float, float] | None = None,
) -> tuple[float, float]:
    """The knob value in [low, high] whose Avg-K is closest to `target` (bisection; Avg-K is monotone
    in the knob, `increasing` saying which way). Returns (value, its Avg-K).

    `near`: a narrower bracket tried first, used when it holds the target (a good guess saves
    steps). Each knob value is measured once."""
    measured: dict[float, float] = {}

    def at(knob: float) -> float:
        if knob not in measured:
            measured[knob] = avg_k_at(knob)
        return measured[knob]

    if near is not None:
        first, last = near
        if (at(first) <= target <= at(last)) if increasing else (at(first) >= target >= at(last)):
            low, high = first, last
    tried = [(low, at(low)), (high, at(high))]
    for _ in range(steps):
        best = min(tried, key=lambda t: abs(t[1] - target))
        if abs(best[1] - target) <= tolerance * max(target, 1.0):
            break
        middle = (low + high) / 2
        value = at(middle)
        tried.append((middle, value))
        if (value > target) == increasing:
            high = middle
        else:
            low = middle
    return min(tried, key=lambda t: abs(t[1] - target))


def calibrate_router_heads(model: nn.Module, batches: Sequence[dict[str, Tensor]], target: float) -> float:
    """Put every router-aware head at threshold skipping with the one threshold that keeps `target`
    experts per token on `batches` (the learned part W_m left as it is); returns the threshold."""
    heads = [layer.head for layer in get_attachment(model).layers]
    if not all(head.router_aware for head in heads):
        raise BeamError("calibrate_router_heads needs router-aware mask heads (BeamConfig(head='router'))")

    def avg_k_at(log_threshold: float) -> float:
        for head in heads:
            head.set_router_threshold(math.exp(log_threshold))
        return measure_avg_k(model, batches)

    top_k = max(layer.top_k for layer in get_attachment(model).layers)
    guess = _feature_quantile(model, batches, target)
    if target >= top_k:  # keep every slot seen, with the weakest at the boundary (live gradients)
        for head in heads:
            head.set_router_threshold(math.exp(guess))
        return math.exp(guess)
    near = (max(guess - 1.0, -ROUTER_FEATURE_FLOOR), min(guess + 1.0, 0.0))
    log_threshold, _ = bisect_knob(avg_k_at, -ROUTER_FEATURE_FLOOR, 0.0, target, increasing=False, near=near)
    for head in heads:
        head.set_router_threshold(math.exp(log_threshold))
    return math.exp(log_threshold)


@torch.no_grad()
def _feature_quantile(model: nn.Module, batches: Sequence[dict[str, Tensor]], target: float) -> float:
    """The log threshold that keeps `target` of each token's slots if masks did not change later
    layers' routing: a quantile of r_k over every slot of every layer, one keep-all pass. Bisection
    then only has to correct for that feedback."""
    from beam_moe.attach import beam_stats

    layers = get_attachment(model).layers
    for layer in layers:
        layer.head.set_router_threshold(math.exp(-ROUTER_FEATURE_FLOOR))
    was_training = model.training
    model.eval()
    features = []
    try:
        with beam_stats(model, record=True) as stats:
            for batch in batches:
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        for records in stats.records:
            for record, batch in zip(records, batches, strict=True):
                real = batch["attention_mask"].reshape(-1).bool().cpu()
                features.append(router_feature(record.weights[real]).reshape(-1))
    finally:
        model.train(was_training)
    everything = torch.cat(features).sort(descending=True).values
    keep_share = min(target / max(layer.top_k for layer in layers), 1.0)
    return float(everything[min(int(keep_share * everything.numel()), everything.numel() - 1)])


def calibrate_threshold(
    model: nn.Module, batches: Sequence[dict[str, Tensor]], target: float, tolerance: float = 0.005
) -> float:
    """Set the attached config's serve-time threshold so that Avg-K on `batches` is `target` (within
    `tolerance` x max(target, 1)); returns it.

    The threshold is searched in logit space (sigmoid(z) >= t <=> z >= logit(t)) over (1e-6, 1 - 1e-6).
    """
    config = get_attachment(model).config

    def avg_k_at(logit: float) -> float:
        config.threshold = 1.0 / (1.0 + math.exp(-logit))
        return measure_avg_k(model, batches)

    limit = math.log((1 - 1e-6) / 1e-6)
    now = math.log(config.threshold / (1.0 - config.threshold))
    near = (max(now - 1.0, -limit), min(now + 1.0, limit))  # the threshold is usually near already
    logit, _ = bisect_knob(avg_k_at, -limit, limit, target, increasing=False, tolerance=tolerance, near=near)
    config.threshold = 1.0 / (1.0 + math.exp(-logit))
    return config.threshold
