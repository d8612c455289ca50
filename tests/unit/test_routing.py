"""Property tests of the routing function: random T, K, E, masks and dtypes."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from beam_moe import apply_mask, to_sentinel
from beam_moe.routing import apply_slot_mask


@st.composite
def routings(draw):
    num_experts = draw(st.integers(1, 64))
    top_k = draw(st.integers(1, min(num_experts, 8)))
    tokens = draw(st.integers(0, 40))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]))
    seed = draw(st.integers(0, 2**31 - 1))
    threshold = draw(st.floats(0.01, 0.99))
    scale = draw(st.sampled_from([0.0, 0.1, 1.0, 10.0]))
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(tokens, num_experts, generator=generator)
    ids = torch.argsort(scores, dim=1, descending=True)[:, :top_k]
    weights = torch.rand(tokens, top_k, generator=generator).to(dtype)
    logits = torch.randn(tokens, num_experts, generator=generator) * scale
    return weights, ids, logits, threshold, num_experts


@settings(max_examples=200, deadline=None)
@given(routings())
def test_keep_is_sigmoid_of_gathered_logits_at_threshold(case):
    weights, ids, logits, threshold, _ = case
    routing = apply_mask(weights, ids, logits, threshold)
    expected = torch.sigmoid(logits.gather(1, ids)) >= threshold
    assert routing.keep.dtype == torch.bool
    assert routing.keep.shape == ids.shape
    assert torch.equal(routing.keep, expected)
    assert torch.equal(routing.ids, ids)


@settings(max_examples=200, deadline=None)
@given(routings())
def test_weights_are_exactly_g_times_keep_in_the_router_dtype(case):
    weights, ids, logits, threshold, _ = case
    routing = apply_mask(weights, ids, logits, threshold)
    assert routing.weights.dtype == weights.dtype
    assert torch.equal(routing.weights, torch.where(routing.keep, weights, torch.zeros_like(weights)))


@settings(max_examples=200, deadline=None)
@given(routings())
def test_renormalised_weights_keep_the_topk_sum(case):
    weights, ids, logits, threshold, _ = case
    routing = apply_mask(weights.double(), ids, logits, threshold, renormalize=True)
    kept_any = routing.keep.any(dim=-1)
    sums = routing.weights.sum(dim=-1)
    torch.testing.assert_close(sums[kept_any], weights.double().sum(dim=-1)[kept_any])
    assert torch.all(sums[~kept_any] == 0)
    assert torch.all(routing.weights[~routing.keep] == 0)


@settings(max_examples=200, deadline=None)
@given(routings())
def test_sentinel_marks_exactly_the_masked_slots(case):
    weights, ids, logits, threshold, num_experts = case
    routing = apply_mask(weights, ids, logits, threshold)
    backend_ids = to_sentinel(ids, routing.keep, num_experts)
    assert backend_ids.dtype == ids.dtype
    assert torch.equal(backend_ids == num_experts, ~routing.keep)
    assert torch.equal(backend_ids[routing.keep], ids[routing.keep])


@settings(max_examples=200, deadline=None)
@given(routings(), st.booleans(), st.booleans())
def test_checking_all_kept_on_the_host_changes_no_value(case, renormalize, keep_everything):
    """The serving path's host check gives exactly the routing of the plain path, records whether
    every slot is kept, and then hands back the router's own weights (g * 1 is g)."""
    weights, ids, logits, threshold, _ = case
    if keep_everything:
        logits = logits.abs() + 10.0
    slot_logits = logits.gather(1, ids)
    plain = apply_slot_mask(weights, ids, slot_logits, threshold, renormalize=renormalize)
    checked = apply_slot_mask(
        weights, ids, slot_logits, threshold, renormalize=renormalize, check_all_kept=True
    )
    assert plain.all_kept is None
    assert checked.all_kept == bool(plain.keep.all())
    assert torch.equal(checked.keep, plain.keep)
    assert torch.equal(checked.soft, plain.soft)
    assert checked.weights.dtype == plain.weights.dtype
    assert torch.equal(checked.weights, plain.weights)
    if checked.all_kept:
        assert checked.weights is weights


def test_checking_all_kept_is_skipped_when_training():
    """With a gradient to the mask head the straight-through path runs (no host sync, no shortcut)."""
    weights = torch.rand(3, 2)
    slot_logits = torch.full((3, 2), 5.0, requires_grad=True)
    routing = apply_slot_mask(
        weights, torch.zeros(3, 2, dtype=torch.long), slot_logits, 0.5, check_all_kept=True
    )
    assert routing.all_kept is None
    routing.weights.sum().backward()
    assert slot_logits.grad is not None and bool((slot_logits.grad != 0).all())
