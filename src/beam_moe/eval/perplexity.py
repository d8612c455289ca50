"""Perplexity on local text, with BEAM's Avg-K (overall and per layer) counted on the same forward passes.

The documents are tokenised without special tokens, each followed by the tokenizer's EOS token,
concatenated into one stream and cut into windows of `max_length` tokens (the last one may be
shorter). Every token but the first of each window is scored; no padding is ever routed, so
Avg-K counts real tokens only.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from beam_moe import threads
from beam_moe.attach import beam_stats, is_attached
from beam_moe.errors import BeamError
from beam_moe.eval.text import TextSource, read_texts


@dataclass
class PerplexityResult:
    """Perplexity and routing counts of one evaluation.

    nll:            mean negative log-likelihood per scored token (nats).
    scored_tokens:  tokens whose likelihood was scored.
    tokens:         tokens routed through the MoE layers (scored tokens plus each window's first).
    avg_k:          kept routed experts per token, averaged over the masked MoE layers (None
                    when the model has no BEAM attachment).
    per_layer:      Avg-K of each masked MoE layer, by qualified name.
    zero_kept:      per masked MoE layer, the fraction of tokens that kept no routed expert.
    backends:       per masked MoE layer, the expert backends that really ran and how many calls
                    each (a backend that handed calls to its fallback is not the one named).
    """

    ppl: float
    nll: float
    scored_tokens: int
    tokens: int
    documents: int
    windows: int
    avg_k: float | None = None
    top_k: int | None = None
    kept_fraction: float | None = None
    kept_pairs: int | None = None
    computed_rows: int | None = None
    per_layer: dict[str, float] = field(default_factory=dict)
    zero_kept: dict[str, float] = field(default_factory=dict)
    backends: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def token_windows(
    tokenizer, texts: list[str], max_length: int, max_tokens: int | None = None
) -> list[list[int]]:
    """The token stream of `texts` (each followed by EOS) cut into windows of `max_length`."""
    if max_length < 2:
        raise BeamError(f"max_length must be at least 2 tokens, got {max_length}")
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(int(eos))
        if max_tokens is not None and len(stream) >= max_tokens:
            stream = stream[:max_tokens]
            break
    windows = [stream[i : i + max_length] for i in range(0, len(stream), max_length)]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise BeamError("the text gives fewer than 2 tokens: nothing to score")
    return windows


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer,
    texts: TextSource,
    *,
    max_length: int = 512,
    batch_size: int = 4,
    max_tokens: int | None = None,
    text_key: str = "text",
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of `model` on `texts` (a .jsonl/.txt file or a list of strings), with Avg-K.

    Works on any causal LM; with BEAM attached (mask heads or a baseline's routing policy) the
    routing is counted on the same forward passes. `max_tokens` caps the token stream.
    """
    documents = read_texts(texts, text_key=text_key)
    windows = token_windows(tokenizer, documents, max_length, max_tokens)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_nll = 0.0
    scored = 0
    counting = beam_stats(model) if is_attached(model) else nullcontext()
    try:
        with counting as stats:
            for batch in tqdm(
                equal_length_batches(windows, batch_size),
                desc="perplexity",
                unit="batch",
                disable=not progress,
            ):
                threads.tick()
                input_ids = torch.tensor(batch, device=device)
                logits = model(input_ids=input_ids).logits[:, :-1].float()
                targets = input_ids[:, 1:]
                nll = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
                )
                total_nll += float(nll.double())
                scored += targets.numel()
    finally:
        model.train(was_training)
    mean_nll = total_nll / scored
    result = PerplexityResult(
        ppl=math.exp(mean_nll),
        nll=mean_nll,
        scored_tokens=scored,
        tokens=sum(len(w) for w in windows),
        documents=len(documents),
        windows=len(windows),
    )
    if stats is not None:
        result.avg_k = stats.avg_k
        result.top_k = max(stats.top_k)
        result.kept_fraction = stats.kept_fraction
        result.kept_pairs = stats.kept_pairs
        result.computed_rows = stats.computed_rows
        result.per_layer = stats.per_layer
        result.zero_kept = stats.zero_kept
        result.backends = stats.backends
    return result


def equal_length_batches(windows: list[list[int]], batch_size: int) -> list[list[list[int]]]:
    """Batches of windows with one length each, so nothing is padded."""
    if batch_size < 1:
        raise BeamError(f"batch_size must be at least 1, got {batch_size}")
    by_length: dict[int, list[list[int]]] = {}
    for window in windows:
        by_length.setdefault(len(window), []).append(window)
    return [
        group[i : i + batch_size] for group in by_length.values() for i in range(0, len(group), batch_size)
    ]
