"""save_beam / load_beam: bit-exact round trips, and refusals that leave the model untouched."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from beam_moe import BeamConfig, BeamError, attach, beam_stats, get_attachment, load_beam, save_beam
from beam_moe.adapter import CONFIG_FILE, WEIGHTS_FILE, read_adapter_config
from beam_moe.tiny_models import tiny_model
from helpers.batches import token_batch
from helpers.masking import randomize_heads


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(model, state):
    now = model.state_dict()
    assert list(now) == list(state)
    assert all(torch.equal(now[k], state[k]) for k in state)


@pytest.fixture
def trained(tmp_path):
    model = attach(tiny_model("qwen3_moe"), BeamConfig(threshold=0.45))
    randomize_heads(model, seed=11)
    save_beam(model, tmp_path / "adapter")
    return model, tmp_path / "adapter"


def test_files_and_contents(trained):
    _model, path = trained
    assert sorted(p.name for p in path.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    document = json.loads((path / CONFIG_FILE).read_text())
    assert document["config"]["threshold"] == 0.45
    assert document["base"]["model_type"] == "qwen3_moe"
    assert document["base"]["moe_blocks"] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert (path / WEIGHTS_FILE).stat().st_size < 10_000, "only the mask heads are stored"
    assert (path / WEIGHTS_FILE).read_bytes()[:8] != b"PK\x03\x04", "no zip/pickle"


def test_round_trip_is_bit_exact_for_every_family(family, tmp_path):
    model = attach(tiny_model(family), BeamConfig(bias=True))
    randomize_heads(model, seed=5)
    save_beam(model, tmp_path / "a")
    fresh = tiny_model(family)
    load_beam(fresh, tmp_path / "a")
    assert get_attachment(fresh).config == get_attachment(model).config
    original, loaded = model.state_dict(), fresh.state_dict()
    assert list(loaded) == list(original)
    assert all(torch.equal(loaded[k], original[k]) for k in original)
    tokens = token_batch()
    with torch.no_grad(), beam_stats(model) as s1, beam_stats(fresh) as s2:
        assert torch.equal(model(tokens).logits, fresh(tokens).logits)
    assert s1.kept_pairs == s2.kept_pairs


def test_bf16_base_accepts_adapter_trained_on_fp32_base(trained):
    _, path = trained
    load_beam(tiny_model("qwen3_moe", dtype=torch.bfloat16), path)


def test_load_replaces_an_attached_adapter(trained):
    _model, path = trained
    other = attach(tiny_model("qwen3_moe"))
    load_beam(other, path)
    assert get_attachment(other).config.threshold == 0.45


def test_wrong_base_is_refused_and_model_unchanged(trained):
    _, path = trained
    other = attach(tiny_model("qwen3_moe", seed=1))
    state = snapshot(other)
    with pytest.raises(
        BeamError, match="trained for another base model: the router weights of model.layers.0.mlp"
    ):
        load_beam(other, path)
    assert_same_state(other, state)

    for model, message in [
        (tiny_model("mixtral"), "model_type is 'mixtral' in this model but 'qwen3_moe'"),
        (tiny_model("qwen3_moe", num_experts=16), "num_experts is 16 in this model but 8"),
        (tiny_model("qwen3_moe", num_hidden_layers=3), "the MoE blocks differ"),
    ]:
        state = snapshot(model)
        with pytest.raises(BeamError, match=message):
            load_beam(model, path)
        assert_same_state(model, state)
        assert not hasattr(model, "_beam_attachment")


@pytest.mark.parametrize("cut", [0.0, 0.5, 0.99])
def test_truncated_weights_are_refused(trained, cut):
    _, path = trained
    data = (path / WEIGHTS_FILE).read_bytes()
    (path / WEIGHTS_FILE).write_bytes(data[: int(len(data) * cut)])
    model = tiny_model("qwen3_moe")
    state = snapshot(model)
    with pytest.raises(BeamError, match="truncated, damaged"):
        load_beam(model, path)
    assert_same_state(model, state)


def test_damaged_weights_with_matching_hash_are_refused(trained):
    _, path = trained
    (path / WEIGHTS_FILE).write_bytes(b"not safetensors at all")
    document = json.loads((path / CONFIG_FILE).read_text())
    import hashlib

    document["weights"]["sha256"] = hashlib.sha256(b"not safetensors at all").hexdigest()
    (path / CONFIG_FILE).write_text(json.dumps(document))
    with pytest.raises(BeamError, match="cannot be read as safetensors"):
        load_beam(tiny_model("qwen3_moe"), path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"format": "beam-moe-adapter", ', "not valid JSON"),
        ("[1, 2]", "not a beam-moe adapter config"),
        ('{"format": "beam-moe-adapter", "format_version": 99}', "format version 99"),
        ('{"format": "beam-moe-adapter", "format_version": 1, "config": {}}', "no 'base' section"),
    ],
)
def test_bad_config_json_is_refused(trained, text, message):
    _, path = trained
    (path / CONFIG_FILE).write_text(text)
    model = tiny_model("qwen3_moe")
    state = snapshot(model)
    with pytest.raises(BeamError, match=message):
        load_beam(model, path)
    assert_same_state(model, state)


def test_invalid_config_values_are_refused(trained):
    _, path = trained
    document = json.loads((path / CONFIG_FILE).read_text())
    document["config"]["threshold"] = 2.0
    (path / CONFIG_FILE).write_text(json.dumps(document))
    with pytest.raises(BeamError, match="threshold must lie strictly between 0 and 1"):
        read_adapter_config(path)


def test_missing_folder_or_files(tmp_path):
    with pytest.raises(BeamError, match="not a folder"):
        load_beam(tiny_model("qwen3_moe"), tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BeamError, match="beam_config.json is missing"):
        load_beam(tiny_model("qwen3_moe"), tmp_path / "empty")


def test_saving_keeps_other_files_and_replaces_the_adapter(trained):
    model, path = trained
    (path / "training_args.json").write_text("{}")
    (path / "checkpoints").mkdir()
    (path / "checkpoints" / "step-1.txt").write_text("x")
    randomize_heads(model, seed=99)
    save_beam(model, path)
    assert (path / "training_args.json").read_text() == "{}"
    assert (path / "checkpoints" / "step-1.txt").read_text() == "x"
    fresh = load_beam(tiny_model("qwen3_moe"), path)
    assert torch.equal(fresh.model.layers[0].mlp.beam_mask.weight, model.model.layers[0].mlp.beam_mask.weight)
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")], "no staging folders left behind"


def test_a_crash_during_save_leaves_the_old_adapter(trained, tmp_path):
    """A process killed in the middle of save_beam: the folder still holds the complete old adapter."""
    _model, path = trained
    before = (path / WEIGHTS_FILE).read_bytes()
    script = textwrap.dedent(
        f"""
        import os, safetensors.torch as st
        from beam_moe import attach, save_beam
        from beam_moe.tiny_models import tiny_model
        real = st.save_file
        def dying_save(tensors, filename, metadata=None):
            real(tensors, filename, metadata=metadata)
            with open(filename, "r+b") as f:
                f.truncate(100)
            os._exit(3)
        import beam_moe.adapter as c
        c.save_file = dying_save
        save_beam(attach(tiny_model("qwen3_moe")), {str(path)!r})
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 3, result.stderr
    assert (path / WEIGHTS_FILE).read_bytes() == before
    load_beam(tiny_model("qwen3_moe"), path)
