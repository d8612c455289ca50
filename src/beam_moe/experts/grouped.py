"""Grouped GEMM over the kept (token, expert) pairs.

One sort puts the pairs in expert order with masked pairs (ids >= E) at the tail; only the kept
rows are gathered, and only they enter the two GEMMs (gate/up, then down), with the family's gate
(SwiGLU and friends) between them. The routed weight scales each row, and the rows are summed back
into their tokens. Expert weights are read in place (views, never copies).

Two ways to run the GEMMs, picked by size:
- `grouped_mm` (torch's grouped GEMM over all E groups, empty groups skipped): no Python loop,
  autograd, and on CUDA no per-expert launches;
- on the CPU, a loop over the experts that have kept rows, each a plain matmul written in place.
  torch's CPU grouped GEMM still visits every one of the E groups, which costs more than the
  GEMMs themselves when few experts are kept (decode); the loop reads only the kept experts'
  weights, so time follows the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from beam_moe.experts.weights import ExpertWeights

LOOP_MAX_EXPERTS = 128
"""On the CPU, loop over the kept experts when at most this many have rows (see benchmarks/NOTES-kernels.md)."""


def grouped_mm_available() -> bool:
    return hasattr(F, "grouped_mm")


@dataclass
class KeptPairs:
    """The kept (token, slot) pairs of a routing, sorted by expert.

    order:    [S] flat pair indices (token * K + slot), expert-major; S = kept pairs.
    tokens:   [S] the token of each row.
    counts:   [E] kept rows per expert.
    offsets:  [E] int32 running end of each expert's rows (grouped_mm's `offs`).
    num_rows: S.
    top_k:    K, the slots per token.
    """

    order: Tensor
    tokens: Tensor
    counts: Tensor
    offsets: Tensor
    num_rows: int
    top_k: int


def sort_kept_pairs(ids: Tensor, num_experts: int) -> KeptPairs:
    """One sort of the flat ids; masked pairs (ids >= E) land after every kept pair and are dropped."""
    top_k = ids.shape[1]
    flat_ids = ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=num_experts + 1)[:num_experts]
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    num_rows = int(offsets[-1])
    order = order[:num_rows]
    return KeptPairs(order, order // top_k, counts, offsets, num_rows, top_k)


def grouped_experts(
    w: ExpertWeights, hidden: Tensor, ids: Tensor, weights: Tensor, strategy: str | None = None
) -> tuple[Tensor, Tensor]:
    """Same contract as `reference_experts`: ids >= E are skipped; returns (output, rows computed).

    `strategy` forces "loop" or "grouped_mm" (tests, benchmarks); by default the size decides.
    """
    pairs = sort_kept_pairs(ids, w.num_experts)
    if pairs.num_rows == 0:
        return torch.zeros_like(hidden), torch.tensor(0)
    x = hidden[pairs.tokens].to(w.up.dtype)
    strategy = strategy or ("loop" if _use_expert_loop(hidden, weights, w, pairs) else "grouped_mm")
    y = _expert_loop(w, x, pairs) if strategy == "loop" else _grouped_gemm(w, x, pairs)
    row_weights = weights.reshape(-1)[pairs.order]
    return combine_rows(y, row_weights, pairs, hidden), torch.tensor(pairs.num_rows)


def _use_expert_loop(hidden: Tensor, weights: Tensor, w: ExpertWeights, pairs: KeptPairs) -> bool:
    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or weights.requires_grad or w.up.requires_grad or w.down.requires_grad
    )
    if needs_grad or hidden.device.type != "cpu" or not grouped_mm_available():
        return not grouped_mm_available()
    return int(torch.count_nonzero(pairs.counts)) <= LOOP_MAX_EXPERTS


def _grouped_gemm(w: ExpertWeights, x: Tensor, pairs: KeptPairs) -> Tensor:
    """Both GEMMs as torch grouped GEMMs over the expert-sorted rows."""
    h = F.grouped_mm(x, w.up, offs=pairs.offsets)
    if w.up_bias is not None:
        h = h + w.up_bias[_row_experts(pairs)]
    h = w.activation(h).to(w.down.dtype)
    y = F.grouped_mm(h, w.down, offs=pairs.offsets)
    if w.down_bias is not None:
        y = y + w.down_bias[_row_experts(pairs)]
    return y


def _expert_loop(w: ExpertWeights, x: Tensor, pairs: KeptPairs) -> Tensor:
    """Both GEMMs as one matmul per kept expert, written in place into two row buffers."""
    ends = pairs.offsets.tolist()
    spans = [(e, ends[e] - n, ends[e]) for e, n in enumerate(pairs.counts.tolist()) if n]
    h = x.new_empty(pairs.num_rows, w.up.shape[-1])
    for e, start, end in spans:
        torch.mm(x[start:end], w.up[e], out=h[start:end])
    if w.up_bias is not None:
        h += w.up_bias[_row_experts(pairs)]
    a = w.activation(h).to(w.down.dtype)
    y = a.new_empty(pairs.num_rows, w.down.shape[-1])
    for e, start, end in spans:
        torch.mm(a[start:end], w.down[e], out=y[start:end])
    if w.down_bias is not None:
        y += w.down_bias[_row_experts(pairs)]
    return y


def _row_experts(pairs: KeptPairs) -> Tensor:
    return torch.repeat_interleave(
        torch.arange(pairs.counts.numel(), device=pairs.counts.device), pairs.counts
    )


def combine_rows(y: Tensor, row_weights: Tensor, pairs: KeptPairs, hidden: Tensor) -> Tensor:
    """Σ over each token's kept rows of weight · row, accumulated in float32 (or wider).

    On the CPU an index_add_ into [T, H] (sequential, deterministic). On accelerators, where
    index_add_ uses atomics (run-to-run rounding differences), each slot gathers its row (or a zero
    row when masked) and the K slots are summed, as transformers does.
    """
    accumulate = torch.promote_types(y.dtype, torch.float32)
    weighted = y * row_weights.to(accumulate).unsqueeze(-1)
    num_tokens, hidden_size = hidden.shape
    if hidden.device.type == "cpu":
        out = torch.zeros(num_tokens, hidden_size, dtype=accumulate, device=hidden.device)
        return out.index_add_(0, pairs.tokens, weighted).to(hidden.dtype)
    return combine_rows_deterministic(weighted, pairs, hidden)


def combine_rows_deterministic(weighted: Tensor, pairs: KeptPairs, hidden: Tensor) -> Tensor:
    """The slot-gather form of `combine_rows`: the same sum in a fixed order, with no atomics."""
    num_tokens, hidden_size = hidden.shape
    top_k = pairs.top_k
    slot_rows = torch.full((num_tokens * top_k,), pairs.num_rows, dtype=torch.long, device=hidden.device)
    slot_rows[pairs.order] = torch.arange(pairs.num_rows, device=hidden.device)
    rows = torch.cat([weighted, weighted.new_zeros(1, hidden_size)])
    return rows[slot_rows].view(num_tokens, top_k, hidden_size).sum(dim=1).to(hidden.dtype)
