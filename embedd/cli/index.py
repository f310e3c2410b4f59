"""`embedd index` and `embedd search`: a folder of notes to a semantic search, in one SQLite file.

`index` walks files (text, Markdown, and PDFs when the optional `pdf` extra is installed),
cuts each into chunks with the daemon's `chunk` op (the model's own tokenizer and limit),
embeds them at bulk priority and stores one row per chunk with its vector as float32 bytes.
Each file is committed when all its chunks are stored, so an interrupted run resumes with the
next file, and a re-run touches only files whose content hash changed (and drops the rows of
files that are gone). `search` embeds a query at interactive priority and ranks the chunks by
cosine, refusing an index built with another model (fingerprints differ).
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import os
import sqlite3
import stat
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import embedd_client
import numpy as np

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst", ".text", ".py", ".org", ".adoc"}
PDF_SUFFIX = ".pdf"
# Files larger than this are skipped with a message: a notes folder's odd 2 GB log is not
# something to embed by accident (the daemon's frame limit is 64 MiB anyway).
MAX_FILE_BYTES = 32 * 1024 * 1024
# Chunks embedded per request (bulk priority; small enough to keep memory flat).
EMBED_BATCH = 32
# Directories never walked into.
SKIP_DIRS = {".git", ".hg", ".svn", "__pycache__", "node_modules", ".venv"}

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY, sha256 TEXT NOT NULL, chunks INTEGER NOT NULL, indexed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    file TEXT NOT NULL REFERENCES files(path) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    start INTEGER NOT NULL,
    end INTEGER NOT NULL,
    text TEXT NOT NULL,
    tokens INTEGER NOT NULL,
    model TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    vector BLOB NOT NULL,
    PRIMARY KEY (file, idx)
);
"""


# The tables an index has; a database with tables but not these is someone else's file.
INDEX_TABLES = {"meta", "files", "chunks"}
# Bytes per stored vector component (float32).
VECTOR_ITEM_BYTES = 4

# Why a file was skipped: the summary counts skips by these.
SKIP_UNREADABLE = "unreadable"
SKIP_NOT_REGULAR = "not a regular file"
SKIP_TOO_LARGE = "too large"
SKIP_BINARY = "binary"
SKIP_NOT_UTF8 = "not UTF-8 text"
SKIP_NAME_NOT_UTF8 = "file name not UTF-8"
SKIP_PDF = "PDF not read"
SKIP_REFUSED = "refused by the daemon"


class IndexUsageError(Exception):
    """A problem the user must fix (wrong model, unreadable index); the message says which."""


class Skipped(Exception):
    """A file left out of this run, and why: `reason` is one of the SKIP_* categories the
    summary counts; the message is the detail printed next to the file's name."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass
class Counts:
    files_seen: int = 0
    files_indexed: int = 0
    files_unchanged: int = 0
    files_removed: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    chunks: int = 0

    @property
    def files_skipped(self) -> int:
        return sum(self.skipped.values())

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def summary(counts: Counts, out: str) -> str:
    """The line `embedd index` ends with; skips are counted by reason, so a user can tell
    "3 skipped" that are binaries from 3 that could not be read."""
    skipped = f"{counts.files_skipped} skipped"
    if counts.skipped:
        by_reason = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.skipped.items()))
        skipped += f" ({by_reason})"
    return (
        f"indexed {counts.files_indexed} files ({counts.chunks} chunks), "
        f"{counts.files_unchanged} unchanged, {counts.files_removed} removed, {skipped} -> {out}"
    )


def display(name: str) -> str:
    """A path as it can be printed: bytes of a non-UTF-8 file name (kept by Python as lone
    surrogates) shown as backslash-x escapes."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _tables(db: sqlite3.Connection) -> set[str]:
    return {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def _open(path: Path) -> sqlite3.Connection:
    """The index at `path`, created if new. A directory, or an SQLite file that has tables but
    not an index's, is refused before anything is written to it: `--out` pointed at another
    program's database must not get our tables added."""
    if path.is_dir():
        raise IndexUsageError(f"{display(str(path))} is a directory; --out names the index file")
    db = sqlite3.connect(path)
    try:
        tables = _tables(db)
        if tables and "meta" not in tables:
            raise IndexUsageError(
                f"{display(str(path))} is an SQLite database but not an embedd index (no meta "
                "table); choose another --out"
            )
        db.execute("PRAGMA foreign_keys = ON")
        db.executescript(SCHEMA)
    except BaseException:
        db.close()
        raise
    return db


def _excluded(rel: str, patterns: Sequence[str]) -> bool:
    parts = rel.split("/")
    for pattern in patterns:
        pat = pattern.rstrip("/")
        if fnmatch.fnmatch(rel, pat) or any(fnmatch.fnmatch(p, pat) for p in parts):
            return True
    return False


def walk(paths: Sequence[Path], excludes: Sequence[str]) -> Iterator[Path]:
    """Files to index under `paths`, in a stable order, gitignore-style excludes applied (a
    pattern matches the relative path or any of its components)."""
    for root in paths:
        if root.is_file():
            yield root.resolve()
            continue
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root).as_posix()
            if any(part in SKIP_DIRS for part in path.relative_to(root).parts):
                continue
            if path.is_file() and not _excluded(rel, excludes):
                suffix = path.suffix.lower()
                if suffix in TEXT_SUFFIXES or suffix == PDF_SUFFIX:
                    yield path.resolve()


