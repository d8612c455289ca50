"""Pretrain the reference MoE from scratch on the corpus's train split: seeded, resumable, atomic.

    python -m beam_moe.experiments.refmoe.pretrain --output runs/refmoe --install

Plain PyTorch: AdamW with linear warm-up and cosine decay, the model's own load-balancing loss on
(`output_router_logits`, `router_aux_loss_coef`), train loss and held-out perplexity logged.
The output folder holds `tokenizer/` (trained first), `checkpoint/` (replaced atomically every
`--checkpoint-every` steps; a new run with the same arguments resumes from it; safetensors + JSON,
no pickle: see beam_moe.statefile) and, at the end,
`model/`: bf16 safetensors, config, tokenizer and `training.json` (command, seed, data sizes,
held-out perplexity). `--install` copies `model/` to the package (beam_moe/refmoe/model).
`--max-minutes` stops at a checkpoint after that long (exit code 75) so that a long run can be
split into chunks that each hold the CPU lock for a while.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from beam_moe.atomic import atomic_directory, atomic_write_text
from beam_moe.errors import BeamError
from beam_moe.experiments.refmoe.corpus import SPLITS, default_data_dir, read_split
from beam_moe.experiments.refmoe.tokenizer import END_OF_TEXT, train_tokenizer
from beam_moe.refmoe.architecture import REFERENCE_SHAPE, parameter_counts, reference_config
from beam_moe.statefile import load_state, save_state
from beam_moe.train.schedule import WarmupCosine

EXIT_RESUMABLE = 75
SOURCES = ("wiki", "shakespeare", "kjv")
CHECK_BLOCKS = 2
CHECKPOINT_STATE = "state"  # checkpoint/state.safetensors + checkpoint/state.json


@dataclass
class PretrainArgs:
    """Everything that defines the run (a resumed run must match it)."""

    seed: int = 0
    steps: int = 3000
    batch_size: int = 8
    seq_len: int = 512
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 150
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    precision: str = "fp32"
    experts_implementation: str = "grouped_mm"
    vocab_size: int = REFERENCE_SHAPE["vocab_size"]
    router_aux_loss_coef: float = 0.01
    eval_every: int = 250
    eval_blocks: int = 24
    checkpoint_every: int = 250
    shape: str = ""  # JSON overrides of the reference shape (studies and tests); empty = the reference


def shape_overrides(args: PretrainArgs) -> dict[str, Any]:
    try:
        overrides = json.loads(args.shape) if args.shape else {}
    except json.JSONDecodeError as e:
        raise BeamError(
            f"--shape must be a JSON object of Qwen3MoeConfig fields, got {args.shape!r} ({e})"
        ) from e
    if not isinstance(overrides, dict):
        raise BeamError(f"--shape must be a JSON object of Qwen3MoeConfig fields, got {args.shape!r}")
    return overrides


def learning_rate(step: int, args: PretrainArgs) -> float:
    """Linear warm-up to `lr`, then cosine decay to `lr * min_lr_ratio` at the last step (the
    schedule mask training uses too, train/schedule.py)."""
    return WarmupCosine(args.steps, args.warmup, args.min_lr_ratio)(step, args.lr)


# --------------------------------------------------------------------------------------- data


def token_stream(records: list[dict[str, str]], tokenizer, eos_id: int) -> torch.Tensor:
    """All records' tokens, each document followed by <|endoftext|>, as one int64 tensor."""
    ids = tokenizer([r["text"] for r in records], add_special_tokens=False).input_ids
    return torch.tensor([t for doc in ids for t in [*doc, eos_id]], dtype=torch.long)


@dataclass
class TrainData:
    """The train split as fixed blocks of `seq_len` tokens, visited in a seeded order per epoch."""

    blocks: torch.Tensor  # [N, seq_len]
    seed: int

    def batch(self, step: int, batch_size: int) -> torch.Tensor:
        rows = []
        for sample in range(step * batch_size, (step + 1) * batch_size):
            epoch, position = divmod(sample, len(self.blocks))
            rows.append(int(self._order(epoch)[position]))
        return self.blocks[rows]

    def _order(self, epoch: int) -> torch.Tensor:
        cache = self.__dict__.setdefault("_orders", {})
        if epoch not in cache:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            cache[epoch] = torch.randperm(len(self.blocks), generator=generator)
        return cache[epoch]


def build_train_data(records, tokenizer, eos_id: int, seq_len: int, seed: int) -> TrainData:
    """Documents shuffled with the seed, concatenated, cut into blocks (the tail is dropped)."""
    records = list(records)
    random.Random(seed).shuffle(records)
    stream = token_stream(records, tokenizer, eos_id)
    usable = len(stream) // seq_len * seq_len
    return TrainData(blocks=stream[:usable].view(-1, seq_len), seed=seed)


