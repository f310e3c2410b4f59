"""Search latency against index size, on generated indexes of 10,000 to 1,000,000 chunks.

    flock /tmp/embedd-bench.lock python -m tests.search_bench \\
        [--sizes 10000,30000,100000,300000,1000000] [--dir /tmp/embedd-search-bench] \\
        [--queries 30] [--burn 0] [--socket PATH]

Each index is generated once (and reused by later runs from `--dir`): random unit vectors of
the model's dimension and texts of GENERATED_WORDS words drawn from a Zipf-distributed
vocabulary of made-up words (so BM25 meets common and rare terms as in prose), CHUNKS_PER_FILE
chunks a file, written through `embedd.index.store` (the keyword table, text hashes and
generation triggers as `embedd index` writes them), then its vector matrix built. The
vectors are random, so what is ranked means nothing; what is measured is the time to rank.

For each size, each mode (vector, hybrid) and each of `--queries` queries (a few words of the
vocabulary), through `embedd.index.search` with k = 10, the median over the queries of:
- search: the whole call except the daemon computing vectors (the query's and the passages',
  answered from a memo after a first call): opening the index, checking the matrix, scoring,
  BM25, fusion, reading the hits' rows, choosing passages;
- embed: the daemon embedding a query (each once, so its cache does not answer);
- cpu vector, cpu hybrid: the CPU time of this process during search (wall time on a busy
  machine counts the other programs too; CPU time is what the search itself costs);
- whole: a search through the API with the plain client, for queries no earlier call
  asked (the daemon embeds each: what a query costs an application; the daemon embeds the
  query while BM25 ranks, so this is less than search + embed);
and, once per size: check, the matrix's full check on open (header, counts, sampled rows);
first score, the vector candidates of the first search in a process (mapping the matrix);
score, those of a later search (the matrix still mapped); bm25, the keyword candidates.
`--burn N` runs N busy Python loops (one core each) throughout, to measure under contention.
The daemon is the one at --socket, else one started here with the bundled model.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import embedd_client
import numpy as np

from embedd.index import search, store, vectors
from embedd.index.records import model_fingerprint
from embedd.index.search import _bm25_ranking, vector_candidates

SIZES = (10_000, 30_000, 100_000, 300_000, 1_000_000)
# Words of a generated chunk: about what a 256-token chunk of English prose holds.
GENERATED_WORDS = 150
# Made-up words in the vocabulary; word r is drawn with weight 1 / r (Zipf's law).
VOCABULARY = 50_000
CHUNKS_PER_FILE = 50
# Rows generated and stored per transaction: bounded memory while generating.
GENERATE_BATCH = 20_000
HITS = 10


def _vocabulary(rng: np.random.Generator) -> list[str]:
    syllables = [c + v for c in "bcdfghklmnprstvz" for v in "aeiou"]
    words: set[str] = set()
    while len(words) < VOCABULARY:
        n = int(rng.integers(2, 5))
        words.add("".join(syllables[int(i)] for i in rng.integers(0, len(syllables), n)))
    return sorted(words)


def _weights() -> np.ndarray[Any, np.dtype[np.float64]]:
    w: np.ndarray[Any, np.dtype[np.float64]] = 1.0 / np.arange(1, VOCABULARY + 1)
    out: np.ndarray[Any, np.dtype[np.float64]] = w / w.sum()
    return out


def generate(db_path: Path, size: int, dim: int, model: str, fingerprint: str) -> None:
    """An index of `size` generated chunks at `db_path` (see the module's description)."""
    rng = np.random.default_rng(size)
    words = np.array(_vocabulary(np.random.default_rng(0)))
    weights = _weights()
    db = store.open_index(db_path)
    try:
        store.check_model(db, model, fingerprint)
        db.commit()
        for first in range(0, size, GENERATE_BATCH):
            n = min(GENERATE_BATCH, size - first)
            v = rng.standard_normal((n, dim)).astype("<f4")
            v /= np.linalg.norm(v, axis=1)[:, None]
            drawn = words[rng.choice(VOCABULARY, size=(n, GENERATED_WORDS), p=weights)]
            rows = []
            for j in range(n):
                i = first + j
                name = f"/generated/file-{i // CHUNKS_PER_FILE:06d}.txt"
                text = " ".join(drawn[j])
                rows.append({"id": f"{i}", "file": name, "idx": i % CHUNKS_PER_FILE,
                             "start": 0, "end": len(text), "line": 1, "text": text,
                             "tokens": GENERATED_WORDS, "model": model,
                             "model_fingerprint": fingerprint,
                             "vector": v[j].tobytes()})  # fmt: skip
            with db:
                files = sorted({r["file"] for r in rows})
                db.executemany(
                    "INSERT OR REPLACE INTO files VALUES (?, '', ?, 0)",
                    [(f, CHUNKS_PER_FILE) for f in files],
                )
                store.insert_chunks(db, rows)
            print(f"  generated {first + n:,} of {size:,} chunks", file=sys.stderr)
        db.execute("INSERT OR REPLACE INTO meta VALUES ('roots', '[\"/generated\"]')")
        db.commit()
        vectors.Writer(db_path, db)
    finally:
        db.close()


class MemoClient(embedd_client.Client):
    """The real client, whose `embed` answers a text it has embedded before from a memo: the
    daemon's work taken out of what is timed, every other call still going to it."""

    def __init__(self, socket: Path) -> None:
        super().__init__(socket)
        self.memo: dict[str, Any] = {}

    def embed(self, texts: Any, *args: Any, **kwargs: Any) -> Any:
        key = repr((texts, args, sorted(kwargs.items())))
        if key not in self.memo:
            self.memo[key] = super().embed(texts, *args, **kwargs)
        return self.memo[key]


def _queries(n: int, salt: int) -> list[str]:
    rng = np.random.default_rng(1000 + salt)
    words = _vocabulary(np.random.default_rng(0))
    out = []
    for _ in range(n):  # two common words and two rarer ones, as a person types
        common = rng.integers(0, 200, 2)
        rare = rng.integers(200, VOCABULARY, 2)
        out.append(" ".join(words[int(i)] for i in [*common, *rare]))
    return out


# CPU milliseconds of this process for the last `_median_ms` call's median run: on a shared
# machine the wall time measures the other programs too, the CPU time only the search.
_cpu: list[float] = []


def _median_ms(fn: Callable[..., object], calls: Sequence[tuple[Any, ...]], **kw: Any) -> float:
    """The median wall time of `fn(*args, **kw)` over `calls`, in milliseconds (the median
    CPU time of the same calls is left in `_cpu`)."""
    times, cpu = [], []
    for args in calls:
        t, c = time.perf_counter(), time.process_time()
        fn(*args, **kw)
        times.append((time.perf_counter() - t) * 1000)
        cpu.append((time.process_time() - c) * 1000)
    _cpu[:] = [statistics.median(cpu)]
    return statistics.median(times)


def measure(db: Path, socket: Path, queries: int) -> dict[str, float]:
    out: dict[str, float] = {}
    with MemoClient(socket) as memo, embedd_client.Client(socket) as plain:
        conn = sqlite3.connect(db)
        try:
            out["check"] = _median_ms(
                lambda: vectors.open_checked(db, conn, None).close(), [()] * 5
            )
            qv = np.asarray(memo.embed("warm up", "default"), dtype=np.float32)
            out["score"] = _median_ms(vector_candidates, [(conn, "", qv, None, 200)] * 5)

            def first_in_process() -> None:
                vectors.forget_mapped()
                vector_candidates(conn, "", qv, None, 200)

            out["first score"] = _median_ms(first_in_process, [()] * 3)
            texts = _queries(queries, 0)
            out["bm25"] = _median_ms(_bm25_ranking, [(conn, q, None, 200) for q in texts])
        finally:
            conn.close()

        def run(query: str, mode: str, client: embedd_client.Client) -> None:
            search(db, query, k=HITS, mode=mode, client=client)

        for mode in ("vector", "hybrid"):
            for q in texts:  # the memo learns the query's and the passages' vectors
                run(q, mode, memo)
            out[f"search {mode}"] = _median_ms(run, [(q, mode, memo) for q in texts])
            out[f"cpu {mode}"] = _cpu[0]
        options: dict[str, Any] = {"priority": "interactive", "long": "split"}  # as search
        out["embed"] = _median_ms(
            # Queries no earlier run asked this daemon (its cache would answer them).
            plain.embed,
            [(q, "default") for q in _queries(queries, time.time_ns())],
            **options,
        )
        for mode in ("vector", "hybrid"):
            fresh = _queries(queries, time.time_ns())
            out[f"whole {mode}"] = _median_ms(run, [(q, mode, plain) for q in fresh])
    return out


def _burn() -> None:  # pragma: no cover - a separate process
    while True:
        pass


@contextmanager
def burning(n: int) -> Iterator[None]:
    procs = [multiprocessing.Process(target=_burn, daemon=True) for _ in range(n)]
    for p in procs:
        p.start()
    try:
        yield
    finally:
        for p in procs:
            p.terminate()
            p.join()


COLUMNS = ("check", "first score", "score", "bm25", "search vector", "cpu vector",
           "search hybrid", "cpu hybrid", "embed", "whole vector", "whole hybrid")  # fmt: skip


def table(rows: Sequence[tuple[int, dict[str, float]]]) -> str:
    head = "| chunks | " + " | ".join(COLUMNS) + " |"
    lines = [head, "|---" * (len(COLUMNS) + 1) + "|"]
    for size, figures in rows:
        lines.append(f"| {size:,} | " + " | ".join(f"{figures[c]:.1f}" for c in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.search_bench", description=__doc__)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    default_dir = Path(tempfile.gettempdir()) / "embedd-search-bench"
    parser.add_argument("--dir", type=Path, default=default_dir, help="generated indexes")
    parser.add_argument("--queries", type=int, default=30)
    parser.add_argument("--burn", type=int, default=0, help="busy loops running meanwhile")
    parser.add_argument("--socket", type=Path, help="a running daemon (default: start one)")
    parser.add_argument("--generate-only", action="store_true", help="make the indexes, no timing")
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    daemon = None
    work = Path(tempfile.mkdtemp(prefix="embedd-sb"))
    try:
        socket = args.socket
        if socket is None:
            from tests.conftest import start_daemon

            daemon = start_daemon(work, "")
            socket = daemon.socket
        with embedd_client.Client(socket) as client:
            card = store.model_card(client, "default")
            dim = len(client.embed("dimension", "default"))
        fingerprint = model_fingerprint(card)
        rows = []
        for size in (int(s) for s in args.sizes.split(",")):
            db = args.dir / f"{size}-{fingerprint[:12]}.db"
            if not db.exists():
                generate(db, size, dim, "default", fingerprint)
            if args.generate_only:
                continue
            with burning(args.burn):
                figures = measure(db, socket, args.queries)
            rows.append((size, figures))
            print(f"{size:,}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in figures.items()),
                  file=sys.stderr)  # fmt: skip
        print(f"load average {os.getloadavg()[0]:.2f}; {args.burn} busy loops", file=sys.stderr)
        print(table(rows))
    finally:
        if daemon is not None:
            daemon.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