def read_file(path: Path) -> bytes:
    """The file's bytes, or Skipped. The size is checked before anything is read (fstat of the
    opened file, so the file checked is the file read) and the read itself is bounded at the
    limit: a 500 MB log in a notes folder costs a stat, not 500 MB of memory. O_NONBLOCK keeps
    a FIFO from blocking the open; it is refused as not a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise Skipped(SKIP_UNREADABLE, exc.strerror or str(exc)) from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise Skipped(SKIP_NOT_REGULAR, "not a regular file")
        too_large = Skipped(SKIP_TOO_LARGE, f"larger than {MAX_FILE_BYTES // 2**20} MiB")
        if info.st_size > MAX_FILE_BYTES:
            raise too_large
        try:
            data = f.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            raise Skipped(SKIP_UNREADABLE, exc.strerror or str(exc)) from None
    if len(data) > MAX_FILE_BYTES:  # it grew after the fstat
        raise too_large
    return data


def decode(path: Path, data: bytes) -> str:
    """The text of a file whose bytes are `data`, or Skipped with the reason. A NUL byte marks
    a binary file (as for git and grep): its "text" would be control characters the model has
    no tokens for."""
    if path.suffix.lower() == PDF_SUFFIX:
        try:
            from pypdf import PdfReader  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            raise Skipped(
                SKIP_PDF,
                "PDF support needs pypdf: pip install pypdf (or embedd's pdf extra: "
                "pip install '.[pdf]')",
            ) from None
        try:
            reader = PdfReader(io.BytesIO(data))
            return "\n\n".join(page.extract_text() or "" for page in reader.pages)
        except Exception as exc:  # pypdf raises many kinds for a damaged PDF
            raise Skipped(SKIP_PDF, f"cannot read this PDF ({exc})") from None
    if b"\0" in data:
        raise Skipped(SKIP_BINARY, f"binary (a NUL byte at byte {data.index(0)})")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Skipped(SKIP_NOT_UTF8, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _utf8_name(name: str) -> None:
    """SQLite stores text as UTF-8: a file name with bytes that are not UTF-8 cannot be a key."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise Skipped(SKIP_NAME_NOT_UTF8, "the file name is not UTF-8; rename it") from None


class _Progress:
    """files, chunks, chunks/s and ETA: a redrawn line on a terminal, plain lines otherwise."""

    def __init__(self, total_files: int, tty: bool) -> None:
        self.total = total_files
        self.tty = tty
        self.started = time.monotonic()
        self.last_plain = 0.0

    def update(self, counts: Counts, current: str) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = counts.chunks / elapsed
        done = counts.files_indexed + counts.files_unchanged + counts.files_skipped
        eta = (elapsed / done) * (self.total - done) if done else 0.0
        line = (
            f"files {done}/{self.total}  chunks {counts.chunks}  {rate:.1f} chunks/s  "
            f"ETA {eta:.0f}s  {current[-40:]}"
        )
        if self.tty:
            sys.stderr.write("\r" + line.ljust(110)[:110])
            sys.stderr.flush()
        elif time.monotonic() - self.last_plain >= 2.0 or done == self.total:
            self.last_plain = time.monotonic()
            print(line, file=sys.stderr)

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def _model_card(client: embedd_client.Client, model: str) -> dict[str, Any]:
    client.load(model)
    for m in client.models():
        if m["name"] == model:
            return m
    raise IndexUsageError(f"the daemon has no model {model!r}")


