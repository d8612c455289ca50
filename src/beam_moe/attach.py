"""`attach` and `detach`: add BEAM mask heads to a transformers MoE model in place, and take them off;
`beam_stats`: count what they do."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from beam_moe.config import BeamConfig
from beam_moe.errors import BeamError
from beam_moe.families import MoEFamily, family_for
from beam_moe.identity import base_identity
from beam_moe.layer import BeamMoELayer
from beam_moe.mask import MaskHead, l1_regularizer
from beam_moe.routing import RoutingPolicy, keep_all
from beam_moe.stats import BeamStats, StatsSink
from beam_moe.threshold_curve import ThresholdCurve

_ATTR = "_beam_attachment"


@dataclass
class BeamAttachment:
    """What `attach` did to a model: enough to count, train, save and undo it.

    threshold_curve: the adapter's calibrated threshold -> Avg-K curve, set by `load_beam` and
    `from_pretrained` when the adapter has one; `beam_budget(model, avg_k=...)` reads budgets through it.
    """

    config: BeamConfig
    family: MoEFamily
    layers: list[BeamMoELayer]
    sinks: list[StatsSink] = field(default_factory=list)
    base: dict[str, Any] = field(default_factory=dict)
    threshold_curve: ThresholdCurve | None = None


def attach(model: nn.Module, config: BeamConfig | None = None) -> nn.Module:
    """Give every MoE block of `model` a mask head (`block.beam_mask`) and masked routing; returns `model`.

    The mask heads are the only new parameters; nothing is frozen or unfrozen here.
    """
    config = config or BeamConfig()
    if hasattr(model, _ATTR):
        raise BeamError("this model already has BEAM mask heads; call beam_moe.detach(model) first")
    family = family_for(model)
    blocks = select_blocks(model, family, config.layers)
    sinks: list[StatsSink] = []
    layers = [BeamMoELayer(i, name, block, family, config, sinks) for i, (name, block) in enumerate(blocks)]
    attachment = BeamAttachment(
        config=config, family=family, layers=layers, sinks=sinks, base=base_identity(model, family)
    )
    for layer in layers:
        head = MaskHead(
            layer.hidden_size,
            layer.num_experts,
            bias=config.bias,
            init=config.init,
            init_std=config.init_std,
            router_aware=config.head == "router",
            device=family.router_weight(layer.router).device,
        )
        head.train(layer.block.training)
        layer.install(head)
    object.__setattr__(model, _ATTR, attachment)
    return model


def select_blocks(
    model: nn.Module, family: MoEFamily, layers: list[int] | None
) -> list[tuple[str, nn.Module]]:
    """The MoE blocks BEAM attaches to: all of them, or those at the given indices."""
    blocks = family.find_blocks(model)
    if not blocks:
        raise BeamError(
            f"found no MoE blocks ({', '.join(family.block_classes)}) in this {family.model_type} model; "
            "is every layer dense (e.g. mlp_only_layers or first_k_dense_replace covering all layers)?"
        )
    if layers is None:
        return blocks
    bad = [i for i in layers if i >= len(blocks)]
    if bad:
        raise BeamError(
            f"layers {bad} do not exist: the model has {len(blocks)} MoE blocks (0..{len(blocks) - 1})"
        )
    return [blocks[i] for i in layers]


def detach(model: nn.Module) -> nn.Module:
    """Remove the mask heads and hooks; the model is again exactly the base model. Returns `model`."""
    attachment = get_attachment(model)
    for layer in attachment.layers:
        layer.remove()
    object.__delattr__(model, _ATTR)
    return model


def set_routing_policy(model: nn.Module, policy: RoutingPolicy | None) -> None:
    """Decide `keep` with `policy` instead of the mask heads (None restores the heads).

    Baselines (Top-K pruning, Top-P routing, threshold skipping, random masks) use this, so they
    run through the same sentinel path and counters as BEAM and skip the same compute.
    """
    for layer in get_attachment(model).layers:
        layer.policy = policy


@contextmanager
def disable_masks(model: nn.Module) -> Iterator[None]:
    """Run `model` as its base model (every Top-K expert kept) inside the block, like PEFT's
    `disable_adapter()`; the heads, or the routing policy set before, come back on exit, even on error.
    """
    layers = get_attachment(model).layers
    before = [layer.policy for layer in layers]
    set_routing_policy(model, keep_all)
    try:
        yield
    finally:
        for layer, policy in zip(layers, before, strict=True):
            layer.policy = policy


def is_attached(model: nn.Module) -> bool:
    return hasattr(model, _ATTR)


def get_attachment(model: nn.Module) -> BeamAttachment:
    try:
        return object.__getattribute__(model, _ATTR)
    except AttributeError:
        raise BeamError("this model has no BEAM mask heads; call beam_moe.attach(model) first") from None


def mask_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The mask heads' parameters, in layer order."""
    return [p for layer in get_attachment(model).layers for p in layer.head.parameters()]


def mask_regularizer(model: nn.Module, token_mask: Tensor | None = None) -> Tensor:
    """The paper's L_reg for the last training forward: mean of sigmoid(z_k) over tokens, Top-K slots and layers.

    `token_mask` (the batch's attention mask, [batch, seq]) restricts the mean to the real tokens,
    the ones Avg-K counts: padding would otherwise pull the penalty towards its own masks.
    """
    soft = [layer.last_soft for layer in get_attachment(model).layers if layer.last_soft is not None]
    if not soft:
        raise BeamError(
            "no training forward pass has been recorded: call model.train() and run a forward pass first"
        )
    if token_mask is not None:
        real = token_mask.reshape(-1).bool()
        if any(s.shape[0] != real.shape[0] for s in soft):
            raise BeamError(
                f"the token mask has {real.shape[0]} tokens but the last forward pass had {soft[0].shape[0]}"
            )
        if not real.any():
            return soft[0].new_zeros(())
        soft = [s[real.to(s.device)] for s in soft]
    return torch.stack([l1_regularizer(s) for s in soft]).mean()


@contextmanager
def beam_stats(model: nn.Module, record: bool = False) -> Iterator[BeamStats]:
    """Count BEAM's routing during the block: `with beam_stats(model) as s: model(**batch)`.

    With `record=True`, every layer's ids, keep mask and mask probabilities are kept on the CPU
    (`s.records[layer]`), for analysis plots.
    """
    attachment = get_attachment(model)
    stats = BeamStats(
        [layer.name for layer in attachment.layers], [layer.top_k for layer in attachment.layers], record
    )
    attachment.sinks.append(stats)
    try:
        yield stats
    finally:
        attachment.sinks.remove(stats)


def last_avg_k(model: nn.Module) -> float:
    """Avg-K of the last forward pass (kept routed experts per token, averaged over MoE layers)."""
    keeps = [layer.last_keep for layer in get_attachment(model).layers if layer.last_keep is not None]
    if not keeps:
        raise BeamError("no forward pass has been recorded since attach")
    return float(torch.stack([k.sum(dim=-1).float().mean() for k in keeps]).mean())
