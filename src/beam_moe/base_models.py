"""The base model before BEAM: a transformers MoE model, its config and tokenizer, from a folder or Hub id.

Everything that loads a model goes through here, so a missing folder, a dense model or an offline
Hub gives one clear error. A model with BEAM attached comes from `beam_moe.loading`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from beam_moe.errors import BeamError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

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


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE") == "1"


def model_source(
    name_or_path: str | Path, what: str = "the model", need_config: bool = True
) -> tuple[str, bool]:
    """(name, is_local): an existing model folder, or a name that can only be a Hub id.

    A path that does not exist is refused here with "no such folder": handed to transformers it
    would be read as a Hub id and fail with a message about repo id syntax.
    """
    from huggingface_hub.utils import validate_repo_id

    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise BeamError(f"{what} {name} is a file; pass a transformers model folder (with config.json)")
        if need_config and not (path / "config.json").is_file():
            raise BeamError(f"{name} is not a transformers model folder (no config.json)")
        return str(path), True
    try:
        validate_repo_id(name)
    except ValueError:
        raise BeamError(
            f"no such folder: {name} ({what} must be a local transformers model folder, "
            "or a Hub id such as 'Qwen/Qwen3-30B-A3B')"
        ) from None
    return name, False


def _not_found(name: str, is_local: bool, error: Exception) -> str:
    if is_local:
        return f"could not load the model {name!r} from the folder: {error}"
    if _offline():
        return (
            f"no such folder: {name}, and no Hub model of that name is cached "
            "(the Hub is offline: HF_HUB_OFFLINE=1); pass a local model folder"
        )
    return f"no such folder: {name}, and the Hub could not provide it either ({error})"


def load_model_config(name_or_path: str | Path, what: str = "the model") -> PretrainedConfig:
    """The transformers config of an MoE model BEAM supports, read without loading any weight.

    A dense model (or an MoE config whose layers are all dense) is refused here, before the
    weights are read: loading a large model only to refuse it costs minutes.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from beam_moe.attach import select_blocks
    from beam_moe.families import family_for

    name, is_local = model_source(name_or_path, what)
    try:
        config = AutoConfig.from_pretrained(name, local_files_only=is_local or _offline())
    except (OSError, ValueError) as e:
        raise BeamError(_not_found(name, is_local, e)) from e
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except ValueError as e:
        raise BeamError(f"{name} is not a causal language model transformers can build ({e})") from e
    try:
        select_blocks(skeleton, family_for(skeleton), None)
    except BeamError as e:
        raise BeamError(f"{name}: {e}") from None
    return config


def context_length(config: Any) -> int | None:
    """The longest sequence the model was built for (`max_position_embeddings`), when its config says."""
    value = getattr(config, "max_position_embeddings", None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def load_base_model(
    name_or_path: str | Path,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    config: PretrainedConfig | None = None,
) -> nn.Module:
    """A transformers MoE causal LM from a local folder, or a Hub id when the Hub is reachable.

    The config is checked first (`load_model_config`, unless the caller already did and passes
    its result): a missing folder or a model BEAM does not support is refused before any weight
    is read.
    """
    from transformers import AutoModelForCausalLM

    name, is_local = model_source(name_or_path)
    if config is None:
        config = load_model_config(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, config=config, dtype=parse_dtype(dtype), local_files_only=is_local or _offline()
        )
    except OSError as e:
        raise BeamError(_not_found(name, is_local, e)) from e
    return model.to(device).eval()


def load_tokenizer(name_or_path: str | Path):
    from transformers import AutoTokenizer

    name, is_local = model_source(name_or_path, "the tokenizer's folder", need_config=False)
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=is_local or _offline())
    except (OSError, ValueError) as e:
        raise BeamError(f"could not load a tokenizer from {name_or_path!r}: {e}") from e
