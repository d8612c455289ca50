"""Where a model with BEAM attached comes from: every folder beam-moe writes, each loaded in one place.

| you have | call |
|---|---|
| a base model folder or Hub id (no BEAM yet) | `beam_moe.base_models.load_base_model` |
| a model you hold, and an adapter folder | `beam_moe.load_beam` (`beam_moe.adapter`) |
| an adapter folder (its base is named inside) | `load_beam_model` |
| a merged checkpoint (`beam-moe export`) | `beam_moe.from_pretrained` (`beam_moe.merged`) |
| a training checkpoint (`RUN/checkpoints/step-N`) | `load_checkpoint_model` |
| any of these, for evaluation (`eval`, `sweep`, `analyze`) | `load_eval_model` |

This module sits above `train`: it reads the folders a training run writes (`train.output`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from beam_moe.adapter import CONFIG_FILE, load_beam, read_adapter_config
from beam_moe.attach import attach
from beam_moe.base_models import load_base_model, load_tokenizer
from beam_moe.errors import BeamError, require
from beam_moe.train.checkpointing import checkpoint_dirs, run_of_checkpoint
from beam_moe.train.output import TRAINING_ARGS, read_run_config


def load_beam_model(
    adapter: str | Path,
    base: str | Path | None = None,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
) -> nn.Module:
    """The base model named in the adapter (or `base`) with the adapter attached.

    An adapter written by `beam-moe train --train mask+router|lora|full` also needs the weights
    that trained with it (routers, LoRA, the whole model); they are applied first.
    """
    document = read_adapter_config(adapter)
    extra = document.get("extra") or {}
    if extra.get("model_weights"):
        return load_beam(rebuild_trained_base(adapter, extra, base, dtype, device), adapter)
    if base:
        return load_beam(load_base_model(base, dtype, device), adapter)
    base = document["base"].get("name_or_path")
    if not base:
        raise BeamError(f"the adapter at {adapter} does not name its base model; pass --model")
    try:
        model = load_base_model(base, dtype, device)
    except BeamError as e:
        raise BeamError(
            f"the base model the adapter at {adapter} names: {e}; pass --model BASE_FOLDER"
        ) from e
    return load_beam(model, adapter)


def rebuild_trained_base(
    adapter: str | Path, extra: dict[str, Any], base: str | Path | None, dtype: Any, device: str
) -> nn.Module:
    """The model an adapter from `beam-moe train --train mask+router|lora|full` was trained with."""
    adapter = Path(adapter)
    weights = extra["model_weights"]
    location = adapter / weights["path"]
    if not location.exists():
        raise BeamError(f"the adapter at {adapter} needs {location}, which is missing; copy the whole folder")
    if weights["kind"] == "full":
        return load_base_model(base or location, dtype, device)
    model = load_base_model(base or extra["base_model"], dtype, device)
    if weights["kind"] == "routers":
        tensors = load_file(location)
        own = dict(model.named_parameters())
        missing = sorted(set(tensors) - set(own))
        if missing:
            raise BeamError(f"{location} holds router weights this model does not have: {missing[:3]}")
        with torch.no_grad():
            for name, value in tensors.items():
                own[name].copy_(value)
        return model
    if weights["kind"] == "lora":
        peft = require("peft", "train", "a LoRA-trained adapter")
        return peft.PeftModel.from_pretrained(model, str(location)).merge_and_unload()
    raise BeamError(f"the adapter at {adapter} names unknown trained weights {weights!r}")


def load_checkpoint_model(
    path: str | Path, base: str | Path | None = None, dtype: Any = "float32", device: str = "cpu"
) -> nn.Module:
    """The model as it was at the training checkpoint `path` (`RUN/checkpoints/step-N`), heads attached.

    The heads run at the run's training threshold: the threshold that lands Avg-K on the target
    is calibrated only when the run finishes, so a checkpoint's Avg-K may differ from the
    finished adapter's. LoRA and full-model checkpoints hold weights that only the run can put
    back together; they are refused with what to do instead.
    """
    path = Path(path)
    run = run_of_checkpoint(path)
    if run is None:
        raise BeamError(f"{path} is not a training checkpoint (RUN/checkpoints/step-N with a state.json)")
    config = read_run_config(run)
    if config.train in ("lora", "full"):
        raise BeamError(
            f"{path} is a checkpoint of a --train {config.train} run, which only training can restore; "
            f"finish the run (the same beam-moe train command with --resume) and evaluate {run}"
        )
    try:
        tensors = load_file(path / "trainable.safetensors")
    except (OSError, ValueError) as e:
        raise BeamError(
            f"cannot read {path / 'trainable.safetensors'} ({e}); the checkpoint is damaged"
        ) from e
    model = attach(load_base_model(base or config.model, dtype, device), config.beam_config())
    own = dict(model.named_parameters())
    wrong = sorted(k for k, v in tensors.items() if k not in own or own[k].shape != v.shape)
    if wrong:
        raise BeamError(
            f"{path} holds weights this model does not have, or with other shapes ({wrong[:3]}): "
            f"it was written for another base model than {base or config.model}"
        )
    with torch.no_grad():
        for name, value in tensors.items():
            own[name].copy_(value)
    return model


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
