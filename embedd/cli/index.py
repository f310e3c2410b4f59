"""`embedd index` and `embedd search`: a folder of notes to a search, in one SQLite file.

`index` walks files and decides by content what is text (UTF-8 without NUL bytes, whatever the
name; PDFs when the optional `pdf` extra is installed), cuts each into chunks with the daemon's
`chunk` op (the model's own tokenizer and limit, or `chunk_tokens`/`overlap`), embeds them at
bulk priority and stores one row per chunk with its start line and its vector as float32
bytes, plus the chunk's text in an FTS5 (BM25) table. Each file is committed when all its
chunks are stored, so an interrupted run resumes with the next file, and a re-run touches only
files whose content hash changed (and drops the rows of files that are gone).

`search` ranks chunks by cosine to the embedded query, by BM25 over the words, or by both fused
with reciprocal rank fusion (the default: it measured best on tests/data/relevance), and shows
each hit as a path relative to the indexed folder, the line of its best-matching passage and
that passage. It refuses an index built with another model, and reports one built with
another tokenizer as stale (the fingerprint is the model file's plus the tokenizer's version).

The Python API the CLI is built on: `index_paths(paths, out, ...)`, `search(index, query, ...)`,
`describe(index)` and `drop(index)`, all in this module (`embedd.cli.index`).
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import os
import re
import shutil
import sqlite3
import stat
import textwrap
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import embedd_client
import numpy as np
import numpy.typing as npt

from embedd.cli.chunks import (
    COLUMNS,
    META_FINGERPRINT,
    NAMES,
    chunk_id,
    model_fingerprint,
    start_lines,
    vector_options,
)

PDF_SUFFIX = ".pdf"
# Files larger than this are skipped with a message: a notes folder's odd 2 GB log is not
# something to embed by accident (the daemon's frame limit is 64 MiB anyway).
MAX_FILE_BYTES = 32 * 1024 * 1024
# Chunks embedded per request (bulk priority; small enough to keep memory flat, and the
# progress line moves once per batch: a few seconds of CPU work at most).
EMBED_BATCH = 32
# Directories never walked into.
SKIP_DIRS = {".git", ".hg", ".svn", "__pycache__", "node_modules", ".venv"}

# The FTS5 tokenizer: Porter stemming over Unicode word splitting, so "renewed" finds "renew"
# and accents do not split words (SQLite's documented `porter unicode61` combination).
FTS_TOKENIZE = "porter unicode61 remove_diacritics 2"

# The chunk table is the shared chunk record (embedd/cli/chunks.py) with SQLite's keys: a file's
# chunks go with it, and (file, idx) is unique.
_CHUNK_CONSTRAINTS = {
    "file": "NOT NULL REFERENCES files(path) ON DELETE CASCADE",
    "line": "NOT NULL DEFAULT 0",
}
_CHUNK_COLUMNS = ",\n    ".join(
    f"{c.name} {c.sqlite} {_CHUNK_CONSTRAINTS.get(c.name, 'NOT NULL')}" for c in COLUMNS
)
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY, sha256 TEXT NOT NULL, chunks INTEGER NOT NULL, indexed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    {_CHUNK_COLUMNS},
    PRIMARY KEY (file, idx)
);
"""
# Rows go in by column name: an index upgraded in place has its columns in another order.
INSERT_CHUNK = f"INSERT INTO chunks ({', '.join(NAMES)}) VALUES ({', '.join('?' * len(NAMES))})"
# What `embedd index` embeds with (truncate=True: chunks fit the model, a longer word is cut),
# as it goes into each chunk's id.
INDEX_OPTIONS = vector_options(long="truncate")
# The keyword index: its own copy of each chunk's text with the chunk's key. Its rowid is a
# hash of (file, idx) (`_fts_rowid`), not the chunks table's rowid, which VACUUM may renumber.
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

# Why a file was skipped: the summary counts skips by these.
SKIP_UNREADABLE = "unreadable"
SKIP_NOT_REGULAR = "not a regular file"
SKIP_TOO_LARGE = "too large"
SKIP_BINARY = "binary"
SKIP_NOT_UTF8 = "not UTF-8 text"
SKIP_NAME_NOT_UTF8 = "file name not UTF-8"
SKIP_PDF = "PDF not read"
SKIP_REFUSED = "refused by the daemon"

# Ranking modes of `search`.
MODE_HYBRID = "hybrid"
MODE_VECTOR = "vector"
MODE_BM25 = "bm25"
MODES = (MODE_HYBRID, MODE_VECTOR, MODE_BM25)
# Hybrid measured better than either alone on tests/data/relevance (README, "From a folder of
# notes to search"), so it is the default.
DEFAULT_MODE = MODE_HYBRID
# Reciprocal rank fusion's constant: score = sum over rankings of 1 / (RRF_K + rank). 60 is the
# value of Cormack, Clarke and Buettcher, "Reciprocal Rank Fusion outperforms Condorcet and
# individual Rank Learning Methods" (SIGIR 2009), used unchanged by most hybrid search engines.
RRF_K = 60
# BM25 matches fused per query: past a few hundred ranks a list adds at most 1/(60+200) to a
# score, less than the gap between neighbouring top-10 ranks.
BM25_CANDIDATES = 200


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
    tokens: int = 0
    # Each skipped file and why, in the order met.
    skips: list[tuple[str, str]] = field(default_factory=list)

    @property
    def files_skipped(self) -> int:
        return sum(self.skipped.values())

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def summary(counts: Counts, out: str) -> str:
    """The line `embedd index` ends with; skips are counted by reason, so a user can tell
    "3 skipped" that are binaries from 3 that could not be read."""
    if not counts.files_seen and not counts.files_removed:
        return f"found no files to index (nothing under the paths given) -> {out}"
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
    """The index at `path`, created if new, brought up to this version's schema (see
    `_upgrade`). A directory, or an SQLite file that has tables but not an index's, is refused
    before anything is written to it: `--out` pointed at another program's database must not
    get our tables added."""
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
        _upgrade(db, tables)
    except BaseException:
        db.close()
        raise
    return db


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}


def _upgrade(db: sqlite3.Connection, tables: set[str]) -> None:
    """An index written by an older version gains what this one reads, without re-embedding:
    the `line` column (0 until `_fill_lines` computes it from the unchanged file), the FTS5
    table filled from the stored chunk texts, and the shared chunk record's names (the
    fingerprint column is `model_fingerprint`) and ids, computed from the stored rows."""
    with db:
        columns = _columns(db, "chunks")
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
                ((_fts_rowid(f, i), t, f, i) for f, i, t in rows.fetchall()),
            )


