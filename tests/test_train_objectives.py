"""Objectives (lm, distill from the same model with masks off) and the Avg-K budget controller."""

import pytest
import torch

from beam_moe import BeamError, attach, get_attachment
from beam_moe.tiny_models import tiny_model
from beam_moe.train.budget import BudgetController, FixedBeta
from beam_moe.train.objectives import Objective, masks_off
from conftest import token_batch
from masking import randomize_heads


def batch():
    ids = token_batch(batch=2, length=10)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def test_distill_teacher_is_the_unmasked_model_with_the_same_weights():
    model = attach(tiny_model("qwen3_moe"))
    randomize_heads(model, seed=2, std=0.5)
    base = tiny_model("qwen3_moe")
    model.train()
    teacher = Objective("distill").teacher_logits(model, model, batch())
    assert not teacher.requires_grad
    with torch.no_grad():
        assert torch.allclose(teacher, base(input_ids=batch()["input_ids"]).logits, atol=1e-5)
    assert model.training, "the train/eval mode is restored"
    assert all(layer.policy is None for layer in get_attachment(model).layers), "the masks are back on"

    logits = model(input_ids=batch()["input_ids"]).logits
    sums = Objective("lm+distill", distill_weight=0.5).sums(logits, teacher, batch()["labels"])
    assert sums["kl"] > 0
    assert torch.allclose(sums["task"], sums["lm"] + 0.5 * sums["kl"])
    sums["task"].backward()
    assert get_attachment(model).layers[0].head.weight.grad.abs().sum() > 0


def test_kl_is_zero_for_a_fresh_adapter():
    model = attach(tiny_model("qwen3_moe")).train()
    teacher = Objective("distill").teacher_logits(model, model, batch())
    logits = model(input_ids=batch()["input_ids"]).logits
    assert Objective("distill").sums(logits, teacher, batch()["labels"])["kl"].abs() < 1e-4


def test_masks_off_restores_the_heads_even_on_error():
    model = attach(tiny_model("qwen3_moe"))
    with pytest.raises(RuntimeError), masks_off(model):
        assert get_attachment(model).layers[0].policy is not None
        raise RuntimeError
    assert get_attachment(model).layers[0].policy is None


def test_controller_raises_beta_above_target_and_lowers_it_below():
    controller = BudgetController(target=1.0, top_k=4)
    assert controller.beta > 0, "a fresh adapter keeps all K experts: above any target"
    start = controller.update(3.0)
    for _ in range(20):
        controller.update(3.0)
    assert controller.beta > start, "a lasting excess keeps raising beta"
    high = controller.beta
    for _ in range(200):
        controller.update(0.5)
    assert controller.beta < high
    state = controller.state_dict()
    other = BudgetController(target=1.0, top_k=4)
    other.load_state_dict(state)
    assert other.update(1.5) == controller.update(1.5)
    assert FixedBeta(0.1).update(3.0) == 0.1


@pytest.mark.parametrize("target", [0.0, -1.0, 4.5, float("nan")])
def test_out_of_range_targets_are_refused(target):
    with pytest.raises(BeamError, match="out of range"):
        BudgetController(target=target, top_k=4)
