"""`embedd index` and `embedd search`: a folder of notes to a semantic search, in one SQLite file.

`index` walks files (text, Markdown, and PDFs when the optional `pdf` extra is installed),
cuts each into chunks with the daemon's `chunk` op (the model's own tokenizer and limit),
embeds them at bulk priority and stores one row per chunk with its vector as float32 bytes.
Each file is committed when all its chunks are stored, so an interrupted run resumes with the
next file, and a re-run touches only files whose content hash changed (and drops the rows of
files that are gone). `search` embeds a query at interactive priority and ranks the chunks by
cosine, refusing an index built with another model or another tokenizer (fingerprints differ:
the fingerprint is the model file's plus the daemon's tokenizer version, so an index built
before a tokenizer fix is reported as stale instead of mixing old vectors with new queries).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import sqlite3
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
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


class IndexUsageError(Exception):
    """A problem the user must fix (wrong model, unreadable index); the message says which."""


@dataclass
class Counts:
    files_seen: int = 0
    files_indexed: int = 0
    files_unchanged: int = 0
    files_removed: int = 0
    files_skipped: int = 0
    chunks: int = 0


def _open(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path)
    db.execute("PRAGMA foreign_keys = ON")
    db.executescript(SCHEMA)
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


def read_text(path: Path) -> str:
    """The file's text; raises OSError/ValueError with a reason when it cannot be read."""
    if path.stat().st_size > MAX_FILE_BYTES:
        raise ValueError(f"larger than {MAX_FILE_BYTES // 2**20} MiB")
    if path.suffix.lower() == PDF_SUFFIX:
        try:
            from pypdf import PdfReader  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            raise ValueError(
                "PDF support needs the optional pdf extra: pip install 'embedd[pdf]'"
            ) from None
        reader = PdfReader(str(path))
        return "\n\n".join(page.extract_text() or "" for page in reader.pages)
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None


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


def _fingerprint(card: dict[str, Any]) -> str:
    """What an index's vectors depend on: the model file's content and the tokenizer."""
    file_print = str(card.get("fingerprint") or "")
    tokenizer = card.get("tokenizer")
    return f"{file_print}+{tokenizer}" if tokenizer else file_print


def _tokenizer_changed(stored: str, current: str) -> bool:
    """Same model file, other tokenizer (an index built before a tokenizer fix)."""
    return stored != current and stored.split("+")[0] == current.split("+")[0]


def _check_model(db: sqlite3.Connection, model: str, fingerprint: str) -> None:
    rows = dict(db.execute("SELECT key, value FROM meta").fetchall())
    if not rows:
        db.execute("INSERT INTO meta VALUES ('model', ?), ('fingerprint', ?)", (model, fingerprint))
        return
    stored = str(rows.get("fingerprint", ""))
    if _tokenizer_changed(stored, fingerprint):
        raise IndexUsageError(
            f"this index is stale: it was built with another tokenizer ({stored}) than the "
            f"daemon's {model!r} uses now ({fingerprint}); build a new index"
        )
    if stored != fingerprint:
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
    card = _model_card(client, model)
    fingerprint = _fingerprint(card)
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
                data = path.read_bytes()
            except OSError as exc:
                counts.files_skipped += 1
                print(f"skipped {name}: {exc.strerror or exc}", file=sys.stderr)
                continue
            digest = hashlib.sha256(data).hexdigest()
            if known.get(name) == digest:
                counts.files_unchanged += 1
                progress.update(counts, name)
                continue
            try:
                text = read_text(path)
            except (OSError, ValueError) as exc:
                counts.files_skipped += 1
                print(f"skipped {name}: {exc}", file=sys.stderr)
                continue
            _index_file(client, db, name, digest, text, model, fingerprint, counts)
            counts.files_indexed += 1
            progress.update(counts, name)
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
    """One file, in one transaction: all its chunks or none (Ctrl-C rolls it back)."""
    chunks = client.chunk(text, model) if text.strip() else []
    rows: list[tuple[Any, ...]] = []
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
    if not index.exists():
        raise IndexUsageError(f"no index at {index} (build one with `embedd index`)")
    db = sqlite3.connect(f"file:{index}?mode=ro", uri=True)
    try:
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        model = meta.get("model", "default")
        card = _model_card(client, model)
        stored, current = str(meta.get("fingerprint")), _fingerprint(card)
        if _tokenizer_changed(stored, current):
            raise IndexUsageError(
                f"this index is stale: it was built with another tokenizer ({stored}) than "
                f"the daemon's {model!r} uses now ({current}): rebuild the index with "
                "`embedd index`"
            )
        if stored != current:
            raise IndexUsageError(
                f"this index was built with model {model!r} fingerprint "
                f"{stored[:12]}, but the daemon's {model!r} is now "
                f"{current[:12]}: rebuild the index with `embedd index`"
            )
        prompt = "query" if "query" in (card.get("prompts") or []) else None
        q = client.embed_query(query, model, prompt=prompt)
        rows = db.execute("SELECT file, start, end, text, vector FROM chunks").fetchall()
    finally:
        db.close()
    if not rows:
        return []
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
