"""Training data: read records, tokenise them with a loss mask, pack them into blocks, hold some out.

Sources (any mix, given as files or folders):
- `.jsonl`: one JSON object per line with `"text"` (language modelling: loss on every token) or
  `"messages"` (chat: rendered with the tokenizer's chat template, loss on assistant tokens only);
- `.txt`: the whole file is one text document;
- a folder: every `.txt`/`.jsonl` under it, or a `datasets` folder written by `save_to_disk`.

Documents are tokenised once, joined (with EOS between text documents) and cut into blocks of
`max_length` tokens (packing), or each truncated and padded to `max_length` (no packing).
Labels are the input ids with -100 wherever no loss is taken (prompt tokens, padding).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from beam_moe.errors import BeamError, require

IGNORE = -100
DATASETS_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass
class Record:
    """One training example as read from disk; `where` says where it came from (file:line)."""

    where: str
    text: str | None = None
    messages: list[dict[str, Any]] | None = None


@dataclass
class Blocks:
    """Token blocks ready for the model: [N, L] each."""

    input_ids: Tensor
    labels: Tensor
    attention_mask: Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: Tensor | list[int]) -> Blocks:
        index = torch.as_tensor(index, dtype=torch.long)
        return Blocks(self.input_ids[index], self.labels[index], self.attention_mask[index])

    def batch(self, index: Tensor | list[int]) -> dict[str, Tensor]:
        picked = self.select(index)
        return {
            "input_ids": picked.input_ids,
            "labels": picked.labels,
            "attention_mask": picked.attention_mask,
        }

    @property
    def loss_tokens(self) -> int:
        """Tokens that are predicted with a loss (a label after the shift)."""
        return int((self.labels[:, 1:] != IGNORE).sum())


# Reading ----------------------------------------------------------------------------------------


def read_records(paths: list[str]) -> list[Record]:
    """Every record in `paths` (files or folders), in a stable order."""
    records: list[Record] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise BeamError(f"data path {path} does not exist")
        if path.is_dir() and any((path / marker).is_file() for marker in DATASETS_MARKERS):
            records.extend(_read_saved_dataset(path))
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
            if not files:
                raise BeamError(
                    f"{path} holds no .txt or .jsonl files and is not a datasets folder (save_to_disk)"
                )
            for file in files:
                records.extend(_read_file(file))
        else:
            records.extend(_read_file(path))
    return records


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BeamError(
            f"{where}: not UTF-8 text (byte {raw[e.start : e.start + 1]!r} at offset {e.start}); "
            "convert the file to UTF-8"
        ) from e


def _read_file(path: Path) -> Iterator[Record]:
    if path.suffix == ".txt":
        yield _record({"text": _decode(path.read_bytes(), str(path))}, str(path))
    elif path.suffix in (".jsonl", ".json"):
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                line = _decode(raw, f"{path}:{number}")
                if line.strip():
                    yield _parse_line(line, f"{path}:{number}")
    else:
        raise BeamError(f"{path}: unsupported data file type {path.suffix!r}; use .jsonl, .txt or a folder")


def _parse_line(line: str, where: str) -> Record:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise BeamError(
            f"{where}: not valid JSON ({e.msg} at column {e.colno}); fix or remove the line"
        ) from e
    except RecursionError as e:
        raise BeamError(f"{where}: JSON nested too deeply to be a record; fix or remove the line") from e
    return _record(obj, where)


def _valid_unicode(text: str) -> bool:
    """False for strings JSON can carry but tokenizers cannot: lone surrogates (`"\\ud800"`)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _record(obj: Any, where: str) -> Record:
    if isinstance(obj, dict) and isinstance(obj.get("text"), str):
        if not _valid_unicode(obj["text"]):
            raise BeamError(f"{where}: the text holds a lone surrogate (invalid Unicode); fix the line")
        return Record(where=where, text=obj["text"])
    if isinstance(obj, dict) and isinstance(obj.get("messages"), list):
        messages = obj["messages"]
        if not messages:
            raise BeamError(f'{where}: "messages" is empty; give at least one message or remove the line')
        for message in messages:
            if not (
                isinstance(message, dict)
                and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)
            ):
                raise BeamError(
                    f'{where}: every message needs a "role" and a "content" string, got {message!r:.80}'
                )
            if not (_valid_unicode(message["role"]) and _valid_unicode(message["content"])):
                raise BeamError(f"{where}: a message holds a lone surrogate (invalid Unicode); fix the line")
        return Record(where=where, messages=messages)
    keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
    raise BeamError(f'{where}: expected an object with a "text" string or a "messages" list, got {keys}')


