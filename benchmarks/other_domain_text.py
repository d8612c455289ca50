"""English text of another domain than the reference corpus: the Python standard library's docstrings.

The reference MoE was pretrained (and BEAM's heads are trained) on Wikipedia leads, Shakespeare
and the King James Bible. Software documentation is a different register, vocabulary and
subject, and every machine with Python has it: this writes the docstrings of the standard
library's top-level modules (module, class and function docstrings of at least 300 characters,
in file order) as one `{"text": ...}` per docstring, for `beam-moe sweep ADAPTER --ppl FILE`.

    python benchmarks/other_domain_text.py --output runs/stdlib_docs.jsonl

The text depends on the Python version (recorded in the first line's "source"); 3.11 gives
about 0.6 M characters (~150 K tokens of the reference tokenizer).
"""

from __future__ import annotations

import argparse
import ast
import json
import platform
import sysconfig
from pathlib import Path

MIN_CHARS = 300


def stdlib_docstrings(min_chars: int = MIN_CHARS) -> list[str]:
    """Docstrings of the standard library's top-level modules, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    texts.append(doc.strip())
    return texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", "-o", type=Path, required=True, help="the .jsonl to write")
    args = parser.parse_args(argv)
    texts = stdlib_docstrings()
    source = f"Python {platform.python_version()} standard library docstrings"
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n")
    print(f"wrote {len(texts)} docstrings, {sum(map(len, texts))} characters, to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
