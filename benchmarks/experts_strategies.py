"""Developer probe: the expert call alone at a preset's real sizes, per strategy of the grouped
backend and per transformers implementation, interleaved (medians in ms). Decides the CPU strategy
threshold; see benchmarks/NOTES-kernels.md.

    .venv/bin/python benchmarks/experts_strategies.py --tokens 1,8,64,512
"""

from __future__ import annotations

import argparse
import functools

import torch

from beam_moe.bench.layer import exact_keep
from beam_moe.bench.synthetic import preset_config, random_block
from beam_moe.bench.timing import interleaved_medians
from beam_moe.experts import ExpertWeights
from beam_moe.experts.grouped import grouped_experts
from beam_moe.presets import get_preset


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="qwen3-30b-a3b")
    parser.add_argument("--tokens", default="1,8,64,512")
    parser.add_argument("--avg-k", type=float, default=1.23)
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = get_preset(args.preset)
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    _, block = random_block(preset_config(preset), torch.bfloat16)
    experts = block.experts
    w = ExpertWeights.of(experts)
    num_experts, top_k = preset.num_experts, preset.top_k
    generator = torch.Generator().manual_seed(0)
    for tokens in [int(t) for t in args.tokens.split(",")]:
        samples = []
        for _ in range(args.draws):
            hidden = torch.randn(tokens, preset.hidden_size, generator=generator).to(torch.bfloat16)
            ids = torch.stack(
                [torch.randperm(num_experts, generator=generator)[:top_k] for _ in range(tokens)]
            )
            weights = torch.rand(tokens, top_k, generator=generator).to(torch.bfloat16)
            keep = exact_keep(tokens, top_k, round(args.avg_k * tokens), generator)
            samples.append((hidden, ids, weights, torch.where(keep, ids, num_experts), weights * keep))
        eager = type(experts).forward
        grouped_hf = ALL_EXPERTS_FUNCTIONS["grouped_mm"]

        def call(fn, masked, d, s=samples):
            h, ids, wt, mids, mwt = s[d]
            return fn(h, mids, mwt) if masked else fn(h, ids, wt)

        methods = {
            "hf_eager": functools.partial(call, functools.partial(eager, experts), False),
            "hf_grouped_mm": functools.partial(call, functools.partial(grouped_hf, experts), False),
        }
        for strategy in ("loop", "grouped_mm"):
            fn = functools.partial(grouped_experts, w, strategy=strategy)
            methods[f"all_{strategy}"] = functools.partial(call, fn, False)
            methods[f"x_{strategy}"] = functools.partial(call, fn, True)
        with torch.inference_mode():
            medians = interleaved_medians(
                methods, torch.device("cpu"), draws=args.draws, rounds=args.rounds, budget_s=40
            )
        print(tokens, "  ".join(f"{k} {v * 1e3:.3f}" for k, v in medians.items()), flush=True)


if __name__ == "__main__":
    main()
