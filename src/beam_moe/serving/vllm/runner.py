"""BEAM inside vLLM's MoE layer: the router's Top-K, then the mask, then only the kept pairs run.

vLLM (0.32) builds every MoE layer as a `MoERunner`: router, `RoutedExperts` (the w13/w2 weights
and the fused-MoE kernel), shared experts, and the tensor-parallel all-reduce. `install_beam`
turns the runners of the masked layers into `BeamMoERunner`s (the same objects, re-classed, so
vLLM's weight loading, shared experts, sequence parallelism and all-reduce stay exactly vLLM's),
gives each a replicated mask head, and changes one step: between the router and the experts the
mask decides `keep [T, K]` (beam_moe.routing.apply_head) and only kept pairs are executed by

- `KernelOnKeptPairs` ("auto" on CPU): vLLM's own fused-MoE kernel on the kept pairs only (one
  token: its kept ids as its top-K'; more: one top-1 row per kept pair, summed back per token).
  vLLM's CPU kernel has no way to skip an id (out-of-range ids write out of bounds), so masked
  pairs are removed before the call, never passed in;
- `BackendOnCheckpointWeights` ("grouped", "native", "reference", "triton"): a beam-moe expert backend
  (`beam_moe.experts.get_backend`) on vLLM's w13/w2 views; vLLM's kernel-specific repacking of
  those weights is skipped for the masked layers, so they stay in checkpoint layout.

Every private attribute of vLLM's objects that this takes or sets is reached through `compat`.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor, nn
from vllm.config import CompilationMode, CUDAGraphMode, VllmConfig
from vllm.distributed import get_tensor_model_parallel_rank
from vllm.logger import init_logger
from vllm.model_executor.layers.fused_moe.activation import MoEActivation
from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner
from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod

from beam_moe.config import BeamConfig
from beam_moe.errors import BeamError
from beam_moe.experts import ExpertsOutput, ExpertWeights, available_backends, get_backend
from beam_moe.mask import MaskHead
from beam_moe.merged import effective_beam_config, read_merged_config
from beam_moe.native import available as native_available
from beam_moe.routing import MaskedRouting, apply_head, to_sentinel
from beam_moe.serving.vllm import compat
from beam_moe.serving.vllm.budgets import BUDGET_PROCESSOR, REQUEST_BUDGETS
from beam_moe.serving.vllm.stats import SERVING_STATS

logger = init_logger(__name__)
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class KernelOnKeptPairs:
    """vLLM's own modular fused-MoE kernel on the kept pairs only.

    Every pair kept: one call on the router's Top-K, as vLLM itself makes it. One token (decode at
    batch 1): one call on that token with its K' kept ids as its top-K', so the kernel also sums
    them. Otherwise one top-1 row per kept pair, summed back per token.
    """

    name = "vllm"

    def __call__(self, runner: MoERunner, hidden: Tensor, routing: MaskedRouting) -> ExpertsOutput:
        experts = runner.routed_experts
        if compat.is_monolithic(experts):
            raise BeamError(
                f"{runner.layer_name}: vLLM picked a monolithic MoE kernel ({type(compat.quant_method(experts)).__name__}), "
                "which routes inside the kernel; serve with beam.backend set to 'triton' or 'grouped'"
            )
        keep = routing.keep
        if routing.all_kept or (routing.all_kept is None and bool(keep.all())):
            return self._kernel(experts, hidden, routing.weights, routing.ids)
        num_tokens, top_k = keep.shape
        if num_tokens == 1:
            ids = routing.ids.masked_select(keep)
            if ids.numel() == 0:
                return ExpertsOutput(torch.zeros_like(hidden), 0, self.name)
            weights = routing.weights.masked_select(keep)
            return self._kernel(experts, hidden, weights.view(1, -1), ids.view(1, -1))
        kept = keep.reshape(-1).nonzero().squeeze(1)
        if kept.numel() == 0:
            return ExpertsOutput(torch.zeros_like(hidden), 0, self.name)
        token = kept.div(top_k, rounding_mode="floor")
        out, rows, backend = self._kernel(
            experts,
            hidden.index_select(0, token),
            routing.weights.reshape(-1).index_select(0, kept).unsqueeze(1),
            routing.ids.reshape(-1).index_select(0, kept).unsqueeze(1),
        )
        fused = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        return ExpertsOutput(fused.index_add_(0, token, out.float()).to(hidden.dtype), rows, backend)

    def _kernel(self, experts: nn.Module, x: Tensor, weights: Tensor, ids: Tensor) -> ExpertsOutput:
        """One call of vLLM's kernel; the rows are counted from what the kernel is handed (every
        (row, id) pair of `x` and `ids` is computed), not from the mask, so that a masked pair passed
        in by mistake shows up in `computed_rows`."""
        out = compat.run_modular_kernel(experts, x, weights, ids)
        return ExpertsOutput(out, x.shape[0] * ids.shape[1], self.name)


class BackendOnCheckpointWeights:
    """A beam-moe expert backend on vLLM's w13 [E, 2I, H] / w2 [E, H, I] (views, never copies)."""

    def __init__(self, name: str, device: torch.device) -> None:
        self.name = name
        self.backend = get_backend(name, device)

    def __call__(self, runner: MoERunner, hidden: Tensor, routing: MaskedRouting) -> ExpertsOutput:
        # _check_supported admits unquantized SiLU experts only; w13 holds [gate | up] rows.
        weights = ExpertWeights.swiglu(*compat.checkpoint_expert_weights(runner.routed_experts))
        ids = to_sentinel(routing.ids.long(), routing.keep, weights.num_experts)
        return self.backend(weights, hidden, ids, routing.weights)


