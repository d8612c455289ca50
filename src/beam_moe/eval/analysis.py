"""Where BEAM (or a baseline) keeps experts: per layer, per token, by Top-K rank, and per expert.

Built on `beam_stats(model, record=True)`: every MoE layer's router ids, keep mask and Top-K
weights for each forward pass. Ranks order a token's Top-K slots by descending router
probability (rank 1 = the router's favourite), as in the paper's rank analysis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from beam_moe import threads
from beam_moe.attach import beam_stats, get_attachment
from beam_moe.eval.baselines import rank_order
from beam_moe.eval.perplexity import equal_length_batches, token_windows
from beam_moe.eval.text import TextSource, read_texts
from beam_moe.stats import RoutingRecord


@dataclass
class TokenMap:
    """Kept experts per token along one text: `kept[layer][position]`, with the token strings."""

    tokens: list[str]
    kept: list[list[int]]
    top_k: int


def _cat(records: list[RoutingRecord]) -> RoutingRecord:
    return RoutingRecord(
        ids=torch.cat([r.ids for r in records]),
        keep=torch.cat([r.keep for r in records]),
        soft=torch.cat([r.soft for r in records]),
        weights=torch.cat([r.weights for r in records]),
    )


def keep_rate_by_rank(record: RoutingRecord) -> list[float]:
    """Share of tokens that keep their rank-r expert, r = 1..K."""
    _, order = rank_order(record.weights)
    return record.keep.gather(1, order).float().mean(dim=0).tolist()


def expert_load(ids: Tensor, keep: Tensor | None, num_experts: int, tokens: int) -> list[float]:
    """Tokens per expert as a share of all tokens (a Top-K router gives each expert K/E on average)."""
    chosen = ids if keep is None else ids[keep]
    return (torch.bincount(chosen.reshape(-1), minlength=num_experts)[:num_experts].float() / tokens).tolist()


def imbalance(load: list[float]) -> float:
    """max / mean of an expert load (1 is perfectly balanced; nan when nothing is routed)."""
    mean = sum(load) / len(load)
    return max(load) / mean if mean > 0 else float("nan")


def token_map(model: nn.Module, tokenizer, text: str, max_tokens: int) -> TokenMap:
    """Kept experts of every token of the first `max_tokens` tokens of `text`, in each MoE layer."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    device = next(model.parameters()).device
    with torch.no_grad(), beam_stats(model, record=True) as stats:
        model(input_ids=torch.tensor([ids], device=device))
    kept = [layer[0].keep.sum(dim=-1).tolist() for layer in stats.records]
    strings = [tokenizer.decode([i]) for i in ids]
    return TokenMap(tokens=strings, kept=kept, top_k=max(stats.top_k))


@torch.no_grad()
def analyze_routing(
    model: nn.Module,
    tokenizer,
    data: TextSource,
    *,
    max_tokens: int = 4096,
    max_length: int = 256,
    batch_size: int = 4,
    heatmap_tokens: int = 48,
    text_key: str = "text",
) -> dict[str, Any]:
    """A JSON-ready summary of how `model` routes `data` (its first `max_tokens` tokens).

    Keys: avg_k, top_k, tokens, kept_histogram (tokens keeping 0..K experts, averaged over layers),
    layers (per layer: name, avg_k, zero_kept (share of tokens keeping no routed expert), keep_rate_by_rank, load_before, load_after, imbalance before and
    after), keep_rate_by_rank (all layers), token_map (kept experts per token of the first text).
    """
    texts = read_texts(data, text_key=text_key)
    windows = token_windows(tokenizer, texts, max_length, max_tokens)
    attachment = get_attachment(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with beam_stats(model, record=True) as stats:
            for batch in equal_length_batches(windows, batch_size):
                threads.tick()
                model(input_ids=torch.tensor(batch, device=device))
        tokens_map = token_map(model, tokenizer, texts[0], heatmap_tokens)
    finally:
        model.train(was_training)
    top_k = max(stats.top_k)
    layers = []
    histogram = torch.zeros(top_k + 1)
    all_records = []
    for layer, records in zip(attachment.layers, stats.records, strict=True):
        record = _cat(records)
        all_records.append(record)
        tokens = record.ids.shape[0]
        before = expert_load(record.ids, None, layer.num_experts, tokens)
        after = expert_load(record.ids, record.keep, layer.num_experts, tokens)
        histogram += (
            torch.bincount(record.keep.sum(dim=-1), minlength=top_k + 1)[: top_k + 1].float() / tokens
        )
        layers.append(
            {
                "name": layer.name,
                "avg_k": float(record.keep.sum(dim=-1).float().mean()),
                "zero_kept": float((~record.keep.any(dim=-1)).float().mean()),
                "top_k": layer.top_k,
                "keep_rate_by_rank": keep_rate_by_rank(record),
                "load_before": before,
                "load_after": after,
                "imbalance_before": imbalance(before),
                "imbalance_after": imbalance(after),
            }
        )
    same_k = all(layer.top_k == top_k for layer in attachment.layers)
    return {
        "avg_k": stats.avg_k,
        "top_k": top_k,
        "tokens": stats.tokens,
        "kept_histogram": (histogram / len(layers)).tolist(),
        "keep_rate_by_rank": keep_rate_by_rank(_cat(all_records)) if same_k else None,
        "layers": layers,
        "token_map": {"tokens": tokens_map.tokens, "kept": tokens_map.kept, "top_k": tokens_map.top_k},
    }
