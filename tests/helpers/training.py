"""Helpers for the training tests: tiny model folders and small data files written on the spot."""

import json
import random
from pathlib import Path

import torch

from beam_moe import attach, detach
from beam_moe.tiny_models import byte_tokenizer, save_tiny, tiny_model

WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "bird",
    "fish",
    "sat",
    "ran",
    "flew",
    "swam",
    "on",
    "under",
    "over",
    "near",
    "mat",
    "tree",
    "roof",
    "pond",
    "quickly",
    "slowly",
    "today",
    "again",
    "red",
    "blue",
    "small",
    "big",
]
# Top-4 of 8 experts: the setting of the budget test.
TOP4 = dict(num_experts=8, num_experts_per_tok=4)


def sentences(n: int, seed: int = 0, words: int = 12) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) + "." for _ in range(n)]


def write_text_jsonl(path: Path, n: int = 200, seed: int = 0) -> Path:
    path.write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences(n, seed)))
    return path


def write_chat_jsonl(path: Path, n: int = 100, seed: int = 0) -> Path:
    lines = []
    for question, answer in zip(sentences(n, seed, 6), sentences(n, seed + 1, 8), strict=True):
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        lines.append(json.dumps({"messages": messages}) + "\n")
    path.write_text("".join(lines))
    return path


def model_dir(path: Path, model_type: str = "qwen3_moe", **overrides) -> Path:
    save_tiny(model_type, path, **{**TOP4, **overrides} if model_type == "qwen3_moe" else overrides)
    return path


def pretrained_model_dir(path: Path, steps: int = 80, seed: int = 0) -> Path:
    """A tiny Top-4 Qwen3-MoE briefly trained on the test sentences, so that its experts matter.

    Trained with fresh (keep-all) mask heads attached, which is exactly the base model but runs
    the fast grouped expert backend; the heads are removed before saving.
    """
    model = attach(tiny_model("qwen3_moe", seed=seed, vocab_size=261, **TOP4))
    tokenizer = byte_tokenizer()
    ids = tokenizer("\n".join(sentences(400, seed=123)))["input_ids"]
    blocks = torch.tensor(ids[: len(ids) // 64 * 64]).view(-1, 64)
    optimizer = torch.optim.AdamW([p for n, p in model.named_parameters() if "beam_mask" not in n], lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = blocks[torch.randint(len(blocks), (8,), generator=generator)]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    detach(model).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
