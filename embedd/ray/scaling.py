"""Rows per second with one node and with several, and the memory each node takes.

    python -m embedd.ray.scaling [--nodes 1 2] [--chunks 600] [--rounds 3] [--json]

For each node count, starts a local cluster of that many 1-CPU nodes on this machine
(embedd/ray/cluster.py: each on its own core while there is one for each, loopback only) and
runs the pipeline of docs/ray.md on the bundled corpus (Python docstrings, ~166 tokens a chunk,
made distinct) written as one Parquet file: `unembedded` (which spreads the rows over the
nodes), `Embed` with two actors; the rows come back to the driver instead of being written, so
that it learns the actors' pids. A round's figure is its rows over the seconds from the read to
the last row (the node daemons are started and the model loaded before: a job pays that once,
not per row; the actors start within each round). While it runs, the resident memory (VmRSS
from /proc) of each node's processes is sampled, by kind, and the peak of each kind reported:

- `daemon`: the node's embedd daemon and its model process;
- `node actor`: the Ray actor that keeps the daemon (embedd/ray/nodes.py);
- `Embed actors`: the step's actors on the node (Ray titles their processes), together;
- `Ray`: the node's raylet, its agents and idle workers (and on the head, the GCS and the
  cluster's monitors), together.

Each round also says how many rows each node's actors embedded. Speed is measured here, never
asserted in a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from embedd.inference.modelprocess import read_rss_bytes
from embedd.ray.bench import CORPUS
from embedd.ray.cluster import LocalCluster
from embedd.ray.columns import EmbedSettings
from embedd.ray.nodes import Daemons, NodeDaemons
from embedd.ray.resume import unembedded
from embedd.ray.steps import Embed

# Seconds between memory samples while a round runs.
SAMPLE_EVERY = 0.5
# Texts per Embed batch and actors, as in docs/ray.md's example.
BATCH = 64
ACTORS = 2


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[1])


def _children() -> dict[int, list[int]]:
    """Every process's children, from /proc."""
    out: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            parent = _ppid(int(entry.name))
            if parent is not None:
                out.setdefault(parent, []).append(int(entry.name))
    return out


def _tree(pid: int, children: dict[int, list[int]]) -> Iterator[int]:
    yield pid
    for child in children.get(pid, []):
        yield from _tree(child, children)


def _is_embed_actor(pid: int) -> bool:
    """Whether `pid` is a Ray worker running an Embed step (Ray names it in its title)."""
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return title.startswith(b"ray::MapWorker") and b"Embed" in title


def _rss(pids: list[int]) -> int:
    return sum(read_rss_bytes(pid) or 0 for pid in pids)


