"""embedd.ray's parts without a Ray cluster: the chunk record's id and Arrow columns, the
resume filter, the progress line, and the node supervisor and patient client against real
daemons (the pieces the Ray steps are made of; tests/test_ray.py runs them on a cluster)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import embedd_client
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedd.index import store
from embedd.index.records import META_FINGERPRINT, NAMES, chunk_id
from embedd.ray.cluster import core_plan
from embedd.ray.columns import EmbedSettings, arrow_type, chunk_ids, chunked, embedded
from embedd.ray.nodes import daemon_cpus, lost
from embedd.ray.progress import Segments, node_line
from embedd.ray.resume import (
    MAX_BLOCK_ROWS,
    MIN_BLOCK_ROWS,
    OutputMismatch,
    done_ids,
    missing_mask,
    rows_per_block,
    tally,
)
from embedd.ray.retry import Patience, PatientClient
from embedd.ray.supervisor import (
    DIR_PREFIX,
    OWNER_FILE,
    DaemonSupervisor,
    owner_gone,
    owner_line,
    start_time,
    sweep_stale,
)
from embedd.wire.messages import Embed, Limits, parse_request
from embedd.wire.options import VectorOptions
from tests.conftest import BUNDLED, Daemon, Reference, cosines
from tests.wire import RawConnection

FINGERPRINT = "f" * 64 + "+wordpiece-hf-1"
# Seconds between polls of a state the test waits for (an interval, not a bound).
POLL = 0.02


# --- the chunk record --------------------------------------------------------------------------


def test_a_chunk_id_is_the_same_for_the_same_chunk() -> None:
    options = VectorOptions(long="split")
    assert chunk_id("a text", FINGERPRINT, options, file="a.md", idx=3) == chunk_id(
        "a text", FINGERPRINT, VectorOptions(long="split"), file="a.md", idx=3
    )


def test_options_that_cannot_matter_do_not_change_a_chunk_id() -> None:
    """Overlap and pooling apply to split inputs only."""
    plain = chunk_id("a text", FINGERPRINT, VectorOptions(long="truncate"))
    assert chunk_id("a text", FINGERPRINT, VectorOptions(long="truncate", overlap=8)) == plain
    assert chunk_id("a text", FINGERPRINT, VectorOptions(long="truncate", pool="none")) == plain


def test_a_chunk_id_is_the_hash_it_has_always_been() -> None:
    """Ids are stored in indexes and outputs: the same chunk must keep its id."""
    options = VectorOptions(long="truncate")
    assert options.id_fields() == {
        "long": "truncate", "overlap": 0, "prompt": None, "normalize": True, "dimensions": None
    }  # fmt: skip
    assert chunk_id("a text", FINGERPRINT, options, file="a.md", idx=3) == (
        "6b7dc6e7e14457a447208972b9780857"
    )


@pytest.mark.parametrize(
    "changed",
    [
        {"text": "another text"},
        {"fingerprint": "0" * 64},
        {"options": VectorOptions(long="truncate")},
        {"file": "b.md"},
        {"idx": 4},
    ],
)
def test_a_chunk_id_changes_with_what_its_vector_and_place_depend_on(
    changed: dict[str, Any],
) -> None:
    base: dict[str, Any] = {
        "text": "a text", "fingerprint": FINGERPRINT, "options": VectorOptions(long="split"),
        "file": "a.md", "idx": 3,
    }  # fmt: skip
    other = {**base, **changed}

    def of(a: dict[str, Any]) -> str:
        return chunk_id(a["text"], a["fingerprint"], a["options"], file=a["file"], idx=a["idx"])

    assert of(other) != of(base)


def test_the_index_truncate_option_and_long_truncate_hash_alike() -> None:
    assert EmbedSettings(long="truncate").options == store.INDEX_OPTIONS


def test_the_index_sends_exactly_the_options_its_chunk_ids_hash() -> None:
    request = store.INDEX_OPTIONS.request()
    sent = parse_request({"id": 1, "op": "embed", "input": "a", **request}, Limits())
    assert isinstance(sent.args, Embed) and sent.args.options == store.INDEX_OPTIONS


def test_a_new_index_has_exactly_the_shared_chunk_columns(tmp_path: Path) -> None:
    db = store.open_index(tmp_path / "new.db")
    try:
        columns = [row[1] for row in db.execute("PRAGMA table_info(chunks)")]
    finally:
        db.close()
    assert columns == list(NAMES)


def test_an_old_index_gains_the_shared_names_and_the_ids_of_its_chunks(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as old:  # the chunk table as versions before the shared record
        old.executescript(
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
            "CREATE TABLE files (path TEXT PRIMARY KEY, sha256 TEXT NOT NULL, "
            "chunks INTEGER NOT NULL, indexed_at REAL NOT NULL);"
            "CREATE TABLE chunks (file TEXT NOT NULL, idx INTEGER NOT NULL, start INTEGER NOT "
            "NULL, end INTEGER NOT NULL, text TEXT NOT NULL, tokens INTEGER NOT NULL, model TEXT "
            "NOT NULL, fingerprint TEXT NOT NULL, vector BLOB NOT NULL, line INTEGER NOT NULL "
            "DEFAULT 0, PRIMARY KEY (file, idx));"
        )
        old.execute("INSERT INTO files VALUES ('/n/a.md', 'x', 1, 0)")
        old.execute(
            "INSERT INTO chunks VALUES ('/n/a.md', 0, 0, 6, 'a text', 4, 'default', ?, ?, 1)",
            (FINGERPRINT, b"\0" * 16),
        )
    store.open_index(path).close()
    with sqlite3.connect(path) as db:
        columns = {row[1] for row in db.execute("PRAGMA table_info(chunks)")}
        (stored,) = db.execute("SELECT id FROM chunks").fetchone()
    assert columns == set(NAMES)
    assert stored == chunk_id("a text", FINGERPRINT, store.INDEX_OPTIONS, file="/n/a.md", idx=0)


def test_the_vector_column_is_a_fixed_size_list_of_float32() -> None:
    assert arrow_type("vector", 384) == pa.list_(pa.float32(), 384)
    assert str(arrow_type("vector", 384)) == "fixed_size_list<item: float>[384]"


def _answer(daemon: Daemon, texts: list[str], settings: EmbedSettings) -> dict[str, Any]:
    with embedd_client.Client(daemon.socket) as client:
        return client.request("embed", input=texts, **settings.request())


def test_embedded_rows_carry_the_shared_record_and_the_fingerprint_as_metadata(
    daemon: Daemon,
) -> None:
    settings = EmbedSettings()
    batch = pa.table({"text": ["first text", "second text"], "source_id": [7, 8]})
    table = embedded(batch, _answer(daemon, batch["text"].to_pylist(), settings),
                     fingerprint=FINGERPRINT, settings=settings)  # fmt: skip
    shared = [n for n in NAMES if n in table.column_names]
    assert table.column_names == [*shared, "source_id", "windows"]
    assert shared == ["id", "text", "tokens", "model", "model_fingerprint", "vector"]
    assert table.schema.field("vector").type == pa.list_(pa.float32(), 384)
    assert table.schema.metadata[META_FINGERPRINT.encode()] == FINGERPRINT.encode()
    assert table["id"].to_pylist() == chunk_ids(batch, FINGERPRINT, settings.options).to_pylist()
    assert table["windows"].to_pylist() == [1, 1]


def test_embedded_rows_of_truncated_inputs_say_which_were_cut(daemon: Daemon) -> None:
    settings = EmbedSettings(long="truncate")
    batch = pa.table({"text": ["short", "word " * 400]})
    table = embedded(batch, _answer(daemon, batch["text"].to_pylist(), settings),
                     fingerprint=FINGERPRINT, settings=settings)  # fmt: skip
    assert table["truncated"].to_pylist() == [False, True]
    assert table["tokens"].to_pylist()[1] == 256


def test_chunked_rows_are_one_per_chunk_with_place_line_and_the_document_columns(
    daemon: Daemon,
) -> None:
    text = "Title\n\n" + "A sentence about keys. " * 60 + "\n\nThe end."
    with embedd_client.Client(daemon.socket) as client:
        chunks = client.chunk(text, max_tokens=64)
    batch = pa.table({"file": ["a.md", "empty.md"], "text": [text, " "], "lang": ["en", "en"]})
    table = chunked(batch, [chunks, []])
    assert table.num_rows == len(chunks) > 2
    assert table["file"].to_pylist() == ["a.md"] * len(chunks)
    assert table["lang"].to_pylist() == ["en"] * len(chunks)
    assert table["idx"].to_pylist() == list(range(len(chunks)))
    assert table["text"].to_pylist() == [text[s:e] for s, e in zip(
        table["start"].to_pylist(), table["end"].to_pylist(), strict=True)]  # fmt: skip
    assert table["line"].to_pylist()[-1] == text.count("\n", 0, chunks[-1]["span"][0]) + 1


# --- resuming ----------------------------------------------------------------------------------


def test_missing_mask_keeps_exactly_the_ids_not_done() -> None:
    ids = [chunk_id(f"t{i}", FINGERPRINT, VectorOptions()) for i in range(10)]
    done = np.unique(np.array([bytes.fromhex(i) for i in ids[::2]], dtype="S16"))
    assert missing_mask(done, ids).tolist() == [i % 2 == 1 for i in range(10)]


def test_done_ids_deletes_a_parquet_file_a_crash_cut_short(tmp_path: Path) -> None:
    ids = [chunk_id(f"t{i}", FINGERPRINT, VectorOptions()) for i in range(4)]
    pq.write_table(pa.table({"id": ids[:2]}), tmp_path / "whole.parquet")
    pq.write_table(pa.table({"id": ids[2:]}), tmp_path / "cut.parquet")
    cut = (tmp_path / "cut.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(cut[: len(cut) // 2])
    done = done_ids(tmp_path)
    assert sorted(done.tolist()) == sorted(bytes.fromhex(i) for i in ids[:2])
    assert not (tmp_path / "cut.parquet").exists()


@pytest.mark.parametrize(
    "ids",
    [
        pa.table({"name": ["a foreign table"]}),  # no id column
        pa.table({"id": [1, 2]}),  # ids of another type
        pa.table({"id": ["not hex at all"]}),
        pa.table({"id": ["ab" * 32]}),  # 32 bytes: numpy would cut it to 16 and match
        pa.table({"id": pa.array([None], pa.string())}),
    ],
    ids=["no id", "int ids", "not hex", "too long", "null"],
)
def test_resuming_over_a_foreign_parquet_file_names_it(tmp_path: Path, ids: pa.Table) -> None:
    ours = [chunk_id("t", FINGERPRINT, VectorOptions())]
    pq.write_table(pa.table({"id": ours}), tmp_path / "ours.parquet")
    pq.write_table(ids, tmp_path / "theirs.parquet")
    with pytest.raises(OutputMismatch, match=f"{tmp_path / 'theirs.parquet'} is not embedd's"):
        done_ids(tmp_path)
    assert (tmp_path / "theirs.parquet").exists()  # someone else's: never deleted


# --- spreading the work, checking it was all written ----------------------------------------------


def test_the_rows_left_are_cut_into_eight_blocks_a_node() -> None:
    assert rows_per_block(1200, 2) == 75
    assert rows_per_block(600, 1) == 75


def test_a_block_is_never_smaller_than_the_least_nor_larger_than_the_most() -> None:
    assert rows_per_block(20, 4) == MIN_BLOCK_ROWS
    assert rows_per_block(0, 0) == MIN_BLOCK_ROWS
    assert rows_per_block(10_000_000, 2) == MAX_BLOCK_ROWS


def test_rows_the_output_lacks_or_holds_twice_are_named_with_their_count() -> None:
    result = tally(["a", "b", "c", "d", "a"], ["a", "c", "c"])
    assert (result.expected, result.missing, result.repeated) == (4, ["b", "d"], ["c"])
    assert result.message() == (
        "2 of 4 rows are missing from the output (ids b, d); a rerun through `unembedded` "
        "embeds just those; 1 rows are in the output more than once (ids c)"
    )


def test_a_long_list_of_missing_rows_names_the_first_five() -> None:
    expected = [f"{i:02}" for i in range(12)]
    message = tally(expected, expected[:2]).message()
    assert "10 of 12 rows are missing from the output (ids 02, 03, 04, 05, 06, ...)" in message


def test_an_output_with_every_row_once_says_so() -> None:
    assert tally(["a", "b"], ["b", "a"]).message() == "all 2 rows written once"


# --- the progress line -------------------------------------------------------------------------


def test_the_progress_line_shows_rates_queue_busy_answers_and_restarts() -> None:
    def stats(inputs: int, tokens: int) -> dict[str, Any]:
        model = {"inputs": inputs, "tokens": tokens, "queue_inputs": 5, "queue_tokens": 60,
                 "busy_fraction": 0.5}  # fmt: skip
        return {"models": {"default": model}, "requests": {"errors": {"busy": 3}},
                "supervisor": {"pid": 42, "restarts": 1}}  # fmt: skip

    line = node_line("abcdef0123", stats(300, 3000), {"inputs": 100, "tokens": 1000}, 10.0)
    assert line == (
        "embedd node abcdef01 (pid 42, 1 restarts): 20.0 chunks/s, 200 tok/s, 300 chunks done, "
        "queue 5 inputs / 60 tokens, computing 50% of the time, 3 busy answers"
    )


def test_a_restarted_daemons_counts_start_a_new_segment_and_totals_never_go_down() -> None:
    node = Segments()
    assert node.update(10, {"inputs": 500, "tokens": 5000}) == {"inputs": 500, "tokens": 5000}
    assert node.update(10, {"inputs": 800, "tokens": 8000}) == {"inputs": 800, "tokens": 8000}
    # Killed: its successor counts from zero.
    assert node.update(11, {"inputs": 50, "tokens": 500}) == {"inputs": 850, "tokens": 8500}
    assert node.update(11, {"inputs": 90, "tokens": 900}) == {"inputs": 890, "tokens": 8900}


def test_counts_that_go_down_under_the_same_pid_are_a_new_segment_too() -> None:
    """A daemon the node's service restarted with a recycled pid, as an attached one may be."""
    node = Segments()
    node.update(10, {"inputs": 500, "tokens": 5000})
    assert node.update(10, {"inputs": 20, "tokens": 200})["inputs"] == 520


