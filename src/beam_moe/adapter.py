"""BEAM adapters on disk: `beam_config.json` + `beam_adapter.safetensors`, the mask heads only.

The config records the BeamConfig, the base model's identity and the weights file's SHA-256, so
a damaged file or another base is refused before the model is touched. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from beam_moe.atomic import atomic_directory, atomic_write_text
from beam_moe.attach import attach, detach, get_attachment, is_attached, select_blocks
from beam_moe.config import BeamConfig
from beam_moe.errors import BeamError
from beam_moe.families import family_for
from beam_moe.identity import base_identity, identity_mismatch, identity_problem
from beam_moe.threshold_curve import ThresholdCurve
from beam_moe.version import __version__

CONFIG_FILE = "beam_config.json"
WEIGHTS_FILE = "beam_adapter.safetensors"
FORMAT = "beam-moe-adapter"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
"""Version 2 added the router-aware head (`head`, `router_scale`, `router_offset`); a version 1
adapter has the paper's linear head."""
CURVE_KEY = "threshold_curve"
"""The config's key for the threshold -> Avg-K curve (optional: older adapters have none)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The mask heads' tensors, named `<block>.beam_mask.weight` (and `.bias`)."""
    return {
        f"{layer.name}.beam_mask.{key}": value.detach().to("cpu").contiguous()
        for layer in get_attachment(model).layers
        for key, value in layer.head.state_dict().items()
    }


def save_beam(
    model: nn.Module,
    path: str | Path,
    extra: dict[str, Any] | None = None,
    threshold_curve: ThresholdCurve | None = None,
) -> Path:
    """Write the model's BEAM adapter into the folder `path`, atomically; returns the folder.

    Other files already in the folder are kept. `extra` is stored in the config under "extra"
    (e.g. how the adapter was trained). `threshold_curve` (measured on these heads) is stored
    under "threshold_curve"; the curve of a loaded adapter is not carried over on its own, since
    heads saved again may have changed since it was measured.
    """
    attachment = get_attachment(model)
    path = Path(path)
    try:  # before anything is written: a refused `extra` leaves no folder behind
        json.dumps(extra or {})
    except (TypeError, ValueError, RecursionError) as e:
        raise BeamError(f"extra must hold only JSON values (objects, lists, strings, numbers): {e}") from e
    with atomic_directory(path) as staging:
        save_file(adapter_state_dict(model), staging / WEIGHTS_FILE, metadata={"format": FORMAT})
        document = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "beam_moe_version": __version__,
            "config": attachment.config.to_dict(),
            "base": attachment.base,
            "weights": {"file": WEIGHTS_FILE, "sha256": _sha256(staging / WEIGHTS_FILE)},
            "extra": extra or {},
        }
        if threshold_curve is not None:
            document[CURVE_KEY] = threshold_curve.to_dict()
        (staging / CONFIG_FILE).write_text(json.dumps(document, indent=2) + "\n")
    return path


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    """Parse and check `beam_config.json` of the adapter folder `path`; returns the whole document."""
    path = Path(path)
    config_path = path / CONFIG_FILE
    if not path.is_dir():
        raise BeamError(
            f"no BEAM adapter at {path}: not a folder (expected {CONFIG_FILE} and {WEIGHTS_FILE})"
        )
    if not config_path.is_file():
        raise BeamError(f"no BEAM adapter at {path}: {CONFIG_FILE} is missing")
    try:
        document = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BeamError(
            f"{config_path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
            "re-save the adapter or fix the file"
        ) from e
    except (UnicodeDecodeError, RecursionError) as e:
        raise BeamError(
            f"{config_path} is not a JSON text ({type(e).__name__}: {e}); re-save the adapter or fix the file"
        ) from e
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise BeamError(f'{config_path} is not a beam-moe adapter config (no "format": "{FORMAT}")')
    if document.get("format_version") not in READABLE_VERSIONS:
        raise BeamError(
            f"{config_path} has format version {document.get('format_version')!r}; "
            f"this beam-moe ({__version__}) reads versions {', '.join(map(str, READABLE_VERSIONS))}"
        )
    for key in ("config", "base", "weights"):
        if not isinstance(document.get(key), dict):
            raise BeamError(f"{config_path} has no {key!r} section; the file is incomplete")
    problem = identity_problem(document["base"])
    if problem:
        raise BeamError(f"{config_path}: the base section is damaged ({problem}); re-save the adapter")
    if document["format_version"] == 1:
        document["config"].setdefault("head", "linear")
    try:
        document["config"] = BeamConfig.from_dict(document["config"])
    except BeamError as e:
        raise BeamError(f"{config_path}: {e}") from e
    except TypeError as e:
        raise BeamError(f"{config_path}: the config section does not parse ({e})") from e
    return document


