"""The Avg-K budget: the controller's dynamics, threshold calibration, and convergence on the reference MoE."""

import json
import math

import pytest
import torch

from beam_moe import BeamConfig, BeamError, attach, get_attachment
from beam_moe.tiny_models import tiny_model
from beam_moe.train.budget import (
    BETA_RANGE,
    INTEGRATION_CLIP,
    BudgetController,
    FixedBeta,
    bisect_knob,
    calibrate_threshold,
    initial_beta,
    measure_avg_k,
)
from helpers.batches import token_batch
from helpers.masking import randomize_heads


def test_beta_grows_by_the_same_factor_for_the_same_relative_miss_at_any_target():
    """Log-space on the relative error: 10% over target 6 and 10% over target 0.5 move beta alike."""
    high, low = BudgetController(6.0, 8, beta_init=1.0), BudgetController(0.5, 8, beta_init=1.0)
    for _ in range(30):
        high.update(6.6)
        low.update(0.55)
    assert high.beta == pytest.approx(low.beta, rel=1e-9)
    assert high.beta > 1.0


def test_beta_stays_positive_and_recovers_without_windup():
    controller = BudgetController(1.0, 8, kp=1.0, ki=0.1, smoothing=0.0, beta_init=1.0)
    for _ in range(2000):  # far above target for a long time: the integral must not run away
        controller.update(8.0)
    assert controller.beta == pytest.approx(BETA_RANGE[1])
    recovery = 0
    while controller.beta >= 1.0 and recovery < 200:  # then far below: beta must come down at once
        controller.update(0.0)
        recovery += 1
    # bounded by the clamp (the integral falls by ki x 1/2 per step from log beta_max), not by the
    # 2000 saturated steps before
    bound = math.log(BETA_RANGE[1]) / (controller.ki * INTEGRATION_CLIP) + 5
    assert recovery <= bound, (recovery, bound)
    for _ in range(2000):
        controller.update(0.0)
    assert controller.beta == pytest.approx(BETA_RANGE[0]) and controller.beta > 0


def test_the_smoothed_avg_k_damps_a_single_noisy_batch():
    smooth = BudgetController(2.0, 8, smoothing=0.9, beta_init=1.0)
    raw = BudgetController(2.0, 8, smoothing=0.0, beta_init=1.0)
    for c in (smooth, raw):
        c.update(2.0)
        c.update(4.0)  # one outlier batch
    assert abs(math.log(smooth.beta)) < 0.2 * abs(math.log(raw.beta))


def test_freeze_holds_beta_and_state_round_trips():
    controller = BudgetController(2.0, 8)
    for value in (5.0, 4.0, 3.0):
        controller.update(value)
    other = BudgetController(2.0, 8)
    other.load_state_dict(json.loads(json.dumps(controller.state_dict())))
    assert other.update(2.5) == controller.update(2.5)
    controller.freeze()
    frozen = controller.beta
    for value in (8.0, 0.1):
        assert controller.update(value) == frozen
    assert FixedBeta(0.1).update(3.0) == 0.1


def test_initial_beta_and_bad_gains():
    assert initial_beta(2.0, 8) == 1.0
    assert BudgetController(2.0, 8).beta == pytest.approx(1.0)
    with pytest.raises(BeamError, match="gains"):
        BudgetController(2.0, 8, smoothing=1.0)
    with pytest.raises(BeamError, match="out of range"):
        BudgetController(9.0, 8)


def test_bisect_knob_finds_a_monotone_target():
    value, reached = bisect_knob(lambda x: 8 * (1 - x), 0.0, 1.0, 3.0, increasing=False)
    assert reached == pytest.approx(3.0, abs=0.02) and value == pytest.approx(5 / 8, abs=0.01)


def test_calibrate_threshold_lands_on_the_target():
    model = attach(tiny_model("qwen3_moe", num_experts=8, num_experts_per_tok=4), BeamConfig())
    randomize_heads(model, seed=0, std=0.5)
    batches = [
        {"input_ids": (ids := token_batch(seed=s, length=24)), "attention_mask": torch.ones_like(ids)}
        for s in range(2)
    ]
    before = measure_avg_k(model, batches)
    threshold = calibrate_threshold(model, batches, 1.5)
    assert get_attachment(model).config.threshold == threshold != 0.5
    after = measure_avg_k(model, batches)
    assert abs(after - 1.5) <= 0.05 < abs(before - 1.5), (before, after)


@pytest.mark.parametrize("head, target", [("linear", 3.0), ("router", 2.0)])
def test_controller_reaches_the_target_on_the_reference_moe(tmp_path, head, target):
    """A short run on the pretrained reference MoE (experts that matter), without the final
    calibration: the controller alone must hold the training Avg-K within 10% of the target."""
    from beam_moe.experiments.refmoe.corpus import corpus_is_ready, default_data_dir
    from beam_moe.experiments.refmoe.experiment import write_training_text
    from beam_moe.refmoe import reference_model_path
    from beam_moe.train import train

    if not corpus_is_ready(default_data_dir()):
        pytest.skip("the corpus has not been prepared (scripts/setup.sh prepares it)")
    data = tmp_path / "text.jsonl"
    steps = 50
    write_training_text(data, steps * 4 * 64, seed=0)
    result = train(
        model=str(reference_model_path()),
        data=[str(data)],
        output=str(tmp_path / "out"),
        target_avg_k=target,
        objective="distill",
        beam={"head": head},
        max_steps=steps,
        batch_size=4,
        max_length=64,
        val_fraction=0.0,
        save_every=0,
        calibrate=False,
        calibration_tokens=2048,
        progress=False,
        tensorboard=False,
    )
    records = [json.loads(line) for line in (result.output / "metrics.jsonl").read_text().splitlines()]
    training = [r for r in records if "split" not in r]
    late = [r["avg_k"] for r in training[-15:]]
    assert abs(sum(late) / len(late) - target) <= 0.10 * target, late
    assert all(r["beta"] > 0 for r in training)
    settle_start = steps - round(0.25 * steps)
    assert len({r["beta"] for r in training[settle_start:]}) == 1, "beta is frozen in the settle phase"
