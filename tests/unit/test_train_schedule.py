"""One learning-rate schedule (train/schedule.py) for pretraining and mask training, each giving
exactly the values of the formula it had before the two were merged."""

import math

import pytest
import torch

from beam_moe.experiments.refmoe.pretrain import PretrainArgs, learning_rate
from beam_moe.train.config import TrainConfig
from beam_moe.train.schedule import WarmupCosine


def old_pretraining_lr(step, args):
    """refmoe/pretrain.py's formula before the merge."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * cosine)


def old_mask_factor(step, total, warmup, decay_start, min_ratio):
    """train/loop.py's `warmup_hold_cosine` before the merge."""
    decay_start = max(decay_start, warmup)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if step < decay_start:
        return 1.0
    progress = (step - decay_start) / max(1, total - decay_start)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


@pytest.mark.parametrize(
    "args",
    [
        PretrainArgs(),
        PretrainArgs(steps=100, warmup=10, lr=1e-3, min_lr_ratio=0.1),
        PretrainArgs(steps=7, warmup=1, lr=3e-3, min_lr_ratio=0.0),
        PretrainArgs(steps=5, warmup=8, lr=2e-3, min_lr_ratio=0.5),
    ],
)
def test_pretraining_learning_rates_are_unchanged(args):
    for step in range(args.steps + 3):
        assert learning_rate(step, args) == old_pretraining_lr(step, args), step


@pytest.mark.parametrize(
    ("steps", "warmup", "settle", "min_lr_ratio"),
    [
        (1000, 0.03, 0.25, 0.1),
        (8, 0.03, 0.25, 0.1),
        (50, 5, 0.0, 0.0),
        (40, 0.5, 0.75, 0.3),
        (3, 10, 0.5, 1.0),
    ],
)
def test_mask_training_learning_rates_are_unchanged(steps, warmup, settle, min_lr_ratio):
    config = TrainConfig(
        model="m", data=["d"], output="o", beta=0.1, warmup=warmup, settle=settle, min_lr_ratio=min_lr_ratio
    )
    warmup_steps, decay_start = config.warmup_steps(steps), config.settle_start(steps)
    schedule = WarmupCosine(
        steps, warmup_steps, min_lr_ratio, decay_start=decay_start, warmup_reaches_peak=False
    )
    for step in range(steps + 3):
        expected = old_mask_factor(step, steps, warmup_steps, decay_start, min_lr_ratio)
        assert schedule(step) == expected, step
    # Through torch's LambdaLR, as the loop uses it: the peak times the factor, step by step.
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    for step in range(steps):
        assert optimizer.param_groups[0]["lr"] == config.lr * old_mask_factor(
            step, steps, warmup_steps, decay_start, min_lr_ratio
        )
        optimizer.step()
        scheduler.step()
