"""What the README and docs say: every command, no machine of ours, only names that exist."""

from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path

from beam_moe.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def commands(parser: argparse.ArgumentParser) -> list[str]:
    return [
        name
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for name in action.choices
    ]


def test_readme_shows_every_command():
    readme = (ROOT / "README.md").read_text()
    missing = [c for c in commands(build_parser()) if not re.search(rf"beam-moe {re.escape(c)}\b", readme)]
    assert not missing, f"README.md never shows `beam-moe {missing[0]}`: add it to the command list"


def published_text_files() -> list[Path]:
    """What the repository gives a reader: docs, code, tests, scripts (not the recorded results)."""
    found = [*DOCS, ROOT / "pyproject.toml"]
    for folder, patterns in (
        ("src", ("*.py", "*.md")),
        ("tests", ("*.py",)),
        ("scripts", ("*",)),
        ("benchmarks", ("*.py", "*.md", "*.sh")),
    ):
        for pattern in patterns:
            found += [p for p in (ROOT / folder).rglob(pattern) if p.is_file() and "results" not in p.parts]
    return sorted(set(found) - {Path(__file__).resolve()})


def test_docs_and_code_name_nothing_outside_the_repository():
    internals = re.compile(r"(?<![\w.-])/work/|\bflock\s|\bdesign\.md\b")
    found = []
    for path in published_text_files():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if internals.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "machine paths, lock commands or missing documents:\n" + "\n".join(found)


def resolve(dotted: str) -> object:
    """The object `a.b.c` names: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for name in parts[split:]:
            found = getattr(found, name)
        return found
    raise ModuleNotFoundError(dotted)


def test_every_beam_moe_name_in_the_docs_exists():
    names = sorted({m for doc in DOCS for m in re.findall(r"\bbeam_moe(?:\.\w+)+", doc.read_text())})
    assert "beam_moe.load_beam_model" in names
    missing = []
    for name in names:
        if name.startswith("beam_moe.serving.vllm"):
            continue  # imports vLLM (seconds); tests/integration/test_serving_package.py covers the package
        try:
            resolve(name)
        except (ImportError, AttributeError) as e:
            missing.append(f"{name}: {e}")
    assert not missing, "\n".join(missing)
