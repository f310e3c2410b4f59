"""An index's vectors as one memory-mapped float32 matrix beside its SQLite file, so a query
scores every chunk with one matrix-vector product (numpy over the OS's page cache) instead of
reading every vector blob out of SQLite.

`INDEX.vectors`, beside `INDEX`, is a header of HEADER_BYTES, then one row per slot: the
chunk's vector (`dim` little-endian float32, unit length, the bytes of its SQLite blob) and
its key (int64: `row_key(file, idx)`, which is also the keyword table's rowid), or FREE for a
slot whose chunk was removed. New chunks fill free slots first, then are appended; when free
slots exceed COMPACT_FRACTION of all slots the file is rewritten with the live rows only.

SQLite is the truth. Triggers on the chunks table (`store.SCHEMA`) count every row inserted,
deleted or given another vector or key into `meta.generation`, whichever program writes the
index; the header records the generation its rows match. `check` compares, on every open:
the header's magic, version and checksum, the file's size, the model fingerprint, the
dimension, the generation and the number of live rows, then SAMPLE_ROWS rows spread over the
file byte for byte with their SQLite blobs. Any difference rebuilds the file from SQLite in
one pass over the chunk table, written beside it and renamed over it, so a crash at any point
leaves either the old file (whose generation no longer matches, so it is rebuilt) or the new.

Memory: the matrix is mapped, not read: it lives in the OS page cache, shared by every process
searching the index, and a search touches each of its pages once. The file is HEADER_BYTES
plus slots x (4 x dim + 8) bytes: 1,544 bytes a chunk for a 384-dimension model, so 30,000
chunks take 46 MB and 1,000,000 take 1.5 GB, about what the vector blobs take inside SQLite.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import sqlite3
import struct
import sys
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

MAGIC = b"EMBDVECS"
# Changes whenever the layout changes: a file of another version is rebuilt, never misread.
VERSION = 1
# The header takes one page, so the rows start page-aligned for the memory map.
HEADER_BYTES = 4096
# magic, version, dim, slots, live, generation, blake2b-256 of the model fingerprint, crc32.
_HEADER = struct.Struct("<8sIIQQQ32sI")
SUFFIX = ".vectors"
# The key of a slot whose chunk was removed (row keys are 63-bit, never negative).
FREE = -1
# Free slots over this share of all slots make the next update rewrite the file with the live
# rows only: at most a quarter of a search's reading is wasted on removed chunks, and a
# compaction (one pass over the live rows) is paid at most once per a quarter of the file
# removed, so its cost per removed row stays constant.
COMPACT_FRACTION = 0.25
# Rows compared byte for byte with SQLite on each open: a few milliseconds of lookups. A
# change that the generation missed and that touches a share f of the rows goes unseen with
# probability (1 - f) ** SAMPLE_ROWS (4 % for f = 0.1); the generation, kept by triggers
# inside SQLite, is what catches ordinary writes.
SAMPLE_ROWS = 32
# Rows read from SQLite and written at a time while rebuilding: bounded memory (6 MB at 384
# dimensions) whatever the size of the index.
REBUILD_BATCH = 4096


class Mismatch(Exception):
    """The matrix file does not match the SQLite index (the message says how): rebuild it."""


class WrongLength(Exception):
    """SQLite holds vectors of another length than the one expected: the index is damaged (or
    was built with another model), which no rebuild of the matrix can fix."""

    def __init__(self, wrong: int, total: int, first: int, dim: int) -> None:
        super().__init__(f"{wrong} of {total} stored vectors are not {dim} float32")
        self.wrong, self.total, self.first, self.dim = wrong, total, first, dim


def row_key(file: str, idx: int) -> int:
    """The key of chunk `idx` of `file`, in the matrix and as the keyword table's rowid: 63
    bits of a hash of the pair, so rows are found by key without a stored mapping (and the
    keyword table's rowid, unlike the chunk table's, survives VACUUM). A collision needs about
    3 billion chunks to become likely (the birthday bound of 2**63)."""
    digest = hashlib.blake2b(f"{file}\0{idx}".encode("utf-8", "surrogatepass"), digest_size=8)
    return int.from_bytes(digest.digest(), "big") >> 1


def matrix_path(index: Path) -> Path:
    """Where the matrix of the index at `index` lives."""
    return index.with_name(index.name + SUFFIX)


def fingerprint_digest(fingerprint: str) -> bytes:
    return hashlib.blake2b(fingerprint.encode("utf-8", "surrogatepass"), digest_size=32).digest()


# --------------------------------------------------------------------------------------------
# The file's layout (pure)


@dataclass(frozen=True)
class Header:
    """What the file holds: `slots` rows of `dim` float32 (`live` of them chunks, the rest
    FREE), matching SQLite's `generation`, of the model whose fingerprint hashes to `model`."""

    dim: int
    slots: int
    live: int
    generation: int
    model: bytes

    def pack(self) -> bytes:
        body = _HEADER.pack(
            MAGIC, VERSION, self.dim, self.slots, self.live, self.generation, self.model, 0
        )[:-4]
        return (body + struct.pack("<I", zlib.crc32(body))).ljust(HEADER_BYTES, b"\0")

    @staticmethod
    def unpack(data: bytes) -> Header:
        """The header at the start of `data`; Mismatch if it is not one this version wrote."""
        if len(data) < _HEADER.size:
            raise Mismatch(f"the file is {len(data)} bytes, shorter than its header")
        magic, version, dim, slots, live, generation, model, crc = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise Mismatch("not a vector matrix (wrong magic)")
        if version != VERSION:
            raise Mismatch(f"layout version {version}, this embedd writes {VERSION}")
        if zlib.crc32(data[: _HEADER.size - 4]) != crc:
            raise Mismatch("the header's checksum is wrong")
        if live > slots:
            raise Mismatch(f"{live} live rows in {slots} slots")
        return Header(dim, slots, live, generation, model)

    @property
    def row_bytes(self) -> int:
        return row_dtype(self.dim).itemsize

    @property
    def size(self) -> int:
        """The file's size in bytes."""
        return HEADER_BYTES + self.slots * self.row_bytes


