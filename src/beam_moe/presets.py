"""Real MoE layer sizes (random weights are enough) for FLOPs counts and speed benchmarks."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from beam_moe.errors import BeamError


@dataclass(frozen=True)
class MoEPreset:
    """One MoE layer's shape, and how many such layers the model has.

    shared_intermediate: total intermediate size of the shared expert(s), 0 when there are none
    (DeepSeek-V2-Lite's 2 shared experts of 1408 give 2816).
    """

    name: str
    hidden_size: int
    expert_intermediate: int
    num_experts: int
    top_k: int
    shared_intermediate: int
    moe_layers: int
    model_type: str

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, MoEPreset] = {
    p.name: p
    for p in (
        MoEPreset("qwen3-30b-a3b", 2048, 768, 128, 8, 0, 48, "qwen3_moe"),
        MoEPreset("qwen1.5-moe-a2.7b", 2048, 1408, 60, 4, 5632, 24, "qwen2_moe"),
        MoEPreset("deepseek-v2-lite", 2048, 1408, 64, 6, 2 * 1408, 26, "deepseek_v2"),
        MoEPreset("olmoe-1b-7b", 2048, 1024, 64, 8, 0, 16, "olmoe"),
        MoEPreset("mixtral-8x7b", 4096, 14336, 8, 2, 0, 32, "mixtral"),
    )
}


def get_preset(name: str) -> MoEPreset:
    if name not in PRESETS:
        raise BeamError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