def heldout_blocks(records, tokenizer, eos_id: int, seq_len: int) -> dict[str, torch.Tensor]:
    """Per source, the held-out documents in file order as blocks of `seq_len` (a short tail block kept)."""
    out = {}
    for source in SOURCES:
        stream = token_stream([r for r in records if r["source"] == source], tokenizer, eos_id)
        out[source] = [stream[i : i + seq_len] for i in range(0, len(stream), seq_len) if len(stream) - i > 1]
    return out


def first_blocks(blocks: dict[str, list[torch.Tensor]], count: int) -> dict[str, list[torch.Tensor]]:
    return {source: source_blocks[:count] for source, source_blocks in blocks.items()}


@torch.no_grad()
def heldout_perplexity(
    model, blocks: dict[str, list[torch.Tensor]], limit: int | None = None, batch_size: int = 8
) -> dict[str, Any]:
    """Next-token perplexity per source and over all held-out tokens (token-weighted).

    `limit` evaluates that many blocks per source, evenly spaced (a quick estimate during training).
    """
    was_training = model.training
    model.eval()
    result: dict[str, Any] = {}
    total_nll, total_tokens = 0.0, 0
    for source, source_blocks in blocks.items():
        chosen = source_blocks
        if limit is not None and len(source_blocks) > limit:
            stride = len(source_blocks) / limit
            chosen = [source_blocks[int(i * stride)] for i in range(limit)]
        nll, tokens = 0.0, 0
        for start in range(0, len(chosen), batch_size):
            group = chosen[start : start + batch_size]
            for length in sorted({len(b) for b in group}):
                ids = torch.stack([b for b in group if len(b) == length])
                logits = model(input_ids=ids).logits[:, :-1].float()
                nll += float(
                    torch.nn.functional.cross_entropy(
                        logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
                    )
                )
                tokens += ids[:, 1:].numel()
        result[source] = {"perplexity": math.exp(nll / tokens), "tokens": tokens}
        total_nll, total_tokens = total_nll + nll, total_tokens + tokens
    result["all"] = {"perplexity": math.exp(total_nll / total_tokens), "tokens": total_tokens}
    model.train(was_training)
    return result


# ----------------------------------------------------------------------------------- the run


def _autocast(precision: str):
    if precision == "bf16-autocast":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    if precision == "fp32":
        return contextlib.nullcontext()
    raise BeamError(f"unknown precision {precision!r}; use fp32 or bf16-autocast")


def _param_groups(model, weight_decay: float) -> list[dict]:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def load_or_train_tokenizer(output: Path, train_records, vocab_size: int):
    from transformers import AutoTokenizer

    folder = output / "tokenizer"
    if not (folder / "tokenizer.json").is_file():
        tokenizer = train_tokenizer((r["text"] for r in train_records), vocab_size)
        with atomic_directory(folder) as staging:
            tokenizer.save_pretrained(staging)
    return AutoTokenizer.from_pretrained(folder)


def data_sizes(train_records, heldout_records, tokenizer) -> dict[str, Any]:
    sizes: dict[str, Any] = {}
    for split, records in zip(SPLITS, (train_records, heldout_records), strict=True):
        sizes[split] = {}
        for source in SOURCES:
            texts = [r["text"] for r in records if r["source"] == source]
            tokens = sum(len(ids) + 1 for ids in tokenizer(texts, add_special_tokens=False).input_ids)
            sizes[split][source] = {
                "documents": len(texts),
                "characters": sum(len(t) for t in texts),
                "tokens": tokens,
            }
    return sizes


def expert_usage(model, blocks: dict[str, list[torch.Tensor]], limit: int = 16) -> dict[str, Any]:
    """How evenly the routers use the experts on held-out text: per layer, max/min share over the mean."""
    ids = torch.stack(
        [b for source in SOURCES for b in blocks[source][:limit] if len(b) == len(blocks[source][0])]
    )
    with torch.no_grad():
        logits = model(input_ids=ids, output_router_logits=True).router_logits
    top_k, num_experts = model.config.num_experts_per_tok, model.config.num_experts
    layers = []
    for layer_logits in logits:
        chosen = layer_logits.topk(top_k, dim=-1).indices.reshape(-1)
        share = torch.bincount(chosen, minlength=num_experts).float() / chosen.numel() * num_experts
        layers.append(
            {"max_over_mean": round(float(share.max()), 3), "min_over_mean": round(float(share.min()), 3)}
        )
    return {"tokens": int(ids.numel()), "per_layer": layers}


