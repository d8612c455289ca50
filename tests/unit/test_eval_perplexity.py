"""Perplexity with Avg-K: exact agreement with the base model, a hand check, and clear errors on bad text."""

import json
import math

import pytest
import torch

from beam_moe import BeamError, attach
from beam_moe.eval import DEFAULT_PPL_FILE, perplexity, read_texts
from beam_moe.eval.perplexity import token_windows
from beam_moe.tiny_models import BYTE_VOCAB_SIZE, byte_tokenizer, tiny_model
from helpers.masking import randomize_heads

TEXTS = [
    "The Bayeux Tapestry is an embroidered cloth nearly 70 metres long.",
    "Air conditioning removes heat from an enclosed space.",
]


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "deepseek_v3", "mixtral"])
def test_fresh_adapter_equals_the_base_model_exactly(family):
    model = tiny_model(family, vocab_size=BYTE_VOCAB_SIZE)
    tokenizer = byte_tokenizer()
    base = perplexity(model, tokenizer, DEFAULT_PPL_FILE, max_tokens=300, max_length=128)
    assert base.avg_k is None
    attach(model)
    fresh = perplexity(model, tokenizer, DEFAULT_PPL_FILE, max_tokens=300, max_length=128)
    assert fresh.ppl == base.ppl
    assert fresh.nll == base.nll
    assert fresh.avg_k == 2.0
    assert fresh.tokens == 300
    assert fresh.computed_rows == fresh.kept_pairs == 300 * 2 * 2


def test_matches_a_hand_computed_cross_entropy():
    model = tiny_model("qwen3_moe", vocab_size=BYTE_VOCAB_SIZE)
    tokenizer = byte_tokenizer()
    ids = [*tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    nll = -sum(float(log_probs[i, ids[i + 1]]) for i in range(len(ids) - 1)) / (len(ids) - 1)
    result = perplexity(model, tokenizer, TEXTS[:1], max_length=512)
    assert result.scored_tokens == len(ids) - 1
    assert result.ppl == pytest.approx(math.exp(nll), rel=1e-5)


def test_masks_are_counted_and_change_the_result():
    model = attach(tiny_model("qwen2_moe", vocab_size=BYTE_VOCAB_SIZE))
    tokenizer = byte_tokenizer()
    fresh = perplexity(model, tokenizer, TEXTS)
    randomize_heads(model, seed=0)
    masked = perplexity(model, tokenizer, TEXTS, batch_size=1)
    assert 0.3 < masked.avg_k < 1.7
    assert set(masked.per_layer) == {"model.layers.0.mlp", "model.layers.1.mlp"}
    assert masked.avg_k == pytest.approx(sum(masked.per_layer.values()) / 2)
    assert masked.computed_rows == masked.kept_pairs
    assert masked.ppl != fresh.ppl


def test_windows_cover_the_stream_without_padding():
    tokenizer = byte_tokenizer()
    windows = token_windows(tokenizer, TEXTS, max_length=16)
    stream = [t for w in windows for t in w]
    expected = []
    for text in TEXTS:
        expected += [*tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    assert stream == expected
    assert all(len(w) == 16 for w in windows[:-1])


def test_text_files(tmp_path):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two", "id": 2}) + "\n")
    assert read_texts(jsonl) == ["one", "two"]
    txt = tmp_path / "doc.txt"
    txt.write_text("a whole\n\nfile")
    assert read_texts(txt) == ["a whole\n\nfile"]
    shipped = read_texts(DEFAULT_PPL_FILE)
    assert len(shipped) == 250


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.jsonl", None, "does not exist"),
        ("empty.jsonl", "", "no text in .*empty.jsonl"),
        ("blank.txt", "  \n", "no text in"),
        ("bad.jsonl", '{"text": "ok"}\n{oops\n', "line 2: not valid JSON"),
        ("field.jsonl", '{"content": "x"}\n', "line 1: expected a JSON object with a string field 'text'"),
        ("data.csv", "a,b\n", "unsupported file type '.csv'"),
    ],
)
def test_bad_text_gives_a_clear_error(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(BeamError, match=message):
        read_texts(path)


def test_too_little_text_and_bad_settings():
    model = tiny_model("qwen3_moe", vocab_size=BYTE_VOCAB_SIZE)
    tokenizer = byte_tokenizer()
    with pytest.raises(BeamError, match="fewer than 2 tokens"):
        perplexity(model, tokenizer, ["x"], max_tokens=1)
    with pytest.raises(BeamError, match="max_length must be at least 2"):
        perplexity(model, tokenizer, TEXTS, max_length=1)
    with pytest.raises(BeamError, match="every document is empty"):
        perplexity(model, tokenizer, ["", " "])
