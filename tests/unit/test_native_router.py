"""The native softmax Top-K router (beam_moe.native.softmax_topk, `native_router`) against the
router modules of the families that declare it, on real transformers models; and where it runs.

Like test_native.py, these fail rather than skip where the op is not built.
"""

import copy

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from beam_moe import BeamConfig, attach, beam_stats, detach
from beam_moe.experts import native as native_backend
from beam_moe.families import FAMILIES, family_for
from beam_moe.native import available as native_available
from beam_moe.native import library_path, softmax_topk
from beam_moe.native_router import SOFTMAX_TOPK
from beam_moe.tiny_models import tiny_model
from helpers.masking import randomize_heads

SOFTMAX_TOPK_FAMILIES = [f.model_type for f in FAMILIES.values() if f.router_kind == SOFTMAX_TOPK]


@pytest.fixture(scope="module", autouse=True)
def built():
    assert native_available(), f"not built ({library_path()}): run python -m beam_moe.native build"


def first_router(model):
    family = family_for(model)
    return family.router(family.find_blocks(model)[0][1])


def random_router_weight(router, seed: int):
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=torch.Generator().manual_seed(seed)))


def ran_native_router(run) -> bool:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return any(event.name == "beam_moe::softmax_topk" for event in prof.events())


def test_the_declared_families_are_the_qwen_style_ones():
    assert set(SOFTMAX_TOPK_FAMILIES) == {"qwen3_moe", "qwen2_moe", "olmoe", "qwen3_next", "flex_olmo"}


@pytest.mark.parametrize("model_type", SOFTMAX_TOPK_FAMILIES)
@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_matches_the_router_module_of_every_declared_family(model_type, tokens):
    """What the declaration promises: the op returns what the family's own router module returns
    (logits, Top-K weights, ids) for its bf16 weights, with and without norm_topk_prob.

    The logits are a bf16 matmul whose accumulation order is the CPU kernel's (torch's oneDNN path
    on AVX512-BF16 / AMX sums differently from the op), so they may differ by one bf16 step; the
    rest is the router's own softmax / Top-K / division on the op's logits, exactly. Where the
    logits agree bit for bit (this AVX2 EPYC, every case), all three outputs equal the module's."""
    router = first_router(tiny_model(model_type, dtype=torch.bfloat16))
    random_router_weight(router, seed=tokens)
    hidden = torch.randn(tokens, router.weight.shape[1], generator=torch.Generator().manual_seed(1))
    hidden = hidden.to(torch.bfloat16)
    for normalize in (True, False):
        router.norm_topk_prob = normalize
        with torch.no_grad():
            logits, weights, ids = router(hidden)
        got_logits, got_weights, got_ids = softmax_topk(hidden, router.weight, router.top_k, normalize)
        assert got_logits.dtype == logits.dtype and got_weights.dtype == weights.dtype
        torch.testing.assert_close(got_logits.float(), logits.float(), rtol=2**-7, atol=0)
        probs = torch.softmax(got_logits, dim=-1, dtype=torch.float)
        top, top_ids = torch.topk(probs, router.top_k, dim=-1)
        if normalize:
            top /= top.sum(dim=-1, keepdim=True)
        assert torch.equal(got_ids, top_ids)
        assert torch.equal(got_weights, top.to(logits.dtype))
        if torch.equal(got_logits, logits):
            assert torch.equal(got_ids, ids) and torch.equal(got_weights, weights)


def test_bad_input_is_refused_with_what_was_wrong():
    weight = torch.randn(8, 64)
    with pytest.raises(RuntimeError, match="must be bfloat16"):
        softmax_topk(torch.randn(2, 64).bfloat16(), weight, 2, True)
    with pytest.raises(RuntimeError, match="top_k 9 is not in"):
        softmax_topk(torch.randn(2, 64).bfloat16(), weight.bfloat16(), 9, True)
    with pytest.raises(RuntimeError, match=r"hidden \[T, H\] and weight \[E, H\]"):
        softmax_topk(torch.randn(2, 32).bfloat16(), weight.bfloat16(), 2, True)


