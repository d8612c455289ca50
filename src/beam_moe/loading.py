"""Loading base models and BEAM models from folders (or the Hub, when online), with clear errors."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from beam_moe.errors import BeamError

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise BeamError(f"unknown dtype {name!r}; use one of {', '.join(sorted(DTYPES))}")
    return DTYPES[name]


def load_base_model(
    name_or_path: str | Path, dtype: str | torch.dtype = "float32", device: str = "cpu"
) -> nn.Module:
    """A transformers causal LM from a local folder, or a Hub id when the Hub is reachable."""
    from transformers import AutoModelForCausalLM

    name = str(name_or_path)
    is_local = Path(name).exists()
    if is_local and not (Path(name) / "config.json").is_file():
        raise BeamError(f"{name} is not a transformers model folder (no config.json)")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name,
            dtype=parse_dtype(dtype),
            local_files_only=is_local or os.environ.get("HF_HUB_OFFLINE") == "1",
        )
    except OSError as e:
        where = "the folder" if is_local else "the Hub (offline? pass a local folder instead)"
        raise BeamError(f"could not load the model {name!r} from {where}: {e}") from e
    return model.to(device).eval()


def load_tokenizer(name_or_path: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            str(name_or_path), local_files_only=Path(str(name_or_path)).exists()
        )
    except (OSError, ValueError) as e:
        raise BeamError(f"could not load a tokenizer from {name_or_path!r}: {e}") from e


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
    from beam_moe.checkpoint import load_beam, read_adapter_config

    document = read_adapter_config(adapter)
    extra = document.get("extra") or {}
    if extra.get("model_weights"):
        from beam_moe.train.output import rebuild_trained_base

        return load_beam(rebuild_trained_base(adapter, extra, base, dtype, device), adapter)
    base = base or document["base"].get("name_or_path")
    if not base:
        raise BeamError(f"the adapter at {adapter} does not name its base model; pass --model")
    return load_beam(load_base_model(base, dtype, device), adapter)
