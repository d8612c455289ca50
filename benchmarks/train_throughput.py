"""Training throughput and peak memory of `beam-moe train`: `--train mask` against `--train full`.

Runs the real training loop (beam_moe.train.train) on a fixed small Qwen3-MoE (random weights,
byte tokenizer) in a fresh subprocess per run, alternating the modes, and records:
- tokens/s: median over the timed steps of each run (the first steps are warm-up), then the median
  over repeats; and the ratio mask / full measured side by side;
- peak memory: the subprocess's peak resident set (CPU) or torch.cuda.max_memory_allocated (GPU).

    .venv/bin/python benchmarks/train_throughput.py
writes benchmarks/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = dict(
    hidden_size=256,
    intermediate_size=512,
    moe_intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    num_experts=16,
    num_experts_per_tok=4,
    max_position_embeddings=1024,
)
MODES = ("mask", "full")


def worker(mode: str, folder: Path, steps: int, warmup: int, batch_size: int, max_length: int) -> dict:
    import torch

    from beam_moe.train import train

    result = train(
        model=str(folder / "model"),
        data=[str(folder / "data.jsonl")],
        output=str(folder / f"out-{mode}-{time.monotonic_ns()}"),
        train=mode,
        beta=0.05,
        max_steps=steps + warmup,
        batch_size=batch_size,
        max_length=max_length,
        val_fraction=0.0,
        save_every=0,
        progress=False,
        tensorboard=False,
    )
    lines = (result.output / "metrics.jsonl").read_text().splitlines()
    rates = [json.loads(line)["tokens_per_s"] for line in lines][warmup:]
    peak = (
        torch.cuda.max_memory_allocated()
        if torch.cuda.is_available()
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {"mode": mode, "tokens_per_s": statistics.median(rates), "peak_memory_bytes": peak}


def machine() -> dict:
    import torch
    import transformers

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps per run")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument(
        "--output", "-o", default=str(Path(__file__).parent / "results" / "train_throughput.json")
    )
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        report = worker(
            args.worker, Path(args.folder), args.steps, args.warmup, args.batch_size, args.max_length
        )
        print(json.dumps(report))
        return

    from beam_moe.tiny_models import save_tiny

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        save_tiny("qwen3_moe", folder / "model", **MODEL)
        needed = (args.steps + args.warmup) * args.batch_size * args.max_length
        words = [
            "the",
            "quick",
            "brown",
            "fox",
            "jumps",
            "over",
            "the",
            "lazy",
            "dog",
            "while",
            "a",
            "stitch",
            "in",
            "time",
            "saves",
            "nine",
        ]
        with open(folder / "data.jsonl", "w") as f:
            for i in range(needed // 60 + 10):
                f.write(json.dumps({"text": " ".join(words[(i + j) % len(words)] for j in range(12))}) + "\n")
        runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for _ in range(args.repeats):
            for mode in MODES:
                command = [sys.executable, __file__, "--worker", mode, "--folder", str(folder)]
                command += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
                command += ["--batch-size", str(args.batch_size), "--max-length", str(args.max_length)]
                out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
                runs[mode].append(json.loads(out.strip().splitlines()[-1]))
    summary = {
        mode: {
            "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in runs[mode]),
            "peak_memory_mib_median": statistics.median(r["peak_memory_bytes"] for r in runs[mode]) / 2**20,
        }
        for mode in MODES
    }
    ratios = [m["tokens_per_s"] / f["tokens_per_s"] for m, f in zip(runs["mask"], runs["full"], strict=True)]
    report = {
        "benchmark": "train_throughput",
        "command": ".venv/bin/python benchmarks/train_throughput.py",
        "model": {"model_type": "qwen3_moe", **MODEL, "vocab_size": 261},
        "settings": {k: getattr(args, k) for k in ("repeats", "steps", "warmup", "batch_size", "max_length")},
        "machine": machine(),
        "summary": summary,
        "mask_over_full_tokens_per_s": statistics.median(ratios),
        "runs": runs,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"summary": summary, "mask_over_full": report["mask_over_full_tokens_per_s"]}, indent=2))


if __name__ == "__main__":
    main()
