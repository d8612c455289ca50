"""`beam-moe quickstart`: the whole pipeline on the packaged reference MoE, offline, in minutes.

1. train BEAM mask heads to a target Avg-K on the corpus's train split (`beam_moe.train`);
2. evaluate held-out perplexity, Avg-K and MoE-layer FLOPs of the base model, BEAM and the
   baselines (Top-K pruning, Top-P, threshold skipping), each calibrated to BEAM's Avg-K
   (`beam_moe.eval.sweep`), plus each baseline's curve;
3. time the MoE layers inside real forward passes: the stock transformers model vs BEAM;
4. write `report.md`, `results.json`, `sweep.md`, `sweep.png`, `analysis/` (routing plots) and the
   trained adapter (`adapter/`) into the output folder, all at once.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from beam_moe.errors import BeamError
from beam_moe.experiments.refmoe.compare import comparison, comparison_markdown, verdict_lines
from beam_moe.experiments.refmoe.experiment import (
    Recipe,
    evaluate_adapters,
    heldout_texts,
    train_mask_heads,
    write_training_text,
)
from beam_moe.outputs import check_output_folder
from beam_moe.refmoe.architecture import REFERENCE_SHAPE

RESULTS_FILE = "results.json"
BASELINE_NAMES = ("top_k", "top_p", "threshold")


@dataclass
class QuickstartConfig:
    """What the quickstart does; the defaults take 9-11 minutes on 2 idle CPU cores."""

    output: str = "beam-quickstart"
    target_avg_k: float = 1.5
    recipe: Recipe = field(default_factory=Recipe)
    eval_blocks: int = 48
    eval_length: int = 256
    points: int = 6
    bench: bool = True
    bench_tokens: tuple[int, ...] = (16, 256)
    bench_rounds: int = 15
    data_dir: str | None = None
    overwrite: bool = False
    progress: bool = True

    def check(self) -> None:
        self.recipe.check()
        if not 0.0 < self.target_avg_k <= 8.0:
            raise BeamError(
                f"--target-avg-k must lie in (0, 8] (kept experts per token; the reference model routes "
                f"Top-8), got {self.target_avg_k}"
            )
        if self.eval_blocks < 1:
            raise BeamError(f"--eval-blocks must be at least 1, got {self.eval_blocks}")
        if not 2 <= self.eval_length <= 512:
            raise BeamError(f"--eval-length must lie between 2 and 512, got {self.eval_length}")
        if self.points < 2:
            raise BeamError(f"--points must be at least 2, got {self.points}")
        if self.bench and (not self.bench_tokens or min(self.bench_tokens) < 1 or self.bench_rounds < 1):
            raise BeamError("--bench-tokens must be whole numbers >= 1 and --bench-rounds >= 1")
        if self.bench and max(self.bench_tokens) > self.eval_length:
            raise BeamError(
                f"--bench-tokens may not exceed --eval-length ({self.eval_length}): the timed "
                "sequences are held-out evaluation windows"
            )
        check_output_folder(
            self.output, overwrite=self.overwrite, ours=RESULTS_FILE, what="a quickstart report"
        )

    def to_dict(self) -> dict[str, Any]:
        document = asdict(self)
        document["bench_tokens"] = list(self.bench_tokens)
        return document


class Stages:
    """The overall progress bar: one step per stage, the stage's name and elapsed time alongside.

    Without the bar (`--no-progress`, `--json`) each finished stage prints one line to stderr with
    its time (and its throughput, where it has one), so a slow machine is visible either way.
    """

    def __init__(self, names: list[str], enabled: bool) -> None:
        self.names = names
        self.seconds: dict[str, float] = {}
        self._bar = tqdm(total=len(names), desc="quickstart", unit="stage", disable=not enabled, position=0)
        self._started = time.perf_counter()
        self._current: str | None = None

    def start(self, name: str) -> None:
        self._current, self._started = name, time.perf_counter()
        self._bar.set_postfix_str(name)
        self._bar.refresh()

    def done(self, tokens: int = 0, what: str = "tokens") -> None:
        assert self._current is not None
        seconds = self.seconds[self._current] = round(time.perf_counter() - self._started, 2)
        self._bar.update(1)
        if self._bar.disable:
            detail = f" ({tokens / max(seconds, 1e-9):,.0f} {what}/s)" if tokens else ""
            print(
                f"quickstart [{len(self.seconds)}/{len(self.names)}] {self._current}: {seconds:.1f} s{detail}",
                file=sys.stderr,
                flush=True,
            )

    def sub_bar(self, total: int, desc: str):
        return tqdm(total=total, desc=desc, unit="eval", disable=self._bar.disable, leave=False, position=1)

    def close(self) -> None:
        self._bar.close()


def _grids(top_k: int, points: int) -> dict[str, list[float]]:
    from beam_moe.eval.sweep import default_grid

    return {name: default_grid(name, top_k, points) for name in BASELINE_NAMES}


def run_quickstart(config: QuickstartConfig) -> dict[str, Any]:
    """Run the pipeline; returns the results document (also written to `<output>/results.json`)."""
    from beam_moe.atomic import atomic_directory
    from beam_moe.bench.machine import describe_machine
    from beam_moe.eval import analyze_routing, measured_flops, plot_sweep, sweep_markdown
    from beam_moe.eval.perplexity import token_windows
    from beam_moe.eval.plots import write_analysis_plots
    from beam_moe.experiments.refmoe.corpus import ensure_prepared
    from beam_moe.experiments.refmoe.speed import time_moe_layers
    from beam_moe.refmoe import load_reference_model, reference_model_path, training_record

    config.check()
    reference_model_path()
    ensure_prepared(config.data_dir)
    texts = heldout_texts(config.data_dir)
    recipe = config.recipe
    eval_tokens = config.eval_blocks * config.eval_length
    stages = Stages(
        ["training text", "train mask heads", "evaluate", "MoE-layer speed", "report"], config.progress
    )
    started = time.perf_counter()
    try:
        with (
            atomic_directory(config.output, replace=True) as staging,
            tempfile.TemporaryDirectory() as scratch,
        ):
            stages.start("training text")
            data_file = Path(scratch) / "train.jsonl"
            text_sizes = write_training_text(
                data_file,
                recipe.steps * recipe.batch_size * recipe.max_length,
                config.data_dir,
                recipe.seed,
                recipe.mix,
            )
            stages.done()

            stages.start("train mask heads")
            adapter = staging / "adapter"
            trained = train_mask_heads(config.target_avg_k, adapter, recipe, data_file, config.progress)
            stages.done(trained.tokens, "training tokens")

            stages.start("evaluate")
            grids = _grids(REFERENCE_SHAPE["num_experts_per_tok"], config.points)
            evaluations = 2 + sum(len(v) for v in grids.values()) + len(grids)
            with stages.sub_bar(evaluations, "evaluate") as bar:
                result, model, tokenizer = evaluate_adapters(
                    [adapter],
                    texts,
                    grids,
                    eval_tokens=eval_tokens,
                    max_length=config.eval_length,
                    seed=recipe.seed,
                    on_point=lambda message: (bar.set_postfix_str(message[:60]), bar.update(1)),
                )
            next(p for p in result["points"] if p["method"] == "beam")["label"] = "BEAM"
            result["matched"][0]["beam"]["label"] = "BEAM"
            result["config"]["adapters"] = ["adapter"]
            comp = comparison(result)
            base_flops = measured_flops(model, {}, mask_head=False)["base"]["total"]
            summary = analyze_routing(
                model, tokenizer, texts, max_tokens=min(4096, eval_tokens), max_length=config.eval_length
            )
            stages.done(evaluations * eval_tokens, "evaluated tokens")

            stages.start("MoE-layer speed")
            speed = None
            if config.bench:
                windows = token_windows(tokenizer, texts, config.eval_length, eval_tokens)[:8]
                base_model = load_reference_model()
                speed = time_moe_layers(
                    {"base": base_model, "BEAM": model},
                    windows,
                    [t for t in config.bench_tokens if t <= max(len(w) for w in windows)],
                    rounds=config.bench_rounds,
                )
            stages.done()

            stages.start("report")
            document = {
                "config": config.to_dict(),
                "reference_model": {
                    "path": str(reference_model_path()),
                    "heldout_perplexity_at_pretraining": training_record().get("heldout_perplexity"),
                },
                "training": {
                    "steps": trained.steps,
                    "tokens": trained.tokens,
                    "seconds": round(trained.elapsed_s, 1),
                    "final": trained.metrics,
                    "text": text_sizes,
                },
                "evaluation": {"heldout_tokens": eval_tokens, "max_length": config.eval_length},
                "comparison": comp,
                "moe_flops_per_token_base": base_flops,
                "sweep": result,
                "speed": speed,
                "machine": describe_machine(next(model.parameters()).device),
                "stage_seconds": stages.seconds,
                "total_seconds": round(time.perf_counter() - started, 1),
            }
            plot_sweep(result, staging / "sweep.png")
            (staging / "analysis").mkdir()
            write_analysis_plots(summary, staging / "analysis")
            (staging / "analysis" / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
            (staging / "sweep.md").write_text(sweep_markdown(result))
            stages.done()
            document["stage_seconds"] = stages.seconds
            document["total_seconds"] = round(time.perf_counter() - started, 1)
            (staging / "report.md").write_text(report_markdown(document))
            (staging / RESULTS_FILE).write_text(json.dumps(document, indent=1, default=str) + "\n")
    finally:
        stages.close()
    return document


def speed_markdown(speed: dict[str, Any] | None) -> str:
    if not speed:
        return "MoE-layer timing was skipped (`--no-bench`).\n"
    lines = [
        "| tokens per forward | base MoE layers (ms) | BEAM MoE layers (ms) | MoE speed-up | base forward (ms) | BEAM forward (ms) | forward speed-up |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for count, row in speed["tokens"].items():
        ratio = speed["ratios"][count]["BEAM"]
        lines.append(
            f"| {count} | {row['base']['moe_ms']:.2f} | {row['BEAM']['moe_ms']:.2f} | {ratio['moe_speedup']:.2f}x | "
            f"{row['base']['forward_ms']:.2f} | {row['BEAM']['forward_ms']:.2f} | {ratio['forward_speedup']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def _landing(final: dict[str, Any]) -> str:
    """Where the budget controller left Avg-K and the threshold that put it on the target."""
    if "threshold" not in final:
        return ""
    return (
        f" The budget controller left Avg-K at {final['calibration_avg_k_before']:.2f} on the calibration "
        f"text; the serve-time threshold {final['threshold']:.3f} puts it at {final['calibration_avg_k']:.2f}."
    )


def report_markdown(document: dict[str, Any]) -> str:
    """report.md: what ran, the table, the goals, the speed, the plots."""
    config, comp, training = document["config"], document["comparison"], document["training"]
    recipe = config["recipe"]
    machine = document["machine"]
    return f"""# beam-moe quickstart

