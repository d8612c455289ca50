"""Model families BEAM attaches to, one small adapter file each."""

from __future__ import annotations

from torch import nn

from beam_moe.adapters import deepseek_v2, deepseek_v3, gpt_oss, mixtral, olmoe, qwen2_moe, qwen3_moe
from beam_moe.adapters.base import MoEFamily
from beam_moe.errors import BeamError

FAMILIES: dict[str, MoEFamily] = {
    module.FAMILY.model_type: module.FAMILY
    for module in (qwen3_moe, qwen2_moe, deepseek_v2, deepseek_v3, olmoe, mixtral, gpt_oss)
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
