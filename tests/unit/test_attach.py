"""attach/detach on every supported family: the invariants README.md states under Supported models."""

import copy

import pytest
import torch
from torch import nn

from beam_moe import (
    BeamConfig,
    BeamError,
    attach,
    beam_stats,
    detach,
    get_attachment,
    last_avg_k,
    mask_regularizer,
)
from beam_moe.tiny_models import tiny_config, tiny_model
from helpers.batches import token_batch
from helpers.masking import masked_reference, randomize_heads


def heads_of(model):
    return {layer.name: layer.head.weight.detach().clone() for layer in get_attachment(model).layers}


@pytest.mark.parametrize("head_kind, extra", [("router", ("router_scale", "router_offset")), ("linear", ())])
def test_every_block_gets_a_mask_head(family, head_kind, extra):
    model = attach(tiny_model(family), BeamConfig(head=head_kind))
    layers = get_attachment(model).layers
    assert len(layers) == 2
    for layer in layers:
        head = layer.block.beam_mask
        assert isinstance(head, nn.Linear)
        assert head.bias is None
        assert head.weight.shape == (layer.num_experts, layer.hidden_size)
        assert torch.count_nonzero(head.weight) == 0
        assert head.router_aware == (head_kind == "router")
    names = [n for n, _ in model.named_parameters() if "beam_mask" in n]
    assert names == [f"{layer.name}.beam_mask.{key}" for layer in layers for key in ("weight", *extra)]


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_fresh_adapter_reproduces_base_logits(family, mode):
    model = tiny_model(family)
    model.train(mode == "train")
    tokens = token_batch()
    with torch.no_grad():
        torch.manual_seed(0)  # some routers sample in training mode (Phi-MoE's SparseMixer, jitter)
        base = model(tokens).logits
        attach(model)
        torch.manual_seed(0)
        out = model(tokens).logits
    assert (out - base).abs().max() <= 1e-6


@pytest.mark.parametrize("implementation", ["grouped_mm", "eager"])
def test_random_masks_equal_base_computation_with_masked_weights(family, implementation):
    """Reference: the family's own transformers experts, called with weights g * keep and ids unchanged."""
    reference = tiny_model(family)
    reference.set_experts_implementation(implementation)
    model = attach(copy.deepcopy(reference))
    randomize_heads(model, seed=1)
    handles = masked_reference(reference, heads_of(model))
    tokens = token_batch(seed=5)
    with torch.no_grad(), beam_stats(model) as stats:
        out = model(tokens).logits
        expected = reference(tokens).logits
    for handle in handles:
        handle.remove()
    assert 0.2 < stats.kept_fraction < 0.8, "the random heads should mask a good share of the pairs"
    assert (out - expected).abs().max() <= 1e-5


def test_eval_computes_only_kept_pairs_and_training_computes_all(family):
    model = attach(tiny_model(family))
    randomize_heads(model, seed=2)
    tokens = token_batch(seed=1)
    with torch.no_grad(), beam_stats(model) as stats:
        model(tokens)
    assert stats.computed_rows == stats.kept_pairs < stats.routed_pairs
    model.train()
    with torch.no_grad(), beam_stats(model) as train_stats:
        model(tokens)
    assert train_stats.computed_rows == train_stats.routed_pairs
    if family != "phimoe":  # Phi-MoE's router samples its Top-K in training mode
        assert train_stats.kept_pairs == stats.kept_pairs


