"""beam-moe's native ops, built on this machine from their source:

- `decode_keep` (decode_keep.cpp): the mask decision for a few tokens in one dispatch. At decode a
  MoE layer's own weights flush the caches, so every op after them starts cold (about 50 us each on
  the 2-core machines we measure on, against 3-10 us warm): the seven small ops of the PyTorch path
  (cast, two row gathers, matrix-vector product, sigmoid, compare, all) cost more than the mask
  head's arithmetic. One op does it all.
- `kept_experts` (kept_experts.cpp): SwiGLU experts on the kept pairs only, in one dispatch, each
  kept expert's bf16 weights streamed once at the memory's rate (bf16 dot products with AVX512-BF16,
  widened to float32 with AVX2, where torch's bf16 matmul is compute-bound at a few GFLOP/s); the
  `native` expert backend.
- `softmax_topk` (softmax_topk.cpp): the softmax Top-K router of the Qwen-style families in one
  dispatch, on the same bf16 matmul (bf16_matmul.h); `beam_moe.native_router`.

`python -m beam_moe.native build` compiles them (the set-up command runs it; a C++ compiler and
ninja, under a minute) into `BEAM_MOE_NATIVE_DIR` (default ~/.cache/beam-moe/native), under a
name that hashes the sources and the torch version. At run time `available()` loads an existing
build and never compiles; without one, callers take the PyTorch paths (the same results) and the
log says how to build.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from torch import Tensor

from beam_moe.errors import BeamError
from beam_moe.mask import ROUTER_FEATURE_FLOOR, MaskHead

SOURCES = [
    Path(__file__).with_name(name) for name in ("decode_keep.cpp", "kept_experts.cpp", "softmax_topk.cpp")
]
HEADERS = [Path(__file__).with_name("bf16_matmul.h")]
DIRECTORY_ENV = "BEAM_MOE_NATIVE_DIR"
logger = logging.getLogger("beam_moe.native")
_loaded: bool | None = None


COMPILE_FLAGS = ["-O3", "-fopenmp"]
"""-fopenmp: at::parallel_for is an OpenMP pragma in ATen's headers, so without it the experts op
runs on one thread whatever torch.set_num_threads says (libgomp is torch's own, already loaded)."""


def library_name() -> str:
    digest = hashlib.sha256(
        b"".join(p.read_bytes() for p in SOURCES + HEADERS)
        + torch.__version__.encode()
        + " ".join(COMPILE_FLAGS).encode()
    ).hexdigest()[:12]
    return f"beam_moe_native_{digest}"


def build_directory() -> Path:
    root = os.environ.get(DIRECTORY_ENV) or Path.home() / ".cache" / "beam-moe" / "native"
    return Path(root) / library_name()


def library_path() -> Path:
    return build_directory() / f"{library_name()}.so"


def build(verbose: bool = False) -> Path:
    """Compile the ops for this machine's torch and load them. Portable flags: the AVX2 loops are
    compiled with a target attribute and chosen at run time, so the build runs on any x86 CPU."""
    global _loaded
    from torch.utils.cpp_extension import load

    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    try:
        load(
            name=library_name(),
            sources=[str(p) for p in SOURCES],
            extra_cflags=COMPILE_FLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
            is_python_module=False,
            verbose=verbose,
        )
    except (RuntimeError, OSError) as e:
        raise BeamError(
            f"building beam-moe's native op failed ({e}); it needs a C++ compiler (g++) and ninja "
            "(pip install ninja). Without it beam-moe runs the same decisions in PyTorch, a little slower."
        ) from e
    _loaded = True
    return library_path()


def available() -> bool:
    """Whether the ops are built for this torch (loaded on the first call; never compiles)."""
    global _loaded
    if _loaded is None:
        path = library_path()
        _loaded = path.exists()
        if _loaded:
            torch.ops.load_library(str(path))
        else:
            logger.info(
                "beam-moe's native ops are not built (%s); using the PyTorch paths. "
                "Build it with: python -m beam_moe.native build",
                path,
            )
    return _loaded


def decode_keep(
    hidden: Tensor, head: MaskHead, ids: Tensor, threshold: float, router_weights: Tensor | None = None
) -> tuple[Tensor, Tensor, bool]:
    """(soft, keep, all_kept) of `head` for hidden [T, H] (any float dtype) at router ids [T, K]
    (int32 or int64) and one threshold: soft = sigmoid(z_k) float32 [T, K] with z_k as
    `head.slot_logits` computes it, keep = soft >= threshold, and whether every slot is kept. A
    router-aware head needs the router's float32 Top-K weights. Call `available()` first."""
    router = head.router_aware
    return torch.ops.beam_moe.decode_keep(
        hidden,
        head.weight,
        head.bias,
        ids,
        float(threshold),
        router_weights if router else None,
        head.router_scale if router else None,
        head.router_offset if router else None,
        ROUTER_FEATURE_FLOOR,
    )


def kept_experts(
    hidden: Tensor, gate_up: Tensor, down: Tensor, ids: Tensor, weights: Tensor
) -> tuple[Tensor, int]:
    """Σ over each token's kept slots of weight · down[e](silu(gate[e] x) · up[e] x) for hidden
    [T, H] and router ids / weights [T, K], ids >= E masked (never computed); SwiGLU weights as
    transformers and vLLM store them, contiguous: gate_up [E, 2I, H] (gate rows first), down
    [E, H, I], bf16. Returns the output [T, H] in hidden's dtype (summed in
    float32) and the number of kept pairs computed. Call `available()` first."""
    return torch.ops.beam_moe.kept_experts(hidden, gate_up, down, ids, weights)


def softmax_topk(
    hidden: Tensor, weight: Tensor, top_k: int, normalize: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(logits [T, E], Top-K weights [T, K], Top-K ids [T, K] int64) of a softmax Top-K router with
    bf16 `weight` [E, H] for bf16 hidden [T, H], as the Qwen-style transformers routers compute
    them: bf16 logits, float32 softmax, Top-K, `normalize`d to sum 1, weights in bf16. Call
    `available()` first."""
    return torch.ops.beam_moe.softmax_topk(hidden, weight, top_k, normalize)
