"""The vector matrix beside an index (`embedd.index.vectors`): its format, the check against
SQLite, rebuilding on any mismatch, incremental updates, compaction and deletion, first
without a daemon (indexes written through `embedd.index.store` with random unit vectors), then
end to end with the real daemon and CLI, where its ranking must equal SQLite's own."""

from __future__ import annotations

import os
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from embedd.index import store, vectors
from embedd.index.search import _sqlite_candidates, vector_candidates
from embedd.index.vectors import FREE, Header, Mismatch, Writer, matrix_path
from tests.conftest import Daemon

DIM = 8
RNG = np.random.default_rng(7)


def _unit(n: int, dim: int = DIM) -> npt.NDArray[np.float32]:
    v = RNG.standard_normal((n, dim))
    out: npt.NDArray[np.float32] = np.asarray(v / np.linalg.norm(v, axis=1)[:, None], "<f4")
    return out


def _rows(name: str, n: int, dim: int = DIM) -> list[dict[str, Any]]:
    return [
        {"id": f"{name}-{i}", "file": name, "idx": i, "start": 0, "end": 1, "line": 1,
         "text": f"chunk {i} of {name}", "tokens": 3, "model": "m", "model_fingerprint": "fp",
         "vector": v.tobytes()}
        for i, v in enumerate(_unit(n, dim))
    ]  # fmt: skip


def _put(db: sqlite3.Connection, name: str, n: int, dim: int = DIM) -> tuple[list[int], list[Any]]:
    """(Re)write file `name` with `n` random chunks in one transaction, as indexing does;
    returns the row keys removed and the (key, vector) rows added."""
    rows = _rows(name, n, dim)
    with db:
        removed = store.drop_file(db, name)
        db.execute("INSERT INTO files VALUES (?, 'x', ?, 0)", (name, n))
        store.insert_chunks(db, rows)
    return removed, [(vectors.row_key(name, r["idx"]), r["vector"]) for r in rows]


@pytest.fixture
def index(tmp_path: Path) -> Iterator[tuple[Path, sqlite3.Connection]]:
    path = tmp_path / "i.db"
    db = store.open_index(path)
    store.check_model(db, "m", "fp")
    db.commit()
    for name, n in (("a", 50), ("b", 30), ("c", 20)):
        _put(db, name, n)
    yield path, db
    db.close()


def _q() -> npt.NDArray[np.float32]:
    q: npt.NDArray[np.float32] = _unit(1)[0]
    return q


def _ranking_matches_sqlite(db: sqlite3.Connection, n: int = 100) -> bool:
    q = _q()
    via_matrix = vector_candidates(db, "i.db", q, None, n)
    via_sqlite = _sqlite_candidates(db, "i.db", q, None, n)
    return [k for k, _ in via_matrix] == [k for k, _ in via_sqlite] and np.allclose(
        [s for _, s in via_matrix], [s for _, s in via_sqlite]
    )


# --------------------------------------------------------------------------------------------
# The format (pure)


def test_a_header_reads_back_what_was_written() -> None:
    header = Header(dim=384, slots=10, live=7, generation=42, model=b"\1" * 32)
    assert Header.unpack(header.pack()) == header
    assert len(header.pack()) == vectors.HEADER_BYTES
    assert header.size == vectors.HEADER_BYTES + 10 * (384 * 4 + 8)


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        (lambda b: b"NOTVECS!" + b[8:], "wrong magic"),
        (lambda b: b[:8] + (99).to_bytes(4, "little") + b[12:], "layout version 99"),
        (lambda b: b[:20] + bytes([b[20] ^ 1]) + b[21:], "checksum"),
        (lambda b: b[:30], "shorter than its header"),
    ],
    ids=["magic", "version", "checksum", "short"],
)
def test_a_header_that_is_not_this_versions_is_a_mismatch(damage: Any, said: str) -> None:
    packed = Header(dim=4, slots=3, live=3, generation=5, model=b"\0" * 32).pack()
    with pytest.raises(Mismatch, match=said):
        Header.unpack(damage(packed))


def test_new_rows_fill_free_slots_first_then_are_appended() -> None:
    assert vectors.place([7, 2], slots=10, count=4) == [2, 7, 10, 11]
    assert vectors.place([5, 1, 3], slots=6, count=2) == [1, 3]


def test_compaction_is_due_when_free_slots_pass_the_named_fraction() -> None:
    assert not vectors.needs_compaction(slots=100, live=75)
    assert vectors.needs_compaction(slots=100, live=74)
    assert not vectors.needs_compaction(slots=0, live=0)


# --------------------------------------------------------------------------------------------
# The file against SQLite, without a daemon


