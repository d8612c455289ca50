"""Training-free baselines as routing policies: they decide `keep: bool[T, K]` instead of the mask heads.

Each runs through `beam_moe.set_routing_policy`, so it takes the same sentinel path, counters and
skipped compute as BEAM. All of them rank and weigh the Top-K slots by the router's probabilities
*over its own Top-K*: q_k = w_k / sum_j w_j, where w are the Top-K weights the router returns. This
is one definition for every family: scaling (DeepSeek's routed_scaling_factor), Top-K
renormalisation (norm_topk_prob) and the scoring function (softmax, or DeepSeek-V3's sigmoid
scores) change w by a per-token factor at most, which q removes; for softmax routers q is the
softmax restricted to the Top-K and renormalised.

- top_k:     Top-K pruning: keep the K' slots with the largest q (K' = K is the base model).
- top_p:     Top-P routing (MoE-Dynamic): keep slots in descending q until their cumulative q
             reaches p; the first slot is always kept (p = 1 is the base model).
- threshold: threshold skipping (NAEE's dynamic skipping, generalised to K slots): drop a slot
             whose q is below `threshold` x the largest q (0 is the base model).
- random:    keep each slot independently with probability `keep_prob` (1 is the base model).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from beam_moe.attach import get_attachment, set_routing_policy
from beam_moe.errors import BeamError
from beam_moe.routing import RoutingPolicy


def topk_probabilities(weights: Tensor) -> Tensor:
    """q [T, K]: the router's weights renormalised over its Top-K (uniform where they sum to 0)."""
    w = weights.float().clamp_min(0.0)
    total = w.sum(dim=-1, keepdim=True)
    uniform = torch.full_like(w, 1.0 / w.shape[-1])
    return torch.where(total > 0, w / torch.where(total > 0, total, torch.ones_like(total)), uniform)


def rank_order(weights: Tensor) -> tuple[Tensor, Tensor]:
    """(q sorted in descending order, the slot of each rank); ties keep slot order."""
    q = topk_probabilities(weights)
    sorted_q, order = torch.sort(q, dim=-1, descending=True, stable=True)
    return sorted_q, order


def _unsort(keep_by_rank: Tensor, order: Tensor) -> Tensor:
    return torch.zeros_like(keep_by_rank).scatter(-1, order, keep_by_rank)


@dataclass(frozen=True)
class TopKPruning:
    """Keep the `k` highest-probability slots of the router's Top-K."""

    k: int

    def __call__(self, hidden: Tensor, logits: Tensor, weights: Tensor, ids: Tensor) -> Tensor:
        _, order = rank_order(weights)
        ranks = torch.arange(ids.shape[-1], device=ids.device).expand_as(order)
        return _unsort(ranks < self.k, order)


@dataclass(frozen=True)
class TopPRouting:
    """Keep slots in descending probability until the kept probability reaches `p` (at least one)."""

    p: float

    def __call__(self, hidden: Tensor, logits: Tensor, weights: Tensor, ids: Tensor) -> Tensor:
        if self.p >= 1.0:
            return torch.ones_like(ids, dtype=torch.bool)
        sorted_q, order = rank_order(weights)
        before = torch.cumsum(sorted_q, dim=-1) - sorted_q  # probability of the higher ranks
        keep_by_rank = before < self.p
        keep_by_rank[:, 0] = True
        return _unsort(keep_by_rank, order)


@dataclass(frozen=True)
class ThresholdSkipping:
    """Drop a slot whose probability is below `threshold` x the largest one of its token."""

    threshold: float

    def __call__(self, hidden: Tensor, logits: Tensor, weights: Tensor, ids: Tensor) -> Tensor:
        q = topk_probabilities(weights)
        return q >= self.threshold * q.max(dim=-1, keepdim=True).values


