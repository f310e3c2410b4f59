"""Building an index: files to chunks to vectors to rows, and the chunks of a Parquet output
imported as they are.

`index_paths` walks the folders, reads each file to see whether its content changed, then cuts
each changed one with the daemon's `chunk` op (the model's own tokenizer and limit, or
`chunk_tokens`/`overlap`), embeds the chunks at bulk priority a batch at a time and stores a
file's rows in one transaction, so an interrupted run resumes with the next file and a re-run
touches only what changed (and drops the rows of files that are gone). What it does is told
as it happens as `ProgressEvent`s, data a caller draws as it likes.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import embedd_client
import numpy as np
import numpy.typing as npt

from embedd.index import vectors
from embedd.index.records import (
    COLUMNS,
    META_FINGERPRINT,
    NAMES,
    chunk_id,
    model_fingerprint,
    start_lines,
)
from embedd.index.store import (
    INDEX_OPTIONS,
    Chunking,
    IndexUsageError,
    check_model,
    display,
    drop_file,
    fill_lines,
    insert_chunks,
    model_card,
    open_index,
    record_run,
    stored_dim,
    stored_vectors,
    text_hash,
)
from embedd.index.vectors import row_key
from embedd.index.walk import (
    SKIP_REFUSED,
    Skipped,
    check_name,
    decode,
    is_pdf,
    read_file,
    under,
    walk,
)

# Chunks embedded per request (bulk priority; small enough to keep memory flat, and the
# progress line moves once per batch: a few seconds of CPU work at most).
EMBED_BATCH = 32


@dataclass
class Counts:
    files_seen: int = 0
    files_indexed: int = 0
    files_unchanged: int = 0
    files_removed: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    chunks: int = 0
    tokens: int = 0
    # Chunks whose text (normalized: `store.text_hash`) the index already held, or an earlier
    # chunk of the run had: their vector was copied, not computed again.
    chunks_reused: int = 0
    # Each skipped file and why, in the order met.
    skips: list[tuple[str, str]] = field(default_factory=list)

    @property
    def files_skipped(self) -> int:
        return sum(self.skipped.values())

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


# --------------------------------------------------------------------------------------------
# What a run tells as it goes


@dataclass(frozen=True)
class Finding:
    """`found` files found so far (the first, with 0, as the walk begins)."""

    found: int


@dataclass(frozen=True)
class Checking:
    """`checked` of the `files` found read and compared with the index so far."""

    checked: int
    files: int


@dataclass(frozen=True)
class Rechunking:
    """The chunk settings differ from the index's: every file is chunked and embedded again."""


@dataclass(frozen=True)
class FileSkipped:
    """A file left out of this run: `reason` is one of walk's SKIP_* categories, `detail`
    what to tell the user."""

    name: str
    reason: str
    detail: str


@dataclass(frozen=True)
class Embedding:
    """The changed files are chunked and embedded from here on: `done` of the `files` need
    nothing more (unchanged or skipped), the others hold `bytes_ahead` bytes."""

    files: int
    done: int
    bytes_ahead: int


@dataclass(frozen=True)
class Chunked:
    """The file `name` of `size` bytes was cut into chunks of `tokens` tokens in all."""

    name: str
    size: int
    tokens: int


@dataclass(frozen=True)
class BatchSent:
    """A batch of chunks went to the daemon to be embedded."""


@dataclass(frozen=True)
class Embedded:
    """A batch is done: `chunks` chunks of `tokens` tokens in all, `reused` of those chunks
    not sent to the daemon (their text was already embedded: its vector was copied)."""

    chunks: int
    tokens: int
    reused: int = 0


@dataclass(frozen=True)
class Refused:
    """`tokens` chunked tokens will not be embedded after all (the daemon refused the file)."""

    tokens: int


@dataclass(frozen=True)
class FileDone:
    """The file `name` of `size` bytes is finished (indexed or skipped); it was `chunked`
    when its tokens, not its bytes, were counted ahead."""

    name: str
    size: int
    chunked: bool


@dataclass(frozen=True)
class Finished:
    """The run is done; the summary (`Counts`) follows."""


