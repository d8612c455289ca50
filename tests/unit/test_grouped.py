"""The tuned `grouped` backend: both of its CPU strategies compute the reference function, gather
only kept pairs and read only the kept experts' weights."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from beam_moe.experts import ExpertWeights, get_backend
from beam_moe.experts.grouped import (
    combine_rows,
    combine_rows_deterministic,
    grouped_experts,
    sort_kept_pairs,
)
from beam_moe.families import family_for
from beam_moe.tiny_models import tiny_model

STRATEGIES = ["loop", "grouped_mm"]


def experts_of(model_type="qwen3_moe", dtype=torch.float32, **overrides):
    model = tiny_model(model_type, dtype=dtype, **overrides)
    family = family_for(model)
    return family.experts(family.find_blocks(model)[0][1])


def masked_routing(experts, tokens, top_k, seed, dtype=torch.float32, kept_share=0.5):
    """Fresh random hidden states, distinct ids per token, random weights, and a random mask with
    one token fully masked; masked slots carry the sentinel id E and a NaN weight (never to be used)."""
    g = torch.Generator().manual_seed(seed)
    num_experts = experts.num_experts
    hidden = torch.randn(tokens, ExpertWeights.of(experts).hidden_size, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=g).to(dtype)
    keep = torch.rand(tokens, top_k, generator=g) < kept_share
    keep[0] = False
    sentinel = torch.where(keep, ids, num_experts)
    return hidden, sentinel, torch.where(keep, weights, torch.full_like(weights, float("nan"))), keep


def float64_reference(experts, hidden, ids, weights):
    w = ExpertWeights.of(experts)
    w64 = ExpertWeights(w.up.double(), None, w.down.double(), None, w.activation)
    clean = torch.where(ids < experts.num_experts, weights, torch.zeros_like(weights))
    with torch.no_grad():
        return get_backend("reference")(w64, hidden.double(), ids, clean.double()).output


def relative_error(out, ref):
    return float((out.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_strategies_match_float64_reference(strategy, dtype, tokens):
    experts = experts_of(dtype=dtype)
    hidden, ids, weights, keep = masked_routing(experts, tokens, 2, seed=tokens, dtype=dtype)
    with torch.no_grad():
        out, rows, _ = grouped_experts(ExpertWeights.of(experts), hidden, ids, weights, strategy=strategy)
    assert int(rows) == int(keep.sum())
    assert out.dtype == dtype
    assert torch.all(out[0] == 0), "a token with every expert masked gets exactly zero"
    if keep.any():
        assert relative_error(out, float64_reference(experts, hidden, ids, weights)) < (
            1e-6 if dtype == torch.float32 else 1e-2
        )


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategies_with_biases_and_custom_gate(strategy):
    """gpt-oss: biased experts, transposed storage and its own clamped gate."""
    experts = experts_of("gpt_oss")
    hidden, ids, weights, keep = masked_routing(experts, 9, 2, seed=3)
    clean = torch.where(keep, weights, torch.zeros_like(weights))
    expected = type(experts).forward(experts, hidden, torch.where(keep, ids, 0), clean)
    with torch.no_grad():
        out, rows, _ = grouped_experts(ExpertWeights.of(experts), hidden, ids, weights, strategy=strategy)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    assert int(rows) == int(keep.sum())


class ExpertSlicesRead(TorchDispatchMode):
    """The experts (first-dimension indices) of a weight tensor whose storage an aten op reads."""

    def __init__(self, weight):
        super().__init__()
        self.base = weight.untyped_storage().data_ptr()
        self.step = weight.stride(0) * weight.element_size()
        self.experts = set()
        self.whole = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            for value in torch.utils._pytree.tree_leaves((args, kwargs or {})):
                if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() == self.base:
                    if value.dim() == 3:
                        self.whole = True
                    else:
                        self.experts.add((value.data_ptr() - self.base) // self.step)
        return func(*args, **(kwargs or {}))


def test_decode_reads_only_the_kept_experts_weights():
    experts = experts_of(num_experts=16)
    hidden, ids, weights, keep = masked_routing(experts, 3, 2, seed=4, kept_share=0.4)
    kept_experts = set(ids[keep].tolist())
    for weight in (experts.gate_up_proj, experts.down_proj):
        with torch.no_grad(), ExpertSlicesRead(weight) as reads:
            grouped_experts(ExpertWeights.of(experts), hidden, ids, weights)
        assert not reads.whole
        assert reads.experts == kept_experts


def test_auto_strategy_supports_autograd():
    experts = experts_of()
    hidden, ids, _, keep = masked_routing(experts, 6, 2, seed=5)
    weights = torch.rand(ids.shape, requires_grad=True)
    hidden.requires_grad_(True)
    out = grouped_experts(ExpertWeights.of(experts), hidden, ids, weights).output
    out.square().sum().backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()
    assert torch.all(weights.grad[~keep] == 0)


def test_sort_keeps_kept_pairs_in_expert_order():
    ids = torch.tensor([[3, 8], [0, 3], [8, 8], [1, 0]])
    pairs = sort_kept_pairs(ids, num_experts=8)
    assert pairs.num_rows == 5
    assert ids.reshape(-1)[pairs.order].tolist() == [0, 0, 1, 3, 3]
    assert pairs.tokens.tolist() == [1, 3, 3, 0, 1]
    assert pairs.offsets.tolist() == [2, 3, 3, 5, 5, 5, 5, 5]


@pytest.mark.parametrize("chunk_bytes", [None, 2 * 6 * 8], ids=["one-pass", "two-row-chunks"])
def test_deterministic_combine_equals_index_add(chunk_bytes, monkeypatch):
    from beam_moe.experts import grouped

    if chunk_bytes:
        monkeypatch.setattr(grouped, "COMBINE_CHUNK_BYTES", chunk_bytes)
    ids = torch.tensor([[2, 5, 9], [9, 9, 9], [1, 2, 3], [4, 9, 1]])
    pairs = sort_kept_pairs(ids, num_experts=9)
    y = torch.randn(pairs.num_rows, 6, dtype=torch.float64)
    row_weights = torch.rand(pairs.num_rows, dtype=torch.float64)
    hidden = torch.zeros(4, 6, dtype=torch.float64)
    expected = combine_rows(y, row_weights, pairs, hidden)
    got = combine_rows_deterministic(y * row_weights.unsqueeze(-1), pairs, hidden)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert torch.all(got[1] == 0)


@pytest.mark.parametrize("chunk_bytes", [None, 3 * 6 * 4], ids=["one-pass", "one-token-chunks"])
def test_keep_all_combine_sums_slots_in_slot_order(chunk_bytes, monkeypatch):
    from beam_moe.experts import grouped

    if chunk_bytes:
        monkeypatch.setattr(grouped, "COMBINE_CHUNK_BYTES", chunk_bytes)
    ids = torch.tensor([[2, 5, 0], [1, 2, 3], [4, 0, 1]])
    pairs = sort_kept_pairs(ids, num_experts=6)
    y = torch.randn(pairs.num_rows, 6)
    row_weights = torch.rand(pairs.num_rows)
    hidden = torch.zeros(3, 6)
    expected = combine_rows_deterministic(y * row_weights.unsqueeze(-1), pairs, hidden)
    assert torch.equal(combine_rows(y, row_weights, pairs, hidden), expected)  # bit for bit


def test_host_and_tensor_sorts_agree():
    from beam_moe.experts.grouped import SMALL_ROUTING, _sort_on_host

    generator = torch.Generator().manual_seed(6)
    ids = torch.randint(0, 9, (SMALL_ROUTING // 4 + 5, 4), generator=generator)  # 8 = masked
    on_device, on_host = sort_kept_pairs(ids, 8), _sort_on_host(ids, 8)
    assert torch.equal(on_device.order, on_host.order)  # torch.sort's order on both paths
    assert torch.equal(on_device.tokens, on_host.tokens)
    assert on_device.spans == on_host.spans
    assert torch.equal(on_device.counts, on_host.counts)