def test_a_new_index_gets_a_matrix_holding_every_stored_vector(
    index: tuple[Path, sqlite3.Connection],
) -> None:
    path, db = index
    Writer(path, db)
    matrix = vectors._open(matrix_path(path))
    try:
        assert (matrix.header.dim, matrix.header.live) == (DIM, 100)
        stored = dict(db.execute("SELECT f.rowid, c.vector FROM chunks_fts f JOIN chunks c "
                                 "ON c.file = f.file AND c.idx = f.idx").fetchall())  # fmt: skip
        assert {int(k): matrix.vectors[i].tobytes() for i, k in enumerate(matrix.keys)} == stored
    finally:
        matrix.close()


def test_search_over_the_matrix_ranks_as_over_sqlites_blobs(
    index: tuple[Path, sqlite3.Connection],
) -> None:
    assert _ranking_matches_sqlite(index[1])


def test_a_reindexed_file_is_updated_in_place_without_a_rebuild(
    index: tuple[Path, sqlite3.Connection],
) -> None:
    path, db = index
    writer = Writer(path, db)
    inode = os.stat(matrix_path(path)).st_ino
    writer.changed(db, *_put(db, "b", 35))
    assert writer.rebuilds == 0 and os.stat(matrix_path(path)).st_ino == inode
    assert writer.header.live == 105 and writer.header.slots == 105  # 30 reused, 5 appended
    vectors.check(vectors._open(matrix_path(path)), db, DIM)  # raises if not in step
    assert _ranking_matches_sqlite(db)


def test_a_matrix_a_search_rebuilt_meanwhile_is_not_updated_from_stale_slots(
    index: tuple[Path, sqlite3.Connection],
) -> None:
    path, db = index
    writer = Writer(path, db)
    change = _put(db, "b", 35)  # committed; the writer has not applied it yet
    assert _ranking_matches_sqlite(db)  # a search saw SQLite ahead and rebuilt the file
    writer.changed(db, *change)
    assert writer.rebuilds == 1
    vectors.check(vectors._open(matrix_path(path)), db, DIM)
    assert _ranking_matches_sqlite(db)


def test_a_removed_files_rows_are_freed_and_never_found(
    index: tuple[Path, sqlite3.Connection],
) -> None:
    path, db = index
    writer = Writer(path, db)
    with db:
        removed = store.drop_file(db, "c")
    writer.changed(db, removed, [])
    assert writer.rebuilds == 0 and writer.compactions == 0  # 20 of 100 free: under the fraction
    assert int((writer.keys == FREE).sum()) == 20
    found = vector_candidates(db, "i.db", _q(), None, 100)
    assert len(found) == 80 and all(file != "c" for (file, _), _ in found)
    assert _ranking_matches_sqlite(db)


def test_the_file_is_compacted_when_free_slots_pass_the_fraction(
    index: tuple[Path, sqlite3.Connection],
) -> None:
    path, db = index
    writer = Writer(path, db)
    with db:
        removed = store.drop_file(db, "a")
    writer.changed(db, removed, [])
    assert writer.compactions == 1
    assert writer.header.slots == writer.header.live == 50
    assert os.path.getsize(matrix_path(path)) == writer.header.size


def test_a_write_the_matrix_was_not_told_of_is_seen_and_the_matrix_rebuilt(
    index: tuple[Path, sqlite3.Connection],
) -> None:
    path, db = index
    Writer(path, db)
    with db:  # another program (or an older embedd) rewrites a vector
        db.execute("UPDATE chunks SET vector = ? WHERE file = 'a' AND idx = 0",
                   (_unit(1)[0].tobytes(),))  # fmt: skip
    matrix = vectors._open(matrix_path(path))
    with pytest.raises(Mismatch, match="generation"):
        vectors.check(matrix, db, DIM)
    matrix.close()
    assert _ranking_matches_sqlite(db)  # search rebuilt it


def _truncate(file: Path) -> None:
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) - 100)


