"""MoE-layer FLOPs: the paper's arithmetic, hand-checked numbers for every preset, and model-derived shapes."""

import json

import pytest

from beam_moe import BeamError, attach
from beam_moe.cli import main
from beam_moe.eval.flops import flops_report, folder_shapes, measured_flops, model_shapes, preset_shapes
from beam_moe.presets import PRESETS
from beam_moe.tiny_models import save_tiny, tiny_model

# Hand-checked per-token FLOPs of one MoE layer (2 FLOPs per multiply-add; a SwiGLU expert is
# H x 2I up plus I x H down = 3HI multiply-adds; router and mask head H x E each):
#   preset             routed expert 6HI          shared 6H*I_s            router 2HE     layers  K
HAND = {
    "qwen3-30b-a3b": (6 * 2048 * 768, 0, 2 * 2048 * 128, 48, 8),  # 9,437,184 / 0 / 524,288
    "qwen1.5-moe-a2.7b": (
        6 * 2048 * 1408,
        6 * 2048 * 5632,
        2 * 2048 * 60,
        24,
        4,
    ),  # 17,301,504 / 69,206,016 / 245,760
    "deepseek-v2-lite": (
        6 * 2048 * 1408,
        6 * 2048 * 2816,
        2 * 2048 * 64,
        26,
        6,
    ),  # 17,301,504 / 34,603,008 / 262,144
    "olmoe-1b-7b": (6 * 2048 * 1024, 0, 2 * 2048 * 64, 16, 8),  # 12,582,912 / 0 / 262,144
    "mixtral-8x7b": (6 * 4096 * 14336, 0, 2 * 4096 * 8, 32, 2),  # 352,321,536 / 0 / 65,536
}


def test_hand_numbers_cover_every_preset():
    assert set(HAND) == set(PRESETS)


@pytest.mark.parametrize("name", sorted(HAND))
def test_every_preset_matches_the_hand_count(name):
    expert, shared, router, layers, k = HAND[name]
    assert (expert, shared, router) == {
        "qwen3-30b-a3b": (9_437_184, 0, 524_288),
        "qwen1.5-moe-a2.7b": (17_301_504, 69_206_016, 245_760),
        "deepseek-v2-lite": (17_301_504, 34_603_008, 262_144),
        "olmoe-1b-7b": (12_582_912, 0, 262_144),
        "mixtral-8x7b": (352_321_536, 0, 65_536),
    }[name]
    avg_k = k / 2
    report = flops_report(preset_shapes(name), avg_k)
    assert report["moe_layers"] == layers
    assert report["expert_flops"] == expert
    assert report["base"] == {
        "routed": layers * k * expert,
        "shared": layers * shared,
        "router": layers * router,
        "mask_head": 0,
        "experts": layers * (k * expert + shared),
        "total": layers * (k * expert + shared + router),
    }
    assert report["masked"]["routed"] == layers * avg_k * expert
    assert (
        report["masked"]["mask_head"] == layers * router
    )  # the mask head is one H x E matrix, like the router
    base_total = layers * (k * expert + shared + router)
    masked_total = layers * (avg_k * expert + shared + 2 * router)
    assert report["moe_flops_reduction"] == pytest.approx(1 - masked_total / base_total, rel=1e-12)
    assert report["max_reduction"] == pytest.approx(
        1 - (shared + 2 * router) / (k * expert + shared + router)
    )
    assert report["max_expert_reduction"] == pytest.approx(k * expert / (k * expert + shared))
    assert len(report["per_layer"]) == layers
    assert "2 FLOPs per multiply-add" in report["convention"]
    assert "not counted" in report["convention"]


def test_paper_arithmetic():
    # Qwen1.5-MoE-A2.7B: the shared expert equals its 4 routed experts, so BEAM saves at most 50%.
    qwen15 = flops_report(preset_shapes("qwen1.5-moe-a2.7b"), 0.0)
    assert qwen15["max_expert_reduction"] == pytest.approx(0.5)
    assert 0.49 < qwen15["max_reduction"] < 0.5  # router and mask head still run
    # Qwen3-30B-A3B at Avg-K 1.23 of 8: about 85% of the MoE-layer FLOPs saved.
    qwen3 = flops_report(preset_shapes("qwen3-30b-a3b"), 1.23)
    assert qwen3["expert_flops_reduction"] == pytest.approx(1 - 1.23 / 8)  # 84.6%
    assert qwen3["moe_flops_reduction"] == pytest.approx(0.85, abs=0.02)  # 83.4% with router and mask head


