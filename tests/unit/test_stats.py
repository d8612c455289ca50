import pytest
import torch

from beam_moe import BeamConfig, BeamError, attach, beam_stats, get_attachment
from beam_moe.tiny_models import tiny_model
from helpers.batches import token_batch
from helpers.masking import randomize_heads


def test_counts_with_a_fresh_adapter():
    model = attach(tiny_model("qwen3_moe"))
    with torch.no_grad(), beam_stats(model) as stats:
        model(token_batch(batch=3, length=10))
    assert stats.tokens == 30
    assert stats.routed_pairs == 30 * 2 * 2
    assert stats.kept_pairs == stats.routed_pairs == stats.computed_rows
    assert stats.avg_k == 2.0
    assert stats.per_layer == {"model.layers.0.mlp": 2.0, "model.layers.1.mlp": 2.0}
    assert stats.to_dict()["kept_fraction"] == 1.0


def test_avg_k_is_the_mean_of_per_layer_counts_against_an_independent_count():
    model = attach(tiny_model("olmoe"))
    randomize_heads(model, seed=3)
    tokens = token_batch(seed=9)
    with torch.no_grad(), beam_stats(model, record=True) as stats:
        model(tokens)
    per_layer = [
        torch.cat([r.keep for r in records]).sum(-1).float().mean().item() for records in stats.records
    ]
    assert stats.per_layer == pytest.approx(dict(zip(stats.per_layer, per_layer, strict=True)))
    assert stats.avg_k == pytest.approx(sum(per_layer) / len(per_layer))
    assert stats.kept_pairs == sum(int(torch.cat([r.keep for r in rec]).sum()) for rec in stats.records)


def test_counting_stops_after_the_block_and_nests():
    model = attach(tiny_model("qwen3_moe"))
    with torch.no_grad():
        with beam_stats(model) as outer:
            model(token_batch(length=4))
            with beam_stats(model) as inner:
                model(token_batch(length=4))
        model(token_batch(length=4))
    assert inner.tokens == 8
    assert outer.tokens == 16
    assert get_attachment(model).sinks == []


def test_requires_an_attached_model():
    with pytest.raises(BeamError, match="no BEAM mask heads"), beam_stats(tiny_model("qwen3_moe")):
        pass


def test_the_backend_that_ran_is_recorded_per_layer():
    model = attach(tiny_model("qwen3_moe"), BeamConfig(backend="reference"))
    with torch.no_grad(), beam_stats(model) as stats:
        model(token_batch(length=4))
        model(token_batch(length=3))
    assert stats.backends == {"model.layers.0.mlp": {"reference": 2}, "model.layers.1.mlp": {"reference": 2}}
    assert stats.to_dict()["backends"] == stats.backends


@pytest.mark.parametrize(("family", "ran"), [("qwen3_moe", "triton"), ("gpt_oss", "grouped")])
def test_a_triton_fallback_to_grouped_shows_in_the_stats(family, ran, monkeypatch):
    """Asking for `triton` runs the kernel on SiLU experts; gpt-oss's gate is handed to `grouped`,
    and the stats say so instead of claiming the kernel ran."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the model is on the CPU, with or without a GPU
    model = attach(tiny_model(family), BeamConfig(backend="triton"))
    randomize_heads(model, seed=5)
    with torch.no_grad(), beam_stats(model) as stats:
        model(token_batch(length=5))
    assert stats.backends == {name: {ran: 1} for name in stats.layer_names}
    assert stats.computed_rows == stats.kept_pairs


def test_zero_kept_counts_the_tokens_that_keep_no_routed_expert():
    """A policy that keeps nothing for every third token and one slot for the others."""
    from beam_moe import set_routing_policy

    model = attach(tiny_model("qwen3_moe"))

    def policy(hidden, logits, weights, ids):
        keep = torch.zeros_like(ids, dtype=torch.bool)
        keep[:, 0] = True
        keep[::3] = False
        return keep

    set_routing_policy(model, policy)
    with torch.no_grad(), beam_stats(model) as stats:
        model(token_batch(batch=1, length=12))
    assert stats.zero_kept == {"model.layers.0.mlp": 4 / 12, "model.layers.1.mlp": 4 / 12}
    assert stats.avg_k == pytest.approx(8 / 12)
    assert stats.to_dict()["zero_kept"] == stats.zero_kept


def test_stats_is_a_leaf_module():
    """Importing the counters loads no other beam_moe module (attach, layer and the vLLM runner all
    import it; it must import none of them)."""
    import subprocess
    import sys

    code = "import sys, beam_moe.stats\nprint(sorted(m for m in sys.modules if m.startswith('beam_moe')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "['beam_moe', 'beam_moe.lazy', 'beam_moe.stats', 'beam_moe.version']"


def test_beam_stats_lives_beside_attach():
    import importlib

    import beam_moe
    from beam_moe.stats import BeamStats

    assert beam_moe.beam_stats is importlib.import_module("beam_moe.attach").beam_stats
    assert beam_moe.BeamStats is BeamStats
