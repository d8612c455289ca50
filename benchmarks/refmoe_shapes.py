"""Pretraining speed of candidate reference-MoE shapes on this machine (tokens/s of a full AdamW step).

Compares, in one process: transformers' experts implementations (grouped_mm, the eager loop; batched_mm
gathers a weight copy per token and ran out of memory at this size),
fp32 against bf16 autocast, and a few shapes (hidden size, layers, expert size, sequence length).
Median and best (minimum step time) over repeats: on a shared machine the best is the closest to an
idle machine's speed. The machine is described in the JSON. Run it under the CPU lock:

    .venv/bin/python benchmarks/refmoe_shapes.py
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import Qwen3MoeForCausalLM

from beam_moe.atomic import atomic_write_text
from beam_moe.refmoe.architecture import REFERENCE_SHAPE, parameter_counts, reference_config

RESULT = Path(__file__).parent / "results" / "refmoe_shapes.json"

L6 = dict(num_hidden_layers=6)  # the first candidate: 6 layers of hidden 256, 32 experts of 64, vocab 8192
CANDIDATES = [
    # (name, config overrides, experts implementation, precision, sequence length)
    ("6 layers", L6, "grouped_mm", "fp32", 256),
    ("6 layers, deterministic", L6, "grouped_mm", "fp32", 256),
    ("6 layers", L6, "grouped_mm", "bf16-autocast", 256),
    ("6 layers", L6, "eager", "fp32", 256),
    ("6 layers", L6, "grouped_mm", "fp32", 512),
    ("6 layers", L6, "grouped_mm", "fp32", 128),
    ("4 layers (chosen)", dict(num_hidden_layers=4), "grouped_mm", "fp32", 256),
    ("6 layers, experts of 48", dict(L6, moe_intermediate_size=48), "grouped_mm", "fp32", 256),
    ("6 layers, vocab 4096", dict(L6, vocab_size=4096), "grouped_mm", "fp32", 256),
    (
        "6 layers, hidden 192",
        dict(L6, hidden_size=192, num_attention_heads=3, num_key_value_heads=1),
        "grouped_mm",
        "fp32",
        256,
    ),
]


class Candidate:
    """One model and optimiser, stepped in rounds with the others so that machine noise hits all alike."""

    def __init__(self, name, overrides, implementation, precision, seq_len, tokens):
        torch.manual_seed(0)
        self.name, self.overrides, self.implementation = name, overrides, implementation
        self.precision, self.seq_len, self.batch = precision, seq_len, tokens // seq_len
        self.config = reference_config(**overrides)
        self.model = Qwen3MoeForCausalLM(self.config)
        self.model.set_experts_implementation(implementation)
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.ids = torch.randint(3, self.config.vocab_size, (self.batch, seq_len))
        self.times: list[float] = []

    def step(self) -> float:
        torch.use_deterministic_algorithms(self.name.endswith("deterministic"))
        start = time.perf_counter()
        autocast = (
            torch.autocast("cpu", dtype=torch.bfloat16)
            if self.precision == "bf16-autocast"
            else contextlib.nullcontext()
        )
        with autocast:
            loss = self.model(input_ids=self.ids, labels=self.ids, output_router_logits=True).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    def row(self) -> dict:
        counts = parameter_counts(self.config)
        median = statistics.median(self.times)
        return {
            "shape": self.name,
            "overrides": self.overrides,
            "implementation": self.implementation,
            "precision": self.precision,
            "batch": self.batch,
            "seq_len": self.seq_len,
            "step_s_median": round(median, 4),
            "step_s_min": round(min(self.times), 4),
            "tokens_per_s_best": round(self.batch * self.seq_len / min(self.times), 1),
            "step_s_all": [round(t, 4) for t in self.times],
            "tokens_per_s": round(self.batch * self.seq_len / median, 1),
            "params": counts["total"],
            "bf16_mb": round(counts["total"] * 2 / 1e6, 2),
            "active_non_embedding": counts["active_non_embedding"],
        }


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average_at_start": os.getloadavg(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=4, help="measured rounds (after one warm-up round)")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per step")
    parser.add_argument("--output", type=Path, default=RESULT)
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    info = machine()
    candidates = [Candidate(*c, tokens=args.tokens) for c in CANDIDATES]
    for round_index in range(args.repeats + 1):
        for candidate in candidates:
            seconds = candidate.step()
            if round_index > 0:  # the first round warms up
                candidate.times.append(seconds)
        print(f"round {round_index} done", flush=True)
    rows = [c.row() for c in candidates]
    base = rows[0]["tokens_per_s_best"]
    for row in rows:
        row["best_speed_vs_reference_fp32_grouped"] = round(row["tokens_per_s_best"] / base, 3)
        print(
            f"{row['shape']:<22} {row['implementation']:<10} {row['precision']:<13} {row['batch']:>3}x{row['seq_len']:<4}"
            f" median {row['tokens_per_s']:>6.0f} best {row['tokens_per_s_best']:>6.0f} tok/s"
            f" (best x{row['best_speed_vs_reference_fp32_grouped']:.2f})"
            f"  {row['params'] / 1e6:6.2f}M  {row['bf16_mb']:5.1f} MB",
            flush=True,
        )
    info["load_average_at_end"] = os.getloadavg()
    document = {
        "benchmark": "refmoe_shapes",
        "reference_shape": REFERENCE_SHAPE,
        "machine": info,
        "rows": rows,
    }
    atomic_write_text(args.output, json.dumps(document, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
