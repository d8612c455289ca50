"""MoE-layer FLOPs per token: routed experts, shared experts, router and mask head, base vs BEAM.

Convention: 2 FLOPs per multiply-add of a matrix product; elementwise work (the SwiGLU activation
and product, the router's softmax/sigmoid and top-k, the weighted sum of expert outputs, biases)
is not counted. A routed SwiGLU expert of hidden size H and intermediate size I costs
2 * (H * 2I + I * H) = 6HI FLOPs per token; the router and the mask head cost 2HE each.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from beam_moe.errors import BeamError
from beam_moe.presets import MoEPreset, get_preset

CONVENTION = (
    "2 FLOPs per multiply-add of every matrix product (routed experts, shared experts and their gate, "
    "router, mask head); elementwise work (SwiGLU activation and product, softmax/sigmoid, top-k, "
    "weighted sum of expert outputs, biases) not counted; per token, summed over MoE layers"
)


@dataclass(frozen=True)
class MoELayerShape:
    """What one MoE layer costs per token, in multiply-adds (MACs).

    expert_macs: one routed expert (gate/up and down projections).
    shared_macs: all shared experts together, with their gate where the family has one; 0 if none.
    """

    hidden_size: int
    num_experts: int
    top_k: int
    expert_macs: int
    shared_macs: int

    @property
    def router_macs(self) -> int:
        return self.hidden_size * self.num_experts

    @property
    def mask_head_macs(self) -> int:
        return self.hidden_size * self.num_experts

    @classmethod
    def of_preset(cls, preset: MoEPreset) -> MoELayerShape:
        h = preset.hidden_size
        return cls(
            hidden_size=h,
            num_experts=preset.num_experts,
            top_k=preset.top_k,
            expert_macs=3 * h * preset.expert_intermediate,
            shared_macs=3 * h * preset.shared_intermediate,
        )


def preset_shapes(name: str) -> list[MoELayerShape]:
    """One shape per MoE layer of a preset: a real model's layer sizes (`beam_moe.presets`)."""
    preset = get_preset(name)
    return [MoELayerShape.of_preset(preset)] * preset.moe_layers


def model_shapes(model: nn.Module) -> list[MoELayerShape]:
    """One shape per MoE block of a transformers model, read from its parameter shapes (meta tensors work).

    Shared experts are every linear layer of the block outside the router, the routed experts and
    the mask head (Qwen2-MoE's shared expert and its sigmoid gate, DeepSeek's shared MLP).
    """
    from beam_moe.experts import ExpertWeights
    from beam_moe.families import family_for

    family = family_for(model)
    shapes = []
    for _, block in family.find_blocks(model):
        router = family.router(block)
        weights = ExpertWeights.of(family.experts(block))
        num_experts, hidden = router.weight.shape
        expert_macs = (weights.up[0].numel() + weights.down[0].numel()) if num_experts else 0
        skip = (family.router_attr, family.experts_attr, "beam_mask")
        shared = sum(
            module.weight.numel()
            for name, module in block.named_modules()
            if isinstance(module, nn.Linear) and name and name.split(".")[0] not in skip
        )
        shapes.append(MoELayerShape(int(hidden), int(num_experts), int(router.top_k), expert_macs, shared))
    return shapes


