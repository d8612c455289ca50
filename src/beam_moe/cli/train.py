"""`beam-moe train --model M --data D --output O [--target-avg-k X | --beta B]`: train BEAM mask heads.

Runs unchanged under `accelerate launch` (DDP or FSDP2). See docs/training.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from beam_moe.cli._output import add_output_arguments


def _default(name: str):
    """`TrainConfig`'s default for a field: the CLI, the Python API and the quickstart share them."""
    from beam_moe.train.config import TrainConfig

    return TrainConfig.__dataclass_fields__[name].default


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
    p.add_argument(
        "--val-fraction",
        type=float,
        default=_default("val_fraction"),
        help="share of sequences held out (0.05)",
    )

    sparsity = p.add_mutually_exclusive_group(required=True)
    sparsity.add_argument("--beta", type=float, help="the paper's L1 weight on sigmoid(z) (fixed)")
    sparsity.add_argument(
        "--target-avg-k", type=float, help="kept experts per token to reach; beta is adjusted to get there"
    )
    p.add_argument(
        "--controller-kp",
        type=float,
        default=_default("controller_kp"),
        help="budget controller, proportional gain on the relative Avg-K error, in log beta (%(default)s)",
    )
    p.add_argument(
        "--controller-ki",
        type=float,
        default=_default("controller_ki"),
        help="budget controller, integral gain (%(default)s)",
    )
    p.add_argument(
        "--controller-smoothing",
        type=float,
        default=_default("controller_smoothing"),
        help="EMA factor of the training Avg-K the controller reads (%(default)s)",
    )
    p.add_argument("--beta-init", type=float, help="the controller's first beta (default: K / (2 target^2))")
    p.add_argument(
        "--settle",
        type=float,
        default=_default("settle"),
        help="last fraction of the steps with beta frozen and the learning rates decaying (%(default)s)",
    )
    p.add_argument(
        "--no-calibrate",
        action="store_true",
        help="keep threshold 0.5 at the end instead of calibrating it so that Avg-K equals the target",
    )
    p.add_argument(
        "--calibration-tokens",
        type=int,
        default=_default("calibration_tokens"),
        help="validation (else training) tokens the start and end calibrations measure (%(default)s)",
    )
    p.add_argument(
        "--no-threshold-curve",
        action="store_true",
        help="skip measuring the threshold -> Avg-K curve at the end (the adapter then serves only "
        "thresholds, not budgets in experts, until `beam-moe calibrate`)",
    )
    p.add_argument(
        "--curve-tokens",
        type=int,
        default=_default("curve_tokens"),
        help="validation (else training) tokens the threshold -> Avg-K curve is measured on, once per "
        "threshold of its 33-point grid (%(default)s)",
    )
    p.add_argument(
        "--start-avg-k",
        type=float,
        help="where a router-aware head starts (default: the target; with --beta, every expert kept)",
    )
    p.add_argument(
        "--head",
        choices=("router", "linear"),
        default=BeamConfig.__dataclass_fields__["head"].default,
        help="router: router-aware head, starts as threshold skipping at the budget; linear: the paper's "
        "(%(default)s)",
    )
    p.add_argument(
        "--router-term-lr-ratio",
        type=float,
        default=_default("router_term_lr_ratio"),
        help="learning rate of a router-aware head's two scalars per layer, x --lr (%(default)s)",
    )

    p.add_argument("--objective", choices=("lm", "distill", "lm+distill"), default=_default("objective"))
    p.add_argument(
        "--distill-weight",
        type=float,
        default=_default("distill_weight"),
        help="weight of the KL in lm+distill",
    )
    p.add_argument("--train", choices=("mask", "mask+router", "full", "lora"), default=_default("train"))
    p.add_argument("--lora-rank", type=int, default=_default("lora_rank"))
    p.add_argument("--lora-alpha", type=float, default=_default("lora_alpha"))
    p.add_argument("--balance-coef", type=float, help="balance-loss weight for mask+router (model's own)")
    p.add_argument("--threshold", type=float, default=0.5, help="keep a slot when sigmoid(z) >= threshold")

    p.add_argument("--dtype", choices=("fp32", "bf16"), default=_default("dtype"))
    p.add_argument("--lr", type=float, default=_default("lr"), help="mask heads' learning rate (%(default)s)")
    p.add_argument("--model-lr", type=float, help="learning rate of routers / LoRA / full weights")
    p.add_argument(
        "--weight-decay",
        type=float,
        default=_default("weight_decay"),
        help="AdamW weight decay (model weights)",
    )
    p.add_argument(
        "--warmup", type=float, default=_default("warmup"), help="warm-up: a fraction (<1) or steps (>=1)"
    )
    p.add_argument(
        "--min-lr-ratio",
        type=float,
        default=_default("min_lr_ratio"),
        help="cosine decay ends at this x peak lr",
    )
    p.add_argument(
        "--max-grad-norm", type=float, default=_default("max_grad_norm"), help="gradient clipping (0: off)"
    )
    p.add_argument(
        "--batch-size", type=int, default=_default("batch_size"), help="sequences per process per micro-batch"
    )
    p.add_argument(
        "--grad-accum", type=int, default=_default("grad_accum"), help="micro-batches per optimizer step"
    )
    p.add_argument("--max-length", type=int, default=_default("max_length"), help="tokens per sequence")
    p.add_argument("--no-packing", action="store_true", help="one padded sequence per document")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    length.add_argument("--epochs", type=float, default=_default("epochs"))
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=_default("seed"))

    p.add_argument(
        "--save-every", type=int, default=_default("save_every"), help="checkpoint every N steps (0: never)"
    )
    p.add_argument("--keep-checkpoints", type=int, default=_default("keep_checkpoints"))
    p.add_argument(
        "--eval-every",
        type=int,
        default=_default("eval_every"),
        help="validate every N steps (0: at the end)",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard logs even when installed")
    p.add_argument("--json", action="store_true", help="print the final metrics as JSON")
    p.set_defaults(func=run, on_interrupt=resume_hint)


def config_from_args(args: argparse.Namespace):
    from beam_moe.train import TrainConfig

    return TrainConfig(
        model=args.model,
        data=args.data,
        output=args.output,
        val_data=args.val_data,
        val_fraction=args.val_fraction,
        beta=args.beta,
        target_avg_k=args.target_avg_k,
        controller_kp=args.controller_kp,
        controller_ki=args.controller_ki,
        controller_smoothing=args.controller_smoothing,
        beta_init=args.beta_init,
        settle=args.settle,
        calibrate=not args.no_calibrate,
        calibration_tokens=args.calibration_tokens,
        threshold_curve=not args.no_threshold_curve,
        curve_tokens=args.curve_tokens,
        start_avg_k=args.start_avg_k,
        router_term_lr_ratio=args.router_term_lr_ratio,
        objective=args.objective,
        distill_weight=args.distill_weight,
        train=args.train,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        balance_coef=args.balance_coef,
        beam={"threshold": args.threshold, "head": args.head},
        dtype=args.dtype,
        lr=args.lr,
        model_lr=args.model_lr,
        weight_decay=args.weight_decay,
        warmup=args.warmup,
        min_lr_ratio=args.min_lr_ratio,
        max_grad_norm=args.max_grad_norm or None,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_length=args.max_length,
        packing=not args.no_packing,
        max_steps=args.max_steps,
        epochs=args.epochs,
        gradient_checkpointing=args.gradient_checkpointing,
        seed=args.seed,
        save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints,
        eval_every=args.eval_every,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        tensorboard=False if args.no_tensorboard else None,
    )


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
