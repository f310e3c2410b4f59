"""The SQLite index: its schema, bringing an older index up to it, writing and reading rows,
the model it holds, and describing or deleting it.

One row per chunk (the shared chunk record of `records`, with SQLite's keys), a `files` table
of each document's content hash, a `meta` table (model, fingerprint, roots, chunk settings,
when) and an FTS5 copy of each chunk's text for BM25. An index from an older version is
upgraded in place when opened for writing, without re-embedding.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import embedd_client

from embedd.index import vectors
from embedd.index.records import COLUMNS, NAMES, chunk_id, start_lines
from embedd.index.vectors import row_key
from embedd.wire.options import VectorOptions

# The FTS5 tokenizer: Porter stemming over Unicode word splitting, so "renewed" finds "renew"
# and accents do not split words (SQLite's documented `porter unicode61` combination).
FTS_TOKENIZE = "porter unicode61 remove_diacritics 2"
# The chunk table is the shared chunk record (embedd/index/records.py) with SQLite's keys: a
# file's chunks go with it, and (file, idx) is unique.
_CHUNK_CONSTRAINTS = {
    "file": "NOT NULL REFERENCES files(path) ON DELETE CASCADE",
    "line": "NOT NULL DEFAULT 0",
}
_CHUNK_COLUMNS = ",\n    ".join(
    f"{c.name} {c.sqlite} {_CHUNK_CONSTRAINTS.get(c.name, 'NOT NULL')}" for c in COLUMNS
)
# Every chunk row inserted, deleted or given another vector or key moves `meta.generation` on
# by one, inside the same transaction, whichever program writes the index: the vector matrix
# (embedd/index/vectors.py) records the generation it matches, so a change it missed is seen.
_BUMP = "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'"
GENERATION_SCHEMA = f"""
INSERT OR IGNORE INTO meta VALUES ('generation', '0');
CREATE TRIGGER IF NOT EXISTS chunks_added AFTER INSERT ON chunks BEGIN {_BUMP}; END;
CREATE TRIGGER IF NOT EXISTS chunks_removed AFTER DELETE ON chunks BEGIN {_BUMP}; END;
CREATE TRIGGER IF NOT EXISTS chunks_changed AFTER UPDATE OF vector, file, idx ON chunks
BEGIN {_BUMP}; END;
"""
# Meta keys that are not the index's settings (a new index has only these).
BOOKKEEPING = {"generation"}
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY, sha256 TEXT NOT NULL, chunks INTEGER NOT NULL, indexed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    {_CHUNK_COLUMNS},
    PRIMARY KEY (file, idx)
);
CREATE TABLE IF NOT EXISTS text_hashes (
    hash TEXT NOT NULL, file TEXT NOT NULL, idx INTEGER NOT NULL,
    PRIMARY KEY (file, idx),
    FOREIGN KEY (file, idx) REFERENCES chunks (file, idx) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS text_hashes_by_hash ON text_hashes (hash);
{GENERATION_SCHEMA}
"""
# Rows go in by column name: an index upgraded in place has its columns in another order.
INSERT_CHUNK = f"INSERT INTO chunks ({', '.join(NAMES)}) VALUES ({', '.join('?' * len(NAMES))})"
# What `embedd index` embeds with, sent with each request and hashed into each chunk's id:
# chunks fit the model, and a longer word is cut.
INDEX_OPTIONS = VectorOptions(long="truncate")
# The keyword index: its own copy of each chunk's text with the chunk's key. Its rowid is a
# hash of (file, idx) (`vectors.row_key`), not the chunks table's rowid, which VACUUM may renumber.
FTS_SCHEMA = f"""
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(
    text, file UNINDEXED, idx UNINDEXED, tokenize = '{FTS_TOKENIZE}'
);
"""
FTS_TABLE = "chunks_fts"

# The tables an index has; a database with tables but not these is someone else's file.
INDEX_TABLES = {"meta", "files", "chunks"}
# Bytes per stored vector component (float32).
VECTOR_ITEM_BYTES = 4
# Values bound in one SQL statement at most: SQLite's SQLITE_MAX_VARIABLE_NUMBER is 999 in
# builds before 3.32, which some systems still ship.
SQL_PARAMS = 900


class IndexUsageError(Exception):
    """A problem the user must fix (wrong model, unreadable index); the message says which."""