def _fts_rowid(file: str, idx: int) -> int:
    """The keyword table's rowid for chunk `idx` of `file`: 63 bits of a hash of the key, so a
    file's rows can be deleted by rowid (indexed) without a stored mapping. A collision needs
    about 3 billion chunks to become likely (birthday bound of 2**63)."""
    digest = hashlib.blake2b(f"{file}\0{idx}".encode("utf-8", "surrogatepass"), digest_size=8)
    return int.from_bytes(digest.digest(), "big") >> 1


def _drop_file(db: sqlite3.Connection, name: str) -> None:
    """Remove one file's rows: its chunks (by cascade) and their keyword rows."""
    idxs = [row[0] for row in db.execute("SELECT idx FROM chunks WHERE file = ?", (name,))]
    db.executemany(
        f"DELETE FROM {FTS_TABLE} WHERE rowid = ?", ((_fts_rowid(name, i),) for i in idxs)
    )
    db.execute("DELETE FROM files WHERE path = ?", (name,))


def _excluded(rel: str, patterns: Sequence[str]) -> bool:
    parts = rel.split("/")
    for pattern in patterns:
        pat = pattern.rstrip("/")
        if fnmatch.fnmatch(rel, pat) or any(fnmatch.fnmatch(p, pat) for p in parts):
            return True
    return False


def walk(
    paths: Sequence[Path],
    excludes: Sequence[str],
    skip: Sequence[Path] = (),
    found: Callable[[int], None] | None = None,
) -> Iterator[Path]:
    """Files to index under `paths`, in a stable order, gitignore-style excludes applied (a
    pattern matches the relative path or any of its components). Every regular file is a
    candidate whatever its name (README, LICENSE, .html, .json): whether it is text is decided
    by its content (`decode`). `skip` are files never offered (the index itself and SQLite's
    journal next to it, when the index lies inside the folder). `found` is told the count of
    files found so far, as they are found (a folder is listed whole before its files come, so
    that they come sorted).

    A file is named by its real path, so one reached by several names is indexed once; a
    symbolic link to a file outside every folder walked is named by the link's own path in
    its folder: its row is then removed when the link goes, and a link whose target's path
    changes between runs (`/proc/self/status`) stays one row instead of adding one a run.
    Links to folders are not followed, and SKIP_DIRS are never entered."""
    never = {p.resolve() for p in skip}
    folders = [p.resolve() for p in paths if p.is_dir()]
    count = 0
    for root in paths:
        if root.is_file():
            yield root.resolve()
            continue
        base = root.resolve()
        files: list[tuple[list[str], Path]] = []
        for rel, entry in _entries(base):
            if not entry.is_file() or _excluded(rel, excludes):
                continue
            # Only a link can lead elsewhere: the folders above are real (walked from `base`,
            # links to folders not followed), which saves a realpath per file.
            real = Path(os.path.realpath(entry.path)) if entry.is_symlink() else base / rel
            if real in never:
                continue
            inside = real == base / rel or any(real == f or f in real.parents for f in folders)
            files.append((rel.split("/"), real if inside else base / rel))
            count += 1
            if found is not None:
                found(count)
        files.sort(key=lambda item: item[0])  # as the paths sort, by their components
        yield from (path for _, path in files)


def _entries(base: Path) -> Iterator[tuple[str, os.DirEntry[str]]]:
    """Every entry under the folder `base` that is not a folder, with its path relative to
    it: SKIP_DIRS are neither entered nor offered, links to folders are not followed, and a
    folder that cannot be read is left out (as `Path.rglob` does)."""
    pending = [""]
    while pending:
        folder = pending.pop()
        try:
            with os.scandir(base / folder) as listing:
                entries = list(listing)
        except OSError:
            continue
        for entry in entries:
            if entry.name in SKIP_DIRS:
                continue
            rel = f"{folder}/{entry.name}" if folder else entry.name
            if entry.is_dir(follow_symlinks=False):
                pending.append(rel)
            else:
                yield rel, entry


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


def _is_pdf(path: Path, data: bytes) -> bool:
    """A PDF by name or by its header (`%PDF-`, ISO 32000-1, 7.5.2), whatever it is called."""
    return path.suffix.lower() == PDF_SUFFIX or data.startswith(b"%PDF-")


def decode(path: Path, data: bytes) -> str:
    """The text of a file whose bytes are `data`, or Skipped with the reason. A NUL byte marks
    a binary file (as for git and grep): its "text" would be control characters the model has
    no tokens for."""
    if _is_pdf(path, data):
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


# A first guess at tokens per byte of text, until chunked files give the real ratio: about 4
# characters of English per token is the usual rule of thumb for subword vocabularies (OpenAI's
# tokenizer documentation; WordPiece as in MiniLM lands close to it).
TOKENS_PER_BYTE_GUESS = 0.25
# Seconds between plain progress lines when stderr is not a terminal (a log or CI capture):
# frequent enough to show life, rare enough not to flood it.
PLAIN_EVERY = 5.0
# Seconds between redraws on a terminal: more often than this is not readable anyway, and a
# folder of tiny files would otherwise spend its time writing to the terminal.
TTY_EVERY = 0.1
# Erase from the cursor to the end of the line (ECMA-48 EL, "CSI K").
CLEAR_EOL = "\x1b[K"
# The progress line's stages before embedding (`Progress.stage`).
FINDING = "finding"
CHECKING = "checking"


