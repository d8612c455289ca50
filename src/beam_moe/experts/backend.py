"""What an expert backend is: a function that computes, plus its answers to "can you run here?" and
"can you compute this call?".

The answers come with a reason for a person (as vLLM's fused-MoE expert classes give them), so the
chooser can hand a call it refuses to a backend that computes it, say why in the log (once per
reason, not once per forward pass), and never run a kernel on weights it would compute wrongly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from beam_moe.errors import BeamError
from beam_moe.experts.weights import ExpertsOutput, ExpertWeights

Support = tuple[bool, str]
"""(ok, reason): why not, in words, when ok is False; empty when ok."""
SUPPORTED: Support = (True, "")

logger = logging.getLogger("beam_moe.experts")
_LOGGED: set[tuple[str, str, str]] = set()


def runs_anywhere(device: torch.device | None = None) -> Support:
    return SUPPORTED


def computes_any_call(weights: ExpertWeights, device: torch.device, needs_grad: bool) -> Support:
    return SUPPORTED


def needs_grad(weights: ExpertWeights, hidden: Tensor, routing_weights: Tensor) -> bool:
    """Whether this call must be differentiable (training): some input requires a gradient."""
    return torch.is_grad_enabled() and any(
        t.requires_grad for t in (hidden, routing_weights, weights.up, weights.down)
    )


def log_fallback(asked: str, ran: str, reason: str) -> None:
    """Log at INFO that `ran` computes what `asked` was asked to, once per (asked, ran, reason)."""
    key = (asked, ran, reason)
    if key in _LOGGED:
        return
    _LOGGED.add(key)
    logger.info("beam-moe: expert backend %s -> %s: %s", asked, ran, reason)


@dataclass(frozen=True, eq=False)
class ExpertBackend:
    """One expert backend.

    compute:   fn(weights, hidden [T, H], ids [T, K], routing_weights [T, K]) -> ExpertsOutput, for
               the calls `supports` accepts; ids >= E are masked pairs and never computed.
    available: device (None: any device of this machine) -> Support: whether it can run here at all
               (an optional package, a device). An explicitly asked backend that cannot is an error.
    accepts:   (weights, device, needs_grad) -> Support, given that it is available: whether it
               computes this call (a gate it fuses, a backward pass).
    fallback:  the backend that computes the calls this one refuses; None: refusing is an error.
    """

    name: str
    compute: Callable[[ExpertWeights, Tensor, Tensor, Tensor], ExpertsOutput]
    available: Callable[[torch.device | None], Support] = runs_anywhere
    accepts: Callable[[ExpertWeights, torch.device, bool], Support] = computes_any_call
    fallback: ExpertBackend | None = None

    def supports(self, weights: ExpertWeights, device: torch.device, needs_grad: bool = False) -> Support:
        """Whether this backend computes a call on `weights` on `device` (differentiably when
        `needs_grad`); (False, why not) otherwise."""
        ok, reason = self.available(device)
        return self.accepts(weights, device, needs_grad) if ok else (False, reason)

    def backend_for(
        self, weights: ExpertWeights, device: torch.device, needs_grad: bool = False
    ) -> ExpertBackend:
        """This backend, or the first of its fallbacks that supports the call (each fallback
        logged once per reason)."""
        backend = self
        while True:
            ok, reason = backend.supports(weights, device, needs_grad)
            if ok:
                return backend
            if backend.fallback is None:
                raise BeamError(f"expert backend {backend.name!r} cannot compute this call: {reason}")
            log_fallback(backend.name, backend.fallback.name, reason)
            backend = backend.fallback

    def __call__(
        self, weights: ExpertWeights, hidden: Tensor, ids: Tensor, routing_weights: Tensor
    ) -> ExpertsOutput:
        grad = needs_grad(weights, hidden, routing_weights)
        backend = self.backend_for(weights, hidden.device, grad)
        return backend.compute(weights, hidden, ids, routing_weights)
