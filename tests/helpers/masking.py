"""Test helpers that build expectations independently of beam_moe's own routing code."""

import torch
from torch import nn

from beam_moe.families import family_for


def randomize_heads(model: nn.Module, seed: int, std: float = 0.2) -> None:
    """Give every mask head random weights, so that roughly half of the Top-K slots are masked.

    A router-aware head gets a zero router term (scale and offset 0), so that z = x · W_m as for
    the paper's head and the expectations below hold for both; tests/unit/test_router_head.py covers
    the router term.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            head = getattr(module, "beam_mask", None)
            if head is not None:
                head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * std)
                if head.router_aware:
                    head.router_scale.zero_()
                    head.router_offset.zero_()


def masked_reference(base: nn.Module, heads: dict[str, torch.Tensor], threshold: float = 0.5) -> list:
    """Hook `base`'s routers so that its own experts implementation gets weights g * keep, ids
    unchanged, independently of beam_moe's routing; returns the hook handles.

    `heads` maps block names to mask head weights [E, H] (the paper's head, z = x · W_m). The
    weights are g * (keep + s - s.detach()) with s = sigmoid(z[ids]): exactly g * keep in the
    forward pass, and the paper's straight-through gradient to `heads` (leaf tensors) backward.
    """
    family = family_for(base)
    handles = []
    for name, block in family.find_blocks(base):
        weight = heads[name]

        def hook(module, args, output, weight=weight):
            x = args[0].reshape(-1, weight.shape[1]).float()
            _, at_weights, at_ids = family.router_outputs
            g, ids = output[at_weights], output[at_ids]
            soft = torch.sigmoid((x @ weight.float().T).gather(1, ids))
            hard = (soft >= threshold).float() + soft - soft.detach()
            masked = list(output)
            masked[at_weights] = g * hard.to(g.dtype)
            return tuple(masked)

        handles.append(family.router(block).register_forward_hook(hook))
    return handles