def _terminal_width(stream: TextIO) -> int:
    """The width of the terminal `stream` writes to: $COLUMNS when set (as for
    shutil.get_terminal_size), else the stream's own terminal (stderr may be a terminal while
    stdout is a pipe, which is all shutil.get_terminal_size looks at), else its fallback."""
    env = os.environ.get("COLUMNS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return os.get_terminal_size(stream.fileno()).columns or shutil.get_terminal_size().columns
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return shutil.get_terminal_size().columns


def _duration(seconds: float) -> str:
    s = int(seconds + 0.5)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _fit(text: str, width: int) -> str:
    """`text` cut to `width` characters, its start replaced by an ellipsis (a path's tail is
    the part that says which file it is)."""
    if len(text) <= width:
        return text
    return "…" + text[len(text) - width + 1 :] if width > 1 else text[:width]


class Progress:
    """What `index` has done and has left, in tokens: the work is embedding, and its cost is
    tokens, not files. Tokens ahead are exact for files already chunked and estimated from
    the bytes of the files not yet chunked, at the tokens-per-byte ratio measured so far; the
    ETA divides them by the tokens per second embedded so far (counted from the first batch
    sent, so reading and chunking time is part of the rate). On a terminal it is one line,
    redrawn in place and never wider than the terminal minus one column (a line filling the
    last column wraps on many terminals); otherwise a plain line every PLAIN_EVERY seconds."""

    def __init__(
        self,
        stream: TextIO | None,
        *,
        tty: bool,
        files: int,
        bytes_ahead: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self.tty = tty
        self.clock = clock
        self.files = files
        self.files_done = 0
        self.bytes_ahead = bytes_ahead  # of files not chunked yet
        self.bytes_chunked = 0
        self.tokens_chunked = 0
        self.tokens_done = 0
        self.chunks_done = 0
        self.current = ""
        self.embed_started: float | None = None
        self.last_draw = -float("inf")
        self.drawn = False
        # Before any embedding, the run finds the files (FINDING) and reads each to see whether
        # it changed (CHECKING): 100,000 files take seconds of each, which the line must show.
        self.stage: str | None = None
        self.found = 0
        self.checked = 0

    # -- the stages before embedding ---------------------------------------------------------

    def finding(self, found: int) -> None:
        """`found` files found so far (drawn at once when the stage begins)."""
        self.found = found
        self._stage(FINDING)

    def checking(self, checked: int) -> None:
        """`checked` of the files found read and compared with the index so far."""
        self.checked = checked
        self._stage(CHECKING)

    def embedding(self) -> None:
        """The files that changed are chunked and embedded from here on."""
        self.stage = None

    def _stage(self, stage: str) -> None:
        begins = self.stage != stage
        self.stage = stage
        self.draw(force=begins)

    # -- what happened -----------------------------------------------------------------------

    def file_done(self, name: str, size: int = 0, *, chunked: bool = False) -> None:
        """A file finished (indexed, unchanged or skipped); `size` bytes of it were still
        counted ahead unless it was `chunked` (then its tokens were)."""
        self.files_done += 1
        if not chunked:
            self.bytes_ahead = max(0, self.bytes_ahead - size)
        self.current = name
        self.draw()

    def chunked(self, name: str, size: int, tokens: int) -> None:
        """A file of `size` bytes was cut into chunks of `tokens` tokens in all."""
        self.bytes_ahead = max(0, self.bytes_ahead - size)
        self.bytes_chunked += size
        self.tokens_chunked += tokens
        self.current = name

    def batch_started(self) -> None:
        if self.embed_started is None:
            self.embed_started = self.clock()

    def embedded(self, chunks: int, tokens: int) -> None:
        """A batch came back: on a terminal always redrawn, so the line moves within a long
        file (a batch is seconds of work, not a flood of redraws)."""
        self.chunks_done += chunks
        self.tokens_done += tokens
        self.draw(force=self.tty)

    def unembedded(self, tokens: int) -> None:
        """Chunked tokens that will not be embedded after all (the daemon refused the file)."""
        self.tokens_chunked -= tokens

    # -- the figures -------------------------------------------------------------------------

    def tokens_ahead(self) -> int:
        ratio = (
            self.tokens_chunked / self.bytes_chunked
            if self.bytes_chunked
            else TOKENS_PER_BYTE_GUESS
        )
        return (self.tokens_chunked - self.tokens_done) + int(self.bytes_ahead * ratio)

    def rate(self) -> float | None:
        """Tokens embedded per second so far; None before the first batch came back."""
        if self.embed_started is None or not self.tokens_done:
            return None
        return self.tokens_done / max(self.clock() - self.embed_started, 1e-6)

    def line(self, width: int) -> str:
        if self.stage == FINDING:
            return f"finding files: {self.found:,} so far"[:width]
        if self.stage == CHECKING:
            return f"checking {self.checked:,}/{self.files:,} files for changes"[:width]
        ahead = self.tokens_ahead()
        total = self.tokens_done + ahead
        pct = 100 * self.tokens_done // total if total else 100
        rate = self.rate()
        if rate is None:
            speed, eta = "", "ETA measuring"
        else:
            speed, eta = f"  {rate:,.0f} tok/s", f"ETA {_duration(ahead / rate)}"
        about = "~" if self.bytes_ahead else ""
        text = (
            f"{pct:3d}% {self.tokens_done:,}/{about}{total:,} tokens  "
            f"{self.chunks_done:,} chunks  {self.files_done}/{self.files} files{speed}  {eta}"
        )
        room = width - len(text) - 2
        if room >= 10 and self.current:
            text += "  " + _fit(self.current, room)
        return text[:width]

    # -- output ------------------------------------------------------------------------------

    def draw(self, *, force: bool = False) -> None:
        if self.stream is None:
            return
        now = self.clock()
        if self.tty:
            if not force and now - self.last_draw < TTY_EVERY:
                return
            width = _terminal_width(self.stream) - 1
            self.stream.write("\r" + self.line(width) + CLEAR_EOL)
            self.drawn = True
        else:
            if not force and now - self.last_draw < PLAIN_EVERY:
                return
            self.stream.write(self.line(10_000) + "\n")
        self.last_draw = now
        self.stream.flush()

    def note(self, message: str) -> None:
        """A line of its own (a skipped file) that does not tear the progress line."""
        if self.stream is None:
            return
        if self.tty and self.drawn:
            self.stream.write("\r" + CLEAR_EOL)
            self.drawn = False
        self.stream.write(message + "\n")
        self.stream.flush()
        if self.tty:
            self.draw(force=True)

    def close(self) -> None:
        """Leave the terminal clean for the summary line (a plain run ends with a last line)."""
        if self.stream is None:
            return
        if self.tty:
            if self.drawn:
                self.stream.write("\r" + CLEAR_EOL)
        elif self.files:
            self.stream.write(self.line(10_000) + "\n")
        self.stream.flush()


def _model_card(client: embedd_client.Client, model: str) -> dict[str, Any]:
    client.load(model)
    for m in client.models():
        if m["name"] == model:
            return m
    raise IndexUsageError(f"the daemon has no model {model!r}")


def _mismatch(stored: str, current: str, built_with: str, model: str) -> IndexUsageError | None:
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


def _check_model(db: sqlite3.Connection, model: str, fingerprint: str) -> None:
    rows = dict(db.execute("SELECT key, value FROM meta").fetchall())
    if not rows:
        db.execute("INSERT INTO meta VALUES ('model', ?), ('fingerprint', ?)", (model, fingerprint))
        return
    error = _mismatch(str(rows.get("fingerprint", "")), fingerprint, rows.get("model", ""), model)
    if error is not None:
        raise error


@dataclass(frozen=True)
class Chunking:
    """How files are cut: at most `tokens` per chunk (None: the model's limit), `overlap`
    tokens shared by neighbours. Stored in the index: a run with other settings re-chunks
    every file, since chunks of two sizes would rank unevenly."""

    tokens: int | None = None
    overlap: int = 0

    def key(self) -> str:
        return json.dumps({"chunk_tokens": self.tokens, "overlap": self.overlap})


def index_paths(
    paths: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    model: str = "default",
    excludes: Sequence[str] = (),
    chunk_tokens: int | None = None,
    overlap: int = 0,
    client: embedd_client.Client | None = None,
    socket: str | os.PathLike[str] | None = None,
    progress: TextIO | None = None,
    tty: bool = False,
) -> Counts:
    """Index the files under `paths` (files or folders) into the SQLite file `out`, through
    the daemon at `socket` (default: the usual socket) or an open `client`; returns what was
    done. Skipped files are in the result (`skips`) and, with a `progress` stream, written
    there as they happen, with a progress line (redrawn in place when `tty`). Raises
    IndexUsageError, naming `out`, when the index cannot be opened, read or written (not an
    SQLite file, another program's database, a directory, a full disk), was built with
    another model, or the chunk settings are refused."""
    if client is None:
        with embedd_client.Client(socket, timeout=None) as own:
            return index_paths(
                paths, out, model=model, excludes=excludes, chunk_tokens=chunk_tokens,
                overlap=overlap, client=own, progress=progress, tty=tty,
            )  # fmt: skip
    chunking = Chunking(chunk_tokens, overlap)
    card = _model_card(client, model)
    fingerprint = model_fingerprint(card)
    _check_chunking(client, model, chunking)
    target = Path(out)
    try:
        return _build(
            client, [Path(p) for p in paths], target, model, fingerprint, excludes, chunking,
            progress, tty,
        )  # fmt: skip
    except sqlite3.Error as exc:
        raise IndexUsageError(f"{display(str(target))}: {exc}") from None


# Parquet rows read and stored at a time: bounded memory whatever the size of the output.
PARQUET_BATCH = 4096


def index_parquet(source: str | os.PathLike[str], out: str | os.PathLike[str]) -> Counts:
    """Add the chunks of a Parquet output (the shared chunk record, as `embedd.ray` writes
    it: every `*.parquet` under `source`) to the index `out`, with their keyword rows, so
    that `search` serves them; no daemon is needed, the vectors are the output's. A document
    (`file`) in the output replaces that document's rows in the index; rows without `file`
    and `idx` (texts embedded without a Chunk step) are each their own document, named by
    their id. Every row must share one model fingerprint, and it must be the index's; every
    vector must be a list of finite floats, not all zero, of the index's dimension (that of
    the vectors it holds, or for a new index, of the first vector imported), and is stored at
    unit length, as search's cosine expects. One row that fails refuses the whole import: the
    index is left as it was (a new one is not created). Needs pyarrow (the `ray` extra).
    Raises IndexUsageError naming the file, the row and what is wrong."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise IndexUsageError(
            "--from-parquet needs pyarrow: pip install pyarrow (or embedd's ray extra: "
            "pip install '.[ray]')"
        ) from None
    root = Path(source)
    files = sorted(root.rglob("*.parquet")) if root.is_dir() else [root]
    if not files or not files[0].is_file():
        raise IndexUsageError(f"no Parquet files under {display(str(root))}")
    target = Path(out)
    counts = Counts()
    new = not target.exists()
    db = _open(target)
    done = False
    try:
        with db:
            seen: set[str] = set()
            dim = _stored_dim(db)
            for path in files:
                try:
                    parquet = pq.ParquetFile(path)
                except (OSError, ValueError) as exc:  # pyarrow's errors are one or the other
                    shown = display(str(path))
                    raise IndexUsageError(
                        f"{shown} is not a readable Parquet file ({exc})"
                    ) from None
                added, dim = _import_parquet_file(db, parquet, path, seen, dim)
                counts.chunks += added
            db.execute(
                "UPDATE files SET chunks = (SELECT count(*) FROM chunks WHERE file = path) "
                "WHERE sha256 = ''"
            )
            now = str(time.time())
            db.executemany(  # roots are left alone: they belong to the folders indexed here
                "INSERT OR IGNORE INTO meta VALUES (?, ?)", [("created", now), ("roots", "[]")]
            )
            db.executemany(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                [("updated", now), ("parquet", str(root.resolve()))],
            )
            counts.files_indexed = counts.files_seen = len(seen)
        done = True
    except sqlite3.Error as exc:
        raise IndexUsageError(f"{display(str(target))}: {exc}") from None
    finally:
        db.close()
        if new and not done:
            for suffix in ("", "-journal", "-wal", "-shm"):
                target.with_name(target.name + suffix).unlink(missing_ok=True)
    return counts


def _stored_dim(db: sqlite3.Connection) -> int | None:
    """The dimension of the vectors an index holds (None while it holds none)."""
    row = db.execute("SELECT length(vector) FROM chunks LIMIT 1").fetchone()
    return None if row is None else int(row[0]) // VECTOR_ITEM_BYTES


def _import_parquet_file(
    db: sqlite3.Connection, parquet: Any, path: Path, seen: set[str], dim: int | None
) -> tuple[int, int | None]:
    """One Parquet file's rows into the index; returns how many, and the dimension of the
    vectors (`dim`: the index's so far, None if it holds none yet). A document met for the
    first time in this import has its old rows dropped first (`seen` holds those met)."""
    shown = display(str(path))
    schema = parquet.schema_arrow
    meta = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
    missing = [c.name for c in COLUMNS if c.required and c.name not in schema.names]
    if missing:
        raise IndexUsageError(
            f"{shown} is not embedd's chunk output: it lacks {', '.join(missing)}"
        )
    named = [name for name in NAMES if name in schema.names]
    total = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH, columns=named):
        columns = {name: batch.column(name) for name in named}
        if not batch.num_rows:
            continue
        fingerprints = set(columns["model_fingerprint"].to_pylist())
        models = set(columns["model"].to_pylist())
        if len(fingerprints) != 1 or len(models) != 1:
            raise IndexUsageError(f"{shown} mixes models; an index holds one model's vectors")
        fingerprint = fingerprints.pop()
        if meta.get(META_FINGERPRINT, fingerprint) != fingerprint:
            raise IndexUsageError(
                f"{shown}: its rows say model fingerprint {str(fingerprint)[:12]}, its metadata "
                f"{meta[META_FINGERPRINT][:12]}: not one model's output"
            )
        _check_model(db, models.pop(), fingerprint)
        vectors, dim = _vector_rows(columns["vector"], shown, total, dim)
        scalars = [n for n in named if n != "vector"]
        rows = [
            dict(zip(scalars, values, strict=True))
            for values in zip(*(columns[n].to_pylist() for n in scalars), strict=True)
        ]
        for row, vector in zip(rows, vectors, strict=True):
            row["vector"] = vector
            if row.get("file") is None or row.get("idx") is None:
                row["file"] = f"{row['file']}#{row['id']}" if row.get("file") else row["id"]
                row["idx"] = 0
            for name in ("start", "end", "line"):
                row[name] = row.get(name) or 0
            if row["file"] not in seen:
                seen.add(row["file"])
                _drop_file(db, row["file"])
                db.execute("INSERT INTO files VALUES (?, '', 0, ?)", (row["file"], time.time()))
        _insert_chunks(db, rows)
        total += len(rows)
    return total, dim


def _vector_rows(column: Any, shown: str, first: int, dim: int | None) -> tuple[list[bytes], int]:
    """Each row's vector as unit-length little-endian float32 bytes, from any list column of
    floats (embedd.ray writes `fixed_size_list<float32>[dim]`), and their dimension. Refused,
    naming the row (`first` is this batch's first row in its file): a vector of another
    dimension than `dim` (it would make every search of the index fail), a missing one, one
    holding NaN or infinity, one of zeros (no direction). Stored at unit length: search
    ranks by a dot product with the unit query, so a vector of norm 1e30 would otherwise be
    the top hit of any query it leans towards."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = column.type
    is_list = pa.types.is_list(kind) or pa.types.is_large_list(kind)
    if not (is_list or pa.types.is_fixed_size_list(kind)) or not pa.types.is_floating(
        kind.value_type
    ):
        raise IndexUsageError(f"{shown}: the vector column holds {kind}, not lists of floats")

    def refuse(rows: npt.NDArray[Any], what: str) -> IndexUsageError:
        return IndexUsageError(f"{shown}: row {first + int(rows[0])} {what}; nothing imported")

    if column.null_count:
        raise refuse(
            np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False)), "has no vector"
        )
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    if dim is None:
        dim = int(lengths[0])
    if (wrong := np.flatnonzero(lengths != dim)).size:
        raise refuse(
            wrong, f"has a vector of {int(lengths[wrong[0]])} dimensions, the index's have {dim}"
        )
    if dim < 1:
        raise refuse(np.zeros(1), "has a vector of no dimensions")
    values = column.flatten()
    if values.null_count:
        nulls = np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False)) // dim
        raise refuse(nulls, "has a vector with a missing component")
    matrix = values.to_numpy(zero_copy_only=False).astype(np.float64).reshape(-1, dim)
    if (bad := np.flatnonzero(~np.isfinite(matrix).all(axis=1))).size:
        raise refuse(bad, "has a vector holding NaN or infinity")
    # Scaled by its largest component first: the norm of a float64 vector of 1e300s overflows.
    peaks = np.abs(matrix).max(axis=1)
    if (zero := np.flatnonzero(peaks == 0)).size:
        raise refuse(zero, "has a vector of zeros, which points nowhere")
    scaled = matrix / peaks[:, None]
    unit = (scaled / np.linalg.norm(scaled, axis=1)[:, None]).astype("<f4")
    return [row.tobytes() for row in unit], dim