def test_everything_masked_runs_no_expert_at_all(family):
    model = attach(tiny_model(family), BeamConfig(head="linear", bias=True))
    with torch.no_grad():
        for layer in get_attachment(model).layers:
            layer.head.bias.fill_(-1.0)  # z = -1 everywhere: sigmoid(z) < 0.5, every slot masked
    with torch.no_grad(), beam_stats(model) as stats:
        logits = model(token_batch()).logits
    assert stats.kept_pairs == 0
    assert stats.computed_rows == 0
    assert stats.avg_k == 0.0
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("backend", ["reference", "grouped", "triton"])
def test_task_loss_gradient_reaches_every_mask_head(family, backend, monkeypatch):
    """The task loss alone (no regulariser) trains every head, through the router hook and the
    backend's expert computation, with the gradient of an independent straight-through reference."""
    if backend == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # triton runs here; with a gradient it runs grouped
    reference = tiny_model(family).train()
    model = attach(copy.deepcopy(reference), BeamConfig(backend=backend)).train()
    randomize_heads(model, seed=3, std=0.5)
    heads = {name: w.clone().requires_grad_() for name, w in heads_of(model).items()}
    handles = masked_reference(reference, heads)
    tokens = token_batch(seed=2)
    torch.manual_seed(0)  # Phi-MoE samples its routing in training mode
    model(tokens, labels=tokens).loss.backward()
    torch.manual_seed(0)
    reference(tokens, labels=tokens).loss.backward()
    for handle in handles:
        handle.remove()
    assert 0 < last_avg_k(model) < get_attachment(model).layers[0].top_k, "some slots masked, some kept"
    for layer in get_attachment(model).layers:
        grad, expected = layer.head.weight.grad, heads[layer.name].grad
        assert expected.abs().sum() > 0
        assert (grad - expected).abs().max() <= 1e-4 * expected.abs().max(), layer.name


def test_regularizer_is_mean_sigmoid_over_real_tokens_slots_and_layers():
    model = attach(tiny_model("qwen3_moe"))
    randomize_heads(model, seed=4, std=0.5)
    at_ids = get_attachment(model).family.router_outputs[2]
    seen = {}
    handles = [
        layer.router.register_forward_hook(
            lambda module, args, output, name=layer.name: seen.update({name: (args[0], output[at_ids])})
        )
        for layer in get_attachment(model).layers
    ]
    tokens = token_batch(batch=2, length=12)
    attention = torch.ones_like(tokens)
    attention[1, 5:] = 0  # the second sequence is mostly padding
    model.train()
    model(input_ids=tokens, attention_mask=attention)
    for handle in handles:
        handle.remove()
    real = attention.reshape(-1).bool()
    soft = {
        layer.name: torch.sigmoid((x.reshape(-1, x.shape[-1]) @ layer.head.weight.T).gather(1, ids)).detach()
        for layer in get_attachment(model).layers
        for x, ids in [seen[layer.name]]
    }
    expected = sum(s[real].mean().item() for s in soft.values()) / len(soft)
    every_row = sum(s.mean().item() for s in soft.values()) / len(soft)
    assert abs(expected - every_row) > 1e-3, (
        "the padding must change the average for this test to mean anything"
    )
    assert mask_regularizer(model, attention).item() == pytest.approx(expected, rel=1e-6)
    assert mask_regularizer(model).item() == pytest.approx(every_row, rel=1e-6)
    with pytest.raises(BeamError, match="token mask has 12 tokens"):
        mask_regularizer(model, attention[:1])
    model.eval()
    model(token_batch())
    with pytest.raises(BeamError, match="no training forward pass"):
        mask_regularizer(model)


def test_detach_restores_the_base_model_exactly(family):
    model = tiny_model(family)
    tokens = token_batch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        base = model(tokens).logits
    attach(model)
    randomize_heads(model, seed=4)
    detach(model)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, base)
    assert not any(hook for m in model.modules() for hook in m._forward_hooks.values())
    attach(model)  # and it can be attached again


def test_attach_twice_is_refused():
    model = attach(tiny_model("qwen3_moe"))
    with pytest.raises(BeamError, match="already has BEAM mask heads"):
        attach(model)


def test_unsupported_model_names_the_supported_families():
    from transformers import AutoConfig, AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(
            "llama",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=64,
        )
    )
    with pytest.raises(
        BeamError, match="does not support model type 'llama'.*qwen3_moe, qwen2_moe, deepseek_v2"
    ):
        attach(dense)


def test_model_without_moe_layers_is_refused():
    from transformers import AutoModelForCausalLM

    config = tiny_config("qwen3_moe", mlp_only_layers=[0, 1])
    with pytest.raises(BeamError, match="found no MoE blocks"):
        attach(AutoModelForCausalLM.from_config(config))


