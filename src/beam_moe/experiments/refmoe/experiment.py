"""BEAM on the reference MoE: the text, the training recipe and the evaluation that `beam-moe quickstart`
and the budget sweep (benchmarks/refmoe_sweep.py) share.

Training text comes only from the corpus's train split, evaluation text only from its held-out
split (the project's shared split). Both are cut into pieces of a few thousand characters and
shuffled with a seed, so that a short run or a short evaluation still sees all three sources
(Wikipedia, Shakespeare, the King James Bible) in proportion to their size.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from beam_moe.errors import BeamError
from beam_moe.experiments.refmoe.corpus import read_split
from beam_moe.refmoe import reference_model_path

PIECE_CHARS = 2000
MIXES = ("heldout", "corpus")
CHARS_PER_TOKEN = 4.0  # the reference BPE on this corpus is about 4.3 characters per token; err on more text


def _train_default(name: str) -> Any:
    from beam_moe.train.config import TrainConfig

    return TrainConfig.__dataclass_fields__[name].default


def _beam_default(name: str) -> Any:
    from beam_moe.config import BeamConfig

    return BeamConfig.__dataclass_fields__[name].default


@dataclass
class Recipe:
    """How the mask heads are trained on the reference MoE (the quickstart's and the sweep's defaults).

    Everything not set here is `beam-moe train`'s default (`TrainConfig`, `BeamConfig`), so the
    quickstart, the CLI and the Python API train with one set of defaults. The heads train on the
    distillation objective (KL from the unmasked model): it tells each head what the full Top-K
    would have predicted, a denser signal than the next token alone. The training text is mixed
    like the held-out text (`mix="heldout"`: each source in its held-out share of characters)
    unless `mix="corpus"` (the train split's own proportions).
    """

    steps: int = 250
    batch_size: int = 8
    max_length: int = 256
    lr: float = field(default_factory=lambda: _train_default("lr"))
    objective: str = "distill"
    train: str = "mask"
    head: str = field(default_factory=lambda: _beam_default("head"))
    model_lr: float | None = None
    controller_kp: float = field(default_factory=lambda: _train_default("controller_kp"))
    controller_ki: float = field(default_factory=lambda: _train_default("controller_ki"))
    settle: float = field(default_factory=lambda: _train_default("settle"))
    renormalize: bool = False
    bias: bool = False
    mix: str = "heldout"
    seed: int = 0

    def check(self) -> None:
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise BeamError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 2 <= self.max_length <= 512:
            raise BeamError(
                f"max-length must lie between 2 and 512 (the reference model's context), got {self.max_length}"
            )
        if not self.lr > 0:
            raise BeamError(f"lr must be > 0, got {self.lr}")
        if self.mix not in MIXES:
            raise BeamError(f"mix must be one of {', '.join(MIXES)}, got {self.mix!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pieces(text: str, size: int = PIECE_CHARS) -> list[str]:
    """`text` cut at line breaks into pieces of about `size` characters (a longer line stays whole)."""
    out: list[str] = []
    current: list[str] = []
    length = 0
    for line in text.split("\n"):
        current.append(line)
        length += len(line) + 1
        if length >= size:
            out.append("\n".join(current).strip())
            current, length = [], 0
    if current and "\n".join(current).strip():
        out.append("\n".join(current).strip())
    return [p for p in out if p]


def shuffled_pieces(split: str, seed: int, data_dir: str | Path | None = None) -> list[str]:
    """Every document of `split` cut into pieces, shuffled with `seed`."""
    out = [piece for record in read_split(split, data_dir) for piece in pieces(record["text"])]
    random.Random(seed).shuffle(out)
    return out


def heldout_texts(data_dir: str | Path | None = None, seed: int = 0) -> list[str]:
    """The evaluation text: the held-out split in shuffled pieces (callers cap it by tokens)."""
    return shuffled_pieces("heldout", seed, data_dir)


def source_shares(split: str, data_dir: str | Path | None = None) -> dict[str, float]:
    """Each source's share of the characters of `split`."""
    chars: dict[str, int] = {}
    for record in read_split(split, data_dir):
        chars[record["source"]] = chars.get(record["source"], 0) + len(record["text"])
    total = sum(chars.values())
    return {source: n / total for source, n in sorted(chars.items())}


def write_training_text(
    path: Path, tokens: int, data_dir: str | Path | None = None, seed: int = 0, mix: str = "heldout"
) -> dict[str, Any]:
    """A `.jsonl` of train-split pieces with about `tokens` tokens (more than a run reads); returns sizes.

    With `mix="heldout"` each source gets its share of the held-out split's characters (the held-out
    text is about half Shakespeare, the train split a third), so the heads train on the mix they are
    evaluated on; `mix="corpus"` keeps the train split's proportions.
    """
    wanted = int(tokens * CHARS_PER_TOKEN * 1.25) + PIECE_CHARS
    by_source: dict[str, list[str]] = {}
    for record in read_split("train", data_dir):
        by_source.setdefault(record["source"], []).extend(pieces(record["text"]))
    shares = source_shares("heldout" if mix == "heldout" else "train", data_dir)
    rng = random.Random(seed)
    chosen: list[tuple[str, str]] = []
    for source in sorted(by_source):
        pool = by_source[source]
        rng.shuffle(pool)
        budget, taken = shares.get(source, 0.0) * wanted, 0
        for piece in pool:
            if taken >= budget:
                break
            chosen.append((source, piece))
            taken += len(piece)
    rng.shuffle(chosen)
    path.parent.mkdir(parents=True, exist_ok=True)
    chars: dict[str, int] = {}
    with open(path, "w", encoding="utf-8") as f:
        for source, piece in chosen:
            f.write(json.dumps({"text": piece}, ensure_ascii=False) + "\n")
            chars[source] = chars.get(source, 0) + len(piece)
    return {
        "pieces": len(chosen),
        "characters": sum(chars.values()),
        "characters_by_source": chars,
        "mix": mix,
    }


def train_mask_heads(
    target_avg_k: float,
    output: Path,
    recipe: Recipe,
    data_file: Path,
    progress: bool = True,
):
    """Train BEAM mask heads on the reference MoE to `target_avg_k` (beam_moe.train); returns its TrainResult."""
    from beam_moe.train import TrainConfig, train

    recipe.check()
    config = TrainConfig(
        model=str(reference_model_path()),
        data=[str(data_file)],
        output=str(output),
        target_avg_k=target_avg_k,
        objective=recipe.objective,
        train=recipe.train,
        lr=recipe.lr,
        model_lr=recipe.model_lr,
        controller_kp=recipe.controller_kp,
        controller_ki=recipe.controller_ki,
        settle=recipe.settle,
        beam={"head": recipe.head, "renormalize": recipe.renormalize, "bias": recipe.bias},
        max_steps=recipe.steps,
        batch_size=recipe.batch_size,
        max_length=recipe.max_length,
        val_fraction=0.0,
        save_every=0,
        seed=recipe.seed,
        tensorboard=False,
        progress=progress,
    )
    return train(config)


def evaluate_adapters(
    adapters: list[Path],
    texts: list[str],
    grids: dict[str, list[float]],
    *,
    eval_tokens: int,
    max_length: int = 256,
    seed: int = 0,
    on_point: Callable[[str], None] | None = None,
) -> tuple[dict[str, Any], nn.Module, Any]:
    """`beam_moe.eval.sweep` of BEAM adapters against the baselines on the stock reference model.

    Adapters that trained only the mask heads share the stock model, so one sweep evaluates them
    all. An adapter that also trained the routers (`mask+router`) changes the model: it is
    evaluated on its own model, and the baselines (calibrated to its Avg-K) on the stock model with
    the same BEAM options, so that no baseline runs on routers trained for BEAM.
    Returns (the sweep result, the last adapter's model, the tokenizer).
    """
    from beam_moe.adapter import read_adapter_config
    from beam_moe.attach import attach
    from beam_moe.base_models import load_tokenizer
    from beam_moe.config import BeamConfig
    from beam_moe.eval import calibrate, sweep
    from beam_moe.eval.baselines import get_baseline
    from beam_moe.eval.calibrate import measure
    from beam_moe.eval.sweep import _point, sweep_point
    from beam_moe.loading import load_eval_model
    from beam_moe.refmoe import load_reference_model

    kwargs = dict(max_length=max_length, batch_size=8, max_tokens=eval_tokens)
    configs = [read_adapter_config(a) for a in adapters]
    if all(c.get("extra", {}).get("train", "mask") == "mask" for c in configs):
        model, tokenizer, _ = load_eval_model(adapters[0])
        result = sweep(
            model,
            tokenizer,
            texts,
            adapters=adapters,
            baselines=grids,
            calibration_tokens=eval_tokens,
            seed=seed,
            on_point=on_point,
            **kwargs,
        )
        return result, model, tokenizer
    beam_options: BeamConfig = configs[0]["config"]
    stock = attach(load_reference_model(), BeamConfig(renormalize=beam_options.renormalize))
    tokenizer = load_tokenizer(reference_model_path())
    result = sweep(
        stock, tokenizer, texts, baselines=grids, match=False, seed=seed, on_point=on_point, **kwargs
    )
    model = stock
    for adapter in adapters:
        model, _, _ = load_eval_model(adapter)
        point = sweep_point(model, tokenizer, texts, "beam", Path(adapter).name, None, **kwargs)
        result["points"].append(point.to_dict())
        if on_point is not None:
            on_point(f"BEAM {point.label}: Avg-K {point.avg_k:.3f}, ppl {point.ppl:.4g}")
        row: dict[str, Any] = {"target_avg_k": point.avg_k, "beam": point.to_dict(), "baselines": {}}
        for name in grids:
            found = calibrate(stock, tokenizer, name, point.avg_k, texts, seed=seed, **kwargs)
            measured = measure(stock, tokenizer, texts, name, found.param, seed, **kwargs)
            baseline = _point(
                stock, measured, name, f"{get_baseline(name).param}={found.param:.4g}", found.param
            )
            row["baselines"][name] = {**baseline.to_dict(), "calibration": found.to_dict()}
            if on_point is not None:
                on_point(f"{name} matched to {point.avg_k:.3f}: ppl {baseline.ppl:.4g}")
        result["matched"].append(row)
    result["config"]["adapters"] = [str(a) for a in adapters]
    result["config"]["routers"] = "BEAM evaluated with its trained routers; baselines on the stock model"
    return result, model, tokenizer
