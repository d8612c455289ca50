"""The mask head, the straight-through estimator and the L1 regulariser.

For a token x the mask head gives z = x · W_m over all E experts; routing gathers z at the token's
Top-K ids. The forward pass always uses the hard mask sigmoid(z_k) >= threshold; the backward pass
treats the threshold as the identity, so the gradient of the hard mask is that of sigmoid(z_k).

Two heads (`BeamConfig.head`):
- "linear", the paper's: z_k = x · W_m[id_k] (+ a per-expert bias). Zero-initialised, it keeps
  every expert, so a fresh adapter is the base model.
- "router", router-aware: z_k = x · W_m[id_k] + a · r_k + b, with r_k = log(g_k / max_j g_j) the
  slot's router weight relative to the token's largest (clamped at -ROUTER_FEATURE_FLOOR), and
  two learned scalars per layer, a (`router_scale`) and b (`router_offset`). With W_m = 0 it is
  threshold skipping: keep_k <=> g_k >= exp(-b / a) x max g. A fresh head (a = 1, b = floor) keeps
  every expert; training starts it at the threshold that meets the budget (`set_router_threshold`),
  so the learned part only has to say where the router's own ranking is wrong.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from beam_moe.errors import BeamError

HEADS = ("linear", "router")
ROUTER_FEATURE_FLOOR = 20.0
"""r_k is clamped at -20 (g_k / max g >= 2e-9): a zero weight gets a finite feature, and the fresh
offset b = 20 keeps every slot."""


def router_feature(weights: Tensor) -> Tensor:
    """r_k = log(g_k / max_j g_j) in [-ROUTER_FEATURE_FLOOR, 0], float32, no gradient to the router.

    Scale-free: the router's normalisation (norm_topk_prob), routed scaling factor and scoring
    function change g by a per-token factor at most, which the ratio removes.
    """
    g = weights.detach().float().clamp_min(0.0)
    top = g.max(dim=-1, keepdim=True).values
    ratio = g / torch.where(top > 0, top, torch.ones_like(top))
    ratio = torch.where(top > 0, ratio, torch.ones_like(ratio))
    return ratio.clamp_min(math.exp(-ROUTER_FEATURE_FLOOR)).log().clamp_min(-ROUTER_FEATURE_FLOOR)


class MaskHead(nn.Linear):
    """One linear layer, hidden -> num_experts, zero-initialised so that every expert is kept;
    with `router_aware`, plus a learned multiple of the router's relative weight (module docstring).

    Stored in float32 whatever the model's dtype: the head is tiny and its logits sit near the
    threshold, where bf16 rounding would flip decisions.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        *,
        bias: bool = False,
        init: str = "zeros",
        init_std: float = 0.02,
        router_aware: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(hidden_size, num_experts, bias=bias, device=device, dtype=torch.float32)
        self.init = init
        self.init_std = init_std
        self.router_aware = router_aware
        if router_aware:
            self.router_scale = nn.Parameter(torch.ones(1, device=device))
            self.router_offset = nn.Parameter(torch.full((1,), ROUTER_FEATURE_FLOOR, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init = getattr(self, "init", "zeros")
        with torch.no_grad():
            if init == "zeros":
                self.weight.zero_()
            elif init == "normal":
                self.weight.normal_(0.0, self.init_std)
            else:
                raise BeamError(f"unknown mask head init {init!r}; use 'zeros' or 'normal'")
            if self.bias is not None:
                self.bias.zero_()
            if getattr(self, "router_aware", False):
                self.router_scale.fill_(1.0)
                self.router_offset.fill_(ROUTER_FEATURE_FLOOR)

    @torch.no_grad()
    def set_router_threshold(self, threshold: float) -> None:
        """Make the router term keep exactly the slots with g_k >= threshold x max g (0 < threshold <= 1)."""
        if not self.router_aware:
            raise BeamError("only a router-aware mask head (head='router') has a router threshold")
        if not 0.0 < threshold <= 1.0:
            raise BeamError(f"a router threshold must lie in (0, 1], got {threshold}")
        self.router_offset.fill_(-float(self.router_scale) * max(math.log(threshold), -ROUTER_FEATURE_FLOOR))

    def forward(self, hidden_states: Tensor) -> Tensor:
        """Mask logits z [T, E] in float32 for hidden states [..., H] (flattened to T rows)."""
        x = hidden_states.reshape(-1, self.in_features)
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).float()

    def slot_logits(self, hidden_states: Tensor, ids: Tensor, weights: Tensor | None = None) -> Tensor:
        """z_k [T, K] in float32 at the router's Top-K `ids` (with their `weights` g [T, K], which a
        router-aware head needs): the logits routing needs, and only those.

        With fewer (token, slot) pairs than experts (decode), only the K rows of W_m that each
        token's ids name are read, instead of all E (an fp32 head is 1 MiB for 128 x 2048).
        """
        x = hidden_states.reshape(-1, self.in_features).to(self.weight.dtype)
        if ids.numel() >= self.out_features:
            z = self.forward(x).gather(1, ids.long())
        else:
            # index_select (int32 or int64 ids) is several times cheaper than advanced indexing
            flat = ids.reshape(-1)
            if flat.dtype not in (torch.int32, torch.int64):
                flat = flat.long()
            rows = self.weight.index_select(0, flat)
            bias = None if self.bias is None else self.bias.index_select(0, flat)
            if x.shape[0] == 1:  # one token (decode at batch 1): a single matrix-vector product
                z = (torch.mv(rows, x[0]) if bias is None else torch.addmv(bias, rows, x[0])).view(ids.shape)
            else:
                z = torch.bmm(rows.view(*ids.shape, self.in_features), x.unsqueeze(-1)).squeeze(-1)
                if bias is not None:
                    z = z + bias.view(ids.shape)
        if self.router_aware:
            if weights is None:
                raise BeamError("a router-aware mask head needs the router's Top-K weights")
            z = z + self.router_scale * router_feature(weights) + self.router_offset
        return z.float()


def straight_through_mask(soft: Tensor, threshold: float | Tensor) -> tuple[Tensor, Tensor]:
    """Hard 0/1 mask with the gradient of `soft` (`threshold` a number or a tensor that broadcasts).

    Returns (keep: bool, hard: float). `hard` equals keep exactly in the forward pass
    (`soft - soft.detach()` is exactly zero), and d hard / d soft = 1 in the backward pass.
    """
    keep = soft >= threshold
    if not soft.requires_grad:  # inference: the same values without the gradient's two extra ops
        return keep, keep.to(soft.dtype)
    hard = keep.to(soft.dtype) + (soft - soft.detach())
    return keep, hard


def l1_regularizer(soft: Tensor) -> Tensor:
    """The paper's L_reg: the mean of sigmoid(z_k) over tokens and Top-K slots (values are >= 0)."""
    return soft.mean()
