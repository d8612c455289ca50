"""The ground truth: a plain loop over the experts that have at least one kept (token, slot) pair."""

from __future__ import annotations

import torch
from torch import Tensor

from beam_moe.experts.weights import ExpertsOutput, ExpertWeights


def reference_experts(w: ExpertWeights, hidden: Tensor, ids: Tensor, weights: Tensor) -> ExpertsOutput:
    """Σ_k weights[t, k] · expert_{ids[t, k]}(hidden[t]), skipping ids >= E.

    Returns the output [T, H] in hidden's dtype and the number of (token, expert) rows that entered a GEMM.
    """
    num_tokens, top_k = ids.shape
    slots = torch.zeros(num_tokens, top_k, hidden.shape[-1], dtype=torch.float32, device=hidden.device)
    rows = 0
    for expert in torch.unique(ids[ids < w.num_experts]).tolist():
        token, slot = torch.where(ids == expert)
        h = hidden[token].to(w.up.dtype) @ w.up[expert]
        if w.up_bias is not None:
            h = h + w.up_bias[expert]
        y = w.activation(h) @ w.down[expert]
        if w.down_bias is not None:
            y = y + w.down_bias[expert]
        slots = slots.index_put((token, slot), (y * weights[token, slot, None]).float())
        rows += token.numel()
    return ExpertsOutput(slots.sum(dim=1).to(hidden.dtype), rows, "reference")