BEAM mask heads trained on the packaged reference MoE (Qwen3-MoE architecture, 4 MoE layers,
32 experts, Top-{comp["top_k"]}) to a target Avg-K of {config["target_avg_k"]}; evaluated on
{document["evaluation"]["heldout_tokens"]} tokens of held-out text (documents the reference model
never trained on), in windows of {document["evaluation"]["max_length"]} tokens.

Training: {training["steps"]} steps of {recipe["batch_size"]} x {recipe["max_length"]} tokens,
objective `{recipe["objective"]}`, trained: `{recipe["train"]}`, `{recipe["head"]}` mask head{
        " (started as threshold skipping at the target)" if recipe["head"] == "router" else ""
    }, head learning rate {recipe["lr"]}, {training["seconds"]:.0f} s.{_landing(training["final"])}
Baselines are training-free routing policies calibrated to BEAM's
measured Avg-K on the same text (Top-K pruning is interpolated between whole numbers of experts).
BEAM's measured Avg-K on the held-out text is {comp["avg_k"]:.2f} (target {config["target_avg_k"]}){
        ""
        if abs(comp["avg_k"] - config["target_avg_k"]) <= 0.1
        else "; the budget controller had not brought it to the target within the training steps"
    }.

## Quality and compute at equal Avg-K

