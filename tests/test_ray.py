"""embedd.ray on a real Ray cluster of two nodes on this machine (two raylets of one CPU each,
each on its own core where the machine has two, loopback only: embedd/ray/cluster.py), with real
daemons on the bundled model: one cluster and one set of node daemons for the module, which Ray
takes seconds to start. The last test loses a node: it runs last.

No step is ordered by a sleep: a test that needs a run interrupted holds part of the input at
a gate (an actor that releases it when told) and waits for the daemons' own `stats` to show
the rest embedded, or for the output files to hold it.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import embedd_client
import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from embedd.index.records import META_FINGERPRINT
from embedd.ray import (
    Chunk,
    DaemonProgress,
    Daemons,
    Embed,
    EmbedSettings,
    NodeDaemons,
    RowsMissing,
    unembedded,
    written_once,
)
from embedd.ray.cluster import FAST_FAILURE_DETECTION, LocalCluster
from embedd.ray.columns import chunk_ids
from embedd.ray.resume import BLOCKS_PER_NODE, rows_per_block
from tests.conftest import BUNDLED, Daemon, Reference, cosines, start_daemon

# Rows per Ray block and per Embed batch: equal, so that a gate holding whole blocks leaves
# whole batches on either side of it.
BLOCK = 50
# Seconds a run may take before the test calls it hung: a bound on a wait, never a speed check.
RUN_TIMEOUT = 300.0
POLL = 0.05
# Rows of a run that is interrupted halfway (a multiple of 2 * BLOCK: the gate holds whole
# blocks, and the first half must fill whole Embed batches).
KILLED_RUN = 400
# Tasks that only move rows (the gate, Parquet writes) take a tenth of a CPU: each node has one,
# which the Embed actors (none asked) and the node daemon's actor (none on a 1-CPU node) leave.
LIGHT = {"num_cpus": 0.1}
NODES = 2


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # never phone home
    with LocalCluster(NODES, 1, system_config=FAST_FAILURE_DETECTION) as local:
        local.connect(log_to_driver=False)
        try:
            yield local
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def nodes(cluster: LocalCluster) -> Iterator[NodeDaemons]:
    with NodeDaemons() as started:
        yield started


def _node() -> str:
    return str(ray.get_runtime_context().get_node_id())


def _texts(n: int, tag: str) -> list[str]:
    """Short distinct texts (about a dozen tokens): 1,000 of them embed in seconds."""
    return [f"{tag} note {i}: item {i % 97} is on shelf {i % 13}" for i in range(n)]


def _rows(texts: list[str]) -> Any:
    return ray.data.from_items(
        [{"text": t, "n": i} for i, t in enumerate(texts)],
        override_num_blocks=max(1, len(texts) // BLOCK),
    )


def _embed(ds: Any, daemons: Daemons, *, actors: int = 1) -> Any:
    """`ds` through Embed actors (one by default: each is a process to start, seconds of CPU
    on this machine; the 1,000-row run has two, sharing the node's daemon)."""
    return ds.map_batches(
        Embed,
        fn_constructor_args=(daemons, EmbedSettings()),
        batch_format="pyarrow",
        batch_size=BLOCK,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=0,
    )


def _model_stats(nodes: NodeDaemons, node: str | None = None) -> dict[str, Any]:
    stats = nodes.stats()[node or _node()]
    return dict((stats.get("models") or {}).get("default") or {})


def _inputs(nodes: NodeDaemons) -> dict[str, int]:
    """Inputs each live node's daemon has embedded."""
    return {
        node: int(((s.get("models") or {}).get("default") or {}).get("inputs", 0))
        for node, s in nodes.stats().items()
        if "error" not in s
    }


def _wait(condition: Callable[[], bool], what: str, detail: Callable[[], str] = str) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"not within {RUN_TIMEOUT:g}s: {what}\n{detail()}"
        time.sleep(POLL)


@ray.remote(num_cpus=0)
class Gate:
    """Holds callers of `wait` until `open`."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    async def wait(self) -> None:
        await self.event.wait()

    async def open(self) -> None:
        self.event.set()


def _hold_from(batch: pa.Table, first_held: int, gate: Any) -> pa.Table:
    """A step before Embed: blocks whose rows come at or after `first_held` wait at the gate."""
    if min(batch["n"].to_pylist()) >= first_held:
        ray.get(gate.wait.remote())
    return batch


def _ids(table: pa.Table) -> list[str]:
    return list(table["id"].to_pylist())


def test_1000_rows_come_out_once_each_as_fixed_size_vectors_equal_to_the_clients(
    nodes: NodeDaemons, daemon: Daemon, tmp_path: Path
) -> None:
    texts = _texts(1000, "bulk")
    _embed(_rows(texts), nodes.daemons, actors=2).write_parquet(
        str(tmp_path), ray_remote_args=LIGHT
    )
    out = pq.read_table(tmp_path)
    fingerprint = nodes.fingerprint()
    expected = chunk_ids(pa.table({"text": texts}), fingerprint, EmbedSettings().options)
    assert sorted(_ids(out)) == sorted(expected.to_pylist())  # each id exactly once
    assert out.schema.field("vector").type == pa.list_(pa.float32(), 384)
    assert out.schema.metadata[META_FINGERPRINT.encode()] == fingerprint.encode()
    got = {t: v for t, v in zip(out["text"].to_pylist(), out["vector"].to_numpy(), strict=True)}
    vectors = np.stack([got[t] for t in texts]).astype(np.float32)
    with embedd_client.Client(daemon.socket) as client:
        desktop = client.embed(texts, cache=False)
    assert cosines(vectors, desktop).min() >= 0.9999


def test_a_node_daemon_killed_mid_run_is_restarted_and_every_row_comes_out_once(
    nodes: NodeDaemons,
) -> None:
    texts = _texts(KILLED_RUN, "kill")
    gate = Gate.remote()  # type: ignore[attr-defined]
    held = functools.partial(_hold_from, first_held=KILLED_RUN // 2, gate=gate)
    ds = _embed(_rows(texts).map_batches(held, batch_format="pyarrow", **LIGHT),
                nodes.daemons)  # fmt: skip
    before = sum(_inputs(nodes).values())
    rows: list[list[dict[str, Any]]] = []
    run = threading.Thread(target=lambda: rows.append(ds.take_all()))
    run.start()
    try:
        _wait(lambda: sum(_inputs(nodes).values()) >= before + KILLED_RUN // 2,
              "the rows before the gate embedded")  # fmt: skip
        pid = nodes.pids()[_node()]
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
    finally:
        ray.get(gate.open.remote())
        run.join(RUN_TIMEOUT)
    assert rows, "the run did not finish"
    assert sorted(r["text"] for r in rows[0]) == sorted(texts)
    assert len({r["id"] for r in rows[0]}) == KILLED_RUN
    supervisor = nodes.stats()[_node()]["supervisor"]
    assert supervisor["restarts"] >= 1 and supervisor["pid"] != pid


def test_a_tiny_queue_answers_busy_and_the_job_still_completes(cluster: LocalCluster) -> None:
    # 100 tokens: one client's share is 50, less than one batch of 50 texts (PROTOCOL.md
    # `busy`): every batch is refused whole at first, then sent in parts.
    config = f"[models.default]\npath = '{BUNDLED}'\nmax_queue_tokens = 100\n"
    daemons = Daemons(name="busy", config=config, cpus=0.1)
    texts = _texts(KILLED_RUN // 2, "busy")
    with NodeDaemons(daemons) as busy:
        rows = _embed(_rows(texts), daemons).take_all()
        stats = busy.stats()
    assert sorted(r["text"] for r in rows) == sorted(texts)
    assert sum(s["requests"]["errors"].get("busy", 0) for s in stats.values()) > 0


# A driver the test kills: embeds COUNT texts into OUT with the node daemons attached to the
# test's daemon at SOCKET, skipping what OUT holds; with a GATE, holding the second half.
DRIVER = """
import functools, sys
import ray
from embedd.ray import Daemons, Embed, EmbedSettings, NodeDaemons, unembedded

address, socket, out, gate_name, count = sys.argv[1:6]
ray.init(address=address, log_to_driver=False)
daemons = Daemons(socket=socket, name="driven", cpus=0)
settings = EmbedSettings()

def hold(batch, gate):
    if gate is not None and min(batch["n"].to_pylist()) >= int(count) // 2:
        ray.get(gate.wait.remote())
    return batch

gate = ray.get_actor(gate_name, namespace="embedd-tests") if gate_name else None
with NodeDaemons(daemons) as nodes:
    texts = [f"driven note {i}: item {i % 97} is on shelf {i % 13}" for i in range(int(count))]
    ds = ray.data.from_items([{"text": t, "n": i} for i, t in enumerate(texts)],
                             override_num_blocks=len(texts) // 50)
    todo = unembedded(ds, out, settings, nodes.fingerprint())
    todo = todo.map_batches(functools.partial(hold, gate=gate), batch_format="pyarrow",
                            num_cpus=0.1)
    todo.map_batches(Embed, fn_constructor_args=(daemons, settings), batch_format="pyarrow",
                     batch_size=50, compute=ray.data.ActorPoolStrategy(size=2),
                     num_cpus=0).write_parquet(out, ray_remote_args={"num_cpus": 0.1})
print("done")
"""


def _readable_ids(out: Path) -> list[str]:
    """Ids in the output's complete files, leaving any file still being written alone."""
    ids: list[str] = []
    for path in out.glob("*.parquet"):
        try:
            ids += pq.read_table(path, columns=["id"])["id"].to_pylist()
        except (pa.ArrowInvalid, OSError):
            continue
    return ids


def test_a_rerun_after_the_driver_was_killed_embeds_only_the_missing_rows(
    cluster: LocalCluster, workdir: Path, tmp_path: Path
) -> None:
    daemon = start_daemon(workdir, "cache_bytes = 0\n")
    gate = Gate.options(  # type: ignore[attr-defined]
        name="driver-gate", namespace="embedd-tests", lifetime="detached"
    ).remote()
    out = tmp_path / "vectors"
    address = ray.get_runtime_context().gcs_address

    log = tmp_path / "driver.log"

    def driver(gate_name: str) -> subprocess.Popen[bytes]:
        # Its output goes to a file: Ray's progress lines would fill a pipe and block it.
        with log.open("ab") as sink:
            return subprocess.Popen(
                [sys.executable, "-c", DRIVER, address, str(daemon.socket), str(out), gate_name,
                 str(KILLED_RUN)],
                stdout=sink, stderr=subprocess.STDOUT,
            )  # fmt: skip

    try:
        first = driver("driver-gate")
        _wait(lambda: first.poll() is not None or len(_readable_ids(out)) >= KILLED_RUN // 2,
              "the first driver's files before the gate",
              lambda: log.read_text()[-3000:])  # fmt: skip
        assert first.poll() is None, log.read_text()
        first.send_signal(signal.SIGKILL)
        first.wait()
        written = set(_readable_ids(out))
        before = daemon.model_stats()["inputs"]
        second = driver("")
        assert second.wait(RUN_TIMEOUT) == 0, log.read_text()
        embedded_again = daemon.model_stats()["inputs"] - before
    finally:
        ray.kill(gate)
        daemon.stop()
    ids = _readable_ids(out)
    assert len(written) == KILLED_RUN // 2
    assert embedded_again == KILLED_RUN - len(written)
    assert len(ids) == len(set(ids)) == KILLED_RUN


def test_the_output_loads_into_lancedb_and_the_known_nearest_chunk_comes_first(
    nodes: NodeDaemons, daemon: Daemon, reference: Reference, tmp_path: Path
) -> None:
    chunks = reference.chunks[:40]
    # The query whose nearest chunk (by the reference implementation's vectors) leads the
    # runner-up by the widest margin: the order cannot hinge on the last float bits.
    scores = reference.q_vecs @ reference.c_vecs[:40].T
    top2 = np.sort(scores, axis=1)[:, -2:]
    query = int(np.argmax(top2[:, 1] - top2[:, 0]))
    nearest = chunks[int(np.argmax(scores[query]))]
    ds = ray.data.from_items([{"text": t} for t in chunks], override_num_blocks=2)
    _embed(ds, nodes.daemons).write_parquet(str(tmp_path / "vectors"), ray_remote_args=LIGHT)
    table = lancedb.connect(tmp_path / "lance").create_table(
        "chunks", data=pq.read_table(tmp_path / "vectors")
    )
    with embedd_client.Client(daemon.socket) as client:
        q = client.embed_query(reference.queries[query])
    hit = table.search(q).limit(1).to_arrow()  # L2 on unit vectors: the cosine order
    assert hit["text"].to_pylist() == [nearest]


DIARY = "\n".join(
    [f"Day {i}: nothing much happened, the weather was mild." for i in range(1, 23)]
    + ["Day 23: I hid the spare key under the blue flower pot by the back door."]
    + [f"Day {i}: a quiet day of reading." for i in range(24, 40)]
)
RECIPES = "Pancakes need flour, eggs and milk.\n\nBake bread at 220 degrees for 30 minutes."


def test_chunks_embedded_on_the_cluster_become_an_index_that_embedd_search_uses(
    nodes: NodeDaemons, daemon: Daemon, tmp_path: Path
) -> None:
    docs = [{"file": "/docs/diary.txt", "text": DIARY}, {"file": "/docs/recipes.txt",
                                                         "text": RECIPES}]  # fmt: skip
    chunked = ray.data.from_items(docs).map_batches(
        Chunk, fn_constructor_args=(nodes.daemons,), fn_constructor_kwargs={"max_tokens": 64},
        batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0,
    )  # fmt: skip
    _embed(chunked, nodes.daemons).write_parquet(str(tmp_path / "vectors"), ray_remote_args=LIGHT)
    db = tmp_path / "corpus.db"

    def embedd(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "embedd", "--socket", str(daemon.socket), *args],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    imported = embedd("index", "--from-parquet", str(tmp_path / "vectors"), "--out", str(db))
    assert imported.returncode == 0, imported.stderr
    found = embedd("search", str(db), "where is the spare key hidden", "-k", "1", "--json")
    assert found.returncode == 0, found.stderr
    hit = json.loads(found.stdout)[0]
    assert (hit["path"], hit["line"]) == ("diary.txt", 23)


def test_the_progress_reporter_logs_each_node_daemons_stats(nodes: NodeDaemons) -> None:
    lines: list[str] = []
    with DaemonProgress(nodes, every=3600.0, log=lines.append):
        pass
    pids = nodes.pids()
    assert len(pids) == NODES and None not in pids.values()
    for pid in pids.values():  # a line per node when it starts, and when it stops
        assert len([line for line in lines if f"(pid {pid}, " in line]) == 2
    assert "chunks done" in lines[-1] and "busy answers" in lines[-1]


def test_a_step_on_a_node_with_another_model_file_refuses_to_start(nodes: NodeDaemons) -> None:
    with pytest.raises(ValueError, match="give every node the same model file"):
        Embed(nodes.daemons, fingerprint="0" * 64)


def test_the_docs_example_embeds_a_parquet_file_on_nodes_of_one_cpu(
    nodes: NodeDaemons, tmp_path: Path
) -> None:
    """The example as printed, on nodes of one CPU, where Ray Data's read and write tasks need
    the whole of it (a step asking for a share of one made the job wait forever)."""
    page = (Path(__file__).parent.parent / "docs" / "ray.md").read_text()
    example = re.findall(r"```python\n(.*?)```", page, re.S)[0]
    assert len(example.strip().splitlines()) <= 13
    texts = _texts(100, "readme")
    (tmp_path / "texts").mkdir()
    pq.write_table(pa.table({"text": texts}), tmp_path / "texts" / "part-0.parquet")
    # The module's cluster is up: the example's own ray.init() would start a second one.
    code = example.replace("ray.init()\n", "").replace('"/data/', f'"{tmp_path}/')
    exec(code, {})  # its NodeDaemons finds the module's node actors running, and leaves them
    out = pq.read_table(tmp_path / "vectors")
    assert sorted(out["text"].to_pylist()) == sorted(texts)
    assert None not in nodes.pids().values()  # the module's daemons were not stopped


def test_the_rows_left_of_one_file_are_cut_into_blocks_for_every_node(
    nodes: NodeDaemons, tmp_path: Path
) -> None:
    """Ray reads a small file as one block, which one actor would embed alone."""
    pq.write_table(pa.table({"text": _texts(400, "spread")}), tmp_path / "part-0.parquet")
    texts = ray.data.read_parquet(str(tmp_path))
    todo = unembedded(texts, tmp_path / "none", EmbedSettings(), nodes.fingerprint())
    assert rows_per_block(400, NODES) == 400 // (BLOCKS_PER_NODE * NODES)
    assert todo.materialize().num_blocks() >= BLOCKS_PER_NODE * NODES


def test_a_row_missing_from_the_output_is_named_with_how_many_are_missing(
    nodes: NodeDaemons, tmp_path: Path
) -> None:
    texts = _texts(100, "lacking")
    _embed(_rows(texts), nodes.daemons).write_parquet(str(tmp_path), ray_remote_args=LIGHT)
    first = sorted(tmp_path.glob("*.parquet"))[0]
    lacking = pq.read_table(first, columns=["id"])["id"].to_pylist()
    first.unlink()  # as if the task that wrote it had failed for good
    with pytest.raises(RowsMissing) as failed:
        written_once(_rows(texts), tmp_path, EmbedSettings(), nodes.fingerprint())
    assert failed.value.tally.missing == sorted(lacking)
    assert f"{len(lacking):,} of 100 rows are missing" in str(failed.value)


# Rows of the run that loses a node: the gate holds the second half.
LOST_RUN = 200


def test_a_node_lost_mid_run_with_another_nodes_daemon_killed_still_writes_every_row_once(
    cluster: LocalCluster, nodes: NodeDaemons, daemon: Daemon, tmp_path: Path
) -> None:
    """The docs' pipeline with a gate before Embed: once the first half is embedded, the
    head node's daemon is killed and the other node's raylet too; the run finishes on the head
    node. Runs last: the module's cluster has one node after it."""
    texts = _texts(LOST_RUN, "lost")
    (tmp_path / "texts").mkdir()
    pq.write_table(pa.table({"text": texts, "n": list(range(LOST_RUN))}),
                   tmp_path / "texts" / "part-0.parquet")  # fmt: skip
    out = tmp_path / "vectors"
    head, other = cluster.node_id(0), cluster.node_id(1)
    on_head = NodeAffinitySchedulingStrategy(head, soft=False)
    gate = Gate.options(scheduling_strategy=on_head).remote()  # type: ignore[attr-defined]
    held = functools.partial(_hold_from, first_held=LOST_RUN // 2, gate=gate)
    settings = EmbedSettings()
    lines: list[str] = []
    own = NodeDaemons(Daemons(name="lossy"))
    with own, DaemonProgress(own, every=0.5, log=lines.append):
        dirs = [Path(s["supervisor"]["socket"]).parent for s in own.stats().values()]
        todo = unembedded(ray.data.read_parquet(str(tmp_path / "texts")), out, settings,
                          own.fingerprint())  # fmt: skip
        # Not fused into the Embed actors (it asks for another CPU share): an actor held at
        # the gate would hold the blocks queued behind it too.
        todo = todo.map_batches(held, batch_format="pyarrow", num_cpus=LIGHT["num_cpus"])
        step: dict[str, Any] = {"fn_constructor_args": (own.daemons, settings),
                                "batch_format": "pyarrow"}  # fmt: skip
        vectors = todo.map_batches(Embed, compute=ray.data.ActorPoolStrategy(size=2),
                                   num_cpus=0, batch_size=BLOCK, **step)  # fmt: skip
        failure: list[BaseException] = []

        def run() -> None:
            try:
                vectors.write_parquet(str(out), ray_remote_args=LIGHT)
            except BaseException as exc:  # reported by the assertion below
                failure.append(exc)

        runner = threading.Thread(target=run)
        runner.start()
        try:
            # Mid-run: a batch embedded. Of the half that passed the gate, Embed may keep back
            # up to a batch while it waits for more rows to fill one, never the first.
            _wait(lambda: sum(_inputs(own).values()) >= BLOCK,
                  "rows before the gate embedded")  # fmt: skip
            pid = own.pids()[head]
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            cluster.kill_raylet(1)
            _wait(lambda: own.lost() == [other], "Ray counting the node lost")
        finally:
            ray.get(gate.open.remote())
            runner.join(RUN_TIMEOUT)
        assert not runner.is_alive() and not failure, failure
        assert own.stats()[other]["lost"]
        tally = written_once(ray.data.read_parquet(str(tmp_path / "texts")), out, settings,
                             own.fingerprint())  # fmt: skip
    assert not any(path.exists() for path in dirs)  # stop() cleaned up after both nodes
    assert any("lost, skipped" in line for line in lines)
    assert tally.expected == LOST_RUN
    table = pq.read_table(out)
    assert sorted(table["text"].to_pylist()) == sorted(texts)
    got = dict(zip(table["text"].to_pylist(), table["vector"].to_numpy(), strict=True))
    with embedd_client.Client(daemon.socket) as client:
        desktop = client.embed(texts, cache=False)
    assert cosines(np.stack([got[t] for t in texts]).astype(np.float32), desktop).min() >= 0.9999
