"""Expert backends: the same function as transformers' experts, and masked pairs never computed."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from beam_moe.experts import ExpertWeights, available_backends, get_backend
from beam_moe.families import family_for
from beam_moe.tiny_models import tiny_model

BACKENDS = ["reference", "grouped"]


class TensorReads(TorchDispatchMode):
    """Records every aten op, other than a view, that touches one of the watched tensors' storage,
    and which experts (slices along the first dimension; "all" for the whole tensor) it touched."""

    def __init__(self, watched):
        super().__init__()
        self.storages = {t.untyped_storage().data_ptr(): t for t in watched}
        self.reads = []
        self.experts = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for value in [] if func.is_view else torch.utils._pytree.tree_leaves((args, kwargs or {})):
            if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() in self.storages:
                self.reads.append(str(func))
                base = self.storages[value.untyped_storage().data_ptr()]
                offset = value.data_ptr() - base.data_ptr()
                whole = value.dim() == base.dim()
                self.experts.add("all" if whole else offset // (base.stride(0) * base.element_size()))
        return func(*args, **(kwargs or {}))


def experts_of(model_type, dtype=torch.float32):
    model = tiny_model(model_type, dtype=dtype)
    family = family_for(model)
    _, block = family.find_blocks(model)[0]
    return family.experts(block)


def routing(tokens, experts, top_k=2, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, ExpertWeights.of(experts).hidden_size, generator=generator).to(dtype)
    ids = torch.stack(
        [torch.randperm(experts.num_experts, generator=generator)[:top_k] for _ in range(tokens)]
    )
    weights = torch.rand(tokens, top_k, generator=generator).to(dtype)
    return hidden, ids, weights


def test_auto_picks_native_on_cpu():
    """The set-up command builds the native op, so "auto" on a CPU is `native` (which hands
    float32 and non-SwiGLU experts to `grouped`)."""
    assert {"grouped", "native"} <= set(available_backends())
    assert get_backend("auto", torch.device("cpu")) is get_backend("native")


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_transformers_experts_at_topk(family, backend):
    experts = experts_of(family)
    hidden, ids, weights = routing(11, experts)
    expected = type(experts).forward(experts, hidden, ids, weights)
    out, rows, ran = get_backend(backend)(ExpertWeights.of(experts), hidden, ids, weights)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert int(rows) == ids.numel()
    assert ran == backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sentinel_pairs_equal_zero_weight_pairs(family, backend, dtype):
    experts = experts_of(family, dtype)
    hidden, ids, weights = routing(13, experts, seed=1, dtype=dtype)
    keep = torch.rand(ids.shape, generator=torch.Generator().manual_seed(2)) < 0.5
    keep[0] = False  # a token with every expert masked
    zeroed = torch.where(keep, weights, torch.zeros_like(weights))
    expected = type(experts).forward(experts, hidden, ids, zeroed)
    sentinel = torch.where(keep, ids, experts.num_experts)
    out, rows, _ = get_backend(backend)(ExpertWeights.of(experts), hidden, sentinel, zeroed)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, expected, rtol=0, atol=tolerance)
    assert int(rows) == int(keep.sum())
    assert torch.all(out[0] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_masked_runs_no_expert_gemm(backend):
    experts = experts_of("qwen3_moe")
    hidden, ids, weights = routing(9, experts)
    sentinel = torch.full_like(ids, experts.num_experts)
    with TensorReads([experts.gate_up_proj, experts.down_proj]) as reads:
        out, rows, _ = get_backend(backend)(
            ExpertWeights.of(experts), hidden, sentinel, torch.zeros_like(weights)
        )
    assert reads.reads == []
    assert int(rows) == 0
    assert torch.equal(out, torch.zeros_like(hidden))


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_kept_experts_are_read(backend):
    experts = experts_of("qwen3_moe")
    hidden, ids, weights = routing(1, experts, top_k=2)
    keep = torch.tensor([[True, False]])
    sentinel = torch.where(keep, ids, experts.num_experts)
    kept_expert = int(ids[0, 0])
    with torch.no_grad(), TensorReads([experts.gate_up_proj, experts.down_proj]) as reads:  # inference
        get_backend(backend)(ExpertWeights.of(experts), hidden, sentinel, weights)
    assert reads.reads, "the kept expert must be computed"
    assert reads.experts == {kept_expert}, "no other expert's weights, and not the whole tensor"
    masked_expert = int(ids[0, 1])
    # The GEMMs see only the kept expert's rows: its output equals that expert alone.
    w = ExpertWeights.of(experts)
    alone = w.activation(hidden @ w.up[kept_expert]) @ w.down[kept_expert] * weights[0, 0]
    out = get_backend(backend)(w, hidden, sentinel, weights).output
    torch.testing.assert_close(out[0], alone[0], rtol=0, atol=1e-6)
    assert masked_expert != kept_expert


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_transformers_experts(backend):
    experts = experts_of("qwen3_moe")
    hidden, ids, weights = routing(7, experts, seed=3)
    hidden.requires_grad_(True)
    weights.requires_grad_(True)
    expected = type(experts).forward(experts, hidden, ids, weights)
    grads_expected = torch.autograd.grad(expected.square().sum(), [hidden, weights, experts.gate_up_proj])
    out = get_backend(backend)(ExpertWeights.of(experts), hidden, ids, weights).output
    grads = torch.autograd.grad(out.square().sum(), [hidden, weights, experts.gate_up_proj])
    for got, want in zip(grads, grads_expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_unknown_backend_is_refused():
    from beam_moe import BeamError

    with pytest.raises(
        BeamError, match="unknown expert backend 'fast'; available: reference, grouped, native"
    ):
        get_backend("fast")


NOT_SILU_GATED = {"gpt_oss"}  # clamped GLU on interleaved gate/up columns, with biases


def test_silu_gate_is_declared_exactly_where_the_gate_is_silu(family):
    """`gated_silu` is what the fused kernel trusts: ExpertWeights.of declares it for the families
    whose gate computes silu(gate) * up on [gate | up], and only for them."""
    w = ExpertWeights.of(experts_of(family))
    assert w.gated_silu == (family not in NOT_SILU_GATED)
    h = torch.randn(5, w.up.shape[-1], generator=torch.Generator().manual_seed(0))
    gate, up = h.chunk(2, dim=-1)
    silu_gated = torch.nn.functional.silu(gate) * up
    if w.gated_silu:
        torch.testing.assert_close(w.activation(h), silu_gated, rtol=0, atol=0)
    else:
        assert not torch.allclose(w.activation(h), silu_gated)
