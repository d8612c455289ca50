"""The output folder of a training run, and rebuilding the trained model from it (or from a checkpoint).

A finished run is a BEAM adapter (`beam_config.json` + `beam_adapter.safetensors`, written last,
so a folder without them is never mistaken for a finished run) plus:
- `training_args.json` (the TrainConfig), `metrics.jsonl`, `checkpoints/`, `tensorboard/`;
- `--train mask+router`: `trained_routers.safetensors` (the routers as trained);
- `--train lora`: `lora/` (a PEFT adapter for the base model);
- `--train full`: `model/` (a complete transformers model folder with the tokenizer).

The adapter's `extra` records how it was trained and where the weights it needs live:
`{"base_model": ..., "train": ..., "model_weights": {"kind": "routers"|"lora"|"full", "path": ...}}`
(paths relative to the folder). `beam_moe.loading.load_beam_model(folder)` rebuilds from that.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from beam_moe.adapter import CONFIG_FILE, save_beam
from beam_moe.atomic import atomic_directory, atomic_write_text, publish_mode
from beam_moe.attach import get_attachment
from beam_moe.errors import BeamError
from beam_moe.identity import router_fingerprint
from beam_moe.mask import MaskHead
from beam_moe.outputs import check_output_folder
from beam_moe.train.checkpointing import checkpoint_dirs
from beam_moe.train.config import TrainConfig

TRAINING_ARGS = "training_args.json"
ROUTERS_FILE = "trained_routers.safetensors"
LORA_DIR = "lora"
MODEL_DIR = "model"
WEIGHT_KINDS = {
    "mask+router": ("routers", ROUTERS_FILE),
    "lora": ("lora", LORA_DIR),
    "full": ("full", MODEL_DIR),
}


def is_training_output(path: Path) -> bool:
    """A run's folder: a finished one (a BEAM adapter) or one that recorded its options."""
    return (path / CONFIG_FILE).is_file() or (path / TRAINING_ARGS).is_file()


def check_output(config: TrainConfig) -> Path:
    """Refuse an output folder this run must not touch (`beam_moe.outputs`); writes nothing."""
    path = Path(config.output)
    if path.exists() and not path.is_dir():
        raise BeamError(f"--output {path} exists and is not a folder")
    finished = (path / CONFIG_FILE).is_file()
    ours = is_training_output(path)
    if config.resume:
        if finished:
            raise BeamError(f"{path} already holds a finished run (it has {CONFIG_FILE}); nothing to resume")
        if not (path / TRAINING_ARGS).is_file() or not checkpoint_dirs(path):
            raise BeamError(
                f"nothing to resume in {path}: no {TRAINING_ARGS} or no checkpoints/step-* folder"
            )
        try:
            saved = json.loads((path / TRAINING_ARGS).read_text())
        except json.JSONDecodeError as e:
            raise BeamError(f"{path / TRAINING_ARGS} is not valid JSON ({e.msg}); cannot resume") from e
        differences = config.resume_mismatch(saved)
        if differences:
            raise BeamError(
                f"--resume must repeat the options of the run in {path}; these differ: {'; '.join(differences)}"
            )
        return path
    if ours and not finished and not config.overwrite:
        raise BeamError(
            f"{path} holds an unfinished run; pass --resume to continue it or --overwrite to start over"
        )
    check_output_folder(
        path, overwrite=config.overwrite, ours=is_training_output, what="a beam-moe training run"
    )
    return path


def start_output(config: TrainConfig, path: Path) -> None:
    """Create the folder (replacing an old run with --overwrite, keeping its mode) and record the options."""
    if config.resume:
        return
    mode = publish_mode(path, folder=True)
    if config.overwrite and path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(mode)
    atomic_write_text(path / TRAINING_ARGS, json.dumps(config.to_dict(), indent=2) + "\n")


@contextmanager
def _plain_heads(model: nn.Module, state: dict[str, torch.Tensor]) -> Iterator[None]:
    """Swap in CPU mask heads holding the gathered values (the live ones may be sharded)."""
    layers = get_attachment(model).layers
    originals = [layer.head for layer in layers]
    try:
        for layer, original in zip(layers, originals, strict=True):
            head = MaskHead(
                layer.hidden_size,
                layer.num_experts,
                bias=original.bias is not None,
                router_aware=original.router_aware,
            )
            with torch.no_grad():
                for key, param in head.named_parameters():
                    param.copy_(state[f"{layer.name}.beam_mask.{key}"])
            layer.head = head
        yield
    finally:
        for layer, original in zip(layers, originals, strict=True):
            layer.head = original


def _trained_identity(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The base identity of the model as trained (router fingerprints change when routers train)."""
    attachment = get_attachment(model)
    identity = dict(attachment.base)
    router = attachment.family.router_attr
    names = [f"{layer.name}.{router}.weight" for layer in attachment.layers]
    if all(name in state for name in names):
        identity["router_fingerprint"] = [router_fingerprint(state[name]) for name in names]
    return identity


def write_result(
    path: Path,
    model: nn.Module,
    config: TrainConfig,
    trained: dict[str, torch.Tensor],
    full_state: dict[str, torch.Tensor] | None,
    tokenizer: Any,
    peft_model: Any,
    extra: dict[str, Any],
) -> None:
    """Write the trained weights the mode needs, then the BEAM adapter (last: it marks the run finished)."""
    kind = WEIGHT_KINDS.get(config.train)
    if kind is not None:
        extra = {**extra, "model_weights": {"kind": kind[0], "path": kind[1]}}
    if config.train == "mask+router":
        attachment = get_attachment(model)
        names = {
            f"{layer.name}.{attachment.family.router_attr}.{name}"
            for layer in attachment.layers
            for name, _ in layer.router.named_parameters()
        }
        routers = {k: v for k, v in trained.items() if k in names}
        staging = path / f".{ROUTERS_FILE}.tmp"
        save_file(routers, staging)
        staging.chmod(publish_mode(path / ROUTERS_FILE, folder=False))  # safetensors writes it private
        staging.replace(path / ROUTERS_FILE)
    elif config.train == "lora":
        with atomic_directory(path / LORA_DIR) as staging:
            peft_state = {f"base_model.model.{k}": v for k, v in trained.items() if ".beam_mask." not in k}
            peft_model.save_pretrained(staging, state_dict=peft_state)
    elif config.train == "full":
        assert full_state is not None
        with atomic_directory(path / MODEL_DIR) as staging:
            weights = {k: v for k, v in full_state.items() if ".beam_mask." not in k}
            model.save_pretrained(staging, state_dict=weights)
            tokenizer.save_pretrained(staging)
    attachment = get_attachment(model)
    base = attachment.base
    attachment.base = _trained_identity(model, trained)
    try:
        with _plain_heads(model, trained):
            save_beam(model, path, extra=extra)
    finally:
        attachment.base = base


def read_run_config(run: Path) -> TrainConfig:
    """The TrainConfig of the run in folder `run`, from its training_args.json."""
    try:
        return TrainConfig.from_dict(json.loads((run / TRAINING_ARGS).read_text()))
    except FileNotFoundError:
        raise BeamError(
            f"{run} has no {TRAINING_ARGS}: it is not the folder of a beam-moe train run"
        ) from None
    except (json.JSONDecodeError, TypeError, BeamError) as e:
        raise BeamError(f"{run / TRAINING_ARGS} cannot be read as training options ({e})") from e
