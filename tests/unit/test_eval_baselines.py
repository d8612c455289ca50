"""Baselines as routing policies: their rules on hand-made routings, no-op settings equal the base model,
they skip compute like BEAM, and calibration finds a parameter for a target Avg-K."""

import pytest
import torch

from beam_moe import BeamError, attach, beam_stats, set_routing_policy
from beam_moe.eval import BASELINES, apply_baseline, calibrate, get_baseline, perplexity, using_baseline
from beam_moe.eval.baselines import (
    RandomMask,
    ThresholdSkipping,
    TopKPruning,
    TopPRouting,
    topk_probabilities,
)
from beam_moe.tiny_models import BYTE_VOCAB_SIZE, byte_tokenizer, tiny_model
from helpers.batches import token_batch

# Two tokens, K = 4 slots; the router's weights are not sorted and not normalised (scaled by 2.5).
WEIGHTS = 2.5 * torch.tensor([[0.1, 0.5, 0.3, 0.1], [0.25, 0.25, 0.25, 0.25]])
IDS = torch.tensor([[3, 0, 7, 5], [1, 2, 4, 6]])
TEXT = [
    "Mount Everest is Earth's highest mountain above sea level.",
    "The cello is a bowed string instrument.",
]


def keep(policy) -> list[list[bool]]:
    return policy(torch.zeros(2, 8), torch.zeros(2, 8), WEIGHTS, IDS).tolist()


def test_probabilities_over_the_top_k():
    assert torch.allclose(topk_probabilities(WEIGHTS), WEIGHTS / 2.5)
    assert torch.equal(topk_probabilities(torch.zeros(1, 4)), torch.full((1, 4), 0.25))


def test_top_k_pruning_keeps_the_most_probable():
    assert keep(TopKPruning(2)) == [
        [False, True, True, False],
        [True, True, False, False],
    ]  # ties: slot order
    assert keep(TopKPruning(0)) == [[False] * 4] * 2
    assert keep(TopKPruning(4)) == [[True] * 4] * 2


def test_top_p_keeps_until_the_cumulative_probability_reaches_p():
    assert keep(TopPRouting(0.5)) == [[False, True, False, False], [True, True, False, False]]
    assert keep(TopPRouting(0.8)) == [[False, True, True, False], [True, True, True, True]]
    assert keep(TopPRouting(0.0)) == [
        [False, True, False, False],
        [True, False, False, False],
    ]  # at least one
    assert keep(TopPRouting(1.0)) == [[True] * 4] * 2


def test_threshold_skipping_drops_experts_below_a_fraction_of_the_top():
    assert keep(ThresholdSkipping(0.5)) == [[False, True, True, False], [True] * 4]
    assert keep(ThresholdSkipping(1.0)) == [[False, True, False, False], [True] * 4]
    assert keep(ThresholdSkipping(0.0)) == [[True] * 4] * 2


def test_random_mask_rate_and_repeatability():
    weights, ids = torch.ones(4000, 4), torch.zeros(4000, 4, dtype=torch.long)
    draws = RandomMask(0.3, seed=1)(None, None, weights, ids)
    assert 0.28 < draws.float().mean() < 0.32
    assert torch.equal(draws, RandomMask(0.3, seed=1)(None, None, weights, ids))
    assert not torch.equal(draws, RandomMask(0.3, seed=2)(None, None, weights, ids))


@pytest.mark.parametrize(
    "family", ["qwen3_moe", "qwen2_moe", "deepseek_v2", "deepseek_v3", "mixtral", "gpt_oss"]
)
def test_no_op_settings_equal_the_base_model(family):
    reference = tiny_model(family)
    tokens = token_batch(seed=4)
    with torch.no_grad():
        base = reference(tokens).logits
    model = attach(tiny_model(family))
    top_k = model.config.num_experts_per_tok
    for name, spec in BASELINES.items():
        with torch.no_grad(), using_baseline(model, name, spec.noop_value(top_k)), beam_stats(model) as stats:
            logits = model(tokens).logits
        assert torch.equal(logits, base), name
        assert stats.avg_k == top_k


def test_no_op_perplexity_equals_the_base_perplexity():
    tokenizer = byte_tokenizer()
    model = tiny_model("qwen2_moe", vocab_size=BYTE_VOCAB_SIZE)
    base = perplexity(model, tokenizer, TEXT)
    attach(model)
    for name, spec in BASELINES.items():
        with using_baseline(model, name, spec.noop_value(2)):
            assert perplexity(model, tokenizer, TEXT).ppl == base.ppl, name


@pytest.mark.parametrize(
    ("name", "value", "expected_avg_k"), [("top_k", 1, 1.0), ("top_p", 0.0, 1.0), ("random", 0.0, 0.0)]
)
def test_baselines_skip_compute_like_beam(name, value, expected_avg_k):
    model = attach(tiny_model("deepseek_v3"))
    with torch.no_grad(), using_baseline(model, name, value), beam_stats(model) as stats:
        model(token_batch())
    assert stats.avg_k == expected_avg_k
    assert stats.computed_rows == stats.kept_pairs
    with torch.no_grad(), beam_stats(model) as after:
        model(token_batch())
    assert after.avg_k == 2.0, "the mask heads decide again after the block"


def test_bad_baseline_names_and_parameters():
    model = attach(tiny_model("qwen3_moe"))
    with pytest.raises(
        BeamError, match="unknown baseline 'top_q'; choose one of top_k, top_p, threshold, random"
    ):
        get_baseline("top_q")
    with pytest.raises(BeamError, match=r"top_k: k must lie in \[0, 2\], got 3"):
        apply_baseline(model, "top_k", 3)
    with pytest.raises(BeamError, match="top_k: k must be a whole number"):
        get_baseline("top_k").check(1.5, top_k=2)
    with pytest.raises(BeamError, match=r"top_p: p must lie in \[0, 1\], got 1.5"):
        get_baseline("top_p").check(1.5, top_k=2)
    with pytest.raises(BeamError, match="threshold: threshold must be a number"):
        get_baseline("threshold").check("high", top_k=2)
    set_routing_policy(model, None)


def test_calibration_reaches_a_target_avg_k():
    tokenizer = byte_tokenizer()
    model = attach(tiny_model("qwen3_moe", vocab_size=BYTE_VOCAB_SIZE, num_experts_per_tok=4))
    found = calibrate(model, tokenizer, "random", 1.5, TEXT, tolerance=0.05, max_tokens=200)
    assert found.reached
    assert abs(found.avg_k - 1.5) <= 0.05
    with using_baseline(model, "random", found.param):
        assert perplexity(model, tokenizer, TEXT, max_tokens=200).avg_k == pytest.approx(found.avg_k)
    threshold = calibrate(model, tokenizer, "threshold", 3.0, TEXT, tolerance=0.1, max_tokens=200)
    assert abs(threshold.avg_k - 3.0) <= 0.1
    pruning = calibrate(model, tokenizer, "top_k", 2.4, TEXT, max_tokens=200)
    assert (pruning.param, pruning.avg_k, pruning.reached) == (2.0, 2.0, False)
    # Top-P always keeps one expert: a target below 1 cannot be reached, and says so.
    floor = calibrate(model, tokenizer, "top_p", 0.5, TEXT, max_tokens=200)
    assert (floor.avg_k, floor.reached) == (1.0, False)
    with pytest.raises(BeamError, match="target Avg-K must lie between 0 and Top-K = 4"):
        calibrate(model, tokenizer, "top_p", 5.0, TEXT)