class EmbedWithPid(Embed):
    """`Embed`, also reporting its actor's pid (which node embedded each row)."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = super().__call__(batch)
        return out.append_column("actor_pid", pa.array([os.getpid()] * batch.num_rows))


class Sampler:
    """Samples each node's memory by kind every SAMPLE_EVERY seconds, keeping the peaks."""

    def __init__(self, cluster: LocalCluster, daemons: dict[str, int]) -> None:
        self.cluster = cluster
        self.daemons = daemons  # node id -> daemon pid
        self.node_of: dict[int, str] = {}  # Embed actor pid -> its node
        self.peak: dict[str, dict[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        children = _children()
        for index in range(len(self.cluster.nodes)):
            node = self.cluster.node_id(index)
            raylet = self.cluster.raylet_pid(index)
            daemon = self.daemons[node]
            actor = _ppid(daemon)  # the daemon's launcher execs it: its parent is the actor
            daemon_tree = list(_tree(daemon, children))
            workers = children.get(raylet, [])
            embed = [p for p in workers if _is_embed_actor(p)]
            self.node_of.update(dict.fromkeys(embed, node))
            own = [
                pid
                for processes in self.cluster.nodes[index].all_processes.values()
                for info in processes
                for pid in [info.process.pid]
            ]
            idle = [p for p in workers if p != actor and p not in embed]
            kinds = {
                "daemon": _rss(daemon_tree),
                "node actor": _rss([actor]) if actor else 0,
                "Embed actors": _rss(embed),
                "Ray": _rss(sorted(set(own + idle) - set(daemon_tree))),
            }
            peak = self.peak.setdefault(node, dict.fromkeys(kinds, 0))
            for kind, value in kinds.items():
                peak[kind] = max(peak[kind], value)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY):
            self.sample()

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def measure(nodes: int, texts: list[str], rounds: int) -> dict[str, Any]:
    """Rows/s of each round and each node's peak memory by kind (MB), on `nodes` nodes (its
    input and vectors in a temporary folder, removed after)."""
    with tempfile.TemporaryDirectory(prefix="embedd-scaling-") as folder:
        return _measure(nodes, texts, rounds, Path(folder))


def _measure(nodes: int, texts: list[str], rounds: int, work: Path) -> dict[str, Any]:
    settings = EmbedSettings()
    rates: list[float] = []
    shares: list[dict[str, int]] = []  # rows each node embedded, per round
    (work / "texts").mkdir()
    pq.write_table(pa.table({"text": texts}), work / "texts" / "part-0.parquet")
    with LocalCluster(nodes, 1) as cluster:
        cluster.connect(log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        with NodeDaemons(Daemons()) as daemons:
            fingerprint = daemons.fingerprint()
            pids = {node: int(pid) for node, pid in daemons.pids().items() if pid}
            sampler = Sampler(cluster, pids)
            with sampler:
                for round_ in range(rounds):
                    out = work / f"vectors-{round_}"
                    started = time.perf_counter()
                    todo = unembedded(
                        ray.data.read_parquet(str(work / "texts")), out, settings, fingerprint
                    )
                    # As the docs' example: actors spread over the nodes, one batch each at a time.
                    pool = ray.data.ActorPoolStrategy(size=ACTORS, max_tasks_in_flight_per_actor=1)
                    vectors = todo.map_batches(
                        EmbedWithPid, fn_constructor_args=(daemons.daemons, settings),
                        batch_format="pyarrow", compute=pool, num_cpus=0, batch_size=BATCH,
                        scheduling_strategy="SPREAD",
                    )  # fmt: skip

                    pids_of_rows: list[int] = []
                    for batch in vectors.iter_batches(batch_format="pyarrow"):
                        pids_of_rows += pa.table(batch)["actor_pid"].to_pylist()
                    rates.append(len(texts) / (time.perf_counter() - started))
                    share: dict[str, int] = {}
                    for pid in pids_of_rows:
                        node = sampler.node_of.get(pid, "unknown")
                        share[node] = share.get(node, 0) + 1
                    shares.append(share)
                    print(f"{nodes} node(s): {rates[-1]:.1f} rows/s", file=sys.stderr)
        ray.shutdown()
    return {
        "nodes": nodes,
        "rows_per_s": [round(r, 2) for r in rates],
        "median_rows_per_s": round(statistics.median(rates), 2),
        "rows_per_node": [sorted(share.values(), reverse=True) for share in shares],
        "peak_rss_mb_per_node": [
            {kind: round(value / 2**20) for kind, value in peak.items()}
            for peak in sampler.peak.values()
        ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m embedd.ray.scaling", description=__doc__)
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2], help="node counts")
    parser.add_argument("--chunks", type=int, default=600, help="corpus chunks per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per node count")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    corpus: list[str] = json.loads(CORPUS.read_text())["chunks"]
    texts = (corpus * (1 + args.chunks // len(corpus)))[: args.chunks]
    texts = [f"{t} [{i}]" for i, t in enumerate(texts)]  # distinct rows, distinct ids
    results = [measure(n, texts, args.rounds) for n in args.nodes]
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for result in results:
        each = ", ".join(f"{r:.1f}" for r in result["rows_per_s"])
        print(f"{result['nodes']} node(s): {result['median_rows_per_s']:.1f} rows/s "
              f"(median of {each}); rows per node in each round: "
              f"{result['rows_per_node']}")  # fmt: skip
        for i, peak in enumerate(result["peak_rss_mb_per_node"]):
            print(f"  node {i}: " + ", ".join(f"{k} {v} MB" for k, v in peak.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