def test_no_mask_head_for_training_free_policies():
    with_head = flops_report(preset_shapes("olmoe-1b-7b"), 4.0)
    without = flops_report(preset_shapes("olmoe-1b-7b"), 4.0, mask_head=False)
    assert without["masked"]["mask_head"] == 0
    assert without["moe_flops_reduction"] > with_head["moe_flops_reduction"]


@pytest.mark.parametrize("bad", [-0.1, 8.5, float("nan")])
def test_avg_k_out_of_range_is_refused(bad):
    with pytest.raises(BeamError, match="Avg-K must lie between 0 and Top-K = 8"):
        flops_report(preset_shapes("qwen3-30b-a3b"), bad)


def test_shapes_from_real_transformers_modules():
    # tiny configs: hidden 64, 8 experts, top-2; expert intermediate 32 (Mixtral/OLMoE: 128)
    expected = {
        "qwen3_moe": (3 * 64 * 32, 0),
        "qwen2_moe": (3 * 64 * 32, 3 * 64 * 64 + 64),  # shared expert of 64 and its sigmoid gate (H -> 1)
        "deepseek_v3": (3 * 64 * 32, 3 * 64 * 32),  # one shared expert of moe_intermediate_size
        "mixtral": (3 * 64 * 128, 0),
        "olmoe": (3 * 64 * 128, 0),
    }
    for family, (expert, shared) in expected.items():
        shapes = model_shapes(tiny_model(family))
        assert len(shapes) == 2
        assert (shapes[0].hidden_size, shapes[0].num_experts, shapes[0].top_k) == (64, 8, 2)
        assert (shapes[0].expert_macs, shapes[0].shared_macs) == (expert, shared), family


def test_measured_flops_counts_unmasked_layers_at_top_k():
    from beam_moe import BeamConfig

    model = attach(tiny_model("qwen3_moe"), BeamConfig(layers=[1]))
    report = measured_flops(model, {"model.layers.1.mlp": 1.0}, mask_head=True)
    expert, router = 2 * 3 * 64 * 32, 2 * 64 * 8
    assert report["masked"]["routed"] == (2 + 1) * expert
    assert report["masked"]["mask_head"] == router  # only layer 1 has a mask head
    assert report["avg_k"] == 1.5


def test_cli_preset_and_model_folder(tmp_path, capsys):
    assert main(["flops", "--preset", "qwen3-30b-a3b", "--avg-k", "1.23", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["moe_flops_reduction"] == pytest.approx(0.8335, abs=1e-4)
    assert report["max_reduction"] == pytest.approx(0.9862, abs=1e-4)
    assert "per_layer" not in report

    model = save_tiny("qwen2_moe", tmp_path / "model")
    attach(model)
    shapes, name = folder_shapes(tmp_path / "model")
    assert (shapes, name) == (model_shapes(model), str(tmp_path / "model"))
    assert main(["flops", "--model", str(tmp_path / "model"), "--avg-k", "1", "--per-layer", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["shared_flops"] == 2 * (3 * 64 * 64 + 64)
    assert len(report["per_layer"]) == 2

    assert main(["flops", "--preset", "qwen3-30b-a3b", "--avg-k", "1.23"]) == 0
    assert "83.4%" in capsys.readouterr().out


def test_cli_bad_input(tmp_path, capsys):
    assert main(["flops", "--preset", "mixtral-8x7b", "--avg-k", "3"]) == 2
    assert "between 0 and Top-K = 2" in capsys.readouterr().err
    assert main(["flops", "--model", str(tmp_path / "nowhere"), "--avg-k", "1"]) == 2
    assert "does not exist" in capsys.readouterr().err
