"""What limits BEAM on the reference MoE: training length, and the controller against a fixed beta.

Two questions, each answered with the sweep's recipe and evaluation (benchmarks/refmoe_sweep.py:
the same held-out windows, thresholds set on the same disjoint calibration slice, the baselines'
curves read from its sweep.json):

- **Mask-training tokens.** The router-aware head at target Avg-K 1.5, seed 0, trained for
  `--steps` (125, 250, 500 by default: 0.26 M, 0.51 M, 1.02 M tokens); 250 is the sweep's run.
- **Head.** The paper's linear head from the sweep (same recipe, seed 0), where it was trained.
- **Controller or capacity.** The same head trained with beta fixed at the value the controller
  settled on at target 1.5 (no controller; `--fixed-beta`, read from the sweep's seed-0 adapter by
  default), started at the same threshold, evaluated at its own Avg-K and at 1.5.

    python benchmarks/refmoe_diagnosis.py          # after benchmarks/refmoe_sweep.py
    python benchmarks/refmoe_diagnosis.py --no-fixed-beta   # training length and head only

Adapters go to runs/refmoe_diagnosis/ (finished ones are reused). Writes
benchmarks/results/refmoe_diagnosis/: diagnosis.json and diagnosis.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from refmoe_sweep import (
    CALIBRATION_SLICE,
    NAMES,
    OUT,
    RUNS,
    WINDOW,
    adapter_dir,
    interpolate,
    split_heldout,
)

ROOT = Path(__file__).resolve().parents[1]
DIAG_RUNS = ROOT / "runs" / "refmoe_diagnosis"
DIAG_OUT = ROOT / "benchmarks" / "results" / "refmoe_diagnosis"
TARGET = 1.5


def train_runs(steps: list[int], fixed_beta: float | None, runs: Path) -> dict[str, Path]:
    from beam_moe.experiments.refmoe.experiment import Recipe, train_mask_heads, write_training_text
    from beam_moe.refmoe import reference_model_path
    from beam_moe.train import TrainConfig, train

    out: dict[str, Path] = {}
    with tempfile.TemporaryDirectory() as scratch:
        text = Path(scratch) / "train.jsonl"
        recipe = Recipe()
        write_training_text(text, max(steps) * recipe.batch_size * recipe.max_length, None, 0, recipe.mix)
        for n in steps:
            path = runs / f"steps{n}"
            if not (path / "beam_adapter.safetensors").is_file():
                started = time.perf_counter()
                train_mask_heads(TARGET, path, Recipe(steps=n), text, progress=True)
                print(f"{path.name}: trained in {time.perf_counter() - started:.0f} s", flush=True)
            out[f"steps {n}"] = path
        if fixed_beta is None:
            return out
        path = runs / f"fixed_beta{fixed_beta:.4g}"
        if not (path / "beam_adapter.safetensors").is_file():
            train(
                TrainConfig(
                    model=str(reference_model_path()),
                    data=[str(text)],
                    output=str(path),
                    beta=fixed_beta,
                    start_avg_k=TARGET,
                    objective=recipe.objective,
                    lr=recipe.lr,
                    settle=recipe.settle,
                    beam={"head": recipe.head},
                    max_steps=recipe.steps,
                    batch_size=recipe.batch_size,
                    max_length=recipe.max_length,
                    val_fraction=0.0,
                    save_every=0,
                    overwrite=True,
                    tensorboard=False,
                )
            )
        out[f"fixed beta {fixed_beta:.4g}"] = path
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", default="125,250,500")
    parser.add_argument("--fixed-beta", type=float, help="default: the sweep's seed-0 controller at 1.5")
    parser.add_argument("--no-fixed-beta", action="store_true", help="only the training-length runs")
    parser.add_argument("--sweep", type=Path, default=OUT / "sweep.json")
    parser.add_argument("--runs", type=Path, default=DIAG_RUNS)
    parser.add_argument("--output", "-o", type=Path, default=DIAG_OUT)
    parser.add_argument("--stage", choices=("all", "train"), default="all")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    steps = [int(s) for s in args.steps.split(",") if s.strip()]
    if args.no_fixed_beta:
        args.fixed_beta = None
    elif args.fixed_beta is None:
        config = json.loads((adapter_dir(RUNS, "router", TARGET, 0) / "beam_config.json").read_text())
        args.fixed_beta = float(config["extra"]["final"]["beta"])
    args.runs.mkdir(parents=True, exist_ok=True)
    adapters = {"steps 250": adapter_dir(RUNS, "router", TARGET, 0)} if 250 in steps else {}
    adapters |= train_runs([n for n in steps if n != 250], args.fixed_beta, args.runs)
    paper_head = adapter_dir(RUNS, "linear", TARGET, 0)
    if (paper_head / "beam_adapter.safetensors").is_file():
        adapters["paper's linear head, 250 steps"] = paper_head
    if args.stage == "train":
        return 0
    document = evaluate(args, adapters)
    from beam_moe.atomic import atomic_directory

    with atomic_directory(args.output) as staging:
        (staging / "diagnosis.json").write_text(json.dumps(document, indent=1) + "\n")
        (staging / "diagnosis.md").write_text(markdown(document))
    print(markdown(document))
    return 0


def evaluate(args: argparse.Namespace, adapters: dict[str, Path]) -> dict[str, Any]:
    import torch

    from beam_moe.adapter import load_beam, read_adapter_config
    from beam_moe.attach import attach, get_attachment
    from beam_moe.bench.machine import describe_machine
    from beam_moe.config import BeamConfig
    from beam_moe.eval.perplexity import equal_length_batches, perplexity, token_windows
    from beam_moe.experiments.refmoe.experiment import heldout_texts
    from beam_moe.refmoe import load_reference_model, load_reference_tokenizer
    from beam_moe.train.budget import calibrate_threshold, measure_avg_k

    sweep = json.loads(args.sweep.read_text())
    eval_tokens = sweep["heldout_tokens"]
    tokenizer = load_reference_tokenizer()
    texts, calibration_texts = split_heldout(heldout_texts(), tokenizer, eval_tokens, CALIBRATION_SLICE)
    windows = token_windows(tokenizer, calibration_texts, WINDOW, CALIBRATION_SLICE)
    batches = [
        {"input_ids": (ids := torch.tensor(group)), "attention_mask": torch.ones_like(ids)}
        for group in equal_length_batches(windows, 8)
    ]
    model = attach(load_reference_model(), BeamConfig())
    curves = {
        name: [(p["avg_k"], p["ppl"]) for p in points] for name, points in sweep["baseline_curves"].items()
    }
    rows = []
    for label, path in adapters.items():
        extra = read_adapter_config(path).get("extra", {})
        for setting in ("as trained", f"at {TARGET:g}"):
            load_beam(model, path)
            if setting != "as trained":
                calibrate_threshold(model, batches, TARGET, tolerance=0.01)
            threshold = get_attachment(model).config.threshold
            result = perplexity(
                model, tokenizer, texts, max_length=WINDOW, batch_size=8, max_tokens=eval_tokens
            )
            rows.append(
                {
                    "run": label,
                    "setting": setting,
                    "threshold": threshold,
                    "calibration_avg_k": measure_avg_k(model, batches),
                    "avg_k": result.avg_k,
                    "ppl": result.ppl,
                    "per_layer": result.per_layer,
                    "zero_kept": result.zero_kept,
                    "tokens_trained": extra.get("tokens"),
                    "final": extra.get("final", {}),
                    "baselines": {name: interpolate(curve, result.avg_k) for name, curve in curves.items()},
                }
            )
            print(f"{label} {setting}: Avg-K {result.avg_k:.3f}, ppl {result.ppl:.3f}", flush=True)
    return {
        "what": "BEAM (router-aware head) at target Avg-K 1.5 on the reference MoE: training length, and a "
        "fixed beta against the controller",
        "command": ["python", "benchmarks/refmoe_diagnosis.py", *sys.argv[1:]],
        "fixed_beta": args.fixed_beta,
        "heldout_tokens": eval_tokens,
        "base_ppl": sweep["base"]["ppl"],
        "rows": rows,
        "machine": describe_machine(torch.device("cpu")),
    }


def markdown(document: dict[str, Any]) -> str:
    names = list(document["rows"][0]["baselines"])
    lines = [
        f"Held-out perplexity ({document['heldout_tokens']:,} tokens; base {document['base_ppl']:.3f}); "
        "baselines interpolated at each row's Avg-K from the sweep's curves.",
        "",
        "| run | tokens trained | threshold | Avg-K | per layer | no expert | BEAM | "
        + " | ".join(NAMES[n] for n in names)
        + " |",
        "|---|---:|---|---:|---|---|---:|" + "---:|" * len(names),
    ]
    for r in document["rows"]:
        cells = ["n/a" if r["baselines"][n] is None else f"{r['baselines'][n]:.3f}" for n in names]
        lines.append(
            f"| {r['run']} | {r['tokens_trained'] or 0:,} | {r['setting']} ({r['threshold']:.3f}) | {r['avg_k']:.3f} | "
            + " / ".join(f"{v:.2f}" for v in r["per_layer"].values())
            + " | "
            + " / ".join(f"{v:.0%}" for v in r["zero_kept"].values())
            + f" | {r['ppl']:.3f} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