def _check_chunking(client: embedd_client.Client, model: str, chunking: Chunking) -> None:
    """The daemon's own check of the chunk settings, once, before any file: refused settings
    are the user's to fix, not a reason to skip every file one by one."""
    if chunking.tokens is None and not chunking.overlap:
        return
    try:
        client.chunk("settings check", model, max_tokens=chunking.tokens, overlap=chunking.overlap)
    except embedd_client.EmbeddError as exc:
        if exc.code != "bad_request":
            raise
        raise IndexUsageError(f"--chunk-tokens/--overlap: {exc.message}") from None


def _build(
    client: embedd_client.Client,
    paths: Sequence[Path],
    out: Path,
    model: str,
    fingerprint: str,
    excludes: Sequence[str],
    chunking: Chunking,
    stream: TextIO | None,
    tty: bool,
) -> Counts:
    db = _open(out)
    counts = Counts()
    try:
        _check_model(db, model, fingerprint)
        rechunk = _record_run(db, paths, chunking)
        db.commit()
        skip = [out] + [out.with_name(out.name + s) for s in ("-journal", "-wal", "-shm")]
        progress = Progress(stream, tty=tty, files=0, bytes_ahead=0)
        progress.finding(0)
        files = list(walk(paths, excludes, skip, found=progress.finding))
        progress.files = len(files)
        known = dict(db.execute("SELECT path, sha256 FROM files").fetchall())
        unlined = {r[0] for r in db.execute("SELECT DISTINCT file FROM chunks WHERE line = 0")}
        if rechunk and known:
            progress.note("the chunk settings changed: every file is chunked and embedded again")
        # First pass: what changed (the bytes ahead give the first estimate of the work).
        todo: list[tuple[Path, int]] = []
        for path in files:
            counts.files_seen += 1
            progress.checking(counts.files_seen)
            name = str(path)
            try:
                _utf8_name(name)
                data = read_file(path)
                if not rechunk and known.get(name) == hashlib.sha256(data).hexdigest():
                    counts.files_unchanged += 1
                    progress.files_done += 1
                    if name in unlined:
                        _fill_lines(db, name, decode(path, data))
                else:
                    if not _is_pdf(path, data):
                        decode(path, data)  # a binary is reported now, not counted as work
                    todo.append((path, len(data)))
            except Skipped as skipped:
                _skipped(counts, progress, name, skipped)
                progress.files_done += 1
        db.commit()
        progress.embedding()
        progress.bytes_ahead = sum(size for _, size in todo)
        # Second pass: chunk and embed what changed, a file per transaction.
        for path, size in todo:
            name = str(path)
            chunked = False
            try:
                data = read_file(path)  # read again: the file may have changed since the scan
                digest = hashlib.sha256(data).hexdigest()
                text = decode(path, data)
                del data  # the text is what is kept from here on
                chunked = True
                _index_file(client, db, name, digest, text, model, fingerprint, chunking,
                            counts, progress, size)  # fmt: skip
                counts.files_indexed += 1
            except Skipped as skipped:
                _skipped(counts, progress, name, skipped)
            progress.file_done(display(name), size, chunked=chunked)
        present = {str(p) for p in files}
        gone = [p for p in known if p not in present and _under(p, paths)]
        for p in gone:
            _drop_file(db, p)
        counts.files_removed = len(gone)
        db.commit()
        progress.close()
    finally:
        db.close()
    return counts


