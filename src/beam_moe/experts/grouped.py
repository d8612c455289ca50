"""Grouped GEMM over the kept (token, expert) pairs.

One sort puts the pairs in expert order with masked pairs (ids >= E) at the tail; only the kept
rows are gathered, and only they enter the two GEMMs (gate/up, then down), with the family's gate
(SwiGLU and friends) between them. The routed weight scales each row, and the rows are summed back
into their tokens. Expert weights are read in place (views, never copies).

Two ways to run the GEMMs:
- `grouped_mm` (torch's grouped GEMM over all E groups, empty groups skipped): no Python loop,
  autograd, and on CUDA no per-expert launches or host syncs inside;
- on the CPU, a loop over the experts that have kept rows, each a plain matmul written in place.
  torch's CPU grouped GEMM is itself a loop over all E groups (a slice, a select and an empty
  matmul for each expert without rows), which costs more than the GEMMs when few experts are
  kept (decode); the loop touches only the kept experts, so time follows their bytes.
Decode-sized routings (at most SMALL_ROUTING pairs) are sorted with Python lists: the fixed cost
of a dozen tiny tensor ops is a visible share of a one-expert decode step.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from beam_moe.experts.weights import ExpertsOutput, ExpertWeights

SMALL_ROUTING = 256
"""Sort routings of at most this many (token, slot) pairs on the host (decode): fewer tensor ops."""


def grouped_mm_available() -> bool:
    return hasattr(F, "grouped_mm")


class KeptPairs:
    """The kept (token, slot) pairs of a routing, sorted by expert.

    order:    [S] flat pair indices (token * K + slot), expert-major; S = kept pairs.
    tokens:   [S] the token of each row.
    counts:   [E] kept rows per expert; offsets: [E] int32 running ends (grouped_mm's `offs`).
    spans:    (expert, first row, end row) of every expert that has rows (host side).
    """

    def __init__(
        self,
        order: Tensor,
        num_experts: int,
        top_k: int,
        *,
        counts: Tensor | None = None,
        spans: list[tuple[int, int, int]] | None = None,
        tokens: Tensor | None = None,
    ) -> None:
        self.order = order
        self.num_rows = order.numel()
        self.num_experts = num_experts
        self.top_k = top_k
        self.tokens = order // top_k if tokens is None else tokens
        self._counts = counts
        self._spans = spans

    @property
    def counts(self) -> Tensor:
        if self._counts is None:
            counts = [0] * self.num_experts
            for expert, start, end in self.spans:
                counts[expert] = end - start
            self._counts = torch.tensor(counts, device=self.order.device)
        return self._counts

    @property
    def offsets(self) -> Tensor:
        return torch.cumsum(self.counts, dim=0, dtype=torch.int32)

    @property
    def spans(self) -> list[tuple[int, int, int]]:
        if self._spans is None:
            spans, start = [], 0
            for expert, count in enumerate(self.counts.tolist()):
                if count:
                    spans.append((expert, start, start + count))
                    start += count
            self._spans = spans
        return self._spans

    def row_experts(self) -> Tensor:
        """[S] the expert of each row."""
        experts = torch.arange(self.num_experts, device=self.order.device)
        return torch.repeat_interleave(experts, self.counts)


def sort_kept_pairs(ids: Tensor, num_experts: int) -> KeptPairs:
    """One sort of the flat ids; masked pairs (ids >= E) land after every kept pair and are dropped."""
    top_k = ids.shape[1]
    if ids.device.type == "cpu" and ids.numel() <= SMALL_ROUTING:
        return _sort_on_host(ids, num_experts)
    flat_ids = ids.reshape(-1)
    # torch.sort as transformers' grouped_mm experts do: with nothing masked, the GEMMs see the same
    # rows in the same order, so a fresh adapter reproduces the base model bit for bit.
    order = torch.sort(flat_ids).indices
    counts = torch.bincount(flat_ids, minlength=num_experts + 1)[:num_experts]
    num_rows = int(counts.sum())
    return KeptPairs(order[:num_rows], num_experts, top_k, counts=counts)


def _sort_on_host(ids: Tensor, num_experts: int) -> KeptPairs:
    """The same sort with the bookkeeping in Python lists: a few microseconds instead of a dozen
    tensor ops. The order is still torch.sort's, so the GEMMs see the rows transformers gives them."""
    top_k = ids.shape[1]
    flat_ids = ids.reshape(-1)
    expert_of = flat_ids.tolist()
    kept = [(expert_of[i], i) for i in torch.sort(flat_ids).indices.tolist() if expert_of[i] < num_experts]
    spans: list[tuple[int, int, int]] = []
    for row, (expert, _) in enumerate(kept):
        if spans and spans[-1][0] == expert:
            spans[-1] = (expert, spans[-1][1], row + 1)
        else:
            spans.append((expert, row, row + 1))
    order = [i for _, i in kept]
    return KeptPairs(
        torch.tensor(order, dtype=torch.long),
        num_experts,
        top_k,
        spans=spans,
        tokens=torch.tensor([i // top_k for i in order], dtype=torch.long),
    )


def grouped_experts(
    w: ExpertWeights, hidden: Tensor, ids: Tensor, weights: Tensor, strategy: str | None = None
) -> ExpertsOutput:
    """Same contract as `reference_experts`: ids >= E are skipped; returns (output, rows computed,
    "grouped").

    `strategy` forces "loop" or "grouped_mm" (tests, benchmarks); by default the device decides:
    the loop on the CPU, grouped_mm on accelerators and whenever a backward pass is needed.
    """
    pairs = sort_kept_pairs(ids, w.num_experts)
    if pairs.num_rows == 0:
        return ExpertsOutput(torch.zeros_like(hidden), 0, "grouped")
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (hidden, weights, w.up, w.down))
    if strategy is None:
        on_cpu = hidden.device.type == "cpu" and not needs_grad
        strategy = "loop" if on_cpu or not grouped_mm_available() else "grouped_mm"
    if strategy == "loop":
        y = _expert_loop(w, hidden.to(w.up.dtype), pairs, in_place=not needs_grad)
    else:
        y = _grouped_gemm(w, hidden[pairs.tokens].to(w.up.dtype), pairs)
    row_weights = weights.reshape(-1)[pairs.order]
    return ExpertsOutput(combine_rows(y, row_weights, pairs, hidden), pairs.num_rows, "grouped")


def _grouped_gemm(w: ExpertWeights, x: Tensor, pairs: KeptPairs) -> Tensor:
    """Both GEMMs as torch grouped GEMMs over the expert-sorted rows."""
    offsets = pairs.offsets
    h = F.grouped_mm(x, w.up, offs=offsets)
    if w.up_bias is not None:
        h = h + w.up_bias[pairs.row_experts()]
    h = w.activation(h).to(w.down.dtype)
    y = F.grouped_mm(h, w.down, offs=offsets)
    if w.down_bias is not None:
        y = y + w.down_bias[pairs.row_experts()]
    return y


def _expert_loop(w: ExpertWeights, hidden: Tensor, pairs: KeptPairs, in_place: bool = True) -> Tensor:
    """Both GEMMs as one matmul per kept expert. `in_place` gathers each expert's rows into a
    small reused buffer (no S x H gather: at prefill that is a large fresh allocation) and writes
    the GEMMs into two row buffers (no autograd); otherwise the pieces are concatenated."""
    if in_place:
        widest = max(end - start for _, start, end in pairs.spans)
        rows = hidden.new_empty(widest, hidden.shape[1])
        h = hidden.new_empty(pairs.num_rows, w.up.shape[-1])
        for e, start, end in pairs.spans:
            x = torch.index_select(hidden, 0, pairs.tokens[start:end], out=rows[: end - start])
            torch.mm(x, w.up[e], out=h[start:end])
    else:
        h = torch.cat([hidden[pairs.tokens[start:end]] @ w.up[e] for e, start, end in pairs.spans])
    if w.up_bias is not None:
        h = h + w.up_bias[pairs.row_experts()]
    a = w.activation(h).to(w.down.dtype)
    if in_place:
        y = a.new_empty(pairs.num_rows, w.down.shape[-1])
        for e, start, end in pairs.spans:
            torch.mm(a[start:end], w.down[e], out=y[start:end])
    else:
        y = torch.cat([a[start:end] @ w.down[e] for e, start, end in pairs.spans])
    if w.down_bias is not None:
        y = y + w.down_bias[pairs.row_experts()]
    return y


COMBINE_CHUNK_BYTES = 2 << 20
"""The CPU combine gathers and converts rows to float32 this many bytes at a time (about an L2 cache)."""


def combine_rows(y: Tensor, row_weights: Tensor, pairs: KeptPairs, hidden: Tensor) -> Tensor:
    """Σ over each token's kept rows of weight · row, accumulated in float32 (or wider).

    With every slot kept, the sum runs over each token's K slots in slot order, as transformers'
    experts sum them, so a fresh adapter on a float32 model is the base model bit for bit. With
    slots masked, an index_add_ over the kept rows only (the masked slots cost nothing). On the CPU
    both run in chunks through reused buffers: a float32 copy of all rows at once would be a fresh
    S x H x 4-byte allocation (33 MB for a 512-token prefill, above glibc's mmap threshold, so page
    faults on every call) and cost ten times the GEMM-free rest of the layer.
    """
    accumulate = torch.promote_types(y.dtype, torch.float32)
    row_weights = row_weights.to(accumulate).unsqueeze(-1)
    num_tokens, hidden_size = hidden.shape
    needs_grad = torch.is_grad_enabled() and (y.requires_grad or row_weights.requires_grad)
    if hidden.device.type != "cpu" or needs_grad:
        return combine_rows_deterministic(y * row_weights, pairs, hidden)
    if pairs.num_rows == num_tokens * pairs.top_k:
        return _combine_all_slots(y, row_weights, pairs, hidden, accumulate)
    out = torch.zeros(num_tokens, hidden_size, dtype=accumulate)
    chunk = max(1, COMBINE_CHUNK_BYTES // (hidden_size * out.element_size()))
    buffer = out.new_empty(min(chunk, pairs.num_rows), hidden_size)
    for start in range(0, pairs.num_rows, chunk):
        end = min(start + chunk, pairs.num_rows)
        rows = buffer[: end - start]
        rows.copy_(y[start:end])
        rows.mul_(row_weights[start:end])
        out.index_add_(0, pairs.tokens[start:end], rows)
    return out.to(hidden.dtype)


def _combine_all_slots(
    y: Tensor, row_weights: Tensor, pairs: KeptPairs, hidden: Tensor, accumulate: torch.dtype
) -> Tensor:
    num_tokens, hidden_size = hidden.shape
    top_k = pairs.top_k
    slot_rows = torch.empty(num_tokens * top_k, dtype=torch.long)
    slot_rows[pairs.order] = torch.arange(pairs.num_rows)
    slot_weights = torch.empty(num_tokens * top_k, 1, dtype=accumulate)
    slot_weights[pairs.order] = row_weights
    out = torch.empty(num_tokens, hidden_size, dtype=accumulate)
    tokens_per_chunk = max(1, COMBINE_CHUNK_BYTES // (top_k * hidden_size * out.element_size()))
    rows_per_chunk = min(tokens_per_chunk, num_tokens) * top_k
    gathered = y.new_empty(rows_per_chunk, hidden_size)
    widened = out.new_empty(rows_per_chunk, hidden_size)
    for start in range(0, num_tokens, tokens_per_chunk):
        end = min(start + tokens_per_chunk, num_tokens)
        slots = slice(start * top_k, end * top_k)
        rows = gathered[: slots.stop - slots.start]
        torch.index_select(y, 0, slot_rows[slots], out=rows)
        wide = widened[: rows.shape[0]].copy_(rows).mul_(slot_weights[slots])
        torch.sum(wide.view(end - start, top_k, hidden_size), dim=1, out=out[start:end])
    return out.to(hidden.dtype)


def combine_rows_deterministic(weighted: Tensor, pairs: KeptPairs, hidden: Tensor) -> Tensor:
    """The slot-gather form of `combine_rows`: the same sum in a fixed order, with no atomics."""
    num_tokens, hidden_size = hidden.shape
    top_k = pairs.top_k
    slot_rows = torch.full((num_tokens * top_k,), pairs.num_rows, dtype=torch.long, device=hidden.device)
    slot_rows[pairs.order] = torch.arange(pairs.num_rows, device=hidden.device)
    rows = torch.cat([weighted, weighted.new_zeros(1, hidden_size)])
    return rows[slot_rows].view(num_tokens, top_k, hidden_size).sum(dim=1).to(hidden.dtype)
