"""Who the base model is: architecture, sizes and a fingerprint of its routers.

An adapter records the identity of the base it was trained on; loading it onto another base is
refused. The fingerprint survives dtype changes (a bf16 copy of an fp32 checkpoint matches) but
tells different router weights apart.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from beam_moe.families import MoEFamily

_PROBES = 4
_PROBE_TOLERANCE = 0.05
_RMS_TOLERANCE = 0.02


def router_fingerprint(weight: Tensor) -> list[float]:
    """[rms, p_1..p_4]: the weight's RMS and its projections on fixed random directions.

    Each projection is ~N(0, 1) for unrelated weights; rounding to bf16 moves it by ~0.002.
    """
    w = weight.detach().to(device="cpu", dtype=torch.float64).flatten()
    rms = float(w.pow(2).mean().sqrt())
    if rms == 0.0:
        return [0.0] * (_PROBES + 1)
    generator = torch.Generator().manual_seed(20260514)
    probes = torch.randn(_PROBES, w.numel(), generator=generator, dtype=torch.float64)
    projections = (probes @ w) / (math.sqrt(w.numel()) * rms)
    return [rms, *projections.tolist()]


def fingerprints_match(a: list[float], b: list[float]) -> bool:
    if len(a) != len(b):
        return False
    rms_a, rms_b = a[0], b[0]
    if abs(rms_a - rms_b) > _RMS_TOLERANCE * max(abs(rms_a), abs(rms_b), 1e-12):
        return False
    return all(abs(x - y) <= _PROBE_TOLERANCE for x, y in zip(a[1:], b[1:], strict=True))


def base_identity(model: torch.nn.Module, family: MoEFamily) -> dict[str, Any]:
    """Architecture, sizes, every MoE block's name and a fingerprint of every router."""
    config = getattr(model, "config", None)
    blocks = family.find_blocks(model)
    routers = [family.router(block) for _, block in blocks]
    weights = [family.router_weight(router) for router in routers]
    num_experts, hidden_size = weights[0].shape
    return {
        "model_type": family.model_type,
        "name_or_path": getattr(config, "_name_or_path", "") or "",
        "architectures": list(getattr(config, "architectures", None) or [type(model).__name__]),
        "hidden_size": int(hidden_size),
        "num_experts": int(num_experts),
        "top_k": int(routers[0].top_k),
        "moe_blocks": [name for name, _ in blocks],
        "router_fingerprint": [router_fingerprint(weight) for weight in weights],
    }


def _is_number(x: Any) -> bool:
    """A finite JSON number (an integer too large for a float is not one)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


def identity_problem(identity: Any) -> str | None:
    """What is malformed in a stored identity (as `base_identity` writes it), or None.

    Checked before `identity_mismatch` compares it, so a damaged file is reported as damaged.
    """
    if not isinstance(identity, dict):
        return f"expected an object, got {type(identity).__name__}"
    for key in ("model_type", "name_or_path"):
        if not isinstance(identity.get(key), str):
            return f"{key} must be a string, got {identity.get(key)!r:.60}"
    for key in ("hidden_size", "num_experts", "top_k"):
        value = identity.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            return f"{key} must be a whole number >= 1, got {value!r:.60}"
    for key in ("architectures", "moe_blocks"):
        value = identity.get(key)
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            return f"{key} must be a list of strings, got {value!r:.60}"
    prints = identity.get("router_fingerprint")
    if not (
        isinstance(prints, list)
        and len(prints) == len(identity["moe_blocks"])
        and all(isinstance(p, list) and len(p) == _PROBES + 1 and all(map(_is_number, p)) for p in prints)
    ):
        return f"router_fingerprint must hold {_PROBES + 1} finite numbers per MoE block, got {prints!r:.60}"
    return None


def identity_mismatch(expected: dict[str, Any], actual: dict[str, Any]) -> str | None:
    """A sentence saying how `actual` differs from `expected`, or None when they match."""
    for key in ("model_type", "hidden_size", "num_experts", "top_k"):
        if expected.get(key) != actual.get(key):
            return (
                f"{key} is {actual.get(key)!r} in this model but {expected.get(key)!r} in the adapter's base"
            )
    if expected.get("moe_blocks") != actual.get("moe_blocks"):
        return (
            f"the MoE blocks differ: the adapter has {len(expected.get('moe_blocks', []))} "
            f"({', '.join(expected.get('moe_blocks', [])[:3])}...), this model has {len(actual['moe_blocks'])} "
            f"({', '.join(actual['moe_blocks'][:3])}...)"
        )
    for name, a, b in zip(
        actual["moe_blocks"],
        expected.get("router_fingerprint", []),
        actual["router_fingerprint"],
        strict=False,
    ):
        if not fingerprints_match(a, b):
            return f"the router weights of {name} differ from those the adapter was trained with"
    return None
