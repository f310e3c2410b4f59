"""Daemon-per-node against in-process llama-cpp-python on Ray Data, at equal threads.

    python -m embedd.ray.bench [--chunks 200] [--actors 2] [--rounds 2] [--json]

Starts a local Ray cluster on this machine's cores (no network) and embeds the bundled corpus
(Python docstrings, ~166 tokens a chunk) with `--actors` actors per side, in rounds that
alternate the sides (a shared machine drifts; pairing keeps the comparison fair):

- `daemon`: the actors are `Embed` steps sending each batch to the node's one embedd daemon at
  bulk priority; the daemon computes on the node's cores (its thread policy: as many threads as
  cores are free, here all of them);
- `daemon, threads = cores`: the same with the thread count fixed in the daemon's config;
- `in-process, threads split`: each actor loads the GGUF itself with llama-cpp-python,
  `n_threads = n_threads_batch = cores / actors` (the same threads in all as the daemon);
- `in-process, defaults`: the same with llama-cpp-python's defaults, which give every actor
  `n_threads_batch = cpu_count()` (Ray's OMP_NUM_THREADS does not change it), so the actors
  oversubscribe the cores: what a pipeline gets without tuning.

Each figure is chunks per second over a whole dataset run (actor start and model load
included, as a job pays them), the actors' peak resident memory, and the daemon's. The vectors
of both sides are compared (cosine), so the speed is of the same work. Speed is measured here,
never asserted in a test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import ray

from embedd.ray.columns import EmbedSettings, vector_array
from embedd.ray.nodes import Daemons, NodeDaemons
from embedd.ray.steps import Embed

BUNDLED = Path(__file__).resolve().parent.parent / "bundled"
MODEL = BUNDLED / "all-MiniLM-L6-v2-f16.gguf"
CORPUS = BUNDLED / "bench_corpus.json"
# Texts per batch, as a corpus job would send them (the daemon batches across actors anyway).
BATCH = 32
# CPUs each actor asks Ray for: a fraction, so that every side fits beside the node's daemon.
ACTOR_CPUS = 0.25


def _peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class InProcess:
    """The baseline step: llama-cpp-python in the actor, the way a pipeline embeds without a
    daemon (`threads` None: llama-cpp-python's defaults)."""

    def __init__(self, threads: int | None) -> None:
        from llama_cpp import Llama

        tuning: dict[str, Any] = {}
        if threads is not None:
            tuning = {"n_threads": threads, "n_threads_batch": threads}
        self.llm = Llama(
            model_path=str(MODEL), embedding=True, n_ctx=512, n_batch=512, n_ubatch=512,
            flash_attn=True, verbose=False, **tuning,
        )  # fmt: skip

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column("text").to_pylist()
        vectors = np.asarray(self.llm.embed(texts, normalize=True, truncate=True), np.float32)
        return batch.append_column("vector", vector_array(vectors)).append_column(
            "rss_mb", pa.array([_peak_rss_mb()] * batch.num_rows)
        )


class DaemonStep(Embed):
    """`Embed`, also reporting its actor's peak memory."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = super().__call__(batch)
        return out.append_column("rss_mb", pa.array([_peak_rss_mb()] * batch.num_rows))


def _run(ds: Any, step: Any, args: tuple[Any, ...], actors: int) -> tuple[float, pa.Table]:
    started = time.perf_counter()
    out = ds.map_batches(
        step, fn_constructor_args=args, batch_format="pyarrow", batch_size=BATCH,
        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=ACTOR_CPUS,
    ).to_arrow_refs()  # fmt: skip
    table = pa.concat_tables(ray.get(out))
    return time.perf_counter() - started, table


def _by_text(table: pa.Table) -> dict[str, npt.NDArray[np.float32]]:
    vectors = table["vector"].combine_chunks().flatten().to_numpy().reshape(table.num_rows, -1)
    return dict(zip(table["text"].to_pylist(), vectors, strict=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m embedd.ray.bench", description=__doc__)
    parser.add_argument("--chunks", type=int, default=200, help="corpus chunks per run")
    parser.add_argument("--actors", type=int, default=2, help="actors per side")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each side, alternated")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    split = max(1, cores // args.actors)
    texts: list[str] = json.loads(CORPUS.read_text())["chunks"][: args.chunks]
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = ray.data.from_items([{"text": t} for t in texts]).materialize()
    figures: dict[str, list[float]] = {}
    memory: dict[str, float] = {}
    vectors: dict[str, dict[str, npt.NDArray[np.float32]]] = {}
    fixed = Daemons(
        name="fixed", config=f"[models.default]\npath = '{MODEL}'\nthreads = {cores}\n", cpus=0.1
    )
    with NodeDaemons() as nodes, NodeDaemons(fixed) as fixed_nodes:
        sides: dict[str, Callable[[], tuple[float, pa.Table]]] = {
            "daemon": lambda: _run(ds, DaemonStep, (nodes.daemons, EmbedSettings()), args.actors),
            f"daemon, threads = {cores}": lambda: _run(
                ds, DaemonStep, (fixed, EmbedSettings()), args.actors
            ),
            f"in-process, {split} thread(s) each": lambda: _run(
                ds, InProcess, (split,), args.actors
            ),
            "in-process, defaults": lambda: _run(ds, InProcess, (None,), args.actors),
        }
        for _ in range(args.rounds):
            for name, side in sides.items():
                seconds, table = side()
                figures.setdefault(name, []).append(len(texts) / seconds)
                memory[name] = max(memory.get(name, 0.0), max(table["rss_mb"].to_pylist()))
                vectors[name] = _by_text(table)
                print(f"{name}: {len(texts) / seconds:.1f} chunks/s", file=sys.stderr)
        daemon_rss = max(
            (s.get("rss_bytes") or 0) / 2**20
            for s in [*nodes.stats().values(), *fixed_nodes.stats().values()]
        )
    ray.shutdown()
    reference = vectors["daemon"]
    agreement = {
        name: float(min(np.dot(reference[t], v[t]) for t in texts))
        for name, v in vectors.items()
        if name != "daemon"
    }
    result = {
        "cores": cores,
        "actors": args.actors,
        "chunks": len(texts),
        "rounds": args.rounds,
        "chunks_per_s": {k: [round(x, 2) for x in v] for k, v in figures.items()},
        "median_chunks_per_s": {k: round(statistics.median(v), 2) for k, v in figures.items()},
        "actor_peak_rss_mb": {k: round(v, 1) for k, v in memory.items()},
        "daemon_rss_mb": round(daemon_rss, 1),
        "min_cosine_to_daemon": {k: round(v, 6) for k, v in agreement.items()},
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{len(texts)} chunks, {args.actors} actors a side, {cores} cores, "
          f"{args.rounds} rounds (median; each round's figure in brackets)")  # fmt: skip
    for name, rates in figures.items():
        each = ", ".join(f"{r:.1f}" for r in rates)
        print(f"  {name:<30} {statistics.median(rates):6.1f} chunks/s  [{each}]  "
              f"actor peak RSS {memory[name]:.0f} MB")  # fmt: skip
    print(f"  daemon RSS {daemon_rss:.0f} MB; vectors vs the daemon's: min cosine "
          + ", ".join(f"{k} {v:.6f}" for k, v in agreement.items()))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
