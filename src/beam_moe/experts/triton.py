"""A fused-MoE Triton kernel that never computes masked pairs (the GPU backend "triton").

Modelled on vLLM's fused MoE (one expert per block of BLOCK_M rows, rows gathered by index, the
routed weight applied in the second GEMM), with BEAM's twist in the alignment: masked pairs
(ids >= E) are dropped before blocks are formed, so no block, padding row or weight tile is ever
spent on them.

1. `align_kept_pairs` (torch): sort the flat ids once, count kept rows per expert
   (`bincount(minlength=E+1)[:E]`), round each count up to BLOCK_M, and lay the kept pairs out
   expert by expert; every BLOCK_M block then belongs to one expert. No host sync: buffers have
   their largest possible size and the kernels read the real size from the device.
2. `gate_up_kernel`: h = silu(x @ gate) * (x @ up) for one block of rows and BLOCK_N columns of
   the intermediate size (both halves in the same program, so SwiGLU costs no extra pass).
3. `down_kernel`: y = (h @ down) * routed weight, written to the pair's slot.
4. The K slots of each token are summed in float32 (masked slots hold zeros).

`triton_supports` refuses weights that do not declare a plain SwiGLU gate (`ExpertWeights.gated_silu`:
gpt-oss and other gates), experts with biases, calls that need a backward pass and tensors on a
device the kernels cannot run on; the chooser (`beam_moe.experts`) hands those calls to the `grouped`
backend, and the result then names `grouped` as the backend that ran. `TRITON_INTERPRET=1` runs the
kernels on the CPU (slowly) for tests; the kernels are built on first use so that the variable is
read then.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from beam_moe.errors import require
from beam_moe.experts.backend import SUPPORTED, Support
from beam_moe.experts.weights import ExpertsOutput, ExpertWeights


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """Triton is installed and has a GPU to run on (or runs in its CPU interpreter)."""
    return triton_runs_on(None)[0]


def triton_runs_on(device: torch.device | None = None) -> Support:
    """Whether the kernels can run on `device` (None: on some device of this machine), and why not."""
    if not _triton_installed():
        return False, "triton is not installed (pip install 'beam-moe[kernels]')"
    if device is None:
        if torch.cuda.is_available() or interpreting():
            return SUPPORTED
        return False, "no CUDA device, and TRITON_INTERPRET=1 (triton's CPU interpreter) is not set"
    if device.type == "cuda":
        return SUPPORTED if torch.cuda.is_available() else (False, "CUDA is not available")
    if device.type == "cpu":
        if interpreting():
            return SUPPORTED
        return False, "the kernels need a CUDA device; on the CPU only with TRITON_INTERPRET=1 (tests)"
    return False, f"the kernels do not run on {device.type} devices"


def triton_supports(w: ExpertWeights, device: torch.device, needs_grad: bool) -> Support:
    """What the fused kernel computes: plain SwiGLU experts without biases, inference only."""
    if needs_grad:
        return False, "the fused kernel has no backward pass (training)"
    if not is_swiglu(w):
        return False, (
            "the experts are not plain SwiGLU without biases (ExpertWeights.gated_silu), "
            "which is all the fused kernel computes"
        )
    return SUPPORTED


@dataclass
class AlignedPairs:
    """Kept pairs laid out in BLOCK_M blocks, one expert per block.

    sorted_pairs: [P] int32 flat pair index (token * K + slot) per padded row; T * K marks padding.
    block_expert: [P / BLOCK_M] int32 expert of each block; -1 past the last used block.
    num_padded:   [1] int32 rows in use (a multiple of BLOCK_M), on the device.
    num_kept:     [] kept pairs, on the device.
    """

    sorted_pairs: Tensor
    block_expert: Tensor
    num_padded: Tensor
    num_kept: Tensor
    block_m: int


def align_kept_pairs(ids: Tensor, num_experts: int, block_m: int) -> AlignedPairs:
    """vLLM's moe_align_block_size in torch, dropping masked pairs (ids >= E) instead of padding them."""
    num_pairs = ids.numel()
    device = ids.device
    flat_ids = ids.reshape(-1)
    counts = torch.bincount(flat_ids, minlength=num_experts + 1)[:num_experts]
    padded_counts = (counts + block_m - 1) // block_m * block_m
    padded_ends = torch.cumsum(padded_counts, dim=0)
    kept_ends = torch.cumsum(counts, dim=0)
    sorted_ids, order = torch.sort(flat_ids, stable=True)
    expert = sorted_ids.clamp(max=num_experts - 1)
    rank = torch.arange(num_pairs, device=device) - (kept_ends - counts)[expert]
    max_padded = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    destination = torch.where(
        sorted_ids < num_experts, (padded_ends - padded_counts)[expert] + rank, max_padded
    )
    sorted_pairs = torch.full((max_padded + 1,), num_pairs, dtype=torch.int32, device=device)
    sorted_pairs.scatter_(0, destination, order.to(torch.int32))
    block_starts = torch.arange(0, max_padded, block_m, device=device)
    block_expert = torch.searchsorted(padded_ends, block_starts, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return AlignedPairs(
        sorted_pairs=sorted_pairs[:max_padded],
        block_expert=block_expert,
        num_padded=padded_ends[-1:].to(torch.int32),
        num_kept=kept_ends[-1],
        block_m=block_m,
    )


@functools.cache
def _kernels(interpret: bool):
    """JIT the kernels for the current mode (triton reads TRITON_INTERPRET when a kernel is built)."""
    triton = require("triton", "kernels", "the triton expert backend")
    from beam_moe.experts import triton_kernels

    return triton.jit(triton_kernels.gate_up_kernel), triton.jit(triton_kernels.down_kernel)


@dataclass(frozen=True)
class BlockConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int


def block_config(num_pairs: int, dtype: torch.dtype) -> BlockConfig:
    """Tile sizes: small row blocks and narrow column tiles for decode (more programs reading
    weights in parallel), larger tiles for prefill, as vLLM's default configs do."""
    block_k = 32 if dtype == torch.float32 else 64
    if num_pairs <= 256:
        return BlockConfig(block_m=16, block_n=32, block_k=block_k, num_warps=4)
    return BlockConfig(block_m=64, block_n=64, block_k=block_k, num_warps=4)


def is_swiglu(w: ExpertWeights) -> bool:
    """Plain SwiGLU experts (declared `gated_silu`: gate half first, silu; no biases): what the
    fused kernel computes."""
    return (
        w.gated_silu and w.up_bias is None and w.down_bias is None and w.up.shape[-1] == 2 * w.down.shape[-2]
    )


def _intermediate_buffer(*shape: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Uninitialised: the gate/up kernel writes every row the down kernel reads."""
    return torch.empty(shape, dtype=dtype, device=device)


def triton_experts(w: ExpertWeights, hidden: Tensor, ids: Tensor, weights: Tensor) -> ExpertsOutput:
    """Same contract as `reference_experts` (ids >= E are skipped; returns the output, rows computed
    and "triton"), for the calls `triton_runs_on` and `triton_supports` accept; call it through
    `beam_moe.experts.get_backend("triton")`, which sends the others to `grouped`."""
    num_tokens, top_k = ids.shape
    num_pairs = ids.numel()
    if num_pairs == 0:
        return ExpertsOutput(torch.zeros_like(hidden), 0, "triton")
    hidden_size, intermediate_size = w.hidden_size, w.down.shape[-2]
    config = block_config(num_pairs, w.up.dtype)
    aligned = align_kept_pairs(ids, w.num_experts, config.block_m)
    x = hidden if hidden.dtype == w.up.dtype else hidden.to(w.up.dtype)
    interpret = interpreting()
    upcast = interpret and w.up.dtype != torch.float32
    ieee = w.up.dtype == torch.float32 or upcast
    gate_up, down = _kernels(interpret)
    num_blocks = aligned.block_expert.numel()
    h = _intermediate_buffer(
        aligned.sorted_pairs.numel(), intermediate_size, dtype=w.down.dtype, device=hidden.device
    )
    grid_up = (num_blocks, -(-intermediate_size // config.block_n))
    gate_up[grid_up](
        x,
        w.up,
        h,
        aligned.sorted_pairs,
        aligned.block_expert,
        aligned.num_padded,
        num_pairs,
        hidden_size,
        intermediate_size,
        x.stride(0),
        x.stride(1),
        w.up.stride(0),
        w.up.stride(1),
        w.up.stride(2),
        h.stride(0),
        h.stride(1),
        TOP_K=top_k,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        IEEE=ieee,
        UPCAST=upcast,
        num_warps=config.num_warps,
    )
    slots = torch.zeros(num_pairs, hidden_size, dtype=torch.float32, device=hidden.device)
    routing = weights.reshape(-1).contiguous()
    grid_down = (num_blocks, -(-hidden_size // config.block_n))
    down[grid_down](
        h,
        w.down,
        slots,
        routing,
        aligned.sorted_pairs,
        aligned.block_expert,
        aligned.num_padded,
        num_pairs,
        hidden_size,
        intermediate_size,
        h.stride(0),
        h.stride(1),
        w.down.stride(0),
        w.down.stride(1),
        w.down.stride(2),
        slots.stride(0),
        slots.stride(1),
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        IEEE=ieee,
        UPCAST=upcast,
        num_warps=config.num_warps,
    )
    out = slots.view(num_tokens, top_k, hidden_size).sum(dim=1).to(hidden.dtype)
    return ExpertsOutput(out, aligned.num_kept, "triton")
