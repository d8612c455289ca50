"""Model families BEAM attaches to, one small adapter file each."""

from __future__ import annotations

from torch import nn

from beam_moe.adapters import (
    deepseek_v2,
    deepseek_v3,
    dots1,
    ernie4_5_moe,
    flex_olmo,
    glm4_moe,
    glm4_moe_lite,
    gpt_oss,
    granitemoe,
    granitemoeshared,
    hunyuan_v1_moe,
    lfm2_moe,
    minimax,
    minimax_m2,
    mixtral,
    olmoe,
    phimoe,
    qwen2_moe,
    qwen3_moe,
    qwen3_next,
)
from beam_moe.adapters.base import MoEFamily
from beam_moe.errors import BeamError

FAMILIES: dict[str, MoEFamily] = {
    module.FAMILY.model_type: module.FAMILY
    for module in (
        # The paper's models and the other common MoE families first.
        qwen3_moe,
        qwen2_moe,
        deepseek_v2,
        deepseek_v3,
        olmoe,
        mixtral,
        gpt_oss,
        # Newer families that follow the same router/experts split.
        qwen3_next,
        glm4_moe,
        glm4_moe_lite,
        ernie4_5_moe,
        minimax,
        minimax_m2,
        phimoe,
        granitemoe,
        granitemoeshared,
        hunyuan_v1_moe,
        dots1,
        flex_olmo,
        lfm2_moe,
    )
}


def model_type_of(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def family_for(model: nn.Module) -> MoEFamily:
    """The adapter for `model`, or a BeamError that names the supported families."""
    model_type = model_type_of(model)
    if model_type not in FAMILIES:
        raise BeamError(
            f"beam-moe does not support model type {model_type!r} ({type(model).__name__}); "
            f"supported families: {', '.join(FAMILIES)}"
        )
    return FAMILIES[model_type]


__all__ = ["FAMILIES", "MoEFamily", "family_for", "model_type_of"]
