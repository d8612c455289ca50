"""The `native` expert backend: bf16 SwiGLU experts on the kept pairs in one C++ op
(`beam_moe.native.kept_experts`), on the CPU.

It reads each kept expert's weights once, with several tokens per pass over a weight row (bf16 dot
products on AVX512-BF16 CPUs, weights widened to float32 on AVX2 ones), at the memory's rate. Torch's
bf16 matmul is compute-bound without bf16 arithmetic (AVX2 only: about 9 GFLOP/s at any shape) and
half as fast as the op with AVX512-BF16; under AMX tiles oneDNN's GEMMs are faster once each kept
expert has more than about ten rows (long prompts), so there the backend hands such calls to
`grouped` (`native_preferred`).
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


AMX_NATIVE_ROWS_PER_EXPERT = 10
"""Under AMX tiles, the native op takes calls of up to this many slots per expert of the layer
(slots <= this x experts); above, oneDNN's tile GEMMs are faster. Measured on a 2-core Xeon
(Emerald Rapids) at Qwen3-30B-A3B sizes, Avg-K 1.23, grouped's time over the op's: 1 thread 2.1x at
8 tokens, 1.43x at 512, 1.00x at 1024 (9.8 slots per expert), 0.80x at 1536; 2 threads 2.5x, 1.75x,
1.15x, 0.85x."""


def amx_tiles() -> bool:
    """Whether this CPU has AMX tiles, under which torch's bf16 GEMMs (oneDNN) outrun the native op
    once each expert has many rows (`AMX_NATIVE_ROWS_PER_EXPERT`)."""
    return getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()


def native_preferred(slots: int, experts: int) -> bool:
    """Whether a native op beats torch's bf16 GEMMs on a call with `slots` kept (token, expert) rows over
    `experts` weight rows: without AMX always (measured: 2.1x faster than oneDNN's AVX512-BF16
    GEMMs at 8 to 1024 tokens of a Qwen3-30B-A3B layer, 3-28x faster than torch on AVX2 only);
    with AMX up to AMX_NATIVE_ROWS_PER_EXPERT slots per expert. The experts backend applies it."""
    return not amx_tiles() or slots <= AMX_NATIVE_ROWS_PER_EXPERT * experts


def native_router_preferred(slots: int, experts: int) -> bool:
    """The same question for a router (`native_router`), `slots` = tokens x Top-K: decode-sized calls
    always; larger ones only without bf16 arithmetic. A router is one dense GEMM whose small weight
    stays in cache, so from 64 tokens it is compute-bound, and oneDNN's AVX512-BF16 GEMM runs it
    1.3-1.7x faster than the op (measured at Qwen3-30B-A3B's 128 x 2048 router, one thread)."""
    return slots <= experts or not hardware_bf16()


def native_experts(w: ExpertWeights, hidden: Tensor, ids: Tensor, weights: Tensor) -> ExpertsOutput:
    """Same contract as `reference_experts`: ids >= E are skipped; returns (output, rows computed, "native")."""
    experts = w.num_experts
    # every slot is an upper bound on the kept ones; counting them is needed only above it
    if not native_preferred(ids.numel(), experts) and not native_preferred(
        int((ids < experts).sum()), experts
    ):
        log_fallback("native", "grouped", "a long prompt whose GEMMs torch runs faster on this CPU")
        return grouped_experts(w, hidden, ids, weights)
    output, rows = native.kept_experts(hidden, w.up.transpose(1, 2), w.down.transpose(1, 2), ids, weights)
    return ExpertsOutput(output, rows, "native")
