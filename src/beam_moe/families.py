"""Where a model family is declared: one `MoEFamily` row per transformers MoE family BEAM attaches to.

Families differ only in these declarations (attribute names and the router's output order); BEAM's
logic lives once, in `attach` and `layer`. Adding a family is adding a row, like PEFT's table of
target modules.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

from torch import nn

from beam_moe.errors import BeamError


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
    router_kind: str | None = None
    """"softmax_topk" where the router's forward is transformers' softmax Top-K router (Qwen2/3-MoE's):
    then a native op may compute it (`native_router`); None: the router's own forward always runs."""

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


_DECLARED: tuple[MoEFamily, ...] = (
    # The paper's models and the other common MoE families first.
    MoEFamily(
        model_type="qwen3_moe",
        block_classes=("Qwen3MoeSparseMoeBlock",),
        description="Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): softmax top-k, norm_topk_prob, no shared experts",
        router_kind="softmax_topk",
    ),
    MoEFamily(
        model_type="qwen2_moe",
        block_classes=("Qwen2MoeSparseMoeBlock",),
        description="Qwen2-MoE / Qwen1.5-MoE-A2.7B: softmax top-k, one shared expert behind a sigmoid gate",
        shared_expert_attrs=("shared_expert",),
        router_kind="softmax_topk",
    ),
    MoEFamily(
        model_type="deepseek_v2",
        block_classes=("DeepseekV2Moe",),
        description="DeepSeek-V2 / V2-Lite: softmax, greedy or group-limited top-k, routed scaling, shared experts",
        shared_expert_attrs=("shared_experts",),
    ),
    MoEFamily(
        model_type="deepseek_v3",
        block_classes=("DeepseekV3MoE",),
        description="DeepSeek-V3 / R1 / Kimi-K2: sigmoid scores, correction bias, group-limited top-k, shared experts",
        shared_expert_attrs=("shared_experts",),
    ),
    MoEFamily(
        model_type="olmoe",
        block_classes=("OlmoeSparseMoeBlock",),
        description="OLMoE-1B-7B: softmax top-k without renormalisation, no shared experts",
        router_kind="softmax_topk",
    ),
    MoEFamily(
        model_type="mixtral",
        block_classes=("MixtralSparseMoeBlock",),
        description="Mixtral-8x7B / 8x22B: softmax top-2, renormalised, no shared experts",
    ),
    MoEFamily(
        model_type="gpt_oss",
        block_classes=("GptOssMLP",),
        description="gpt-oss-20b / 120b: top-k on biased logits then softmax, interleaved clamped SwiGLU with biases",
        router_attr="router",
    ),
    # Newer families that follow the same router/experts split.
    MoEFamily(
        model_type="qwen3_next",
        block_classes=("Qwen3NextSparseMoeBlock",),
        description="Qwen3-Next-80B-A3B: hybrid linear attention, 512 experts top-10, one gated shared expert",
        shared_expert_attrs=("shared_expert",),
        router_kind="softmax_topk",
    ),
    MoEFamily(
        model_type="glm4_moe",
        block_classes=("Glm4MoeMoE",),
        description="GLM-4.5 / 4.6: sigmoid scores, correction bias, group-limited top-k, routed scaling, shared experts",
        shared_expert_attrs=("shared_experts",),
    ),
    MoEFamily(
        model_type="glm4_moe_lite",
        block_classes=("Glm4MoeLiteMoE",),
        description="GLM-4.7-Flash: MLA attention, sigmoid-scored top-k with correction bias, shared experts",
        shared_expert_attrs=("shared_experts",),
    ),
    MoEFamily(
        model_type="ernie4_5_moe",
        block_classes=("Ernie4_5_MoeSparseMoeBlock",),
        description="ERNIE-4.5 MoE (21B-A3B, 300B-A47B): softmax top-k with correction bias, shared experts",
        shared_expert_attrs=("shared_experts",),
    ),
    MoEFamily(
        model_type="minimax",
        block_classes=("MiniMaxSparseMoeBlock",),
        description="MiniMax-Text-01: lightning (linear) attention hybrid, softmax top-2",
    ),
    MoEFamily(
        model_type="minimax_m2",
        block_classes=("MiniMaxM2SparseMoeBlock",),
        description="MiniMax-M2: sigmoid-scored top-k with correction bias, no shared experts",
    ),
    MoEFamily(
        model_type="phimoe",
        block_classes=("PhimoeSparseMoeBlock",),
        description="Phi-3.5-MoE: SparseMixer top-2 routing, no shared experts",
        router_attr="router",
    ),
    MoEFamily(
        model_type="granitemoe",
        block_classes=("GraniteMoeMoE",),
        description="IBM Granite 3.x MoE: softmax top-k; the router returns (ids, weights, logits)",
        router_attr="router",
        router_outputs=(2, 1, 0),
    ),
    MoEFamily(
        model_type="granitemoeshared",
        block_classes=("GraniteMoeSharedMoE",),
        description="IBM Granite MoE with a shared MLP beside the routed experts; router returns (ids, weights, logits)",
        router_attr="router",
        router_outputs=(2, 1, 0),
    ),
    MoEFamily(
        model_type="hunyuan_v1_moe",
        block_classes=("HunYuanMoEV1Moe",),
        description="Hunyuan-A13B: softmax top-k (router weight at gate.wg), a shared MLP beside the experts",
        router_weight_attr="wg.weight",
        shared_expert_attrs=("shared_mlp",),
    ),
    MoEFamily(
        model_type="dots1",
        block_classes=("Dots1MoE",),
        description="dots.llm1: sigmoid-scored top-k with correction bias, shared experts",
        shared_expert_attrs=("shared_experts",),
    ),
    MoEFamily(
        model_type="flex_olmo",
        block_classes=("FlexOlmoSparseMoeBlock",),
        description="FlexOlmo: OLMoE-style softmax top-k over independently trained experts",
        router_kind="softmax_topk",
    ),
    MoEFamily(
        model_type="lfm2_moe",
        block_classes=("Lfm2MoeSparseMoeBlock",),
        description="LFM2-8B-A1B: conv/attention hybrid, sigmoid top-k with expert bias",
    ),
)

FAMILIES: dict[str, MoEFamily] = {family.model_type: family for family in _DECLARED}
"""Every supported family by its transformers `model_type`, in the order docs list them."""


def model_type_of(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def family_for(model: nn.Module) -> MoEFamily:
    """The declaration for `model`, or a BeamError that names the supported families."""
    model_type = model_type_of(model)
    if model_type not in FAMILIES:
        raise BeamError(
            f"beam-moe does not support model type {model_type!r} ({type(model).__name__}); "
            f"supported families: {', '.join(FAMILIES)}"
        )
    return FAMILIES[model_type]


__all__ = ["FAMILIES", "MoEFamily", "family_for", "model_type_of"]
