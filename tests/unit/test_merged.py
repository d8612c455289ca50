"""`beam-moe export` and `beam_moe.from_pretrained`: merged checkpoints that transformers loads through beam-moe."""

import json

import pytest
import torch

from beam_moe import BeamConfig, BeamError, beam_stats, from_pretrained, get_attachment, load_beam
from beam_moe.base_models import load_base_model
from beam_moe.cli import main
from beam_moe.merged import effective_beam_config, mask_layer_index
from helpers.serving_models import PROMPTS, save_base, save_merged

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    root = tmp_path_factory.mktemp("merged")
    base = save_base("qwen3_moe", root / "base")
    merged = save_merged(base, root / "merged", trained=True, config=BeamConfig(threshold=0.55))
    return base, merged


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "deepseek_v3", "mixtral"])
def test_merged_model_equals_base_plus_adapter(family, tmp_path):
    base = save_base(family, tmp_path / "base")
    merged = save_merged(base, tmp_path / "merged", trained=True)
    reference = load_beam(load_base_model(base), tmp_path / "merged-adapter")
    loaded = from_pretrained(merged)
    tokens = torch.tensor([PROMPTS[1]])
    with torch.no_grad(), beam_stats(reference) as s1, beam_stats(loaded) as s2:
        assert torch.equal(reference(tokens).logits, loaded(tokens).logits)
    assert s1.kept_pairs == s2.kept_pairs < s1.routed_pairs, "the masks are active and identical"


def test_folder_layout_and_config(qwen3):
    base, merged = qwen3
    names = {p.name for p in merged.iterdir()}
    assert {"model.safetensors", "tokenizer.json", "beam_config.json", "beam_adapter.safetensors"} <= names
    assert (merged / "model.safetensors").read_bytes() == (base / "model.safetensors").read_bytes()
    config = json.loads((merged / "config.json").read_text())
    assert config["architectures"] == ["BeamQwen3MoeForCausalLM"]
    assert config["beam"]["threshold"] == 0.55
    assert config["beam_export"]["base_architectures"] == ["Qwen3MoeForCausalLM"]
    assert config["beam_export"]["mask_layers"] == [0, 1]
    assert config["model_type"] == "qwen3_moe", "transformers still reads it as the base family"


def test_threshold_override_at_load_time(qwen3):
    _, merged = qwen3
    model = from_pretrained(merged, threshold=0.7)
    assert get_attachment(model).config.threshold == 0.7
    tokens = torch.tensor([PROMPTS[0]])
    with torch.no_grad(), beam_stats(model) as high:
        model(tokens)
    default = from_pretrained(merged)
    with torch.no_grad(), beam_stats(default) as low:
        default(tokens)
    assert high.kept_pairs < low.kept_pairs


def test_sharded_base_gets_the_masks_in_its_index(tmp_path):
    base = save_base("qwen2_moe", tmp_path / "base", max_shard_size="200KB")
    assert (base / "model.safetensors.index.json").is_file()
    merged = save_merged(base, tmp_path / "merged", trained=True)
    index = json.loads((merged / "model.safetensors.index.json").read_text())["weight_map"]
    assert index["model.layers.0.mlp.beam_mask.weight"] == "beam_adapter.safetensors"
    assert json.loads((base / "model.safetensors.index.json").read_text()) != index, "base index untouched"
    reference = load_beam(load_base_model(base), tmp_path / "merged-adapter")
    tokens = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        assert torch.equal(reference(tokens).logits, from_pretrained(merged)(tokens).logits)


def test_cli_export(qwen3, tmp_path, capsys):
    base, merged = qwen3
    out = tmp_path / "via-cli"
    assert main(["export", str(merged.with_name("merged-adapter")), "--output", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["architectures"] == ["BeamQwen3MoeForCausalLM"]
    assert summary["base"] == str(base)
    assert (out / "config.json").read_text() == (merged / "config.json").read_text()


def test_cli_export_refuses_bad_input(qwen3, tmp_path, capsys):
    _base, merged = qwen3
    adapter = str(merged.with_name("merged-adapter"))
    assert main(["export", str(tmp_path / "missing"), "--output", str(tmp_path / "o")]) == 2
    assert "no BEAM adapter" in capsys.readouterr().err
    assert main(["export", adapter, "--output", str(merged)]) == 2
    assert "already holds a merged checkpoint; pass --overwrite" in capsys.readouterr().err
    other = save_base("qwen3_moe", tmp_path / "other", seed=1)
    assert main(["export", adapter, "--output", str(tmp_path / "o"), "--model", str(other)]) == 2
    assert "trained for another base model" in capsys.readouterr().err
    (other / "tokenizer.json").unlink()
    (other / "tokenizer_config.json").unlink()
    assert main(["export", adapter, "--output", str(tmp_path / "o"), "--model", str(other)]) == 2
    assert "tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "o").exists(), "nothing half-written"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no staging folders left"


def test_effective_config_rules(qwen3):
    _, merged = qwen3
    config = json.loads((merged / "config.json").read_text())
    assert effective_beam_config(config).threshold == 0.55
    config["beam"] = {"threshold": 0.6}  # what vLLM's hf_overrides={"beam": {...}} leaves
    effective = effective_beam_config(config)
    assert (effective.threshold, effective.layers) == (0.6, None)
    with pytest.raises(BeamError, match="layers cannot change after export"):
        effective_beam_config(config, {"layers": [0]})
    with pytest.raises(BeamError, match="threshold must lie strictly between 0 and 1"):
        effective_beam_config(config, {"threshold": 1.5})
    with pytest.raises(BeamError, match=r"unknown BEAM settings \['threshhold'\]"):
        effective_beam_config(config, {"threshhold": 0.6})
    with pytest.raises(BeamError, match="not a merged BEAM checkpoint"):
        effective_beam_config({"beam": {}})
    with pytest.raises(BeamError, match="not a merged BEAM checkpoint"):
        from_pretrained(merged.with_name("base"))


def test_mask_layer_index():
    assert mask_layer_index("model.layers.12.mlp.beam_mask.weight") == 12
    assert mask_layer_index("model.layers.3.block_sparse_moe.beam_mask.bias") == 3
    with pytest.raises(BeamError, match="not a mask head tensor name"):
        mask_layer_index("model.layers.3.mlp.gate.weight")
