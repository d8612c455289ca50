"""Test helpers that build expectations independently of beam_moe's own routing code."""

import torch
from torch import nn

from beam_moe.adapters import family_for


def randomize_heads(model: nn.Module, seed: int, std: float = 0.2) -> None:
    """Give every mask head random weights, so that roughly half of the Top-K slots are masked.

    A router-aware head gets a zero router term (scale and offset 0), so that z = x · W_m as for
    the paper's head and the expectations below hold for both; tests/test_router_head.py covers
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
    """Hook `base`'s routers so that its own experts implementation gets weights g * keep, ids unchanged.

    `heads` maps block names to mask head weights [E, H]. Returns the hook handles.
    """
    family = family_for(base)
    handles = []
    for name, block in family.find_blocks(base):
        weight = heads[name]

        def hook(module, args, output, weight=weight):
            x = args[0].reshape(-1, weight.shape[1]).float()
            _, at_weights, at_ids = family.router_outputs
            g, ids = output[at_weights], output[at_ids]
            z = (x @ weight.float().T).gather(1, ids)
            keep = torch.sigmoid(z) >= threshold
            masked = list(output)
            masked[at_weights] = g * keep.to(g.dtype)
            return tuple(masked)

        handles.append(family.router(block).register_forward_hook(hook))
    return handles


def straight_through_reference(base, heads, threshold=0.5):
    """Hook `base`'s routers with the paper's straight-through mask on leaf head weights [E, H].

    Weights g * (keep + s - s.detach()) with s = sigmoid(z[ids]), independently of beam_moe's
    routing, so that a gradient to `heads` is what BEAM's heads should get. Returns the hook handles.
    """
    family = family_for(base)
    handles = []
    for name, block in family.find_blocks(base):
        weight = heads[name]

        def hook(module, args, output, weight=weight):
            x = args[0].reshape(-1, weight.shape[1]).float()
            _, at_weights, at_ids = family.router_outputs
            g, ids = output[at_weights], output[at_ids]
            soft = torch.sigmoid((x @ weight.T).gather(1, ids))
            hard = (soft >= threshold).float() + soft - soft.detach()
            masked = list(output)
            masked[at_weights] = g * hard.to(g.dtype)
            return tuple(masked)

        handles.append(family.router(block).register_forward_hook(hook))
    return handles
