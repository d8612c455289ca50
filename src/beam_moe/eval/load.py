"""What `beam-moe eval/analyze/sweep` evaluate: a BEAM adapter (or a training checkpoint) on its base, or a model folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from beam_moe.attach import attach
from beam_moe.checkpoint import CONFIG_FILE, read_adapter_config
from beam_moe.errors import BeamError
from beam_moe.loading import load_base_model, load_beam_model, load_tokenizer


def load_eval_model(
    path: str | Path,
    base: str | Path | None = None,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """(model with BEAM attached, tokenizer, description) for an adapter, model or checkpoint folder.

    A model folder gets fresh mask heads (they keep every expert), so it evaluates as the base
    model and baselines can be applied to it. A training checkpoint (`RUN/checkpoints/step-N`)
    runs its heads as they were at that step. `base` overrides the adapter's base model.
    """
    from beam_moe.train.checkpointing import checkpoint_dirs, run_of_checkpoint
    from beam_moe.train.output import TRAINING_ARGS, load_checkpoint_model, read_run_config

    path = Path(path)
    if not path.exists():
        raise BeamError(f"{path} does not exist (expected a BEAM adapter folder or a model folder)")
    run = run_of_checkpoint(path)
    if run is not None:
        base_name = str(base or read_run_config(run).model)
        model = load_checkpoint_model(path, base_name, dtype, device)
        described = {"adapter": str(path), "base_model": base_name, "checkpoint_of": str(run)}
        return model, load_tokenizer(base_name), described
    if (path / TRAINING_ARGS).is_file() and not (path / CONFIG_FILE).is_file():
        found = checkpoint_dirs(path)
        instead = f"evaluate its last checkpoint ({found[-1]}) or " if found else ""
        raise BeamError(
            f"{path} holds an unfinished training run (no {CONFIG_FILE} yet); {instead}"
            "finish it with the same beam-moe train command and --resume"
        )
    if (path / CONFIG_FILE).is_file():
        document = read_adapter_config(path)
        base_name = str(base or document["base"].get("name_or_path") or "")
        model = load_beam_model(path, base=base, dtype=dtype, device=device)
        return model, load_tokenizer(base_name), {"adapter": str(path), "base_model": base_name}
    if base is not None:
        raise BeamError(f"{path} is a model folder, not a BEAM adapter; --model applies to adapters only")
    model = attach(load_base_model(path, dtype, device))
    return model, load_tokenizer(path), {"adapter": None, "base_model": str(path)}
