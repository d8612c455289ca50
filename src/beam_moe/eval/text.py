"""Evaluation text from local files: JSONL with a "text" field per line, or a plain .txt file."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from beam_moe.errors import BeamError

TextSource = str | Path | Sequence[str]


def read_texts(source: TextSource, *, text_key: str = "text", limit: int | None = None) -> list[str]:
    """The documents of `source`: a .jsonl file (one JSON object per line, text under `text_key`),
    a .txt file (the whole file is one document), or a list of strings.

    Blank documents are dropped; no document at all is an error, as is a missing or unreadable file.
    """
    if isinstance(source, (str, Path)):
        texts = _read_file(Path(source), text_key)
        where = str(source)
    else:
        texts = list(source)
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise BeamError(f"texts must be strings; item {bad[0]} is {type(texts[bad[0]]).__name__}")
        where = "the given texts"
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise BeamError(f"no text in {where}: every document is empty")
    if limit is not None:
        if limit < 1:
            raise BeamError(f"the document limit must be at least 1, got {limit}")
        texts = texts[:limit]
    return texts


def _read_file(path: Path, text_key: str) -> list[str]:
    if not path.exists():
        raise BeamError(
            f"{path} does not exist (expected a .jsonl file with a {text_key!r} field or a .txt file)"
        )
    if not path.is_file():
        raise BeamError(f"{path} is not a file")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".txt"):
        raise BeamError(
            f"{path}: unsupported file type {suffix or '(none)'!r}; use .jsonl (one JSON object per line) or .txt"
        )
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BeamError(f"{path} is not UTF-8 text ({e})") from e
    if suffix == ".txt":
        return [content]
    texts = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise BeamError(f"{path}, line {number}: not valid JSON ({e.msg})") from e
        if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
            raise BeamError(f"{path}, line {number}: expected a JSON object with a string field {text_key!r}")
        texts.append(record[text_key])
    return texts