def test_the_rate_across_a_daemon_restart_is_never_negative() -> None:
    node = Segments()
    before = node.update(10, {"inputs": 800, "tokens": 8000})
    now = {"models": {"default": {"inputs": 50, "tokens": 500}}, "supervisor": {"pid": 11}}
    totals = node.update(11, {"inputs": 50, "tokens": 500})
    line = node_line("abcdef0123", now, before, 10.0, totals)
    assert "5.0 chunks/s, 50 tok/s, 850 chunks done" in line


def test_a_rate_after_a_poll_the_node_missed_spans_the_time_since_it_last_answered() -> None:
    from embedd.ray import progress

    def answer(inputs: int) -> dict[str, Any]:
        return {"models": {"default": {"inputs": inputs, "tokens": 10 * inputs}},
                "supervisor": {"pid": 7}}  # fmt: skip

    # The node's answers at 0, 10 and 20 s: the second poll finds no daemon answering.
    polls = iter([answer(0), {"error": "timed out"}, answer(200)])
    clock = iter([0.0, 10.0, 20.0])

    class Source:
        def stats(self) -> dict[str, dict[str, Any]]:
            return {"abcdef0123": next(polls)}

    lines: list[str] = []
    reporter = progress.DaemonProgress(Source(), log=lines.append, clock=lambda: next(clock))
    for _ in range(3):
        reporter.report()
    assert "10.0 chunks/s" in lines[-1], lines  # 200 chunks over 20 s, not over 10


