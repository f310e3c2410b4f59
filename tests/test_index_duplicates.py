"""Indexing embeds a text once: a chunk whose normalized text the index already holds (a copied
file, a repeated paragraph, the unchanged part of an edited file) gets that vector copied, the
daemon never sees it again, and the run says how many were copied."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from embedd.cli.index import summary
from embedd.index import Counts, index_paths, search
from embedd.index.store import text_hash
from tests.conftest import Daemon

PARAGRAPHS = [
    "The spare key is under the third flower pot by the back door.",
    "Backups run every night at two and keep thirty days of history.",
    "The certificate for the mail server is renewed in the first week of March.",
]
NEW = "The boiler is serviced each autumn by the company on Mill Street."
# Small chunks, so that each paragraph is a chunk of its own.
CHUNK_TOKENS = 24


def _inputs(daemon: Daemon) -> int:
    return int(daemon.call("stats")["models"]["default"]["inputs"])


def _chunks(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT count(*) FROM chunks").fetchone()[0])


@pytest.fixture(scope="module")
def run(daemon: Daemon, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Counts, int]:
    folder = tmp_path_factory.mktemp("dups") / "notes"
    folder.mkdir()
    (folder / "a.md").write_text("\n\n".join(PARAGRAPHS) + "\n")
    (folder / "b.md").write_text("\n\n".join(PARAGRAPHS) + "\n")  # a copy
    (folder / "c.md").write_text(f"{PARAGRAPHS[1]}\n\n{NEW}\n")  # one repeated, one new
    db = folder.parent / "notes.db"
    before = _inputs(daemon)
    counts = index_paths([folder], db, chunk_tokens=CHUNK_TOKENS, socket=daemon.socket)
    return db, counts, _inputs(daemon) - before


def test_a_repeated_chunk_is_embedded_once(run: tuple[Path, Counts, int]) -> None:
    db, counts, embedded = run
    assert _chunks(db) == counts.chunks == 8
    assert embedded == 4  # the three paragraphs and the new one
    assert counts.chunks_reused == 4


def test_search_finds_every_file_holding_a_repeated_chunk(
    daemon: Daemon, run: tuple[Path, Counts, int]
) -> None:
    db, _, _ = run
    hits = search(db, "where is the spare key", k=3, mode="vector", socket=daemon.socket)
    # The copies are one hit (near duplicates fold), naming the other file among its similar.
    best = hits[0]
    assert best.why is not None
    assert {Path(best.file).name, *(Path(p).name for p in best.why.similar)} >= {"a.md", "b.md"}


def test_an_edited_file_embeds_only_its_new_chunks(
    daemon: Daemon, run: tuple[Path, Counts, int]
) -> None:
    db, _, _ = run
    folder = db.parent / "notes"
    page = folder / "a.md"
    page.write_text(page.read_text() + "\nThe attic window sticks in wet weather.\n")
    before = _inputs(daemon)
    counts = index_paths([folder], db, chunk_tokens=CHUNK_TOKENS, socket=daemon.socket)
    assert (counts.files_indexed, counts.chunks, counts.chunks_reused) == (1, 4, 3)
    assert _inputs(daemon) - before == 1


def test_the_summary_says_how_many_duplicates_were_not_embedded() -> None:
    line = summary(Counts(files_seen=3, files_indexed=3, chunks=8, chunks_reused=4), "n.db")
    assert line.startswith("indexed 3 files (8 chunks, 4 duplicates not embedded again)")
    assert "duplicates" not in summary(Counts(files_seen=1, files_indexed=1, chunks=2), "n.db")


def test_texts_differing_only_in_whitespace_are_one_text() -> None:
    assert text_hash("a  b\n\nc ") == text_hash(" a b c")
    assert text_hash("a b") != text_hash("a B")