ProgressEvent = (
    Finding
    | Checking
    | Rechunking
    | FileSkipped
    | Embedding
    | Chunked
    | BatchSent
    | Embedded
    | Refused
    | FileDone
    | Finished
)


def _ignore(event: ProgressEvent) -> None:
    """The progress of a run nobody watches."""


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
    progress: Callable[[ProgressEvent], None] | None = None,
) -> Counts:
    """Index the files under `paths` (files or folders) into the SQLite file `out`, through
    the daemon at `socket` (default: the usual socket) or an open `client`; returns what was
    done. Skipped files are in the result (`skips`); `progress`, when given, is told each
    step as it happens (`ProgressEvent`: what a progress line or a log is drawn from). Raises
    IndexUsageError, naming `out`, when the index cannot be opened, read or written (not an
    SQLite file, another program's database, a directory, a full disk), was built with
    another model, or the chunk settings are refused."""
    if client is None:
        with embedd_client.Client(socket, timeout=None) as own:
            return index_paths(
                paths, out, model=model, excludes=excludes, chunk_tokens=chunk_tokens,
                overlap=overlap, client=own, progress=progress,
            )  # fmt: skip
    chunking = Chunking(chunk_tokens, overlap)
    card = model_card(client, model)
    fingerprint = model_fingerprint(card)
    _check_chunking(client, model, chunking)
    target = Path(out)
    try:
        return _build(
            client, [Path(p) for p in paths], target, model, fingerprint, excludes, chunking,
            progress or _ignore,
        )  # fmt: skip
    except sqlite3.Error as exc:
        raise IndexUsageError(f"{display(str(target))}: {exc}") from None
    except vectors.WrongLength as exc:
        raise IndexUsageError(
            f"{display(str(target))}: {exc}: the index is damaged, rebuild it"
        ) from None
    except OSError as exc:
        raise IndexUsageError(
            f"{display(str(vectors.matrix_path(target)))}: {exc.strerror or exc}"
        ) from None


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
    db = open_index(target)
    done = False
    try:
        with db:
            seen: set[str] = set()
            dim = stored_dim(db)
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
        vectors.open_checked(target, db, dim).close()  # rebuilt from the rows just stored
        done = True
    except sqlite3.Error as exc:
        raise IndexUsageError(f"{display(str(target))}: {exc}") from None
    finally:
        db.close()
        if new and not done:
            for suffix in ("", "-journal", "-wal", "-shm", vectors.SUFFIX):
                target.with_name(target.name + suffix).unlink(missing_ok=True)
    return counts


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
        check_model(db, models.pop(), fingerprint)
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
                drop_file(db, row["file"])
                db.execute("INSERT INTO files VALUES (?, '', 0, ?)", (row["file"], time.time()))
        insert_chunks(db, rows)
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
    progress: Callable[[ProgressEvent], None],
) -> Counts:
    db = open_index(out)
    counts = Counts()
    try:
        check_model(db, model, fingerprint)
        rechunk = record_run(db, paths, chunking)
        db.commit()
        matrix = vectors.Writer(out, db)  # an index without one gets it here
        skip = [out] + [
            out.with_name(out.name + s) for s in ("-journal", "-wal", "-shm", vectors.SUFFIX)
        ]
        progress(Finding(0))
        files = list(walk(paths, excludes, skip, found=lambda n: progress(Finding(n))))
        known = dict(db.execute("SELECT path, sha256 FROM files").fetchall())
        unlined = {r[0] for r in db.execute("SELECT DISTINCT file FROM chunks WHERE line = 0")}
        if rechunk and known:
            progress(Rechunking())
        # First pass: what changed (the bytes ahead give the first estimate of the work).
        todo: list[tuple[Path, int]] = []
        for path in files:
            counts.files_seen += 1
            progress(Checking(counts.files_seen, len(files)))
            name = str(path)
            try:
                check_name(name)
                data = read_file(path)
                if not rechunk and known.get(name) == hashlib.sha256(data).hexdigest():
                    counts.files_unchanged += 1
                    if name in unlined:
                        fill_lines(db, name, decode(path, data))
                else:
                    if not is_pdf(path, data):
                        decode(path, data)  # a binary is reported now, not counted as work
                    todo.append((path, len(data)))
            except Skipped as skipped:
                _skipped(counts, progress, name, skipped)
        db.commit()
        progress(Embedding(len(files), len(files) - len(todo), sum(size for _, size in todo)))
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
                _index_file(client, db, matrix, name, digest, text, model, fingerprint,
                            chunking, counts, progress, size)  # fmt: skip
                counts.files_indexed += 1
            except Skipped as skipped:
                _skipped(counts, progress, name, skipped)
            progress(FileDone(name, size, chunked=chunked))
        present = {str(p) for p in files}
        gone = [p for p in known if p not in present and under(p, paths)]
        removed = [key for p in gone for key in drop_file(db, p)]
        counts.files_removed = len(gone)
        db.commit()
        matrix.changed(db, removed, [])
        progress(Finished())
    finally:
        db.close()
    return counts


