"""Loaders for the shipped lm-eval tasks: the JSONL files beside this module, read offline.

lm-eval imports this file by path (`custom_dataset: !function beam_tasks_data.<loader>` in the
task YAMLs), so the tasks work from any working directory.
"""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"


def _load(name: str, **_: object):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_json(str(DATA / name))})


def wiki_heldout(**kwargs: object):
    return _load("wiki_heldout.jsonl", **kwargs)


def wiki_cloze(**kwargs: object):
    return _load("wiki_cloze.jsonl", **kwargs)
