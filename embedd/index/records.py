"""The chunk record that `embedd index` (SQLite) and `embedd.ray` (Parquet, Lance) both write.

One set of columns, one stable id and one model fingerprint, so that an index can be built from
a cluster's output (`embedd index --from-parquet`) and searched with the desktop daemon that
computes the same vectors, and so that a rerun can tell which chunks are already embedded.

Pure: no I/O and no pyarrow (the core package never needs it). `embedd.index.store` declares
the columns to SQLite, `embedd.ray.columns` to Arrow, both from COLUMNS below. The options a
vector depends on are `embedd.wire.options.VectorOptions`, the type a request is built from.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from embedd.wire.options import VectorOptions


@dataclass(frozen=True)
class Column:
    """One column of the chunk record: its SQLite type, its Arrow type (as pyarrow spells it;
    the vector's dimension is the model's) and whether every output has it. The position
    columns are optional in Parquet: texts embedded without a `Chunk` step have no document."""

    name: str
    sqlite: str
    arrow: str
    required: bool
    meaning: str


COLUMNS = (
    Column("id", "TEXT", "string", True, "chunk_id() of the columns that make the vector"),
    Column("file", "TEXT", "string", False, "the document: a path, a URL, any key"),
    Column("idx", "INTEGER", "int64", False, "the chunk's place in its document, from 0"),
    Column("start", "INTEGER", "int64", False, "first character of the chunk in the document"),
    Column("end", "INTEGER", "int64", False, "one past its last character"),
    Column("line", "INTEGER", "int64", False, "the line it starts on, from 1 (0: unknown)"),
    Column("text", "TEXT", "string", True, "the chunk's text"),
    Column("tokens", "INTEGER", "int64", True, "tokens the model read, special tokens included"),
    Column("model", "TEXT", "string", True, "the daemon's model name"),
    Column("model_fingerprint", "TEXT", "string", True, "model_fingerprint() of that model"),
    Column("vector", "BLOB", "fixed_size_list<float32>", True, "the vector, float32"),
)
NAMES = tuple(c.name for c in COLUMNS)

# Parquet/Arrow schema metadata keys: the whole output shares one model and one set of options.
META_FINGERPRINT = "embedd.model_fingerprint"
META_MODEL = "embedd.model"
META_OPTIONS = "embedd.options"

# The id is 128 bits of BLAKE2b: among 10**12 chunks the chance of any two colliding is about
# n**2 / 2**129 = 1.5e-15 (the birthday bound), far below any storage error rate.
ID_BYTES = 16
# Changes whenever what goes into the id changes, so old ids never match new ones by accident.
ID_VERSION = 1


def model_fingerprint(card: Mapping[str, Any]) -> str:
    """What a model's vectors depend on, from its `models` card: the model file's content and
    the tokenizer that makes its ids, so vectors from before a tokenizer fix are reported
    stale, never mixed with new ones."""
    file_print = str(card.get("fingerprint") or "")
    tokenizer = card.get("tokenizer")
    return f"{file_print}+{tokenizer}" if tokenizer else file_print


def chunk_id(
    text: str,
    fingerprint: str,
    options: VectorOptions,
    *,
    file: str | None = None,
    idx: int | None = None,
) -> str:
    """The chunk's stable id: a hash of everything its vector and its place depend on (the
    text, the model fingerprint, the vector options, and the document and position when it
    has them). A rerun computes the same id for the same chunk, so it can skip what is done;
    texts without a document are identified by their text alone (equal texts are one chunk)."""
    key = json.dumps(
        [ID_VERSION, fingerprint, dict(sorted(options.id_fields().items())), file, idx, text],
        ensure_ascii=False,
        separators=(",", ":"),
    )
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=ID_BYTES)
    return digest.hexdigest()


def start_lines(text: str, starts: Sequence[int]) -> list[int]:
    """The 1-based line on which each character offset in `starts` lies (one pass over the
    text, whatever the order of `starts`)."""
    out = [0] * len(starts)
    line, pos = 1, 0
    for i in sorted(range(len(starts)), key=starts.__getitem__):
        line += text.count("\n", pos, starts[i])
        pos = max(pos, starts[i])
        out[i] = line
    return out