def _skipped(
    counts: Counts, progress: Callable[[ProgressEvent], None], name: str, skipped: Skipped
) -> None:
    counts.skip(skipped.reason)
    counts.skips.append((name, str(skipped)))
    progress(FileSkipped(name, skipped.reason, str(skipped)))


def _index_file(
    client: embedd_client.Client,
    db: sqlite3.Connection,
    matrix: vectors.Writer,
    name: str,
    digest: str,
    text: str,
    model: str,
    fingerprint: str,
    chunking: Chunking,
    counts: Counts,
    progress: Callable[[ProgressEvent], None],
    size: int,
) -> None:
    """One file, in one transaction: all its chunks or none (Ctrl-C rolls it back). Text the
    daemon refuses as a bad request (say, only control or private-use characters, for which the
    model has no tokens) skips this file, not the run: the next run would meet it again. A
    chunk whose text the index already holds (this file's unchanged paragraphs, a copy of
    another file) gets that vector, copied, instead of being embedded again."""
    rows: list[dict[str, Any]] = []
    seen: dict[str, bytes] = {}  # this file's vectors by text hash
    total = done = reused = 0
    try:
        chunks = (
            client.chunk(text, model, max_tokens=chunking.tokens, overlap=chunking.overlap)
            if text.strip()
            else []
        )
        total = sum(int(c["tokens"]) for c in chunks)
        progress(Chunked(name, size, total))
        lines = start_lines(text, [c["span"][0] for c in chunks])
        for first in range(0, len(chunks), EMBED_BATCH):
            batch = chunks[first : first + EMBED_BATCH]
            hashes = [text_hash(c["text"]) for c in batch]
            seen.update(stored_vectors(db, [h for h in hashes if h not in seen]))
            new = {h: c["text"] for h, c in zip(hashes, batch, strict=True) if h not in seen}
            if new:
                progress(BatchSent())
                embedded = client.embed(
                    list(new.values()), model, priority="bulk", **INDEX_OPTIONS.request()
                )
                for h, vec in zip(new, embedded, strict=True):
                    seen[h] = np.asarray(vec, dtype="<f4").tobytes()
            for j, c in enumerate(batch):
                idx = first + j
                rows.append(
                    {"id": chunk_id(c["text"], fingerprint, INDEX_OPTIONS, file=name, idx=idx),
                     "file": name, "idx": idx, "start": c["span"][0], "end": c["span"][1],
                     "line": lines[idx], "text": c["text"], "tokens": c["tokens"],
                     "model": model, "model_fingerprint": fingerprint,
                     "vector": seen[hashes[j]], "text_hash": hashes[j]}
                )  # fmt: skip
            tokens = sum(int(c["tokens"]) for c in batch)
            done += tokens
            again = len(batch) - len(new)
            reused += again
            progress(Embedded(len(batch), tokens, again))
    except embedd_client.EmbeddError as exc:
        if exc.code != "bad_request":
            raise
        progress(Refused(total - done))
        raise Skipped(SKIP_REFUSED, exc.message) from None
    with db:
        removed = drop_file(db, name)
        db.execute(
            "INSERT INTO files VALUES (?, ?, ?, ?)", (name, digest, len(chunks), time.time())
        )
        insert_chunks(db, rows)
    matrix.changed(db, removed, [(row_key(name, r["idx"]), r["vector"]) for r in rows])
    counts.chunks += len(rows)
    counts.chunks_reused += reused
    counts.tokens += total