def test_a_lost_node_gets_a_line_saying_so() -> None:
    line = node_line("abcdef0123", {"lost": True, "error": "its node is lost"}, None, 10.0)
    assert line == "embedd node abcdef01: lost, skipped (its node is lost)"


# --- CPU reservations, lost nodes, a local cluster's cores --------------------------------------


@pytest.mark.parametrize(("node", "daemon"), [(1, 0.0), (2, 1.0), (16, 15.0)])
def test_a_nodes_daemon_reserves_all_its_cpus_but_the_one_a_read_or_write_task_needs(
    node: float, daemon: float
) -> None:
    assert daemon_cpus(node) == daemon


def test_nodes_missing_from_the_live_ones_are_the_lost_ones() -> None:
    assert lost(["a", "b", "c"], ["c", "a", "d"]) == ["b"]


def test_each_local_node_gets_its_own_core_while_there_is_one_for_each() -> None:
    assert core_plan(2, [3, 1]) == [{1}, {3}]
    assert core_plan(2, [0, 1, 2, 3]) == [{0}, {1}]


def test_local_nodes_share_the_cores_when_there_are_fewer_cores_than_nodes() -> None:
    assert core_plan(3, [0, 1]) == [None, None, None]


# --- private directories that outlive their owner ------------------------------------------------