def read_threshold_curve(source: str | Path | dict[str, Any]) -> ThresholdCurve | None:
    """The calibrated threshold -> Avg-K curve of an adapter or merged folder, or of a parsed
    document (beam_config.json, or a merged config.json); None when it has none.

    A merged folder's curve is the one in config.json's `beam_export` (the one vLLM reads). A
    damaged curve is refused with the file in the message.
    """
    if isinstance(source, dict):
        return _curve_of(source, "the document")
    folder = Path(source)
    try:
        merged = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        merged = None
    if isinstance(merged, dict) and isinstance(merged.get("beam_export"), dict):
        return _curve_of(merged, str(folder / "config.json"))
    return _curve_of(read_adapter_config(folder), str(folder / CONFIG_FILE))


def _curve_of(document: dict[str, Any], where: str) -> ThresholdCurve | None:
    if isinstance(document.get("beam_export"), dict):
        document, where = document["beam_export"], f"{where} (beam_export)"
    data = document.get(CURVE_KEY)
    if data is None:
        return None
    return ThresholdCurve.from_dict(data, source=f"the threshold curve in {where}")


def write_threshold_curve(path: str | Path, curve: ThresholdCurve) -> Path:
    """Store `curve` in the adapter folder `path` (its beam_config.json, rewritten atomically).

    The weights are not touched: the curve describes them, it is not part of them.
    """
    path = Path(path)
    read_adapter_config(path)  # refuses a folder that is not an adapter before anything is written
    document = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    document[CURVE_KEY] = curve.to_dict()
    atomic_write_text(path / CONFIG_FILE, json.dumps(document, indent=2) + "\n")
    return path


def _read_weights(path: Path, document: dict[str, Any]) -> dict[str, torch.Tensor]:
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        raise BeamError(f"the adapter at {path} has no {WEIGHTS_FILE}")
    expected = document["weights"].get("sha256")
    if expected != _sha256(weights_path):
        raise BeamError(
            f"{weights_path} does not match {CONFIG_FILE} (its SHA-256 differs): the file is truncated, "
            "damaged or from another save; re-save the adapter"
        )
    try:
        return load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise BeamError(f"{weights_path} cannot be read as safetensors ({e}); re-save the adapter") from e


def head_tensor_shapes(config: BeamConfig, num_experts: int, hidden_size: int) -> dict[str, tuple[int, ...]]:
    """The tensors of one mask head under `config`, by name, with their shapes."""
    shapes: dict[str, tuple[int, ...]] = {"weight": (num_experts, hidden_size)}
    if config.bias:
        shapes["bias"] = (num_experts,)
    if config.head == "router":
        shapes |= {"router_scale": (1,), "router_offset": (1,)}
    return shapes


def load_beam(model: nn.Module, path: str | Path) -> nn.Module:
    """Attach the adapter in folder `path` to `model` (replacing any attached one); returns `model`.

    Everything is checked first (files, config, base identity, tensor names and shapes): on any
    problem a BeamError is raised and the model is left as it was.
    """
    path = Path(path)
    document = read_adapter_config(path)
    config: BeamConfig = document["config"]
    curve = _curve_of(document, str(path / CONFIG_FILE))
    tensors = _read_weights(path, document)

    current = get_attachment(model) if is_attached(model) else None
    family = family_for(model)
    base = current.base if current is not None else base_identity(model, family)
    mismatch = identity_mismatch(document["base"], base)
    if mismatch:
        raise BeamError(f"the adapter at {path} was trained for another base model: {mismatch}")

    blocks = [name for name, _ in select_blocks(model, family, config.layers)]
    expected = {
        f"{name}.beam_mask.{key}": shape
        for name in blocks
        for key, shape in head_tensor_shapes(config, base["num_experts"], base["hidden_size"]).items()
    }
    if set(tensors) != set(expected):
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise BeamError(
            f"{path / WEIGHTS_FILE} does not hold the expected mask heads "
            f"(missing: {missing[:3]}{'...' if len(missing) > 3 else ''}; "
            f"unexpected: {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})"
        )
    for name, shape in expected.items():
        tensor = tensors[name]
        if tuple(tensor.shape) != shape:
            raise BeamError(f"{name} has shape {tuple(tensor.shape)}, expected {shape}")
        if not tensor.dtype.is_floating_point or not bool(torch.isfinite(tensor.float()).all()):
            raise BeamError(
                f"{name} in {path / WEIGHTS_FILE} is not a usable mask head ({tensor.dtype}"
                f"{', with NaN or infinite values' if tensor.dtype.is_floating_point else ''}); "
                "the file is damaged: re-save or retrain the adapter"
            )

    if current is not None:
        detach(model)
    attach(model, config)
    attachment = get_attachment(model)
    attachment.base = base
    attachment.threshold_curve = curve
    with torch.no_grad():
        for layer in attachment.layers:
            for key, param in layer.head.named_parameters():
                param.copy_(tensors[f"{layer.name}.beam_mask.{key}"])
    return model