def row_dtype(dim: int) -> np.dtype[Any]:
    """One row: the vector, then its key (packed: 4 x dim + 8 bytes)."""
    return np.dtype([("vector", "<f4", (dim,)), ("key", "<i8")])


def place(free: Sequence[int], slots: int, count: int) -> list[int]:
    """Where `count` new rows go: the free slots first (lowest first), then appended after the
    `slots` the file has."""
    chosen = sorted(free)[:count]
    return chosen + list(range(slots, slots + count - len(chosen)))


def needs_compaction(slots: int, live: int) -> bool:
    """Whether the free slots exceed COMPACT_FRACTION of all slots."""
    return slots - live > COMPACT_FRACTION * slots


# --------------------------------------------------------------------------------------------
# SQLite's side: the generation and the rows


def sqlite_generation(db: sqlite3.Connection) -> int | None:
    """How many chunk rows were ever inserted, deleted or changed (None: an index written by a
    version without the triggers, not yet opened for writing by this one)."""
    row = db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
    return None if row is None else int(row[0])


def _model(db: sqlite3.Connection) -> bytes:
    row = db.execute("SELECT value FROM meta WHERE key = 'fingerprint'").fetchone()
    return fingerprint_digest(str(row[0]) if row else "")


def _blobs(db: sqlite3.Connection, keys: Sequence[int]) -> dict[int, bytes]:
    """The SQLite vector of each row key (through the keyword table, whose rowid it is)."""
    marks = ",".join("?" * len(keys))
    rows = db.execute(
        f"SELECT f.rowid, c.vector FROM chunks_fts f JOIN chunks c "
        f"ON c.file = f.file AND c.idx = f.idx WHERE f.rowid IN ({marks})",
        list(keys),
    )
    return {int(k): bytes(v) for k, v in rows}


# --------------------------------------------------------------------------------------------
# Reading


@contextmanager
def _locked(handle: IO[bytes], exclusive: bool) -> Iterator[None]:
    """An advisory lock on the matrix file: searches share it, an update holds it alone (a
    rebuild needs none: it renames a new file over the old)."""
    _flock(handle, shared=not exclusive)
    try:
        yield
    finally:
        _flock(handle, shared=None)