def test_an_owner_that_exited_or_whose_pid_was_reused_is_gone() -> None:
    assert not owner_gone(owner_line(os.getpid()))
    assert owner_gone("4242 100", lambda pid: None)  # no such process
    assert owner_gone("4242 100", lambda pid: 999)  # another process took the pid
    assert not owner_gone("", lambda pid: None)  # being written: never judged


def test_the_sweep_removes_only_directories_whose_owner_is_gone(tmp_path: Path) -> None:
    child = subprocess.Popen(["true"])  # its pid: one no process has once it exited
    child.wait()
    stale = tmp_path / f"{DIR_PREFIX}stale"
    live = tmp_path / f"{DIR_PREFIX}live"
    unowned = tmp_path / f"{DIR_PREFIX}new"
    other = tmp_path / "someone-else"
    for path in (stale, live, unowned, other):
        path.mkdir()
    (stale / OWNER_FILE).write_text(f"{child.pid} {start_time(os.getpid())}")
    (stale / "embedd.sock").write_text("")
    (live / OWNER_FILE).write_text(owner_line(os.getpid()))
    (other / OWNER_FILE).write_text(f"{child.pid} 1")
    assert sweep_stale(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [live.name, unowned.name, other.name]
    )


def test_a_stopped_supervisor_leaves_no_directory() -> None:
    supervisor = DaemonSupervisor()
    supervisor.wait()
    supervisor.stop()
    assert not supervisor.dir.exists()


