"""The kept experts of one MoE layer, three ways, interleaved (medians in ms): beam-moe's native op
(`beam_moe.native.kept_experts`, the `native` backend), vLLM's CPU fused-MoE kernel
(`cpu_fused_moe` on weights prepacked as vLLM prepacks them) called the way BEAM's vLLM runner
calls it on the kept pairs (`KernelOnKeptPairs`: one token's kept ids as its top-K', or one top-1
row per kept pair summed back per token), and the `grouped` backend (torch's bf16 GEMMs, oneDNN's,
one per kept expert). Which kernel reads the kept experts faster, outside the engine, and where
`native_preferred` should hand a call to `grouped`; `serving_vllm.py` measures the engines.

    .venv/bin/python benchmarks/experts_vs_vllm.py --tokens 1,8,32,64,512 --threads 2 \
        --output benchmarks/results/experts_vs_vllm-cpu.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

import torch

from beam_moe import native
from beam_moe.bench.layer import exact_keep, parse_tokens
from beam_moe.bench.machine import describe_machine
from beam_moe.bench.timing import interleaved_medians
from beam_moe.experts.grouped import grouped_experts
from beam_moe.experts.native import amx_tiles
from beam_moe.experts.weights import ExpertWeights
from beam_moe.presets import get_preset


def vllm_ops():
    try:
        import vllm._custom_ops as ops
    except ImportError as error:
        sys.exit(f"this benchmark needs vLLM's CPU build (pip install -e '.[vllm]'): {error}")
    return ops


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="qwen3-30b-a3b")
    parser.add_argument("--tokens", default="1,8,32,64,512")
    parser.add_argument("--avg-k", type=float, default=1.23)
    parser.add_argument(
        "--draws",
        type=int,
        default=None,
        help="random inputs to rotate over per token count (default: at least 8, and enough that "
        "together they read every expert, so that a large L3 cache does not hold them all)",
    )
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--budget", type=float, default=30.0, help="seconds per token count")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    if args.output is not None and args.output.exists():
        sys.exit(f"{args.output} exists; choose another --output (results are not overwritten)")
    if not native.available():
        sys.exit("beam-moe's native ops are not built: python -m beam_moe.native build")
    if args.threads:
        torch.set_num_threads(args.threads)
    ops = vllm_ops()
    preset = get_preset(args.preset)
    experts, hidden, inter, top_k = (
        preset.num_experts,
        preset.hidden_size,
        preset.expert_intermediate,
        preset.top_k,
    )
    generator = torch.Generator().manual_seed(0)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=generator) * 0.02).to(torch.bfloat16)
    w2 = (torch.randn(experts, hidden, inter, generator=generator) * 0.02).to(torch.bfloat16)
    as_transformers = ExpertWeights.swiglu(w13, w2)
    isa = "amx" if amx_tiles() else "vec"  # as vLLM 0.32's x86 CPU experts choose
    if isa == "amx":
        # the kernel does not ask Linux for the AMX tile state itself: run first in a process it
        # dies of SIGILL; torch's _init_amx asks
        torch._C._cpu._init_amx()
    packed13, packed2 = ops.cpu_prepack_moe_weight(w13, isa), ops.cpu_prepack_moe_weight(w2, isa)

    def vllm_call(
        x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, keep: torch.Tensor
    ) -> torch.Tensor:
        if x.shape[0] == 1:
            kept_ids = ids.masked_select(keep).view(1, -1).to(torch.int32)
            out = torch.empty_like(x)
            ops.cpu_fused_moe(
                out,
                x,
                packed13,
                packed2,
                None,
                None,
                weights.masked_select(keep).view(1, -1),
                kept_ids,
                "silu",
                isa,
            )
            return out
        kept = keep.reshape(-1).nonzero().squeeze(1)
        token = kept.div(top_k, rounding_mode="floor")
        rows = x.index_select(0, token)
        out = torch.empty_like(rows)
        ops.cpu_fused_moe(
            out,
            rows,
            packed13,
            packed2,
            None,
            None,
            weights.reshape(-1)[kept].view(-1, 1),
            ids.reshape(-1)[kept].view(-1, 1).to(torch.int32),
            "silu",
            isa,
        )
        fused = torch.zeros(x.shape, dtype=torch.float32)
        return fused.index_add_(0, token, out.float()).to(x.dtype)

    results = []
    for tokens in parse_tokens(args.tokens):
        kept = max(1, round(args.avg_k * tokens))
        count = args.draws or max(8, -(-experts // kept))
        draws = []
        for _ in range(count):
            x = torch.randn(tokens, hidden, generator=generator).to(torch.bfloat16)
            ids = torch.stack([torch.randperm(experts, generator=generator)[:top_k] for _ in range(tokens)])
            weights = torch.rand(tokens, top_k, generator=generator)
            keep = exact_keep(tokens, top_k, kept, generator)
            draws.append((x, ids, weights, keep, torch.where(keep, ids, experts)))
        methods = {
            "native": lambda d, s=draws: native.kept_experts(s[d][0], w13, w2, s[d][4], s[d][2]),
            "vllm": lambda d, s=draws: vllm_call(*s[d][:4]),
            "grouped": lambda d, s=draws: grouped_experts(as_transformers, s[d][0], s[d][4], s[d][2]),
        }
        with torch.inference_mode():
            differences = []
            for x, ids, weights, keep, sentinel in draws:
                mine = native.kept_experts(x, w13, w2, sentinel, weights)[0].float()
                for theirs in (
                    vllm_call(x, ids, weights, keep),
                    grouped_experts(as_transformers, x, sentinel, weights).output,
                ):
                    theirs = theirs.float()
                    differences.append(((mine - theirs).norm() / theirs.norm()).item())
            if max(differences) > 2e-2:
                sys.exit(
                    f"the kernels disagree at {tokens} tokens (relative difference {max(differences):.2e})"
                )
            medians = interleaved_medians(
                methods, torch.device("cpu"), draws=count, rounds=args.rounds, budget_s=args.budget
            )
        row = {
            "tokens": tokens,
            "kept_pairs": kept,
            "draws": count,
            "experts_read": statistics.median(len(torch.unique(d[1][d[3]])) for d in draws),
            "native_ms": round(medians["native"] * 1e3, 4),
            "vllm_ms": round(medians["vllm"] * 1e3, 4),
            "grouped_ms": round(medians["grouped"] * 1e3, 4),
            "vllm_over_native": round(medians["vllm"] / medians["native"], 3),
            "grouped_over_native": round(medians["grouped"] / medians["native"], 3),
            "max_relative_difference": max(differences),
        }
        results.append(row)
        print(
            f"T={tokens:5d} kept={row['kept_pairs']:5d} experts={row['experts_read']:6.1f}  "
            f"native {row['native_ms']:9.3f} ms  vLLM {row['vllm_ms']:9.3f} ms  vLLM / native {row['vllm_over_native']:.2f}  "
            f"grouped {row['grouped_ms']:9.3f} ms  grouped / native {row['grouped_over_native']:.2f}",
            flush=True,
        )
    document = {
        "benchmark": "experts_vs_vllm",
        "command": " ".join(
            shlex.quote(a) for a in [".venv/bin/python", "benchmarks/experts_vs_vllm.py", *sys.argv[1:]]
        ),
        "machine": describe_machine(torch.device("cpu")),
        "preset": preset.name,
        "avg_k": args.avg_k,
        "vllm_isa": isa,
        "results": results,
    }
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    main()
