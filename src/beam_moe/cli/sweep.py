"""`beam-moe sweep`: quality against Avg-K for BEAM adapters and every baseline; JSON, markdown and a plot."""

from __future__ import annotations

import argparse
from pathlib import Path

from beam_moe.cli._evaluation import add_model_arguments, add_text_arguments, dump_json
from beam_moe.cli._output import add_output_arguments

SWEEP_FILE = "sweep.json"


def register(subparsers: argparse._SubParsersAction) -> None:
    from beam_moe.eval.baselines import BASELINES

    parser = subparsers.add_parser(
        "sweep",
        help="perplexity vs Avg-K: BEAM adapters against Top-K, Top-P, threshold and random baselines",
        description="Evaluates the base model, each BEAM adapter and each baseline over a grid of its "
        "parameter on the same text, then calibrates each baseline to every adapter's Avg-K. Writes "
        "sweep.json, sweep.md and sweep.png into --output (all at once; an earlier sweep there is "
        "replaced only with --overwrite).",
    )
    parser.add_argument(
        "adapters", nargs="*", metavar="ADAPTER", help="BEAM adapter folders (one base model)"
    )
    parser.add_argument("--ppl", required=True, metavar="FILE", help="evaluation text: .jsonl or .txt")
    add_output_arguments(parser, "folder for sweep.json, sweep.md, sweep.png")
    parser.add_argument(
        "--baselines",
        default=",".join(BASELINES),
        help=f"comma-separated, from {', '.join(BASELINES)}; '' for none",
    )
    parser.add_argument("--points", type=int, default=8, help="grid points per continuous baseline")
    parser.add_argument("--no-match", action="store_true", help="skip calibrating baselines to BEAM's Avg-K")
    parser.add_argument("--calibration-data", help="text for calibration (default: the evaluation text)")
    parser.add_argument("--calibration-tokens", type=int, default=4096, help="tokens used for calibration")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random mask baseline")
    add_model_arguments(parser)
    add_text_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print sweep.json instead of the markdown table")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from beam_moe.atomic import atomic_directory
    from beam_moe.errors import BeamError, require
    from beam_moe.eval.baselines import get_baseline
    from beam_moe.eval.plots import plot_sweep
    from beam_moe.eval.sweep import sweep, sweep_markdown
    from beam_moe.eval.text import read_texts
    from beam_moe.loading import load_eval_model
    from beam_moe.outputs import check_output_folder

    require("matplotlib", "eval", "sweep.png")  # before the sweep runs, not after
    check_output_folder(args.output, overwrite=args.overwrite, ours=SWEEP_FILE, what="a beam-moe sweep")
    baselines = [name.strip() for name in args.baselines.split(",") if name.strip()]
    for name in baselines:
        get_baseline(name)
    if args.points < 2:
        raise BeamError(f"--points must be at least 2, got {args.points}")
    if not args.adapters and not args.model:
        raise BeamError("give BEAM adapter folders, or --model BASE to sweep the baselines alone")
    read_texts(args.ppl, text_key=args.text_key)
    first = args.adapters[0] if args.adapters else args.model
    model, tokenizer, loaded = load_eval_model(
        first, args.model if args.adapters else None, args.dtype, args.device
    )
    result = sweep(
        model,
        tokenizer,
        args.ppl,
        adapters=args.adapters,
        baselines=baselines,
        points=args.points,
        match=not args.no_match,
        calibration_data=args.calibration_data,
        calibration_tokens=args.calibration_tokens,
        max_length=args.max_length,
        batch_size=args.batch_size,
        max_tokens=args.max_tokens,
        seed=args.seed,
        progress=not args.json,
    )
    result["config"].update(
        base_model=loaded["base_model"], data=args.ppl, calibration_data=args.calibration_data or args.ppl
    )
    markdown = sweep_markdown(result)
    with atomic_directory(args.output, replace=True) as staging:
        (staging / SWEEP_FILE).write_text(dump_json(result))
        (staging / "sweep.md").write_text(markdown)
        plot_sweep(result, staging / "sweep.png")
    print(
        dump_json(result)
        if args.json
        else markdown + f"wrote {Path(args.output)}/sweep.json, sweep.md, sweep.png\n",
        end="",
    )
    return 0