# --- the node supervisor and the patient client, on real daemons --------------------------------


@pytest.fixture
def supervised() -> Iterator[DaemonSupervisor]:
    supervisor = DaemonSupervisor()
    yield supervisor
    supervisor.stop()


def test_the_supervisor_starts_a_daemon_again_after_sigkill(supervised: DaemonSupervisor) -> None:
    socket, pid = supervised.wait()
    os.kill(pid, signal.SIGKILL)
    again, new = supervised.replace(pid)
    assert (again, supervised.restarts) == (socket, 1) and new != pid
    with embedd_client.Client(again) as client:
        assert client.hello()["pid"] == new


def test_the_supervisor_does_not_kill_a_daemon_that_still_answers(
    supervised: DaemonSupervisor,
) -> None:
    _, pid = supervised.wait()
    assert supervised.replace(pid)[1] == pid and supervised.restarts == 0


def test_the_supervisor_stop_leaves_no_daemon(supervised: DaemonSupervisor) -> None:
    _, pid = supervised.wait()
    supervised.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_patient_client_resends_what_a_killed_daemon_was_computing(
    supervised: DaemonSupervisor, reference: Reference
) -> None:
    texts = reference.chunks[:48]
    patient = PatientClient(supervised)
    got: list[Any] = []
    worker = threading.Thread(target=lambda: got.append(patient.run("test", lambda c, left: c.embed(
        texts, priority="bulk", cache=False, timeout=left))))  # fmt: skip
    worker.start()
    _, pid = supervised.wait()
    with embedd_client.Client(supervised.socket) as watcher:
        while not (s := watcher.stats()["models"].get("default", {})).get("queue_inputs"):
            assert worker.is_alive(), "the request finished before the daemon was seen working"
            time.sleep(POLL)
        assert s["requests"] >= 1
    os.kill(pid, signal.SIGKILL)
    worker.join(120)
    assert patient.replacements == 1 and patient.pid != pid
    assert cosines(got[0], reference.c_vecs[:48]).min() >= 0.9999


def test_a_patient_client_waits_out_busy_after_retry_after(workdir: Path) -> None:
    supervisor = DaemonSupervisor(f"max_connections = 1\n[models.default]\npath = '{BUNDLED}'\n")
    try:
        supervisor.wait()
        patient = PatientClient(supervisor, Patience(seconds=120))
        with RawConnection(supervisor.socket):  # holds the only connection
            worker = threading.Thread(target=lambda: patient.run("test", lambda c, _: c.hello()))
            worker.start()
            while patient.busy_answers == 0:
                assert worker.is_alive(), "answered although the only connection was taken"
                time.sleep(POLL)
        worker.join(60)
        assert not worker.is_alive() and patient.busy_answers >= 1
    finally:
        supervisor.stop()
