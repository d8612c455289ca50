import pytest
import torch

from beam_moe import BeamError, attach, beam_stats, get_attachment
from beam_moe.tiny_models import tiny_model
from conftest import token_batch
from masking import randomize_heads


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