def _save_checkpoint(output: Path, model, optimizer, step: int, history: list, args: PretrainArgs) -> None:
    with atomic_directory(output / "checkpoint") as staging:
        save_state(
            staging,
            CHECKPOINT_STATE,
            {
                "step": step,
                "args": asdict(args),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "history": history,
                "torch_rng": torch.get_rng_state().tolist(),
            },
        )
    atomic_write_text(output / "log.jsonl", "".join(json.dumps(h) + "\n" for h in history))


def _log(event: dict, history: list) -> None:
    history.append(event)
    parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in event.items()]
    print(" ".join(parts), flush=True)


def pretrain(*args: Any, **kwargs: Any) -> dict[str, Any] | None:
    """Run (or resume) the pretraining with deterministic kernels, so that a resumed run ends bit-identical.

    Returns the training record, or None when stopped by `max_minutes` (run again to resume).
    """
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return _pretrain(*args, **kwargs)
    finally:
        torch.use_deterministic_algorithms(deterministic)


def _pretrain(
    output: str | Path,
    args: PretrainArgs,
    data_dir: str | Path | None = None,
    max_minutes: float | None = None,
    threads: int = 2,
    command: list[str] | None = None,
) -> dict[str, Any] | None:
    from transformers import Qwen3MoeForCausalLM

    output = Path(output)
    torch.set_num_threads(threads)
    started = time.time()
    train_records = read_split("train", data_dir)
    heldout_records = read_split("heldout", data_dir)
    tokenizer = load_or_train_tokenizer(output, train_records, args.vocab_size)
    eos_id = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    data = build_train_data(train_records, tokenizer, eos_id, args.seq_len, args.seed)
    heldout = heldout_blocks(heldout_records, tokenizer, eos_id, args.seq_len)

    torch.manual_seed(args.seed)
    special = {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id}
    config = reference_config(
        special,
        **{
            **shape_overrides(args),
            "vocab_size": len(tokenizer),
            "router_aux_loss_coef": args.router_aux_loss_coef,
        },
    )
    model = Qwen3MoeForCausalLM(config)
    model.set_experts_implementation(args.experts_implementation)
    optimizer = torch.optim.AdamW(
        _param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95), eps=1e-8
    )
    step, history = 0, []
    checkpoint = output / "checkpoint"
    if (checkpoint / "state.pt").is_file() and not (checkpoint / f"{CHECKPOINT_STATE}.json").is_file():
        raise BeamError(
            f"{checkpoint} was written by an older beam-moe (a pickle file, no longer read); "
            "delete it to start the run again, or use another --output"
        )
    if (checkpoint / f"{CHECKPOINT_STATE}.json").is_file():
        state = load_state(checkpoint, CHECKPOINT_STATE)
        if state["args"] != asdict(args):
            changed = {
                k: (state["args"].get(k), v) for k, v in asdict(args).items() if state["args"].get(k) != v
            }
            raise BeamError(
                f"{output} holds a checkpoint of a run with other arguments {changed} (checkpoint, now); "
                "use another --output or the same arguments"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, history = state["step"], state["history"]
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
        print(f"resuming at step {step} of {args.steps} from {checkpoint}", flush=True)
    else:
        print(
            f"pretraining {parameter_counts(config)['total'] / 1e6:.2f}M parameters for {args.steps} steps "
            f"of {args.batch_size}x{args.seq_len} tokens; {len(data.blocks)} train blocks "
            f"({args.steps * args.batch_size / len(data.blocks):.2f} epochs)",
            flush=True,
        )

    model.train()
    window_start, window_tokens = time.time(), 0
    while step < args.steps:
        lr = learning_rate(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        ids = data.batch(step, args.batch_size)
        with _autocast(args.precision):
            out = model(input_ids=ids, labels=ids, output_router_logits=True)
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_tokens += ids.numel()
        if step % 20 == 0 or step == args.steps:
            aux = float(out.aux_loss.detach())
            _log(
                {
                    "step": step,
                    "lr": lr,
                    "loss": float(out.loss.detach()),
                    "lm_loss": float(out.loss.detach()) - args.router_aux_loss_coef * aux,
                    "aux_loss": aux,
                    "grad_norm": float(grad_norm),
                    "tokens_per_s": window_tokens / (time.time() - window_start),
                },
                history,
            )
            window_start, window_tokens = time.time(), 0
        if step % args.eval_every == 0 and step < args.steps:
            quick = heldout_perplexity(model, heldout, limit=args.eval_blocks)
            _log({"step": step, "heldout_ppl_estimate": quick["all"]["perplexity"]}, history)
            window_start, window_tokens = time.time(), 0
        if step % args.checkpoint_every == 0 or step == args.steps:
            _save_checkpoint(output, model, optimizer, step, history, args)
            if max_minutes is not None and step < args.steps and time.time() - started > 60 * max_minutes:
                print(f"stopping at step {step} after {max_minutes} minutes; run again to resume", flush=True)
                return None

    return _finish(
        output, model, tokenizer, config, args, history, train_records, heldout_records, heldout, command
    )


def _finish(
    output, model, tokenizer, config, args, history, train_records, heldout_records, heldout, command
):
    """Write model/ (bf16 weights, config, tokenizer, training.json) in one atomic step."""
    from transformers import Qwen3MoeForCausalLM

    model.eval()
    fp32_ppl = heldout_perplexity(model, heldout)
    with atomic_directory(output / "model") as staging:
        model.config.output_router_logits = False
        model.to(torch.bfloat16).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        reloaded = Qwen3MoeForCausalLM.from_pretrained(staging, dtype=torch.float32).eval()
        bf16_ppl = heldout_perplexity(reloaded, heldout)
        record = {
            "command": command or [],
            "seed": args.seed,
            "args": asdict(args),
            "architecture": {
                "class": "Qwen3MoeForCausalLM",
                **{k: getattr(config, k) for k in REFERENCE_SHAPE},
                "norm_topk_prob": config.norm_topk_prob,
                "shared_experts": 0,
                "parameters": parameter_counts(config),
            },
            "data": data_sizes(train_records, heldout_records, tokenizer),
            "heldout_perplexity": {k: round(v["perplexity"], 4) for k, v in bf16_ppl.items()},
            "heldout_tokens": {k: v["tokens"] for k, v in bf16_ppl.items()},
            "heldout_perplexity_fp32_master": {k: round(v["perplexity"], 4) for k, v in fp32_ppl.items()},
            "expert_usage_heldout": expert_usage(reloaded, heldout),
            "check": {
                "what": f"held-out perplexity of the first {CHECK_BLOCKS} blocks of each source (bf16 weights)",
                "blocks_per_source": CHECK_BLOCKS,
                "seq_len": args.seq_len,
                "perplexity": heldout_perplexity(reloaded, first_blocks(heldout, CHECK_BLOCKS))["all"][
                    "perplexity"
                ],
            },
            "history": history,
            "machine": {
                "cpu": platform.processor() or platform.machine(),
                "cores": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
            "train_seconds_logged": round(
                sum(
                    20 * args.batch_size * args.seq_len / h["tokens_per_s"]
                    for h in history
                    if "tokens_per_s" in h
                ),
                1,
            ),
        }
        (staging / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"held-out perplexity {record['heldout_perplexity']} (bf16 weights); model in {output / 'model'}")
    return record


def install(model_dir: Path) -> Path:
    """Copy a finished model folder into the package (beam_moe/refmoe/model), atomically."""
    from beam_moe.refmoe import PACKAGED_MODEL_DIR

    with atomic_directory(PACKAGED_MODEL_DIR) as staging:
        for entry in model_dir.iterdir():
            shutil.copy2(entry, staging / entry.name)
    return PACKAGED_MODEL_DIR


def main(argv: list[str] | None = None) -> int:
    defaults = PretrainArgs()
    parser = argparse.ArgumentParser(
        prog="python -m beam_moe.experiments.refmoe.pretrain", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--output", required=True, type=Path, help="run folder (resumed when it holds a checkpoint)"
    )
    parser.add_argument("--data-dir", default=None, help=f"prepared corpus (default: {default_data_dir()})")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--max-minutes", type=float, default=None, help=f"stop at a checkpoint (exit {EXIT_RESUMABLE})"
    )
    parser.add_argument("--install", action="store_true", help="copy the finished model into the package")
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    ns = parser.parse_args(argv)
    args = PretrainArgs(**{k: getattr(ns, k) for k in asdict(defaults)})
    command = [
        "python",
        "-m",
        "beam_moe.experiments.refmoe.pretrain",
        *(sys.argv[1:] if argv is None else argv),
    ]
    try:
        record = pretrain(ns.output, args, ns.data_dir, ns.max_minutes, ns.threads, command)
        if record is None:
            return EXIT_RESUMABLE
        if ns.install:
            print(f"installed in {install(ns.output / 'model')}")
    except BeamError as e:
        print(f"pretrain: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
