"""The paper's budget sweep at our scale, with power: held-out perplexity against Avg-K on the reference MoE.

For every budget (target Avg-K 6, 4, 2, 1.5, 1, 0.5 of 8) and seed, one BEAM training run with the
quickstart's recipe (`beam_moe.experiments.refmoe.experiment.Recipe`: the router-aware head by default); the
paper's linear head gets its own runs (`--paper-seeds`). Then, on the same held-out text
(>= 100 K tokens, never trained on):

- the base model, every adapter, and each training-free baseline (Top-K pruning, Top-P, threshold
  skipping, a random mask) at parameters calibrated to bracket the adapters' Avg-K;
- BEAM against each baseline at equal Avg-K (the baseline's log-perplexity interpolated linearly
  between its measured points around each adapter's Avg-K, which lie within a few percent) and
  at equal MoE FLOPs (BEAM pays its mask head: the baseline may keep that many more experts);
- mean +- standard error over seeds, per budget, and the verdicts;
- "train once, serve at any budget": the adapters trained at `--serve-from`, each put at every
  budget by its serve-time threshold.

Every adapter's serve-time threshold is set on a slice of held-out text disjoint from the
evaluation windows (as a deployment sets it on its own traffic): the training-time calibration
ran on training text, which the reference model was pretrained on and routes more confidently
than unseen text (sweep.json records each adapter's Avg-K on the slice at its trained threshold).

    python benchmarks/refmoe_sweep.py                       # train what is missing, then evaluate
    python benchmarks/refmoe_sweep.py --stage train --budgets 6,4 --seeds 0   # a piece of the training

Adapters go to runs/refmoe_sweep/<head>_avgk<B>_seed<S>/ and a finished one is reused; every
evaluation is cached in runs/refmoe_sweep/evaluations.jsonl, so the run can be split into pieces.
Writes benchmarks/results/refmoe_sweep/: sweep.json (every number, the recipe, the machine, the
command), sweep.md and sweep.png.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "refmoe_sweep"
RUNS = ROOT / "runs" / "refmoe_sweep"
BASELINES = ("top_k", "top_p", "threshold", "random")
NAMES = {
    "top_k": "Top-K pruning",
    "top_p": "Top-P",
    "threshold": "threshold",
    "random": "random mask",
}
WINDOW = 256
BRACKET = 0.05  # baselines are measured at Avg-K within +-5% around each budget (then interpolated)
CALIBRATION_TOKENS = 4096  # held-out tokens a baseline's parameter is calibrated on (then measured on all)
CALIBRATION_SLICE = 8192  # held-out tokens, disjoint from the evaluation, on which BEAM's threshold is set
WITHIN_BASE = 0.005  # where every method is within 0.5% of the base model, that is enough


def adapter_dir(runs: Path, head: str, budget: float, seed: int) -> Path:
    return runs / f"{head}_avgk{budget:g}_seed{seed}"


# Training -----------------------------------------------------------------------------------------


def train_missing(
    runs: Path, jobs: list[tuple[str, float, int]], recipe_args: dict[str, Any]
) -> dict[str, float]:
    """Train every (head, budget, seed) without a finished adapter; returns seconds per trained run."""
    import shutil

    from beam_moe.experiments.refmoe.experiment import Recipe, train_mask_heads, write_training_text

    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as scratch:
        texts: dict[int, Path] = {}
        for head, budget, seed in jobs:
            out = adapter_dir(runs, head, budget, seed)
            if (out / "beam_adapter.safetensors").is_file():
                continue
            recipe = Recipe(**recipe_args, head=head, seed=seed)
            if seed not in texts:
                texts[seed] = Path(scratch) / f"train_{seed}.jsonl"
                tokens = recipe.steps * recipe.batch_size * recipe.max_length
                write_training_text(texts[seed], tokens, None, seed, recipe.mix)
            if out.exists():
                shutil.rmtree(out)  # an unfinished run of this script
            started = time.perf_counter()
            train_mask_heads(budget, out, recipe, texts[seed], progress=True)
            seconds[out.name] = round(time.perf_counter() - started, 1)
            print(f"{out.name}: trained in {seconds[out.name]} s", flush=True)
    return seconds


# Evaluation ---------------------------------------------------------------------------------------


class Evaluations:
    """Held-out evaluations, cached on disk by key so that a rerun only computes what is missing."""

    def __init__(self, path: Path, eval_tokens: int) -> None:
        self.path = path
        self.eval_tokens = eval_tokens
        self.cache: dict[str, dict[str, Any]] = {}
        self._read()

    def _read(self) -> None:
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                entry = json.loads(line)
                if entry["eval_tokens"] == self.eval_tokens:
                    self.cache[entry["key"]] = entry["result"]

    def get(self, key: str, compute) -> dict[str, Any]:
        if key not in self.cache:
            self._read()  # another piece of the sweep, running beside this one, may have written it
        if key not in self.cache:
            started = time.perf_counter()
            result = compute()
            result["seconds"] = round(time.perf_counter() - started, 1)
            self.cache[key] = result
            with open(self.path, "a") as f:
                f.write(json.dumps({"key": key, "eval_tokens": self.eval_tokens, "result": result}) + "\n")
            print(
                f"eval {key}: Avg-K {result['avg_k']:.3f}, ppl {result['ppl']:.4f} ({result['seconds']} s)",
                flush=True,
            )
        return self.cache[key]


def interpolate(curve: list[tuple[float, float]], avg_k: float) -> float | None:
    """Perplexity at `avg_k` from (Avg-K, ppl) points, linear in log-perplexity between the two
    neighbours; None outside the measured range, except just below the lowest point (within the
    bracket), where the lowest point is used: a baseline that cannot go lower (Top-P and threshold
    skipping keep at least one expert) is then compared with more experts than BEAM keeps, which
    can only favour the baseline."""
    curve = sorted(curve)
    if curve and curve[0][0] * (1 - BRACKET) <= avg_k < curve[0][0]:
        return curve[0][1]
    if not curve or not curve[0][0] <= avg_k <= curve[-1][0]:
        return None
    for (k0, p0), (k1, p1) in itertools.pairwise(curve):
        if k0 <= avg_k <= k1:
            t = (avg_k - k0) / (k1 - k0) if k1 > k0 else 0.0
            return math.exp(math.log(p0) + t * (math.log(p1) - math.log(p0)))
    return curve[-1][1]


def split_heldout(
    pieces: list[str], tokenizer, eval_tokens: int, calibration_tokens: int
) -> tuple[list[str], list[str]]:
    """The held-out pieces the evaluation reads (its first `eval_tokens` tokens) and, after them, a
    disjoint slice of about `calibration_tokens` tokens on which serve-time thresholds are set."""
    count, cut = 0, len(pieces)
    for i, piece in enumerate(pieces):
        count += len(tokenizer(piece, add_special_tokens=False)["input_ids"]) + 1
        if count >= eval_tokens:
            cut = i + 1
            break
    calibration, count = [], 0
    for piece in pieces[cut:]:
        calibration.append(piece)
        count += len(tokenizer(piece, add_special_tokens=False)["input_ids"]) + 1
        if count >= calibration_tokens:
            break
    return pieces[:cut], calibration


def mean_se(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return mean, se


def main(argv: list[str] | None = None) -> int:
    from beam_moe.experiments.refmoe.experiment import Recipe

    defaults = Recipe()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budgets", default="6,4,2,1.5,1,0.5", help="target Avg-K values, comma-separated")
    parser.add_argument("--seeds", default="0,1,2", help="training seeds of the default head")
    parser.add_argument("--head", default=defaults.head, help="the head evaluated with every seed")
    parser.add_argument("--paper-seeds", default="0", help="seeds of the paper's linear head ('' for none)")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--objective", default=defaults.objective)
    parser.add_argument("--mix", default=defaults.mix, choices=("heldout", "corpus"))
    parser.add_argument("--eval-tokens", type=int, default=400 * WINDOW, help="held-out tokens per point")
    parser.add_argument(
        "--serve-from", type=float, default=2.0, help="budget whose adapters serve every budget"
    )
    parser.add_argument("--runs", type=Path, default=RUNS)
    parser.add_argument("--output", "-o", type=Path, default=OUT)
    parser.add_argument("--stage", choices=("all", "train", "eval"), default="all")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    paper_seeds = [int(s) for s in args.paper_seeds.split(",") if s.strip()]
    heads = {args.head: seeds}
    if args.head != "linear" and paper_seeds:
        heads["linear"] = paper_seeds
    jobs = [(head, b, s) for head, head_seeds in heads.items() for b in budgets for s in head_seeds]
    recipe_args = {"steps": args.steps, "lr": args.lr, "objective": args.objective, "mix": args.mix}
    args.runs.mkdir(parents=True, exist_ok=True)
    trained = train_missing(args.runs, jobs, recipe_args) if args.stage != "eval" else {}
    if args.stage == "train":
        return 0
    started = time.perf_counter()
    document = evaluate(args, budgets, heads, recipe_args)
    document["training_seconds_this_run"] = trained
    document["evaluation_seconds_this_run"] = round(time.perf_counter() - started, 1)
    write_results(args.output, document)
    print(markdown(document))
    print(f"wrote {args.output}")
    return 0


def evaluate(
    args: argparse.Namespace, budgets: list[float], heads: dict[str, list[int]], recipe_args: dict[str, Any]
) -> dict[str, Any]:
    import torch

    from beam_moe.adapter import load_beam, read_adapter_config
    from beam_moe.attach import attach, get_attachment
    from beam_moe.bench.machine import describe_machine
    from beam_moe.config import BeamConfig
    from beam_moe.eval.baselines import using_baseline
    from beam_moe.eval.calibrate import calibrate
    from beam_moe.eval.flops import model_shapes
    from beam_moe.eval.perplexity import equal_length_batches, perplexity, token_windows
    from beam_moe.experiments.refmoe.experiment import Recipe, heldout_texts
    from beam_moe.refmoe import load_reference_model, load_reference_tokenizer
    from beam_moe.train.budget import calibrate_threshold, measure_avg_k

    tokenizer = load_reference_tokenizer()
    texts, calibration_texts = split_heldout(heldout_texts(), tokenizer, args.eval_tokens, CALIBRATION_SLICE)
    model = attach(load_reference_model(), BeamConfig())
    top_k = max(layer.top_k for layer in get_attachment(model).layers)
    shape = model_shapes(model)[0]
    head_in_experts = shape.mask_head_macs / shape.expert_macs  # BEAM's head, in routed experts per token
    evals = Evaluations(args.runs / "evaluations.jsonl", args.eval_tokens)
    kwargs = {"max_length": WINDOW, "batch_size": 8, "max_tokens": args.eval_tokens}
    windows = token_windows(tokenizer, calibration_texts, WINDOW, CALIBRATION_SLICE)
    batches = [
        {"input_ids": (ids := torch.tensor(group)), "attention_mask": torch.ones_like(ids)}
        for group in equal_length_batches(windows, 8)
    ]

    def run(compute_model) -> dict[str, Any]:
        result = perplexity(compute_model, tokenizer, texts, **kwargs)
        return {
            "avg_k": result.avg_k,
            "ppl": result.ppl,
            "nll": result.nll,
            "scored_tokens": result.scored_tokens,
            "per_layer": result.per_layer,
            "zero_kept": result.zero_kept,
        }

    def baseline(name: str, value: float) -> dict[str, Any]:
        def compute():
            with using_baseline(model, name, value):
                return run(model)

        return {**evals.get(f"baseline:{name}:{value:.6g}", compute), "param": value}

    def beam(path: Path, budget: float) -> dict[str, Any]:
        """The adapter with its serve-time threshold set on the calibration slice for `budget`."""
        load_beam(model, path)
        as_trained = get_attachment(model).config.threshold
        avg_k_as_trained = measure_avg_k(model, batches)
        threshold = calibrate_threshold(model, batches, budget, tolerance=0.01)

        def compute():
            load_beam(model, path)
            get_attachment(model).config.threshold = threshold
            return run(model)

        result = evals.get(f"adapter:{path.name}:threshold={threshold:.6g}", compute)
        return {
            **result,
            "threshold": threshold,
            "threshold_as_trained": as_trained,
            "calibration_avg_k_as_trained": avg_k_as_trained,
        }

    def base() -> dict[str, Any]:
        def compute():
            with using_baseline(model, "top_k", top_k):
                return run(model)

        return evals.get("base", compute)

    base_point = base()
    rows: list[dict[str, Any]] = []
    for head, head_seeds in heads.items():
        for budget in budgets:
            runs = []
            for seed in head_seeds:
                path = adapter_dir(args.runs, head, budget, seed)
                if not (path / "beam_adapter.safetensors").is_file():
                    continue  # not trained at this budget and seed (the table lists the seeds)
                extra = read_adapter_config(path).get("extra", {})
                runs.append(
                    {
                        "seed": seed,
                        "adapter": path.name,
                        **beam(path, budget),
                        "training": extra.get("final", {}),
                    }
                )
            if runs:
                rows.append({"head": head, "target": budget, "runs": runs})

    # "Train once, serve at any budget": the serve-from adapters at every budget
    one_adapter: list[dict[str, Any]] = []
    for budget in budgets:
        runs = []
        for seed in heads[args.head]:
            path = adapter_dir(args.runs, args.head, args.serve_from, seed)
            runs.append({"seed": seed, "adapter": path.name, **beam(path, budget)})
        one_adapter.append({"head": args.head, "trained_at": args.serve_from, "target": budget, "runs": runs})

    # Baselines: measured around every budget (and the Avg-K that equal FLOPs allow), at parameters
    # calibrated on a few thousand tokens, then around any adapter's Avg-K that is not yet bracketed
    curves: dict[str, list[dict[str, Any]]] = {name: [] for name in BASELINES}
    measured: dict[str, set[float]] = {name: set() for name in BASELINES}

    def measure_around(name: str, centres: list[float]) -> None:
        targets = sorted(
            {round(c * f, 4) for c in centres for f in (1 - BRACKET, 1 + BRACKET) if 0 < c * f <= top_k}
        )
        if name == "top_k":
            values = {float(k) for t in targets for k in (math.floor(t), math.ceil(t))}
        elif name == "random":
            values = {round(t / top_k, 6) for t in targets}
        else:
            values = set()
            for target in targets:
                found = calibrate(
                    model,
                    tokenizer,
                    name,
                    target,
                    texts,
                    max_tokens=CALIBRATION_TOKENS,
                    max_length=WINDOW,
                    batch_size=8,
                    tolerance=0.005 * target,
                )
                if found.reached:
                    values.add(round(found.param, 6))
        for value in sorted(values - measured[name]):
            curves[name].append(baseline(name, value))
            measured[name].add(value)

    every_run = [r for row in rows + one_adapter for r in row["runs"]]
    for name in BASELINES:
        measure_around(name, [k for b in budgets for k in (b, b + head_in_experts)])
        curve = [(p["avg_k"], p["ppl"]) for p in curves[name]]
        missing = [
            k
            for r in every_run
            for k in (r["avg_k"], r["avg_k"] + head_in_experts)
            if k <= top_k and interpolate(curve, k) is None
        ]
        if missing:
            measure_around(name, missing)
    for name in BASELINES:
        curves[name].sort(key=lambda p: p["avg_k"])

    def compare(row: dict[str, Any]) -> dict[str, Any]:
        ppls = [r["ppl"] for r in row["runs"]]
        avg_ks = [r["avg_k"] for r in row["runs"]]
        beam_mean, beam_se = mean_se(ppls)
        out: dict[str, Any] = {
            "head": row["head"],
            "target": row["target"],
            "seeds": [r["seed"] for r in row["runs"]],
            "avg_k": mean_se(avg_ks),
            "avg_k_within_5_percent": all(abs(k / row["target"] - 1) <= 0.05 for k in avg_ks),
            "beam_ppl": (beam_mean, beam_se),
            "vs_base": beam_mean / base_point["ppl"] - 1,
            "baselines": {},
        }
        every_close = abs(beam_mean / base_point["ppl"] - 1) <= WITHIN_BASE
        for name, points in curves.items():
            curve = [(p["avg_k"], p["ppl"]) for p in points]
            for basis, shift in (("equal_avg_k", 0.0), ("equal_flops", head_in_experts)):
                at = [interpolate(curve, k + shift) for k in avg_ks]
                if any(v is None for v in at):
                    out["baselines"].setdefault(name, {})[basis] = None
                    continue
                diffs = [b - p for b, p in zip(ppls, at, strict=True)]
                diff_mean, diff_se = mean_se(diffs)
                baseline_mean = statistics.fmean(at)
                close = abs(baseline_mean / base_point["ppl"] - 1) <= WITHIN_BASE
                if basis == "equal_avg_k":
                    every_close = every_close and close
                beats = beam_mean < baseline_mean - 2 * beam_se and diff_mean + 2 * diff_se < 0
                out["baselines"].setdefault(name, {})[basis] = {
                    "ppl": baseline_mean,
                    "beam_minus_baseline": (diff_mean, diff_se),
                    "beam_better_by_2se": beats,
                    "within_half_percent_of_base": close,
                }
        compared = [v["equal_avg_k"] for v in out["baselines"].values() if v.get("equal_avg_k")]
        out["every_method_within_half_percent_of_base"] = every_close
        out["beam_best_at_equal_avg_k"] = bool(compared) and (
            all(v["beam_better_by_2se"] for v in compared) or every_close
        )
        out["unreachable_baselines"] = [n for n, v in out["baselines"].items() if not v.get("equal_avg_k")]
        return out

    comparisons = [compare(row) for row in rows]
    one_adapter_comparisons = [compare(row) for row in one_adapter]
    return {
        "what": "held-out perplexity vs Avg-K on the reference MoE: BEAM (router-aware and paper heads, "
        "several seeds per budget) against Top-K pruning, Top-P, threshold skipping and a random mask",
        "command": ["python", "benchmarks/refmoe_sweep.py", *sys.argv[1:]],
        "budgets": budgets,
        "heads": heads,
        "recipe": {**Recipe(**recipe_args).to_dict(), "head": "per row", "seed": "per run"},
        "heldout_tokens": args.eval_tokens,
        "window": WINDOW,
        "base": base_point,
        "mask_head_in_experts": head_in_experts,
        "rows": rows,
        "comparisons": comparisons,
        "one_adapter": {"rows": one_adapter, "comparisons": one_adapter_comparisons},
        "baseline_curves": curves,
        "goals": {
            "beam_best_at_every_budget": all(
                c["beam_best_at_equal_avg_k"] for c in comparisons if c["head"] == args.head
            ),
            "avg_k_within_5_percent_for_targets_from_1": all(
                c["avg_k_within_5_percent"]
                for c in comparisons
                if c["head"] == args.head and c["target"] >= 1
            ),
        },
        "machine": describe_machine(torch.device("cpu")),
    }


def _pm(pair, digits: int = 3) -> str:
    mean, se = pair
    return f"{mean:.{digits}f}" if math.isnan(se) else f"{mean:.{digits}f} ± {se:.{digits}f}"


def markdown(document: dict[str, Any]) -> str:
    base = document["base"]["ppl"]
    lines = [
        f"Held-out perplexity at equal Avg-K ({document['heldout_tokens']:,} tokens per point, windows of "
        f"{document['window']}; base model, Top-8: {base:.3f}). BEAM: mean ± standard error over seeds; "
        "each baseline interpolated (log-perplexity, linear) at each seed's Avg-K between measured points "
        "within ±5% of each budget (or of the seed's Avg-K). **bold**: BEAM better by more than two standard errors (of BEAM's mean and of the "
        "paired difference).",
        "",
    ]
    for title, comparisons in (
        ("One adapter per budget", document["comparisons"]),
        (
            f"One adapter for every budget (trained at Avg-K {document['one_adapter']['rows'][0]['trained_at']:g}, "
            "threshold set on the calibration slice)",
            document["one_adapter"]["comparisons"],
        ),
    ):
        lines += [
            f"### {title}",
            "",
            "| head | target | seeds | Avg-K | BEAM | "
            + " | ".join(NAMES[n] for n in BASELINES)
            + " | BEAM vs base | BEAM best? |",
            "|---|---:|---:|---:|---:|" + "---:|" * len(BASELINES) + "---:|---|",
        ]
        for c in comparisons:
            cells = []
            for name in BASELINES:
                entry = c["baselines"][name]["equal_avg_k"]
                if entry is None:
                    cells.append("n/a")
                else:
                    text = f"{entry['ppl']:.3f}"
                    cells.append(f"**{text}**" if entry["beam_better_by_2se"] else text)
            lines.append(
                f"| {c['head']} | {c['target']:g} | {len(c['seeds'])} | {_pm(c['avg_k'], 2)} | {_pm(c['beam_ppl'])} | "
                + " | ".join(cells)
                + f" | {c['vs_base']:+.1%} | {'yes' if c['beam_best_at_equal_avg_k'] else 'no'} |"
            )
        lines.append("")
    lines += [
        "### At equal MoE FLOPs (BEAM pays its mask head: the baseline keeps "
        f"{document['mask_head_in_experts']:.3f} more experts per token)",
        "",
        "| head | target | BEAM | " + " | ".join(NAMES[n] for n in BASELINES) + " |",
        "|---|---:|---:|" + "---:|" * len(BASELINES),
    ]
    for c in document["comparisons"]:
        cells = []
        for name in BASELINES:
            entry = c["baselines"][name]["equal_flops"]
            cells.append(
                "n/a"
                if entry is None
                else (f"**{entry['ppl']:.3f}**" if entry["beam_better_by_2se"] else f"{entry['ppl']:.3f}")
            )
        lines.append(f"| {c['head']} | {c['target']:g} | {_pm(c['beam_ppl'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _margin_to_best(c: dict[str, Any], basis: str) -> tuple[float, float] | None:
    """BEAM's perplexity against the best baseline's at the same Avg-K (or FLOPs), in percent, and
    two standard errors of the paired difference."""
    entries = [v[basis] for v in c["baselines"].values() if v.get(basis)]
    if not entries:
        return None
    best = min(entries, key=lambda e: e["ppl"])
    diff, se = best["beam_minus_baseline"]
    return 100 * diff / best["ppl"], 0.0 if math.isnan(se) else 200 * se / best["ppl"]


def plot(document: dict[str, Any], path: Path) -> None:
    """Left: every curve (the random mask mostly runs off the top). Right: BEAM against the best
    baseline at each point, with two standard errors: below zero, BEAM is better."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figure, (axes, margin) = plt.subplots(1, 2, figsize=(13, 5.5), width_ratios=(3, 2))
    colors = {"top_k": "#7f7f7f", "top_p": "#2ca02c", "threshold": "#ff7f0e", "random": "#bcbd22"}
    shown = [r["ppl"] for row in document["rows"] for r in row["runs"]]
    for name, points in document["baseline_curves"].items():
        curve = sorted((p["avg_k"], p["ppl"]) for p in points)
        if curve:
            axes.plot(
                *zip(*curve, strict=True), marker=".", color=colors[name], label=NAMES[name], linewidth=1
            )
            if name != "random":
                shown += [ppl for k, ppl in curve if k >= 1]
    markers = {"router": ("o", "#d62728"), "linear": ("s", "#9467bd")}
    for head, (marker, color) in markers.items():
        cs = [c for c in document["comparisons"] if c["head"] == head]
        if cs:
            axes.errorbar(
                [c["avg_k"][0] for c in cs],
                [c["beam_ppl"][0] for c in cs],
                yerr=[0 if math.isnan(c["beam_ppl"][1]) else c["beam_ppl"][1] for c in cs],
                fmt=marker,
                color=color,
                label=f"BEAM, {head} head (one adapter per budget)",
                capsize=3,
            )
    one = document["one_adapter"]["comparisons"]
    trained_at = document["one_adapter"]["rows"][0]["trained_at"] if one else None
    if one:
        axes.plot(
            [c["avg_k"][0] for c in one],
            [c["beam_ppl"][0] for c in one],
            linestyle="--",
            marker="x",
            color="#d62728",
            label=f"BEAM, one adapter (trained at {trained_at:g}) for every budget",
        )
    base = document["base"]["ppl"]
    axes.axhline(base, color="black", linewidth=1, linestyle=":", label="base model (Top-8)")
    axes.set_yscale("log")
    axes.set_ylim(base * 0.97, max(shown) * 1.15)
    axes.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axes.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes.set_yticks(
        [t for t in (60, 70, 80, 90, 100, 120, 150, 200, 300) if base * 0.97 <= t <= max(shown) * 1.15]
    )
    axes.set_xlabel("Avg-K: routed experts computed per token (of Top-8)")
    axes.set_ylabel("held-out perplexity (log scale; lower is better)")
    axes.set_title("Reference MoE: BEAM against training-free routing")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)

    series = [
        (document["comparisons"], "router", "equal_avg_k", "o", "router head, equal Avg-K"),
        (document["comparisons"], "router", "equal_flops", "^", "router head, equal MoE FLOPs"),
        (document["comparisons"], "linear", "equal_avg_k", "s", "paper's linear head, equal Avg-K"),
        (one, "router", "equal_avg_k", "x", f"one adapter (trained at {trained_at:g}), equal Avg-K"),
    ]
    for offset, (comparisons, head, basis, marker, label) in enumerate(series):
        points = [
            (c["avg_k"][0] * (1 + 0.02 * (offset - 1.5)), m)
            for c in comparisons
            if c["head"] == head and (m := _margin_to_best(c, basis)) is not None
        ]
        if points:
            margin.errorbar(
                [x for x, _ in points],
                [m[0] for _, m in points],
                yerr=[m[1] for _, m in points],
                fmt=marker,
                color=markers[head][1] if basis == "equal_avg_k" or head != "router" else "#1f77b4",
                label=label,
                capsize=3,
            )
    margin.axhline(0, color="black", linewidth=1)
    margin.set_yscale("symlog", linthresh=2)
    low, high = margin.get_ylim()
    margin.set_ylim(low * 1.3, max(high * 1.3, 2))
    margin.set_yticks(
        [t for t in (-50, -20, -10, -5, -2, -1, 0, 1, 2, 5, 10) if low * 1.3 <= t <= max(high * 1.3, 2)]
    )
    margin.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    margin.set_xscale("log")
    margin.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    margin.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    margin.set_xticks(
        [t for t in (0.5, 1, 1.5, 2, 4, 6) if margin.get_xlim()[0] <= t <= margin.get_xlim()[1]]
    )
    margin.set_xlabel("BEAM's Avg-K (log scale)")
    margin.set_ylabel("BEAM vs the best baseline, % perplexity (± 2 SE; symlog)")
    margin.set_title("Below zero: BEAM beats every baseline")
    margin.grid(True, which="both", alpha=0.3)
    margin.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_results(out: Path, document: dict[str, Any]) -> None:
    from beam_moe.atomic import atomic_directory

    with atomic_directory(out) as staging:
        (staging / "sweep.json").write_text(json.dumps(document, indent=1) + "\n")
        (staging / "sweep.md").write_text(markdown(document))
        plot(document, staging / "sweep.png")


if __name__ == "__main__":
    sys.exit(main())
