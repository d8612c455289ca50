"""`beam-moe analyze O --data FILE --output DIR`: where the masks keep experts, as PNG plots and a JSON summary."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from beam_moe.cli._evaluation import (
    add_baseline_arguments,
    add_model_arguments,
    apply_routing,
    check_baseline_arguments,
    dump_json,
    json_safe,
)
from beam_moe.cli._output import add_output_arguments

SUMMARY_FILE = "summary.json"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "analyze",
        help="plots of Avg-K per layer, kept experts per token, keep rate by Top-K rank, expert load",
        description="Writes summary.json and avg_k_per_layer.png, token_map.png, keep_rate_by_rank.png, "
        "expert_load.png into DIR (all at once: a failed run leaves DIR as it was; an earlier analysis "
        "there is replaced only with --overwrite).",
    )
    parser.add_argument("path", metavar="O", help="BEAM adapter folder, or a transformers model folder")
    parser.add_argument("--data", required=True, metavar="FILE", help=".jsonl (field 'text') or .txt")
    add_output_arguments(parser, "folder for the plots and summary.json")
    parser.add_argument("--max-tokens", type=int, default=4096, help="tokens of FILE to analyse")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per forward pass")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    parser.add_argument(
        "--heatmap-tokens", type=int, default=48, help="tokens of the first text in the heat map"
    )
    parser.add_argument("--text-key", default="text", help="JSONL field that holds the text")
    add_model_arguments(parser)
    add_baseline_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from beam_moe.atomic import atomic_directory
    from beam_moe.errors import BeamError, require
    from beam_moe.eval.analysis import analyze_routing
    from beam_moe.eval.plots import ANALYSIS_PLOTS, write_analysis_plots
    from beam_moe.eval.text import read_texts
    from beam_moe.loading import load_eval_model
    from beam_moe.outputs import check_output_folder

    require("matplotlib", "eval", "beam-moe analyze")  # before the analysis runs, not after
    check_output_folder(args.output, overwrite=args.overwrite, ours=SUMMARY_FILE, what="a beam-moe analysis")
    check_baseline_arguments(args)
    if args.heatmap_tokens < 1:
        raise BeamError(f"--heatmap-tokens must be at least 1, got {args.heatmap_tokens}")
    read_texts(args.data, text_key=args.text_key)
    model, tokenizer, loaded = load_eval_model(args.path, args.model, args.dtype, args.device)
    routing = apply_routing(args, model, tokenizer, args.data)
    summary = analyze_routing(
        model,
        tokenizer,
        args.data,
        max_tokens=args.max_tokens,
        max_length=args.max_length,
        batch_size=args.batch_size,
        heatmap_tokens=args.heatmap_tokens,
        text_key=args.text_key,
    )
    document: dict[str, Any] = {**loaded, "routing": routing, "data": args.data, **summary}
    with atomic_directory(args.output, replace=True) as staging:
        write_analysis_plots(summary, staging)
        (staging / SUMMARY_FILE).write_text(dump_json(document))
    files = [SUMMARY_FILE, *ANALYSIS_PLOTS]
    if args.json:
        print(json.dumps(json_safe(document), indent=2))
    else:
        print(f"Avg-K {summary['avg_k']:.3f} of Top-K {summary['top_k']} over {summary['tokens']} tokens")
        print("per layer      " + " ".join(f"{layer['avg_k']:.2f}" for layer in summary["layers"]))
        if summary["keep_rate_by_rank"]:
            print("keep by rank   " + " ".join(f"{r:.0%}" for r in summary["keep_rate_by_rank"]))
        print("wrote " + ", ".join(str(Path(args.output) / f) for f in files))
    return 0