class _CheckpointLayoutMoEMethod(UnquantizedFusedMoEMethod):
    """vLLM's unquantized MoE method without its post-load repacking: weights stay as loaded."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        return


class BeamMoERunner(MoERunner):
    """A vLLM `MoERunner` with a BEAM mask head between its router and its experts.

    Only `_apply_quant_method` (route, then run experts) differs from vLLM's. When vLLM compiles
    the model (and always off a CPU) it is entered through vLLM's opaque `moe_forward` custom ops,
    so torch.compile never traces the data-dependent parts; an eager CPU engine keeps vLLM's direct
    call, as vLLM does for its own CPU layers (a custom-op dispatch per layer costs at decode).
    """

    beam_mask: MaskHead
    beam_config: BeamConfig
    beam_executor: Any
    beam_index: int

    def _apply_quant_method(
        self,
        hidden_states: Tensor,
        router_logits: Tensor,
        shared_experts_input: Tensor | None,
        input_ids: Tensor | None = None,
        shared_experts_overlapping: bool = False,
    ) -> tuple[Tensor | None, Tensor]:
        shared = None
        if compat.shared_experts(self) is not None and not shared_experts_overlapping:
            shared = compat.run_shared_experts(self, shared_experts_input)
        weights, ids = self.router.select_experts(
            hidden_states=hidden_states,
            router_logits=router_logits,
            topk_indices_dtype=compat.topk_indices_dtype(self),
            input_ids=input_ids,
        )
        per_token = REQUEST_BUDGETS.token_thresholds(ids.shape[0], ids.device)
        routing = apply_head(
            self.beam_mask,
            hidden_states[..., : self.beam_mask.in_features],  # kernels may pad H
            weights,
            ids,
            self.beam_config.threshold if per_token is None else per_token,
            renormalize=self.beam_config.renormalize,
            check_all_kept=hidden_states.device.type == "cpu",  # a host sync costs nothing there
        )
        fused, rows, backend = self.beam_executor(self, hidden_states, routing)
        if _is_real_step():
            SERVING_STATS.add(self.beam_index, routing, rows, backend)
        if shared_experts_overlapping:
            shared = compat.overlapped_shared_output(self)
        return shared, fused


def _is_real_step() -> bool:
    """vLLM's profiling and warm-up passes run without attention metadata; they are not counted."""
    return compat.attention_metadata() is not None


def beam_config_for(vllm_config: VllmConfig) -> tuple[BeamConfig, dict[str, Any]]:
    """The BeamConfig to serve (with `hf_overrides` applied) and the checkpoint's export record."""
    hf_config = vllm_config.model_config.hf_config
    source = f"{vllm_config.model_config.model}/config.json"
    return effective_beam_config(hf_config, source=source), read_merged_config(hf_config, source)


def _make_executor(config: BeamConfig, device_type: str) -> KernelOnKeptPairs | BackendOnCheckpointWeights:
    name = config.backend
    if name == "auto":
        name = "triton" if device_type == "cuda" and "triton" in available_backends() else "vllm"
    return (
        KernelOnKeptPairs() if name == "vllm" else BackendOnCheckpointWeights(name, torch.device(device_type))
    )