def _record_run(db: sqlite3.Connection, paths: Sequence[Path], chunking: Chunking) -> bool:
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


def _skipped(counts: Counts, progress: Progress, name: str, skipped: Skipped) -> None:
    counts.skip(skipped.reason)
    counts.skips.append((name, str(skipped)))
    progress.note(f"skipped {display(name)}: {skipped}")


def _under(path: str, roots: Sequence[Path]) -> bool:
    p = Path(path)
    return any(p == r.resolve() or r.resolve() in p.parents for r in roots)


def _fill_lines(db: sqlite3.Connection, name: str, text: str) -> None:
    """Line numbers for the chunks of a file indexed before they were stored, from the file
    as it is now (its hash is unchanged, so the offsets still hold)."""
    rows = db.execute("SELECT idx, start FROM chunks WHERE file = ?", (name,)).fetchall()
    lines = start_lines(text, [start for _, start in rows])
    db.executemany(
        "UPDATE chunks SET line = ? WHERE file = ? AND idx = ?",
        [(line, name, idx) for (idx, _), line in zip(rows, lines, strict=True)],
    )


def _index_file(
    client: embedd_client.Client,
    db: sqlite3.Connection,
    name: str,
    digest: str,
    text: str,
    model: str,
    fingerprint: str,
    chunking: Chunking,
    counts: Counts,
    progress: Progress,
    size: int,
) -> None:
    """One file, in one transaction: all its chunks or none (Ctrl-C rolls it back). Text the
    daemon refuses as a bad request (say, only control or private-use characters, for which the
    model has no tokens) skips this file, not the run: the next run would meet it again."""
    rows: list[dict[str, Any]] = []
    total = done = 0
    try:
        chunks = (
            client.chunk(text, model, max_tokens=chunking.tokens, overlap=chunking.overlap)
            if text.strip()
            else []
        )
        total = sum(int(c["tokens"]) for c in chunks)
        progress.chunked(display(name), size, total)
        lines = start_lines(text, [c["span"][0] for c in chunks])
        for first in range(0, len(chunks), EMBED_BATCH):
            batch = chunks[first : first + EMBED_BATCH]
            progress.batch_started()
            vectors = client.embed(
                [c["text"] for c in batch], model, truncate=True, priority="bulk"
            )
            for j, (c, vec) in enumerate(zip(batch, vectors, strict=True)):
                idx = first + j
                rows.append(
                    {"id": chunk_id(c["text"], fingerprint, INDEX_OPTIONS, file=name, idx=idx),
                     "file": name, "idx": idx, "start": c["span"][0], "end": c["span"][1],
                     "line": lines[idx], "text": c["text"], "tokens": c["tokens"],
                     "model": model, "model_fingerprint": fingerprint,
                     "vector": np.asarray(vec, dtype="<f4").tobytes()}
                )  # fmt: skip
            tokens = sum(int(c["tokens"]) for c in batch)
            done += tokens
            progress.embedded(len(batch), tokens)
    except embedd_client.EmbeddError as exc:
        if exc.code != "bad_request":
            raise
        progress.unembedded(total - done)
        raise Skipped(SKIP_REFUSED, exc.message) from None
    with db:
        _drop_file(db, name)
        db.execute(
            "INSERT INTO files VALUES (?, ?, ?, ?)", (name, digest, len(chunks), time.time())
        )
        _insert_chunks(db, rows)
    counts.chunks += len(rows)
    counts.tokens += total


