"""What `beam-moe eval/analyze/sweep` evaluate: a BEAM adapter folder on its base, or a plain model folder."""

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
    """(model with BEAM attached, tokenizer, description) for an adapter folder or a model folder.

    A model folder gets fresh mask heads (they keep every expert), so it evaluates as the base
    model and baselines can be applied to it. `base` overrides the adapter's base model.
    """
    path = Path(path)
    if not path.exists():
        raise BeamError(f"{path} does not exist (expected a BEAM adapter folder or a model folder)")
    if (path / CONFIG_FILE).is_file():
        document = read_adapter_config(path)
        base_name = str(base or document["base"].get("name_or_path") or "")
        model = load_beam_model(path, base=base_name or None, dtype=dtype, device=device)
        return model, load_tokenizer(base_name), {"adapter": str(path), "base_model": base_name}
    if base is not None:
        raise BeamError(f"{path} is a model folder, not a BEAM adapter; --model applies to adapters only")
    model = attach(load_base_model(path, dtype, device))
    return model, load_tokenizer(path), {"adapter": None, "base_model": str(path)}