def install_beam(model: nn.Module, vllm_config: VllmConfig) -> dict[int, BeamMoERunner]:
    """Turn the MoE runners of the masked layers into BEAM runners; returns them by decoder layer index."""
    config, export = beam_config_for(vllm_config)
    hidden_size = vllm_config.model_config.hf_text_config.hidden_size
    device_type = vllm_config.device_config.device_type
    if device_type == "cuda" and vllm_config.compilation_config.cudagraph_mode != CUDAGraphMode.NONE:
        raise BeamError(
            "BEAM runs only the kept (token, expert) pairs, a data-dependent amount of work that CUDA "
            "graphs cannot capture; serve with --enforce-eager (LLM(..., enforce_eager=True))"
        )
    executor = _make_executor(config, device_type)
    compiled = device_type != "cpu" or vllm_config.compilation_config.mode != CompilationMode.NONE
    native_decode = device_type == "cpu" and native_available()  # routing.apply_head's choice
    wanted = set(export["mask_layers"])
    runners: dict[int, BeamMoERunner] = {}
    SERVING_STATS.clear(log=get_tensor_model_parallel_rank() == 0)  # ranks see the same masks
    SERVING_STATS.step_labels = REQUEST_BUDGETS.token_labels
    for name, module in model.named_modules():
        match = _LAYER_INDEX.search(name)
        if not isinstance(module, MoERunner) or match is None or int(match.group(1)) not in wanted:
            continue
        if type(module) is not MoERunner:
            raise BeamError(
                f"{name} is a {type(module).__name__}; the BEAM plugin extends vLLM's MoERunner only"
            )
        _check_supported(name, module, executor)
        num_experts = module.moe_config.num_logical_experts
        compat.reclass(module, BeamMoERunner)
        head = MaskHead(hidden_size, num_experts, bias=config.bias, router_aware=config.head == "router")
        module.add_module("beam_mask", head)
        module.beam_config = config
        module.beam_executor = executor
        block_name = name.rsplit(".", 1)[0]
        module.beam_index = SERVING_STATS.add_layer(block_name, module.moe_config.experts_per_token)
        if compiled:  # eager on a CPU keeps vLLM's direct call: no custom-op dispatch per layer
            compat.use_moe_forward_op(module)
        if isinstance(executor, BackendOnCheckpointWeights):
            compat.reclass(compat.quant_method(module.routed_experts), _CheckpointLayoutMoEMethod)
        runners[int(match.group(1))] = module
    logger.info(
        "BEAM: mask heads on %d MoE layers, threshold %s, experts run by %s, decode masks by %s; "
        "per-request budgets %s",
        len(runners),
        config.threshold,
        executor.name,
        "the native op" if native_decode else "PyTorch",
        "on" if BUDGET_PROCESSOR in (vllm_config.model_config.logits_processors or []) else "off",
    )
    return runners


def _check_supported(name: str, runner: MoERunner, executor: Any) -> None:
    if compat.uses_expert_parallelism(runner):
        raise BeamError(
            f"{name}: expert parallelism / EPLB is not supported by the BEAM plugin; use tensor parallelism"
        )
    if compat.fuses_shared_gate_or_latent(runner):
        raise BeamError(
            f"{name}: fused shared-expert gates and latent MoE are not supported by the BEAM plugin"
        )
    if isinstance(executor, BackendOnCheckpointWeights):
        if type(compat.quant_method(runner.routed_experts)) is not UnquantizedFusedMoEMethod:
            raise BeamError(
                f"{name}: the beam-moe expert backends run unquantized experts only; "
                "use beam.backend 'auto' (vLLM's kernel on the kept pairs) for quantized checkpoints"
            )
        if runner.routed_experts.activation != MoEActivation.SILU:
            raise BeamError(
                f"{name}: the beam-moe expert backends need SiLU experts; use beam.backend 'auto'"
            )


def load_mask_heads(
    model: nn.Module, runners: dict[int, BeamMoERunner], tensors: dict[str, Tensor]
) -> set[str]:
    """Copy checkpoint tensors `...layers.<i>....beam_mask.<weight|bias>` into the heads; returns parameter names."""
    from beam_moe.merged import mask_layer_index

    names = {module: name for name, module in model.named_modules()}
    layers = compat.decoder_layers(model)
    loaded: set[str] = set()
    for key, tensor in tensors.items():
        index = mask_layer_index(key)
        if index not in runners:
            if index < len(layers) and compat.is_pipeline_placeholder(layers[index]):
                continue
            raise BeamError(
                f"the checkpoint has a mask head for layer {index} ({key}), which has no BEAM MoE layer"
            )
        head = runners[index].beam_mask
        field = key.rsplit(".", 1)[1]
        param = getattr(head, field, None)
        if param is None or tuple(param.shape) != tuple(tensor.shape):
            expected = None if param is None else tuple(param.shape)
            raise BeamError(f"{key} has shape {tuple(tensor.shape)}, the model expects {expected}")
        with torch.no_grad():
            param.copy_(tensor.to(param.dtype))
        loaded.add(f"{names[head]}.{field}")
    return loaded
