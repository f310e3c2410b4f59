"""`embedd index` and `embedd search` as a user runs them: the real CLI, daemon and model, on a
folder of real text (this repository's docs and the standard library's json package)."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

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


def _sigint_as_a_terminal_sends_it() -> None:
    """Ctrl-C reaches a process that handles SIGINT; pytest-xdist's workers ignore SIGINT, and a
    child would inherit that and never see the interrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_an_interrupted_run_resumes_without_recomputing_finished_files(
    daemon: Daemon, tmp_path: Path
) -> None:
    notes = _folder(tmp_path)
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))][:2]:
        shutil.copy(page, notes / f"{page.stem}.md")
    every_file = len(list(notes.glob("*.md"))) + len(list(notes.glob("*.py"))) + 2
    db = tmp_path / "notes.db"
    proc = subprocess.Popen(
        [sys.executable, "-m", "embedd", "index", str(notes), "--out", str(db),
         "--socket", str(daemon.socket)],
        stderr=subprocess.PIPE, text=True, preexec_fn=_sigint_as_a_terminal_sends_it,
    )  # fmt: skip
    while proc.poll() is None:
        with contextlib.suppress(sqlite3.OperationalError):  # the schema may not be there yet
            if db.exists() and len(_files(db)) >= 2:
                break
        time.sleep(0.05)
    # The model process stopped: no more files finish, so the interrupt lands mid-run.
    model = daemon.model_stats()["process"]["pid"]
    os.kill(model, signal.SIGSTOP)
    try:
        finished = _files(db)
        assert 2 <= len(finished) < every_file
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        os.kill(model, signal.SIGCONT)
    assert proc.returncode == 130, err
    assert "interrupted: finished files are saved" in err
    assert _files(db) == finished
    out = _cli(daemon, "index", str(notes), "--out", str(db))
    assert out.returncode == 0, out.stderr
    final = _files(db)
    assert all(final[p] == t for p, t in finished.items())  # not recomputed
    # docs/protocol.md and skip.tmp (text by content, whatever its name) as well
    assert len(final) == every_file


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
    assert "pip install pypdf" in out.stderr
    assert os.path.exists(tmp_path / "p.db")


# --------------------------------------------------------------------------------------------
# A bad file is skipped with its reason; the run goes on


def _one_good_file(tmp: Path) -> Path:
    folder = tmp / "notes"
    folder.mkdir()
    (folder / "good.md").write_text("The certificate is renewed every ninety days.")
    return folder


def _indexed(db: Path) -> list[str]:
    return sorted(Path(p).name for p in _files(db))


def test_a_file_name_that_is_not_utf8_is_skipped_and_the_rest_indexed(
    daemon: Daemon, tmp_path: Path
) -> None:
    folder = _one_good_file(tmp_path)
    (Path(os.fsdecode(bytes(folder) + b"/caf\xe9.txt"))).write_text("latin-1 named notes")
    out = _cli(daemon, "index", str(folder), "--out", str(tmp_path / "n.db"))
    assert out.returncode == 0, out.stderr
    assert "skipped " + str(folder) + "/caf\\xe9.txt: the file name is not UTF-8" in out.stderr
    assert _indexed(tmp_path / "n.db") == ["good.md"]


def test_a_file_of_nul_bytes_is_skipped_as_binary_and_the_rest_indexed(
    daemon: Daemon, tmp_path: Path
) -> None:
    folder = _one_good_file(tmp_path)
    (folder / "zeros.txt").write_bytes(bytes(4096))
    out = _cli(daemon, "index", str(folder), "--out", str(tmp_path / "n.db"))
    assert out.returncode == 0, out.stderr
    assert f"skipped {folder / 'zeros.txt'}: binary (a NUL byte at byte 0)" in out.stderr
    assert _indexed(tmp_path / "n.db") == ["good.md"]


def test_a_file_the_model_has_no_tokens_for_is_skipped_with_the_daemons_reason(
    daemon: Daemon, tmp_path: Path
) -> None:
    folder = _one_good_file(tmp_path)
    (folder / "control.txt").write_text("\x01\x02\x03" * 100)  # UTF-8, no NUL, no tokens
    out = _cli(daemon, "index", str(folder), "--out", str(tmp_path / "n.db"))
    assert out.returncode == 0, out.stderr
    assert f"skipped {folder / 'control.txt'}: input has no tokens the model knows" in out.stderr
    assert _indexed(tmp_path / "n.db") == ["good.md"]