{comparison_markdown(comp, document["moe_flops_per_token_base"])}
MoE FLOPs count routed experts, router and (for BEAM) the mask head; 2 FLOPs per multiply-add.

## Goals

{chr(10).join(verdict_lines(comp))}

## Speed of the MoE layers

Time inside the 4 MoE blocks during a real forward pass of one held-out sequence, stock
transformers model (Top-{comp["top_k"]}) vs the BEAM model (masked experts never computed); medians
over {document["speed"]["rounds"] if document["speed"] else 0} interleaved rounds, {
        machine.get("torch_threads")
    } threads.
The reference model's experts are tiny (hidden 256, 64 per expert), so fixed per-call costs weigh
more than in a real model; `beam-moe bench layer --preset qwen3-30b-a3b` measures real sizes.

{speed_markdown(document["speed"])}
## Files

- `sweep.png`: perplexity against Avg-K, BEAM and each baseline's curve; `sweep.md`: every point.
- `analysis/`: where BEAM keeps experts (per layer, per token, by rank, per expert).
- `adapter/`: the trained BEAM adapter (`beam-moe eval {config["output"]}/adapter`).
- `results.json`: every number above, the configuration and the machine.

Machine: {machine.get("cpu")}, {machine.get("cpu_count")} CPUs, torch {machine.get("torch")};
stages (s): {document["stage_seconds"]}; total {document["total_seconds"]:.0f} s.
"""


def print_summary(document: dict[str, Any], file=None) -> None:
    """The final table and the goals, for the terminal."""
    file = file or sys.stdout
    print(comparison_markdown(document["comparison"], document["moe_flops_per_token_base"]), file=file)
    for line in verdict_lines(document["comparison"]):
        print(line.replace("**", ""), file=file)
    if document["speed"]:
        print("\n" + speed_markdown(document["speed"]), file=file)
    print(f"report: {Path(document['config']['output']) / 'report.md'}", file=file)
