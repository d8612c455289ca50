"""PNG plots of sweeps and routing analyses (matplotlib's Agg canvas; pyplot and its global backend are never touched)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from beam_moe.errors import require

_MARKERS = {"top_k": "s", "top_p": "^", "threshold": "v", "random": "x"}
_COLORS = {
    "beam": "#d62728",
    "top_k": "#1f77b4",
    "top_p": "#2ca02c",
    "threshold": "#9467bd",
    "random": "#7f7f7f",
}
_NAMES = {
    "top_k": "Top-K pruning",
    "top_p": "Top-P routing (MoE-Dynamic)",
    "threshold": "threshold skipping",
    "random": "random mask",
}


def _figure(width: float, height: float):
    require("matplotlib", "eval", "plotting")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _integer_ticks(axis) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def _save(figure, path: str | Path) -> Path:
    """Write the PNG; callers write into an `atomic_directory` staging folder, so no half-written set survives."""
    figure.savefig(path, format="png")
    return Path(path)


def plot_sweep(result: Mapping[str, Any], path: str | Path) -> Path:
    """Perplexity against Avg-K: BEAM adapters as points, each baseline as a curve (its grid and its
    matched points), the base model as a line. Left: every point, on a log axis (the k = 0 point
    is far above the rest); right: zoomed on the range near the base model, where the methods
    differ most usefully. `beam-moe sweep` and the quickstart both draw with it."""
    return _save(sweep_figure(result), path)


def sweep_figure(result: Mapping[str, Any]):
    """The figure `plot_sweep` writes."""
    matched = [point for row in result.get("matched", []) for point in row["baselines"].values()]
    points = [*result["points"], *matched]
    top_k = result["config"]["top_k"]
    figure = _figure(13.0, 5.0)
    full, zoom = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    for axes in (full, zoom):
        _draw_sweep(axes, points, top_k)
    values = [p["ppl"] for p in points if math.isfinite(p["ppl"])]
    full.set_yscale("log")
    base = next((p["ppl"] for p in points if p["method"] == "base"), min(values) if values else 1.0)
    beam = [p["ppl"] for p in points if p["method"] == "beam" and math.isfinite(p["ppl"])]
    top = 1.15 * max(beam) if beam else 1.25 * base
    zoom.set_ylim(0.98 * min([base, *beam]), max(top, 1.02 * base))
    full.set_title("All points")
    zoom.set_title("Near the base model (zoom)")
    full.legend(fontsize=8)
    figure.suptitle("Quality against compute: BEAM and baselines at equal Avg-K")
    return figure


def _draw_sweep(axes, points: list[Mapping[str, Any]], top_k: int) -> None:
    for name in dict.fromkeys(p["method"] for p in points if p["method"] not in ("base", "beam")):
        curve = sorted((p for p in points if p["method"] == name), key=lambda p: p["avg_k"])
        axes.plot(
            [p["avg_k"] for p in curve],
            [p["ppl"] for p in curve],
            marker=_MARKERS.get(name, "o"),
            color=_COLORS.get(name),
            label=_NAMES.get(name, name),
            linewidth=1.5,
            markersize=5,
        )
    beam = [p for p in points if p["method"] == "beam"]
    if beam:
        axes.scatter(
            [p["avg_k"] for p in beam],
            [p["ppl"] for p in beam],
            marker="*",
            s=220,
            color=_COLORS["beam"],
            edgecolor="black",
            zorder=5,
            label="BEAM adapters",
        )
        for p in beam:
            axes.annotate(
                p["label"], (p["avg_k"], p["ppl"]), textcoords="offset points", xytext=(6, 6), fontsize=8
            )
    base = next((p for p in points if p["method"] == "base"), None)
    if base is not None:
        axes.axhline(
            base["ppl"], color="black", linestyle="--", linewidth=1, label=f"base model (Top-{top_k})"
        )
    axes.set_xlim(-0.1, top_k + 0.1)
    axes.set_xlabel(f"Avg-K: routed experts computed per token (of Top-K = {top_k})")
    axes.set_ylabel("perplexity on the evaluation text (lower is better)")
    axes.grid(True, alpha=0.3)


def plot_avg_k_per_layer(summary: Mapping[str, Any], path: str | Path) -> Path:
    """Bars of Avg-K per MoE layer, with Top-K and the model's mean Avg-K as lines; above each bar
    the share of tokens that kept no routed expert in that layer."""
    layers = summary["layers"]
    figure = _figure(max(5.0, 0.25 * len(layers) + 3), 4.0)
    axes = figure.add_subplot()
    bars = axes.bar(range(len(layers)), [layer["avg_k"] for layer in layers], color="#1f77b4")
    if len(layers) <= 32:
        for bar, layer in zip(bars, layers, strict=True):
            if "zero_kept" in layer:
                axes.annotate(
                    f"0: {layer['zero_kept']:.0%}",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    textcoords="offset points",
                    xytext=(0, 2),
                    ha="center",
                    fontsize=7,
                )
    axes.axhline(
        summary["top_k"], color="black", linestyle="--", linewidth=1, label=f"Top-K = {summary['top_k']}"
    )
    axes.axhline(summary["avg_k"], color="#d62728", linewidth=1, label=f"mean Avg-K = {summary['avg_k']:.2f}")
    _integer_ticks(axes.xaxis)
    axes.set_xlabel("MoE layer (0 = closest to the input)")
    axes.set_ylabel("Avg-K (kept routed experts per token)")
    axes.set_ylim(0, summary["top_k"] * 1.15)
    axes.set_title(f"Experts kept per layer ({summary['tokens']} tokens; '0:' tokens keeping none)")
    axes.legend(fontsize=8, loc="upper right")
    axes.grid(True, axis="y", alpha=0.3)
    return _save(figure, path)


def _token_label(token: str) -> str:
    return token.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "·") or "∅"


def plot_token_map(summary: Mapping[str, Any], path: str | Path) -> Path:
    """Heat map of kept experts per token (x: the text's tokens, y: MoE layers)."""
    import numpy as np

    token_map = summary["token_map"]
    kept = np.array(token_map["kept"], dtype=float)
    layers, tokens = kept.shape
    figure = _figure(min(max(6.0, 0.22 * tokens + 2.5), 24.0), max(3.0, 0.22 * layers + 2.2))
    axes = figure.add_subplot()
    from matplotlib import colormaps

    top_k = token_map["top_k"]
    levels = colormaps["viridis"].resampled(top_k + 1)  # one colour per whole number of experts
    image = axes.imshow(
        kept, aspect="auto", cmap=levels, vmin=-0.5, vmax=top_k + 0.5, interpolation="nearest"
    )
    colorbar = figure.colorbar(image, ax=axes, ticks=range(top_k + 1))
    colorbar.set_label(f"kept experts (of Top-K = {top_k})")
    if tokens <= 96:
        axes.set_xticks(
            range(tokens), [_token_label(t) for t in token_map["tokens"]], rotation=90, fontsize=7
        )
        axes.set_xlabel("token (· marks a space)")
    else:
        axes.set_xlabel("token position")
    _integer_ticks(axes.yaxis)
    axes.set_ylabel("MoE layer")
    axes.set_title("Kept experts per token along the first text")
    return _save(figure, path)


def plot_rank_keep_rate(summary: Mapping[str, Any], path: str | Path) -> Path:
    """Keep rate of the rank-r expert (by router probability) per layer, and over all layers."""
    figure = _figure(6.5, 4.2)
    axes = figure.add_subplot()
    for i, layer in enumerate(summary["layers"]):
        rates = [100 * r for r in layer["keep_rate_by_rank"]]
        axes.plot(
            range(1, len(rates) + 1),
            rates,
            color="#1f77b4",
            alpha=0.35,
            linewidth=1,
            label="each layer" if i == 0 else None,
        )
    if summary.get("keep_rate_by_rank"):
        rates = [100 * r for r in summary["keep_rate_by_rank"]]
        axes.plot(
            range(1, len(rates) + 1), rates, color="#d62728", marker="o", linewidth=2.5, label="all layers"
        )
    axes.set_xticks(range(1, summary["top_k"] + 1))
    axes.set_xlabel("rank in the router's Top-K (1 = highest router probability)")
    axes.set_ylabel("tokens that keep this expert (%)")
    axes.set_ylim(-2, 102)
    axes.set_title("Keep rate by Top-K rank")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    return _save(figure, path)


def plot_expert_load(summary: Mapping[str, Any], path: str | Path) -> Path:
    """Expert load before and after masking (layers x experts heat maps) and the imbalance per layer."""
    import numpy as np

    layers = summary["layers"]
    before = 100 * np.array([layer["load_before"] for layer in layers])
    after = 100 * np.array([layer["load_after"] for layer in layers])
    figure = _figure(13.0, max(3.6, 0.2 * len(layers) + 2.4))
    grid = figure.add_gridspec(1, 3, width_ratios=[1, 1, 0.7])
    vmax = float(before.max()) if before.size else 1.0
    for column, (values, title) in enumerate(
        ((before, "before masking (router Top-K)"), (after, "after masking (computed)"))
    ):
        axes = figure.add_subplot(grid[0, column])
        image = axes.imshow(values, aspect="auto", cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
        axes.set_title(f"Expert load {title}", fontsize=10)
        _integer_ticks(axes.xaxis)
        _integer_ticks(axes.yaxis)
        axes.set_xlabel("expert id")
        axes.set_ylabel("MoE layer")
    colorbar = figure.colorbar(image, ax=figure.axes[:2], location="bottom", shrink=0.6)
    colorbar.set_label("tokens routed to the expert (% of all tokens)")
    axes = figure.add_subplot(grid[0, 2])
    index = np.arange(len(layers))
    axes.barh(
        index - 0.2,
        [layer["imbalance_before"] for layer in layers],
        height=0.4,
        label="before",
        color="#1f77b4",
    )
    axes.barh(
        index + 0.2,
        [layer["imbalance_after"] for layer in layers],
        height=0.4,
        label="after",
        color="#d62728",
    )
    axes.axvline(1.0, color="black", linewidth=1, linestyle="--")
    axes.invert_yaxis()
    _integer_ticks(axes.yaxis)
    axes.set_xlabel("max / mean load (1 = balanced)")
    axes.set_ylabel("MoE layer")
    axes.set_title("Imbalance per layer", fontsize=10)
    axes.legend(fontsize=8)
    figure.suptitle("Expert load before and after masking")
    return _save(figure, path)


ANALYSIS_PLOTS = {
    "avg_k_per_layer.png": plot_avg_k_per_layer,
    "token_map.png": plot_token_map,
    "keep_rate_by_rank.png": plot_rank_keep_rate,
    "expert_load.png": plot_expert_load,
}


def write_analysis_plots(summary: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """Every analysis plot of `summary` (from `analysis.analyze_routing`) into `out_dir`."""
    out = Path(out_dir)
    return [plot(summary, out / name) for name, plot in ANALYSIS_PLOTS.items()]
