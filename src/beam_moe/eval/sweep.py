"""Quality against Avg-K: BEAM adapters as points, each baseline as a curve, and both at matched Avg-K.

Everything runs on one model object: BEAM adapters are loaded onto it in turn (`load_beam`) and
the baselines replace the mask heads with a routing policy, so every method skips compute the
same way and is counted by the same counters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from beam_moe.adapter import load_beam
from beam_moe.attach import set_routing_policy
from beam_moe.eval.baselines import BASELINES, get_baseline, model_top_k
from beam_moe.eval.calibrate import calibrate, measure
from beam_moe.eval.flops import measured_flops
from beam_moe.eval.perplexity import PerplexityResult, perplexity
from beam_moe.eval.text import TextSource, read_texts


@dataclass
class SweepPoint:
    """One evaluation: a method ("base", "beam" or a baseline), its parameter or adapter, and the result."""

    method: str
    label: str
    param: float | None
    avg_k: float
    ppl: float
    moe_flops_reduction: float
    per_layer: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_grid(baseline: str, top_k: int, points: int = 8) -> list[float]:
    """Parameter values that spread a baseline's Avg-K from its minimum to Top-K."""
    spec = get_baseline(baseline)
    if spec.integer:
        return [float(k) for k in range(0, top_k + 1)]
    values = [spec.low + (spec.upper(top_k) - spec.low) * i / (points - 1) for i in range(points)]
    return [round(v, 6) for v in values]


def sweep_point(
    model: nn.Module, tokenizer, texts: list[str], method: str, label: str, param: float | None, **kwargs: Any
) -> SweepPoint:
    """Evaluate `model` as it is routed now (heads or a policy already set)."""
    result: PerplexityResult = perplexity(model, tokenizer, texts, **kwargs)
    return _point(model, result, method, label, param)


def _point(
    model: nn.Module, result: PerplexityResult, method: str, label: str, param: float | None
) -> SweepPoint:
    flops = measured_flops(model, result.per_layer, mask_head=method == "beam")
    return SweepPoint(
        method=method,
        label=label,
        param=param,
        avg_k=float(result.avg_k),
        ppl=result.ppl,
        moe_flops_reduction=flops["moe_flops_reduction"],
        per_layer=result.per_layer,
    )


