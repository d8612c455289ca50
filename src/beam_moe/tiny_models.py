"""Tiny random configs of every supported family: real transformers classes, built in milliseconds."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

_COMMON: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
_DEEPSEEK: dict[str, Any] = dict(
    moe_intermediate_size=32,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    n_shared_experts=1,
    first_k_dense_replace=0,
    kv_lora_rank=16,
    q_lora_rank=None,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
)
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen3_moe": dict(
        moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, head_dim=16
    ),
    "qwen2_moe": dict(
        moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, shared_expert_intermediate_size=64
    ),
    "deepseek_v2": dict(_DEEPSEEK, topk_method="group_limited_greedy", routed_scaling_factor=1.5),
    "deepseek_v3": dict(_DEEPSEEK, routed_scaling_factor=2.5, norm_topk_prob=True),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2),
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "gpt_oss": dict(
        num_local_experts=8,
        num_experts_per_tok=2,
        head_dim=16,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=16,
    ),
}


def tiny_config(model_type: str, **overrides: Any) -> PretrainedConfig:
    """A tiny random config of `model_type` (2 layers, hidden 64, 8 experts, top-2 unless overridden)."""
    return AutoConfig.for_model(model_type, **{**_COMMON, **TINY_CONFIGS[model_type], **overrides})


def tiny_model(
    model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any
) -> PreTrainedModel:
    """A tiny causal LM of `model_type` with seeded random weights, in eval mode."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=dtype)
    return model.eval()
