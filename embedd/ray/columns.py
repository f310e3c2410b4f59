"""Arrow tables in and out of the Ray steps: the shared chunk record (embedd/index/records.py) as
Arrow columns, built from the daemon's answers. Pure: pyarrow and numpy, no Ray, no I/O.

The vector column is `fixed_size_list<float32>[dim]`: Lance takes only that as a vector column,
and a numpy column written by Ray reads back from Parquet as `large_list<float>`, which it
refuses. The model fingerprint is a column (a row carries what made it) and also schema
metadata (a reader can check a file without reading rows).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from embedd.index.records import (
    COLUMNS,
    META_FINGERPRINT,
    META_MODEL,
    META_OPTIONS,
    NAMES,
    chunk_id,
    start_lines,
)
from embedd.wire.options import Long, VectorOptions

# The input columns the steps read: a document's (or a chunk's) text and, when the rows are
# chunks of documents, which document and where in it.
TEXT = "text"
FILE = "file"
IDX = "idx"
# Added beside the shared record when inputs may be split or cut: how many windows each input
# became (long="split"), and whether it was cut (long="truncate").
WINDOWS = "windows"
TRUNCATED = "truncated"

# The shared record's Arrow types, by the names COLUMNS gives them.
_SCALAR_TYPES = {"string": pa.string(), "int64": pa.int64()}


def arrow_type(name: str, dim: int | None = None) -> Any:
    """The Arrow type of the shared column `name` (the vector's needs the model's `dim`)."""
    column = next(c for c in COLUMNS if c.name == name)
    if column.arrow == "fixed_size_list<float32>":
        if dim is None:
            raise ValueError("the vector column's type needs the dimension")
        return pa.list_(pa.float32(), dim)
    return _SCALAR_TYPES[column.arrow]


@dataclass(frozen=True, kw_only=True)
class EmbedSettings(VectorOptions):
    """What the vectors depend on besides the model file: the daemon's model name and the
    vector options (PROTOCOL.md, `embed`). The same settings give the same chunk ids, which is
    how a rerun finds what is already done. `long="split"` (the default here) embeds an input
    over the model's limit as the token-weighted mean of its windows instead of failing the
    job; `overlap` is the tokens windows share. A chunk record holds one vector per chunk, so
    `pool` stays "mean"."""

    model: str = "default"
    long: Long = "split"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pool != "mean":
            raise ValueError('a chunk record holds one vector per chunk: pool must be "mean"')

    @property
    def options(self) -> VectorOptions:
        """The vector options alone, as a chunk id hashes them."""
        return VectorOptions(
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(VectorOptions)}
        )

    def request(self) -> dict[str, Any]:
        """The embed request's arguments besides the input (bulk priority: a corpus job must
        never delay a desktop's searches on a shared node; the cache is skipped: every text
        of a corpus is new, and caching them would only evict the desktop's)."""
        return {
            "model": self.model,
            **self.options.request(),
            "priority": "bulk",
            "cache": False,
            "encoding": "f32",
        }


def _optional(batch: pa.Table, name: str) -> list[Any]:
    if name in batch.column_names:
        values: list[Any] = batch.column(name).to_pylist()
        return values
    return [None] * batch.num_rows


def chunk_ids(batch: pa.Table, fingerprint: str, options: VectorOptions) -> pa.Array:
    """The stable id of each row (`chunk_id`): of its text, and of its document and place
    when the batch has `file` and `idx` columns."""
    texts = batch.column(TEXT).to_pylist()
    files = _optional(batch, FILE)
    idxs = _optional(batch, IDX)
    return pa.array(
        [
            chunk_id(t, fingerprint, options, file=f, idx=None if i is None else int(i))
            for t, f, i in zip(texts, files, idxs, strict=True)
        ],
        pa.string(),
    )


def vector_array(vectors: npt.NDArray[np.float32]) -> pa.FixedSizeListArray:
    """Rows of a (n, dim) matrix as `fixed_size_list<float32>[dim]`."""
    matrix = np.ascontiguousarray(vectors, dtype=np.float32)
    if matrix.ndim != 2:
        raise ValueError(f"vectors must be a (rows, dim) matrix, not shape {matrix.shape}")
    flat = pa.array(matrix.reshape(-1), pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, matrix.shape[1])