def sweep(
    model: nn.Module,
    tokenizer,
    data: TextSource,
    *,
    adapters: Sequence[str | Path] = (),
    baselines: Sequence[str] | Mapping[str, Sequence[float]] = tuple(BASELINES),
    points: int = 8,
    match: bool = True,
    calibration_data: TextSource | None = None,
    calibration_tokens: int = 4096,
    max_length: int = 512,
    batch_size: int = 4,
    max_tokens: int | None = None,
    seed: int = 0,
    progress: bool = False,
    on_point: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Perplexity and Avg-K of the base model, each BEAM adapter, and each baseline over a grid.

    `model` has BEAM attached (any adapter, or fresh heads); `adapters` are loaded onto it in turn.
    `baselines` names baselines (default grids of `points` values) or maps them to parameter
    values. With `match`, each baseline is also calibrated (on `calibration_data`, by default the
    evaluation text, first `calibration_tokens` tokens) to every BEAM adapter's Avg-K and evaluated
    there. Returns {"points", "matched", "config"}; see `sweep_markdown` and `plots.plot_sweep`.
    `on_point(message)` is called after every evaluation (a progress bar can count them:
    1 + adapters + grid points + adapters x baselines when matching).
    """
    texts = read_texts(data)
    calibration = read_texts(calibration_data) if calibration_data is not None else texts
    top_k = model_top_k(model)
    grids = (
        {name: [float(v) for v in values] for name, values in baselines.items()}
        if isinstance(baselines, Mapping)
        else {name: default_grid(name, top_k, points) for name in baselines}
    )
    for name, values in grids.items():
        spec = get_baseline(name)
        for value in values:
            spec.check(value, top_k)
    kwargs = dict(max_length=max_length, batch_size=batch_size, max_tokens=max_tokens)

    def log(message: str) -> None:
        if on_point is not None:
            on_point(message)
        if progress:
            print(f"sweep: {message}", flush=True)

    results: list[SweepPoint] = []
    set_routing_policy(model, get_baseline("top_k").policy(top_k, top_k))
    results.append(
        sweep_point(model, tokenizer, texts, "base", f"Top-{top_k} (base)", float(top_k), **kwargs)
    )
    set_routing_policy(model, None)
    log(f"base: ppl {results[-1].ppl:.4g}")
    beam_points = []
    for adapter in adapters:
        load_beam(model, adapter)
        point = sweep_point(model, tokenizer, texts, "beam", Path(adapter).name, None, **kwargs)
        results.append(point)
        beam_points.append(point)
        log(f"BEAM {point.label}: Avg-K {point.avg_k:.3f}, ppl {point.ppl:.4g}")
    for name, values in grids.items():
        for value in values:
            result = measure(model, tokenizer, texts, name, value, seed, **kwargs)
            results.append(_point(model, result, name, f"{get_baseline(name).param}={value:g}", value))
            log(f"{name} {value:g}: Avg-K {results[-1].avg_k:.3f}, ppl {results[-1].ppl:.4g}")
    matched = []
    if match:
        for beam_point in beam_points:
            row: dict[str, Any] = {
                "target_avg_k": beam_point.avg_k,
                "beam": beam_point.to_dict(),
                "baselines": {},
            }
            for name in grids:
                found = calibrate(
                    model,
                    tokenizer,
                    name,
                    beam_point.avg_k,
                    calibration,
                    max_tokens=calibration_tokens,
                    max_length=max_length,
                    batch_size=batch_size,
                    seed=seed,
                )
                result = measure(model, tokenizer, texts, name, found.param, seed, **kwargs)
                point = _point(
                    model, result, name, f"{get_baseline(name).param}={found.param:.4g}", found.param
                )
                row["baselines"][name] = {**point.to_dict(), "calibration": found.to_dict()}
                log(f"{name} matched to {beam_point.avg_k:.3f}: {found.param:.4g}, ppl {point.ppl:.4g}")
            matched.append(row)
    return {
        "points": [p.to_dict() for p in results],
        "matched": matched,
        "config": {
            "top_k": top_k,
            "documents": len(texts),
            "max_length": max_length,
            "max_tokens": max_tokens,
            "calibration_tokens": calibration_tokens,
            "seed": seed,
            "baselines": grids,
            "adapters": [str(a) for a in adapters],
            "quality": "perplexity (lower is better)",
        },
    }


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}g}"


def sweep_markdown(result: Mapping[str, Any]) -> str:
    """The sweep as markdown: every point, then BEAM against each baseline at matched Avg-K."""
    lines = [
        "| method | setting | Avg-K | perplexity | MoE FLOPs saved |",
        "|---|---|---:|---:|---:|",
    ]
    for p in result["points"]:
        lines.append(
            f"| {p['method']} | {p['label']} | {p['avg_k']:.3f} | {_fmt(p['ppl'])} | {p['moe_flops_reduction']:.1%} |"
        )
    if result["matched"]:
        names = list(result["matched"][0]["baselines"])
        lines += [
            "",
            "At matched Avg-K (each baseline calibrated to the BEAM adapter's Avg-K; perplexity, with the Avg-K reached):",
            "",
            "| BEAM adapter | Avg-K | BEAM | " + " | ".join(names) + " |",
            "|---|---:|---:|" + "---:|" * len(names),
        ]
        for row in result["matched"]:
            cells = [
                f"{_fmt(row['baselines'][n]['ppl'])} ({row['baselines'][n]['avg_k']:.2f})" for n in names
            ]
            lines.append(
                f"| {row['beam']['label']} | {row['target_avg_k']:.3f} | {_fmt(row['beam']['ppl'])} | "
                + " | ".join(cells)
                + " |"
            )
    return "\n".join(lines) + "\n"
