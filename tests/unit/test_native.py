"""The native decode op (beam_moe.native.decode_keep) against the PyTorch path it replaces.

The set-up command builds the op; these tests fail (rather than skip) where it is not built, since
serving on a CPU would then silently take the slower path.
"""

import pytest
import torch

from beam_moe import MaskHead
from beam_moe.native import available as native_available
from beam_moe.native import decode_keep, library_path
from beam_moe.routing import apply_head, apply_slot_mask


@pytest.fixture(scope="module", autouse=True)
def built():
    assert native_available(), f"not built ({library_path()}): run python -m beam_moe.native build"


def random_head(router_aware: bool, bias: bool, seed: int) -> MaskHead:
    generator = torch.Generator().manual_seed(seed)
    head = MaskHead(64, 16, bias=bias, router_aware=router_aware)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.2)
        if bias:
            head.bias.copy_(torch.randn(16, generator=generator))
        if router_aware:
            head.router_scale.fill_(0.7)
            head.set_router_threshold(0.3)
    return head


def top_k(tokens: int, seed: int, k: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(tokens, 16, generator=generator).softmax(-1)
    weights, ids = scores.topk(k, dim=-1)
    return weights, ids


@pytest.mark.parametrize("router_aware", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("tokens", [1, 3])
def test_decisions_equal_the_pytorch_path(router_aware, bias, dtype, id_dtype, tokens):
    for seed in range(5):
        head = random_head(router_aware, bias, seed)
        hidden = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(100 + seed)).to(dtype)
        weights, ids = top_k(tokens, seed)
        ids = ids.to(id_dtype)
        with torch.no_grad():
            expected = apply_slot_mask(weights, ids, head.slot_logits(hidden, ids, weights), 0.5)
            soft, keep, all_kept = decode_keep(hidden, head, ids, 0.5, weights)
        torch.testing.assert_close(soft, expected.soft, rtol=1e-5, atol=1e-6)
        clear = (expected.soft - 0.5).abs() > 1e-5  # away from a tie, rounding cannot flip a decision
        assert torch.equal(keep[clear], expected.keep[clear])
        assert all_kept == bool(keep.all())
        assert keep.dtype == torch.bool and soft.dtype == torch.float32 and keep.shape == ids.shape


def test_a_fresh_head_keeps_everything():
    for router_aware in (False, True):
        head = MaskHead(64, 16, router_aware=router_aware)
        weights, ids = top_k(2, seed=1)
        _soft, keep, all_kept = decode_keep(torch.randn(2, 64), head, ids, 0.5, weights)
        assert all_kept and bool(keep.all())


def test_all_kept_is_false_when_one_slot_is_dropped():
    head = MaskHead(64, 16, bias=True, router_aware=False)
    weights, ids = top_k(2, seed=2)
    with torch.no_grad():
        head.bias[ids[1, 2]] = -50.0
    _soft, keep, all_kept = decode_keep(torch.randn(2, 64), head, ids, 0.5, weights)
    assert not all_kept
    assert keep.sum() == keep.numel() - 1 and not bool(keep[1, 2])


def test_bad_input_is_refused_with_a_message():
    head = MaskHead(64, 16, router_aware=False)
    _weights, ids = top_k(1, seed=3)
    with pytest.raises(RuntimeError, match="outside"):
        decode_keep(torch.randn(1, 64), head, ids + 16, 0.5)
    with pytest.raises(RuntimeError, match="features"):
        decode_keep(torch.randn(1, 32), head, ids, 0.5)
    with pytest.raises(RuntimeError, match="int32 or int64"):
        decode_keep(torch.randn(1, 64), head, ids.float(), 0.5)


def test_apply_head_takes_the_native_op_only_for_decode_sized_inference():
    """routing.apply_head: the native op at inference for fewer pairs than experts (all_kept then
    known), the PyTorch path with a gradient, for larger steps and for per-token thresholds."""
    head = random_head(router_aware=True, bias=True, seed=4)
    weights, ids = top_k(2, seed=4)  # 8 pairs < 16 experts
    hidden = torch.randn(2, 64)
    with torch.no_grad():
        native = apply_head(head, hidden, weights, ids, 0.5)
        plain = apply_slot_mask(weights, ids, head.slot_logits(hidden, ids, weights), 0.5)
        per_token = apply_head(head, hidden, weights, ids, torch.full((2,), 0.5))
        big_weights, big_ids = top_k(5, seed=5)  # 20 pairs >= 16 experts
        big = apply_head(head, torch.randn(5, 64), big_weights, big_ids, 0.5)
    assert native.all_kept is not None and plain.all_kept is None
    assert torch.equal(native.keep, plain.keep) and torch.equal(native.weights, plain.weights)
    assert per_token.all_kept is None and big.all_kept is None
    trained = apply_head(head, hidden, weights, ids, 0.5)
    assert trained.all_kept is None and trained.weights.requires_grad
