"""The router-aware mask head (BeamConfig(head="router")): z_k = x · W_m[id_k] + a · log(g_k / max g) + b."""

import json
import math

import pytest
import torch

from beam_moe import (
    BeamConfig,
    BeamError,
    attach,
    beam_stats,
    from_pretrained,
    get_attachment,
    load_beam,
    save_beam,
)
from beam_moe.base_models import load_base_model
from beam_moe.eval.baselines import using_baseline
from beam_moe.families import family_for
from beam_moe.mask import ROUTER_FEATURE_FLOOR, MaskHead, router_feature
from beam_moe.tiny_models import tiny_model
from beam_moe.train.budget import calibrate_router_heads, measure_avg_k
from helpers.batches import token_batch
from helpers.masking import randomize_heads
from helpers.serving_models import PROMPTS, ROUTER_SCALE, save_base

pytestmark = pytest.mark.usefixtures("one_thread")


def batches(seeds=(0, 1)):
    out = []
    for seed in seeds:
        ids = token_batch(seed=seed, batch=2, length=16)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def recorded_keeps(model, tokens):
    with torch.no_grad(), beam_stats(model, record=True) as stats:
        model(tokens)
    return [torch.cat([r.keep for r in layer]) for layer in stats.records]


def test_router_feature_is_the_log_weight_ratio_to_the_top_slot():
    g = torch.tensor([[0.5, 0.25, 0.0], [0.0, 0.0, 0.0], [2.0, 1.0, 1.0]])
    r = router_feature(g)
    expected = torch.tensor(
        [[0.0, math.log(0.5), -ROUTER_FEATURE_FLOOR], [0.0, 0.0, 0.0], [0.0, math.log(0.5), math.log(0.5)]]
    )
    torch.testing.assert_close(r, expected)


def test_slot_logits_match_a_hand_computation():
    torch.manual_seed(0)
    head = MaskHead(4, 6, router_aware=True, init="normal", init_std=0.5)
    with torch.no_grad():
        head.router_scale.fill_(1.7)
        head.router_offset.fill_(-0.3)
    x = torch.randn(3, 4)
    ids = torch.tensor([[0, 5], [2, 3], [1, 1]])
    g = torch.tensor([[0.7, 0.3], [0.2, 0.8], [0.5, 0.5]])
    expected = torch.empty(3, 2)
    for t in range(3):
        for k in range(2):
            ratio = g[t, k] / g[t].max()
            expected[t, k] = x[t] @ head.weight[ids[t, k]] + 1.7 * math.log(ratio) - 0.3
    torch.testing.assert_close(head.slot_logits(x, ids, g), expected)
    torch.testing.assert_close(
        head.slot_logits(x.repeat(4, 1), ids.repeat(4, 1), g.repeat(4, 1)), expected.repeat(4, 1)
    )
    with pytest.raises(BeamError, match="needs the router's Top-K weights"):
        head.slot_logits(x, ids)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_fresh_router_head_reproduces_base_logits(family, mode):
    model = tiny_model(family)
    model.train(mode == "train")
    tokens = token_batch()
    with torch.no_grad():
        torch.manual_seed(0)
        base = model(tokens).logits
        attach(model, BeamConfig(head="router"))
        torch.manual_seed(0)
        out = model(tokens).logits
    assert (out - base).abs().max() <= 1e-6


def test_router_head_with_zero_weights_is_threshold_skipping(family):
    """Every family's router (softmax, sigmoid, grouped, scaled, biased): the same slots as the baseline."""
    model = tiny_model(family)
    with torch.no_grad():  # tiny random routers give nearly equal Top-K weights: make them decisive
        for _, block in family_for(model).find_blocks(model):
            weight = family_for(model).router_weight(family_for(model).router(block))
            if not weight.any():  # a zero-initialised router (ERNIE) ties every expert
                weight.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(0))
            weight.mul_(ROUTER_SCALE.get(family, 30.0))
    attach(model, BeamConfig(head="router"))
    tokens = token_batch(length=16)
    dropped = 0
    for threshold in (0.3, 0.8, 0.95):
        for layer in get_attachment(model).layers:
            layer.head.set_router_threshold(threshold)
        by_head = recorded_keeps(model, tokens)
        with using_baseline(model, "threshold", threshold):
            by_baseline = recorded_keeps(model, tokens)
        for head_keep, baseline_keep in zip(by_head, by_baseline, strict=True):
            assert torch.equal(head_keep, baseline_keep)
        dropped += sum(int((~k).sum()) for k in by_head)
    assert dropped > 0, "some threshold drops some slots"


