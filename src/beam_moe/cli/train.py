"""`beam-moe train --model M --data D --output O [--target-avg-k X | --beta B]`: train BEAM mask heads.

Runs unchanged under `accelerate launch` (DDP or FSDP2). See docs/training.md.
"""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train BEAM mask heads on a MoE model (the output folder is a BEAM adapter)",
        description="Train BEAM mask heads (and optionally more) on a MoE checkpoint. "
        "The output folder is a BEAM adapter plus training_args.json and metrics.jsonl.",
    )
    p.add_argument("--model", required=True, help="model folder, or a Hub id when online")
    p.add_argument("--data", required=True, nargs="+", help=".jsonl (text or messages), .txt, or folders")
    p.add_argument("--output", required=True, help="output folder (a BEAM adapter when finished)")
    p.add_argument("--val-data", nargs="+", help="validation data (default: hold out --val-fraction)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of sequences held out (0.05)")

    sparsity = p.add_mutually_exclusive_group(required=True)
    sparsity.add_argument("--beta", type=float, help="the paper's L1 weight on sigmoid(z) (fixed)")
    sparsity.add_argument(
        "--target-avg-k", type=float, help="kept experts per token to reach; beta is adjusted to get there"
    )
    p.add_argument("--controller-kp", type=float, default=0.5, help="budget controller, proportional gain")
    p.add_argument("--controller-ki", type=float, default=0.01, help="budget controller, integral gain")

    p.add_argument("--objective", choices=("lm", "distill", "lm+distill"), default="lm")
    p.add_argument("--distill-weight", type=float, default=1.0, help="weight of the KL in lm+distill")
    p.add_argument("--train", choices=("mask", "mask+router", "full", "lora"), default="mask")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--balance-coef", type=float, help="balance-loss weight for mask+router (model's own)")
    p.add_argument("--threshold", type=float, default=0.5, help="keep a slot when sigmoid(z) >= threshold")

    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--lr", type=float, default=1e-3, help="mask heads' learning rate")
    p.add_argument("--model-lr", type=float, help="learning rate of routers / LoRA / full weights")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (model weights)")
    p.add_argument("--warmup", type=float, default=0.03, help="warm-up: a fraction (<1) or steps (>=1)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decay ends at this x peak lr")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per process per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--max-length", type=int, default=512, help="tokens per sequence")
    p.add_argument("--no-packing", action="store_true", help="one padded sequence per document")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    length.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=0)

    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (0: never)")
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=0, help="validate every N steps (0: at the end)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a previous run in --output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard logs even when installed")
    p.add_argument("--json", action="store_true", help="print the final metrics as JSON")
    p.set_defaults(func=run)


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
        objective=args.objective,
        distill_weight=args.distill_weight,
        train=args.train,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        balance_coef=args.balance_coef,
        beam={"threshold": args.threshold},
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
        for key in ("output", "steps", "tokens", "val_loss", "val_kl", "val_avg_k", "avg_k", "beta"):
            if summary.get(key) is not None:
                value = summary[key]
                print(f"{key:<10}  {value:.4f}" if isinstance(value, float) else f"{key:<10}  {value}")
    return 0
