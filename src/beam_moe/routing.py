"""Apply a BEAM mask to a router's Top-K output.

This is where the mask is applied (`apply_head` for a mask head, `apply_slot_mask` for its logits,
`apply_keep` for a mask decided by a policy). The mask lives in one canonical form, `keep: bool[T, K]`,
aligned with the router's `ids: int[T, K]`; `to_sentinel` converts it for expert backends at
their boundary (masked slots get id E, one past the last expert, and weight 0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from beam_moe.mask import MaskHead, straight_through_mask
from beam_moe.native import available as native_available
from beam_moe.native import decode_keep


@dataclass
class MaskedRouting:
    """A router's Top-K choice after the mask.

    weights: [T, K] g * keep in the router's weight dtype (straight-through gradient when
             training); renormalised when asked.
    ids:     [T, K] the router's expert ids, unchanged.
    keep:    [T, K] bool, the canonical mask.
    soft:    [T, K] float32 sigmoid(z_k), the regulariser's input.
    all_kept: whether every slot is kept, when the caller asked for it to be checked on the host
             (`apply_slot_mask(..., check_all_kept=True)`); None when it was not checked.
    """

    weights: Tensor
    ids: Tensor
    keep: Tensor
    soft: Tensor
    all_kept: bool | None = None


def apply_mask(
    weights: Tensor,
    ids: Tensor,
    mask_logits: Tensor,
    threshold: float | Tensor,
    *,
    renormalize: bool = False,
) -> MaskedRouting:
    """Gate the router's Top-K weights `g` with the mask: `g * keep`, keep = sigmoid(z[ids]) >= threshold.

    `mask_logits` are over all experts, [T, E]; they are gathered at `ids`. With `renormalize`,
    the kept weights are rescaled to the sum of the Top-K weights (a token that keeps nothing
    gets all zeros), which preserves `norm_topk_prob` and `routed_scaling_factor`.
    """
    return apply_slot_mask(
        weights, ids, mask_logits.float().gather(1, ids.long()), threshold, renormalize=renormalize
    )


def apply_slot_mask(
    weights: Tensor,
    ids: Tensor,
    slot_logits: Tensor,
    threshold: float | Tensor,
    *,
    renormalize: bool = False,
    check_all_kept: bool = False,
) -> MaskedRouting:
    """`apply_mask` with the mask logits already taken at the Top-K ids: z_k [T, K]
    (`MaskHead.slot_logits`, which reads only the rows it needs at decode).

    `threshold` is one number, or one per token (float32 [T]: per-request budgets).

    `check_all_kept` (inference on a host where a sync is cheap, e.g. serving on a CPU) checks
    whether every slot is kept and records it in `all_kept`; when so, the router's weights are
    returned as they are (g * 1 is g, and renormalising rescales by total / total = 1), one op
    fewer per layer, and callers may take the path of the unmasked model.
    """
    soft = torch.sigmoid(slot_logits.float())
    if isinstance(threshold, Tensor):
        threshold = threshold.to(device=soft.device, dtype=soft.dtype).reshape(-1, 1)
    if check_all_kept and not soft.requires_grad:
        keep = soft >= threshold
        return routing_from_keep(weights, ids, keep, soft, bool(keep.all()), renormalize=renormalize)
    keep, hard = straight_through_mask(soft, threshold)
    return MaskedRouting(weights=_gate(weights, hard, renormalize), ids=ids, keep=keep, soft=soft)


def apply_head(
    head: MaskHead,
    hidden: Tensor,
    weights: Tensor,
    ids: Tensor,
    threshold: float | Tensor,
    *,
    renormalize: bool = False,
    check_all_kept: bool = False,
) -> MaskedRouting:
    """The routing a mask head gives: `apply_slot_mask` on `head.slot_logits`, or, for a
    decode-sized step at inference on a CPU where the native op is built, the same decision made by
    `beam_moe.native.decode_keep` in one dispatch (then `all_kept` is always known)."""
    if _native_decode_applies(head, hidden, weights, ids, threshold):
        x = hidden.reshape(-1, head.in_features)
        soft, keep, all_kept = decode_keep(x, head, ids, float(threshold), weights)
        return routing_from_keep(weights, ids, keep, soft, all_kept, renormalize=renormalize)
    slot_logits = head.slot_logits(hidden, ids, weights)
    return apply_slot_mask(
        weights, ids, slot_logits, threshold, renormalize=renormalize, check_all_kept=check_all_kept
    )


def _native_decode_applies(
    head: MaskHead, hidden: Tensor, weights: Tensor, ids: Tensor, threshold: float | Tensor
) -> bool:
    return (
        hidden.device.type == "cpu"
        and not isinstance(threshold, Tensor)
        and ids.numel() < head.out_features
        and not (torch.is_grad_enabled() and head.weight.requires_grad)
        and (not head.router_aware or weights.dtype == torch.float32)
        and native_available()
    )


def routing_from_keep(
    weights: Tensor, ids: Tensor, keep: Tensor, soft: Tensor, all_kept: bool, *, renormalize: bool = False
) -> MaskedRouting:
    """The inference routing for a mask decided elsewhere (`apply_slot_mask`'s host check, or the
    native op `beam_moe.native.decode_keep`): `g * keep`, and when `all_kept` the router's weights
    as they are (g * 1 is g, and renormalising rescales by total / total = 1)."""
    if all_kept:
        return MaskedRouting(weights=weights, ids=ids, keep=keep, soft=soft, all_kept=True)
    gated = _gate(weights, keep.to(soft.dtype), renormalize)
    return MaskedRouting(weights=gated, ids=ids, keep=keep, soft=soft, all_kept=False)


RoutingPolicy = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
"""`policy(hidden [T, H], router_logits [T, E], weights [T, K], ids [T, K]) -> keep bool[T, K]`.

Another way to decide `keep` (a baseline such as Top-P routing, or a fixed mask); see
`beam_moe.attach.set_routing_policy`.
"""


def keep_all(hidden: Tensor, router_logits: Tensor, weights: Tensor, ids: Tensor) -> Tensor:
    """A routing policy that keeps every Top-K expert: the base model's computation."""
    return torch.ones_like(ids, dtype=torch.bool)


def apply_keep(weights: Tensor, ids: Tensor, keep: Tensor, *, renormalize: bool = False) -> MaskedRouting:
    """Gate the router's Top-K weights with a given `keep` (no gradient to a mask head)."""
    keep = keep.to(torch.bool)
    hard = keep.to(torch.float32)
    return MaskedRouting(weights=_gate(weights, hard, renormalize), ids=ids, keep=keep, soft=hard)


def _gate(weights: Tensor, hard: Tensor, renormalize: bool) -> Tensor:
    gated = weights * hard.to(weights.dtype)
    if renormalize:
        total = weights.sum(dim=-1, keepdim=True)
        kept = gated.sum(dim=-1, keepdim=True)
        scale = torch.where(kept != 0, total / torch.where(kept != 0, kept, torch.ones_like(kept)), 0)
        gated = gated * scale
    return gated


def to_sentinel(ids: Tensor, keep: Tensor, num_experts: int) -> Tensor:
    """Expert ids for a backend: masked slots become `num_experts`, which no backend computes."""
    return torch.where(keep, ids, torch.full_like(ids, num_experts))
