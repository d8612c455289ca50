"""Measuring an adapter's threshold -> Avg-K curve: one pass over some text per threshold of a grid.

The curve is what per-request budgets in experts (`beam_avg_k`, `beam_budget(model, avg_k=...)`)
are read through, so it is measured the way the model serves: eval mode, masked experts skipped,
every masked layer at the same threshold (a layer's keep changes the next layer's input, so each
threshold needs its own full forward passes). Avg-K counts real tokens only.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from beam_moe import threads
from beam_moe.attach import get_attachment
from beam_moe.errors import BeamError
from beam_moe.eval.perplexity import equal_length_batches, token_windows
from beam_moe.eval.text import TextSource, read_texts
from beam_moe.threshold_curve import DEFAULT_THRESHOLDS, ThresholdCurve

DEFAULT_CURVE_TOKENS = 4096
"""Tokens the curve is measured on by default: Avg-K is a mean over tokens x layers, so a few
thousand tokens pin it to about a percent, and the grid's 33 passes stay short."""


def check_thresholds(thresholds: Sequence[float]) -> list[float]:
    """The grid as floats, refused unless strictly increasing in (0, 1) with at least two points."""
    values = [float(t) for t in thresholds]
    if len(values) < 2:
        raise BeamError(f"thresholds: a curve needs at least two thresholds, got {len(values)}")
    bad = [t for t in values if not (math.isfinite(t) and 0.0 < t < 1.0)]
    if bad:
        raise BeamError(f"thresholds must lie strictly between 0 and 1, got {bad[0]}")
    if any(b <= a for a, b in itertools.pairwise(values)):
        raise BeamError(f"thresholds must be strictly increasing, got {values}")
    return values


@torch.no_grad()
def curve_on_batches(
    model: nn.Module,
    batches: Sequence[dict[str, Tensor]],
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    measured_on: dict[str, Any] | None = None,
    progress: bool = False,
) -> ThresholdCurve:
    """The curve of the attached mask heads over `batches` (input_ids and attention_mask each).

    Every layer's `threshold` override is set to each grid point in turn and put back after, as
    is the model's training mode. Padding (attention_mask 0) is not counted.
    """
    grid = check_thresholds(thresholds)
    attachment = get_attachment(model)
    layers = attachment.layers
    if any(layer.policy is not None for layer in layers):
        raise BeamError(
            "a routing policy (a baseline) replaces the mask heads on this model; the threshold curve "
            "measures the heads: set_routing_policy(model, None) first"
        )
    if not batches:
        raise BeamError("no text to measure the threshold curve on")
    previous = [layer.threshold for layer in layers]
    was_training = model.training
    model.eval()
    per_layer: list[list[float]] = [[] for _ in layers]
    tokens = 0
    try:
        for threshold in tqdm(grid, desc="threshold curve", unit="threshold", disable=not progress):
            for layer in layers:
                layer.threshold = threshold
            kept = torch.zeros(len(layers), dtype=torch.float64)
            tokens = 0
            for batch in batches:
                threads.tick()
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
                real = batch["attention_mask"].reshape(-1).bool()
                kept += torch.stack(
                    [layer.last_keep[real.to(layer.last_keep.device)].sum().cpu() for layer in layers]
                ).double()
                tokens += int(real.sum())
            for values, count in zip(per_layer, kept.tolist(), strict=True):
                values.append(count / max(tokens, 1))
    finally:
        for layer, before in zip(layers, previous, strict=True):
            layer.threshold = before
        model.train(was_training)
    overall = [sum(column) / len(column) for column in zip(*per_layer, strict=True)]
    return ThresholdCurve(
        thresholds=grid,
        avg_k=overall,
        top_k=max(layer.top_k for layer in layers),
        layers={layer.name: values for layer, values in zip(layers, per_layer, strict=True)},
        measured_on={**(measured_on or {}), "tokens": tokens},
    )


def measure_threshold_curve(
    model: nn.Module,
    tokenizer: Any,
    texts: TextSource,
    *,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    max_tokens: int | None = DEFAULT_CURVE_TOKENS,
    max_length: int = 512,
    batch_size: int = 4,
    text_key: str = "text",
    progress: bool = False,
) -> ThresholdCurve:
    """The threshold -> Avg-K curve of the BEAM model on `texts` (a .jsonl/.txt file or strings).

    The text is cut as for perplexity (documents joined with EOS, windows of `max_length`, no
    padding), the first `max_tokens` tokens of it (None: all). `measured_on` records the text
    (the file, or how many strings) and the token count.
    """
    check_thresholds(thresholds)
    if max_tokens is not None and max_tokens < 2:
        raise BeamError(f"max_tokens must be at least 2, got {max_tokens}")
    documents = read_texts(texts, text_key=text_key)
    windows = token_windows(tokenizer, documents, max_length, max_tokens)
    device = next(model.parameters()).device
    batches = []
    for group in equal_length_batches(windows, batch_size):
        ids = torch.tensor(group, device=device)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    described = Path(texts).name if isinstance(texts, (str, Path)) else f"{len(documents)} given texts"
    return curve_on_batches(model, batches, thresholds, {"text": described}, progress=progress)
