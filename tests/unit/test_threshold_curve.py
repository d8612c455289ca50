"""The threshold -> Avg-K curve and the per-request budget rules shared by vLLM and transformers."""

import math

import pytest
import torch

from beam_moe.errors import BeamError
from beam_moe.routing import apply_slot_mask
from beam_moe.threshold_curve import DEFAULT_THRESHOLDS, ThresholdCurve, requested_threshold


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def curve() -> ThresholdCurve:
    # Avg-K falls with the threshold; a noisy rise at 0.6 and a flat stretch at 0.8-0.9
    return ThresholdCurve([0.1, 0.3, 0.5, 0.6, 0.8, 0.9], [7.5, 6.0, 3.0, 3.2, 1.0, 1.0], top_k=8)


def test_budget_maps_to_the_interpolated_threshold_in_logit_space():
    c = curve()
    t = c.threshold_for(4.5)  # halfway between 6.0 (0.3) and 3.0 (0.5)
    assert logit(t) == pytest.approx((logit(0.3) + logit(0.5)) / 2)
    assert c.avg_k_at(t) == pytest.approx(4.5)
    assert c.threshold_for(6.0) == 0.3 and c.threshold_for(7.5) == 0.1


def test_noise_never_makes_a_budget_rise_with_the_threshold():
    c = curve()
    assert c.envelope == [7.5, 6.0, 3.0, 3.0, 1.0, 1.0]
    assert c.threshold_for(3.0) == 0.5, "the first threshold that reaches it"
    assert c.threshold_for(1.0) == 0.8, "on a flat stretch, the smallest threshold"
    thresholds = [c.threshold_for(k) for k in (7.0, 5.0, 3.5, 2.0, 1.2)]
    assert thresholds == sorted(thresholds)


@pytest.mark.parametrize("budget", [0.5, 7.6, math.nan])
def test_budget_outside_the_calibrated_range_is_refused_with_the_range(budget):
    with pytest.raises(BeamError, match=r"beam_avg_k must lie between 1\.000 and 7\.500"):
        curve().threshold_for(budget)


def test_requested_threshold_rules():
    c = curve()
    assert requested_threshold(None, c) is None
    assert requested_threshold({"other": 1}, c) is None
    assert requested_threshold({"beam_threshold": 0.7}, c) == 0.7
    assert requested_threshold({"beam_avg_k": 6.0}, c) == 0.3
    cases = [
        ({"beam_threshold": 1.0}, "beam_threshold must lie strictly between 0 and 1"),
        ({"beam_threshold": 0}, "beam_threshold must lie strictly between 0 and 1"),
        ({"beam_threshold": "0.5"}, "beam_threshold must be a number"),
        ({"beam_avg_k": True}, "beam_avg_k must be a number"),
        ({"beam_avg_k": 2.0, "beam_threshold": 0.5}, "not both"),
    ]
    for args, message in cases:
        with pytest.raises(BeamError, match=message):
            requested_threshold(args, c)
    with pytest.raises(BeamError, match="beam_avg_k needs a calibrated checkpoint"):
        requested_threshold({"beam_avg_k": 2.0}, None)


def test_curve_round_trips_and_bad_curves_are_refused():
    c = curve()
    assert ThresholdCurve.from_dict(c.to_dict()) == c
    with pytest.raises(BeamError, match="strictly increasing"):
        ThresholdCurve([0.5, 0.3], [2.0, 3.0], top_k=8)
    with pytest.raises(BeamError, match="one Avg-K per threshold"):
        ThresholdCurve([0.3, 0.5], [2.0], top_k=8)
    with pytest.raises(BeamError, match=r"\[0, Top-K = 8\]"):
        ThresholdCurve([0.3, 0.5], [9.0, 3.0], top_k=8)
    with pytest.raises(BeamError, match="does not parse"):
        ThresholdCurve.from_dict({"thresholds": [0.3, 0.5]}, source="x")


def test_default_grid_includes_the_papers_threshold():
    assert 0.5 in DEFAULT_THRESHOLDS and len(DEFAULT_THRESHOLDS) == 33
    assert list(DEFAULT_THRESHOLDS) == sorted(DEFAULT_THRESHOLDS)


def test_per_token_threshold_equals_each_token_at_its_own_threshold():
    torch.manual_seed(0)
    weights, ids = torch.rand(6, 4), torch.randint(0, 8, (6, 4))
    z = torch.randn(6, 4)
    per_token = torch.tensor([0.2, 0.5, 0.8, 0.5, 0.35, 0.65])
    mixed = apply_slot_mask(weights, ids, z, per_token)
    for t in range(6):
        alone = apply_slot_mask(weights[t : t + 1], ids[t : t + 1], z[t : t + 1], float(per_token[t]))
        assert torch.equal(mixed.keep[t], alone.keep[0]) and torch.equal(mixed.weights[t], alone.weights[0])
    assert len({tuple(mixed.keep[t].tolist()) for t in range(6)}) > 1
