"""The committed reference MoE: present in a checkout, the documented architecture and size, and real quality."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from beam_moe import attach, beam_stats
from beam_moe.refmoe import (
    PACKAGED_MODEL_DIR,
    load_reference_model,
    load_reference_tokenizer,
    reference_model_path,
    training_record,
)
from beam_moe.refmoe.architecture import REFERENCE_SHAPE, parameter_counts

MODEL_FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "training.json"]


def test_model_files_are_committed_and_not_ignored():
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    for name in MODEL_FILES:
        path = (PACKAGED_MODEL_DIR / name).relative_to(root)
        assert (PACKAGED_MODEL_DIR / name).is_file(), f"{path} is missing"
        ignored = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=root)
        assert ignored.returncode == 1, f"{path} is git-ignored"
    pyproject = (root / "pyproject.toml").read_text()
    assert '"refmoe/model/*"' in pyproject  # shipped as package data in wheels too


def test_architecture_and_size_are_as_documented():
    model = load_reference_model()
    config = model.config
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    for key, value in REFERENCE_SHAPE.items():
        assert getattr(config, key) == value, key
    assert config.norm_topk_prob and config.mlp_only_layers == [] and config.decoder_sparse_step == 1
    assert not hasattr(model.model.layers[0].mlp, "shared_expert")
    assert sum(p.numel() for p in model.parameters()) == parameter_counts(config)["total"]
    weights = reference_model_path() / "model.safetensors"
    assert weights.stat().st_size <= 25 * 2**20
    with safe_open(weights, "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118


def test_training_record_describes_the_run():
    record = training_record()
    # The record is history: the model was pretrained before the module moved to experiments/.
    assert record["command"][:2] == ["python", "-m"]
    assert record["command"][2].endswith("refmoe.pretrain")
    assert isinstance(record["seed"], int)
    assert record["data"]["train"]["wiki"]["tokens"] > 0
    assert 1 < record["heldout_perplexity"]["all"] < 1000


def test_tokenizer_round_trips_and_has_a_chat_template():
    tokenizer = load_reference_tokenizer()
    text = "To be, or not to be: that is the question. — ½ 日本"
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n"


def test_recorded_perplexity_is_reproduced_and_beam_attaches():
    """The committed weights give the perplexity recorded at training time (needs the prepared corpus)."""
    from beam_moe.experiments.refmoe.corpus import corpus_is_ready, default_data_dir, read_split
    from beam_moe.experiments.refmoe.pretrain import (
        END_OF_TEXT,
        first_blocks,
        heldout_blocks,
        heldout_perplexity,
    )

    if not corpus_is_ready(default_data_dir()):
        pytest.skip("the corpus has not been prepared (scripts/setup.sh prepares it)")
    check = training_record()["check"]
    model, tokenizer = load_reference_model(), load_reference_tokenizer()
    blocks = heldout_blocks(
        read_split("heldout"), tokenizer, tokenizer.convert_tokens_to_ids(END_OF_TEXT), check["seq_len"]
    )
    blocks = first_blocks(blocks, check["blocks_per_source"])
    perplexity = heldout_perplexity(model, blocks)["all"]["perplexity"]
    assert perplexity == pytest.approx(check["perplexity"], rel=1e-3)

    attach(model)
    with beam_stats(model) as stats:
        assert heldout_perplexity(model, blocks)["all"]["perplexity"] == pytest.approx(perplexity, rel=1e-5)
    assert stats.avg_k == model.config.num_experts_per_tok


def test_generation_config_and_json_files_parse():
    for name in ("config.json", "tokenizer_config.json", "training.json"):
        json.loads((reference_model_path() / name).read_text())
    model = load_reference_model()
    ids = load_reference_tokenizer()("The King James Bible", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5