def test_layer_selection():
    model = attach(tiny_model("qwen3_moe"), BeamConfig(layers=[1]))
    layers = get_attachment(model).layers
    assert [layer.name for layer in layers] == ["model.layers.1.mlp"]
    assert not hasattr(model.model.layers[0].mlp, "beam_mask")
    with pytest.raises(BeamError, match="layers \\[5\\] do not exist"):
        attach(tiny_model("qwen3_moe"), BeamConfig(layers=[5]))


def test_renormalize_option_rescales_kept_weights():
    """What the experts receive: the kept Top-K weights rescaled to the Top-K sum, masked ones 0."""
    model = attach(tiny_model("mixtral"), BeamConfig(renormalize=True))
    randomize_heads(model, seed=7)
    layer = get_attachment(model).layers[0]
    received = []
    handle = layer.experts.register_forward_pre_hook(lambda module, args: received.append(args[2]))
    with torch.no_grad(), beam_stats(model, record=True) as stats:
        model(token_batch())
    handle.remove()
    record = stats.records[0][0]
    partial = record.keep.any(dim=-1) & ~record.keep.all(dim=-1)
    assert partial.sum() > 0, "some tokens keep one of their two experts"
    kept = torch.where(record.keep, record.weights, 0.0)
    total = kept.sum(dim=-1, keepdim=True)
    # Mixtral renormalises its Top-K weights to 1; BEAM rescales the kept ones back to that sum.
    expected = torch.where(total > 0, kept * record.weights.sum(-1, keepdim=True) / total, 0.0)
    assert torch.allclose(received[0], expected, atol=1e-6)
    assert torch.allclose(received[0][partial].sum(-1), torch.ones(int(partial.sum())), atol=1e-6)


def test_bf16_model_runs_and_counts():
    model = attach(tiny_model("qwen2_moe", dtype=torch.bfloat16))
    randomize_heads(model, seed=1)
    with torch.no_grad(), beam_stats(model) as stats:
        logits = model(token_batch()).logits
    assert logits.dtype == torch.bfloat16
    assert torch.isfinite(logits).all()
    assert stats.computed_rows == stats.kept_pairs
    assert model.model.layers[0].mlp.beam_mask.weight.dtype == torch.float32


def test_generate_works_with_masks():
    model = attach(tiny_model("qwen3_moe"))
    randomize_heads(model, seed=1)
    with beam_stats(model) as stats:
        out = model.generate(token_batch(batch=1, length=5), max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 11)
    assert stats.tokens == 5 + 5


def test_routing_policy_replaces_the_heads_and_skips_the_same_compute(family):
    from beam_moe import set_routing_policy

    model = attach(tiny_model(family))
    reference = tiny_model(family)

    def first_slot_only(hidden, logits, weights, ids):
        keep = torch.zeros_like(ids, dtype=torch.bool)
        keep[:, 0] = True
        return keep

    set_routing_policy(model, first_slot_only)
    tokens = token_batch(seed=3)
    with torch.no_grad(), beam_stats(model) as stats:
        out = model(tokens).logits
    assert stats.avg_k == 1.0
    assert stats.computed_rows == stats.kept_pairs == stats.tokens * len(stats.per_layer)

    def drop_second(module, args, output):
        at_weights = get_attachment(reference).family.router_outputs[1]
        masked = list(output)
        masked[at_weights] = output[at_weights].clone()
        masked[at_weights][:, 1:] = 0
        return tuple(masked)

    handles = [
        layer.router.register_forward_hook(drop_second) for layer in get_attachment(attach(reference)).layers
    ]
    set_routing_policy(reference, lambda h, lg, w, ids: torch.ones_like(ids, dtype=torch.bool))
    with torch.no_grad():
        expected = reference(tokens).logits
    for handle in handles:
        handle.remove()
    assert (out - expected).abs().max() <= 1e-5

    set_routing_policy(model, None)
    with torch.no_grad(), beam_stats(model) as stats:
        model(tokens)
    assert stats.avg_k == 2.0
