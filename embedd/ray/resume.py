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
from embedd.wire.options import VectorOptions

log = logging.getLogger(__name__)

# Ids are kept as sorted fixed-width bytes: 16 bytes an id (10 million ids: 160 MB, shared
# zero-copy through Ray's object store), looked up by binary search.
IdArray = npt.NDArray[np.bytes_]
_ID_DTYPE = f"S{ID_BYTES}"


# CPUs a filter task asks for: it hashes texts, light work beside embedding them, and a whole CPU
# may not be free on nodes whose daemons reserve theirs (embedd/ray/nodes.py, Daemons.cpus).
FILTER_CPUS = 0.25


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
) -> Dataset:
    """`ds` without the rows whose chunk ids (with this model `fingerprint` and `settings`)
    the output `out` already holds: what a rerun after a crash still has to embed. `ds`
    itself when the output is empty or absent. The output must not be written by another
    job meanwhile (its unfinished files would look cut short). The filter's tasks ask for
    `num_cpus` each."""
    done = done_ids(out, fingerprint)
    if not len(done):
        return ds
    keep = functools.partial(
        _keep_missing, done=ray.put(done), fingerprint=fingerprint, options=settings.options
    )
    return ds.map_batches(keep, batch_format="pyarrow", num_cpus=num_cpus)
