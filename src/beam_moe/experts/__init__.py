"""Expert execution backends behind one interface, and the chooser.

A backend (`ExpertBackend`) is called as `backend(weights: ExpertWeights, hidden [T, H], ids [T, K],
routing_weights [T, K]) -> ExpertsOutput(output [T, H], rows computed, name of the backend that ran)`,
where ids >= E mark masked pairs that must never be computed. Each backend says whether it can run
here (`available`) and whether it computes a given call (`supports`, with a reason when not); a call
it refuses goes to its fallback (triton -> grouped, native -> grouped), logged once per reason on the "beam_moe.experts"
logger, and the output names the backend that really ran.
"""

from __future__ import annotations

import torch

from beam_moe.errors import BeamError, require
from beam_moe.experts.backend import ExpertBackend, Support, log_fallback
from beam_moe.experts.grouped import grouped_experts, grouped_mm_available
from beam_moe.experts.native import native_experts, native_runs_on, native_supports
from beam_moe.experts.reference import reference_experts
from beam_moe.experts.triton import triton_experts, triton_runs_on, triton_supports
from beam_moe.experts.weights import ExpertsOutput, ExpertWeights


def _grouped_runs_on(device: torch.device | None = None) -> Support:
    if grouped_mm_available():
        return True, ""
    return False, f"this torch ({torch.__version__}) has no torch.nn.functional.grouped_mm"


REFERENCE = ExpertBackend("reference", reference_experts)
GROUPED = ExpertBackend("grouped", grouped_experts, available=_grouped_runs_on)
TRITON = ExpertBackend(
    "triton", triton_experts, available=triton_runs_on, accepts=triton_supports, fallback=GROUPED
)
NATIVE = ExpertBackend(
    "native", native_experts, available=native_runs_on, accepts=native_supports, fallback=GROUPED
)

_BACKENDS: dict[str, ExpertBackend] = {b.name: b for b in (REFERENCE, GROUPED, TRITON, NATIVE)}
# Backends that need an optional package: (module, extra that installs it).
_EXTRAS: dict[str, tuple[str, str]] = {"triton": ("triton", "kernels")}
_AUTO_ORDER: dict[str, list[str]] = {
    "cpu": ["native", "grouped", "reference"],
    "cuda": ["triton", "grouped", "reference"],
}


def register_backend(backend: ExpertBackend) -> None:
    """Add an expert backend (e.g. another kernel) under `backend.name`."""
    _BACKENDS[backend.name] = backend


def available_backends() -> list[str]:
    """The backends that can run on some device of this machine."""
    return [name for name, backend in _BACKENDS.items() if backend.available(None)[0]]


def get_backend(name: str, device: torch.device | None = None) -> ExpertBackend:
    """The backend called `name`; "auto" picks the preferred backend for `device` that runs there.

    An explicitly named backend that cannot run on `device` is an error that says why; per call,
    the backend still hands what it does not support to its fallback.
    """
    if name == "auto":
        return _auto(device)
    if name not in _BACKENDS:
        raise BeamError(f"unknown expert backend {name!r}; available: {', '.join(available_backends())}")
    backend = _BACKENDS[name]
    ok, reason = backend.available(device)
    if not ok:
        if name in _EXTRAS:
            require(*_EXTRAS[name], f"expert backend {name!r}")  # says which extra installs it
        raise BeamError(
            f"expert backend {name!r} cannot run here ({reason}); available: {', '.join(available_backends())}"
        )
    return backend


def _auto(device: torch.device | None) -> ExpertBackend:
    device_type = device.type if device is not None else "cpu"
    preferred = [n for n in _AUTO_ORDER.get(device_type, _AUTO_ORDER["cpu"]) if n in _BACKENDS]
    skipped: list[tuple[str, str]] = []
    for name in preferred:
        ok, reason = _BACKENDS[name].available(device)
        if ok:
            for asked, why in skipped:
                log_fallback(f"auto ({asked})", name, why)
            return _BACKENDS[name]
        skipped.append((name, reason))
    raise BeamError(
        f"no expert backend runs on {device_type}: " + "; ".join(f"{name}: {why}" for name, why in skipped)
    )


__all__ = [
    "GROUPED",
    "NATIVE",
    "REFERENCE",
    "TRITON",
    "ExpertBackend",
    "ExpertWeights",
    "ExpertsOutput",
    "Support",
    "available_backends",
    "get_backend",
    "register_backend",
]