def test_the_summary_counts_skips_by_reason(daemon: Daemon, tmp_path: Path) -> None:
    folder = _one_good_file(tmp_path)
    (folder / "a.txt").write_bytes(bytes(10))
    (folder / "b.txt").write_bytes(b"\x00\x01")
    (folder / "latin1.txt").write_bytes("café".encode("latin-1"))
    out = _cli(daemon, "index", str(folder), "--out", str(tmp_path / "n.db"))
    assert out.returncode == 0, out.stderr
    assert out.stderr.splitlines()[-1] == (
        f"embedd: indexed 1 files (1 chunks), 0 unchanged, 0 removed, "
        f"3 skipped (2 binary, 1 not UTF-8 text) -> {tmp_path / 'n.db'}"
    )


def test_a_link_to_a_file_outside_the_folder_is_indexed_by_its_name_and_removed_with_it(
    daemon: Daemon, tmp_path: Path
) -> None:
    folder = _one_good_file(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "target.md").write_text("Backups run every night at two.")
    (folder / "link.md").symlink_to(tmp_path / "elsewhere" / "target.md")
    db = tmp_path / "n.db"
    assert _cli(daemon, "index", str(folder), "--out", str(db)).returncode == 0
    assert sorted(_files(db)) == [str(folder / "good.md"), str(folder / "link.md")]
    (folder / "link.md").unlink()
    out = _cli(daemon, "index", str(folder), "--out", str(db))
    assert out.returncode == 0, out.stderr
    assert "1 unchanged, 1 removed" in out.stderr
    assert sorted(_files(db)) == [str(folder / "good.md")]


def test_a_link_to_proc_self_status_stays_one_row_however_many_runs(
    daemon: Daemon, tmp_path: Path
) -> None:
    # Its target is another process's file on every run (/proc/<pid>/status).
    folder = _one_good_file(tmp_path)
    (folder / "status.txt").symlink_to("/proc/self/status")
    db = tmp_path / "n.db"
    for _ in range(2):
        out = _cli(daemon, "index", str(folder), "--out", str(db))
        assert out.returncode == 0, out.stderr
    assert sorted(_files(db)) == [str(folder / "good.md"), str(folder / "status.txt")]


def test_a_link_to_a_file_inside_the_folder_is_indexed_once_by_the_files_name(
    daemon: Daemon, tmp_path: Path
) -> None:
    folder = _one_good_file(tmp_path)
    (folder / "again.md").symlink_to(folder / "good.md")
    db = tmp_path / "n.db"
    assert _cli(daemon, "index", str(folder), "--out", str(db)).returncode == 0
    assert sorted(_files(db)) == [str(folder / "good.md")]


# A file this far over MAX_FILE_BYTES (32 MiB) shows at once whether it was read.
_HUGE_FILE_BYTES = 500 * 10**6
# What skipping it may cost the indexer's peak RSS at most: far under the file's size.
_RSS_ALLOWANCE_KIB = 128 * 1024


