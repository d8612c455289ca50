"""lm-eval runs offline on a tiny BEAM model with the shipped local tasks; the shipped data is held out and small."""

import hashlib
import json
import os

import pytest

from beam_moe import BeamError, attach
from beam_moe.eval import SHIPPED_TASKS, TASKS_DIR, run_tasks
from beam_moe.tiny_models import BYTE_VOCAB_SIZE, byte_tokenizer, tiny_model
from helpers.masking import randomize_heads


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(os.path.dirname(__file__))  # the task YAMLs must not depend on the working directory


def test_shipped_tasks_run_offline_on_a_beam_model(offline):
    model = attach(tiny_model("qwen3_moe", vocab_size=BYTE_VOCAB_SIZE))
    randomize_heads(model, seed=0)
    out = run_tasks(model, byte_tokenizer(), list(SHIPPED_TASKS), limit=2)
    ppl, cloze = out["results"]["beam_wiki_ppl"], out["results"]["beam_wiki_cloze"]
    assert ppl["byte_perplexity,none"] > 1
    assert ppl["bits_per_byte,none"] > 0
    assert 0.0 <= cloze["acc,none"] <= 1.0
    assert out["n_samples"]["beam_wiki_cloze"] == {"original": 250, "effective": 2}
    assert 0.3 < out["avg_k"] < 1.7, "the masks route lm-eval's forward passes"
    assert out["tokens"] > 0


def test_unknown_task_names_the_shipped_ones(offline):
    model = attach(tiny_model("qwen3_moe", vocab_size=BYTE_VOCAB_SIZE))
    with pytest.raises(
        BeamError, match="unknown lm-eval task.*hellaswag_offline.*beam_wiki_ppl, beam_wiki_cloze"
    ):
        run_tasks(model, byte_tokenizer(), ["hellaswag_offline"])


def held_out(title: str) -> bool:
    return int(hashlib.sha1(title.encode()).hexdigest(), 16) % 10 == 0


def test_shipped_data_is_held_out_small_and_licensed():
    data = TASKS_DIR / "data"
    total = 0
    for name in ("wiki_heldout.jsonl", "wiki_cloze.jsonl"):
        rows = [json.loads(line) for line in (data / name).read_text().splitlines()]
        assert len(rows) == 250
        assert all(held_out(row["title"]) for row in rows), (
            "evaluation text must come from held-out documents"
        )
        total += (data / name).stat().st_size
    cloze = [json.loads(line) for line in (data / "wiki_cloze.jsonl").read_text().splitlines()]
    assert all(len(row["choices"]) == 4 and 0 <= row["label"] < 4 for row in cloze)
    assert len({row["label"] for row in cloze}) == 4, "the right answer is not always in one place"
    assert total < 400_000
    assert "CC BY-SA 4.0" in (TASKS_DIR / "README.md").read_text()