class RandomMask:
    """Keep each slot independently with probability `keep_prob`; seeded, so a run repeats exactly."""

    def __init__(self, keep_prob: float, seed: int = 0) -> None:
        self.keep_prob = keep_prob
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def __call__(self, hidden: Tensor, logits: Tensor, weights: Tensor, ids: Tensor) -> Tensor:
        if self.keep_prob >= 1.0:
            return torch.ones_like(ids, dtype=torch.bool)
        generator = self._generators.get(ids.device)
        if generator is None:
            generator = self._generators[ids.device] = torch.Generator(ids.device).manual_seed(self.seed)
        draws = torch.rand(ids.shape, generator=generator, device=ids.device)
        return draws < self.keep_prob

    def __repr__(self) -> str:
        return f"RandomMask(keep_prob={self.keep_prob}, seed={self.seed})"


@dataclass(frozen=True)
class Baseline:
    """A baseline's name, its parameter, the parameter's range and its no-op value.

    `increasing`: a larger parameter keeps more experts (used by calibration).
    """

    name: str
    param: str
    description: str
    low: float
    high: float | None  # None: Top-K of the model
    noop: float | None  # None: Top-K of the model
    integer: bool
    increasing: bool
    make: Callable[[float, int], RoutingPolicy]

    def upper(self, top_k: int) -> float:
        return float(top_k) if self.high is None else self.high

    def noop_value(self, top_k: int) -> float:
        return float(top_k) if self.noop is None else self.noop

    def check(self, value: float, top_k: int) -> float:
        """`value` if it is valid for this baseline on a model with `top_k`, else a BeamError."""
        high = self.upper(top_k)
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise BeamError(f"{self.name}: {self.param} must be a number, got {value!r}") from None
        if not (self.low <= number <= high):
            raise BeamError(
                f"{self.name}: {self.param} must lie in [{self.low:g}, {high:g}], got {value!r} "
                f"({self.description}; {self.noop_value(top_k):g} is the base model)"
            )
        if self.integer and number != int(number):
            raise BeamError(f"{self.name}: {self.param} must be a whole number, got {value!r}")
        return number

    def policy(self, value: float, top_k: int, seed: int = 0) -> RoutingPolicy:
        return self.make(self.check(value, top_k), seed)


BASELINES: dict[str, Baseline] = {
    b.name: b
    for b in (
        Baseline(
            "top_k",
            "k",
            "Top-K pruning: keep the k most probable of the Top-K",
            low=0,
            high=None,
            noop=None,
            integer=True,
            increasing=True,
            make=lambda v, seed: TopKPruning(int(v)),
        ),
        Baseline(
            "top_p",
            "p",
            "Top-P routing: keep experts until their cumulative probability reaches p",
            low=0,
            high=1,
            noop=1,
            integer=False,
            increasing=True,
            make=lambda v, seed: TopPRouting(v),
        ),
        Baseline(
            "threshold",
            "threshold",
            "threshold skipping: drop experts below threshold x the top probability",
            low=0,
            high=1,
            noop=0,
            integer=False,
            increasing=False,
            make=lambda v, seed: ThresholdSkipping(v),
        ),
        Baseline(
            "random",
            "keep_prob",
            "random mask: keep each expert with probability keep_prob",
            low=0,
            high=1,
            noop=1,
            integer=False,
            increasing=True,
            make=lambda v, seed: RandomMask(v, seed),
        ),
    )
}


def get_baseline(name: str) -> Baseline:
    if name not in BASELINES:
        raise BeamError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")
    return BASELINES[name]


def model_top_k(model: nn.Module) -> int:
    """The largest Top-K of the model's attached MoE layers."""
    return max(layer.top_k for layer in get_attachment(model).layers)


def apply_baseline(model: nn.Module, name: str, value: float, seed: int = 0) -> RoutingPolicy:
    """Route `model` (which has BEAM attached) with baseline `name` at parameter `value`; returns the policy."""
    policy = get_baseline(name).policy(value, model_top_k(model), seed)
    set_routing_policy(model, policy)
    return policy


@contextmanager
def using_baseline(model: nn.Module, name: str, value: float, seed: int = 0) -> Iterator[RoutingPolicy]:
    """`apply_baseline` for the duration of the block; the mask heads decide again afterwards."""
    policy = apply_baseline(model, name, value, seed)
    try:
        yield policy
    finally:
        set_routing_policy(model, None)
