"""Every reach into vLLM's internals that the plugin makes, in one place.

The plugin extends vLLM's MoE runner from the inside: it reads private attributes, re-classes live
objects, replaces the runner's custom-op entry point and reads the step's attention metadata. None
of that is vLLM's public API, so each access is a small named function here; a new vLLM release
is checked against this module (and the supported range in `beam_moe.serving.vllm`, checked when
the plugin registers), not against the whole plugin.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.models.config import MODELS_CONFIG_MAP
from vllm.model_executor.models.utils import PPMissingLayer


def reclass(obj: Any, cls: type) -> None:
    """Turn a live vLLM object into `cls` (a subclass of its class) in place, so everything vLLM
    already did to it (weight loading, registration, parallel state) stays."""
    if not isinstance(obj, cls.__mro__[1]):
        raise TypeError(f"{type(obj).__name__} is not a {cls.__mro__[1].__name__}")
    obj.__class__ = cls


def shared_experts(runner: nn.Module) -> Any | None:
    """The MoE runner's shared-experts wrapper (`MoERunner._shared_experts`), or None."""
    return runner._shared_experts


def run_shared_experts(runner: nn.Module, hidden: Tensor) -> Tensor:
    """The shared experts on `hidden`, run now (not overlapped with the routed experts)."""
    return runner._shared_experts._layer(hidden)


def overlapped_shared_output(runner: nn.Module) -> Tensor:
    """The shared experts' output when vLLM ran them overlapped on another stream: wait, then read."""
    runner._shared_experts.wait()
    return runner._shared_experts.output


def topk_indices_dtype(runner: nn.Module) -> torch.dtype | None:
    """The id dtype the runner's quantisation method wants from the router."""
    return runner._quant_method.topk_indices_dtype


def use_moe_forward_op(runner: nn.Module) -> None:
    """Enter the runner through vLLM's opaque `moe_forward` custom ops (the `_shared` one when it has
    shared experts), so torch.compile never traces the data-dependent BEAM step."""
    ops = torch.ops.vllm
    runner._forward_entry = ops.moe_forward if shared_experts(runner) is None else ops.moe_forward_shared


def uses_expert_parallelism(runner: nn.Module) -> bool:
    """Expert parallelism or EPLB: experts live on other ranks (the plugin does not support it)."""
    return bool(runner.moe_config.moe_parallel_config.use_ep) or runner.router.eplb_state is not None


def fuses_shared_gate_or_latent(runner: nn.Module) -> bool:
    """A fused shared-expert gate or a latent MoE input transform (the plugin does not support them)."""
    return bool(runner._fse_fuse_gate) or runner.routed_input_transform is not None


def is_monolithic(experts: nn.Module) -> bool:
    """vLLM picked a kernel that routes inside itself (no way to hand it only the kept pairs)."""
    return bool(experts.quant_method.is_monolithic)


def quant_method(experts: nn.Module) -> Any:
    """The routed experts' quantisation method (also the unquantised one), which owns the kernel."""
    return experts.quant_method


def run_modular_kernel(experts: nn.Module, x: Tensor, weights: Tensor, ids: Tensor) -> Tensor:
    """vLLM's modular fused-MoE kernel on rows `x` with the given Top-K weights and ids."""
    return experts.forward_modular(x=x, topk_weights=weights, topk_ids=ids)


def checkpoint_expert_weights(experts: nn.Module) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """w13 [E, 2I, H], w2 [E, H, I] and their biases (None without), as vLLM loaded them."""
    has_bias = experts.moe_config.has_bias
    return (
        experts.w13_weight,
        experts.w2_weight,
        experts.w13_bias if has_bias else None,
        experts.w2_bias if has_bias else None,
    )


def attention_metadata() -> Any | None:
    """This forward pass's attention metadata; None outside a forward context and in vLLM's
    profiling and warm-up passes, which run without it."""
    if not is_forward_context_available():
        return None
    return get_forward_context().attn_metadata


def query_start_loc(metadata: Any) -> Tensor | None:
    """The step's per-request token offsets, from any layer's attention metadata (every backend has them)."""
    groups = metadata if isinstance(metadata, list) else [metadata]
    for group in groups:
        values = group.values() if isinstance(group, dict) else [group]
        for value in values:
            starts = getattr(value, "query_start_loc", None)
            if isinstance(starts, Tensor):
                return starts
    return None


def register_config_hook(architecture: str, hook: type) -> None:
    """Add `hook` (a `VerifyAndUpdateConfig`) to vLLM's per-architecture config hooks, unless the
    architecture already has one."""
    MODELS_CONFIG_MAP.setdefault(architecture, hook)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a vLLM causal-LM model (`model.model.layers`)."""
    return model.model.layers


def is_pipeline_placeholder(layer: nn.Module) -> bool:
    """A layer that lives on another pipeline-parallel rank."""
    return isinstance(layer, PPMissingLayer)
