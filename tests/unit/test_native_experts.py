"""The native expert op (beam_moe.native.kept_experts) and the `native` backend against the
reference backend, on real transformers experts.

Shapes cover every code path of the op: widths that are multiples of 32 run the AVX512-BF16 loops
(where the CPU has them, else the AVX2 ones), multiples of 8 the AVX2 loops, others the portable
ones, and row counts that are not multiples of the 4-row block and token counts of 1-7 cover the
partial blocks. Like test_native.py, these fail rather than skip where the op is not built.
"""

import copy

import pytest
import torch

from beam_moe import BeamConfig, attach, beam_stats
from beam_moe.experts import GROUPED, NATIVE, REFERENCE, ExpertWeights, get_backend
from beam_moe.experts import backend as backend_module
from beam_moe.experts import native as native_backend
from beam_moe.families import family_for
from beam_moe.native import available as native_available
from beam_moe.native import kept_experts, library_path
from beam_moe.tiny_models import tiny_model
from helpers.masking import randomize_heads

CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def built():
    assert native_available(), f"not built ({library_path()}): run python -m beam_moe.native build"


@pytest.fixture(autouse=True)
def fresh_log(monkeypatch):
    monkeypatch.setattr(backend_module, "_LOGGED", set())


def swiglu_experts(experts: int, hidden: int, intermediate: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(experts, 2 * intermediate, hidden, generator=generator) * 0.1).to(torch.bfloat16)
    w2 = (torch.randn(experts, hidden, intermediate, generator=generator) * 0.1).to(torch.bfloat16)
    return w13, w2


def masked_routing(tokens: int, experts: int, top_k: int, hidden: int, seed: int, kept_share: float = 0.5):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=generator).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(experts, generator=generator)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=generator)
    keep = torch.rand(tokens, top_k, generator=generator) < kept_share
    return x, torch.where(keep, ids, experts), weights, keep


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize(
    ("hidden", "intermediate"),
    [(64, 32), (40, 12), (70, 16), (64, 33), (8, 4)],
    ids=["vector", "plain", "partial-blocks", "partial-blocks-bf16", "smallest"],
)
@pytest.mark.parametrize("tokens", [1, 2, 3, 7])
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_matches_the_reference_backend(hidden, intermediate, tokens, id_dtype):
    w13, w2 = swiglu_experts(6, hidden, intermediate)
    x, ids, weights, keep = masked_routing(tokens, 6, 3, hidden, seed=tokens, kept_share=0.7)
    reference = REFERENCE.compute(ExpertWeights.swiglu(w13, w2), x, ids, weights)
    out, rows = kept_experts(x, w13, w2, ids.to(id_dtype), weights)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert rows == int(keep.sum()) == int(reference.rows)
    assert relative_error(out, reference.output) < 1e-2, "bf16 rounding, not a different function"


def test_many_experts_handed_whole_to_threads_match_the_reference_backend():
    """From four experts with kept pairs per thread, whole experts go to threads (the path of
    batches and prompts); 40 tokens keeping 26 of 32 experts on two threads take it."""
    w13, w2 = swiglu_experts(32, 64, 32, seed=6)
    x, ids, weights, keep = masked_routing(40, 32, 4, 64, seed=7, kept_share=0.3)
    assert len(set(ids[keep].tolist())) >= 4 * 2
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out, rows = kept_experts(x, w13, w2, ids, weights)
    finally:
        torch.set_num_threads(threads)
    reference = REFERENCE.compute(ExpertWeights.swiglu(w13, w2), x, ids, weights)
    assert rows == int(keep.sum())
    assert relative_error(out, reference.output) < 1e-2


