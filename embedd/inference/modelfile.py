"""The identity of a model file, in one place: which version of the file is on disk, and what
its content is.

Two questions need it. Has the file been replaced since it was loaded (a new version means the
slot reloads it for the next request)? That is the cheap `version_of` (inode, size, mtime).
Which content produced a vector (the cache key, the index's fingerprint, the model card's
sha256, which model hubs publish)? That is `identify`, a sha256 of the whole file computed once
per version: a 4 GB file takes ~10 s to hash, once per load of a new version.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

# Bytes read at a time while hashing: large enough that the hash, not the syscalls, dominates.
_READ_BLOCK = 1 << 20


@dataclass(frozen=True, slots=True)
class FileVersion:
    """Which file is at the path now: a replaced or rewritten file has another version."""

    inode: int
    size: int
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class ModelFile:
    version: FileVersion
    sha256: str

    @property
    def fingerprint(self) -> str:
        """What identifies the content of every vector computed from this file."""
        return self.sha256

    def card(self) -> dict[str, object]:
        return {"size": self.version.size, "sha256": self.sha256}


def version_of(path: Path) -> FileVersion | None:
    """The version on disk, or None when the path is missing or unreadable."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return FileVersion(st.st_ino, st.st_size, st.st_mtime_ns)


_IDENTIFIED: dict[tuple[str, FileVersion], ModelFile] = {}


def identify(path: Path) -> ModelFile:
    """The file's version and sha256, hashed once per version (OSError if unreadable)."""
    version = version_of(path)
    if version is None:
        raise FileNotFoundError(path)
    key = (str(path), version)
    if key not in _IDENTIFIED:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(_READ_BLOCK), b""):
                h.update(block)
        _IDENTIFIED[key] = ModelFile(version, h.hexdigest())
    return _IDENTIFIED[key]
