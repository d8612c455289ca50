"""What trains (`--train`): the mask heads only, plus the routers, everything, or LoRA adapters.

Frozen parameters have requires_grad=False, so they get no gradients and the optimizer holds no
state for them. The mask heads always train.

LoRA (PEFT) targets every nn.Linear inside the attention modules and the shared experts, and the
3D expert tensors of transformers 5.x (`experts.gate_up_proj`, `experts.down_proj`) through
PEFT's `target_parameters` (a low-rank update per expert). The routers stay frozen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from beam_moe.attach import get_attachment, mask_parameters
from beam_moe.errors import BeamError, require


@dataclass
class Trainable:
    """The model's trainable parameters in two groups, and the PEFT wrapper when there is one."""

    mask: list[nn.Parameter]
    model: list[nn.Parameter]
    peft_model: Any = None
    router_terms: list[nn.Parameter] = field(default_factory=list)

    def param_groups(
        self, lr: float, model_lr: float, weight_decay: float, router_term_lr_ratio: float = 1.0
    ) -> list[dict[str, Any]]:
        """Optimizer groups: the heads (no weight decay, which would pull them back to keep-all),
        a router-aware head's scalars (at `router_term_lr_ratio` x lr) and the model's own weights."""
        router_terms = {id(p) for p in self.router_terms}
        linear = [p for p in self.mask if id(p) not in router_terms]
        groups = [{"params": linear, "lr": lr, "weight_decay": 0.0, "name": "mask"}]
        if self.router_terms:
            groups.append(
                {
                    "params": self.router_terms,
                    "lr": lr * router_term_lr_ratio,
                    "weight_decay": 0.0,
                    "name": "mask_router",
                }
            )
        if self.model:
            groups.append(
                {"params": self.model, "lr": model_lr, "weight_decay": weight_decay, "name": "model"}
            )
        return groups


def router_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for layer in get_attachment(model).layers for p in layer.router.parameters()]


def select_trainable(model: nn.Module, mode: str, lora_rank: int = 16, lora_alpha: float = 32.0) -> Trainable:
    """Freeze what `mode` leaves alone (in place) and return what trains."""
    model.requires_grad_(mode == "full")
    peft_model = None
    if mode == "lora":
        peft_model = add_lora(model, lora_rank, lora_alpha)
    heads = mask_parameters(model)
    for p in heads:
        p.requires_grad_(True)
    if mode == "mask+router":
        for p in router_parameters(model):
            p.requires_grad_(True)
    head_ids = {id(p) for p in heads}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    router_terms = [
        p
        for layer in get_attachment(model).layers
        if layer.head.router_aware
        for p in (layer.head.router_scale, layer.head.router_offset)
    ]
    return Trainable(mask=heads, model=others, peft_model=peft_model, router_terms=router_terms)


def lora_targets(model: nn.Module) -> tuple[list[str], list[str]]:
    """(module names, parameter names) that LoRA adapts: attention and expert projections."""
    attachment = get_attachment(model)
    family = attachment.family
    modules = []
    for name, module in model.named_modules():
        in_attention = ".self_attn." in f".{name}."
        in_shared = any(f".{attr}." in f"{name}." for attr in family.shared_expert_attrs)
        if isinstance(module, nn.Linear) and (in_attention or in_shared) and ".beam_mask" not in name:
            modules.append(name)
    parameters = []
    for layer in attachment.layers:
        experts_name = next(n for n, m in model.named_modules() if m is layer.experts)
        for param in ("gate_up_proj", "up_proj", "down_proj"):
            if isinstance(getattr(layer.experts, param, None), nn.Parameter):
                parameters.append(f"{experts_name}.{param}")
    return modules, parameters


def add_lora(model: nn.Module, rank: int, alpha: float) -> Any:
    """Wrap `model` with PEFT LoRA in place (its modules are adapted; the returned PeftModel saves them)."""
    peft = require("peft", "train", "--train lora")
    modules, parameters = lora_targets(model)
    if not modules and not parameters:
        raise BeamError("found no attention or expert projections to put LoRA on in this model")
    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=modules, target_parameters=parameters
    )
    return peft.get_peft_model(model, config)
