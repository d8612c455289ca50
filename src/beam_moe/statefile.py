"""Training state on disk without pickle: tensors in safetensors, everything else in JSON.

`save_state(folder, name, state)` writes `<name>.safetensors` (every tensor, named by where it sits,
e.g. `state/3/exp_avg`) and `<name>.json` (the rest, with each tensor replaced by its name).
Nested dicts (string or integer keys), lists, tuples, numbers (NaN and infinities too), strings,
booleans, None and tensors come back exactly as they went in, so an optimizer's `state_dict()`
(AdamW's moments keyed by parameter index or name, its param_groups with tuple betas) resumes
bit for bit. Loading only parses: nothing in the files is ever executed (pickle would).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from beam_moe.errors import BeamError

_TENSOR = "__tensor__"
_TUPLE = "__tuple__"
_FLOAT = "__float__"  # NaN and the infinities, which strict JSON has no words for
_ITEMS = "__items__"  # a dict whose keys are not all plain strings
_TAGS = (_TENSOR, _TUPLE, _FLOAT, _ITEMS)


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor], seen: set[int]) -> Any:
    if isinstance(value, torch.Tensor):
        name = path or "tensor"
        while name in tensors:
            name += "'"
        tensor = value.detach().to("cpu").contiguous()
        # safetensors refuses tensors that share memory (tied weights): store a copy of the second.
        if tensor.numel() and tensor.untyped_storage().data_ptr() in seen:
            tensor = tensor.clone()
        if tensor.numel():
            seen.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor
        return {_TENSOR: name}
    if isinstance(value, dict):
        items = [(k, _encode(v, f"{path}/{k}" if path else str(k), tensors, seen)) for k, v in value.items()]
        if all(isinstance(k, str) and k not in _TAGS for k, _ in items):
            return dict(items)
        return {_ITEMS: [[_encode(k, "", {}, set()), v] for k, v in items]}
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, f"{path}/{i}", tensors, seen) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{path}/{i}", tensors, seen) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {_FLOAT: repr(value)}
    raise TypeError(f"cannot store {type(value).__name__} at {path!r} in a state file")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if _TENSOR in value:
        return tensors[value[_TENSOR]]
    if _TUPLE in value:
        return tuple(_decode(v, tensors) for v in value[_TUPLE])
    if _ITEMS in value:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value[_ITEMS]}
    if _FLOAT in value:
        return float(value[_FLOAT])
    return {k: _decode(v, tensors) for k, v in value.items()}


def save_state(folder: str | Path, name: str, state: Any) -> None:
    """Write `state` as `<name>.safetensors` + `<name>.json` into `folder` (a staging folder: the
    caller makes the checkpoint appear atomically)."""
    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    document = _encode(state, "", tensors, set())
    save_file(tensors, folder / f"{name}.safetensors")
    (folder / f"{name}.json").write_text(json.dumps(document, allow_nan=False) + "\n")


def load_state(folder: str | Path, name: str) -> Any:
    """Read what `save_state(folder, name, ...)` wrote; a missing or damaged file is a BeamError."""
    folder = Path(folder)
    try:
        tensors = load_file(folder / f"{name}.safetensors")
        document = json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
        return _decode(document, tensors)
    except (OSError, ValueError, KeyError, TypeError, RecursionError, SafetensorError) as e:
        raise BeamError(f"cannot read {folder / name}.json/.safetensors ({type(e).__name__}: {e})") from e
