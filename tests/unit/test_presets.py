import pytest

from beam_moe import BeamError
from beam_moe.presets import PRESETS, get_preset


def test_design_table():
    q3 = get_preset("qwen3-30b-a3b")
    assert (
        q3.hidden_size,
        q3.expert_intermediate,
        q3.num_experts,
        q3.top_k,
        q3.shared_intermediate,
        q3.moe_layers,
    ) == (2048, 768, 128, 8, 0, 48)
    q15 = get_preset("qwen1.5-moe-a2.7b")
    assert q15.shared_intermediate == q15.top_k * q15.expert_intermediate, "shared expert = 4 routed ones"
    assert get_preset("deepseek-v2-lite").shared_intermediate == 2 * 1408
    assert set(PRESETS) == {
        "qwen3-30b-a3b",
        "qwen1.5-moe-a2.7b",
        "deepseek-v2-lite",
        "olmoe-1b-7b",
        "mixtral-8x7b",
    }


def test_unknown_preset():
    with pytest.raises(BeamError, match="unknown preset 'gpt5'; choose one of qwen3-30b-a3b"):
        get_preset("gpt5")
