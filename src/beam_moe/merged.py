"""Merged BEAM checkpoints: one folder that transformers (through beam-moe) and vLLM (through the plugin) load.

A merged folder is the base model's folder (weights, tokenizer, generation config: copied file by
file, hard-linked where possible) plus the adapter (`beam_config.json`, `beam_adapter.safetensors`)
and a `config.json` that names BEAM model classes:

    "architectures": ["BeamQwen3MoeForCausalLM"],
    "beam": {...BeamConfig...},            # what runs; serve-time overrides replace keys here
    "beam_export": {"config": {...}, ...}  # the adapter's config as exported, and where masks sit

`beam_export["threshold_curve"]` is the adapter's calibrated threshold -> Avg-K curve, when it has
one (`beam-moe calibrate`): vLLM and `beam_budget` read per-request budgets in experts through it.

The mask tensors keep their adapter names (`model.layers.{i}.mlp.beam_mask.weight`); when the base
is sharded they are added to the safetensors index so that loaders which follow the index see them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from beam_moe.adapter import (
    CONFIG_FILE,
    CURVE_KEY,
    WEIGHTS_FILE,
    adapter_state_dict,
    load_beam,
    read_adapter_config,
    read_threshold_curve,
    write_threshold_curve,
)
from beam_moe.atomic import atomic_directory, atomic_write_text
from beam_moe.config import BeamConfig
from beam_moe.errors import BeamError
from beam_moe.outputs import check_output_folder
from beam_moe.threshold_curve import ThresholdCurve
from beam_moe.version import __version__

FORMAT = "beam-moe-merged"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 2: the router-aware head; a version 1 export has the paper's linear head
ARCHITECTURE_PREFIX = "Beam"
INDEX_FILE = "model.safetensors.index.json"
MASK_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\..*beam_mask\.(weight|bias|router_scale|router_offset)$")
# Serve-time overrides may change how the mask is applied, not which tensors exist.
RUNTIME_KEYS = ("threshold", "renormalize", "backend")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
_SKIPPED_BASE_FILES = {"config.json", CONFIG_FILE, WEIGHTS_FILE}


def beam_architecture(architecture: str) -> str:
    """The BEAM model class name for a base architecture: Qwen3MoeForCausalLM -> BeamQwen3MoeForCausalLM."""
    return f"{ARCHITECTURE_PREFIX}{architecture}"


def mask_layer_index(name: str) -> int:
    """The decoder layer index a mask tensor belongs to (`model.layers.7.mlp.beam_mask.weight` -> 7)."""
    match = MASK_KEY.search(name)
    if match is None:
        raise BeamError(
            f"{name!r} is not a mask head tensor name (expected '...layers.<i>....beam_mask.weight')"
        )
    return int(match.group(1))


def _resolve_base_folder(name_or_path: str) -> Path:
    from beam_moe.base_models import model_source

    name, is_local = model_source(name_or_path, "the base model")
    if is_local:
        return Path(name)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, local_files_only=os.environ.get("HF_HUB_OFFLINE") == "1"))
    except Exception as e:
        raise BeamError(
            f"the base model {name_or_path!r} is neither a local folder nor reachable on the Hub ({e}); "
            "pass --model with a local model folder"
        ) from e


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link shares the base file's mode; a copy is a new file and gets the umask's."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def is_merged_checkpoint(folder: Path) -> bool:
    """Whether `folder` holds what `export_merged` writes (a config.json with a beam_export section)."""
    try:
        return "beam_export" in json.loads((folder / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def export_merged(
    adapter: str | Path, output: str | Path, model: str | Path | None = None, overwrite: bool = False
) -> Path:
    """Write the merged checkpoint of `adapter` (on its base, or on `model`) to the folder `output`.

    The adapter is first loaded onto the base (`load_beam`, so a wrong base is refused); the folder
    appears in one step when everything is written. An earlier merged checkpoint in `output` is
    replaced only with `overwrite` (`beam_moe.outputs`).
    """
    from transformers import AutoModelForCausalLM

    adapter, output = Path(adapter), Path(output)
    document = read_adapter_config(adapter)
    base_name = str(model or document["base"].get("name_or_path") or "")
    if not base_name:
        raise BeamError(f"the adapter at {adapter} does not name its base model; pass --model")
    check_output_folder(output, overwrite=overwrite, ours=is_merged_checkpoint, what="a merged checkpoint")
    base_folder = _resolve_base_folder(base_name)
    if not any((base_folder / name).is_file() for name in TOKENIZER_FILES):
        raise BeamError(
            f"{base_folder} has no tokenizer ({' or '.join(TOKENIZER_FILES)}); vLLM needs one: "
            "add the tokenizer files to the base folder or pass --model with a folder that has them"
        )

    try:
        base_model = AutoModelForCausalLM.from_pretrained(base_folder, dtype="auto", local_files_only=True)
    except (OSError, ValueError) as e:
        raise BeamError(f"could not load the base model from {base_folder}: {e}") from e
    load_beam(base_model, adapter)  # refuses an adapter trained for another base
    curve = read_threshold_curve(document)
    layers = sorted({mask_layer_index(name) for name in adapter_state_dict(base_model)})
    base_config = json.loads((base_folder / "config.json").read_text())
    architectures = base_config.get("architectures") or [type(base_model).__name__]
    del base_model

    with atomic_directory(output, replace=True) as staging:
        for entry in sorted(base_folder.iterdir()):
            if entry.is_file() and entry.name not in _SKIPPED_BASE_FILES and not entry.name.startswith("."):
                _link_or_copy(entry, staging / entry.name)
        shutil.copyfile(adapter / CONFIG_FILE, staging / CONFIG_FILE)
        shutil.copyfile(adapter / WEIGHTS_FILE, staging / WEIGHTS_FILE)
        if (base_folder / INDEX_FILE).is_file():
            _add_masks_to_index(staging / INDEX_FILE, staging / WEIGHTS_FILE)
        config = dict(base_config)
        config["architectures"] = [beam_architecture(a) for a in architectures]
        config["beam"] = document["config"].to_dict()
        config["beam_export"] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "beam_moe_version": __version__,
            "config": document["config"].to_dict(),
            "base_architectures": list(architectures),
            "base_name_or_path": base_name,
            "mask_layers": layers,
            "mask_file": WEIGHTS_FILE,
        }
        if curve is not None:
            config["beam_export"][CURVE_KEY] = curve.to_dict()
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return output


def write_merged_threshold_curve(folder: str | Path, curve: ThresholdCurve) -> Path:
    """Store `curve` in the merged checkpoint `folder`: config.json's beam_export (what vLLM and
    `from_pretrained` read) and the copied beam_config.json, each file rewritten atomically.

    beam_config.json is written first, so a crash between the two leaves the served config as
    it was, never a served curve the adapter copy lacks.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    text = config_path.read_text(encoding="utf-8")
    read_merged_config(json.loads(text), str(config_path))  # checks a copy: it fills in old defaults
    config = json.loads(text)
    write_threshold_curve(folder, curve)
    config["beam_export"][CURVE_KEY] = curve.to_dict()
    atomic_write_text(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def _add_masks_to_index(index_path: Path, weights_path: Path) -> None:
    """Point the index at the adapter file for the mask tensors (a fresh file, never the base's inode)."""
    from safetensors import safe_open

    index = json.loads(index_path.read_text())
    with safe_open(weights_path, framework="pt") as f:
        names = list(f.keys())
    index.setdefault("weight_map", {}).update({name: weights_path.name for name in names})
    index_path.unlink()
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def read_merged_config(config: dict[str, Any] | Any, source: str = "config.json") -> dict[str, Any]:
    """The `beam_export` section of a merged checkpoint's config (a dict or a transformers config)."""
    data = config if isinstance(config, dict) else config.to_dict()
    export = data.get("beam_export")
    if not isinstance(export, dict) or export.get("format") != FORMAT:
        raise BeamError(
            f"{source} is not a merged BEAM checkpoint (no beam_export section); "
            "create one with `beam-moe export ADAPTER --output DIR`"
        )
    if export.get("format_version") not in READABLE_VERSIONS:
        raise BeamError(
            f"{source} has merged format version {export.get('format_version')!r}; "
            f"this beam-moe ({__version__}) reads versions {', '.join(map(str, READABLE_VERSIONS))}"
        )
    if export["format_version"] == 1 and isinstance(export.get("config"), dict):
        export["config"].setdefault("head", "linear")
    layers = export.get("mask_layers")
    if not isinstance(layers, list) or not all(isinstance(i, int) for i in layers):
        raise BeamError(f"{source}: beam_export.mask_layers must be a list of layer indices")
    if not isinstance(export.get("config"), dict):
        raise BeamError(f"{source}: beam_export.config must be the exported BEAM config (an object)")
    architectures = export.get("base_architectures")
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise BeamError(f"{source}: beam_export.base_architectures must be a list of class names")
    return export


def effective_beam_config(
    config: dict[str, Any] | Any, overrides: dict[str, Any] | None = None, source: str = "config.json"
) -> BeamConfig:
    """The BeamConfig to run: the exported one, updated by the `beam` section and then by `overrides`.

    Serve-time changes (vLLM's `hf_overrides={"beam": {"threshold": 0.6}}` replaces the whole
    `beam` section) may only touch threshold, renormalize and backend; the rest is fixed by the
    mask tensors in the checkpoint.
    """
    data = config if isinstance(config, dict) else config.to_dict()
    export = read_merged_config(data, source)
    beam = data.get("beam") or {}
    if not isinstance(beam, dict):
        raise BeamError(f"{source}: the beam section must be an object, got {type(beam).__name__}")
    if overrides is not None and not isinstance(overrides, dict):
        raise BeamError(
            f'BEAM overrides must be an object such as {{"threshold": 0.6}}, got {type(overrides).__name__}'
        )
    changes = {**beam, **(overrides or {})}
    exported = BeamConfig.from_dict(export["config"]).to_dict()
    unknown = sorted(set(changes) - set(exported))
    if unknown:
        raise BeamError(
            f"{source}: unknown BEAM settings {unknown}; the ones that can change at serve time are "
            f"{', '.join(RUNTIME_KEYS)}"
        )
    fixed = sorted(k for k, v in changes.items() if k not in RUNTIME_KEYS and exported.get(k, v) != v)
    if fixed:
        raise BeamError(
            f"{source}: {', '.join(fixed)} cannot change after export (only {', '.join(RUNTIME_KEYS)} can); "
            "train or export another adapter instead"
        )
    try:
        return BeamConfig.from_dict({**exported, **{k: v for k, v in changes.items() if k in RUNTIME_KEYS}})
    except BeamError as e:
        raise BeamError(f"{source}: {e}") from e


@cache
def _quiet_class(base_class: type) -> type:
    """`base_class` with the mask tensors ignored while the base weights load (attach adds them next)."""
    return type(base_class.__name__, (base_class,), {"_keys_to_ignore_on_load_unexpected": [r"beam_mask"]})


def from_pretrained(
    path: str | Path,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    **beam_overrides: Any,
) -> nn.Module:
    """A merged BEAM checkpoint as a transformers model with its mask heads attached.

    The same as loading the base and `load_beam(model, adapter)`; `beam_overrides` (threshold,
    renormalize, backend) change how the mask is applied, as vLLM's `hf_overrides` do. The curve
    in `beam_export` (the one vLLM reads) is the one `beam_budget(model, avg_k=...)` uses.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from beam_moe.attach import get_attachment
    from beam_moe.base_models import parse_dtype

    path = Path(path)
    if not (path / "config.json").is_file():
        raise BeamError(f"{path} is not a model folder (no config.json)")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    beam_config = effective_beam_config(config, beam_overrides, source=str(path / "config.json"))
    base_class = AutoModelForCausalLM._model_mapping[type(config)]
    config.architectures = list(read_merged_config(config)["base_architectures"])
    model = _quiet_class(base_class).from_pretrained(path, config=config, dtype=parse_dtype(dtype))
    load_beam(model.to(device).eval(), path)
    attachment = get_attachment(model)
    for key in RUNTIME_KEYS:
        setattr(attachment.config, key, getattr(beam_config, key))
    curve = read_threshold_curve(path)
    if curve is not None:
        attachment.threshold_curve = curve
    return model