def _flip_a_row(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[vectors.HEADER_BYTES + 3] ^= 0x40  # a bit of the first row's vector
    file.write_bytes(bytes(data))


def _zero_the_header(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(b"\0" * vectors.HEADER_BYTES + data[vectors.HEADER_BYTES :])


@pytest.mark.parametrize("damage", [_truncate, _flip_a_row, _zero_the_header, os.unlink],
                         ids=lambda f: f.__name__)  # fmt: skip
def test_a_damaged_or_missing_matrix_is_rebuilt_from_sqlite(
    index: tuple[Path, sqlite3.Connection], damage: Any
) -> None:
    path, db = index
    Writer(path, db)
    damage(matrix_path(path))
    assert _ranking_matches_sqlite(db)
    vectors.check(vectors._open(matrix_path(path)), db, DIM)


def test_an_index_from_before_the_matrix_is_ranked_from_sqlite_until_opened_for_writing(
    index: tuple[Path, sqlite3.Connection],
) -> None:
    path, db = index
    with db:
        for trigger in ("chunks_added", "chunks_removed", "chunks_changed"):
            db.execute(f"DROP TRIGGER {trigger}")
        db.execute("DELETE FROM meta WHERE key = 'generation'")
    q = _q()
    assert vector_candidates(db, "i.db", q, None, 5) == _sqlite_candidates(db, "i.db", q, None, 5)
    assert not matrix_path(path).exists()
    db.close()
    db = store.open_index(path)  # as `embedd index` opens it: triggers and generation added
    Writer(path, db)
    assert matrix_path(path).exists() and _ranking_matches_sqlite(db)
    db.close()


def test_a_path_filter_keeps_only_the_allowed_files_rows(
    index: tuple[Path, sqlite3.Connection],
) -> None:
    _path, db = index
    found = vector_candidates(db, "i.db", _q(), {"b"}, 100)
    assert len(found) == 30 and {file for (file, _), _ in found} == {"b"}


def test_stored_vectors_of_two_lengths_are_named_as_a_damaged_index(
    index: tuple[Path, sqlite3.Connection],
) -> None:
    _path, db = index
    with db:
        db.execute("UPDATE chunks SET vector = zeroblob(16 * 4) WHERE idx = 0")
    with pytest.raises(store.IndexUsageError, match="3 of 100 stored vectors are not 8 float32"):
        vector_candidates(db, "i.db", _q(), None, 10)


def test_a_folder_the_matrix_cannot_be_written_in_is_ranked_from_sqlite(
    index: tuple[Path, sqlite3.Connection],
) -> None:
    if os.geteuid() == 0:
        pytest.skip("root writes into a read-only folder")
    path, db = index
    os.chmod(path.parent, 0o555)
    try:
        q = _q()
        assert vector_candidates(db, "i", q, None, 5) == _sqlite_candidates(db, "i", q, None, 5)
    finally:
        os.chmod(path.parent, 0o755)


def test_dropping_an_index_deletes_its_matrix(index: tuple[Path, sqlite3.Connection]) -> None:
    path, db = index
    Writer(path, db)
    db.close()
    store.drop(path)
    assert not path.exists() and not matrix_path(path).exists()


# --------------------------------------------------------------------------------------------
# End to end: the real daemon, through the Python API


REPO = Path(__file__).resolve().parent.parent
QUERIES = ["what happens to an input longer than the model takes",
           "which languages does the bundled model understand"]  # fmt: skip


@pytest.fixture(scope="module")
def docs(daemon: Daemon, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from embedd.index import index_paths

    folder = tmp_path_factory.mktemp("matrix") / "docs"
    folder.mkdir()
    for name in ("long-inputs.md", "languages.md", "search.md"):
        shutil.copy(REPO / "docs" / name, folder / name)
    db = folder.parent / "docs.db"
    index_paths([folder], db, socket=daemon.socket)
    return folder, db


def _equal_to_sqlite(daemon: Daemon, db: Path) -> None:
    """Each query's vector ranking over the matrix is SQLite's own."""
    import embedd_client

    from embedd.index.search import _query_vector

    with embedd_client.Client(daemon.socket) as client, sqlite3.connect(db) as conn:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        for query in QUERIES:
            q = _query_vector(client, meta, query)
            via_matrix = vector_candidates(conn, str(db), q, None, 20)
            via_sqlite = _sqlite_candidates(conn, str(db), q, None, 20)
            assert [k for k, _ in via_matrix] == [k for k, _ in via_sqlite], query


def _found(daemon: Daemon, db: Path, query: str) -> list[tuple[str, tuple[int, int]]]:
    from embedd.index import search

    return [(h.file, h.span) for h in search(db, query, k=20, mode="vector", socket=daemon.socket)]


def test_indexing_writes_the_matrix_and_search_ranks_as_sqlite_does(
    daemon: Daemon, docs: tuple[Path, Path]
) -> None:
    _folder, db = docs
    assert matrix_path(db).exists()
    _equal_to_sqlite(daemon, db)


def test_reindexing_a_changed_file_updates_the_matrix_in_place(
    daemon: Daemon, docs: tuple[Path, Path]
) -> None:
    from embedd.index import index_paths

    folder, db = docs
    inode = os.stat(matrix_path(db)).st_ino
    page = folder / "languages.md"
    page.write_text(page.read_text() + "\n\nThe llama sleeps in the server room on Tuesdays.\n")
    index_paths([folder], db, socket=daemon.socket)
    assert os.stat(matrix_path(db)).st_ino == inode  # updated, not rebuilt
    assert _found(daemon, db, "where does the llama sleep")[0][0] == str(page)
    _equal_to_sqlite(daemon, db)


def test_a_deleted_file_leaves_the_matrix_and_search(
    daemon: Daemon, docs: tuple[Path, Path]
) -> None:
    from embedd.index import index_paths

    folder, db = docs
    (folder / "search.md").unlink()
    index_paths([folder], db, socket=daemon.socket)
    assert all(not f.endswith("search.md") for f, _ in _found(daemon, db, "BM25 keyword search"))
    _equal_to_sqlite(daemon, db)


def test_search_rebuilds_a_truncated_matrix_and_ranks_as_before(
    daemon: Daemon, docs: tuple[Path, Path]
) -> None:
    _folder, db = docs
    before = _found(daemon, db, QUERIES[0])
    _truncate(matrix_path(db))
    assert _found(daemon, db, QUERIES[0]) == before
    _equal_to_sqlite(daemon, db)


# --------------------------------------------------------------------------------------------
# Keyword search bounded the same way: the commonest words left out past a budget


def test_a_query_within_the_keyword_budget_is_scored_whole(
    index: tuple[Path, sqlite3.Connection],
) -> None:
    from embedd.index.search import _rare_words

    assert _rare_words(index[1], "chunk 7 of b") is None  # 233 (chunk, word) pairs


def test_an_identifier_held_whole_outranks_its_words_held_apart(tmp_path: Path) -> None:
    db = store.open_index(tmp_path / "k.db")
    store.check_model(db, "m", "fp")
    apart = "Enable static trampolines for all targets: all static, enable all"
    texts = ["Add ./configure --enable-all-static to link everything statically"] + [
        f"{apart} (part {i})" for i in range(9)
    ]
    rows = [{**row, "text": t} for row, t in zip(_rows("notes", len(texts)), texts, strict=True)]
    with db:
        db.execute("INSERT INTO files VALUES ('notes', 'x', ?, 0)", (len(texts),))
        store.insert_chunks(db, rows)
    from embedd.index.search import _bm25_ranking

    assert _bm25_ranking(db, "--enable-all-static", None, 3)[0][0] == ("notes", 0)


def test_words_joined_by_an_apostrophe_are_not_an_identifier() -> None:
    from embedd.index.search import _identifiers

    assert _identifiers("the parent domain's --enable-all-static HTTP/2") == [
        "enable all static",
        "HTTP 2",
    ]


def test_past_the_keyword_budget_the_commonest_words_are_left_out(
    index: tuple[Path, sqlite3.Connection], monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib

    search = importlib.import_module("embedd.index.search")  # the package names a function so
    monkeypatch.setattr(search, "BM25_POSTINGS", 10)
    _path, db = index
    # "chunks" and "of" are in all 100 chunks, "b" in 30, "7" in 3: only "7" fits in 10.
    assert search._rare_words(db, "Chunks of b 7") == ["7"]
    found = search._bm25_ranking(db, "Chunks of b 7", None, 3)
    assert {key for key, _ in found} == {("a", 7), ("b", 7), ("c", 7)}


@pytest.mark.parametrize(
    "rows", [1, vectors.SPLIT_ROWS - 1, vectors.SPLIT_ROWS, 3 * vectors.SPLIT_ROWS + 7]
)
def test_scores_split_across_threads_equal_one_products(rows: int) -> None:
    """A large matrix is scored in row parts on two threads: every row's score is the one a
    single product gives, in place, whichever part it fell in."""
    rng = np.random.default_rng(rows)
    matrix = rng.standard_normal((rows, 16)).astype(np.float32)
    q = rng.standard_normal(16).astype(np.float32)
    # Within float32 rounding: a part's rows may start at another alignment in memory.
    assert np.allclose(vectors.cosines(matrix, q), matrix @ q, rtol=1e-5, atol=1e-5)


def test_past_the_keyword_budget_an_identifier_holding_a_common_word_is_left_out(
    index: tuple[Path, sqlite3.Connection], monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib

    search = importlib.import_module("embedd.index.search")
    monkeypatch.setattr(search, "BM25_POSTINGS", 10)
    # "of-b" as a phrase would read the lists of "of" (100 chunks) and "b" (30) and match 30.
    found = search._bm25_ranking(index[1], "of-b 7", None, 10)
    assert {key for key, _ in found} == {("a", 7), ("b", 7), ("c", 7)}
