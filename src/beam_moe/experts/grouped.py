"""Grouped GEMM over the kept (token, expert) pairs with torch's `grouped_mm`.

One sort puts the pairs in expert order with masked pairs (id E) at the tail; the offsets end at
the last kept pair, so masked pairs are never gathered and never enter a GEMM.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from beam_moe.experts.weights import ExpertWeights


def grouped_mm_available() -> bool:
    return hasattr(F, "grouped_mm")


def grouped_experts(w: ExpertWeights, hidden: Tensor, ids: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Same contract as `reference_experts`: ids >= E are skipped; returns (output, rows computed)."""
    num_tokens, top_k = ids.shape
    num_experts = w.num_experts
    flat_ids = ids.reshape(-1)
    # torch.sort as transformers' grouped_mm experts do: with nothing masked, the GEMMs see the same
    # rows in the same order, so a fresh adapter reproduces the base model bit for bit.
    order = torch.sort(flat_ids).indices
    counts = torch.bincount(flat_ids, minlength=num_experts + 1)[:num_experts]
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    num_rows = int(offsets[-1])
    if num_rows == 0:
        return torch.zeros_like(hidden), torch.tensor(0)
    pairs = order[:num_rows]
    x = hidden[pairs // top_k].to(w.up.dtype)
    h = F.grouped_mm(x, w.up, offs=offsets)
    if w.up_bias is not None:
        h = h + w.up_bias[flat_ids[pairs]]
    h = w.activation(h)
    y = F.grouped_mm(h.to(w.down.dtype), w.down, offs=offsets)
    if w.down_bias is not None:
        y = y + w.down_bias[flat_ids[pairs]]
    y = y * weights.reshape(-1)[pairs].unsqueeze(-1)
    slots = y.new_zeros(num_tokens * top_k, y.shape[-1]).index_put((pairs,), y)
    return slots.view(num_tokens, top_k, -1).sum(dim=1).to(hidden.dtype), torch.tensor(num_rows)