@pytest.mark.parametrize(
    ("tokens", "experts"),
    [(3, range(1, 4)), (6, range(4, 8)), (40, range(8, 33))],
    ids=["rows-split-on-both", "whole-on-one-rows-split-on-two", "whole-experts-on-both"],
)
def test_the_output_does_not_depend_on_the_thread_count(tokens, experts):
    """However the experts or their rows are shared out, each pair is computed by the same loops
    and each token's pairs are summed in slot order: one thread and two give the same bits. The
    switch is at 4 experts with kept pairs per thread; the 2082 gate/up rows of depth 64 are
    enough blocks for two threads to split them."""
    w13, w2 = swiglu_experts(32, 64, 1041, seed=8)
    x, ids, weights, keep = masked_routing(tokens, 32, 4, 64, seed=9, kept_share=0.3)
    assert len(set(ids[keep].tolist())) in experts
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(kept_experts(x, w13, w2, ids, weights)[0])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])


def test_the_library_is_built_with_openmp():
    """at::parallel_for is an OpenMP pragma in ATen's headers: built without -fopenmp, the experts
    op would run on one thread whatever torch.set_num_threads says, and call no OpenMP runtime."""
    assert b"GOMP_parallel" in library_path().read_bytes()


def test_many_tokens_on_one_expert_match_one_at_a_time():
    """Tokens are multiplied with a weight row three at a time: 7 tokens on one expert (chunks of
    3, 3, 1) give each token what it gets alone, up to float32 summation order."""
    w13, w2 = swiglu_experts(2, 64, 32, seed=1)
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    ids = torch.zeros(7, 1, dtype=torch.long)
    weights = torch.ones(7, 1)
    together, _ = kept_experts(x, w13, w2, ids, weights)
    alone = torch.cat([kept_experts(x[t : t + 1], w13, w2, ids[:1], weights[:1])[0] for t in range(7)])
    torch.testing.assert_close(together.float(), alone.float(), rtol=0, atol=2e-2)


def test_masked_experts_are_never_read():
    """A masked pair's expert holds NaN: reading any of it would poison the output."""
    w13, w2 = swiglu_experts(6, 64, 32, seed=3)
    x, ids, weights, keep = masked_routing(5, 6, 3, 64, seed=4)
    kept = set(ids[keep].tolist())
    unused = [e for e in range(6) if e not in kept]
    assert unused, "the draw leaves some expert unused"
    w13[unused], w2[unused] = float("nan"), float("nan")
    out, rows = kept_experts(x, w13, w2, ids, weights)
    assert torch.isfinite(out).all()
    assert rows == int(keep.sum())


def test_a_token_with_nothing_kept_gets_zeros_and_all_masked_reads_nothing():
    w13, w2 = swiglu_experts(4, 64, 32)
    x, ids, weights, _ = masked_routing(3, 4, 2, 64, seed=5)
    ids[1] = 4
    out, _ = kept_experts(x, w13, w2, ids, weights)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    nan13, nan2 = torch.full_like(w13, float("nan")), torch.full_like(w2, float("nan"))
    out, rows = kept_experts(x, nan13, nan2, torch.full_like(ids, 4), weights)
    assert rows == 0 and torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: {**a, "gate_up": a["gate_up"].float()}, "must be bfloat16"),
        (lambda a: {**a, "down": a["down"][:, :, :-1]}, r"are not \[E, 2I, H\] and \[E, H, I\]"),
        (lambda a: {**a, "ids": a["ids"][:1], "weights": a["weights"][:1]}, "ids has 1 rows for 3 tokens"),
        (lambda a: {**a, "ids": a["ids"] - 5}, "is negative"),
        (lambda a: {**a, "gate_up": a["gate_up"].transpose(1, 2).contiguous().transpose(1, 2)}, "contiguous"),
    ],
    ids=["float32-weights", "shapes", "rows", "negative-id", "not-contiguous"],
)
def test_bad_input_is_refused_with_what_was_wrong(change, message):
    w13, w2 = swiglu_experts(4, 64, 32)
    x, ids, weights, _ = masked_routing(3, 4, 2, 64, seed=6)
    args = change({"hidden": x, "gate_up": w13, "down": w2, "ids": ids, "weights": weights})
    with pytest.raises(RuntimeError, match=message):
        kept_experts(**args)