class Matrix:
    """An open matrix file: its header and its rows, memory-mapped read-only."""

    def __init__(self, path: Path, handle: IO[bytes], header: Header) -> None:
        self.path = path
        self.handle = handle
        self.header = header
        self.rows: npt.NDArray[Any]
        if header.slots:
            # A plain array over the map: indexing a np.memmap costs tens of microseconds.
            self.rows = np.asarray(np.memmap(
                handle, dtype=row_dtype(header.dim), mode="r", offset=HEADER_BYTES,
                shape=(header.slots,),
            ))  # fmt: skip
        else:
            self.rows = np.zeros(0, dtype=row_dtype(header.dim))

    @property
    def vectors(self) -> npt.NDArray[np.float32]:
        """slots x dim, a strided view (no copy) of the mapped rows."""
        out: npt.NDArray[np.float32] = self.rows["vector"]
        return out

    @property
    def keys(self) -> npt.NDArray[np.int64]:
        out: npt.NDArray[np.int64] = self.rows["key"]
        return out

    def close(self) -> None:
        del self.rows
        self.handle.close()


def _open(path: Path) -> Matrix:
    """The matrix at `path` as it is; Mismatch if absent or not whole."""
    try:
        handle = open(path, "rb")  # noqa: SIM115 (held by the Matrix until closed)
    except FileNotFoundError:
        raise Mismatch("there is no matrix file") from None
    try:
        header = Header.unpack(handle.read(HEADER_BYTES))
        size = os.fstat(handle.fileno()).st_size
        if size != header.size:
            raise Mismatch(f"the file is {size} bytes, its header says {header.size}")
        return Matrix(path, handle, header)
    except BaseException:
        handle.close()
        raise


