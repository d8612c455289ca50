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
    "qwen3_next": dict(
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        num_experts=8,
        num_experts_per_tok=2,
        head_dim=16,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        layer_types=["linear_attention", "full_attention"],
    ),
    "glm4_moe": dict(
        moe_intermediate_size=32,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=0,
        head_dim=16,
        routed_scaling_factor=1.5,
        norm_topk_prob=True,
    ),
    "glm4_moe_lite": dict(
        moe_intermediate_size=32,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        mlp_layer_types=["sparse", "sparse"],
    ),
    "ernie4_5_moe": dict(
        moe_intermediate_size=32,
        moe_num_experts=8,
        moe_k=2,
        moe_num_shared_experts=1,
        moe_layer_start_index=0,
        moe_layer_interval=1,
        head_dim=16,
    ),
    "minimax": dict(
        num_local_experts=8,
        num_experts_per_tok=2,
        head_dim=16,
        layer_types=["linear_attention", "full_attention"],
    ),
    "minimax_m2": dict(num_local_experts=8, num_experts_per_tok=2, head_dim=16),
    "phimoe": dict(num_local_experts=8, num_experts_per_tok=2),
    "granitemoe": dict(num_local_experts=8, num_experts_per_tok=2),
    "granitemoeshared": dict(num_local_experts=8, num_experts_per_tok=2, shared_intermediate_size=64),
    "hunyuan_v1_moe": dict(num_experts=8, moe_topk=2, head_dim=16),
    "dots1": dict(
        moe_intermediate_size=32,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=0,
        head_dim=16,
        layer_types=["full_attention", "full_attention"],
        max_window_layers=2,
    ),
    "flex_olmo": dict(num_experts=8, num_experts_per_tok=2),
    "lfm2_moe": dict(
        moe_intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=2,
        num_dense_layers=0,
        layer_types=["full_attention", "conv"],
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


CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
BYTE_VOCAB_SIZE = 261  # 256 bytes + <pad> <s> </s> <|im_start|> <|im_end|>


def byte_tokenizer():
    """A byte-level tokenizer (one token per UTF-8 byte) with a ChatML chat template, built offline.

    Token ids: 0 <pad>, 1 <s>, 2 </s>, 3 <|im_start|>, 4 <|im_end|>, then the 256 bytes. Use it with
    models whose vocab_size is at least BYTE_VOCAB_SIZE.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    byte_tokens = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(specials)}
    vocab.update({token: len(specials) + i for i, token in enumerate(byte_tokens)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        chat_template=CHAT_TEMPLATE,
    )


def save_tiny(model_type: str, path, seed: int = 0, **overrides: Any):
    """Write a tiny `model_type` model with the byte tokenizer to `path` (a complete model folder)."""
    overrides.setdefault("vocab_size", BYTE_VOCAB_SIZE)
    model = tiny_model(model_type, seed=seed, **overrides)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return model