def _check_model(db: sqlite3.Connection, model: str, fingerprint: str) -> None:
    rows = dict(db.execute("SELECT key, value FROM meta").fetchall())
    if not rows:
        db.execute("INSERT INTO meta VALUES ('model', ?), ('fingerprint', ?)", (model, fingerprint))
        return
    if rows.get("fingerprint") != fingerprint:
        raise IndexUsageError(
            f"this index was built with model {rows.get('model')!r} (fingerprint "
            f"{rows.get('fingerprint', '')[:12]}); the daemon's {model!r} is "
            f"{fingerprint[:12]}: use the same model, or build a new index"
        )


def build(
    client: embedd_client.Client,
    paths: Sequence[Path],
    out: Path,
    *,
    model: str = "default",
    excludes: Sequence[str] = (),
    tty: bool = False,
) -> Counts:
    """Index the files under `paths` into `out`; returns what was done. Raises
    IndexUsageError, naming `out`, when the index cannot be opened, read or written (not an
    SQLite file, another program's database, a directory, a full disk)."""
    card = _model_card(client, model)
    fingerprint = str(card.get("fingerprint") or "")
    try:
        return _build(client, paths, out, model, fingerprint, excludes, tty)
    except sqlite3.Error as exc:
        raise IndexUsageError(f"{display(str(out))}: {exc}") from None


def _build(
    client: embedd_client.Client,
    paths: Sequence[Path],
    out: Path,
    model: str,
    fingerprint: str,
    excludes: Sequence[str],
    tty: bool,
) -> Counts:
    db = _open(out)
    counts = Counts()
    try:
        _check_model(db, model, fingerprint)
        db.commit()
        files = list(walk(paths, excludes))
        known = dict(db.execute("SELECT path, sha256 FROM files").fetchall())
        progress = _Progress(len(files), tty)
        for path in files:
            counts.files_seen += 1
            name = str(path)
            try:
                _utf8_name(name)
                data = read_file(path)
                digest = hashlib.sha256(data).hexdigest()
                if known.get(name) == digest:
                    counts.files_unchanged += 1
                else:
                    text = decode(path, data)
                    del data  # the text is what is kept from here on
                    _index_file(client, db, name, digest, text, model, fingerprint, counts)
                    counts.files_indexed += 1
            except Skipped as skip:
                counts.skip(skip.reason)
                print(f"skipped {display(name)}: {skip}", file=sys.stderr)
            progress.update(counts, display(name))
        present = {str(p) for p in files}
        gone = [p for p in known if p not in present and _under(p, paths)]
        for p in gone:
            db.execute("DELETE FROM files WHERE path = ?", (p,))
        counts.files_removed = len(gone)
        db.commit()
        progress.close()
    finally:
        db.close()
    return counts


def _under(path: str, roots: Sequence[Path]) -> bool:
    p = Path(path)
    return any(p == r.resolve() or r.resolve() in p.parents for r in roots)


