"""The `native` expert backend: bf16 SwiGLU experts on the kept pairs in one C++ op
(`beam_moe.native.kept_experts`), on the CPU.

It reads each kept expert's weights once, widening them to float32 as they stream, with up to three
tokens per pass over a weight row. Where torch's bf16 matmul has no hardware arithmetic under it
(AVX2-only CPUs: about 9 GFLOP/s at any shape) that is faster at every size; on CPUs with bf16
arithmetic (AVX512-BF16, AMX) oneDNN's GEMMs are faster once an expert has many rows, so there the
backend computes decode-sized calls and hands larger ones to `grouped` (`native_preferred`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from beam_moe import native
from beam_moe.experts.backend import SUPPORTED, Support, log_fallback
from beam_moe.experts.grouped import grouped_experts
from beam_moe.experts.weights import ExpertsOutput, ExpertWeights


def native_runs_on(device: torch.device | None = None) -> Support:
    if device is not None and device.type != "cpu":
        return False, f"the native op runs on the CPU, not on {device.type}"
    if not native.available():
        return (
            False,
            f"beam-moe's native ops are not built ({native.library_path()}): python -m beam_moe.native build",
        )
    return SUPPORTED


def native_supports(weights: ExpertWeights, device: torch.device, needs_grad: bool) -> Support:
    if needs_grad:
        return False, "the native op has no backward pass (training computes all K experts in PyTorch)"
    if not weights.gated_silu:
        return False, "the native op computes SwiGLU experts only (silu(gate) * up)"
    if weights.up_bias is not None or weights.down_bias is not None:
        return False, "the native op has no expert biases"
    if weights.up.dtype != torch.bfloat16 or weights.down.dtype != torch.bfloat16:
        return False, "the native op reads bf16 expert weights (float32 ones: torch's GEMMs stream them well)"
    if not (weights.up.transpose(1, 2).is_contiguous() and weights.down.transpose(1, 2).is_contiguous()):
        return False, "the native op reads weights stored as transformers stores them ([E, 2I, H], [E, H, I])"
    return SUPPORTED


def hardware_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic that torch's matmul uses (AVX512-BF16 or AMX)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def native_preferred(slots: int, experts: int) -> bool:
    """Whether a native op beats torch's bf16 GEMMs on a call with `slots` (token, expert) rows over
    `experts` weight rows: decode-sized calls (no more slots than experts: about one row per
    expert, where a GEMM is a weight stream) always; larger ones unless the CPU has bf16 arithmetic
    for torch's GEMMs. The experts backend and the router (`native_router`) share this rule."""
    return slots <= experts or not hardware_bf16()


def native_experts(w: ExpertWeights, hidden: Tensor, ids: Tensor, weights: Tensor) -> ExpertsOutput:
    """Same contract as `reference_experts`: ids >= E are skipped; returns (output, rows computed, "native")."""
    if not native_preferred(ids.numel(), w.num_experts):
        log_fallback("native", "grouped", "a prefill-sized call whose GEMMs torch runs faster on this CPU")
        return grouped_experts(w, hidden, ids, weights)
    output, rows = native.kept_experts(hidden, w.up.transpose(1, 2), w.down.transpose(1, 2), ids, weights)
    return ExpertsOutput(output, rows, "native")
