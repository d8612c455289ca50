"""lm-evaluation-harness on a BEAM model: an `HFLM` wrapping our model object, offline with local task YAMLs.

beam-moe ships two tasks built from held-out Wikipedia leads (tasks/README.md): `beam_wiki_ppl`
(rolling log-likelihood) and `beam_wiki_cloze` (4-way multiple choice). More task folders can be
added with `include_path`; lm-eval's built-in tasks are found too, but most need the Hugging
Face Hub and fail offline.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from torch import nn

from beam_moe.attach import beam_stats, is_attached
from beam_moe.errors import BeamError, require

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
SHIPPED_TASKS = ("beam_wiki_ppl", "beam_wiki_cloze")


def run_tasks(
    model: nn.Module,
    tokenizer,
    tasks: Sequence[str],
    *,
    include_path: Sequence[str | Path] = (),
    limit: int | float | None = None,
    batch_size: int = 1,
    num_fewshot: int | None = None,
    max_length: int | None = None,
) -> dict[str, Any]:
    """Run lm-eval `tasks` on `model` (as it is: mask heads or a baseline's policy decide the routing).

    Returns {"results": lm-eval's per-task metrics, "avg_k", "per_layer", "tokens", "n_samples",
    "config"}; Avg-K is counted over every forward pass lm-eval made (batch_size 1 routes no padding).
    """
    require("lm_eval", "eval", "lm-eval tasks")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise BeamError(f"no tasks given; shipped tasks: {', '.join(SHIPPED_TASKS)}")
    paths = [str(TASKS_DIR), *(str(p) for p in include_path)]
    for path in paths[1:]:
        if not Path(path).exists():
            raise BeamError(f"task folder {path} does not exist")
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # lm-eval's `verbosity` arguments are deprecated
    manager = TaskManager(include_path=paths, include_defaults=False)
    if any(t not in manager.all_tasks for t in tasks):  # lm-eval's own tasks: indexing them takes seconds
        manager = TaskManager(include_path=paths)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise BeamError(
            f"unknown lm-eval task(s) {', '.join(unknown)}; shipped tasks: {', '.join(SHIPPED_TASKS)} "
            "(add task folders with --include-path)"
        )
    device = next(model.parameters()).device
    kwargs: dict[str, Any] = {"max_length": max_length} if max_length else {}
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device), **kwargs)
    counting = beam_stats(model) if is_attached(model) else nullcontext()
    with counting as stats:
        output = simple_evaluate(
            model=lm,
            tasks=list(tasks),
            task_manager=manager,
            limit=limit,
            num_fewshot=num_fewshot,
            log_samples=False,
            bootstrap_iters=0,
        )
    if output is None:
        raise BeamError("lm-eval returned no results")
    return {
        "results": output["results"],
        "n_samples": output.get("n-samples", {}),
        "avg_k": stats.avg_k if stats is not None else None,
        "per_layer": stats.per_layer if stats is not None else {},
        "tokens": stats.tokens if stats is not None else None,
        "config": {"limit": limit, "batch_size": batch_size, "num_fewshot": num_fewshot},
    }
