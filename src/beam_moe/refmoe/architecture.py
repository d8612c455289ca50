"""The reference MoE's architecture: Qwen3-MoE (softmax Top-K, norm_topk_prob, no shared experts).

Fine-grained experts like Qwen3-30B-A3B's (many small experts, Top-8), scaled down so that it
pretrains on 2 CPU cores in about an hour and its bf16 weights stay small enough to commit.
docs/reference-moe.md gives the measurements behind the choice.
"""

from __future__ import annotations

from typing import Any

REFERENCE_SHAPE: dict[str, Any] = dict(
    vocab_size=8192,
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    num_experts=32,
    num_experts_per_tok=8,
    moe_intermediate_size=64,
)

_FIXED: dict[str, Any] = dict(
    norm_topk_prob=True,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    intermediate_size=512,  # the dense MLP size; unused, every layer is MoE
    hidden_act="silu",
    max_position_embeddings=512,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    router_aux_loss_coef=0.01,
    output_router_logits=False,
    use_sliding_window=False,
    attention_dropout=0.0,
    initializer_range=0.02,
)


def reference_config(special_ids: dict[str, int] | None = None, **overrides: Any):
    """A `Qwen3MoeConfig` of the reference shape; `overrides` change any field (for shape studies)."""
    from transformers import Qwen3MoeConfig

    ids = special_ids or {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    return Qwen3MoeConfig(**{**_FIXED, **REFERENCE_SHAPE, **ids, **overrides})


def parameter_counts(config) -> dict[str, int]:
    """Parameters of a config by part (tied embeddings counted once), without building the model."""
    h, layers, experts = config.hidden_size, config.num_hidden_layers, config.num_experts
    head_dim = config.head_dim
    attention = h * head_dim * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    attention += 2 * head_dim + 2 * h  # q/k norms, the two layer norms
    expert = 3 * h * config.moe_intermediate_size
    embeddings = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    total = embeddings + layers * (attention + experts * h + experts * expert) + h
    active = layers * (attention + experts * h + config.num_experts_per_tok * expert)
    return {
        "total": total,
        "embeddings": embeddings,
        "experts": layers * experts * expert,
        "active_non_embedding": active,
    }