def _insert_chunks(db: sqlite3.Connection, rows: Sequence[Mapping[str, Any]]) -> None:
    """Store chunk records (maps by the shared column names) and their keyword rows."""
    db.executemany(INSERT_CHUNK, ([r[name] for name in NAMES] for r in rows))
    db.executemany(
        f"INSERT INTO {FTS_TABLE} (rowid, text, file, idx) VALUES (?, ?, ?, ?)",
        ((_fts_rowid(r["file"], r["idx"]), r["text"], r["file"], r["idx"]) for r in rows),
    )


# --------------------------------------------------------------------------------------------
# Search

# Characters of a passage at most: about two lines of a terminal, one or two sentences.
PASSAGE_CHARS = 240
# Words that say nothing about what is sought: left out when a passage is chosen by the words
# it shares with the query (BM25 itself weighs them down by their frequency in the index).
_STOPWORD_TEXT = """
a an and are as at be by can do does for from how i in is it my of on or should that the this
to what when where which who why will with you your
"""
STOPWORDS = frozenset(_STOPWORD_TEXT.split())
# Sentence ends: a long line (an unwrapped Markdown paragraph) is cut into passages here.
_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+")
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class Hit:
    """One result: the chunk `span` (characters) of `file`, shown as `path` (relative to the
    indexed folder) at `line` (of its best passage; 0 when the index predates line numbers),
    with that `passage`, the chunk's whole `text` and its `score` in the mode's own scale
    (cosine for vector, BM25 with larger better for bm25, the fused RRF sum for hybrid)."""

    file: str
    path: str
    line: int
    score: float
    passage: str
    text: str
    span: tuple[int, int]


