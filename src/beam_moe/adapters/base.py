"""What distinguishes one MoE family from another, as far as BEAM is concerned."""

from __future__ import annotations

import operator
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class MoEFamily:
    """A transformers MoE family whose blocks follow the 5.x router/experts split.

    The router (`block.<router_attr>`) returns logits [T, E], top-k weights [T, K] and top-k ids
    [T, K] (at positions `router_outputs`, in that order), has a weight [E, H] at `router_weight`
    and a `top_k`; the experts (`block.<experts_attr>`) take `(hidden [T, H], ids [T, K],
    weights [T, K])`. Shared experts are left alone: the block's own forward keeps running them.
    """

    model_type: str
    block_classes: tuple[str, ...]
    description: str
    router_attr: str = "gate"
    experts_attr: str = "experts"
    shared_expert_attrs: tuple[str, ...] = ()
    router_weight_attr: str = "weight"
    router_outputs: tuple[int, int, int] = (0, 1, 2)

    def is_block(self, module: nn.Module) -> bool:
        return type(module).__name__ in self.block_classes

    def router(self, block: nn.Module) -> nn.Module:
        return getattr(block, self.router_attr)

    def router_weight(self, router: nn.Module) -> nn.Parameter:
        return operator.attrgetter(self.router_weight_attr)(router)

    def experts(self, block: nn.Module) -> nn.Module:
        return getattr(block, self.experts_attr)

    def shared_experts(self, block: nn.Module) -> list[nn.Module]:
        return [
            getattr(block, name)
            for name in self.shared_expert_attrs
            if getattr(block, name, None) is not None
        ]

    def find_blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """(qualified name, block) for every MoE block of the model, in model order."""
        return [(name, module) for name, module in model.named_modules() if self.is_block(module)]
