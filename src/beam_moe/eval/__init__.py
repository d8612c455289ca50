"""Evaluation: perplexity and Avg-K, lm-eval tasks, MoE-layer FLOPs, baselines at equal Avg-K, analysis plots.

```python
from beam_moe.eval import perplexity, calibrate, sweep, flops_report, preset_shapes, analyze_routing
result = perplexity(model, tokenizer, "held_out.jsonl")       # .ppl, .avg_k, .per_layer
with using_baseline(model, "top_p", 0.8):                        # any baseline, same compute skipping
    perplexity(model, tokenizer, texts)
flops_report(preset_shapes("qwen3-30b-a3b"), avg_k=1.23)["moe_flops_reduction"]
```
"""

from beam_moe.eval.analysis import analyze_routing
from beam_moe.eval.baselines import BASELINES, apply_baseline, get_baseline, using_baseline
from beam_moe.eval.calibrate import CalibrationResult, calibrate
from beam_moe.eval.curve import measure_threshold_curve
from beam_moe.eval.flops import (
    CONVENTION,
    MoELayerShape,
    flops_report,
    folder_shapes,
    measured_flops,
    model_shapes,
    preset_shapes,
)
from beam_moe.eval.harness import SHIPPED_TASKS, TASKS_DIR, run_tasks
from beam_moe.eval.perplexity import PerplexityResult, perplexity
from beam_moe.eval.plots import plot_sweep, write_analysis_plots
from beam_moe.eval.sweep import sweep, sweep_markdown
from beam_moe.eval.text import read_texts

DEFAULT_PPL_FILE = TASKS_DIR / "data" / "wiki_heldout.jsonl"

__all__ = [
    "BASELINES",
    "CONVENTION",
    "DEFAULT_PPL_FILE",
    "SHIPPED_TASKS",
    "TASKS_DIR",
    "CalibrationResult",
    "MoELayerShape",
    "PerplexityResult",
    "analyze_routing",
    "apply_baseline",
    "calibrate",
    "flops_report",
    "folder_shapes",
    "get_baseline",
    "measure_threshold_curve",
    "measured_flops",
    "model_shapes",
    "perplexity",
    "plot_sweep",
    "preset_shapes",
    "read_texts",
    "run_tasks",
    "sweep",
    "sweep_markdown",
    "using_baseline",
    "write_analysis_plots",
]
