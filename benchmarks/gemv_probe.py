"""Developer probe: one expert-sized bf16 GEMV (x [M, 2048] times a [1536, 2048] weight) in the
forms torch offers, against a copy and a sum of the same bytes; weights rotate so none is cached.

    .venv/bin/python benchmarks/gemv_probe.py --threads 1

GB/s is the weight's bytes over the time (a clone also writes them: twice the traffic).
"""

from __future__ import annotations

import argparse

import torch
from torch.nn import functional as F

from beam_moe.bench.timing import interleaved_medians


def gemv_forms(x: torch.Tensor, weights: list, transposed: list) -> dict:
    out = torch.empty(x.shape[0], 1536, dtype=x.dtype)
    methods = {
        "F.linear": lambda d: F.linear(x, weights[d]),
        "mm(x, W.t(), out=)": lambda d: torch.mm(x, weights[d].t(), out=out),
        "x @ W.t().contiguous()": lambda d: x @ transposed[d],
        "clone": lambda d: weights[d].clone(),
        "sum": lambda d: weights[d].sum(),
    }
    if x.shape[0] == 1:
        methods["torch.mv"] = lambda d: torch.mv(weights[d], x[0])
    return methods


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", default="1,8,32")
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    copies = 24
    weights = [torch.randn(1536, 2048).bfloat16() for _ in range(copies)]
    transposed = [w.t().contiguous() for w in weights]
    nbytes = weights[0].numel() * weights[0].element_size()
    for rows in [int(r) for r in args.rows.split(",")]:
        methods = gemv_forms(torch.randn(rows, 2048).bfloat16(), weights, transposed)
        medians = interleaved_medians(methods, torch.device("cpu"), draws=copies, rounds=args.rounds)
        cells = [f"{name} {s * 1e6:.0f} us ({nbytes / s / 1e9:.1f} GB/s)" for name, s in medians.items()]
        print(f"M={rows}: " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    main()
