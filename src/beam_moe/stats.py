"""Counting what BEAM does: kept pairs, Avg-K, rows that really entered an expert GEMM, and which
expert backend computed them.

A leaf module (it imports nothing else from beam_moe), so that both the transformers layer and the
vLLM runner can feed counters through the public `StatsSink` methods without importing each other.
`beam_stats(model)`, which needs the model's attachment, lives beside `attach` (beam_moe.attach).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor


@dataclass
class RoutingRecord:
    """One forward pass of one MoE layer, kept on the CPU for analysis."""

    ids: Tensor  # [T, K] router ids
    keep: Tensor  # [T, K] bool
    soft: Tensor  # [T, K] sigmoid(z_k)
    weights: Tensor  # [T, K] router weights before the mask


class StatsSink(Protocol):
    """What a BEAM layer feeds after each forward pass (`BeamStats` is one; the layer holds a list)."""

    def add_routing(
        self,
        layer: int,
        keep: Tensor,
        ids: Tensor,
        soft: Tensor,
        weights: Tensor,
        all_kept: bool | None = None,
    ) -> None:
        """One layer's routing: keep mask [T, K], router ids, mask probabilities, router weights, and
        (`MaskedRouting.all_kept`) whether every slot is known to be kept, or None."""

    def add_rows(self, layer: int, rows: Tensor | int, backend: str) -> None:
        """The (token, expert) rows one layer's experts computed, and the backend that computed them."""


class BeamStats:
    """Counters over the forward passes inside a `beam_stats` block.

    tokens:        tokens that went through each MoE layer (the first layer's count).
    kept_pairs:    (token, expert) pairs kept by the masks, summed over layers.
    routed_pairs:  Top-K pairs the routers chose, summed over layers (tokens x K x layers).
    computed_rows: (token, expert) rows that entered an expert GEMM, summed over layers; equals
                   kept_pairs in eval mode and routed_pairs in training mode (all K are computed).
    avg_k:         kept routed experts per token, averaged over MoE layers.
    per_layer:     Avg-K of each MoE layer.
    zero_kept:     per layer, the fraction of tokens that kept no routed expert (in a model without
                   shared experts such a token skips the layer's FFN entirely).
    backends:      per layer, the expert backends that really ran and how many calls each, e.g.
                   {"model.layers.0.mlp": {"triton": 12}}; a backend that hands a call to another
                   (triton to grouped) shows up under the one that ran.
    """

    def __init__(self, layer_names: list[str], top_k: list[int], record: bool = False) -> None:
        self.layer_names = list(layer_names)
        self.top_k = list(top_k)
        self.record = record
        n = len(layer_names)
        self._tokens = [0] * n
        self._kept: list[Tensor | int] = [0] * n
        self._zero: list[Tensor | int] = [0] * n
        self._rows: list[Tensor | int] = [0] * n
        self._backends: list[dict[str, int]] = [{} for _ in range(n)]
        self.records: list[list[RoutingRecord]] = [[] for _ in range(n)]

    def add_routing(
        self,
        layer: int,
        keep: Tensor,
        ids: Tensor,
        soft: Tensor,
        weights: Tensor,
        all_kept: bool | None = None,
    ) -> None:
        tokens, top_k = keep.shape
        self._tokens[layer] += tokens
        if all_kept:  # counted on the host: no device op when the mask kept everything
            self._kept[layer] = self._kept[layer] + tokens * top_k
        else:
            self._kept[layer] = self._kept[layer] + keep.sum()
            self._zero[layer] = self._zero[layer] + (~keep.any(dim=-1)).sum()
        if self.record:
            self.records[layer].append(
                RoutingRecord(
                    ids=ids.detach().cpu(),
                    keep=keep.detach().cpu(),
                    soft=soft.detach().float().cpu(),
                    weights=weights.detach().float().cpu(),
                )
            )

    def add_rows(self, layer: int, rows: Tensor | int, backend: str) -> None:
        self._rows[layer] = self._rows[layer] + rows
        calls = self._backends[layer]
        calls[backend] = calls.get(backend, 0) + 1

    @staticmethod
    def _int(value: Tensor | int) -> int:
        return int(value.item()) if isinstance(value, Tensor) else int(value)

    @property
    def tokens(self) -> int:
        return self._tokens[0] if self._tokens else 0

    @property
    def token_layers(self) -> int:
        """Tokens summed over the MoE layers (the denominator of a whole-model Avg-K)."""
        return sum(self._tokens)

    @property
    def kept_pairs(self) -> int:
        return sum(self._int(v) for v in self._kept)

    @property
    def routed_pairs(self) -> int:
        return sum(t * k for t, k in zip(self._tokens, self.top_k, strict=True))

    @property
    def computed_rows(self) -> int:
        return sum(self._int(v) for v in self._rows)

    def _per_token(self, counts: list[Tensor | int]) -> dict[str, float]:
        return {
            name: self._int(count) / tokens
            for name, count, tokens in zip(self.layer_names, counts, self._tokens, strict=True)
            if tokens
        }

    @property
    def per_layer(self) -> dict[str, float]:
        """Avg-K of each MoE layer, by the layer's qualified name."""
        return self._per_token(self._kept)

    @property
    def zero_kept(self) -> dict[str, float]:
        """Fraction of each MoE layer's tokens that kept no routed expert, by the layer's name."""
        return self._per_token(self._zero)

    @property
    def backends(self) -> dict[str, dict[str, int]]:
        """Calls per expert backend that really ran, by the layer's qualified name (layers that ran)."""
        return {
            name: dict(calls) for name, calls in zip(self.layer_names, self._backends, strict=True) if calls
        }

    @property
    def avg_k(self) -> float:
        values = list(self.per_layer.values())
        return sum(values) / len(values) if values else float("nan")

    @property
    def kept_fraction(self) -> float:
        routed = self.routed_pairs
        return self.kept_pairs / routed if routed else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "avg_k": self.avg_k,
            "top_k": max(self.top_k) if self.top_k else None,
            "tokens": self.tokens,
            "kept_pairs": self.kept_pairs,
            "routed_pairs": self.routed_pairs,
            "computed_rows": self.computed_rows,
            "kept_fraction": self.kept_fraction,
            "per_layer": self.per_layer,
            "zero_kept": self.zero_kept,
            "backends": self.backends,
        }
