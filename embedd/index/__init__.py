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

import sys
import types
from typing import TYPE_CHECKING, Any

from embedd.index.modes import DEFAULT_MODE, MODES

if TYPE_CHECKING:
    from embedd.index.ingest import Counts, ProgressEvent, index_parquet, index_paths
    from embedd.index.search import Hit, search
    from embedd.index.store import IndexInfo, IndexUsageError, describe, drop

# Where each name lives: imported when first used, so that importing the package (as every
# command's parser does, for the modes) does not load numpy and SQLite.
_HOMES = {
    "Counts": "ingest", "ProgressEvent": "ingest", "index_parquet": "ingest",
    "index_paths": "ingest", "Hit": "search", "search": "search", "IndexInfo": "store",
    "IndexUsageError": "store", "describe": "store", "drop": "store",
}  # fmt: skip


class _Package(types.ModuleType):
    """The package keeps naming the function `search` once its module `search` is imported
    (the import system sets each submodule on its package, which would hide the function)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _HOMES and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    globals()[name] = value
    return value


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
