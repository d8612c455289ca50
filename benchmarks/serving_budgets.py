"""One vLLM engine serving mixed per-request budgets: Avg-K reached vs asked, and speed vs one budget.

The checkpoint is the one `serving_vllm.py` builds (Qwen3-30B-A3B layer sizes, random weights,
`--layers` decoder layers, mask heads calibrated to `--avg-k` at the default threshold). Its
threshold -> Avg-K curve is measured here with transformers on random prompts like the served ones
(the calibration text) and stored in the checkpoint, as `beam-moe calibrate` does. One engine
then serves, with `--batch` concurrent requests of `--input-len` in / `--output-len` out:

- `uniform-<a>`: every request asks `beam_avg_k = a`, for each budget of `--budgets`;
- `mixed`: the requests alternate between the budgets (half each with two budgets).

For each run: output tokens per second, the decode step (TPOT of the batch: (time for
output-len tokens - time for 1 token) / (output-len - 1)), and the Avg-K each budget reached
(the plugin's per-budget counters, summed over the repeats). Runs are interleaved `--repeats`
times; times are medians. Run it alone:

    .venv/bin/python benchmarks/serving_budgets.py
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import serving_vllm  # first: it sets vLLM's environment before torch and vLLM load
import torch

ROOT = Path(__file__).resolve().parent


def measure_curve(merged: Path, prompts: list[list[int]], logit_range: float) -> dict:
    """The threshold -> Avg-K curve of `merged` on `prompts`, stored in the checkpoint; returns it.

    beam-moe's own measurement (`curve_on_batches`, what `beam-moe calibrate` runs) on beam-moe's
    grid (logit(threshold) in steps of 0.5) cut to |logit| <= `logit_range`: each point costs full
    forward passes at real layer sizes, and this checkpoint keeps all 8 experts below logit -4 and
    none above 4.
    """
    from beam_moe import from_pretrained
    from beam_moe.eval.curve import curve_on_batches
    from beam_moe.merged import write_merged_threshold_curve
    from beam_moe.threshold_curve import DEFAULT_LOGITS

    model = from_pretrained(merged, dtype="bfloat16")
    thresholds = [1.0 / (1.0 + math.exp(-x)) for x in DEFAULT_LOGITS if abs(x) <= logit_range]
    tokens = torch.tensor(prompts)
    batches = [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in tokens.split(8)]
    measured_on = {"text": f"{len(prompts)} random byte prompts", "tokens": tokens.numel()}
    with torch.no_grad():
        curve = curve_on_batches(model, batches, thresholds, measured_on=measured_on, progress=True)
    write_merged_threshold_curve(merged, curve)
    del model
    gc.collect()
    return curve.to_dict()


def serve(merged: Path, args: argparse.Namespace, budgets: list[float]) -> dict:
    from vllm import LLM, SamplingParams

    from beam_moe.serving.vllm import WORKER_EXTENSION, engine_stats, reset_engine_stats

    llm = LLM(
        model=str(merged),
        dtype="bfloat16",
        max_model_len=256,
        max_num_seqs=args.batch,
        enforce_eager=True,
        enable_prefix_caching=False,
        distributed_executor_backend="uni",
        worker_extension_cls=WORKER_EXTENSION,
        seed=0,
    )
    generator = torch.Generator().manual_seed(4321)

    def run(asked: list[float], max_tokens: int) -> float:
        prompts = [
            {"prompt_token_ids": torch.randint(5, 261, (args.input_len,), generator=generator).tolist()}
            for _ in asked
        ]
        params = [
            SamplingParams(
                max_tokens=max_tokens, temperature=0, ignore_eos=True, extra_args={"beam_avg_k": a}
            )
            for a in asked
        ]
        begin = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - begin
        assert all(len(o.outputs[0].token_ids) == max_tokens for o in outputs)
        return elapsed

    layouts = {f"uniform-{a:g}": [a] * args.batch for a in budgets}
    layouts["mixed"] = [budgets[i % len(budgets)] for i in range(args.batch)]
    times: dict[str, dict[str, list[float]]] = {name: {"first": [], "whole": []} for name in layouts}
    counted: dict[str, dict[str, list[float]]] = {name: {} for name in layouts}  # label -> [tokens, kept]
    try:
        run(layouts["mixed"], args.output_len)  # warm-up
        for _ in range(args.repeats):
            for name, asked in layouts.items():
                reset_engine_stats(llm)
                times[name]["whole"].append(run(asked, args.output_len))
                for label, budget in engine_stats(llm)["budgets"].items():
                    total = counted[name].setdefault(label, [0, 0.0])
                    total[0] += budget["tokens"]
                    total[1] += budget["tokens"] * budget["avg_k"]
                times[name]["first"].append(run(asked, 1))
    finally:
        llm.llm_engine.engine_core.shutdown()
    reached = {
        name: {label: {"avg_k": kept / tokens, "tokens": tokens} for label, (tokens, kept) in labels.items()}
        for name, labels in counted.items()
    }
    results = {}
    for name, asked in layouts.items():
        whole, first = statistics.median(times[name]["whole"]), statistics.median(times[name]["first"])
        results[name] = {
            "asked": sorted(set(asked)),
            "throughput_tok_s": len(asked) * args.output_len / whole,
            "decode_step_ms": 1e3 * (whole - first) / (args.output_len - 1),
            "prefill_s": first,
            "avg_k_reached": {label: value["avg_k"] for label, value in reached[name].items()},
            "tokens_counted": {label: value["tokens"] for label, value in reached[name].items()},
            "whole_s": times[name]["whole"],
            "first_s": times[name]["first"],
        }
        print(
            json.dumps({k: v for k, v in results[name].items() if k not in ("whole_s", "first_s")}),
            flush=True,
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (each 1.2 GB of bf16 experts)")
    parser.add_argument(
        "--avg-k", type=float, default=2.0, help="the checkpoint's Avg-K at its own threshold"
    )
    parser.add_argument("--budgets", default="1.5,4", help="beam_avg_k values asked, comma-separated")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--calibration-sequences",
        type=int,
        default=16,
        help="random sequences (input-len + output-len tokens) the curve is measured on; Avg-K varies "
        "from one random sequence to another, so a few are not enough",
    )
    parser.add_argument(
        "--curve-logit-range", type=float, default=4.0, help="the curve's grid: |logit(threshold)| <= this"
    )
    parser.add_argument(
        "--keep-curve",
        action="store_true",
        help="reuse the curve an earlier run stored in the checkpoint (measuring it takes ~15 minutes)",
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/beam-moe-bench-serving"))
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "serving_budgets.json")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    budgets = [float(x) for x in args.budgets.split(",")]
    folders, _ = serving_vllm.build_checkpoints(args.work, args.layers, [args.avg_k], [1], args.seed)
    merged = folders[f"beam-k{args.avg_k}"]
    generator = torch.Generator().manual_seed(99)
    length = args.input_len + args.output_len
    calibration = torch.randint(5, 261, (args.calibration_sequences, length), generator=generator).tolist()
    stored = json.loads((merged / "config.json").read_text())["beam_export"].get("threshold_curve")
    if args.keep_curve and stored is not None:
        curve = stored
        print("the checkpoint's threshold curve is kept (--keep-curve)", flush=True)
    else:
        curve = measure_curve(merged, calibration, args.curve_logit_range)
    results = serve(merged, args, budgets)
    uniform = [results[f"uniform-{a:g}"] for a in budgets]
    mixed = results["mixed"]
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    document = {
        "benchmark": "vLLM, one engine serving mixed per-request budgets (benchmarks/serving_budgets.py)",
        "command": " ".join(
            [".venv/bin/python benchmarks/serving_budgets.py", *serving_vllm.cli_options(args)]
        ),
        "commit": commit,
        "machine": serving_vllm.machine(),
        "model": {"preset": serving_vllm.PRESET, "layers": args.layers, "dtype": "bfloat16"},
        "settings": {k: v for k, v in vars(args).items() if k not in ("work", "output")},
        "threshold_curve": curve,
        "summary": {
            "avg_k_reached_mixed": mixed["avg_k_reached"],
            "avg_k_reached_uniform": {k: v for u in uniform for k, v in u["avg_k_reached"].items()},
            "mixed_throughput_over_mean_uniform": mixed["throughput_tok_s"]
            / statistics.mean(u["throughput_tok_s"] for u in uniform),
            "mixed_decode_step_over_mean_uniform": mixed["decode_step_ms"]
            / statistics.mean(u["decode_step_ms"] for u in uniform),
        },
        "results": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps(document["summary"], indent=2))


if __name__ == "__main__":
    sys.exit(main())
