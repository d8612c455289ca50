"""Objectives (lm, distill from the original model with masks off) and the Avg-K budget controller."""

import pytest
import torch

from beam_moe import BeamError, attach, get_attachment
from beam_moe.attach import disable_masks, set_routing_policy
from beam_moe.base_models import load_base_model
from beam_moe.tiny_models import tiny_model
from beam_moe.train import TrainConfig, Trainer
from beam_moe.train.budget import BudgetController, FixedBeta
from beam_moe.train.objectives import Objective, Teacher, deterministic_routing
from helpers.batches import token_batch
from helpers.masking import randomize_heads
from helpers.training import model_dir, write_text_jsonl


def batch():
    ids = token_batch(batch=2, length=10)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def test_distill_teacher_is_the_unmasked_model_with_the_same_weights():
    model = attach(tiny_model("qwen3_moe"))
    randomize_heads(model, seed=2, std=0.5)
    base = tiny_model("qwen3_moe")
    model.train()
    teacher = Teacher.original(model, model, "mask").logits(batch())
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


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher")
    model_dir(path / "model")
    write_text_jsonl(path / "text.jsonl", n=40)
    return path


def changed(trainer, mode, base):
    """The trained weights that the teacher must not see, and whether they moved away from the base."""
    trained = dict(trainer.model.named_parameters())
    if mode == "lora":
        return [n for n, p in trained.items() if "lora_B" in n and p.abs().sum() > 0]
    reference = dict(base.named_parameters())
    names = [n for n in reference if mode == "full" or ".gate." in n]
    return [n for n in names if not torch.equal(trained[n], reference[n])]


@pytest.mark.parametrize("mode", ["mask", "mask+router", "lora", "full"])
def test_distill_teacher_is_the_original_model_whatever_trains(teacher_dir, mode):
    trainer = Trainer(
        TrainConfig(
            model=str(teacher_dir / "model"),
            data=[str(teacher_dir / "text.jsonl")],
            output=str(teacher_dir / mode),
            train=mode,
            objective="lm+distill",
            beta=0.0,
            model_lr=1e-2,
            max_steps=3,
            batch_size=4,
            max_length=32,
            val_fraction=0.0,
            progress=False,
            tensorboard=False,
        )
    )
    trainer.run()
    base = load_base_model(teacher_dir / "model")
    if mode != "mask":
        assert changed(trainer, mode, base), "the steps changed the weights the teacher must not use"
    tokens = batch()
    with torch.no_grad():
        expected = base(input_ids=tokens["input_ids"]).logits
        with disable_masks(trainer.model):
            current = trainer.model.eval()(input_ids=tokens["input_ids"]).logits
    got = trainer.teacher.logits(tokens)
    assert (got - expected).abs().max() <= 1e-5
    if mode != "mask":
        assert (current - expected).abs().max() > 1e-3, "the trained weights with masks off are another model"


@pytest.mark.parametrize("family", ["mixtral", "phimoe"])
def test_distillation_student_routes_without_noise(family):
    """Mixtral jitters its router input and Phi-MoE samples its Top-K in training mode; the teacher does neither."""
    model = attach(tiny_model(family, router_jitter_noise=0.5, input_jitter_noise=0.5))
    model.train()
    tokens = batch()
    teacher = Teacher.original(model, model, "mask").logits(tokens)
    torch.manual_seed(0)
    with torch.no_grad():
        noisy = model(input_ids=tokens["input_ids"]).logits
        with deterministic_routing(model):
            student = model(input_ids=tokens["input_ids"]).logits
        assert (noisy - teacher).abs().max() > 1e-3, "training-mode routing is noisy"
    assert (student - teacher).abs().max() <= 1e-5
    layer = get_attachment(model).layers[0]
    assert layer.router.training and layer.block.training, "training mode is restored"
    assert getattr(layer.block, "jitter_noise", None) or getattr(layer.block, "input_jitter_noise", None)


def test_distilling_a_fresh_adapter_costs_nothing_when_training_routing_is_noisy(teacher_dir):
    """The loop runs the student with deterministic routing: at keep-all it is exactly its teacher."""
    model_dir(teacher_dir / "phimoe", "phimoe", router_jitter_noise=0.5, input_jitter_noise=0.5)
    steps = []
    Trainer(
        TrainConfig(
            model=str(teacher_dir / "phimoe"),
            data=[str(teacher_dir / "text.jsonl")],
            output=str(teacher_dir / "phimoe-run"),
            objective="distill",
            beta=0.0,
            max_steps=1,
            batch_size=4,
            max_length=32,
            val_fraction=0.0,
            progress=False,
            tensorboard=False,
        ),
        on_step=steps.append,
    ).run()
    assert steps[0]["avg_k"] == 2.0
    assert steps[0]["kl"] <= 1e-7, steps[0]


def test_kl_is_zero_for_a_fresh_adapter():
    model = attach(tiny_model("qwen3_moe")).train()
    teacher = Teacher.original(model, model, "mask").logits(batch())
    logits = model(input_ids=batch()["input_ids"]).logits
    assert Objective("distill").sums(logits, teacher, batch()["labels"])["kl"].abs() < 1e-4


def test_disable_masks_restores_the_heads_even_on_error():
    model = attach(tiny_model("qwen3_moe"))
    with pytest.raises(RuntimeError), disable_masks(model):
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


def test_disable_masks_brings_back_the_policy_set_before():
    """A baseline policy set before the block routes again after it (not the heads)."""

    def drop_last(hidden, logits, weights, ids):
        keep = torch.ones_like(ids, dtype=torch.bool)
        keep[:, -1] = False
        return keep

    model = attach(tiny_model("qwen3_moe"))
    ids = batch()["input_ids"]
    with torch.no_grad():
        base = model(input_ids=ids).logits
        set_routing_policy(model, drop_last)
        dropped = model(input_ids=ids).logits
        with disable_masks(model):
            inside = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert not torch.allclose(dropped, base)
    torch.testing.assert_close(inside, base)
    torch.testing.assert_close(after, dropped)
