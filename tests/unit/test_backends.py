"""Backends say what they can compute, and the chooser believes them: a backend that says yes
computes the call correctly and names itself; one that says no has a reason, and the call runs on
its fallback, which the output, the stats and the log (once per reason) name."""

import logging

import pytest
import torch
from test_grouped import experts_of, float64_reference, masked_routing, relative_error

from beam_moe import BeamConfig, BeamError, attach, beam_stats
from beam_moe.experts import GROUPED, REFERENCE, TRITON, ExpertWeights, available_backends, get_backend
from beam_moe.experts import backend as backend_module
from beam_moe.tiny_models import tiny_model
from helpers.batches import token_batch
from helpers.masking import randomize_heads

CPU = torch.device("cpu")
LOGGER = "beam_moe.experts"


@pytest.fixture(autouse=True)
def fresh_log(monkeypatch):
    """Each test starts with no fallback logged yet."""
    monkeypatch.setattr(backend_module, "_LOGGED", set())


@pytest.fixture
def interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def fallbacks(caplog):
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


@pytest.mark.parametrize("backend", [REFERENCE, GROUPED, TRITON], ids=lambda b: b.name)
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_supports_does_not_lie(interpreter, backend, family):
    """Yes: the backend's own compute is right and names it. No: a reason, and the call, made
    through the backend, runs on another backend and is still right."""
    experts = experts_of(family)
    weights = ExpertWeights.of(experts)
    hidden, ids, routing, _ = masked_routing(experts, 9, 2, seed=4, kept_share=0.6)
    expected = float64_reference(experts, hidden, ids, routing)
    ok, reason = backend.supports(weights, CPU)
    with torch.no_grad():
        if ok:
            assert reason == ""
            out, _, ran = backend.compute(weights, hidden, ids, routing)
            assert ran == backend.name
        else:
            assert reason
            out, _, ran = backend(weights, hidden, ids, routing)
            assert ran != backend.name
    assert relative_error(out, expected) < 1e-5
    assert ok == (backend is not TRITON or family != "gpt_oss"), "only gpt-oss's clamped GLU is refused"


@pytest.mark.cpu_only
def test_triton_on_cpu_without_the_interpreter_is_not_supported(monkeypatch):
    """The answer is honest: the kernel really cannot run there."""
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    experts = experts_of("qwen3_moe")
    ok, reason = TRITON.supports(ExpertWeights.of(experts), CPU)
    assert not ok
    assert "CUDA" in reason and "TRITON_INTERPRET=1" in reason
    assert "triton" not in available_backends()
    hidden, ids, routing, _ = masked_routing(experts, 5, 2, seed=1)
    with torch.no_grad(), pytest.raises(RuntimeError):
        TRITON.compute(ExpertWeights.of(experts), hidden, ids, routing)


def test_the_chooser_falls_back_and_logs_once(interpreter, monkeypatch, caplog):
    """Asked for triton while it could run; by the time of the call it cannot (the interpreter is
    off): grouped computes, says so, and the reason is logged once over three calls."""
    backend = get_backend("triton", CPU)
    monkeypatch.delenv("TRITON_INTERPRET")
    experts = experts_of("qwen3_moe")
    hidden, ids, routing, _ = masked_routing(experts, 6, 2, seed=2)
    with caplog.at_level(logging.INFO, logger=LOGGER), torch.no_grad():
        runs = [backend(ExpertWeights.of(experts), hidden, ids, routing) for _ in range(3)]
    assert [ran for _, _, ran in runs] == ["grouped"] * 3
    assert relative_error(runs[0].output, float64_reference(experts, hidden, ids, routing)) < 1e-5
    (message,) = fallbacks(caplog)
    assert "triton -> grouped" in message and "TRITON_INTERPRET=1" in message


def test_training_with_triton_runs_grouped_and_the_stats_say_so(interpreter, caplog):
    """The fused kernel has no backward pass: training forwards run grouped, each layer's record
    names it, and the reason is logged once, not once per layer and step."""
    model = attach(tiny_model("qwen3_moe"), BeamConfig(backend="triton"))
    randomize_heads(model, seed=1)
    model.train()
    with caplog.at_level(logging.INFO, logger=LOGGER), beam_stats(model) as stats:
        for seed in range(2):
            model(token_batch(length=4, seed=seed)).logits.sum().backward()
    assert stats.backends == {name: {"grouped": 2} for name in stats.layer_names}
    (message,) = fallbacks(caplog)
    assert "triton -> grouped" in message and "backward" in message
    model.eval()
    with torch.no_grad(), beam_stats(model) as stats:
        model(token_batch(length=4))
    assert stats.backends == {name: {"triton": 1} for name in stats.layer_names}


@pytest.mark.cpu_only
def test_auto_skips_what_cannot_run_and_logs_it_once(monkeypatch, caplog):
    """On a CUDA device without triton's kernels (here: no CUDA at all), auto takes grouped."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        chosen = [get_backend("auto", torch.device("cuda")) for _ in range(2)]
    assert chosen == [GROUPED, GROUPED]
    (message,) = fallbacks(caplog)
    assert "auto (triton) -> grouped" in message


@pytest.mark.cpu_only
def test_an_asked_backend_that_cannot_run_says_why(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BeamError, match=r"'triton' cannot run here \(the kernels need a CUDA device"):
        get_backend("triton", CPU)
