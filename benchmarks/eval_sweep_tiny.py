"""A small end-to-end check of the evaluation tools on a model whose quality depends on its experts.

Pretrains a small byte-level Qwen3-MoE on training text (Wikipedia leads that are NOT held out),
trains BEAM mask heads on it at a few regulariser strengths (base frozen), then runs
`beam_moe.eval.sweep` (BEAM against Top-K pruning, Top-P routing, threshold skipping and random
masks at matched Avg-K) and `analyze_routing` on the shipped held-out text. Minutes on 2 CPU cores;
run it under the CPU lock on a shared machine:

    python scripts/build_eval_tasks.py --train-out /tmp/wiki_train.jsonl
    python benchmarks/eval_sweep_tiny.py --train-text /tmp/wiki_train.jsonl

Writes benchmarks/results/eval_sweep_tiny/ (sweep.json, sweep.md, sweep.png, analysis/).
This is a tiny model trained for a few minutes: the numbers show that the tools measure what they
should, not what BEAM achieves on a real checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import torch

from beam_moe import BeamConfig, attach, mask_parameters, mask_regularizer, save_beam
from beam_moe.atomic import atomic_directory
from beam_moe.eval import DEFAULT_PPL_FILE, analyze_routing, plot_sweep, read_texts, sweep, sweep_markdown
from beam_moe.eval.plots import write_analysis_plots
from beam_moe.tiny_models import BYTE_VOCAB_SIZE, byte_tokenizer, tiny_model

OUT = Path(__file__).resolve().parent / "results" / "eval_sweep_tiny"


def batches(tokenizer, texts: list[str], length: int, batch: int, seed: int):
    stream: list[int] = []
    for text in texts:
        stream += [*tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    data = torch.tensor(stream)
    generator = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(data) - length - 1, (batch,), generator=generator)
        yield torch.stack([data[s : s + length] for s in starts.tolist()])


def pretrain(model, tokenizer, texts, steps: int, seed: int) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    model.train()
    losses = []
    data = batches(tokenizer, texts, 128, 16, seed)
    for _ in range(steps):
        tokens = next(data)
        loss = model(input_ids=tokens, labels=tokens).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if len(losses) % 50 == 0:
            print(f"pretrain step {len(losses)}/{steps}: loss {sum(losses[-50:]) / 50:.3f}", flush=True)
    model.eval()
    return losses


def train_masks(model, tokenizer, texts, beta: float, steps: int, seed: int) -> float:
    for p in model.parameters():
        p.requires_grad_(False)
    params = mask_parameters(model)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=1e-3)
    model.train()
    data = batches(tokenizer, texts, 128, 16, seed)
    for _ in range(steps):
        tokens = next(data)
        loss = model(input_ids=tokens, labels=tokens).loss + beta * mask_regularizer(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-text", required=True, help="JSONL of training text (not held out)")
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--mask-steps", type=int, default=100)
    parser.add_argument("--betas", default="0.01,0.05,0.2")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--output", "-o", type=Path, default=OUT)
    args = parser.parse_args()

    torch.manual_seed(0)
    random.seed(0)
    tokenizer = byte_tokenizer()
    texts = read_texts(args.train_text)
    model = tiny_model(
        "qwen3_moe",
        vocab_size=BYTE_VOCAB_SIZE,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_experts=16,
        num_experts_per_tok=4,
        moe_intermediate_size=64,
        max_position_embeddings=512,
    )
    started = time.perf_counter()
    losses = pretrain(model, tokenizer, texts, args.pretrain_steps, seed=1)
    pretrain_s = time.perf_counter() - started
    attach(model, BeamConfig())

    with atomic_directory(args.output) as staging, tempfile.TemporaryDirectory() as scratch:
        adapters = []
        for i, beta in enumerate(float(b) for b in args.betas.split(",")):
            for p in mask_parameters(model):
                torch.nn.init.zeros_(p)
            loss = train_masks(model, tokenizer, texts, beta, args.mask_steps, seed=10 + i)
            print(f"mask heads, beta {beta:g}: last loss {loss:.3f}", flush=True)
            path = Path(scratch) / f"beta_{beta:g}"  # useless without the base model, which is not kept
            save_beam(model, path, extra={"beta": beta, "steps": args.mask_steps})
            adapters.append(path)
        sweep_started = time.perf_counter()
        result = sweep(
            model,
            tokenizer,
            DEFAULT_PPL_FILE,
            adapters=adapters,
            points=6,
            max_tokens=args.eval_tokens,
            max_length=256,
            calibration_tokens=2048,
            progress=True,
        )
        sweep_s = time.perf_counter() - sweep_started
        result["config"]["adapters"] = [p.name for p in adapters]
        result["setup"] = {
            "model": "qwen3_moe, byte vocab 261, hidden 128, 4 layers, 16 experts, top-4, expert inter. 64",
            "pretrain_steps": args.pretrain_steps,
            "pretrain_final_loss": sum(losses[-20:]) / 20,
            "mask_steps": args.mask_steps,
            "betas": args.betas,
            "pretrain_s": pretrain_s,
            "sweep_s": sweep_s,
            "machine": {
                "platform": platform.platform(),
                "processor": platform.processor(),
                "cpus": os.cpu_count(),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
            },
        }
        (staging / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
        (staging / "sweep.md").write_text(sweep_markdown(result))
        plot_sweep(result, staging / "sweep.png")
        from beam_moe.adapter import load_beam

        load_beam(model, adapters[len(adapters) // 2])
        summary = analyze_routing(model, tokenizer, DEFAULT_PPL_FILE, max_tokens=8192, heatmap_tokens=64)
        (staging / "analysis").mkdir()
        write_analysis_plots(summary, staging / "analysis")
        (staging / "analysis" / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(sweep_markdown(result))
    print(f"pretrain {pretrain_s:.0f} s, sweep {sweep_s:.0f} s; wrote {args.output}")


if __name__ == "__main__":
    main()