def _index_file(
    client: embedd_client.Client,
    db: sqlite3.Connection,
    name: str,
    digest: str,
    text: str,
    model: str,
    fingerprint: str,
    counts: Counts,
) -> None:
    """One file, in one transaction: all its chunks or none (Ctrl-C rolls it back). Text the
    daemon refuses as a bad request (say, only control or private-use characters, for which the
    model has no tokens) skips this file, not the run: the next run would meet it again."""
    rows: list[tuple[Any, ...]] = []
    try:
        chunks = client.chunk(text, model) if text.strip() else []
        batches = client.embed_documents(
            (c["text"] for c in chunks), model, batch_size=EMBED_BATCH, truncate=True
        )
        offset = 0
        for vectors in batches:
            for j, vec in enumerate(vectors):
                c = chunks[offset + j]
                rows.append(
                    (name, offset + j, c["span"][0], c["span"][1], c["text"], c["tokens"], model,
                     fingerprint, np.asarray(vec, dtype="<f4").tobytes())
                )  # fmt: skip
            offset += len(vectors)
    except embedd_client.EmbeddError as exc:
        if exc.code != "bad_request":
            raise
        raise Skipped(SKIP_REFUSED, exc.message) from None
    with db:
        db.execute("DELETE FROM files WHERE path = ?", (name,))
        db.execute(
            "INSERT INTO files VALUES (?, ?, ?, ?)", (name, digest, len(chunks), time.time())
        )
        db.executemany("INSERT INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    counts.chunks += len(rows)


@dataclass(frozen=True)
class Hit:
    file: str
    span: tuple[int, int]
    score: float
    text: str


def search(client: embedd_client.Client, index: Path, query: str, *, k: int = 10) -> list[Hit]:
    """The `k` chunks closest to `query`. Raises IndexUsageError, naming the file, for anything
    wrong with `index` (missing, a directory, not SQLite, truncated, another program's
    database, vectors of another length than the model's)."""
    shown = display(str(index))
    if not index.exists():
        raise IndexUsageError(f"no index at {shown} (build one with `embedd index`)")
    if index.is_dir():
        raise IndexUsageError(f"{shown} is a directory, not an index file")
    try:
        return _search(client, index, shown, query, k)
    except sqlite3.Error as exc:
        raise IndexUsageError(
            f"{shown}: {exc} (not an index `embedd index` wrote, or damaged)"
        ) from None


def _search(client: embedd_client.Client, index: Path, shown: str, query: str, k: int) -> list[Hit]:
    # A URI, so the file is opened read-only; as_uri() escapes `?`, `#` and `%` in the path.
    db = sqlite3.connect(f"{index.resolve().as_uri()}?mode=ro", uri=True)
    try:
        missing = INDEX_TABLES - _tables(db)
        if missing:
            raise IndexUsageError(
                f"{shown} is an SQLite database but not an embedd index (it lacks the "
                f"table{'s' if len(missing) > 1 else ''} {', '.join(sorted(missing))})"
            )
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        model = meta.get("model", "default")
        card = _model_card(client, model)
        if card.get("fingerprint") != meta.get("fingerprint"):
            raise IndexUsageError(
                f"this index was built with model {model!r} fingerprint "
                f"{str(meta.get('fingerprint'))[:12]}, but the daemon's {model!r} is now "
                f"{str(card.get('fingerprint'))[:12]}: rebuild the index with `embedd index`"
            )
        prompt = "query" if "query" in (card.get("prompts") or []) else None
        q = client.embed_query(query, model, prompt=prompt)
        rows = db.execute("SELECT file, start, end, text, vector FROM chunks").fetchall()
    finally:
        db.close()
    if not rows:
        return []
    width = len(q) * VECTOR_ITEM_BYTES
    wrong = [r for r in rows if not isinstance(r[4], bytes) or len(r[4]) != width]
    if wrong:
        first = wrong[0][4]
        size = f"{len(first)} bytes" if isinstance(first, bytes) else type(first).__name__
        raise IndexUsageError(
            f"{shown}: {len(wrong)} of {len(rows)} stored vectors are not {len(q)} float32 "
            f"(the model's dimension); the first is {size}: the index is damaged, rebuild it"
        )
    matrix = np.frombuffer(b"".join(r[4] for r in rows), dtype="<f4").reshape(len(rows), -1)
    scores = matrix @ (q / np.linalg.norm(q))  # stored vectors are normalized
    order = np.argsort(-scores)[:k]
    return [Hit(rows[i][0], (rows[i][1], rows[i][2]), float(scores[i]), rows[i][3]) for i in order]


def hits_json(hits: Sequence[Hit]) -> str:
    return json.dumps(
        [{"file": h.file, "span": list(h.span), "score": h.score, "text": h.text} for h in hits],
        indent=2,
    )


def hits_text(hits: Sequence[Hit]) -> str:
    lines = []
    for h in hits:
        snippet = " ".join(h.text.split())[:160]
        lines.append(f"{h.score:.3f}  {h.file}:{h.span[0]}-{h.span[1]}\n       {snippet}")
    return "\n".join(lines) if lines else "(no chunks in the index)"
