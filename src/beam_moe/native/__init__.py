"""beam-moe's native op, `decode_keep` (decode_keep.cpp): the mask decision for a few tokens on a
CPU in one dispatch, built on this machine from its source.

At decode a MoE layer's own weights flush the caches, so every op after them starts cold (about
50 us each on the 2-core machines we measure on, against 3-10 us warm): the seven small ops of the
PyTorch path (cast, two row gathers, matrix-vector product, sigmoid, compare, all) cost more than
the mask head's arithmetic. One op does it all.

`python -m beam_moe.native build` compiles it (the set-up command runs it; a C++ compiler and
ninja, under a minute) into `BEAM_MOE_NATIVE_DIR` (default ~/.cache/beam-moe/native), under a
name that hashes the source and the torch version. At run time `decode_keep_available()` loads an
existing build and never compiles; without one, callers take the PyTorch path (the same decisions)
and the log says how to build.
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

SOURCE = Path(__file__).with_name("decode_keep.cpp")
DIRECTORY_ENV = "BEAM_MOE_NATIVE_DIR"
logger = logging.getLogger("beam_moe.native")
_loaded: bool | None = None


def library_name() -> str:
    digest = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode()).hexdigest()[:12]
    return f"beam_moe_native_{digest}"


def build_directory() -> Path:
    root = os.environ.get(DIRECTORY_ENV) or Path.home() / ".cache" / "beam-moe" / "native"
    return Path(root) / library_name()


def library_path() -> Path:
    return build_directory() / f"{library_name()}.so"


def build(verbose: bool = False) -> Path:
    """Compile the op for this machine's torch (portable flags, no CPU-specific instructions) and load it."""
    global _loaded
    from torch.utils.cpp_extension import load

    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    try:
        load(
            name=library_name(),
            sources=[str(SOURCE)],
            extra_cflags=["-O3"],
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


def decode_keep_available() -> bool:
    """Whether the op is built for this torch (loaded on the first call; never compiles)."""
    global _loaded
    if _loaded is None:
        path = library_path()
        _loaded = path.exists()
        if _loaded:
            torch.ops.load_library(str(path))
        else:
            logger.info(
                "beam-moe's native decode op is not built (%s); using the PyTorch path. "
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
    router-aware head needs the router's float32 Top-K weights. Call `decode_keep_available()` first."""
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
