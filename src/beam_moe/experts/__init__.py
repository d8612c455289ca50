"""Expert execution backends behind one interface.

A backend is `fn(weights: ExpertWeights, hidden [T, H], ids [T, K], routing_weights [T, K])
-> ExpertsOutput(output [T, H], rows computed, name of the backend that ran)`, where ids >= E mark
masked pairs that must never be computed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from beam_moe.errors import BeamError, require
from beam_moe.experts.grouped import grouped_experts, grouped_mm_available
from beam_moe.experts.reference import reference_experts
from beam_moe.experts.triton import triton_available, triton_experts
from beam_moe.experts.weights import ExpertsOutput, ExpertWeights

ExpertBackend = Callable[[ExpertWeights, Tensor, Tensor, Tensor], ExpertsOutput]

_BACKENDS: dict[str, ExpertBackend] = {
    "reference": reference_experts,
    "grouped": grouped_experts,
    "triton": triton_experts,
}
_AVAILABLE: dict[str, Callable[[], bool]] = {
    "reference": lambda: True,
    "grouped": grouped_mm_available,
    "triton": triton_available,
}
# Backends that need an optional package: (module, extra that installs it).
_EXTRAS: dict[str, tuple[str, str]] = {"triton": ("triton", "kernels")}
_AUTO_ORDER: dict[str, list[str]] = {
    "cpu": ["grouped", "reference"],
    "cuda": ["triton", "grouped", "reference"],
}


def register_backend(name: str, fn: ExpertBackend, available: Callable[[], bool] = lambda: True) -> None:
    """Add an expert backend (e.g. a Triton kernel) under `name`."""
    _BACKENDS[name] = fn
    _AVAILABLE[name] = available


def available_backends() -> list[str]:
    return [name for name in _BACKENDS if _AVAILABLE[name]()]


def get_backend(name: str, device: torch.device | None = None) -> ExpertBackend:
    """The backend called `name`; "auto" picks the preferred backend for `device` that runs here."""
    if name == "auto":
        preferred = _AUTO_ORDER.get(device.type if device is not None else "cpu", _AUTO_ORDER["cpu"])
        name = next(n for n in preferred if n in _BACKENDS and _AVAILABLE[n]())
    if name not in _BACKENDS:
        raise BeamError(f"unknown expert backend {name!r}; available: {', '.join(available_backends())}")
    if not _AVAILABLE[name]():
        if name in _EXTRAS:
            require(*_EXTRAS[name], f"expert backend {name!r}")  # says which extra installs it
        raise BeamError(
            f"expert backend {name!r} cannot run here; available: {', '.join(available_backends())}"
        )
    return _BACKENDS[name]


__all__ = [
    "ExpertBackend",
    "ExpertWeights",
    "ExpertsOutput",
    "available_backends",
    "get_backend",
    "register_backend",
]
