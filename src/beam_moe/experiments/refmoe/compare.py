"""BEAM against the base model and the baselines at equal Avg-K, read off a `beam_moe.eval.sweep` result.

Top-P and threshold skipping are calibrated to BEAM's Avg-K by the sweep (continuous parameters).
Top-K pruning only has whole numbers of experts, so its perplexity at BEAM's Avg-K is interpolated
between the two whole numbers around it (linear in log-perplexity, i.e. in mean NLL); below Avg-K 1
it is interpolated towards Top-0. A baseline that cannot reach the Avg-K (Top-P and threshold
skipping always keep one expert) is reported as such and BEAM is not credited against it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any

NAMES = {
    "base": "base model",
    "beam": "BEAM",
    "top_k": "Top-K pruning",
    "top_p": "Top-P",
    "threshold": "threshold",
    "random": "random mask",
}
WITHIN = 0.05  # the goal: BEAM within 5% of the base model's perplexity


def interpolate_top_k(points: list[Mapping[str, Any]], avg_k: float) -> float | None:
    """Top-K pruning's perplexity at a fractional Avg-K, from its whole-number grid points."""
    curve = sorted((p["avg_k"], math.log(p["ppl"])) for p in points if p["method"] == "top_k")
    if not curve or not curve[0][0] <= avg_k <= curve[-1][0]:
        return None
    for (k0, l0), (k1, l1) in itertools.pairwise(curve):
        if k0 <= avg_k <= k1:
            t = (avg_k - k0) / (k1 - k0) if k1 > k0 else 0.0
            return math.exp(l0 + t * (l1 - l0))
    return math.exp(curve[-1][1])


def comparison(result: Mapping[str, Any], adapter_row: int = 0) -> dict[str, Any]:
    """BEAM (one adapter of the sweep) against the base and each baseline at its Avg-K, with verdicts."""
    base = next(p for p in result["points"] if p["method"] == "base")
    row = result["matched"][adapter_row]
    beam = row["beam"]
    avg_k = beam["avg_k"]
    baselines: dict[str, Any] = {}
    for name, point in row["baselines"].items():
        entry = {
            "ppl": point["ppl"],
            "avg_k": point["avg_k"],
            "setting": point["label"],
            "reached": point["calibration"]["reached"],
            "moe_flops_reduction": point["moe_flops_reduction"],
        }
        if name == "top_k":
            entry["ppl_interpolated"] = interpolate_top_k(result["points"], avg_k)
            entry["reached"] = entry["ppl_interpolated"] is not None
        at_equal = entry.get("ppl_interpolated", entry["ppl"]) if entry["reached"] else None
        entry["ppl_at_equal_avg_k"] = at_equal
        entry["beam_better"] = None if at_equal is None else beam["ppl"] < at_equal
        baselines[name] = entry
    compared = [e["beam_better"] for e in baselines.values() if e["beam_better"] is not None]
    return {
        "avg_k": avg_k,
        "top_k": result["config"]["top_k"],
        "base_ppl": base["ppl"],
        "beam_ppl": beam["ppl"],
        "beam_moe_flops_reduction": beam["moe_flops_reduction"],
        "ppl_increase": beam["ppl"] / base["ppl"] - 1.0,
        "within_5_percent": beam["ppl"] <= (1.0 + WITHIN) * base["ppl"],
        "better_than_every_baseline": bool(compared) and all(compared),
        "baselines": baselines,
    }


def comparison_markdown(comp: Mapping[str, Any], base_flops: float) -> str:
    """The quickstart's table: perplexity, Avg-K and MoE-layer FLOPs per token, base vs BEAM vs baselines."""
    top_k = comp["top_k"]
    lines = [
        "| method | setting | Avg-K | held-out ppl | vs base | MoE MFLOPs/token | MoE FLOPs saved |",
        "|---|---|---:|---:|---:|---:|---:|",
        f"| base model | Top-{top_k} | {top_k:.2f} | {comp['base_ppl']:.3f} | - | {base_flops / 1e6:.2f} | - |",
    ]

    def row(name: str, setting: str, avg_k: float, ppl: float, saved: float) -> str:
        change = ppl / comp["base_ppl"] - 1.0
        return (
            f"| {name} | {setting} | {avg_k:.2f} | {ppl:.3f} | {change:+.1%} | "
            f"{base_flops * (1.0 - saved) / 1e6:.2f} | {saved:.1%} |"
        )

    lines.append(
        row("**BEAM**", "mask heads", comp["avg_k"], comp["beam_ppl"], comp["beam_moe_flops_reduction"])
    )
    for name, entry in comp["baselines"].items():
        setting = entry["setting"] + ("" if entry["reached"] else " (cannot reach this Avg-K)")
        lines.append(
            row(NAMES.get(name, name), setting, entry["avg_k"], entry["ppl"], entry["moe_flops_reduction"])
        )
        if entry.get("ppl_interpolated") is not None:
            lines.append(
                f"| {NAMES.get(name, name)} | interpolated to Avg-K {comp['avg_k']:.2f} | {comp['avg_k']:.2f} | "
                f"{entry['ppl_interpolated']:.3f} | {entry['ppl_interpolated'] / comp['base_ppl'] - 1.0:+.1%} | | |"
            )
    return "\n".join(lines) + "\n"


def verdict_lines(comp: Mapping[str, Any]) -> list[str]:
    """The goals, each stated with its numbers."""
    out = [
        f"- BEAM within 5% of the base model's perplexity: **{'yes' if comp['within_5_percent'] else 'no'}** "
        f"({comp['beam_ppl']:.3f} vs {comp['base_ppl']:.3f}, {comp['ppl_increase']:+.1%}, "
        f"at Avg-K {comp['avg_k']:.2f} of {comp['top_k']})."
    ]
    for name, entry in comp["baselines"].items():
        label = NAMES.get(name, name)
        if entry["beam_better"] is None:
            out.append(
                f"- {label}: cannot reach Avg-K {comp['avg_k']:.2f} (lowest it reaches: {entry['avg_k']:.2f})."
            )
        else:
            word = "better" if entry["beam_better"] else "not better"
            out.append(
                f"- BEAM vs {label} at equal Avg-K: **{word}** "
                f"({comp['beam_ppl']:.3f} vs {entry['ppl_at_equal_avg_k']:.3f}; {_how_compared(comp, entry, label)})."
            )
    return out


def _how_compared(comp: Mapping[str, Any], entry: Mapping[str, Any], label: str) -> str:
    """Where the baseline's number comes from: measured at its calibrated setting, or (Top-K pruning,
    whole numbers of experts only) interpolated between its two neighbouring k."""
    if entry.get("ppl_interpolated") is None:
        return f"{label} measured at Avg-K {entry['avg_k']:.2f}"
    low, high = math.floor(comp["avg_k"]), math.ceil(comp["avg_k"])
    if low == high:
        return f"{label} measured at k = {low}"
    return (
        f"{label} interpolated to Avg-K {comp['avg_k']:.2f} between its measured k = {low} and k = {high} "
        "(linear in mean NLL)"
    )
