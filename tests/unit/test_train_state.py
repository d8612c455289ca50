"""The training loop's named pieces: metrics summed on the device under their names and read in one
copy (train/metrics.py), and checkpoints of named `state_dict()` objects (train/checkpointing.py)."""

import json

import torch
from torch import nn

from beam_moe.train.budget import BudgetController
from beam_moe.train.checkpointing import (
    Checkpointer,
    ModelState,
    OptimizerState,
    RNGState,
    TrainState,
    checkpoint_dirs,
    checkpoint_step,
    run_of_checkpoint,
)
from beam_moe.train.metrics import DeviceSums
from beam_moe.train.schedule import WarmupCosine


def test_device_sums_come_back_by_name_after_one_reduction():
    sums = DeviceSums("cpu", loss=None, tokens=None, kept=3)
    sums.add(loss=torch.tensor(1.5), tokens=torch.tensor(4), kept=torch.tensor([1.0, 2.0, 3.0]))
    sums.add(0.5, loss=torch.tensor(3.0), kept=torch.tensor([2.0, 2.0, 2.0]))
    seen = []

    def reduce(flat):
        seen.append(flat.clone())
        return flat * 2  # as if two processes had the same sums

    totals = sums.totals(reduce, grad_norm=torch.tensor(0.25))
    assert [t.tolist() for t in seen] == [[3.0, 4.0, 2.0, 3.0, 4.0]], "one reduction over every sum"
    assert totals == {"loss": 6.0, "tokens": 8.0, "kept": [4.0, 6.0, 8.0], "grad_norm": 0.25}


def parts(seed=0):
    """A small model with a frozen layer, AdamW after two steps, and the loop's other states."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(10, 2, 0.1, decay_start=6, warmup_reaches_peak=False)
    )
    budget = BudgetController(2.0, 4)
    return model, optimizer, scheduler, budget


def states(model, optimizer, scheduler, budget, position):
    return {
        "model": ModelState(model),
        "optimizer": OptimizerState(model, optimizer),
        "train": position,
        "scheduler": scheduler,
        "budget": budget,
        "rng": RNGState(),
    }


def test_a_checkpoint_restores_every_named_state(tmp_path):
    model, optimizer, scheduler, budget = parts()
    for _ in range(2):
        model(torch.randn(3, 4)).sum().backward()
        optimizer.step()
        scheduler.step()
        budget.update(3.0)
    checkpointer = Checkpointer(tmp_path, is_main=True, keep=1)
    checkpointer.save(1, states(model, optimizer, scheduler, budget, TrainState(1, 48)))
    path = checkpointer.save(2, states(model, optimizer, scheduler, budget, TrainState(2, 96)))
    expected_random = torch.rand(5)
    assert checkpoint_dirs(tmp_path) == [path] and run_of_checkpoint(path) == tmp_path
    saved = json.loads((path / "state.json").read_text())
    assert set(saved) == {"train", "scheduler", "budget", "rng"} and checkpoint_step(path) == 2
    assert sorted(p.name for p in path.iterdir()) == [
        "optimizer.json",
        "optimizer.safetensors",
        "state.json",
        "trainable.safetensors",
    ]

    fresh_model, fresh_optimizer, fresh_scheduler, fresh_budget = parts(seed=1)
    position = TrainState()
    torch.manual_seed(123)
    checkpointer.load(path, states(fresh_model, fresh_optimizer, fresh_scheduler, fresh_budget, position))
    assert (position.step, position.tokens) == (2, 96)
    assert torch.equal(torch.rand(5), expected_random), "the RNG continues where it was saved"
    assert torch.equal(fresh_model[1].weight, model[1].weight)
    assert not torch.equal(fresh_model[0].weight, model[0].weight), "frozen weights are not saved"
    assert fresh_scheduler.state_dict() == scheduler.state_dict()
    assert fresh_budget.state_dict() == budget.state_dict()
    for mine, theirs in zip(fresh_optimizer.state.values(), optimizer.state.values(), strict=True):
        assert all(torch.equal(mine[k], theirs[k]) for k in ("exp_avg", "exp_avg_sq", "step"))
