"""Checkpoints that a crash cannot leave half written, and that resume a run exactly.

Every piece of training state is an object with `state_dict()` / `load_state_dict()` (as in
torchtitan): the trainable parameters (`ModelState`), the optimizer (`OptimizerState`), the
run's position (`TrainState`: step and tokens seen; the data position is the step itself, see
data.BatchSchedule), every process's RNG (`RNGState`), the learning-rate scheduler and the beta
controller. `<output>/checkpoints/step-00000100/` holds:
- `trainable.safetensors`: the "model" state, the trainable parameters only (frozen weights come
  from the base model; `beam-moe eval` reads this file);
- `optimizer.safetensors` + `optimizer.json`: the "optimizer" state (AdamW moments keyed by
  parameter name, param groups), stored without pickle by beam_moe.statefile;
- `state.json`: every other state, under its name.

The folder appears in one atomic rename (beam_moe.atomic), so any `step-*` folder is complete.
State dicts are gathered to full tensors with torch.distributed.checkpoint's helpers, which work
the same for one process, DDP and FSDP.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from beam_moe.atomic import atomic_directory
from beam_moe.errors import BeamError
from beam_moe.statefile import load_state, save_state

CHECKPOINTS = "checkpoints"
MODEL_FILE = "trainable.safetensors"
OPTIMIZER_STATE = "optimizer"  # optimizer.safetensors + optimizer.json
STATE_FILE = "state.json"
_STEP = re.compile(r"^step-(\d+)$")


def _dcp():
    """torch's distributed state-dict API, imported when state is gathered or scattered (it costs
    over a second, which reading a run's folder should not pay)."""
    from torch.distributed.checkpoint import state_dict

    return state_dict


def _options(**kwargs: bool):
    return _dcp().StateDictOptions(**kwargs)


_GATHER = {"full_state_dict": True, "cpu_offload": True, "ignore_frozen_params": True}
_SCATTER = {"full_state_dict": True, "strict": False}
_NAMES = {"ignore_frozen_params": True}


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
    if _STEP.match(path.name) and path.parent.name == CHECKPOINTS and (path / STATE_FILE).is_file():
        return path.parent.parent
    return None


def checkpoint_step(path: str | Path) -> int | None:
    """The step of the training checkpoint `path`, read from its state.json (None if unreadable)."""
    try:
        return int(json.loads((Path(path) / STATE_FILE).read_text())["train"]["step"])
    except (OSError, ValueError, TypeError, KeyError):
        return None


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (gathered) tensors of the trainable parameters, on the CPU. Collective under DDP/FSDP."""
    return {
        k: v.detach().contiguous()
        for k, v in _dcp().get_model_state_dict(model, options=_options(**_GATHER)).items()
    }


class Stateful(Protocol):
    """What a checkpoint saves and restores: anything with a state dict."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ModelState:
    """The trainable parameters of `model` (DDP/FSDP-wrapped or not), gathered to full tensors."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return trainable_state(self.model)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = set(_dcp().get_model_state_dict(self.model, options=_options(**_NAMES)))
        if set(state) != expected:
            raise BeamError(
                "holds other trainable parameters than this run (was it written with another "
                f"--train mode?): {sorted(set(state) ^ expected)[:3]}"
            )
        _dcp().set_model_state_dict(self.model, state, options=_options(**_SCATTER))


class OptimizerState:
    """The optimizer's state, keyed by parameter name so that it does not depend on the wrapping."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        return _dcp().get_optimizer_state_dict(self.model, self.optimizer, options=_options(**_GATHER))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _dcp().set_optimizer_state_dict(self.model, self.optimizer, state, options=_options(**_SCATTER))


@dataclass
class TrainState:
    """Where the run is: optimizer steps taken (also the data position: batches are dealt by step)
    and tokens seen."""

    step: int = 0
    tokens: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens = int(state["step"]), int(state["tokens"])


class RNGState:
    """Every process's torch RNG state, each as a hex string of its bytes.

    Saving gathers them from all processes with `gather` (collective); loading restores this
    process's own when the run has as many processes as when it was saved (otherwise the fresh
    seeding stands).
    """

    def __init__(
        self, rank: int = 0, world: int = 1, gather: Callable[[list[Any]], list[Any]] | None = None
    ) -> None:
        self.rank, self.world = rank, world
        self.gather = gather or (lambda local: local)

    def state_dict(self) -> dict[str, Any]:
        return {"torch": [bytes(state.tolist()).hex() for state in self.gather([torch.get_rng_state()])]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        states = state["torch"]
        if len(states) == self.world:
            torch.set_rng_state(torch.tensor(list(bytes.fromhex(states[self.rank])), dtype=torch.uint8))


@dataclass
class Checkpointer:
    """Saves and restores the training states of the run in `output`; `is_main` writes the files.

    `states` maps names to `Stateful` objects; "model" and "optimizer" hold tensors and get files
    of their own, every other state goes to state.json under its name.
    """

    output: Path
    is_main: bool
    keep: int = 2

    def save(self, step: int, states: Mapping[str, Stateful]) -> Path:
        """Write checkpoint `step` (call on every process: gathering is collective)."""
        snapshot = {name: state.state_dict() for name, state in states.items()}
        path = self.output / CHECKPOINTS / f"step-{step:08d}"
        if self.is_main:
            with atomic_directory(path) as staging:
                save_file(snapshot.pop("model"), staging / MODEL_FILE)
                save_state(staging, OPTIMIZER_STATE, snapshot.pop("optimizer"))
                (staging / STATE_FILE).write_text(json.dumps(snapshot, indent=2) + "\n")
            for old in checkpoint_dirs(self.output)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        return path

    def latest(self) -> Path | None:
        found = checkpoint_dirs(self.output)
        return found[-1] if found else None

    def load(self, path: Path, states: Mapping[str, Stateful]) -> None:
        """Restore every state in `states` from checkpoint `path`."""
        try:
            saved = json.loads((path / STATE_FILE).read_text())
            saved["model"] = load_file(path / MODEL_FILE)
            saved["optimizer"] = load_state(path, OPTIMIZER_STATE)
            missing = sorted(set(states) - set(saved))
            if missing:
                raise KeyError(f"no {', '.join(missing)} state")
        except (OSError, ValueError, TypeError, KeyError, RuntimeError, SafetensorError, BeamError) as e:
            raise BeamError(
                f"cannot read the checkpoint {path} ({e}); delete it to resume from an older one"
            ) from e
        for name, state in states.items():
            try:
                state.load_state_dict(saved[name])
            except BeamError as e:
                raise BeamError(f"the checkpoint {path} {e}") from e