def display(name: str) -> str:
    """A path as it can be printed: bytes of a non-UTF-8 file name (kept by Python as lone
    surrogates) shown as backslash-x escapes."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def tables_of(db: sqlite3.Connection) -> set[str]:
    return {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def open_index(path: Path) -> sqlite3.Connection:
    """The index at `path`, created if new, brought up to this version's schema (see
    `_upgrade`). A directory, or an SQLite file that has tables but not an index's, is refused
    before anything is written to it: `--out` pointed at another program's database must not
    get our tables added."""
    if path.is_dir():
        raise IndexUsageError(f"{display(str(path))} is a directory; --out names the index file")
    db = sqlite3.connect(path)
    try:
        tables = tables_of(db)
        if tables and "meta" not in tables:
            raise IndexUsageError(
                f"{display(str(path))} is an SQLite database but not an embedd index (no meta "
                "table); choose another --out"
            )
        db.execute("PRAGMA foreign_keys = ON")
        db.executescript(SCHEMA)
        _upgrade(db, tables)
    except BaseException:
        db.close()
        raise
    return db


def columns_of(db: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}


def _upgrade(db: sqlite3.Connection, tables: set[str]) -> None:
    """An index written by an older version gains what this one reads, without re-embedding:
    the `line` column (0 until `fill_lines` computes it from the unchanged file), the FTS5
    table filled from the stored chunk texts, and the shared chunk record's names (the
    fingerprint column is `model_fingerprint`) and ids, computed from the stored rows."""
    with db:
        columns = columns_of(db, "chunks")
        if "line" not in columns:
            db.execute("ALTER TABLE chunks ADD COLUMN line INTEGER NOT NULL DEFAULT 0")
        if "fingerprint" in columns and "model_fingerprint" not in columns:
            db.execute("ALTER TABLE chunks RENAME COLUMN fingerprint TO model_fingerprint")
        if "id" not in columns:
            db.execute("ALTER TABLE chunks ADD COLUMN id TEXT NOT NULL DEFAULT ''")
            stored = db.execute("SELECT file, idx, text, model_fingerprint FROM chunks")
            db.executemany(
                "UPDATE chunks SET id = ? WHERE file = ? AND idx = ?",
                [(chunk_id(t, fp, INDEX_OPTIONS, file=f, idx=i), f, i) for f, i, t, fp in stored],
            )
        if FTS_TABLE not in tables:
            db.execute(FTS_SCHEMA)
            rows = db.execute("SELECT file, idx, text FROM chunks")
            db.executemany(
                f"INSERT INTO {FTS_TABLE} (rowid, text, file, idx) VALUES (?, ?, ?, ?)",
                ((row_key(f, i), t, f, i) for f, i, t in rows.fetchall()),
            )
        if "text_hashes" not in tables:
            rows = db.execute("SELECT file, idx, text FROM chunks")
            db.executemany(
                "INSERT INTO text_hashes VALUES (?, ?, ?)",
                ((text_hash(t), f, i) for f, i, t in rows.fetchall()),
            )


def text_hash(text: str) -> str:
    """What makes two chunks the same text for embedding: NFC Unicode, whitespace runs as one
    space, no leading or trailing space (the model's tokenizer splits on whitespace, so those
    texts have the same tokens and the same vector), hashed with BLAKE2b-128 (the same
    collision bound as a chunk's id)."""
    normal = " ".join(unicodedata.normalize("NFC", text).split())
    return hashlib.blake2b(normal.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def select_in(
    db: sqlite3.Connection, sql: str, values: Sequence[Any], *, width: int = 1
) -> Iterator[Any]:
    """The rows of `sql` over all of `values`, at most SQL_PARAMS bound a statement: `{marks}`
    in `sql` becomes each batch's placeholders (`?,?` for single values, `(?,?),(?,?)` for
    tuples of `width`, as a `VALUES` list takes them)."""
    per = max(1, SQL_PARAMS // width)
    mark = "?" if width == 1 else "(" + ",".join("?" * width) + ")"
    for first in range(0, len(values), per):
        part = values[first : first + per]
        bound = part if width == 1 else [v for row in part for v in row]
        yield from db.execute(sql.replace("{marks}", ",".join([mark] * len(part))), bound)


def stored_vectors(db: sqlite3.Connection, hashes: Sequence[str]) -> dict[str, bytes]:
    """A stored vector for each of the text hashes `hashes` the index already holds (every
    vector of an index is of one model and one set of options, so any of them serves)."""
    # One stored copy per hash: a text repeated in thousands of files (a licence header)
    # would otherwise read every copy's vector again for each new file.
    rows = select_in(
        db,
        "SELECT q.hash, (SELECT c.vector FROM text_hashes h JOIN chunks c "
        "ON c.file = h.file AND c.idx = h.idx WHERE h.hash = q.hash LIMIT 1) "
        "FROM (SELECT DISTINCT hash FROM text_hashes WHERE hash IN ({marks})) AS q",
        sorted(set(hashes)),
    )
    return {h: bytes(v) for h, v in rows}


def drop_file(db: sqlite3.Connection, name: str) -> list[int]:
    """Remove one file's rows: its chunks (by cascade) and their keyword rows; returns the
    row keys removed (for the vector matrix)."""
    idxs = [row[0] for row in db.execute("SELECT idx FROM chunks WHERE file = ?", (name,))]
    keys = [row_key(name, i) for i in idxs]
    db.executemany(f"DELETE FROM {FTS_TABLE} WHERE rowid = ?", ((k,) for k in keys))
    db.execute("DELETE FROM files WHERE path = ?", (name,))
    return keys


def insert_chunks(db: sqlite3.Connection, rows: Sequence[Mapping[str, Any]]) -> None:
    """Store chunk records (maps by the shared column names), their keyword rows and their
    text hashes (a record's `text_hash` when it carries one, as indexing's do)."""
    db.executemany(INSERT_CHUNK, ([r[name] for name in NAMES] for r in rows))
    db.executemany(
        f"INSERT INTO {FTS_TABLE} (rowid, text, file, idx) VALUES (?, ?, ?, ?)",
        ((row_key(r["file"], r["idx"]), r["text"], r["file"], r["idx"]) for r in rows),
    )
    db.executemany(
        "INSERT INTO text_hashes VALUES (?, ?, ?)",
        ((r.get("text_hash") or text_hash(r["text"]), r["file"], r["idx"]) for r in rows),
    )


def stored_dim(db: sqlite3.Connection) -> int | None:
    """The dimension of the vectors an index holds (None while it holds none)."""
    row = db.execute("SELECT length(vector) FROM chunks LIMIT 1").fetchone()
    return None if row is None else int(row[0]) // VECTOR_ITEM_BYTES


def fill_lines(db: sqlite3.Connection, name: str, text: str) -> None:
    """Line numbers for the chunks of a file indexed before they were stored, from the file
    as it is now (its hash is unchanged, so the offsets still hold)."""
    rows = db.execute("SELECT idx, start FROM chunks WHERE file = ?", (name,)).fetchall()
    lines = start_lines(text, [start for _, start in rows])
    db.executemany(
        "UPDATE chunks SET line = ? WHERE file = ? AND idx = ?",
        [(line, name, idx) for (idx, _), line in zip(rows, lines, strict=True)],
    )


def open_read_only(index: Path, shown: str) -> tuple[sqlite3.Connection, set[str]]:
    # A URI, so the file is opened read-only; as_uri() escapes `?`, `#` and `%` in the path.
    db = sqlite3.connect(f"{index.resolve().as_uri()}?mode=ro", uri=True)
    try:
        tables = tables_of(db)
        missing = INDEX_TABLES - tables
        if missing:
            raise IndexUsageError(
                f"{shown} is an SQLite database but not an embedd index (it lacks the "
                f"table{'s' if len(missing) > 1 else ''} {', '.join(sorted(missing))})"
            )
    except BaseException:
        db.close()
        raise
    return db, tables


# --------------------------------------------------------------------------------------------
# The model an index holds


def model_card(client: embedd_client.Client, model: str) -> dict[str, Any]:
    client.load(model)
    for m in client.models():
        if m["name"] == model:
            return m
    raise IndexUsageError(f"the daemon has no model {model!r}")


def mismatch(stored: str, current: str, built_with: str, model: str) -> IndexUsageError | None:
    """Why vectors of an index built with `stored` cannot meet the daemon's `current`."""
    if stored == current:
        return None
    if stored.split("+")[0] == current.split("+")[0]:
        old = stored.partition("+")[2] or "an older one"
        return IndexUsageError(
            f"this index is stale: it was built with another tokenizer ({old}) than the "
            f"daemon's {model!r} uses now ({current.partition('+')[2]}): rebuild it with "
            "`embedd index`"
        )
    return IndexUsageError(
        f"this index was built with model {built_with!r} (fingerprint {stored[:12]}); the "
        f"daemon's {model!r} is {current[:12]}: use the same model, or rebuild the index with "
        "`embedd index`"
    )


def check_model(db: sqlite3.Connection, model: str, fingerprint: str) -> None:
    rows = dict(db.execute("SELECT key, value FROM meta").fetchall())
    if not rows.keys() - BOOKKEEPING:
        db.execute("INSERT INTO meta VALUES ('model', ?), ('fingerprint', ?)", (model, fingerprint))
        return
    error = mismatch(str(rows.get("fingerprint", "")), fingerprint, rows.get("model", ""), model)
    if error is not None:
        raise error


# --------------------------------------------------------------------------------------------
# The run's settings


@dataclass(frozen=True)
class Chunking:
    """How files are cut: at most `tokens` per chunk (None: the model's limit), `overlap`
    tokens shared by neighbours. Stored in the index: a run with other settings re-chunks
    every file, since chunks of two sizes would rank unevenly."""

    tokens: int | None = None
    overlap: int = 0

    def key(self) -> str:
        return json.dumps({"chunk_tokens": self.tokens, "overlap": self.overlap})


def record_run(db: sqlite3.Connection, paths: Sequence[Path], chunking: Chunking) -> bool:
    """Store the roots (search shows paths relative to them), the chunk settings and when;
    True if the settings differ from those the index was built with (an index from before
    they were stored was built with the defaults)."""
    meta: dict[str, str] = dict(db.execute("SELECT key, value FROM meta").fetchall())
    roots = sorted(set(json.loads(meta.get("roots", "[]"))) | {str(p.resolve()) for p in paths})
    now = str(time.time())
    db.executemany(
        "INSERT OR REPLACE INTO meta VALUES (?, ?)",
        [("roots", json.dumps(roots)), ("chunking", chunking.key()), ("updated", now)]
        + ([] if "created" in meta else [("created", now)]),
    )
    return meta.get("chunking", Chunking().key()) != chunking.key()


def relative_paths(files: Sequence[str], roots: Sequence[str]) -> dict[str, str]:
    """Each file's path relative to the indexed root holding it (the deepest, if nested; the
    file name for a file given itself). An index from before roots were stored uses the
    folder all its files share."""
    if not roots and files:
        common = os.path.commonpath(files)
        roots = [common if len(files) > 1 else os.path.dirname(common)]
    out = {}
    for f in files:
        best = f
        for root in roots:
            if f == root:
                candidate = os.path.basename(f)
            elif f.startswith(root.rstrip("/") + "/"):
                candidate = f[len(root.rstrip("/")) + 1 :]
            else:
                continue
            if best == f or len(candidate) < len(best):
                best = candidate
        out[f] = best
    return out


# --------------------------------------------------------------------------------------------
# Describing and dropping an index


@dataclass(frozen=True)
class IndexInfo:
    """What `embedd index --list` shows: the model, when, the roots and chunk settings, and
    each file (relative path, chunks, when it was indexed)."""

    path: str
    model: str
    fingerprint: str
    created: float | None
    updated: float | None
    roots: list[str]
    chunking: dict[str, Any]
    keyword_search: bool
    files: list[tuple[str, int, float]]

    @property
    def chunks(self) -> int:
        return sum(n for _, n, _ in self.files)


def describe(index: str | os.PathLike[str]) -> IndexInfo:
    """The contents of an index, read-only; IndexUsageError as for `search`."""
    path = Path(index)
    shown = display(str(path))
    if not path.exists():
        raise IndexUsageError(f"no index at {shown}")
    if path.is_dir():
        raise IndexUsageError(f"{shown} is a directory, not an index file")
    try:
        db, tables = open_read_only(path, shown)
        try:
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            rows = db.execute("SELECT path, chunks, indexed_at FROM files").fetchall()
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise IndexUsageError(
            f"{shown}: {exc} (not an index `embedd index` wrote, or damaged)"
        ) from None
    roots = json.loads(meta.get("roots", "[]"))
    rel = relative_paths([r[0] for r in rows], roots)
    files = sorted((rel[f], int(n), float(t)) for f, n, t in rows)
    when = [t for _, _, t in files]
    return IndexInfo(
        path=str(path),
        model=meta.get("model", "?"),
        fingerprint=meta.get("fingerprint", ""),
        created=float(meta["created"]) if "created" in meta else (min(when) if when else None),
        updated=float(meta["updated"]) if "updated" in meta else (max(when) if when else None),
        roots=roots,
        chunking=json.loads(meta.get("chunking", Chunking().key())),
        keyword_search=FTS_TABLE in tables,
        files=files,
    )


def drop(index: str | os.PathLike[str]) -> None:
    """Delete the index file (and SQLite's journal files beside it) after checking it is an
    embedd index: its tables and a model fingerprint. Anything else is refused untouched."""
    path = Path(index)
    shown = display(str(path))
    if not path.exists():
        raise IndexUsageError(f"no index at {shown}")
    if not path.is_file():
        raise IndexUsageError(f"{shown} is not a file; nothing deleted")
    try:
        db, _ = open_read_only(path, shown)
        try:
            fingerprint = db.execute("SELECT value FROM meta WHERE key = 'fingerprint'").fetchone()
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise IndexUsageError(f"{shown}: {exc}: not an embedd index; nothing deleted") from None
    except IndexUsageError as exc:
        raise IndexUsageError(f"{exc}; nothing deleted") from None
    if fingerprint is None:
        raise IndexUsageError(f"{shown} has no model fingerprint: not an embedd index; "
                              "nothing deleted")  # fmt: skip
    path.unlink()
    vectors.remove(path)
    for suffix in ("-journal", "-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