def _index_peak_rss_kib(daemon: Daemon, folder: Path, db: Path) -> tuple[str, int]:
    """`embedd index` run from a fresh interpreter that reports its children's peak RSS (KiB):
    the figure is this run's alone, where pytest's own RUSAGE_CHILDREN would hold the largest
    of every process it ever waited for."""
    probe = (
        "import resource, subprocess, sys\n"
        "r = subprocess.run(sys.argv[1:], stderr=subprocess.PIPE, text=True)\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        "print(r.stderr, file=sys.stderr)\n"
        "sys.exit(r.returncode)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, sys.executable, "-m", "embedd", "index", str(folder),
         "--out", str(db), "--socket", str(daemon.socket)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stderr, int(out.stdout.split()[-1])


def test_a_file_over_the_size_limit_is_skipped_without_being_read(
    daemon: Daemon, tmp_path: Path
) -> None:
    folder = _one_good_file(tmp_path)
    _, baseline = _index_peak_rss_kib(daemon, folder, tmp_path / "base.db")
    with (folder / "huge.txt").open("wb") as f:
        f.truncate(_HUGE_FILE_BYTES)  # sparse: no disk used, but 500 MB to whoever reads it
    err, peak = _index_peak_rss_kib(daemon, folder, tmp_path / "n.db")
    assert f"skipped {folder / 'huge.txt'}: larger than 32 MiB" in err
    assert peak < baseline + _RSS_ALLOWANCE_KIB, (baseline, peak)


# --------------------------------------------------------------------------------------------
# A broken index is named in one line, rc 1, no traceback


def _one_line_error(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    return lines[0]


def _not_sqlite(db: Path, built: Path) -> str:
    db.write_bytes(b"these are my notes, not a database\n" * 100)
    return "file is not a database"


def _truncated(db: Path, built: Path) -> str:
    data = built.read_bytes()
    db.write_bytes(data[: len(data) // 2])
    return "database disk image is malformed"


def _foreign(db: Path, built: Path) -> str:
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE bookmarks (url TEXT)")
    return "is an SQLite database but not an embedd index"


def _other_length(db: Path, built: Path) -> str:
    shutil.copy(built, db)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE chunks SET vector = zeroblob(768 * 4) WHERE idx = 0")
    return "stored vectors are not 384 float32 (the model's dimension); the first is 3072 bytes"


def _directory(db: Path, built: Path) -> str:
    db.mkdir()
    return "is a directory"


@pytest.mark.parametrize(
    "damage",
    [_not_sqlite, _truncated, _foreign, _other_length, _directory],
    ids=lambda f: f.__name__,
)
def test_search_names_a_broken_index_and_what_is_wrong_in_one_line(
    daemon: Daemon, built: tuple[Path, Path], tmp_path: Path, damage: Any
) -> None:
    db = tmp_path / "broken.db"
    what = damage(db, built[1])
    line = _one_line_error(_cli(daemon, "search", str(db), "certificate"))
    assert line.startswith(f"embedd: {db}") and what in line, line


@pytest.mark.parametrize("damage", [_not_sqlite, _foreign, _directory], ids=lambda f: f.__name__)
def test_index_names_an_out_file_that_is_not_an_index_in_one_line(
    daemon: Daemon, built: tuple[Path, Path], tmp_path: Path, damage: Any
) -> None:
    db = tmp_path / "broken.db"
    what = damage(db, built[1])
    before = db.read_bytes() if db.is_file() else None
    line = _one_line_error(_cli(daemon, "index", str(_one_good_file(tmp_path)), "--out", str(db)))
    assert line.startswith(f"embedd: {db}") and what in line, line
    assert (db.read_bytes() if db.is_file() else None) == before  # nothing written to it


def test_search_reads_an_index_whose_path_has_uri_characters(
    daemon: Daemon, built: tuple[Path, Path], tmp_path: Path
) -> None:
    db = tmp_path / "notes?v=1#%20.db"
    shutil.copy(built[1], db)
    out = _cli(daemon, "search", str(db), "JSON decoding error", "-k", "1", "--json")
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)) == 1


# --------------------------------------------------------------------------------------------
# Text by content, progress in tokens, search people can use


def test_text_files_of_any_name_are_indexed_and_binaries_skipped_by_content(
    daemon: Daemon, tmp_path: Path
) -> None:
    folder = tmp_path / "notes"
    folder.mkdir()
    for name in ("README", "LICENSE", "copyright", "page.html", "data.json"):
        (folder / name).write_text(f"The {name} file says the backup runs nightly.")
    (folder / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    out = _cli(daemon, "index", str(folder), "--out", str(tmp_path / "n.db"))
    assert out.returncode == 0, out.stderr
    assert _indexed(tmp_path / "n.db") == ["LICENSE", "README", "copyright", "data.json",
                                           "page.html"]  # fmt: skip
    assert f"skipped {folder / 'photo.png'}: binary" in out.stderr


def test_a_folder_of_only_skipped_files_reports_them_by_reason(
    daemon: Daemon, tmp_path: Path
) -> None:
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"\x00\x01\x02")
    (folder / "b.txt").write_bytes("déjà".encode("latin-1"))
    out = _cli(daemon, "index", str(folder), "--out", str(tmp_path / "n.db"))
    assert out.returncode == 0, out.stderr
    assert "indexed 0 files (0 chunks), 0 unchanged, 0 removed, 2 skipped (1 binary, 1 not " \
        "UTF-8 text)" in out.stderr.splitlines()[-1]  # fmt: skip


# A terminal this narrow shows at once whether a line is cut to its width.
_TTY_COLUMNS = 60
# Tokens per chunk that make a short file many chunks: more than one EMBED_BATCH (32).
_SMALL_CHUNKS = "16"


def _story(folder: Path) -> Path:
    """A file whose one line about the spare key sits deep inside it (line 23)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"Day {i}: the garden needed water and the tomatoes grew taller." for i in range(22)]
    lines.append("The spare key is hidden under the blue flowerpot by the back door.")
    lines += [f"Evening {i}: we read by the fire until late." for i in range(40)]
    (folder / "diary.txt").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def tty_progress(daemon: Daemon, tmp_path_factory: pytest.TempPathFactory) -> str:
    """What `embedd index` writes to stderr when it is a terminal _TTY_COLUMNS wide."""
    import fcntl
    import pty
    import struct
    import termios

    tmp = tmp_path_factory.mktemp("tty")
    folder = _story(tmp / "notes")
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, _TTY_COLUMNS, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "embedd", "index", str(folder), "--out", str(tmp / "n.db"),
         "--chunk-tokens", _SMALL_CHUNKS, "--socket", str(daemon.socket)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave, env=env,
    )  # fmt: skip
    os.close(slave)
    data = b""
    while True:
        try:
            piece = os.read(master, 4096)
        except OSError:  # EIO: the other end closed
            break
        if not piece:
            break
        data += piece
    os.close(master)
    assert proc.wait(timeout=120) == 0, data
    return data.decode()


def _drawn(stderr: str) -> list[str]:
    """The progress lines drawn on the terminal (each starts with \\r, ends at the erase)."""
    return [d.split("\x1b[K")[0] for d in stderr.split("\r") if "tokens" in d]


def test_progress_on_a_terminal_never_reaches_the_last_column(tty_progress: str) -> None:
    drawn = _drawn(tty_progress)
    assert drawn and all(len(d) <= _TTY_COLUMNS - 1 for d in drawn), drawn


def test_progress_on_a_terminal_is_redrawn_in_place_not_a_line_each(tty_progress: str) -> None:
    assert tty_progress.count("\n") == 1, tty_progress  # only the summary ends a line
    cleared = tty_progress.rstrip("\r\n").split("\r\x1b[K")[-1]  # the line erased, then:
    assert cleared.startswith("embedd: indexed 1 files"), tty_progress


def test_progress_counts_tokens_and_moves_within_a_file(tty_progress: str) -> None:
    drawn = [d for d in _drawn(tty_progress) if "0/1 files" in d]  # during the only file
    done = [int(d.split("/")[0].split()[-1].replace(",", "")) for d in drawn]
    assert len(set(done)) >= 2, drawn  # moved by batch, before the file finished
    assert any("tok/s" in d and "ETA" in d for d in drawn), drawn


def test_progress_when_not_a_terminal_is_plain_lines(daemon: Daemon, tmp_path: Path) -> None:
    out = _cli(daemon, "index", str(_story(tmp_path / "notes")), "--out", str(tmp_path / "n.db"))
    assert out.returncode == 0, out.stderr
    assert "\r" not in out.stderr and "\x1b" not in out.stderr
    assert out.stderr.splitlines()[-2].startswith("100% ")


def test_index_reports_finding_and_checking_the_files_before_embedding_any(
    daemon: Daemon, tmp_path: Path
) -> None:
    # A folder of 100,000 files took 9 s to find and check here before the first line.
    folder = _one_good_file(tmp_path)
    (folder / "second.md").write_text("A second note.")
    out = _cli(daemon, "index", str(folder), "--out", str(tmp_path / "n.db"))
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    assert lines[:2] == ["finding files: 0 so far", "checking 1/2 files for changes"], lines
    assert lines[2].startswith("100% "), lines


def test_while_checking_files_a_plain_progress_line_comes_every_plain_every_seconds() -> None:
    from embedd.cli import index

    now = [0.0]
    stream = io.StringIO()
    progress = index.Progress(stream, tty=False, files=100_000, bytes_ahead=0, clock=lambda: now[0])
    for checked in range(1, 100_001):
        now[0] = checked * 1.05e-4  # 10.5 s in all: a line at once, then after 5 s and 10 s
        progress.checking(checked)
    lines = stream.getvalue().splitlines()
    assert index.PLAIN_EVERY == 5.0
    assert lines[0] == "checking 1/100,000 files for changes" and len(lines) == 3, lines


@pytest.fixture(scope="module")
def story(daemon: Daemon, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("story")
    out = _cli(daemon, "index", str(_story(tmp / "notes")), "--out", str(tmp / "s.db"))
    assert out.returncode == 0, out.stderr
    return tmp / "s.db"


def _search(daemon: Daemon, db: Path, query: str, *args: str) -> list[dict[str, Any]]:
    out = _cli(daemon, "search", str(db), query, "--json", *args)
    assert out.returncode == 0, out.stderr
    hits: list[dict[str, Any]] = json.loads(out.stdout)
    return hits


def test_search_shows_the_path_relative_to_the_indexed_folder(
    daemon: Daemon, built: tuple[Path, Path]
) -> None:
    hits = _search(daemon, built[1], "the frame length prefix of a request", "--path", "docs")
    assert hits and all(h["path"] == "docs/protocol.md" for h in hits), hits


def test_search_shows_the_line_of_the_best_passage(daemon: Daemon, story: Path) -> None:
    hit = _search(daemon, story, "where is the spare key hidden", "-k", "1")[0]
    assert hit["line"] == 23, hit


def test_the_snippet_is_the_passage_that_matches_not_the_chunks_start(
    daemon: Daemon, story: Path
) -> None:
    hit = _search(daemon, story, "where is the spare key hidden", "-k", "1")[0]
    assert "spare key is hidden under the blue flowerpot" in hit["passage"], hit
    assert not hit["text"].startswith(hit["passage"])


# Shares no word with the diary (stemmed, stopwords aside) but means its spare-key line.
_NO_SHARED_WORD = "concealed entry token beneath pottery"


def test_the_cli_shows_a_hit_sharing_no_word_at_its_passage_closest_in_meaning(
    daemon: Daemon, story: Path
) -> None:
    hit = _search(daemon, story, _NO_SHARED_WORD, "-k", "1", "--mode", "vector")[0]
    assert "spare key is hidden" in hit["passage"], hit
    assert hit["matches"] == [], hit


def test_the_api_shows_a_hit_sharing_no_word_at_its_first_lines_unless_asked(
    daemon: Daemon, story: Path
) -> None:
    """Choosing a passage by meaning embeds the hit's passages: the API does that only when
    asked (`meaning_passages`), as the CLI does."""
    from embedd import index

    quick = index.search(story, _NO_SHARED_WORD, k=1, mode="vector", socket=daemon.socket)[0]
    assert quick.text.lstrip().startswith(quick.passage), quick.passage
    asked = index.search(
        story, _NO_SHARED_WORD, k=1, mode="vector", socket=daemon.socket, meaning_passages=True
    )[0]
    assert "spare key is hidden" in asked.passage, asked.passage


@pytest.mark.parametrize("mode", ["hybrid", "vector"])
def test_a_paragraph_longer_than_the_model_takes_is_a_query_like_any_other(
    daemon: Daemon, story: Path, mode: str
) -> None:
    paragraph = "I had the spare key this morning and now I cannot find where it is hidden. " * 25
    tokens = daemon.call("tokenize", input=paragraph)["ids"][0]
    assert len(tokens) > 256  # over the bundled model's limit
    hit = _search(daemon, story, paragraph, "-k", "1", "--mode", mode)[0]
    assert (hit["path"], hit["line"]) == ("diary.txt", 23), hit


def test_search_text_output_is_path_colon_line_then_the_passage(
    daemon: Daemon, story: Path
) -> None:
    out = _cli(daemon, "search", str(story), "where is the spare key hidden", "-k", "1")
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()[:2]
    assert first.startswith("diary.txt:23  ") and "spare key" in second.replace("**", "")


def test_search_marks_the_query_words_in_the_passage(daemon: Daemon, story: Path) -> None:
    out = _cli(daemon, "search", str(story), "where is the spare key hidden", "-k", "1")
    assert out.returncode == 0, out.stderr
    assert "**spare** **key**" in out.stdout.splitlines()[1]


def test_search_explain_prints_each_lists_rank_and_the_fused_score(
    daemon: Daemon, story: Path
) -> None:
    out = _cli(daemon, "search", str(story), "spare key", "-k", "1", "--explain")
    assert out.returncode == 0, out.stderr
    score = float(out.stdout.splitlines()[0].split()[1])
    why = next(line for line in out.stdout.splitlines() if line.strip().startswith("why:"))
    assert re.search(r"vector #\d+ [\d.]+ \(vote [\d.]+ x [\d.]+\)", why), why
    assert re.search(r"bm25 #\d+ [\d.]+ \(vote [\d.]+ x [\d.]+\)", why), why
    assert why.endswith(f"-> {score:.4f}"), why


def test_search_json_explains_each_hit_with_explain(daemon: Daemon, story: Path) -> None:
    hit = _search(daemon, story, "spare key", "-k", "1", "--explain")[0]
    lists = hit["why"]["lists"]
    assert set(lists) == {"vector", "bm25"}
    assert all({"rank", "score", "vote", "weight"} <= set(v) for v in lists.values())
    assert hit["passage"][slice(*hit["matches"][0])].lower() in ("spare", "key")


def test_copies_of_a_file_are_one_hit_that_says_how_many(daemon: Daemon, tmp_path: Path) -> None:
    folder = tmp_path / "docs"
    note = (
        "Release 2.4.1: the parser no longer crashes on an empty attribute list, and the "
        "build finds the compression library on its own. Thanks to everyone who reported it."
    )
    for name in ("expat", "libexpat1", "libexpat1-dev"):
        (folder / name).mkdir(parents=True)
        (folder / name / "changelog").write_text(note)
    (folder / "other.txt").write_text("The garden needs water every morning in July.")
    db = tmp_path / "c.db"
    assert _cli(daemon, "index", str(folder), "--out", str(db)).returncode == 0
    hits = _search(daemon, db, "parser crash on an empty attribute list", "-k", "5")
    assert [h["similar"] for h in hits if h["path"].endswith("changelog")] == [2], hits
    out = _cli(daemon, "search", str(db), "parser crash on an empty attribute list", "-k", "1")
    assert "(and 2 similar)" in out.stdout.splitlines()[0]


def test_matched_words_are_bold_on_a_terminal_and_starred_elsewhere() -> None:
    from embedd.cli.index import BOLD, hits_text
    from embedd.index import Hit

    hit = Hit("/d/a.txt", "a.txt", 3, 0.5, "renew the certificate", "", (0, 21), ((0, 5),))
    assert f"{BOLD[0]}renew{BOLD[1]} the" in hits_text([hit], tty=True)
    assert "**renew** the" in hits_text([hit], tty=False)


@pytest.mark.parametrize("tty", [True, False])
def test_a_mark_cut_off_with_a_long_passage_is_closed_and_never_split(tty: bool) -> None:
    from embedd.cli.index import BOLD, PLAIN_MARK, hits_text
    from embedd.index import Hit

    text = "word " * 60 + "renew"
    # every word marked: whatever column the cut falls on, it is inside or beside a mark
    spans = tuple((i, i + 4) for i in range(0, len(text), 5))
    for width in range(40, 60):
        shown = hits_text([Hit("/d/a.txt", "a.txt", 1, 0.5, text, "", (0, 1), spans)], width,
                          tty=tty)  # fmt: skip
        opened, closed = BOLD if tty else PLAIN_MARK
        body = shown.split("\n", 1)[1]
        assert body.rstrip().endswith(("…", "…" + closed)), body
        if tty:
            assert body.count(opened) == body.count(closed), (width, body)
            assert "\x1b" not in body.replace(opened, "").replace(closed, ""), (width, body)
        else:
            assert body.count(opened) % 2 == 0, (width, body)


def test_the_words_of_one_identifier_are_marked_as_one() -> None:
    from embedd.index.search import matches

    passage = "Backport security fix for CVE-2024-45491: detect integer overflow"
    (span,) = matches("CVE-2024-45491", passage)
    assert passage[slice(*span)] == "CVE-2024-45491"


def test_the_path_filter_keeps_only_matching_files(
    daemon: Daemon, built: tuple[Path, Path]
) -> None:
    hits = _search(daemon, built[1], "parse a JSON document", "--path", "*.md", "-k", "5")
    assert hits and all(h["path"].endswith(".md") for h in hits), hits


@pytest.fixture(scope="module")
def nested(daemon: Daemon, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An index of a folder with a file in it and one in its `sub` folder."""
    tmp = tmp_path_factory.mktemp("nested")
    folder = _one_good_file(tmp)
    (folder / "sub").mkdir()
    (folder / "sub" / "renewal.md").write_text("The certificate renewal is due in May.")
    db = tmp / "n.db"
    assert _cli(daemon, "index", str(folder), "--out", str(db)).returncode == 0
    return folder, db


@pytest.mark.parametrize(("where", "glob"), [("", "./sub"), ("sub", "."), ("sub", "../sub")])
def test_a_path_filter_from_the_current_directory_keeps_the_files_under_it(
    daemon: Daemon, nested: tuple[Path, Path], where: str, glob: str
) -> None:
    folder, db = nested
    out = subprocess.run(
        [sys.executable, "-m", "embedd", "search", str(db), "certificate", "--path", glob,
         "--json", "--socket", str(daemon.socket)],
        capture_output=True, text=True, timeout=60, cwd=folder / where,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert [h["path"] for h in json.loads(out.stdout)] == ["sub/renewal.md"]


def test_bm25_mode_finds_an_exact_identifier(daemon: Daemon, built: tuple[Path, Path]) -> None:
    hits = _search(daemon, built[1], "JSONDecodeError", "--mode", "bm25", "-k", "1")
    assert hits[0]["path"] == "decoder.py" and "JSONDecodeError" in hits[0]["passage"], hits


def test_bm25_mode_needs_no_daemon(built: tuple[Path, Path], tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "embedd", "search", str(built[1]), "JSONDecodeError", "--mode",
         "bm25", "--json", "--socket", str(tmp_path / "nobody.sock")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)


def test_chunk_tokens_and_overlap_reach_the_chunker(daemon: Daemon, tmp_path: Path) -> None:
    db = tmp_path / "n.db"
    out = _cli(daemon, "index", str(_story(tmp_path / "notes")), "--out", str(db),
               "--chunk-tokens", "32", "--overlap", "8")  # fmt: skip
    assert out.returncode == 0, out.stderr
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT start, end, tokens FROM chunks ORDER BY idx").fetchall()
    assert len(rows) > 5 and max(t for _, _, t in rows) <= 32
    assert all(b[0] < a[1] for a, b in itertools.pairwise(rows))  # neighbours overlap


def test_chunk_settings_the_daemon_refuses_are_one_line_before_any_file(
    daemon: Daemon, tmp_path: Path
) -> None:
    out = _cli(daemon, "index", str(_one_good_file(tmp_path)), "--out", str(tmp_path / "n.db"),
               "--overlap", "200")  # fmt: skip
    assert "overlap must be less than half" in _one_line_error(out)


def test_an_index_from_before_keyword_search_gains_it_on_the_next_run(
    daemon: Daemon, story: Path, tmp_path: Path
) -> None:
    old = tmp_path / "old.db"
    shutil.copy(story, old)
    with sqlite3.connect(old) as conn:
        conn.execute("DROP TABLE chunks_fts")
        conn.execute("ALTER TABLE chunks DROP COLUMN line")
        conn.execute("DELETE FROM meta WHERE key NOT IN ('model', 'fingerprint')")
    before = _cli(daemon, "search", str(old), "spare key", "--json")
    assert before.returncode == 0 and "re-run `embedd index`" in before.stderr
    folder = story.parent / "notes"
    again = _cli(daemon, "index", str(folder), "--out", str(old))
    assert again.returncode == 0 and "0 files (0 chunks), 1 unchanged" in again.stderr
    hit = _search(daemon, old, "where is the spare key hidden", "--mode", "bm25", "-k", "1")[0]
    assert hit["line"] == 23, hit


def test_index_list_shows_model_files_and_chunks(story: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "embedd", "index", "--list", str(story)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "model     default" in out.stdout and "files     1, " in out.stdout
    assert out.stdout.rstrip().endswith("diary.txt")


def test_index_drop_deletes_an_index(story: Path, tmp_path: Path) -> None:
    db = tmp_path / "gone.db"
    shutil.copy(story, db)
    out = subprocess.run([sys.executable, "-m", "embedd", "index", "--drop", str(db)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert not db.exists()


def test_index_drop_refuses_a_database_that_is_not_an_index(tmp_path: Path) -> None:
    db = tmp_path / "bookmarks.db"
    _foreign(db, db)
    out = subprocess.run([sys.executable, "-m", "embedd", "index", "--drop", str(db)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert "not an embedd index" in _one_line_error(out) and db.exists()


def test_the_python_api_indexes_and_searches(daemon: Daemon, tmp_path: Path) -> None:
    from embedd import index

    db = tmp_path / "api.db"
    counts = index.index_paths([_story(tmp_path / "notes")], db, socket=daemon.socket)
    hits = index.search(db, "where is the spare key hidden", k=1, socket=daemon.socket)
    assert counts.files_indexed == 1 and hits[0].path == "diary.txt" and hits[0].line == 23


def test_the_python_api_tells_its_progress_as_events(daemon: Daemon, tmp_path: Path) -> None:
    from embedd.index import ingest

    notes = _story(tmp_path / "notes")
    diary = str((notes / "diary.txt").resolve())
    size = (notes / "diary.txt").stat().st_size
    events: list[ingest.ProgressEvent] = []
    ingest.index_paths([notes], tmp_path / "e.db", socket=daemon.socket, progress=events.append)
    assert events[:3] == [ingest.Finding(0), ingest.Finding(1), ingest.Checking(1, 1)]
    assert events[3] == ingest.Embedding(files=1, done=0, bytes_ahead=size)
    assert events[-2:] == [ingest.FileDone(diary, size, chunked=True), ingest.Finished()]
    (chunked,) = [e for e in events if isinstance(e, ingest.Chunked)]
    embedded = [e for e in events if isinstance(e, ingest.Embedded)]
    assert sum(e.tokens for e in embedded) == chunked.tokens > 0


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


# --------------------------------------------------------------------------------------------
# Importing a Parquet output: vectors are checked before they can break or steer search


def _parquet(path: Path, db: Path, vectors: Any, **columns: Any) -> Path:
    """A Parquet file of the shared chunk record, one row per vector, with the model and
    fingerprint of the index `db` (so only the vectors, or what `columns` replaces, differ)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with sqlite3.connect(db) as conn:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    n = len(vectors)
    table = {
        "id": [f"{i:032x}" for i in range(n)],
        "file": [f"/elsewhere/imported{i}.txt" for i in range(n)],
        "idx": [0] * n,
        "text": [f"imported note {i}" for i in range(n)],
        "tokens": [5] * n,
        "model": [meta["model"]] * n,
        "model_fingerprint": [meta["fingerprint"]] * n,
        "vector": vectors,
        **columns,
    }
    pq.write_table(pa.table(table), path)
    return path


def _unit(dim: int = 384) -> list[float]:
    return [1 / dim**0.5] * dim


def test_an_import_of_vectors_of_another_dimension_is_refused_and_search_still_works(
    daemon: Daemon, story: Path, tmp_path: Path
) -> None:
    db = tmp_path / "s.db"
    shutil.copy(story, db)
    parquet = _parquet(tmp_path / "five.parquet", db, [_unit(), [0.1] * 5])
    line = _one_line_error(_cli(daemon, "index", "--from-parquet", str(parquet), "--out", str(db)))
    assert f"{parquet}: row 1 has a vector of 5 dimensions, the index's have 384" in line, line
    hit = _search(daemon, db, "where is the spare key hidden", "-k", "1")[0]
    assert hit["path"] == "diary.txt"


def _bad_vectors() -> dict[str, tuple[list[Any], dict[str, Any], str]]:
    """Vectors search cannot rank, each with the columns it comes with and the refusal."""
    nan, inf = _unit(), _unit()
    nan[7], inf[7] = float("nan"), float("inf")
    other = {"model_fingerprint": ["0" * 64] * 2}
    return {
        "nan": ([_unit(), nan], {}, "row 1 has a vector holding NaN or infinity"),
        "inf": ([inf, _unit()], {}, "row 0 has a vector holding NaN or infinity"),
        "zeros": ([_unit(), [0.0] * 384], {}, "row 1 has a vector of zeros"),
        "null": ([_unit(), None], {}, "row 1 has no vector"),
        "ragged": ([_unit(), _unit(383)], {}, "row 1 has a vector of 383 dimensions"),
        "strings": (["0.1, 0.2", "0.3"], {}, "holds string, not lists of floats"),
        "another model": ([_unit(), _unit()], other, "built with model"),
    }


@pytest.mark.parametrize(
    "case", ["nan", "inf", "zeros", "null", "ragged", "strings", "another model"]
)
def test_an_import_of_a_vector_search_cannot_rank_is_refused_and_nothing_is_written(
    story: Path, tmp_path: Path, case: str
) -> None:
    from embedd import index

    db = tmp_path / "s.db"
    shutil.copy(story, db)
    vectors, columns, what = _bad_vectors()[case]
    parquet = _parquet(tmp_path / "bad.parquet", db, vectors, **columns)
    with pytest.raises(index.IndexUsageError, match=re.escape(what)):
        index.index_parquet(parquet, db)
    assert db.read_bytes() == story.read_bytes()


def test_a_refused_import_into_a_new_index_leaves_no_file(story: Path, tmp_path: Path) -> None:
    from embedd import index

    parquet = _parquet(tmp_path / "bad.parquet", story, [[0.0] * 384])
    with pytest.raises(index.IndexUsageError, match="vector of zeros"):
        index.index_parquet(parquet, tmp_path / "new.db")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.parquet"]


def test_an_imported_vector_is_stored_at_unit_length_so_its_norm_cannot_win_search(
    daemon: Daemon, story: Path, tmp_path: Path
) -> None:
    import numpy as np

    db = tmp_path / "s.db"
    shutil.copy(story, db)
    query = "where is the spare key hidden"
    q = np.asarray(daemon.call("embed", input=query, encoding="list")["embeddings"][0])
    with sqlite3.connect(db) as conn:
        stored = [np.frombuffer(v, "<f4") for (v,) in conn.execute("SELECT vector FROM chunks")]
    best = max(float(v @ q) for v in stored)
    # A direction half as close to the query as the best chunk, at a norm of 1e30.
    r = np.random.default_rng(0).standard_normal(q.size)
    r -= (r @ q) * q
    u = best / 2 * q + np.sqrt(1 - (best / 2) ** 2) * r / np.linalg.norm(r)
    parquet = _parquet(tmp_path / "huge.parquet", db, [(u * 1e30).tolist()])
    out = _cli(daemon, "index", "--from-parquet", str(parquet), "--out", str(db))
    assert out.returncode == 0, out.stderr
    with sqlite3.connect(db) as conn:
        (vector,) = conn.execute(
            "SELECT vector FROM chunks WHERE file LIKE '/elsewhere/%'"
        ).fetchone()
    assert abs(float(np.linalg.norm(np.frombuffer(vector, "<f4"))) - 1) < 1e-5
    for mode in ("vector", "hybrid"):
        assert _search(daemon, db, query, "-k", "1", "--mode", mode)[0]["path"] == "diary.txt"


def test_explain_says_what_folding_and_boilerplate_did() -> None:
    from embedd.cli.index import explain_text
    from embedd.index import Hit
    from embedd.index.fusion import Vote
    from embedd.index.search import Explanation

    why = Explanation(
        {"vector": Vote(2, 0.52, 2.8), "bm25": Vote(0, 0.0, 1.9)},
        {"vector": 3.0, "bm25": 1.0},
        0.4,
        ("libcurl4/changelog.Debian",),
        (6,),
    )
    hit = Hit("/d/c", "curl/changelog.Debian", 9, 8.36, "p", "t", (0, 1), (), 1, why)
    first, *rest = explain_text(hit)
    assert first == (
        "why: vector #2 0.5200 (vote 2.80 x 3) + bm25 by a neighbouring chunk (vote 1.90 x 1)"
        " -> 8.3600"
    )
    assert any("40%" in line for line in rest)
    assert any("libcurl4/changelog.Debian" in line for line in rest)
    assert any(line.endswith("folded in: 6") for line in rest)
