"""Which files an index holds and their text: the walk over folders (excludes, links, the
folders never entered) and the decoding of a file's bytes (UTF-8 text, PDFs with the optional
`pdf` extra), each refusal a `Skipped` with the reason the summary counts.
"""

from __future__ import annotations

import fnmatch
import io
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

PDF_SUFFIX = ".pdf"
# Files larger than this are skipped with a message: a notes folder's odd 2 GB log is not
# something to embed by accident (the daemon's frame limit is 64 MiB anyway).
MAX_FILE_BYTES = 32 * 1024 * 1024

# Directories never walked into.
SKIP_DIRS = {".git", ".hg", ".svn", "__pycache__", "node_modules", ".venv"}

# Why a file was skipped: the summary counts skips by these.
SKIP_UNREADABLE = "unreadable"
SKIP_NOT_REGULAR = "not a regular file"
SKIP_TOO_LARGE = "too large"
SKIP_BINARY = "binary"
SKIP_NOT_UTF8 = "not UTF-8 text"
SKIP_NAME_NOT_UTF8 = "file name not UTF-8"
SKIP_PDF = "PDF not read"
SKIP_REFUSED = "refused by the daemon"


class Skipped(Exception):
    """A file left out of this run, and why: `reason` is one of the SKIP_* categories the
    summary counts; the message is the detail printed next to the file's name."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


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


def is_pdf(path: Path, data: bytes) -> bool:
    """A PDF by name or by its header (`%PDF-`, ISO 32000-1, 7.5.2), whatever it is called."""
    return path.suffix.lower() == PDF_SUFFIX or data.startswith(b"%PDF-")


def decode(path: Path, data: bytes) -> str:
    """The text of a file whose bytes are `data`, or Skipped with the reason. A NUL byte marks
    a binary file (as for git and grep): its "text" would be control characters the model has
    no tokens for."""
    if is_pdf(path, data):
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


def check_name(name: str) -> None:
    """SQLite stores text as UTF-8: a file name with bytes that are not UTF-8 cannot be a key."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise Skipped(SKIP_NAME_NOT_UTF8, "the file name is not UTF-8; rename it") from None


def under(path: str, roots: Sequence[Path]) -> bool:
    p = Path(path)
    return any(p == r.resolve() or r.resolve() in p.parents for r in roots)
