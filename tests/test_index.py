"""`embedd index` and `embedd search` as a user runs them: the real CLI, daemon and model, on a
folder of real text (this repository's docs and the standard library's json package)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import Daemon

REPO = Path(__file__).resolve().parent.parent
STDLIB_JSON = Path(json.__file__).parent


def _folder(tmp: Path) -> Path:
    notes = tmp / "notes"
    (notes / "docs").mkdir(parents=True)
    shutil.copy(REPO / "PROTOCOL.md", notes / "docs" / "protocol.md")
    for name in ("decoder.py", "encoder.py", "scanner.py", "tool.py"):
        shutil.copy(STDLIB_JSON / name, notes / name)
    (notes / "skip.tmp").write_text("excluded")
    (notes / "binary.txt").write_bytes(b"\xff\xfe\x00not text")
    return notes


def _cli(daemon: Daemon, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "embedd", *args, "--socket", str(daemon.socket)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _files(db: Path) -> dict[str, float]:
    with sqlite3.connect(db) as conn:
        return dict(conn.execute("SELECT path, indexed_at FROM files").fetchall())


def _rows(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT count(*) FROM chunks").fetchone()[0])


@pytest.fixture(scope="module")
def built(daemon: Daemon, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    notes = _folder(tmp_path_factory.mktemp("index"))
    db = notes.parent / "notes.db"
    out = _cli(daemon, "index", str(notes), "--out", str(db), "--exclude", "*.tmp")
    assert out.returncode == 0, out.stderr
    assert "skipped" in out.stderr and "binary.txt" in out.stderr  # reported, not fatal
    return notes, db


def test_index_writes_one_row_per_chunk_with_its_vector(built: tuple[Path, Path]) -> None:
    notes, db = built
    with sqlite3.connect(db) as conn:
        files = dict(conn.execute("SELECT path, chunks FROM files").fetchall())
        assert str(notes / "skip.tmp") not in files
        assert len(files) == 5
        assert _rows(db) == sum(files.values()) > 10
        start, end, text, tokens, vector = conn.execute(
            "SELECT start, end, text, tokens, vector FROM chunks LIMIT 1"
        ).fetchone()
    assert 0 < tokens <= 256 and len(vector) == 384 * 4 and end - start == len(text)


def test_search_finds_a_chunk_by_a_paraphrase(daemon: Daemon, built: tuple[Path, Path]) -> None:
    _notes, db = built
    out = _cli(daemon, "search", str(db), "which error tells where the JSON text failed to parse",
               "-k", "3", "--json")  # fmt: skip
    assert out.returncode == 0, out.stderr
    hits = json.loads(out.stdout)
    assert len(hits) == 3 and hits[0]["score"] >= hits[1]["score"]
    assert any(h["file"].endswith("decoder.py") for h in hits), hits


def test_rerunning_updates_only_changed_files_and_drops_deleted_ones(
    daemon: Daemon, built: tuple[Path, Path]
) -> None:
    notes, db = built
    before = _files(db)
    (notes / "tool.py").write_text((notes / "tool.py").read_text() + "\n# edited\n")
    (notes / "scanner.py").unlink()
    out = _cli(daemon, "index", str(notes), "--out", str(db), "--exclude", "*.tmp")
    assert out.returncode == 0, out.stderr
    after = _files(db)
    assert str(notes / "scanner.py") not in after
    changed = {p for p in after if after[p] != before.get(p)}
    assert changed == {str(notes / "tool.py")}


def test_an_interrupted_run_resumes_without_recomputing_finished_files(
    daemon: Daemon, tmp_path: Path
) -> None:
    notes = _folder(tmp_path)
    for i in range(6):  # more work, so the interrupt lands mid-run
        shutil.copy(REPO / "README.md", notes / f"readme{i}.md")
    db = tmp_path / "notes.db"
    proc = subprocess.Popen(
        [sys.executable, "-m", "embedd", "index", str(notes), "--out", str(db),
         "--socket", str(daemon.socket)],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if db.exists() and len(_files(db)) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    finished = _files(db)
    assert proc.returncode in (0, 130), err
    assert finished
    out = _cli(daemon, "index", str(notes), "--out", str(db))
    assert out.returncode == 0, out.stderr
    final = _files(db)
    assert all(final[p] == t for p, t in finished.items())  # not recomputed
    assert len(final) == len(list(notes.glob("*.md"))) + len(list(notes.glob("*.py"))) + 1


def test_search_refuses_an_index_built_with_another_model(
    daemon: Daemon, built: tuple[Path, Path], tmp_path: Path
) -> None:
    _notes, db = built
    other = tmp_path / "other.db"
    shutil.copy(db, other)
    with sqlite3.connect(other) as conn:
        conn.execute("UPDATE meta SET value = 'f00d' WHERE key = 'fingerprint'")
    out = _cli(daemon, "search", str(other), "anything")
    assert out.returncode == 1
    assert "f00d" in out.stderr and "rebuild" in out.stderr


def test_pdfs_without_the_pdf_extra_are_skipped_with_a_clear_reason(
    daemon: Daemon, tmp_path: Path
) -> None:
    pytest.importorskip("llama_cpp")
    try:
        import pypdf  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("pypdf is installed here: PDFs would be read")
    folder = tmp_path / "pdfs"
    folder.mkdir()
    (folder / "a.pdf").write_bytes(b"%PDF-1.4\n%fake\n")
    (folder / "b.txt").write_text("some text to index")
    out = _cli(daemon, "index", str(folder), "--out", str(tmp_path / "p.db"))
    assert out.returncode == 0, out.stderr
    assert "pip install 'embedd[pdf]'" in out.stderr
    assert os.path.exists(tmp_path / "p.db")


def test_an_index_built_with_an_older_tokenizer_is_reported_stale(
    daemon: Daemon, built: tuple[Path, Path], tmp_path: Path
) -> None:
    notes, db = built
    old = tmp_path / "old.db"
    shutil.copy(db, old)
    with sqlite3.connect(old) as conn:
        (fingerprint,) = conn.execute("SELECT value FROM meta WHERE key = 'fingerprint'").fetchone()
        # What an index built before the tokenizer version joined the fingerprint holds.
        conn.execute("UPDATE meta SET value = ? WHERE key = 'fingerprint'", (fingerprint[:64],))
    assert "+wordpiece-" in fingerprint
    for args in (["search", str(old), "anything"], ["index", str(notes), "--out", str(old)]):
        out = _cli(daemon, *args)
        assert out.returncode == 1
        assert "stale" in out.stderr and "tokenizer" in out.stderr