def check(matrix: Matrix, db: sqlite3.Connection, dim: int | None) -> None:
    """Mismatch, saying what differs, unless the matrix holds what SQLite holds (see the
    module's description of what is compared); `dim` is the dimension the caller expects
    (None: whatever the index holds). Cost: a few indexed lookups and SAMPLE_ROWS page reads,
    plus SQLite's count of the chunk table (one pass over its smallest index: a few
    milliseconds per 100,000 chunks)."""
    _check_counts(matrix, db, dim)
    header = matrix.header
    if not header.live:
        return
    keys = matrix.keys
    step = max(1, header.slots // SAMPLE_ROWS)
    sample = [*range(0, header.slots, step)][:SAMPLE_ROWS]
    sample.append(header.slots - 1)
    wanted = {int(keys[s]): s for s in sample if keys[s] != FREE}
    stored = _blobs(db, list(wanted))
    for key, slot in wanted.items():
        if stored.get(key) != matrix.vectors[slot].tobytes():
            raise Mismatch(f"row {slot} differs from the index's vector for its chunk")


def _check_counts(
    matrix: Matrix, db: sqlite3.Connection, dim: int | None, *, count: bool = True
) -> None:
    """`check` without the sample of rows: the generation, model, dimension and (with
    `count`: SQLite counts the chunk table, tens of milliseconds at a million chunks) the
    number of chunks."""
    header = matrix.header
    generation = sqlite_generation(db)
    if header.generation != generation:
        raise Mismatch(f"it matches generation {header.generation}, the index is at {generation}")
    if header.model != _model(db):
        raise Mismatch("it holds another model's vectors")
    if count:
        chunks = int(db.execute("SELECT count(*) FROM chunks").fetchone()[0])
        if header.live != chunks:
            raise Mismatch(f"it holds {header.live} vectors, the index {chunks}")
    if header.live and dim is not None and header.dim != dim:
        raise Mismatch(f"its vectors have {header.dim} dimensions, not {dim}")


def open_checked(index: Path, db: sqlite3.Connection, dim: int | None) -> Matrix:
    """The matrix of the index `index` (open as `db`), checked against it and rebuilt from it
    when they differ. Raises WrongLength if SQLite's vectors are not all `dim` long, OSError if
    the file cannot be written (a read-only folder)."""
    path = matrix_path(index)
    try:
        matrix = _open(path)
    except Mismatch:
        pass
    else:
        try:
            check(matrix, db, dim)
            return matrix
        except Mismatch:
            matrix.close()
        except BaseException:
            matrix.close()
            raise
    rebuild(index, db, dim)
    matrix = _open(path)
    try:
        check(matrix, db, dim)  # another writer may have come between: then rebuild again
    except Mismatch:
        matrix.close()
        rebuild(index, db, dim)
        matrix = _open(path)
    return matrix


# Matrices a process keeps mapped between its searches, most recently used kept: mapping a
# file costs a page fault per page on its first reading (for 1,000,000 chunks, seconds), so a
# program searching through the Python API pays it once. Each is only address space over the
# page cache; 4 covers a program that searches a few indexes in turn.
MAPPED_MATRICES = 4
_mapped: OrderedDict[Path, Matrix] = OrderedDict()


@contextmanager
def shared(index: Path, db: sqlite3.Connection, dim: int | None) -> Iterator[Matrix]:
    """The matrix of `index`, checked against SQLite, held under a shared lock while the
    caller reads it (an update waits). One this process mapped before is used again when
    the file is still the one mapped, with the same header, and its generation, model and
    dimension still match SQLite's (the generation moves with every chunk row written);
    else the file is opened and fully checked (and rebuilt if it differs)."""
    path = matrix_path(index)
    matrix = _mapped.pop(path, None)
    for _ in range(3):  # a writer renaming a new file over it between open and lock: again
        fresh = matrix is None
        if matrix is None:
            matrix = open_checked(index, db, dim)
        _flock(matrix.handle, shared=True)
        try:
            if _current(matrix):
                if not fresh:
                    _check_counts(matrix, db, dim, count=False)
                break
        except Mismatch:
            pass
        except BaseException:
            _flock(matrix.handle, shared=None)
            matrix.close()
            raise
        _flock(matrix.handle, shared=None)
        matrix.close()
        matrix = None
    else:
        raise Mismatch("the matrix file kept changing while it was opened")
    try:
        yield matrix
    except BaseException:
        _flock(matrix.handle, shared=None)
        matrix.close()
        raise
    _flock(matrix.handle, shared=None)
    _mapped[path] = matrix
    while len(_mapped) > MAPPED_MATRICES:
        _mapped.popitem(last=False)[1].close()


def forget_mapped() -> None:
    """Unmap every matrix this process keeps mapped (the next search maps afresh)."""
    while _mapped:
        _mapped.popitem()[1].close()


def _flock(handle: IO[bytes], *, shared: bool | None) -> None:
    """Take the file's advisory lock, shared or alone, or (None) release it."""
    if sys.platform == "win32":  # no flock; Windows cannot rename over a mapped file anyway
        return
    import fcntl

    op = fcntl.LOCK_UN if shared is None else fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    fcntl.flock(handle.fileno(), op)


def _current(matrix: Matrix) -> bool:
    """Whether `matrix` is still the file at its path, unchanged: same inode, size and
    header bytes (every update rewrites the header)."""
    try:
        now = os.stat(matrix.path)
    except FileNotFoundError:
        return False
    mine = os.fstat(matrix.handle.fileno())
    if (now.st_dev, now.st_ino, now.st_size) != (mine.st_dev, mine.st_ino, matrix.header.size):
        return False
    return os.pread(matrix.handle.fileno(), _HEADER.size, 0) == matrix.header.pack()[: _HEADER.size]


# --------------------------------------------------------------------------------------------
# Writing


def rebuild(index: Path, db: sqlite3.Connection, dim: int | None) -> Header:
    """Write the matrix afresh from SQLite's rows, in one read transaction (a consistent
    snapshot), beside the old file, then rename it over. Raises WrongLength when the stored
    vectors are not all of one length (`dim`, when given)."""
    path = matrix_path(index)
    temp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    began = not db.in_transaction
    if began:
        db.execute("BEGIN")
    try:
        generation = sqlite_generation(db) or 0
        total = int(db.execute("SELECT count(*) FROM chunks").fetchone()[0])
        _check_lengths(db, dim, total)
        if dim is None:
            row = db.execute("SELECT length(vector) FROM chunks LIMIT 1").fetchone()
            dim = 0 if row is None else int(row[0]) // 4
        header = Header(dim, total, total, generation, _model(db))
        with open(temp, "wb") as out:
            out.write(header.pack())
            rows = db.execute("SELECT file, idx, vector FROM chunks")
            while batch := rows.fetchmany(REBUILD_BATCH):
                block = np.empty(len(batch), dtype=row_dtype(dim))
                block["vector"] = np.frombuffer(
                    b"".join(v for _, _, v in batch), dtype="<f4"
                ).reshape(len(batch), dim)
                block["key"] = [row_key(f, i) for f, i, _ in batch]
                out.write(block.tobytes())
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    finally:
        if began:
            db.execute("COMMIT")
    return header


def _check_lengths(db: sqlite3.Connection, dim: int | None, total: int) -> None:
    """WrongLength unless every stored vector has one length (`dim` x 4 bytes, when given)."""
    if dim is None:
        lengths = db.execute("SELECT DISTINCT length(vector) FROM chunks LIMIT 2").fetchall()
        if len(lengths) < 2:
            return
        dim = int(lengths[0][0]) // 4
    width = dim * 4
    wrong = db.execute(
        "SELECT count(*) FROM chunks WHERE length(vector) != ? OR typeof(vector) != 'blob'",
        (width,),
    ).fetchone()
    if wrong[0]:
        first = db.execute(
            "SELECT length(vector) FROM chunks WHERE length(vector) != ? OR typeof(vector) != "
            "'blob' LIMIT 1",
            (width,),
        ).fetchone()[0]
        raise WrongLength(int(wrong[0]), total, int(first), dim)


class Writer:
    """The matrix kept in step with SQLite by the process writing the index: after each
    committed change it is told the row keys removed and the rows added, and applies them in
    place if SQLite's generation moved by exactly those rows (nobody else wrote between),
    else rebuilds. Holds the keys of every slot in memory (8 bytes a slot) to find removed
    rows and free slots without reading the mapped vectors."""

    header: Header
    keys: npt.NDArray[np.int64]

    def __init__(self, index: Path, db: sqlite3.Connection) -> None:
        self.index = index
        self.path = matrix_path(index)
        self.rebuilds = 0
        self.compactions = 0
        self._reload(db)

    def _reload(self, db: sqlite3.Connection) -> None:
        """The file's header and slot keys, checked against SQLite (rebuilt if they differ)."""
        matrix = open_checked(self.index, db, None)
        self.header = matrix.header
        self.keys = np.array(matrix.keys, dtype=np.int64)
        matrix.close()

    def changed(
        self,
        db: sqlite3.Connection,
        removed: Sequence[int],
        added: Sequence[tuple[int, bytes]],
    ) -> None:
        """Apply a committed change: `removed` row keys, `added` (row key, vector bytes)."""
        expected = self.header.generation + len(removed) + len(added)
        if sqlite_generation(db) != expected or (
            added and self.header.live and len(added[0][1]) != self.header.row_bytes - 8
        ):
            rebuild(self.index, db, None)
            self.rebuilds += 1
            self._reload(db)
            return
        if not removed and not added:
            return
        applied = False
        with open(self.path, "r+b") as handle, _locked(handle, exclusive=True):
            # Still the file this writer loaded: a search may have rebuilt it meanwhile (it
            # saw SQLite ahead of the matrix between a commit and this update).
            on_disk = os.pread(handle.fileno(), _HEADER.size, 0)
            if (
                _same_file(handle, self.path)
                and on_disk == self.header.pack()[: _HEADER.size]
                and os.fstat(handle.fileno()).st_size == self.header.size
            ):
                self._apply(handle, removed, added, expected)
                applied = True
        if not applied:
            rebuild(self.index, db, None)
            self.rebuilds += 1
            self._reload(db)
            return
        if needs_compaction(self.header.slots, self.header.live):
            self.compact(db)

    def _apply(
        self,
        handle: IO[bytes],
        removed: Sequence[int],
        added: Sequence[tuple[int, bytes]],
        generation: int,
    ) -> None:
        header = self.header
        if added and not header.live:
            header = replace(header, dim=len(added[0][1]) // 4, slots=0)
            self.keys = np.zeros(0, dtype=np.int64)
            handle.truncate(HEADER_BYTES)
        dtype = row_dtype(header.dim)
        gone = np.flatnonzero(np.isin(self.keys, np.asarray(removed, dtype=np.int64)))
        key_at = header.dim * 4
        free_row = np.zeros(1, dtype=dtype)
        free_row["key"] = FREE
        for slot in gone.tolist():  # the vector is zeroed too: a FREE row never scores
            at = HEADER_BYTES + slot * dtype.itemsize
            os.pwrite(handle.fileno(), free_row.tobytes(), at)
        self.keys[gone] = FREE
        free = np.flatnonzero(self.keys == FREE).tolist()
        slots = place(free, header.slots, len(added))
        grown = max([header.slots, *(s + 1 for s in slots)])
        if grown > header.slots:
            self.keys = np.concatenate([self.keys, np.full(grown - header.slots, FREE)])
            handle.truncate(HEADER_BYTES + grown * dtype.itemsize)
        for slot, (key, vector) in zip(slots, added, strict=True):
            row = vector + struct.pack("<q", key)
            assert len(row) == dtype.itemsize and key_at == len(vector)
            os.pwrite(handle.fileno(), row, HEADER_BYTES + slot * dtype.itemsize)
            self.keys[slot] = key
        live = header.live - len(gone) + len(added)
        self.header = replace(header, slots=grown, live=live, generation=generation)
        # The rows reach the disk before the header that vouches for them.
        os.fsync(handle.fileno())
        os.pwrite(handle.fileno(), self.header.pack(), 0)

    def compact(self, db: sqlite3.Connection) -> None:
        """Rewrite the file with its live rows only (through a rebuild from SQLite, which is
        the truth and reads no more than the live rows the file holds)."""
        rebuild(self.index, db, None)
        self.compactions += 1
        self._reload(db)


def _same_file(handle: IO[bytes], path: Path) -> bool:
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(handle.fileno())
    return (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)


def remove(index: Path) -> None:
    """Delete the matrix of the index `index` (with the index itself)."""
    matrix_path(index).unlink(missing_ok=True)


# Rows from which scoring is split across two threads (numpy releases the GIL while it
# computes): below it a thread's start costs more than half the product saves (about 1 ms
# for 30,000 rows of 384 on one core of the machine docs/search.md measured on).
SPLIT_ROWS = 20_000
# Threads a product is split across at most: scoring streams the matrix from memory, which
# two cores of a desktop already come close to saturating.
SCORE_THREADS = 2


def cosines(matrix: npt.NDArray[np.float32], q: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Each row of `matrix` (unit vectors) dotted with the unit query `q`. numpy's einsum
    rather than `@`: OpenBLAS splits a matrix-vector product across threads that spin at
    their barriers, and on a machine whose cores are busy they wait for a time slice (tens
    of milliseconds) while the product alone takes one. A large matrix is split in row
    halves across two of our own threads instead, which block rather than spin: on a busy
    machine they take turns on the free core, on an idle one each streams its half."""
    out: npt.NDArray[np.float32] = np.empty(len(matrix), dtype=np.float32)
    parts = _score_threads() if len(matrix) >= SPLIT_ROWS else 1
    bounds = [len(matrix) * i // parts for i in range(parts + 1)]
    helpers = [
        threading.Thread(
            target=np.einsum, args=("ij,j->i", matrix[a:b], q), kwargs={"out": out[a:b]}
        )
        for a, b in itertools.pairwise(bounds[1:])
    ]
    for helper in helpers:
        helper.start()
    np.einsum("ij,j->i", matrix[: bounds[1]], q, out=out[: bounds[1]])
    for helper in helpers:
        helper.join()
    return out


def _score_threads() -> int:
    """Threads scoring may use: SCORE_THREADS, fewer where this process may run on fewer
    cores (its affinity mask)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    return max(1, min(SCORE_THREADS, usable))


def top(
    matrix: Matrix,
    q: npt.NDArray[np.float32],
    n: int,
    allowed: npt.NDArray[np.int64] | None = None,
) -> list[tuple[int, float]]:
    """The `n` best (row key, cosine) of the matrix for the unit query `q`, best first, among
    the row keys `allowed` (all when None): one matrix-vector product, then argpartition."""
    if not matrix.header.live or n <= 0:
        return []
    scores = cosines(matrix.vectors, q)
    keys = matrix.keys
    if allowed is not None:
        scores[~np.isin(keys, allowed)] = -np.inf
    elif matrix.header.live < matrix.header.slots:
        scores[keys == FREE] = -np.inf
    n = min(n, len(scores))
    best = np.argpartition(-scores, n - 1)[:n] if n < len(scores) else np.arange(len(scores))
    best = best[np.argsort(-scores[best], kind="stable")]
    best = best[np.isfinite(scores[best])]
    return list(zip(keys[best].tolist(), scores[best].tolist(), strict=True))