def _read_saved_dataset(path: Path) -> Iterator[Record]:
    datasets = require("datasets", "train", f"reading the saved dataset {path}")
    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise BeamError(f"{path} is a DatasetDict without a 'train' split (splits: {list(dataset)})")
        dataset = dataset["train"]
    if "text" not in dataset.column_names and "messages" not in dataset.column_names:
        raise BeamError(
            f'{path}: the dataset needs a "text" or a "messages" column, has {dataset.column_names}'
        )
    for i, row in enumerate(dataset):
        yield _record(row, f"{path}[{i}]")


# Tokenising -------------------------------------------------------------------------------------


class Tokenizer:
    """Turns records into (token ids, loss mask) with a transformers tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos or 0)

    def __call__(self, record: Record) -> tuple[list[int], list[bool]]:
        if record.text is not None:
            ids = list(self.tokenizer(record.text, add_special_tokens=True)["input_ids"])
            if self.eos is not None and (not ids or ids[-1] != self.eos):
                ids.append(self.eos)
            return ids, [True] * len(ids)
        return self.chat(record.messages or [], record.where)

    def chat(self, messages: list[dict[str, Any]], where: str) -> tuple[list[int], list[bool]]:
        template = self.tokenizer.chat_template
        if not template:
            raise BeamError(
                f"{where}: chat messages need a tokenizer with a chat template; this one has none"
            )
        from jinja2 import TemplateError

        try:
            if _GENERATION_TAG.search(template if isinstance(template, str) else json.dumps(template)):
                out = self.tokenizer.apply_chat_template(
                    messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
                )
                return list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]
            return self._chat_by_prefixes(messages, where)
        except TemplateError as e:  # e.g. raise_exception('...') for a role the template does not know
            raise BeamError(f"{where}: the tokenizer's chat template refuses these messages ({e})") from e

    def _chat_by_prefixes(self, messages: list[dict[str, Any]], where: str) -> tuple[list[int], list[bool]]:
        """Assistant spans for templates without {% generation %} markers: render growing prefixes."""

        def render(upto: int, prompt: bool = False) -> str:
            if upto == 0:
                return ""
            return self.tokenizer.apply_chat_template(
                messages[:upto], tokenize=False, add_generation_prompt=prompt
            )

        full = render(len(messages))
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start, end = render(i, prompt=True), render(i + 1)
            if not (end.startswith(start) and full.startswith(end)):
                raise BeamError(
                    f"{where}: the chat template renders earlier turns differently once later turns are "
                    "added, so the assistant tokens cannot be located; add {% generation %} markers "
                    "around the assistant content in the template (see docs/training.md)"
                )
            spans.append((len(start), len(end)))
        encoded = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        mask = [any(a <= s < b for a, b in spans) for s, _ in encoded["offset_mapping"]]
        return list(encoded["input_ids"]), mask


# Packing and splitting --------------------------------------------------------------------------


def pack(documents: list[tuple[list[int], list[bool]]], max_length: int, pad_id: int) -> Blocks:
    """Join the documents and cut the stream into blocks of `max_length` (the last one padded)."""
    ids = [t for doc, _ in documents for t in doc]
    mask = [m for _, doc_mask in documents for m in doc_mask]
    n = -(-len(ids) // max_length)
    padding = n * max_length - len(ids)
    ids_t = torch.tensor(ids + [pad_id] * padding, dtype=torch.long).view(n, max_length)
    mask_t = torch.tensor(mask + [False] * padding).view(n, max_length)
    attention = torch.tensor([1] * len(ids) + [0] * padding, dtype=torch.long).view(n, max_length)
    return Blocks(ids_t, torch.where(mask_t, ids_t, IGNORE), attention)


def pad_each(documents: list[tuple[list[int], list[bool]]], max_length: int, pad_id: int) -> Blocks:
    """One block per document, truncated or padded to `max_length`."""
    ids = torch.full((len(documents), max_length), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    attention = torch.zeros_like(ids)
    for row, (doc, doc_mask) in enumerate(documents):
        n = min(len(doc), max_length)
        ids[row, :n] = torch.tensor(doc[:n])
        attention[row, :n] = 1
        keep = torch.tensor(doc_mask[:n], dtype=torch.bool)
        labels[row, :n] = torch.where(keep, ids[row, :n], IGNORE)
    return Blocks(ids, labels, attention)


def tokenize_blocks(paths: list[str], tokenizer: Any, max_length: int, packing: bool) -> Blocks:
    """Read, tokenise and pack (or pad) everything in `paths`; refuses data with nothing to learn."""
    records = read_records(paths)
    if not records:
        raise BeamError(f"no records in {', '.join(paths)}: the data is empty")
    tokenize = Tokenizer(tokenizer)
    documents = [doc for doc in (tokenize(r) for r in records) if doc[0]]
    blocks = (pack if packing else pad_each)(documents, max_length, tokenize.pad) if documents else None
    if blocks is None or blocks.loss_tokens == 0:
        raise BeamError(
            f"{', '.join(paths)} holds no tokens to train on (empty texts, or chats without assistant turns)"
        )
    return blocks


def split_validation(blocks: Blocks, fraction: float, seed: int) -> tuple[Blocks, Blocks | None]:
    """Hold out a seeded random `fraction` of the blocks (at least one when fraction > 0)."""
    if fraction <= 0 or len(blocks) < 2:
        return blocks, None
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))
    n_val = min(max(1, round(fraction * len(blocks))), len(blocks) - 1)
    return blocks.select(order[n_val:].sort().values), blocks.select(order[:n_val].sort().values)


@dataclass
class TrainingData:
    train: Blocks
    val: Blocks | None

    def describe(self) -> dict[str, int]:
        return {
            "train_sequences": len(self.train),
            "train_loss_tokens": self.train.loss_tokens,
            "val_sequences": len(self.val) if self.val is not None else 0,
            "val_loss_tokens": self.val.loss_tokens if self.val is not None else 0,
        }


def load_training_data(
    data: list[str],
    val_data: list[str] | None,
    tokenizer: Any,
    max_length: int,
    packing: bool,
    val_fraction: float,
    seed: int,
) -> TrainingData:
    """Training blocks and validation blocks (from `val_data`, or held out from `data`)."""
    blocks = tokenize_blocks(data, tokenizer, max_length, packing)
    if val_data:
        return TrainingData(blocks, tokenize_blocks(val_data, tokenizer, max_length, packing))
    train, val = split_validation(blocks, val_fraction, seed)
    return TrainingData(train, val)


class BatchSchedule:
    """Which blocks each process sees at each step: a pure function of the step, so resuming is exact.

    Each epoch is a seeded permutation of the training blocks; a step takes the next
    `batch_size x grad_accum x processes` of them (a partial last batch is dropped). Process r
    takes its contiguous share and splits it into `grad_accum` micro-batches.
    """

    def __init__(self, num_blocks: int, batch_size: int, grad_accum: int, processes: int, seed: int) -> None:
        self.num_blocks = num_blocks
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.processes = processes
        self.seed = seed
        self.global_batch = batch_size * grad_accum * processes
        self.steps_per_epoch = num_blocks // self.global_batch
        if self.steps_per_epoch == 0:
            raise BeamError(
                f"only {num_blocks} training sequences, fewer than one optimizer step needs "
                f"(batch_size {batch_size} x grad_accum {grad_accum} x processes {processes} = "
                f"{self.global_batch}); lower batch_size or max_length, or add data"
            )
        self._order: tuple[int, Tensor] | None = None

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def _permutation(self, epoch: int) -> Tensor:
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._order = (epoch, torch.randperm(self.num_blocks, generator=generator))
        return self._order[1]

    def global_indices(self, step: int) -> Tensor:
        start = (step % self.steps_per_epoch) * self.global_batch
        return self._permutation(self.epoch_of(step))[start : start + self.global_batch]

    def micro_batches(self, step: int, rank: int) -> list[Tensor]:
        share = self.batch_size * self.grad_accum
        mine = self.global_indices(step)[rank * share : (rank + 1) * share]
        return list(mine.split(self.batch_size))