def search(
    index: str | os.PathLike[str],
    query: str,
    *,
    k: int = 10,
    mode: str = DEFAULT_MODE,
    paths: Sequence[str] = (),
    client: embedd_client.Client | None = None,
    socket: str | os.PathLike[str] | None = None,
    note: Callable[[str], None] | None = None,
) -> list[Hit]:
    """The `k` chunks of `index` that best answer `query`, best first: by `mode` ("hybrid":
    vector and BM25 rankings fused; "vector"; "bm25", which needs no daemon), among files whose
    path relative to the indexed folder matches one of the globs `paths` (all when empty; a
    glob starting with `/`, `./` or `../` is a path from the current directory).
    `note` receives a one-line remark when an old index limits what can be done (no keyword
    table yet: hybrid falls back to vectors). Raises IndexUsageError, naming the file, for
    anything wrong with `index` (missing, a directory, not SQLite, truncated, another
    program's database, vectors of another length than the model's, another model)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if client is None and mode != MODE_BM25:
        with embedd_client.Client(socket) as own:
            return search(index, query, k=k, mode=mode, paths=paths, client=own, note=note)
    path = Path(index)
    shown = display(str(path))
    if not path.exists():
        raise IndexUsageError(f"no index at {shown} (build one with `embedd index`)")
    if path.is_dir():
        raise IndexUsageError(f"{shown} is a directory, not an index file")
    try:
        return _search(client, path, shown, query, k, mode, paths, note)
    except sqlite3.Error as exc:
        raise IndexUsageError(
            f"{shown}: {exc} (not an index `embedd index` wrote, or damaged)"
        ) from None


def _connect_ro(index: Path, shown: str) -> tuple[sqlite3.Connection, set[str]]:
    # A URI, so the file is opened read-only; as_uri() escapes `?`, `#` and `%` in the path.
    db = sqlite3.connect(f"{index.resolve().as_uri()}?mode=ro", uri=True)
    try:
        tables = _tables(db)
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


Key = tuple[str, int]


def _search(
    client: embedd_client.Client | None,
    index: Path,
    shown: str,
    query: str,
    k: int,
    mode: str,
    globs: Sequence[str],
    note: Callable[[str], None] | None,
) -> list[Hit]:
    db, tables = _connect_ro(index, shown)
    try:
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        has_lines = "line" in _columns(db, "chunks")
        if FTS_TABLE not in tables or not has_lines:
            old = f"{shown} was built before keyword search and line numbers"
            if mode == MODE_BM25 and FTS_TABLE not in tables:
                raise IndexUsageError(f"{old}: re-run `embedd index` on it to add them")
            if note is not None:
                note(f"{old}: ranked by vectors only; re-run `embedd index` to add them")
            mode = MODE_VECTOR
        files = [row[0] for row in db.execute("SELECT path FROM files")]
        rel = _relative_paths(files, json.loads(meta.get("roots", "[]")))
        allowed = {f for f in files if _path_matches(rel[f], globs, f)} if globs else None
        q: np.ndarray[Any, np.dtype[np.float32]] | None = None
        rankings: list[list[tuple[Key, float]]] = []
        if mode != MODE_BM25:
            assert client is not None
            q = _query_vector(client, meta, query)
            rankings.append(_vector_ranking(db, shown, q, allowed, k if mode == MODE_VECTOR else 0))
        if mode != MODE_VECTOR:
            rankings.append(_bm25_ranking(db, query, allowed, k if mode == MODE_BM25 else 0))
        ranked = rankings[0][:k] if len(rankings) == 1 else _fuse(rankings)[:k]
        details = [
            db.execute(
                f"SELECT start, end, text, {'line' if has_lines else '0'} FROM chunks "
                "WHERE file = ? AND idx = ?",
                key,
            ).fetchone()
            for key, _ in ranked
        ]
    finally:
        db.close()
    model = meta.get("model", "default")
    passages = _best_passages(client, model, q, query, [d[2] for d in details])
    hits = []
    for ((file, _), score), (start, end, text, line), (offset, passage) in zip(
        ranked, details, passages, strict=True
    ):
        passage_line = line + text.count("\n", 0, offset) if line else 0
        hits.append(Hit(file, rel[file], passage_line, score, passage, text, (start, end)))
    return hits


def _query_vector(
    client: embedd_client.Client, meta: dict[str, str], query: str
) -> np.ndarray[Any, np.dtype[np.float32]]:
    model = meta.get("model", "default")
    card = _model_card(client, model)
    error = _mismatch(str(meta.get("fingerprint", "")), model_fingerprint(card), model, model)
    if error is not None:
        raise error
    # A query longer than the model's limit (a pasted paragraph) is split into windows and
    # pooled, as the daemon does for any input: the whole paragraph is what is sought.
    options: embedd_client.EmbedOptions = {"priority": "interactive", "long": "split"}
    if "query" in (card.get("prompts") or []):
        options["prompt"] = "query"
    q = np.asarray(client.embed(query, model, **options), dtype=np.float32)
    return q / np.linalg.norm(q)


def _vector_ranking(
    db: sqlite3.Connection,
    shown: str,
    q: np.ndarray[Any, np.dtype[np.float32]],
    allowed: set[str] | None,
    k: int,
) -> list[tuple[Key, float]]:
    """Chunks by cosine to `q`, best first: the top `k`, or BM25_CANDIDATES to be fused."""
    rows = db.execute("SELECT file, idx, vector FROM chunks").fetchall()
    if allowed is not None:
        rows = [r for r in rows if r[0] in allowed]
    if not rows:
        return []
    width = len(q) * VECTOR_ITEM_BYTES
    wrong = [r for r in rows if not isinstance(r[2], bytes) or len(r[2]) != width]
    if wrong:
        first = wrong[0][2]
        size = f"{len(first)} bytes" if isinstance(first, bytes) else type(first).__name__
        raise IndexUsageError(
            f"{shown}: {len(wrong)} of {len(rows)} stored vectors are not {len(q)} float32 "
            f"(the model's dimension); the first is {size}: the index is damaged, rebuild it"
        )
    matrix = np.frombuffer(b"".join(r[2] for r in rows), dtype="<f4").reshape(len(rows), -1)
    scores = matrix @ q  # stored vectors are normalized
    order = np.argsort(-scores, kind="stable")[: k or BM25_CANDIDATES]
    return [((rows[i][0], int(rows[i][1])), float(scores[i])) for i in order]


def _fts_query(query: str) -> str:
    """The query's words as an FTS5 query that cannot be a syntax error: each word quoted
    (FTS5 strings double their quotes), any of them may match (OR), BM25 weighing each by
    how rare it is."""
    words = _WORD.findall(query)
    return " OR ".join('"' + w.replace('"', '""') + '"' for w in words)


def _bm25_ranking(
    db: sqlite3.Connection, query: str, allowed: set[str] | None, k: int
) -> list[tuple[Key, float]]:
    """Chunks by BM25 (SQLite's `bm25()`, smaller is better, negated here), best first."""
    match = _fts_query(query)
    if not match:
        return []
    sql = (
        f"SELECT file, idx, bm25({FTS_TABLE}) FROM {FTS_TABLE} WHERE {FTS_TABLE} MATCH ? "
        f"ORDER BY bm25({FTS_TABLE})"
    )
    limit = k or BM25_CANDIDATES
    if allowed is None:
        rows = db.execute(sql + " LIMIT ?", (match, limit)).fetchall()
    else:
        rows = [r for r in db.execute(sql, (match,)) if r[0] in allowed][:limit]
    return [((file, int(idx)), -float(score)) for file, idx, score in rows]


def _fuse(rankings: Sequence[Sequence[tuple[Key, float]]]) -> list[tuple[Key, float]]:
    """Reciprocal rank fusion: each ranking gives a chunk 1 / (RRF_K + rank), rank from 1.
    It needs no common scale between cosines and BM25 scores, only the orders."""
    fused: dict[Key, float] = {}
    for ranking in rankings:
        for rank, (key, _) in enumerate(ranking, start=1):
            fused[key] = fused.get(key, 0.0) + 1.0 / (RRF_K + rank)
    return sorted(fused.items(), key=lambda item: -item[1])


def _relative_paths(files: Sequence[str], roots: Sequence[str]) -> dict[str, str]:
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


def _from_here(glob: str) -> bool:
    """Whether a --path GLOB is a path from the current directory, as a shell reads one."""
    return glob in (".", "..") or glob.startswith(("/", "./", "../"))


def _path_matches(rel: str, globs: Sequence[str], full: str = "") -> bool:
    """Whether `rel` matches one of the globs: against the whole relative path (`*` spans
    folders), a pattern without `/` also against the file name, and a folder name against
    everything under it (`docs` or `docs/`). A glob starting with `/`, `./` or `../` is a
    path from the current directory, matched the same way against the file's `full` path
    (so `--path ./sub`, typed in the indexed folder, means its `sub`)."""
    name = rel.rsplit("/", 1)[-1]
    for glob in globs:
        if _from_here(glob):
            here = os.path.realpath(glob)
            under = here.rstrip("/") + "/*"
            if full and (fnmatch.fnmatchcase(full, here) or fnmatch.fnmatchcase(full, under)):
                return True
            continue
        pattern = glob.strip("/") if glob.strip("/") else glob
        if (
            fnmatch.fnmatchcase(rel, pattern)
            or ("/" not in pattern and fnmatch.fnmatchcase(name, pattern))
            or fnmatch.fnmatchcase(rel, pattern + "/*")
        ):
            return True
    return False


def _stem(word: str) -> str:
    """A crude English stem, enough to match "renewed" with "renew" inside one chunk."""
    w = word.lower()
    for suffix in ("ing", "ed", "es", "s", "ly"):
        if w.endswith(suffix) and len(w) - len(suffix) >= 3:
            return w[: -len(suffix)]
    return w


def _units(text: str) -> list[tuple[int, int]]:
    """The lines of `text`, long lines cut at sentence ends: (start, end) offsets, blank
    lines left out."""
    units = []
    pos = 0
    for line in text.split("\n"):
        start = pos
        pos += len(line) + 1
        if not line.strip():
            continue
        if len(line) <= PASSAGE_CHARS:
            units.append((start, start + len(line)))
            continue
        piece = 0
        for m in _SENTENCE_END.finditer(line):
            units.append((start + piece, start + m.start()))
            piece = m.end()
        units.append((start + piece, start + len(line)))
    return [(a, b) for a, b in units if b > a]


def _windows(text: str, *, step_whole: bool) -> list[tuple[int, int]]:
    """Runs of consecutive units up to PASSAGE_CHARS: one starting at each unit, or with
    `step_whole`, back to back (fewer, for passages that are embedded)."""
    units = _units(text)
    out = []
    i = 0
    while i < len(units):
        j = i + 1
        while j < len(units) and units[j][1] - units[i][0] <= PASSAGE_CHARS:
            j += 1
        out.append((units[i][0], units[j - 1][1]))
        i = j if step_whole else i + 1
    return out or [(0, len(text))]


def _lexical_best(query: str, text: str) -> tuple[tuple[int, int], int]:
    """The window sharing most distinct query words with the query (stemmed, stopwords out),
    among equals one whose first line shares one (so the passage and its line number start
    at the match, not lines before it), then the earliest; and how many words it shares."""
    terms = {_stem(w) for w in _WORD.findall(query) if w.lower() not in STOPWORDS}

    def shared(a: int, b: int) -> int:
        return len(terms & {_stem(w) for w in _WORD.findall(text[a:b])})

    units = dict(_units(text))
    best, best_key = (0, 0), (-1, False)
    for a, b in _windows(text, step_whole=False):
        key = (shared(a, b), shared(a, units.get(a, b)) > 0)
        if key > best_key:
            best, best_key = (a, b), key
    return best, best_key[0]


def _best_passages(
    client: embedd_client.Client | None,
    model: str,
    q: np.ndarray[Any, np.dtype[np.float32]] | None,
    query: str,
    texts: Sequence[str],
) -> list[tuple[int, str]]:
    """For each chunk text, the passage that best answers the query, as (offset in the chunk,
    passage text). By the query's words first (cheap, and what a reader scans for); a chunk
    that shares no word with the query (a match by meaning) has its passages embedded and the
    one closest to the query vector chosen, in one request at interactive priority."""
    chosen: list[tuple[int, int]] = []
    by_meaning: list[int] = []
    for i, text in enumerate(texts):
        span, shared = _lexical_best(query, text)
        chosen.append(span)
        if shared <= 0 and client is not None and q is not None:
            by_meaning.append(i)
    if by_meaning:
        assert client is not None and q is not None
        windows = {i: _windows(texts[i], step_whole=True) for i in by_meaning}
        flat = [(i, w) for i in by_meaning for w in windows[i]]
        vectors = np.asarray(
            client.embed([texts[i][a:b] for i, (a, b) in flat], model, priority="interactive",
                         truncate=True),
            dtype=np.float32,
        ).reshape(len(flat), -1)  # fmt: skip
        scores = vectors @ q
        for i in by_meaning:
            rows = [n for n, (j, _) in enumerate(flat) if j == i]
            chosen[i] = flat[max(rows, key=lambda n: scores[n])][1]
    out = []
    for text, (a, b) in zip(texts, chosen, strict=True):
        lead = len(text[a:b]) - len(text[a:b].lstrip())
        out.append((a + lead, text[a:b].strip()))
    return out


# --------------------------------------------------------------------------------------------
# Listing and dropping an index


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
        db, tables = _connect_ro(path, shown)
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
    rel = _relative_paths([r[0] for r in rows], roots)
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


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t is not None else "?"


def describe_text(info: IndexInfo) -> str:
    size = (
        f"at most {info.chunking['chunk_tokens']} tokens"
        if info.chunking.get("chunk_tokens")
        else "the model's limit"
    )
    lines = [
        f"index     {display(info.path)}",
        f"model     {info.model} (fingerprint {info.fingerprint[:12]})",
        f"files     {len(info.files)}, {info.chunks} chunks ({size}, overlap "
        f"{info.chunking.get('overlap', 0)})",
        f"roots     {', '.join(display(r) for r in info.roots) or '?'}",
        f"created   {_when(info.created)}, updated {_when(info.updated)}",
        f"keywords  {'yes (hybrid search)' if info.keyword_search else 'no: re-run embedd index'}",
    ]
    if info.files:
        lines.append("")
        lines.extend(f"{n:6d}  {_when(t)}  {display(p)}" for p, n, t in info.files)
    return "\n".join(lines)


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
        db, _ = _connect_ro(path, shown)
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
    for suffix in ("-journal", "-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Printing hits


def hits_json(hits: Sequence[Hit]) -> str:
    return json.dumps(
        [
            {"path": h.path, "line": h.line, "score": h.score, "passage": h.passage,
             "file": h.file, "span": list(h.span), "text": h.text}
            for h in hits
        ],
        indent=2,
    )  # fmt: skip


# Lines of a passage shown under each hit.
PASSAGE_LINES = 3
# Columns the passage is indented by.
PASSAGE_INDENT = 4


def hits_text(hits: Sequence[Hit], width: int = 80) -> str:
    """`path:line  score` and the passage below it (wrapped to the terminal, at most
    PASSAGE_LINES lines): the form editors and terminals open at that line."""
    lines = []
    wrap = max(20, width - 1 - PASSAGE_INDENT)
    for h in hits:
        where = f"{display(h.path)}:{h.line}" if h.line else display(h.path)
        lines.append(f"{where}  {h.score:.4f}")
        passage = textwrap.wrap(" ".join(h.passage.split()), wrap)
        if len(passage) > PASSAGE_LINES:
            passage = passage[:PASSAGE_LINES]
            passage[-1] = passage[-1][: wrap - 1] + "…"
        lines.extend(" " * PASSAGE_INDENT + p for p in passage)
    return "\n".join(lines) if lines else "(no matching chunks in the index)"
