"""`beam-moe quickstart`: train BEAM on the packaged reference MoE, compare it with the baselines, write a report."""

from __future__ import annotations

import argparse
import json

from beam_moe.cli._output import add_output_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    from beam_moe.experiments.refmoe.experiment import Recipe
    from beam_moe.experiments.refmoe.quickstart import QuickstartConfig

    defaults, recipe = QuickstartConfig(), Recipe()
    p = subparsers.add_parser(
        "quickstart",
        help="the whole pipeline on the built-in reference MoE, offline (9-11 minutes on 2 idle cores)",
        description="Trains BEAM mask heads on the packaged reference MoE to a target Avg-K, evaluates "
        "held-out perplexity, Avg-K and MoE-layer FLOPs of the base model, BEAM and the baselines "
        "(Top-K pruning, Top-P, threshold) at the same Avg-K, times the MoE layers, and writes "
        "report.md, results.json, sweep.png, analysis/ and the adapter into --output (all at once).",
    )
    add_output_arguments(p, f"output folder ({defaults.output})", required=False, default=defaults.output)
    p.add_argument(
        "--target-avg-k",
        type=float,
        default=defaults.target_avg_k,
        help=f"kept experts per token, of Top-8 ({defaults.target_avg_k})",
    )
    p.add_argument("--steps", type=int, default=recipe.steps, help=f"training steps ({recipe.steps})")
    p.add_argument("--batch-size", type=int, default=recipe.batch_size, help="sequences per step")
    p.add_argument("--max-length", type=int, default=recipe.max_length, help="tokens per training sequence")
    p.add_argument("--lr", type=float, default=recipe.lr, help=f"mask heads' learning rate ({recipe.lr})")
    p.add_argument("--objective", choices=("lm", "distill", "lm+distill"), default=recipe.objective)
    p.add_argument("--train", choices=("mask", "mask+router"), default=recipe.train, help="what trains")
    p.add_argument(
        "--head",
        choices=("router", "linear"),
        default=recipe.head,
        help="router: router-aware head, starts as threshold skipping at the budget; linear: the paper's "
        "(%(default)s)",
    )
    p.add_argument(
        "--mix",
        choices=("heldout", "corpus"),
        default=recipe.mix,
        help="training text: the held-out split's source mix, or the train split's (%(default)s)",
    )
    p.add_argument(
        "--settle", type=float, default=recipe.settle, help="final fraction of steps with beta frozen"
    )
    p.add_argument(
        "--controller-kp", type=float, default=recipe.controller_kp, help="budget controller, P gain"
    )
    p.add_argument(
        "--controller-ki", type=float, default=recipe.controller_ki, help="budget controller, I gain"
    )
    p.add_argument("--eval-blocks", type=int, default=defaults.eval_blocks, help="held-out windows evaluated")
    p.add_argument("--eval-length", type=int, default=defaults.eval_length, help="tokens per held-out window")
    p.add_argument("--points", type=int, default=defaults.points, help="grid points per continuous baseline")
    p.add_argument(
        "--bench-tokens",
        default=",".join(str(t) for t in defaults.bench_tokens),
        help="sequence lengths for the MoE-layer timing, comma-separated",
    )
    p.add_argument("--bench-rounds", type=int, default=defaults.bench_rounds, help="timing rounds")
    p.add_argument("--no-bench", action="store_true", help="skip the MoE-layer timing")
    p.add_argument("--data-dir", help="the prepared corpus (default: data/corpus of the checkout)")
    p.add_argument("--seed", type=int, default=recipe.seed)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print results.json instead of the table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from beam_moe.errors import BeamError, require
    from beam_moe.experiments.refmoe.experiment import Recipe
    from beam_moe.experiments.refmoe.quickstart import QuickstartConfig, print_summary, run_quickstart

    require("matplotlib", "eval", "the quickstart report's plots")  # before training, not after
    try:
        bench_tokens = tuple(int(t) for t in args.bench_tokens.split(",") if t.strip())
    except ValueError as e:
        raise BeamError(
            f"--bench-tokens must be whole numbers separated by commas, got {args.bench_tokens!r}"
        ) from e
    config = QuickstartConfig(
        output=args.output,
        target_avg_k=args.target_avg_k,
        recipe=Recipe(
            steps=args.steps,
            batch_size=args.batch_size,
            max_length=args.max_length,
            lr=args.lr,
            objective=args.objective,
            train=args.train,
            controller_kp=args.controller_kp,
            controller_ki=args.controller_ki,
            head=args.head,
            mix=args.mix,
            settle=args.settle,
            seed=args.seed,
        ),
        eval_blocks=args.eval_blocks,
        eval_length=args.eval_length,
        points=args.points,
        bench=not args.no_bench,
        bench_tokens=bench_tokens,
        bench_rounds=args.bench_rounds,
        data_dir=args.data_dir,
        overwrite=args.overwrite,
        progress=not (args.no_progress or args.json),
    )
    document = run_quickstart(config)
    if args.json:
        print(json.dumps(document, indent=1, default=str))
    else:
        print_summary(document)
    return 0
