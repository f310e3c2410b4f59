"""Exactly once across reruns: which chunks an output directory already holds, and the input
rows still to embed.

Each output row carries its chunk id (embedd/index/records.py: a hash of its text, document,
place, model fingerprint and options), so a rerun after a crash computes the ids of its input
and drops those the output has; writing in Ray's default append mode then adds only the rest.
A Parquet file that a killed job left half-written has no footer and holds no readable row: it
is deleted, and its rows are embedded again.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data import Dataset

from embedd.index.records import ID_BYTES, META_FINGERPRINT
from embedd.ray.columns import EmbedSettings, chunk_ids
from embedd.ray.nodes import STEP_CPUS, alive_nodes
from embedd.wire.options import VectorOptions

log = logging.getLogger(__name__)

# Ids are kept as sorted fixed-width bytes: 16 bytes an id (10 million ids: 160 MB, shared
# zero-copy through Ray's object store), looked up by binary search.
IdArray = npt.NDArray[np.bytes_]
_ID_DTYPE = f"S{ID_BYTES}"


# CPUs a filter task asks for: none, like the steps (embedd/ray/nodes.py, STEP_CPUS): it
# hashes texts, light work beside embedding them, and a share of a CPU asked for could keep a
# small node from the whole CPU a read task needs.
FILTER_CPUS = STEP_CPUS
# Blocks per live node the rows to embed are cut into: several, so that every node's actors get
# work whatever the input's file count (Ray may read many small files as one block), and a
# node that finishes early takes more; a lost node's blocks are redone in small pieces.
BLOCKS_PER_NODE = 8
# At most this many rows a block (a corpus of millions still streams in small pieces), and at
# least this many (a block is no smaller than a batch of Embed is likely to be).
MAX_BLOCK_ROWS = 4096
MIN_BLOCK_ROWS = 16
# Ids of missing rows a RowsMissing message lists (all of them are in its `missing`).
LISTED = 5


def rows_per_block(rows: int, nodes: int) -> int:
    """Rows a block holds so that `rows` make BLOCKS_PER_NODE blocks for each of `nodes`
    nodes, within MIN_BLOCK_ROWS and MAX_BLOCK_ROWS."""
    wanted = -(-max(rows, 1) // (max(nodes, 1) * BLOCKS_PER_NODE))  # ceiling
    return max(MIN_BLOCK_ROWS, min(MAX_BLOCK_ROWS, wanted))


class OutputMismatch(ValueError):
    """The output directory holds vectors of another model or other options than this run's."""


def _as_keys(ids: list[str]) -> IdArray:
    """Ids (hex) as fixed-width bytes; ValueError for one that is not an id: numpy would cut
    a longer one to the width without a word, and it would match another chunk's."""
    keys = [bytes.fromhex(i) for i in ids]
    if any(len(k) != ID_BYTES for k in keys):
        raise ValueError(f"an id is not {ID_BYTES} bytes")
    return np.array(keys, dtype=_ID_DTYPE)


def done_ids(out: str | Path, fingerprint: str | None = None) -> IdArray:
    """The chunk ids in the Parquet files under `out` (none if it does not exist), sorted.
    Files a crash left unreadable are deleted (with a warning). With `fingerprint`, every
    file must have been written with it (OutputMismatch otherwise): an output holds one
    model's vectors. A readable file that is not embedd's output (no `id` column of chunk
    ids) is OutputMismatch naming it: it is someone else's, not ours to delete or skip."""
    root = Path(out)
    if not root.exists():
        return np.array([], dtype=_ID_DTYPE)
    keys: list[IdArray] = []
    for path in sorted(root.rglob("*.parquet")):
        foreign = OutputMismatch(
            f"{path} is not embedd's output (no id column of {2 * ID_BYTES}-hex-digit chunk "
            "ids): write to another directory, or move the file out of this one"
        )
        try:
            parquet = pq.ParquetFile(path)
            schema = parquet.schema_arrow
            kind = schema.field("id").type if "id" in schema.names else None
            if kind is None or not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
                raise foreign
            metadata = schema.metadata or {}
            ids = parquet.read(columns=["id"]).column("id").to_pylist()
        except (pa.ArrowInvalid, OSError) as exc:
            log.warning("deleting %s: unreadable, a write cut short (%s)", path, exc)
            path.unlink()
            continue
        written = metadata.get(META_FINGERPRINT.encode(), b"").decode()
        if fingerprint is not None and written and written != fingerprint:
            raise OutputMismatch(
                f"{path} holds vectors of model fingerprint {written[:16]}, this run's is "
                f"{fingerprint[:16]}: write to another directory"
            )
        try:
            keys.append(_as_keys(ids))
        except (TypeError, ValueError):  # TypeError: a null id
            raise foreign from None
    if not keys:
        return np.array([], dtype=_ID_DTYPE)
    return np.unique(np.concatenate(keys))


