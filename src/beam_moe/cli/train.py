"""`beam-moe train --model M --data D --output O [--target-avg-k X | --beta B]`: train BEAM mask heads.

Runs unchanged under `accelerate launch` (DDP or FSDP2). See docs/training.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import typing
from pathlib import Path

from beam_moe.cli._output import add_output_arguments

# Fields with hand-written options: the run's inputs and output, and `beam` (the BeamConfig
# options --head and --threshold).
HAND_WRITTEN = ("model", "data", "output", "val_data", "beam", "overwrite")
# Options that exclude each other, and whether one of them must be given.
EXCLUSIVE = ((("beta", "target_avg_k"), True), (("max_steps", "epochs"), False))


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per TrainConfig field (but `HAND_WRITTEN`), with the field's default, type,
    choices and help (train/config.py): the CLI, the Python API and the quickstart share them.

    A bool field that is off by default is a `--NAME` flag; one that is on (or None: decided at
    run time) is a `--no-NAME` flag that sets it to False.
    """
    from beam_moe.train.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    groups = {}
    for names, required in EXCLUSIVE:
        group = parser.add_mutually_exclusive_group(required=required)
        groups.update(dict.fromkeys(names, group))
    for field in dataclasses.fields(TrainConfig):
        if field.name in HAND_WRITTEN:
            continue
        target = groups.get(field.name, parser)
        option = "--" + field.name.replace("_", "-")
        kind = next((t for t in typing.get_args(hints[field.name]) if t is not type(None)), hints[field.name])
        help = field.metadata["help"]
        if kind is bool and field.default is False:
            target.add_argument(option, dest=field.name, action="store_true", help=help)
        elif kind is bool:
            target.add_argument(
                "--no-" + option[2:],
                dest=field.name,
                action="store_const",
                const=False,
                default=field.default,
                help=help,
            )
        else:
            target.add_argument(
                option, type=kind, default=field.default, choices=field.metadata["choices"], help=help
            )


def register(subparsers: argparse._SubParsersAction) -> None:
    from beam_moe.config import BeamConfig

    p = subparsers.add_parser(
        "train",
        help="train BEAM mask heads on a MoE model (the output folder is a BEAM adapter)",
        description="Train BEAM mask heads (and optionally more) on a MoE checkpoint. "
        "The output folder is a BEAM adapter plus training_args.json and metrics.jsonl.",
    )
    p.add_argument("--model", required=True, help="model folder, or a Hub id when online")
    p.add_argument(
        "--data",
        required=True,
        nargs="+",
        action="extend",
        help=".jsonl (text or messages), .txt, or folders; repeatable",
    )
    add_output_arguments(p, "output folder (a BEAM adapter when finished)")
    p.add_argument(
        "--val-data",
        nargs="+",
        action="extend",
        help="validation data (default: hold out --val-fraction); repeatable",
    )
    beam = BeamConfig.__dataclass_fields__
    p.add_argument(
        "--head",
        choices=("router", "linear"),
        default=beam["head"].default,
        help="router: router-aware head, starts as threshold skipping at the budget; linear: the paper's",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=beam["threshold"].default,
        help="keep a slot when sigmoid(z) >= threshold",
    )
    add_config_options(p)
    p.add_argument("--json", action="store_true", help="print the final metrics as JSON")
    p.set_defaults(func=run, on_interrupt=resume_hint)


def config_from_args(args: argparse.Namespace):
    """The TrainConfig of a parsed `beam-moe train` command line."""
    from beam_moe.train import TrainConfig

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name != "beam"}
    values["beam"] = {"threshold": args.threshold, "head": args.head}
    values["max_grad_norm"] = args.max_grad_norm or None  # --max-grad-norm 0: no clipping
    return TrainConfig(**values)


def run(args: argparse.Namespace) -> int:
    from beam_moe.train import train

    result = train(config_from_args(args))
    if not result.main_process:
        return 0
    summary = {
        "output": str(result.output),
        "steps": result.steps,
        "tokens": result.tokens,
        "elapsed_s": round(result.elapsed_s, 2),
        **result.metrics,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        summary["tokens_per_s"] = round(result.tokens / max(result.elapsed_s, 1e-9), 1)
        keys = ("output", "steps", "tokens", "elapsed_s", "tokens_per_s", "val_loss", "val_kl", "val_avg_k")
        for key in (*keys, "avg_k", "beta", "target_reached"):
            if summary.get(key) is not None:
                value = summary[key]
                print(f"{key:<14}  {value:.4f}" if isinstance(value, float) else f"{key:<14}  {value}")
        if summary.get("curve_avg_k_range"):
            low, high = summary["curve_avg_k_range"]
            print(f"{'budgets':<14}  Avg-K {low:.3f} to {high:.3f} (threshold curve stored with the adapter)")
    return 0


def resume_hint(args: argparse.Namespace, argv: list[str]) -> str | None:
    """After Ctrl-C: the command that continues the run in --output (the same one, with --resume)."""
    from beam_moe.adapter import CONFIG_FILE
    from beam_moe.train.checkpointing import checkpoint_dirs
    from beam_moe.train.output import TRAINING_ARGS

    output = Path(args.output)
    if (output / CONFIG_FILE).is_file() or not (output / TRAINING_ARGS).is_file():
        return None
    found = checkpoint_dirs(output)
    if not found:
        every = f"every --save-every {args.save_every} steps" if args.save_every else "--save-every is 0"
        return f"no checkpoint was written yet ({every}); start over with the same command and --overwrite"
    again = [a for a in argv if a not in ("--overwrite", "--resume")]
    return f"continue from {found[-1].name} with: beam-moe {shlex.join([*again, '--resume'])}"