def attached_pair():
    model = tiny_model("qwen3_moe", dtype=torch.bfloat16)
    reference = attach(copy.deepcopy(model), BeamConfig(backend="reference"))
    beam = attach(model, BeamConfig(backend="native"))
    for m in (beam, reference):
        random_router_weight(first_router(m), seed=3)
        randomize_heads(m, seed=2)
    return beam, reference


def test_the_native_backend_runs_the_router_natively_and_reference_does_not():
    """With `native` experts the attached router's forward is the op, and the model computes what
    it computes with transformers' router and the reference experts; `reference` keeps
    transformers' router, and detaching restores the module's own forward."""
    beam, reference = attached_pair()
    length = beam.config.num_experts // beam.config.num_experts_per_tok  # decode-sized on every CPU
    tokens = torch.randint(0, beam.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert ran_native_router(lambda: beam(tokens))
        assert not ran_native_router(lambda: reference(tokens))
        out, expected = beam(tokens).logits, reference(tokens).logits
    assert ((out.float() - expected.float()).norm() / expected.float().norm()).item() < 2e-2
    detach(beam)
    assert "forward" not in first_router(beam).__dict__


@pytest.mark.parametrize(("bf16_arithmetic", "amx"), [(False, False), (True, False), (True, True)])
def test_prompt_sized_calls_leave_the_router_to_torch_on_cpus_with_bf16_arithmetic(
    monkeypatch, bf16_arithmetic, amx
):
    """A prompt-sized router call is a dense GEMM that oneDNN's bf16 kernels run faster than the
    op, so on such CPUs it is the module's; the experts stay native unless the CPU has AMX and the
    prompt gives each expert more than AMX_NATIVE_ROWS_PER_EXPERT rows. A decode-sized call is
    native everywhere."""
    monkeypatch.setattr(native_backend, "hardware_bf16", lambda: bf16_arithmetic)
    monkeypatch.setattr(native_backend, "amx_tiles", lambda: amx)
    beam, _ = attached_pair()
    generator = torch.Generator().manual_seed(9)
    decode = torch.randint(0, beam.config.vocab_size, (1, 1), generator=generator)
    # about half the slots kept: several times AMX_NATIVE_ROWS_PER_EXPERT kept rows per expert
    length = 4 * native_backend.AMX_NATIVE_ROWS_PER_EXPERT * beam.config.num_experts
    prompt = torch.randint(0, beam.config.vocab_size, (1, length), generator=generator)
    with torch.no_grad():
        assert ran_native_router(lambda: beam(decode))
        assert ran_native_router(lambda: beam(prompt)) == (not bf16_arithmetic)
        with beam_stats(beam) as stats:
            beam(prompt)
    assert all(calls == {"grouped" if amx else "native": 1} for calls in stats.backends.values())


def test_training_runs_the_router_module():
    """The op has no backward pass: with gradients the router module's own forward runs."""
    beam, _ = attached_pair()
    tokens = torch.randint(0, beam.config.vocab_size, (1, 4), generator=torch.Generator().manual_seed(9))
    first_router(beam).weight.requires_grad_(True)
    assert not ran_native_router(lambda: beam(tokens))


def test_a_deep_copy_of_an_attached_model_routes_with_its_own_router():
    """The router override is a bound method of the layer, so `copy.deepcopy` rebinds it: the copy's
    router computes with the copy's weights, not the original's."""
    beam, _ = attached_pair()
    twin = copy.deepcopy(beam)
    random_router_weight(first_router(twin), seed=11)
    hidden = torch.randn(2, beam.config.hidden_size, generator=torch.Generator().manual_seed(4)).bfloat16()
    with torch.no_grad():
        own = type(first_router(twin)).forward(first_router(twin), hidden)
        routed = first_router(twin).forward(hidden)  # the override, without BEAM's hook
        original = first_router(beam).forward(hidden)
    assert all(torch.equal(a, b) for a, b in zip(routed, own, strict=True))
    assert not torch.equal(routed[0], original[0])