def missing_mask(done: IdArray, ids: list[str]) -> npt.NDArray[np.bool_]:
    """For each id, whether it is absent from the sorted `done`."""
    keys = _as_keys(ids)
    if not len(done) or not len(keys):
        return np.ones(len(keys), dtype=bool)
    at = np.minimum(np.searchsorted(done, keys), len(done) - 1)
    missing: npt.NDArray[np.bool_] = done[at] != keys
    return missing


# Each Ray worker fetches the done ids once, not once per batch.
_FETCHED: dict[str, IdArray] = {}


def _keep_missing(batch: pa.Table, done: Any, fingerprint: str, options: VectorOptions) -> pa.Table:
    key = done.hex()
    if key not in _FETCHED:
        _FETCHED.clear()
        _FETCHED[key] = ray.get(done)
    ids = chunk_ids(batch, fingerprint, options).to_pylist()
    return batch.filter(pa.array(missing_mask(_FETCHED[key], ids)))


def unembedded(
    ds: Dataset,
    out: str | Path,
    settings: EmbedSettings,
    fingerprint: str,
    *,
    num_cpus: float = FILTER_CPUS,
    rows: int | None = None,
) -> Dataset:
    """`ds` without the rows whose chunk ids (with this model `fingerprint` and `settings`)
    the output `out` already holds: what a run still has to embed (all of it the first time),
    in blocks spread over every live node (`rows_per_block` of the rows left: Ray reads many
    small files as one block, which one actor on one node would embed alone). `rows`: how many
    rows `ds` has, when known (None: `ds.count()`, which Parquet answers from its metadata and
    other sources by reading). The output must not be written by another job meanwhile (its
    unfinished files would look cut short). The filter's tasks ask for `num_cpus` each."""
    done = done_ids(out, fingerprint)
    total = ds.count() if rows is None else rows
    block = rows_per_block(max(1, total - len(done)), len(alive_nodes()))
    if len(done):
        keep = functools.partial(
            _keep_missing, done=ray.put(done), fingerprint=fingerprint, options=settings.options
        )
        ds = ds.map_batches(keep, batch_format="pyarrow", num_cpus=num_cpus)
    return ds.repartition(target_num_rows_per_block=block)


class RowsMissing(RuntimeError):
    """Rows of the input that the output does not hold exactly once, after a run."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        super().__init__(tally.message())


@dataclass(frozen=True)
class Tally:
    """An input's ids against an output's: `missing` (sorted), the ids of input rows it does not
    hold; `repeated`, those it holds more than once."""

    expected: int
    missing: list[str]
    repeated: list[str]

    def message(self) -> str:
        parts = []
        if self.missing:
            parts.append(
                f"{len(self.missing):,} of {self.expected:,} rows are missing from the output "
                f"(ids {_listed(self.missing)}); a rerun through `unembedded` embeds just those"
            )
        if self.repeated:
            parts.append(
                f"{len(self.repeated):,} rows are in the output more than once (ids "
                f"{_listed(self.repeated)})"
            )
        return "; ".join(parts) or f"all {self.expected:,} rows written once"


def _listed(ids: list[str]) -> str:
    return ", ".join(ids[:LISTED]) + (", ..." if len(ids) > LISTED else "")


def tally(expected: list[str], written: list[str]) -> Tally:
    """Which of the `expected` ids the `written` ones lack, and hold more than once (an input
    may repeat a row: equal ids count as one)."""
    want = set(expected)
    counts: dict[str, int] = {}
    for key in written:
        counts[key] = counts.get(key, 0) + 1
    return Tally(
        expected=len(want),
        missing=sorted(want - counts.keys()),
        repeated=sorted(k for k, n in counts.items() if n > 1 and k in want),
    )


def _ids_of(batch: pa.Table, fingerprint: str, options: VectorOptions) -> pa.Table:
    return pa.table({"id": chunk_ids(batch, fingerprint, options)})


def written_once(ds: Dataset, out: str | Path, settings: EmbedSettings, fingerprint: str) -> Tally:
    """Check, after a run, that the output `out` holds every row of the input `ds` exactly once
    (reading `ds` again for its ids): the Tally, or RowsMissing saying how many rows are
    missing or repeated and which. A node lost mid-run does not lose rows (Ray runs its tasks
    again elsewhere); a job that failed does, and says so here."""
    ids = functools.partial(_ids_of, fingerprint=fingerprint, options=settings.options)
    expected = ds.map_batches(ids, batch_format="pyarrow", num_cpus=FILTER_CPUS)
    want: list[str] = []
    for batch in expected.iter_batches(batch_format="pyarrow"):
        want += pa.table(batch)["id"].to_pylist()
    written: list[str] = []
    for path in sorted(Path(out).rglob("*.parquet")):
        written += pq.read_table(path, columns=["id"])["id"].to_pylist()
    result = tally(want, written)
    if result.missing or result.repeated:
        raise RowsMissing(result)
    return result
