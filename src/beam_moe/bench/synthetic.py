"""Real-size MoE layers and models with random weights, for speed measurements.

Speed depends on shapes, not on what the weights learned, so the presets' layer sizes with random
weights are enough: `preset_config` builds a transformers config of a preset's family at its real
MoE sizes; `random_block` materialises one MoE block; `build_test_model` writes a few-layer model
folder and a BEAM adapter whose mask heads keep a chosen Avg-K, so that `beam-moe bench generate`
runs end to end on a machine without the real checkpoint.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from beam_moe.adapter import CONFIG_FILE, save_beam
from beam_moe.atomic import atomic_directory
from beam_moe.attach import attach, beam_stats, get_attachment
from beam_moe.config import BeamConfig
from beam_moe.errors import BeamError
from beam_moe.families import family_for
from beam_moe.outputs import check_output_folder
from beam_moe.presets import MoEPreset, get_preset
from beam_moe.tiny_models import BYTE_VOCAB_SIZE, byte_tokenizer, tiny_config

INIT_STD = 0.02

# Attention of the real models (heads, key/value heads, head size); other presets get H / 128 heads.
_ATTENTION: dict[str, tuple[int, int, int]] = {
    "qwen3-30b-a3b": (32, 4, 128),
    "qwen1.5-moe-a2.7b": (16, 16, 128),
    "olmoe-1b-7b": (16, 16, 128),
    "mixtral-8x7b": (32, 8, 128),
}


def _moe_sizes(preset: MoEPreset) -> dict[str, Any]:
    p = preset
    sizes: dict[str, dict[str, Any]] = {
        "qwen3_moe": dict(
            moe_intermediate_size=p.expert_intermediate,
            num_experts=p.num_experts,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        ),
        "qwen2_moe": dict(
            moe_intermediate_size=p.expert_intermediate,
            num_experts=p.num_experts,
            shared_expert_intermediate_size=p.shared_intermediate,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        ),
        "deepseek_v2": dict(
            moe_intermediate_size=p.expert_intermediate,
            n_routed_experts=p.num_experts,
            n_shared_experts=max(1, p.shared_intermediate // p.expert_intermediate),
            first_k_dense_replace=0,
            topk_method="greedy",
            n_group=1,
            topk_group=1,
            routed_scaling_factor=1.0,
        ),
        "olmoe": dict(intermediate_size=p.expert_intermediate, num_experts=p.num_experts),
        "mixtral": dict(intermediate_size=p.expert_intermediate, num_local_experts=p.num_experts),
    }
    if p.model_type not in sizes:
        raise BeamError(f"no synthetic config for model type {p.model_type!r}")
    return sizes[p.model_type]


def preset_config(preset: MoEPreset | str, num_layers: int = 1, **overrides: Any):
    """A transformers config of the preset's family with its real MoE sizes (byte vocabulary)."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    heads, kv_heads, head_dim = _ATTENTION.get(
        preset.name, (max(1, preset.hidden_size // 128), max(1, preset.hidden_size // 512), 128)
    )
    attention: dict[str, Any] = dict(
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim
    )
    if preset.model_type == "deepseek_v2":
        attention = dict(
            num_attention_heads=heads,
            num_key_value_heads=heads,
            kv_lora_rank=512,
            q_lora_rank=None,
            qk_rope_head_dim=64,
            qk_nope_head_dim=128,
            v_head_dim=128,
        )
    values: dict[str, Any] = {
        "hidden_size": preset.hidden_size,
        "intermediate_size": 4 * preset.hidden_size,
        "num_hidden_layers": num_layers,
        "num_experts_per_tok": preset.top_k,
        "vocab_size": BYTE_VOCAB_SIZE,
        "max_position_embeddings": 4096,
        "initializer_range": INIT_STD,
        **attention,
        **_moe_sizes(preset),
    }
    values.update(overrides)
    return tiny_config(preset.model_type, **values)


def random_block(
    config, dtype: torch.dtype, device: torch.device | str = "cpu", seed: int = 0
) -> tuple[nn.Module, nn.Module]:
    """(model skeleton on the meta device, its first MoE block with random weights on `device`).

    Only the block is materialised (N(0, 0.02) weights in `dtype`); the skeleton is what
    `family_for` needs to know the family.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
    family = family_for(skeleton)
    _, block = family.find_blocks(skeleton)[0]
    block.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for tensor in [*block.parameters(), *block.buffers()]:
            if tensor.is_floating_point():
                tensor.normal_(0.0, INIT_STD, generator=generator)
    return skeleton, block


def block_sharing_weights(
    source: nn.Module, config, replace: dict[str, nn.Parameter] | None = None
) -> nn.Module:
    """Another MoE block of the same family whose parameters are `source`'s (no copy), built
    from `config` (e.g. with another experts implementation); `replace` gives some parameters
    their own tensors (e.g. {"gate.weight": ...})."""
    replace = replace or {}
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    _, block = family_for(skeleton).find_blocks(skeleton)[0]
    for name, parameter in source.named_parameters():
        owner, _, attr = name.rpartition(".")
        block.get_submodule(owner).register_parameter(attr, replace.get(name, parameter))
    for name, buffer in source.named_buffers():
        owner, _, attr = name.rpartition(".")
        block.get_submodule(owner).register_buffer(attr, buffer)
    return block


def with_experts_implementation(config, implementation: str):
    config = copy.deepcopy(config)
    config._experts_implementation = implementation
    return config


def _is_test_model(folder: Path) -> bool:
    return (folder / "base" / "config.json").is_file() and (folder / "adapter" / CONFIG_FILE).is_file()


def build_test_model(
    output: str | Path,
    preset: MoEPreset | str = "qwen3-30b-a3b",
    num_layers: int = 4,
    avg_k: float = 1.23,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    calibration_tokens: int = 512,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write `output/base` (a transformers model folder: the preset's layer sizes, `num_layers`
    layers, random weights, byte tokenizer) and `output/adapter` (a BEAM adapter whose mask heads
    keep `avg_k` experts per token on average), atomically. Returns a summary.

    The heads are random linear maps plus one bias per layer, calibrated on random tokens so
    that each layer keeps the target share of its Top-K pairs. An earlier test model in `output`
    is replaced only with `overwrite` (`beam_moe.outputs`).
    """
    from transformers import AutoModelForCausalLM

    spec = get_preset(preset) if isinstance(preset, str) else preset
    if not 0 < avg_k <= spec.top_k:
        raise BeamError(
            f"--avg-k must lie in (0, {spec.top_k}] for {spec.name} (Top-{spec.top_k}), got {avg_k}"
        )
    if num_layers < 1:
        raise BeamError(f"--layers must be at least 1, got {num_layers}")
    check_output_folder(output, overwrite=overwrite, ours=_is_test_model, what="a beam-moe test model")
    torch.manual_seed(seed)
    config = preset_config(spec, num_layers=num_layers)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    output = Path(output).absolute()
    with atomic_directory(output, replace=True) as staging:
        model.save_pretrained(staging / "base")
        byte_tokenizer().save_pretrained(staging / "base")
        model.config._name_or_path = str(output / "base")
        attach(model, BeamConfig(bias=True, init="normal", init_std=INIT_STD))
        generator = torch.Generator().manual_seed(seed + 1)
        tokens = torch.randint(
            5, BYTE_VOCAB_SIZE, (max(1, calibration_tokens // 128), 128), generator=generator
        )
        per_layer = calibrate_heads(model, tokens, avg_k)
        save_beam(
            model,
            staging / "adapter",
            extra={
                "synthetic": {"preset": spec.name, "layers": num_layers, "target_avg_k": avg_k, "seed": seed}
            },
        )
    return {
        "base": str(output / "base"),
        "adapter": str(output / "adapter"),
        "preset": spec.name,
        "layers": num_layers,
        "target_avg_k": avg_k,
        "calibrated_avg_k": per_layer,
    }


def calibrate_heads(model: nn.Module, tokens: torch.Tensor, avg_k: float, passes: int = 3) -> list[float]:
    """Set each mask head's bias so that the layer keeps `avg_k` of its Top-K pairs on `tokens`.

    A layer's input depends on the earlier layers' masks, so the biases are refit a few times.
    Returns the Avg-K of each layer after the last pass.
    """
    attachment = get_attachment(model)
    layers = attachment.layers
    threshold = attachment.config.logit_threshold
    for _ in range(passes):
        with torch.no_grad(), beam_stats(model, record=True) as stats:
            model(tokens)
        for layer, records in zip(layers, stats.records, strict=True):
            soft = torch.cat([r.soft for r in records]).double().clamp(1e-12, 1 - 1e-12)
            z = torch.log(soft / (1 - soft)) - layer.head.bias.detach().double()[0]
            kept_share = avg_k / z.shape[1]
            cut = torch.quantile(z.flatten(), 1 - kept_share)
            with torch.no_grad():
                layer.head.bias.fill_(float(threshold - cut) + 1e-6)
    with torch.no_grad(), beam_stats(model) as stats:
        model(tokens)
    return [round(v, 4) for v in stats.per_layer.values()]
