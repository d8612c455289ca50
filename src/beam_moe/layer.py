"""BEAM on one MoE block: the mask head beside the router, and expert execution that skips masked pairs.

The block's own forward is untouched (shared experts, jitter, output format). What changes:
- a forward hook on the router replaces its Top-K weights with `g * keep` (routing.apply_head);
  in eval mode masked slots also get the sentinel id E, so the experts never compute them;
- the experts module's forward runs a BEAM expert backend, which skips ids >= E;
- where that backend is `native`, a softmax Top-K router's forward runs on the native op too
  (`native_router`: the module's outputs, its weights streamed like the experts').
In training mode all K experts are computed (weights g * keep with a straight-through gradient),
so the gradient reaches masked slots.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from beam_moe.config import BeamConfig
from beam_moe.errors import BeamError
from beam_moe.experts import ExpertWeights, get_backend
from beam_moe.families import MoEFamily
from beam_moe.mask import MaskHead
from beam_moe.native_router import SOFTMAX_TOPK, softmax_topk_route
from beam_moe.routing import RoutingPolicy, apply_head, apply_keep, to_sentinel
from beam_moe.stats import StatsSink


class BeamMoELayer:
    """The BEAM runtime of one MoE block (not an nn.Module: it owns hooks, not weights)."""

    def __init__(
        self,
        index: int,
        name: str,
        block: nn.Module,
        family: MoEFamily,
        config: BeamConfig,
        sinks: list[StatsSink],
    ) -> None:
        self.index = index
        self.name = name
        self.block = block
        self.router = family.router(block)
        self.experts = family.experts(block)
        self.family = family
        self.num_experts, self.hidden_size = family.router_weight(self.router).shape
        self.top_k = int(self.router.top_k)
        self.config = config
        self.sinks = sinks
        self.last_soft: Tensor | None = None
        self.last_keep: Tensor | None = None
        self.policy: RoutingPolicy | None = None
        self.threshold: float | Tensor | None = None
        """Replaces config.threshold while set: a number, or one per batch row (float32 [B])."""
        self._hook: Any = None

    @property
    def head(self) -> MaskHead:
        return self.block.beam_mask

    @head.setter
    def head(self, head: MaskHead) -> None:
        """Swap the installed head for another (the hooks stay): to run or save other head weights."""
        self.block._modules["beam_mask"] = head

    def install(self, head: MaskHead) -> None:
        self.block.add_module("beam_mask", head)
        self._hook = self.router.register_forward_hook(self._mask_router_output, with_kwargs=True)
        self.experts.forward = self._run_experts
        if self.family.router_kind == SOFTMAX_TOPK:
            self.router.forward = self._route

    def remove(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.experts.__dict__.pop("forward", None)
        self.router.__dict__.pop("forward", None)
        if "beam_mask" in self.block._modules:
            del self.block._modules["beam_mask"]
        self.last_soft = self.last_keep = None

    def _mask_router_output(self, router: nn.Module, args: tuple, kwargs: dict, output: tuple) -> tuple:
        hidden = args[0] if args else next(iter(kwargs.values()))
        at_logits, at_weights, at_ids = self.family.router_outputs
        logits, weights, ids = output[at_logits], output[at_weights], output[at_ids]
        if self.policy is None:
            routing = apply_head(
                self.head,
                hidden,
                weights,
                ids,
                self._token_threshold(ids.shape[0]),
                renormalize=self.config.renormalize,
                check_all_kept=hidden.device.type == "cpu" and not self.block.training,
            )
        else:
            keep = self.policy(hidden.reshape(-1, self.hidden_size), logits, weights, ids)
            routing = apply_keep(weights, ids, keep, renormalize=self.config.renormalize)
        self.last_soft = routing.soft if self.block.training else None
        self.last_keep = routing.keep.detach()
        for sink in self.sinks:
            sink.add_routing(self.index, routing.keep, ids, routing.soft, weights, routing.all_kept)
        if not self.block.training and not routing.all_kept:
            ids = to_sentinel(ids, routing.keep, self.num_experts)
        masked = list(output)
        masked[at_weights], masked[at_ids] = routing.weights, ids
        return tuple(masked)

    def _token_threshold(self, tokens: int) -> float | Tensor:
        """The threshold of each of the block's `tokens` rows: one number, or a batch row's own
        (the block flattens [B, S] row-major, so token t belongs to row t // S)."""
        threshold = self.config.threshold if self.threshold is None else self.threshold
        if not isinstance(threshold, Tensor):
            return threshold
        rows = threshold.numel()
        if tokens % rows:
            raise BeamError(
                f"{self.name}: {rows} per-row thresholds for {tokens} tokens; give one threshold per "
                "sequence of the batch"
            )
        return threshold.reshape(-1).repeat_interleave(tokens // rows)

    def _route(self, hidden_states: Tensor) -> tuple:
        """The router's forward for a softmax Top-K router: natively where the `native` backend
        computes this block's experts (`native_router`). A bound method, like `_run_experts`, so
        that a deep copy of the model routes with the copy's router."""
        native = get_backend(self.config.backend, hidden_states.device).name == "native"
        return softmax_topk_route(self.router, hidden_states, allow_native=native)

    def _run_experts(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        backend = get_backend(self.config.backend, hidden_states.device)
        result = backend(ExpertWeights.of(self.experts), hidden_states, top_k_index, top_k_weights)
        for sink in self.sinks:
            sink.add_rows(self.index, result.rows, result.backend)
        return result.output
