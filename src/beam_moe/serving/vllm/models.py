"""BEAM model classes for vLLM: each is vLLM's own model class plus mask heads (see runner.py).

vLLM builds and loads the model exactly as for the base checkpoint; the mask tensors
(`model.layers.{i}.mlp.beam_mask.weight`) are taken out of the weight stream and copied into the
heads. Registered lazily by `beam_moe.serving.vllm.register` (the `vllm.general_plugins` entry point).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from torch import Tensor
from vllm.config import VllmConfig
from vllm.model_executor.models.deepseek_v2 import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM
from vllm.model_executor.models.gpt_oss import GptOssForCausalLM
from vllm.model_executor.models.mixtral import MixtralForCausalLM
from vllm.model_executor.models.olmoe import OlmoeForCausalLM
from vllm.model_executor.models.qwen2_moe import Qwen2MoeForCausalLM
from vllm.model_executor.models.qwen3_moe import Qwen3MoeForCausalLM

from beam_moe.serving.vllm.runner import install_beam, load_mask_heads


class BeamMoEModel:
    """Mixin placed before a vLLM MoE model class: installs the mask heads and loads their weights."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.beam_runners = install_beam(self, vllm_config)

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> set[str]:
        masks: dict[str, Tensor] = {}

        def base_weights() -> Iterator[tuple[str, Tensor]]:
            for name, tensor in weights:
                if ".beam_mask." in name:
                    masks[name] = tensor
                else:
                    yield name, tensor

        loaded = set(super().load_weights(base_weights()))
        return loaded | load_mask_heads(self, self.beam_runners, masks)


class BeamQwen3MoeForCausalLM(BeamMoEModel, Qwen3MoeForCausalLM):
    """Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B) with BEAM."""


class BeamQwen2MoeForCausalLM(BeamMoEModel, Qwen2MoeForCausalLM):
    """Qwen2-MoE / Qwen1.5-MoE-A2.7B with BEAM (the shared expert always runs)."""


class BeamOlmoeForCausalLM(BeamMoEModel, OlmoeForCausalLM):
    """OLMoE-1B-7B with BEAM."""


class BeamMixtralForCausalLM(BeamMoEModel, MixtralForCausalLM):
    """Mixtral-8x7B / 8x22B with BEAM."""


class BeamDeepseekV2ForCausalLM(BeamMoEModel, DeepseekV2ForCausalLM):
    """DeepSeek-V2 / V2-Lite with BEAM (shared experts always run)."""


class BeamDeepseekV3ForCausalLM(BeamMoEModel, DeepseekV3ForCausalLM):
    """DeepSeek-V3 / R1 with BEAM (shared experts always run)."""


class BeamGptOssForCausalLM(BeamMoEModel, GptOssForCausalLM):
    """gpt-oss-20b / 120b with BEAM."""
