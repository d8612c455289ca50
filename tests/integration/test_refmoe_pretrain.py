"""The pretraining script on a tiny corpus: seeded, resumable to the same weights, atomic outputs."""

import json

import pytest
import torch
from safetensors.torch import load_file

from beam_moe.experiments.refmoe.pretrain import EXIT_RESUMABLE, PretrainArgs, learning_rate, main

TINY_SHAPE = json.dumps(
    dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
         num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)
)  # fmt: skip
WORDS = [
    "the",
    "king",
    "of",
    "france",
    "said",
    "unto",
    "them",
    "that",
    "a",
    "river",
    "runs",
    "through",
    "the",
    "old",
    "city",
    "of",
    "rome",
]


def _write_corpus(folder):
    folder.mkdir()
    generator = torch.Generator().manual_seed(0)

    def text(n):
        return " ".join(WORDS[i] for i in torch.randint(len(WORDS), (n,), generator=generator).tolist())

    for split, count in (("train", 12), ("heldout", 3)):
        with open(folder / f"{split}.jsonl", "w") as f:
            for i in range(count):
                for source in ("wiki", "shakespeare", "kjv"):
                    f.write(json.dumps({"text": text(60), "source": source, "key": f"{source}{i}"}) + "\n")


def _run(output, corpus, *extra):
    return main(
        [
            "--output", str(output), "--data-dir", str(corpus), "--steps", "4", "--batch-size", "2",
            "--seq-len", "32", "--checkpoint-every", "2", "--eval-every", "2", "--eval-blocks", "2",
            "--warmup", "1", "--vocab-size", "300", "--shape", TINY_SHAPE, *extra,
        ]
    )  # fmt: skip


def test_resumed_run_matches_an_uninterrupted_one(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    _write_corpus(corpus)
    assert _run(tmp_path / "straight", corpus) == 0
    assert _run(tmp_path / "split", corpus, "--max-minutes", "0") == EXIT_RESUMABLE
    assert not (tmp_path / "split" / "model").exists()
    # The checkpoint is safetensors + JSON (no pickle), the optimizer's moments among the tensors.
    checkpoint = tmp_path / "split" / "checkpoint"
    assert sorted(p.name for p in checkpoint.iterdir()) == ["state.json", "state.safetensors"]
    assert any(name.startswith("optimizer/state/") for name in load_file(checkpoint / "state.safetensors"))
    assert _run(tmp_path / "split", corpus, "--lr", "0.001") == 2  # other arguments: refused
    assert "other arguments" in capsys.readouterr().err
    assert _run(tmp_path / "split", corpus) == 0

    straight = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    split = load_file(tmp_path / "split" / "model" / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in straight.values())
    assert straight.keys() == split.keys()
    assert all(torch.equal(straight[k], split[k]) for k in straight)

    record = json.loads((tmp_path / "split" / "model" / "training.json").read_text())
    assert record["seed"] == 0 and record["args"]["steps"] == 4
    assert record["data"]["train"]["kjv"]["documents"] == 12
    assert record["heldout_perplexity"]["all"] > 1
    assert [h["step"] for h in record["history"] if "loss" in h] == [4]
    assert {h["step"] for h in record["history"] if "heldout_ppl_estimate" in h} == {2}


def test_an_old_pickle_checkpoint_is_refused_not_overwritten(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    _write_corpus(corpus)
    (tmp_path / "run" / "checkpoint").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint" / "state.pt").write_bytes(b"PK\x03\x04 an old torch.save file")
    assert _run(tmp_path / "run", corpus) == 2
    assert "older beam-moe" in capsys.readouterr().err
    assert (tmp_path / "run" / "checkpoint" / "state.pt").is_file()


def test_missing_corpus_is_a_clear_error(tmp_path, capsys):
    assert main(["--output", str(tmp_path / "run"), "--data-dir", str(tmp_path / "nothing")]) == 2
    assert "corpus prepare" in capsys.readouterr().err


def test_learning_rate_warms_up_then_decays_to_the_floor():
    args = PretrainArgs(steps=100, warmup=10, lr=1e-3, min_lr_ratio=0.1)
    assert learning_rate(0, args) == pytest.approx(1e-4)
    assert learning_rate(9, args) == pytest.approx(1e-3)
    assert learning_rate(55, args) == pytest.approx(0.55e-3)
    assert learning_rate(100, args) == pytest.approx(1e-4)
