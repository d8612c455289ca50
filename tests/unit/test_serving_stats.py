"""The vLLM worker's counters (beam_moe.serving.vllm.stats), fed as the BEAM runner feeds them.

The runner queues each layer's routing and the step's last BEAM layer counts the queue; these tests
check that what is counted equals an independent count of the same masks, whichever way it went.
"""

import torch

from beam_moe.routing import apply_slot_mask
from beam_moe.serving.vllm.stats import DEFAULT_LABEL, ServingStats


def routing_of(keep: torch.Tensor, check_all_kept: bool = True):
    """A routing whose mask is exactly `keep` (slot logits +-10 at threshold 0.5)."""
    weights = torch.rand(keep.shape)
    ids = torch.arange(keep.shape[1]).repeat(keep.shape[0], 1)
    slot_logits = torch.where(keep, 10.0, -10.0)
    return apply_slot_mask(weights, ids, slot_logits, 0.5, check_all_kept=check_all_kept)


def serving_stats(layers: int = 2, top_k: int = 4) -> ServingStats:
    stats = ServingStats()
    stats.clear(log=False)
    for i in range(layers):
        stats.add_layer(f"model.layers.{i}.mlp", top_k)
    return stats


def test_counts_equal_an_independent_count_of_the_masks():
    generator = torch.Generator().manual_seed(0)
    stats = serving_stats()
    masks = []
    for tokens in (1, 5, 3):  # three steps; the first keeps everything (counted on the host)
        step = [torch.ones(tokens, 4, dtype=torch.bool)] if tokens == 1 else []
        step += [torch.rand(tokens, 4, generator=generator) < 0.5 for _ in range(2 - len(step))]
        for layer, keep in enumerate(step):
            routing = routing_of(keep)
            stats.add(layer, routing, int(keep.sum()), "vllm")
        masks.append(step)
    summary = stats.summary()
    kept = [sum(int(step[layer].sum()) for step in masks) for layer in range(2)]
    tokens = sum(step[0].shape[0] for step in masks)
    zero = [sum(int((~step[layer].any(-1)).sum()) for step in masks) for layer in range(2)]
    assert summary["tokens"] == tokens
    assert summary["kept_pairs"] == summary["computed_rows"] == sum(kept)
    assert summary["per_layer"] == {f"model.layers.{i}.mlp": kept[i] / tokens for i in range(2)}
    assert summary["zero_kept"] == {f"model.layers.{i}.mlp": zero[i] / tokens for i in range(2)}
    assert summary["budgets"] == {DEFAULT_LABEL: {"avg_k": sum(kept) / (2 * tokens), "tokens": tokens}}


def test_a_step_cut_short_is_counted_when_read():
    """Queued layers of a step whose last BEAM layer has not run yet still count in `summary`."""
    stats = serving_stats()
    keep = torch.tensor([[True, False, False, False]])
    stats.add(0, routing_of(keep), 1, "vllm")
    summary = stats.summary()
    assert summary["kept_pairs"] == 1 and summary["tokens"] == 1
    assert stats.summary()["kept_pairs"] == 1, "counted once"


def test_budget_labels_of_the_step_split_the_counts():
    """Steps with labelled tokens count per label; the unlabelled steps go to the default label."""
    stats = serving_stats()
    labelled_keep = torch.tensor([[True, True, False, False], [True, False, False, False]])
    stats.step_labels = lambda tokens, device: (torch.tensor([0, 1]), ["high", DEFAULT_LABEL])
    for layer in range(2):
        stats.add(layer, routing_of(labelled_keep), 3, "vllm")
    stats.step_labels = lambda tokens, device: None
    for layer in range(2):
        stats.add(layer, routing_of(torch.ones(1, 4, dtype=torch.bool)), 4, "vllm")
    budgets = stats.summary()["budgets"]
    assert budgets["high"] == {"avg_k": 2.0, "tokens": 1}
    assert budgets[DEFAULT_LABEL] == {"avg_k": (1 + 4) / 2, "tokens": 2}