def experts_of(model_type: str, dtype: torch.dtype = torch.bfloat16):
    model = tiny_model(model_type, dtype=dtype)
    family = family_for(model)
    return family.experts(family.find_blocks(model)[0][1])


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_supports_does_not_lie_on_real_experts(model_type):
    """On transformers' own experts modules: where `native` says yes it computes what the reference
    computes and names itself; where it says no (gpt-oss's clamped GLU with biases, float32
    weights, a backward pass) the call runs on `grouped` and is still right."""
    experts = experts_of(model_type)
    weights = ExpertWeights.of(experts)
    # no more slots than experts: decode-sized, which `native` computes on every CPU (where the CPU
    # has AMX, prefill-sized calls go to `grouped`)
    tokens = experts.num_experts // 2
    x, ids, routing, _ = masked_routing(
        tokens, experts.num_experts, 2, weights.hidden_size, seed=7, kept_share=0.6
    )
    expected = REFERENCE.compute(weights, x, ids, routing).output
    ok, reason = NATIVE.supports(weights, CPU)
    with torch.no_grad():
        out, _, ran = NATIVE(weights, x, ids, routing)
    assert ok == (model_type != "gpt_oss"), reason
    assert ran == ("native" if ok else "grouped")
    assert relative_error(out, expected) < 1e-2
    assert not NATIVE.supports(ExpertWeights.of(experts_of(model_type, torch.float32)), CPU)[0]
    assert not NATIVE.supports(weights, CPU, needs_grad=True)[0]


def test_long_prompts_on_a_cpu_with_amx_go_to_grouped(monkeypatch):
    """There oneDNN's tile GEMMs beat the op once experts have more than AMX_NATIVE_ROWS_PER_EXPERT
    kept rows each; shorter calls, and long ones that keep few pairs, stay native; without AMX every
    call does."""
    w13, w2 = swiglu_experts(4, 64, 32)
    weights = ExpertWeights.swiglu(w13, w2)
    monkeypatch.setattr(native_backend, "amx_tiles", lambda: True)
    most = native_backend.AMX_NATIVE_ROWS_PER_EXPERT * 4 // 2  # tokens of 2 kept slots over 4 experts
    x, ids, routing, _ = masked_routing(most, 4, 2, 64, seed=8, kept_share=1.0)
    assert NATIVE(weights, x, ids, routing).backend == "native"
    x, ids, routing, keep = masked_routing(4 * most, 4, 2, 64, seed=8, kept_share=0.2)
    assert keep.sum() <= 2 * most < ids.numel()
    assert NATIVE(weights, x, ids, routing).backend == "native"
    x, ids, routing, _ = masked_routing(most + 1, 4, 2, 64, seed=8, kept_share=1.0)
    out = NATIVE(weights, x, ids, routing)
    assert out.backend == "grouped"
    torch.testing.assert_close(out.output, GROUPED(weights, x, ids, routing).output)
    monkeypatch.setattr(native_backend, "amx_tiles", lambda: False)
    assert NATIVE(weights, x, ids, routing).backend == "native"


def test_auto_runs_native_on_a_bf16_model_and_stats_name_it():
    """An attached bf16 Qwen3-MoE on the CPU: "auto" is the native backend, the stats name it, and
    the model's output equals the reference backend's."""
    assert get_backend("auto", CPU) is NATIVE
    model = tiny_model("qwen3_moe", dtype=torch.bfloat16)
    reference = attach(copy.deepcopy(model), BeamConfig(backend="reference"))
    beam = attach(model, BeamConfig())
    randomize_heads(beam, seed=2)
    randomize_heads(reference, seed=2)
    length = model.config.num_experts // model.config.num_experts_per_tok  # decode-sized on every CPU
    tokens = torch.randint(
        0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(9)
    )
    with torch.no_grad(), beam_stats(beam) as stats:
        native_logits = beam(tokens).logits
    assert stats.backends == {name: {"native": 1} for name in stats.layer_names}
    with torch.no_grad():
        reference_logits = reference(tokens).logits
    assert relative_error(native_logits, reference_logits) < 2e-2