def decode_vectors(result: Mapping[str, Any]) -> npt.NDArray[np.float32]:
    """The vectors of an `embed` answer with encoding f32 (count x dim little-endian floats)."""
    count, dim = int(result["count"]), int(result["dim"])
    return np.frombuffer(result["embeddings"], "<f4").reshape(count, dim).astype(np.float32)


def _ordered(columns: Mapping[str, Any], metadata: Mapping[str, str]) -> pa.Table:
    """A table of `columns`: the shared record's first, in its order, then the others as
    they came; with the schema metadata."""
    names = [n for n in NAMES if n in columns] + [n for n in columns if n not in NAMES]
    table = pa.table({n: columns[n] for n in names})
    return table.replace_schema_metadata({k: v for k, v in metadata.items()})


def embedded(
    batch: pa.Table,
    result: Mapping[str, Any],
    *,
    fingerprint: str,
    settings: EmbedSettings,
) -> pa.Table:
    """`batch` with the shared record's columns filled from the `embed` answer `result` (its
    inputs were the batch's texts, in order): id, vector, model, model_fingerprint and tokens,
    replacing any columns of those names, plus `windows` (long="split") or `truncated`
    (long="truncate"). Every other column of the batch is kept."""
    n = batch.num_rows
    vectors = decode_vectors(result)
    if len(vectors) != n:
        raise ValueError(f"{len(vectors)} vectors for {n} rows")
    added: dict[str, Any] = {
        "id": chunk_ids(batch, fingerprint, settings.options),
        "vector": vector_array(vectors),
        "model": pa.array([settings.model] * n, pa.string()),
        "model_fingerprint": pa.array([fingerprint] * n, pa.string()),
        "tokens": pa.array(result["tokens"], pa.int64()),
    }
    if settings.long == "split":
        added[WINDOWS] = pa.array(result["windows"], pa.int64())
    elif settings.long == "truncate":
        added[TRUNCATED] = pa.array(result["truncated"], pa.bool_())
    columns: dict[str, Any] = {n: batch.column(n) for n in batch.column_names if n not in added}
    columns.update(added)
    metadata = {
        META_FINGERPRINT: fingerprint,
        META_MODEL: settings.model,
        META_OPTIONS: json.dumps(settings.options.id_fields(), sort_keys=True),
    }
    return _ordered(columns, metadata)


# Columns a Chunk step writes for each chunk; an input column of the same name is replaced.
CHUNK_COLUMNS = (IDX, "start", "end", "line", TEXT, "tokens")


def chunked(batch: pa.Table, chunks: Sequence[Sequence[Mapping[str, Any]]]) -> pa.Table:
    """A row per chunk, from a batch of documents (`file`, `text`, anything else) and each
    document's chunks as the daemon's `chunk` op answers them (`text`, `span`, `tokens`):
    the document's other columns repeated, and the chunk's place (`idx`, `start`, `end`,
    `line`), `text` and `tokens`."""
    if len(chunks) != batch.num_rows:
        raise ValueError(f"chunks for {len(chunks)} documents, the batch has {batch.num_rows}")
    texts = batch.column(TEXT).to_pylist()
    owners = [i for i, doc in enumerate(chunks) for _ in doc]
    kept = [n for n in batch.column_names if n not in CHUNK_COLUMNS]
    base = batch.select(kept).take(pa.array(owners, pa.int64()))
    idx: list[int] = []
    starts: list[int] = []
    ends: list[int] = []
    lines: list[int] = []
    pieces: list[str] = []
    tokens: list[int] = []
    for text, doc in zip(texts, chunks, strict=True):
        spans = [(int(c["span"][0]), int(c["span"][1])) for c in doc]
        idx.extend(range(len(doc)))
        starts.extend(s for s, _ in spans)
        ends.extend(e for _, e in spans)
        lines.extend(start_lines(text, [s for s, _ in spans]))
        pieces.extend(str(c["text"]) for c in doc)
        tokens.extend(int(c["tokens"]) for c in doc)
    columns: dict[str, Any] = {n: base.column(n) for n in kept}
    columns.update(
        {
            IDX: pa.array(idx, pa.int64()),
            "start": pa.array(starts, pa.int64()),
            "end": pa.array(ends, pa.int64()),
            "line": pa.array(lines, pa.int64()),
            TEXT: pa.array(pieces, pa.string()),
            "tokens": pa.array(tokens, pa.int64()),
        }
    )
    return _ordered(columns, {})