def test_calibrated_start_is_the_calibrated_threshold_baseline():
    model = attach(tiny_model("qwen3_moe", num_experts_per_tok=4), BeamConfig(head="router"))
    data = batches()
    threshold = calibrate_router_heads(model, data, target=2.0)
    avg_k = measure_avg_k(model, data)
    assert abs(avg_k - 2.0) <= 0.1
    tokens = data[0]["input_ids"]
    by_head = recorded_keeps(model, tokens)
    with using_baseline(model, "threshold", threshold):
        by_baseline = recorded_keeps(model, tokens)
        assert measure_avg_k(model, data) == pytest.approx(avg_k, abs=1e-12)
    for head_keep, baseline_keep in zip(by_head, by_baseline, strict=True):
        assert torch.equal(head_keep, baseline_keep)


def test_straight_through_gradient_reaches_the_router_terms():
    model = attach(tiny_model("qwen3_moe"), BeamConfig(head="router")).train()
    for layer in get_attachment(model).layers:
        layer.head.set_router_threshold(0.5)
    model(token_batch()).logits.float().pow(2).mean().backward()
    for layer in get_attachment(model).layers:
        assert layer.head.router_scale.grad is not None and layer.head.router_scale.grad.abs() > 0
        assert layer.head.router_offset.grad is not None and layer.head.router_offset.grad.abs() > 0
        assert layer.head.weight.grad.abs().sum() > 0


def trained_router_model(family="qwen3_moe", **overrides):
    model = attach(tiny_model(family, **overrides), BeamConfig(head="router"))
    randomize_heads(model, seed=1, std=0.3)
    for i, layer in enumerate(get_attachment(model).layers):
        with torch.no_grad():
            layer.head.router_scale.fill_(1.5 + i)
            layer.head.set_router_threshold(0.4)
    return model


def test_save_and_load_round_trip(tmp_path):
    model = trained_router_model()
    save_beam(model, tmp_path / "adapter")
    document = json.loads((tmp_path / "adapter" / "beam_config.json").read_text())
    assert document["format_version"] == 2 and document["config"]["head"] == "router"
    loaded = load_beam(tiny_model("qwen3_moe"), tmp_path / "adapter")
    for a, b in zip(get_attachment(model).layers, get_attachment(loaded).layers, strict=True):
        for (name, p), (_, q) in zip(a.head.named_parameters(), b.head.named_parameters(), strict=True):
            assert torch.equal(p, q), name
    tokens = token_batch()
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, loaded(tokens).logits)


def test_version_1_adapters_still_load_as_the_linear_head(tmp_path):
    """An adapter written before the router-aware head (format version 1, no "head" key)."""
    model = attach(tiny_model("qwen3_moe"), BeamConfig(head="linear"))
    randomize_heads(model, seed=2)
    path = save_beam(model, tmp_path / "v1")
    document = json.loads((path / "beam_config.json").read_text())
    document["format_version"] = 1
    del document["config"]["head"]
    (path / "beam_config.json").write_text(json.dumps(document))
    loaded = load_beam(tiny_model("qwen3_moe"), path)
    assert get_attachment(loaded).config.head == "linear"
    tokens = token_batch()
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, loaded(tokens).logits)


def test_a_router_adapter_without_its_router_terms_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from beam_moe.adapter import _sha256

    path = save_beam(trained_router_model(), tmp_path / "adapter")
    tensors = {k: v for k, v in load_file(path / "beam_adapter.safetensors").items() if "router_" not in k}
    save_file(tensors, path / "beam_adapter.safetensors")
    document = json.loads((path / "beam_config.json").read_text())
    document["weights"]["sha256"] = _sha256(path / "beam_adapter.safetensors")
    (path / "beam_config.json").write_text(json.dumps(document))
    with pytest.raises(BeamError, match="missing"):
        load_beam(tiny_model("qwen3_moe"), path)


def test_merged_checkpoint_computes_the_same_head(tmp_path):
    from beam_moe.merged import export_merged

    base = save_base("qwen3_moe", tmp_path / "base")
    model = attach(load_base_model(base), BeamConfig(head="router"))
    randomize_heads(model, seed=3, std=0.3)
    for layer in get_attachment(model).layers:
        with torch.no_grad():
            layer.head.router_scale.fill_(1.5)
        layer.head.set_router_threshold(0.3)
    save_beam(model, tmp_path / "adapter")
    merged = export_merged(tmp_path / "adapter", tmp_path / "merged")
    loaded = from_pretrained(merged)
    tokens = torch.tensor([PROMPTS[1]])
    with torch.no_grad(), beam_stats(model) as s1, beam_stats(loaded) as s2:
        assert torch.equal(model(tokens).logits, loaded(tokens).logits)
    assert s1.kept_pairs == s2.kept_pairs < s1.routed_pairs
