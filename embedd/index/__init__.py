"""A folder of documents to a search, in one SQLite file: the Python API that `embedd index`,
`embedd search` and `embedd.ray` are built on.

```python
from embedd.index import index_paths, search

index_paths(["notes"], "notes.db")  # -> Counts (indexed, skipped by reason)
for hit in search("notes.db", "renew the certificate", k=5, mode="hybrid", paths=["*.md"]):
    print(hit.path, hit.line, hit.score, hit.passage)
```

A client of the daemon (through `embedd_client`); it never imports the daemon's own layers.
"""

from embedd.index.ingest import Counts, ProgressEvent, index_parquet, index_paths
from embedd.index.search import DEFAULT_MODE, MODES, Hit, search
from embedd.index.store import IndexInfo, IndexUsageError, describe, drop

__all__ = [
    "DEFAULT_MODE",
    "MODES",
    "Counts",
    "Hit",
    "IndexInfo",
    "IndexUsageError",
    "ProgressEvent",
    "describe",
    "drop",
    "index_parquet",
    "index_paths",
    "search",
]
