"""Checkpoints that a crash cannot leave half written, and that resume a run exactly.

`<output>/checkpoints/step-00000100/` holds:
- `trainable.safetensors`: the trainable parameters only (frozen weights come from the base model);
- `optimizer.safetensors` + `optimizer.json`: the optimizer state (AdamW moments keyed by
  parameter name, param groups), stored without pickle by beam_moe.statefile;
- `state.json`: step, scheduler, beta controller, tokens seen; the data position is the step
  itself (see data.BatchSchedule);
- `rng.json`: every process's torch RNG state, as lists of byte values.

The folder appears in one atomic rename (beam_moe.atomic), so any `step-*` folder is complete.
State dicts are gathered to full tensors with torch.distributed.checkpoint's helpers, which work
the same for one process, DDP and FSDP.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from beam_moe.atomic import atomic_directory
from beam_moe.errors import BeamError
from beam_moe.statefile import load_state, save_state

CHECKPOINTS = "checkpoints"
_STEP = re.compile(r"^step-(\d+)$")
_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
_SCATTER = StateDictOptions(full_state_dict=True, strict=False)
_NAMES = StateDictOptions(ignore_frozen_params=True)


def checkpoint_dirs(output: str | Path) -> list[Path]:
    """Complete checkpoints of the run in `output`, oldest first."""
    root = Path(output) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def run_of_checkpoint(path: str | Path) -> Path | None:
    """The run folder of the training checkpoint `path` (`RUN/checkpoints/step-N`), or None if it is not one."""
    path = Path(path)
    if _STEP.match(path.name) and path.parent.name == CHECKPOINTS and (path / "state.json").is_file():
        return path.parent.parent
    return None


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (gathered) tensors of the trainable parameters, on the CPU. Collective under DDP/FSDP."""
    return {k: v.detach().contiguous() for k, v in get_model_state_dict(model, options=_GATHER).items()}


@dataclass
class Checkpointer:
    """Saves and restores training state for the run in `output`; `is_main` writes the files."""

    output: Path
    is_main: bool
    keep: int = 2

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        state: dict[str, Any],
        rng_states: list[torch.Tensor],
    ) -> Path:
        """Write checkpoint `step` (call on every process: gathering is collective)."""
        params = trainable_state(model)
        optim = get_optimizer_state_dict(model, optimizer, options=_GATHER)
        path = self.output / CHECKPOINTS / f"step-{step:08d}"
        if self.is_main:
            with atomic_directory(path) as staging:
                save_file(params, staging / "trainable.safetensors")
                save_state(staging, "optimizer", optim)
                (staging / "rng.json").write_text(json.dumps([s.tolist() for s in rng_states]) + "\n")
                (staging / "state.json").write_text(json.dumps({"step": step, **state}, indent=2) + "\n")
            for old in checkpoint_dirs(self.output)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        return path

    def latest(self) -> Path | None:
        found = checkpoint_dirs(self.output)
        return found[-1] if found else None

    def load(
        self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """Restore parameters and optimizer from `path`; returns (state.json contents, RNG states)."""
        try:
            params = load_file(path / "trainable.safetensors")
            optim = load_state(path, "optimizer")
            rng_states = [
                torch.tensor(s, dtype=torch.uint8) for s in json.loads((path / "rng.json").read_text())
            ]
            state = json.loads((path / "state.json").read_text())
        except (OSError, ValueError, TypeError, RuntimeError, SafetensorError, BeamError) as e:
            raise BeamError(
                f"cannot read the checkpoint {path} ({e}); delete it to resume from an older one"
            ) from e
        expected = set(get_model_state_dict(model, options=_NAMES))
        if set(params) != expected:
            raise BeamError(
                f"the checkpoint {path} holds other trainable parameters than this run "
                f"(was it written with another --train mode?): {sorted(set(params) ^ expected)[:3]}"
            )
        set_model_state_dict(model, params, options=_SCATTER)
        set_optimizer_state_dict(model, optimizer, optim, options=_SCATTER)
        return state, rng_states
