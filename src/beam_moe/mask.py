"""The mask head, the straight-through estimator and the L1 regulariser.

For a token x the mask head gives z = x · W_m over all E experts; routing gathers z at the token's
Top-K ids. The forward pass always uses the hard mask sigmoid(z_k) >= threshold; the backward pass
treats the threshold as the identity, so the gradient of the hard mask is that of sigmoid(z_k).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from beam_moe.errors import BeamError


class MaskHead(nn.Linear):
    """One linear layer, hidden -> num_experts, zero-initialised so that every expert is kept.

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
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(hidden_size, num_experts, bias=bias, device=device, dtype=torch.float32)
        self.init = init
        self.init_std = init_std
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

    def forward(self, hidden_states: Tensor) -> Tensor:
        """Mask logits z [T, E] in float32 for hidden states [..., H] (flattened to T rows)."""
        x = hidden_states.reshape(-1, self.in_features)
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).float()

    def slot_logits(self, hidden_states: Tensor, ids: Tensor) -> Tensor:
        """z_k = z[ids] [T, K] in float32: the logits routing needs, and only those.

        With fewer (token, slot) pairs than experts (decode), only the K rows of W_m that each
        token's ids name are read, instead of all E (an fp32 head is 1 MiB for 128 x 2048).
        """
        x = hidden_states.reshape(-1, self.in_features).to(self.weight.dtype)
        ids = ids.long()
        if ids.numel() >= self.out_features:
            return self.forward(x).gather(1, ids)
        z = torch.bmm(self.weight[ids], x.unsqueeze(-1)).squeeze(-1)
        if self.bias is not None:
            z = z + self.bias[ids]
        return z.float()


def straight_through_mask(soft: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """Hard 0/1 mask with the gradient of `soft`.

    Returns (keep: bool, hard: float). `hard` equals keep exactly in the forward pass
    (`soft - soft.detach()` is exactly zero), and d hard / d soft = 1 in the backward pass.
    """
    keep = soft >= threshold
    hard = keep.to(soft.dtype) + (soft - soft.detach())
    return keep, hard


def l1_regularizer(soft: Tensor) -> Tensor:
    """The paper's L_reg: the mean of sigmoid(z_k) over tokens and Top-K slots (values are >= 0)."""
    return soft.mean()
