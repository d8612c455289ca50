"""`beam-moe flops --preset P --avg-k X`: MoE-layer FLOPs per token, base against masked, and the reduction."""

from __future__ import annotations

import argparse
from typing import Any

from beam_moe.cli._evaluation import dump_json


def register(subparsers: argparse._SubParsersAction) -> None:
    from beam_moe.presets import PRESETS

    parser = subparsers.add_parser(
        "flops",
        help="MoE-layer FLOPs per token at a given Avg-K, and the reduction against Top-K",
        description="FLOPs per token of the MoE layers (routed experts, shared experts, router, mask head) at "
        "Top-K and at Avg-K kept experts. Convention: 2 FLOPs per multiply-add of the matrix products; "
        "elementwise work (activation, softmax, top-k, weighted sum) is not counted.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", choices=list(PRESETS), help="real layer sizes of a known model")
    source.add_argument(
        "--model", metavar="DIR", help="a model folder or a BEAM adapter folder (config only)"
    )
    parser.add_argument(
        "--base", help="with an adapter folder: the base model folder, if not the recorded one"
    )
    parser.add_argument("--avg-k", type=float, required=True, help="kept routed experts per token (0..Top-K)")
    parser.add_argument(
        "--no-mask-head",
        action="store_true",
        help="count no mask head (a training-free policy such as Top-P)",
    )
    parser.add_argument("--per-layer", action="store_true", help="keep the per-layer breakdown in the JSON")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from beam_moe.eval.flops import flops_report, folder_shapes, preset_shapes

    if args.preset:
        shapes, source = preset_shapes(args.preset), f"preset {args.preset}"
    else:
        shapes, source = folder_shapes(args.model, args.base)
    report = flops_report(shapes, args.avg_k, mask_head=not args.no_mask_head, source=source)
    if not args.per_layer:
        report.pop("per_layer")
    print(dump_json(report) if args.json else table(report), end="" if args.json else "\n")
    return 0


def table(report: dict[str, Any]) -> str:
    rows = [
        ("routed experts", "routed"),
        ("shared experts", "shared"),
        ("router", "router"),
        ("mask head", "mask_head"),
    ]
    lines = [
        f"{report['source']}: {report['moe_layers']} MoE layers, hidden {report['hidden_size']}, "
        f"{report['num_experts']} experts, Top-{report['top_k']}; Avg-K {report['avg_k']:g}",
        f"{'MFLOPs per token':<20}{'Top-K':>12}{'masked':>12}",
    ]
    for label, key in [*rows, ("total", "total")]:
        lines.append(f"{label:<20}{report['base'][key] / 1e6:>12.2f}{report['masked'][key] / 1e6:>12.2f}")
    lines += [
        f"MoE-layer FLOPs saved: {report['moe_flops_reduction']:.1%} (experts only: {report['expert_flops_reduction']:.1%})",
        f"at most (Avg-K 0):     {report['max_reduction']:.1%} (experts only: {report['max_expert_reduction']:.1%})",
        "convention: 2 FLOPs per multiply-add of the matrix products; elementwise work not counted",
    ]
    return "\n".join(lines)