def folder_shapes(path: str | Path, base: str | Path | None = None) -> tuple[list[MoELayerShape], str]:
    """Shapes of a model folder, or of an adapter folder's base model (or `base`), built on the meta device.

    Returns (shapes, the model's name or path). No weights are read.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from beam_moe.adapter import CONFIG_FILE, read_adapter_config

    path = Path(path)
    if not path.exists():
        raise BeamError(f"{path} does not exist (expected a model folder or a BEAM adapter folder)")
    name = str(path)
    if base is not None:
        name = str(base)
    elif (path / CONFIG_FILE).is_file():
        name = read_adapter_config(path)["base"].get("name_or_path") or ""
        if not name:
            raise BeamError(f"the adapter at {path} does not name its base model; pass --model")
    from beam_moe.base_models import model_source

    name, is_local = model_source(name)
    try:
        config = AutoConfig.from_pretrained(name, local_files_only=is_local)
    except (OSError, ValueError) as e:
        raise BeamError(f"could not read a model config from {name!r}: {e}") from e
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return model_shapes(model), name


@dataclass(frozen=True)
class LayerFlops:
    """FLOPs per token of one MoE layer."""

    avg_k: float
    routed: float
    shared: float
    router: float
    mask_head: float

    @property
    def total(self) -> float:
        return self.routed + self.shared + self.router + self.mask_head

    @property
    def experts(self) -> float:
        return self.routed + self.shared

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "experts": self.experts, "total": self.total}


def layer_flops(shape: MoELayerShape, avg_k: float, mask_head: bool) -> LayerFlops:
    return LayerFlops(
        avg_k=float(avg_k),
        routed=2.0 * avg_k * shape.expert_macs,
        shared=2.0 * shape.shared_macs,
        router=2.0 * shape.router_macs,
        mask_head=2.0 * shape.mask_head_macs if mask_head else 0.0,
    )


def _sum(layers: Sequence[LayerFlops]) -> dict[str, float]:
    keys = ("routed", "shared", "router", "mask_head", "experts", "total")
    return {key: float(sum(getattr(layer, key) for layer in layers)) for key in keys}


def _reduction(base: float, new: float) -> float:
    return 1.0 - new / base if base else 0.0


def flops_report(
    shapes: Sequence[MoELayerShape],
    avg_k: float | Sequence[float | None],
    *,
    mask_head: bool = True,
    source: str = "",
) -> dict[str, Any]:
    """FLOPs per token of the MoE layers at Top-K ("base") and at `avg_k` kept experts ("masked").

    `avg_k` is one number for every layer, or one per layer (None: the layer has no mask and
    computes all K). `mask_head=False` counts a policy that needs no mask head (the baselines).
    `moe_flops_reduction` counts everything (router and mask head included); `expert_flops_reduction`
    counts the experts only (the paper's arithmetic, e.g. 1 - 1.23/8 for Qwen3-30B-A3B).
    `max_reduction` is the reduction when every routed expert is masked (Avg-K 0).
    """
    if not shapes:
        raise BeamError("no MoE layers to count")
    per_layer_k = [avg_k] * len(shapes) if isinstance(avg_k, (int, float)) else list(avg_k)
    if len(per_layer_k) != len(shapes):
        raise BeamError(f"got {len(per_layer_k)} per-layer Avg-K values for {len(shapes)} MoE layers")
    for shape, k in zip(shapes, per_layer_k, strict=True):
        if k is not None and not (0.0 <= float(k) <= shape.top_k):
            raise BeamError(f"Avg-K must lie between 0 and Top-K = {shape.top_k}, got {k}")
    base = [layer_flops(s, s.top_k, mask_head=False) for s in shapes]
    masked = [
        layer_flops(s, s.top_k if k is None else float(k), mask_head=mask_head and k is not None)
        for s, k in zip(shapes, per_layer_k, strict=True)
    ]
    floor = [
        layer_flops(s, 0.0 if k is not None else s.top_k, mask_head=mask_head and k is not None)
        for s, k in zip(shapes, per_layer_k, strict=True)
    ]
    base_sum, masked_sum, floor_sum = _sum(base), _sum(masked), _sum(floor)
    kept = [s.top_k if k is None else float(k) for s, k in zip(shapes, per_layer_k, strict=True)]
    first = shapes[0]
    return {
        "source": source,
        "convention": CONVENTION,
        "moe_layers": len(shapes),
        "hidden_size": first.hidden_size,
        "num_experts": first.num_experts,
        "top_k": first.top_k,
        "expert_flops": 2.0 * first.expert_macs,
        "shared_flops": 2.0 * first.shared_macs,
        "avg_k": sum(kept) / len(kept),
        "mask_head": mask_head,
        "base": base_sum,
        "masked": masked_sum,
        "moe_flops_reduction": _reduction(base_sum["total"], masked_sum["total"]),
        "expert_flops_reduction": _reduction(base_sum["experts"], masked_sum["experts"]),
        "max_reduction": _reduction(base_sum["total"], floor_sum["total"]),
        "max_expert_reduction": _reduction(base_sum["experts"], floor_sum["experts"]),
        "per_layer": [
            {"layer": i, "base": b.to_dict(), "masked": m.to_dict()}
            for i, (b, m) in enumerate(zip(base, masked, strict=True))
        ],
    }


def measured_flops(model: nn.Module, per_layer: Mapping[str, float], *, mask_head: bool) -> dict[str, Any]:
    """`flops_report` of `model` at measured per-layer Avg-K (by block name, e.g. `PerplexityResult.per_layer`).

    MoE blocks without a measurement (no mask attached) count all K experts and no mask head.
    """
    from beam_moe.families import family_for

    names = [name for name, _ in family_for(model).find_blocks(model)]
    unknown = sorted(set(per_layer) - set(names))
    if unknown:
        raise BeamError(f"per-layer Avg-K for blocks this model does not have: {unknown[:3]}")
    source = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    return flops_report(
        model_shapes(model), [per_layer.get(n) for n in names], mask_head=mask_head, source=source
    )
