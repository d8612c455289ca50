"""The paper's budget sweep at our scale: held-out perplexity against Avg-K on the reference MoE.

One BEAM mask-head training run per budget (Avg-K 6, 4, 2, 1.23, 0.5 of 8 by default; the
quickstart's recipe, `beam_moe.refmoe.experiment.Recipe`), then `beam_moe.eval.sweep`: the base
model, every BEAM adapter, Top-K pruning, Top-P and threshold skipping over a grid, and each
baseline calibrated to every adapter's Avg-K, all on the same held-out text.

    flock /work/locks/cpu.lock python benchmarks/refmoe_sweep.py

Adapters go to runs/refmoe_sweep/avgk_<X>/ and a finished one is reused, so the run can be split
into pieces that each hold the CPU lock for a while (`--budgets 6,4 --train-only`, then the rest).
Writes benchmarks/results/refmoe_sweep/: sweep.json (every point, the matched rows, per-budget
verdicts, the recipe, the training metrics, the machine), sweep.md and sweep.png.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "refmoe_sweep"
RUNS = ROOT / "runs" / "refmoe_sweep"
BASELINES = ("top_k", "top_p", "threshold")


def adapter_dir(runs: Path, budget: float, tag: str) -> Path:
    return runs / f"{tag}avgk_{budget:g}"


def train_missing(budgets: list[float], runs: Path, recipe, tag: str) -> dict[str, float]:
    """Train an adapter for every budget without a finished one; returns seconds per trained budget."""
    from beam_moe.refmoe.experiment import train_mask_heads, write_training_text

    seconds = {}
    with tempfile.TemporaryDirectory() as scratch:
        data_file = Path(scratch) / "train.jsonl"
        prepared = False
        for budget in budgets:
            out = adapter_dir(runs, budget, tag)
            if (out / "beam_adapter.safetensors").is_file():
                print(f"avg-k {budget:g}: reusing {out}", flush=True)
                continue
            if not prepared:
                write_training_text(
                    data_file, recipe.steps * recipe.batch_size * recipe.max_length, None, recipe.seed
                )
                prepared = True
            started = time.perf_counter()
            if out.exists():
                shutil.rmtree(out)  # an unfinished run of this script
            train_mask_heads(budget, out, recipe, data_file, progress=True)
            seconds[f"{budget:g}"] = round(time.perf_counter() - started, 1)
            print(f"avg-k {budget:g}: trained in {seconds[f'{budget:g}']} s", flush=True)
    return seconds


def table(result: dict, comparisons: list[dict]) -> str:
    from beam_moe.refmoe.compare import NAMES

    base = comparisons[0]["base_ppl"]
    lines = [
        f"Held-out perplexity at equal Avg-K (base model, Top-8: {base:.3f}). Top-K pruning is interpolated "
        "between whole numbers of experts; a baseline that cannot reach the Avg-K is marked n/a.",
        "",
        "| target Avg-K | BEAM Avg-K | BEAM | "
        + " | ".join(NAMES[n] for n in BASELINES)
        + " | BEAM vs base | BEAM best? |",
        "|---:|---:|---:|" + "---:|" * len(BASELINES) + "---:|---|",
    ]
    for comp, row in zip(comparisons, result["matched"], strict=True):
        cells = []
        for name in BASELINES:
            entry = comp["baselines"][name]
            value = entry["ppl_at_equal_avg_k"]
            cells.append("n/a" if value is None else f"{value:.3f}")
        best = "yes" if comp["better_than_every_baseline"] else "no"
        lines.append(
            f"| {row['target']:g} | {comp['avg_k']:.2f} | **{comp['beam_ppl']:.3f}** | "
            + " | ".join(cells)
            + f" | {comp['ppl_increase']:+.1%} | {best} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from beam_moe.refmoe.experiment import Recipe

    recipe_defaults = Recipe()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budgets", default="6,4,2,1.23,0.5", help="target Avg-K values, comma-separated")
    parser.add_argument("--steps", type=int, default=recipe_defaults.steps)
    parser.add_argument("--lr", type=float, default=recipe_defaults.lr)
    parser.add_argument("--objective", default=recipe_defaults.objective)
    parser.add_argument("--train", default=recipe_defaults.train)
    parser.add_argument("--model-lr", type=float, default=None)
    parser.add_argument("--renormalize", action="store_true", help="mask heads rescale the kept weights")
    parser.add_argument("--bias", action="store_true", help="mask heads with a bias")
    parser.add_argument("--controller-kp", type=float, default=recipe_defaults.controller_kp)
    parser.add_argument("--controller-ki", type=float, default=recipe_defaults.controller_ki)
    parser.add_argument("--batch-size", type=int, default=recipe_defaults.batch_size)
    parser.add_argument("--max-length", type=int, default=recipe_defaults.max_length)
    parser.add_argument("--eval-blocks", type=int, default=96, help="held-out windows of 256 tokens")
    parser.add_argument("--points", type=int, default=8, help="grid points per continuous baseline")
    parser.add_argument("--tag", default="", help="prefix of the adapter folders (recipe variants)")
    parser.add_argument("--runs", type=Path, default=RUNS)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--train-only", action="store_true", help="train missing adapters, evaluate nothing")
    args = parser.parse_args(argv)

    import torch

    from beam_moe.atomic import atomic_directory
    from beam_moe.bench.machine import describe_machine
    from beam_moe.eval import plot_sweep, sweep_markdown
    from beam_moe.eval.sweep import default_grid
    from beam_moe.refmoe.architecture import REFERENCE_SHAPE
    from beam_moe.refmoe.compare import comparison
    from beam_moe.refmoe.experiment import evaluate_adapters, heldout_texts

    torch.set_num_threads(2)
    budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    recipe = Recipe(
        steps=args.steps,
        batch_size=args.batch_size,
        max_length=args.max_length,
        lr=args.lr,
        objective=args.objective,
        train=args.train,
        model_lr=args.model_lr,
        controller_kp=args.controller_kp,
        controller_ki=args.controller_ki,
        renormalize=args.renormalize,
        bias=args.bias,
    )
    trained = train_missing(budgets, args.runs, recipe, args.tag)
    if args.train_only:
        return 0

    started = time.perf_counter()
    adapters = [adapter_dir(args.runs, b, args.tag) for b in budgets]
    grids = {
        name: default_grid(name, REFERENCE_SHAPE["num_experts_per_tok"], args.points) for name in BASELINES
    }
    result, _, _ = evaluate_adapters(
        adapters,
        heldout_texts(),
        grids,
        eval_tokens=args.eval_blocks * 256,
        on_point=lambda message: print(f"sweep: {message}", flush=True),
    )
    for point, budget in zip([p for p in result["points"] if p["method"] == "beam"], budgets, strict=True):
        point["label"] = f"BEAM {budget:g}"
    for row, budget in zip(result["matched"], budgets, strict=True):
        row["target"] = budget
        row["beam"]["label"] = f"BEAM {budget:g}"
    comparisons = [comparison(result, i) for i in range(len(budgets))]
    metrics = {}
    for budget, adapter in zip(budgets, adapters, strict=True):
        config = json.loads((adapter / "beam_config.json").read_text())
        metrics[f"{budget:g}"] = config.get("extra", {})
    document = {
        "what": "held-out perplexity vs Avg-K on the reference MoE: BEAM (one mask-head run per budget) "
        "against Top-K pruning, Top-P and threshold skipping",
        "command": ["python", "benchmarks/refmoe_sweep.py", *(sys.argv[1:] if argv is None else argv)],
        "budgets": budgets,
        "recipe": recipe.to_dict(),
        "heldout_tokens": args.eval_blocks * 256,
        "training": metrics,
        "training_seconds_this_run": trained,
        "comparisons": comparisons,
        "goals": {
            "every_budget_beam_best": all(c["better_than_every_baseline"] for c in comparisons),
            "low_budget": [
                {
                    "avg_k": c["avg_k"],
                    "within_5_percent": c["within_5_percent"],
                    "best": c["better_than_every_baseline"],
                }
                for c in comparisons
                if c["avg_k"] <= 1.5
            ],
        },
        "sweep": result,
        "machine": describe_machine(torch.device("cpu")),
        "evaluation_seconds": round(time.perf_counter() - started, 1),
    }
    with atomic_directory(args.out) as staging:
        (staging / "sweep.json").write_text(json.dumps(document, indent=1) + "\n")
        (staging / "sweep.md").write_text(table(result, comparisons) + "\n" + sweep_markdown(result))
        plot_sweep(result, staging / "sweep.png")
    print(table(result, comparisons))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
