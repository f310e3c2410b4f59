"""`embedd bench`: the daemon against in-process llama-cpp-python, same model, threads and texts.

Speed is never asserted in a test on these shared, noisy machines; it is measured here, with
the raw baseline run in the same invocation, and reported as ratios. The daemon is measured
first (the bench process itself stays idle but for its client threads), then the baseline runs
in this process while the daemon sits idle.

Workloads (the corpus is the bundled sample of real text: Python standard-library docstrings):
- W1 bulk: every chunk, in requests of 32, one client: chunks/s.
- W2 queries: every query, one per request, 8 concurrent clients: requests/s, p50, p99.
- W3 mixed: W1 running while one client sends a query every 10 ms: the queries' p50, p99.
- W4 cache-hit flood: a bulk client re-sending chunks it already sent (the daemon answers them
  from its cache; its event loop is the busy part), while one client sends a query every
  10 ms: the queries' p50, p99. The baseline has no cache and computes them again.
- W5 busy core: a separate process keeps one core busy (an app working beside the daemon):
  one query at a time (p50, p99), then W1's throughput under that load.
- idle: one query at a time: p50, p99.
Plus the resident memory of the daemon and its model processes, and (daemon only) two models
driven together against one, each replica's busy fraction during each workload (from the
daemon's `stats`: its busy seconds over the workload's wall time), and W1's throughput while
W3's queries run (what leaving a core to queries costs bulk).

`--svg FILE` also draws the query latencies (idle, W3, W5; p50 and p99 of both sides) as one
SVG picture, written with the standard library only (`svg()`, a pure function of the report).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from xml.sax.saxutils import escape

import embedd_client

from ..inference.modelprocess import read_rss_bytes

CORPUS = Path(__file__).resolve().parent.parent / "bundled" / "bench_corpus.json"
BULK_BATCH = 32
CLIENTS = 8
MIXED_INTERVAL = 0.010


# W4's bulk client re-sends this many chunks for this long (seconds; quick runs are shorter).
FLOOD_CHUNKS = 64
FLOOD_SECONDS = 10.0
QUICK_FLOOD_SECONDS = 2.0


class Embedder(Protocol):
    """What a workload needs from a side: embed a list of texts, from any thread."""

    def embed(self, texts: list[str], *, cached: bool = False) -> None: ...


@dataclass
class Figures:
    bulk_chunks_per_s: float = 0.0
    queries_per_s: float = 0.0
    queries_p50_ms: float = 0.0
    queries_p99_ms: float = 0.0
    mixed_p50_ms: float = 0.0
    mixed_p99_ms: float = 0.0
    mixed_queries: int = 0
    mixed_bulk_chunks_per_s: float = 0.0
    idle_p50_ms: float = 0.0
    idle_p99_ms: float = 0.0
    flood_p50_ms: float = 0.0
    flood_p99_ms: float = 0.0
    busy_core_p50_ms: float = 0.0
    busy_core_p99_ms: float = 0.0
    busy_core_bulk_chunks_per_s: float = 0.0
    rss_mb: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class _Progress:
    """A one-line progress bar on a terminal; silent otherwise (pipes, CI, --json)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._lock = threading.Lock()
        self._label = ""
        self._total = 1
        self._done = 0

    def start(self, label: str, total: int) -> None:
        with self._lock:
            self._label, self._total, self._done = label, max(total, 1), 0
        self._draw()

    def advance(self, n: int = 1) -> None:
        with self._lock:
            self._done += n
        self._draw()

    def _draw(self) -> None:
        if not self.enabled:
            return
        width = 30
        filled = int(width * min(self._done, self._total) / self._total)
        bar = "#" * filled + "-" * (width - filled)
        sys.stderr.write(f"\r{self._label:<28} [{bar}] {self._done}/{self._total}")
        if self._done >= self._total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _pct(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def _bulk(side: Embedder, chunks: list[str], progress: _Progress, label: str) -> float:
    progress.start(label, len(chunks))
    started = time.perf_counter()
    for i in range(0, len(chunks), BULK_BATCH):
        batch = chunks[i : i + BULK_BATCH]
        side.embed(batch)
        progress.advance(len(batch))
    return len(chunks) / (time.perf_counter() - started)


def _queries(
    make_side: Callable[[], Embedder], queries: list[str], progress: _Progress, label: str
) -> tuple[float, list[float]]:
    progress.start(label, len(queries))
    latencies: list[float] = []
    lock = threading.Lock()
    next_index = iter(range(len(queries)))

    def client() -> None:
        side = make_side()
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            t0 = time.perf_counter()
            side.embed([queries[i]])
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)
            progress.advance()

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(queries) / (time.perf_counter() - started), latencies


def _mixed(
    bulk_side: Embedder,
    query_side: Embedder,
    chunks: list[str],
    queries: list[str],
    progress: _Progress,
    label: str,
) -> tuple[list[float], float]:
    """W3: the queries' latencies, and the bulk client's chunks/s meanwhile."""
    latencies: list[float] = []
    bulk_done = threading.Event()
    rate: list[float] = []

    def indexer() -> None:
        try:
            rate.append(_bulk(bulk_side, chunks, progress, label))
        finally:
            bulk_done.set()

    t = threading.Thread(target=indexer)
    t.start()
    k = 0
    next_at = time.perf_counter()
    while not bulk_done.is_set():
        t0 = time.perf_counter()
        query_side.embed([queries[k % len(queries)]])
        latencies.append(time.perf_counter() - t0)
        k += 1
        next_at += MIXED_INTERVAL
        time.sleep(max(0.0, next_at - time.perf_counter()))
        next_at = max(next_at, time.perf_counter())
    t.join()
    return latencies, rate[0] if rate else 0.0


def _flood(
    flood_side: Embedder,
    query_side: Embedder,
    chunks: list[str],
    queries: list[str],
    seconds: float,
) -> list[float]:
    """W4: queries every 10 ms while another client re-sends texts it already sent."""
    texts = chunks[:FLOOD_CHUNKS]
    for i in range(0, len(texts), BULK_BATCH):  # sent once before: from now on cache hits
        flood_side.embed(texts[i : i + BULK_BATCH], cached=True)
    stop = threading.Event()

    def flooder() -> None:
        while not stop.is_set():
            for i in range(0, len(texts), BULK_BATCH):
                flood_side.embed(texts[i : i + BULK_BATCH], cached=True)

    t = threading.Thread(target=flooder)
    t.start()
    latencies = []
    end = time.perf_counter() + seconds
    k = 0
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        query_side.embed([queries[k % len(queries)]])
        latencies.append(time.perf_counter() - t0)
        k += 1
        time.sleep(max(0.0, MIXED_INTERVAL - (time.perf_counter() - t0)))
    stop.set()
    t.join()
    return latencies


class _BusyCore:
    """A separate process spinning on one core for as long as the context lasts."""

    def __enter__(self) -> _BusyCore:
        import subprocess

        self._proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.3)  # let it reach the run queue
        return self

    def __exit__(self, *exc: object) -> None:
        self._proc.kill()
        self._proc.wait()


def _idle(side: Embedder, queries: list[str], progress: _Progress, label: str) -> list[float]:
    progress.start(label, len(queries))
    latencies = []
    for q in queries:
        t0 = time.perf_counter()
        side.embed([q])
        latencies.append(time.perf_counter() - t0)
        progress.advance()
    return latencies


class _ReplicaMeter:
    """Each replica's busy fraction over a workload: the daemon's busy seconds per replica
    (`stats`) before and after, over the wall time between."""

    def __init__(self, read: Callable[[], list[float]]) -> None:
        self._read = read
        self.fractions: dict[str, list[float]] = {}
        self._mark: tuple[float, list[float]] = (time.perf_counter(), read())

    def lap(self, workload: str) -> None:
        now, busy = time.perf_counter(), self._read()
        then, before = self._mark
        self.fractions[workload] = [
            round((b - a) / (now - then), 3) for a, b in zip(before, busy, strict=False)
        ]
        self._mark = (now, busy)


def run_workloads(
    make_side: Callable[[], Embedder],
    chunks: list[str],
    queries: list[str],
    idle_queries: list[str],
    progress: _Progress,
    name: str,
    replica_busy: Callable[[], list[float]] | None = None,
) -> Figures:
    f = Figures()
    side = make_side()
    side.embed(queries[:8])  # warm up: the model is loaded and its buffers allocated
    meter = _ReplicaMeter(replica_busy or list)
    f.bulk_chunks_per_s = _bulk(side, chunks, progress, f"{name} W1 bulk")
    meter.lap("W1")
    rate, lat = _queries(make_side, queries, progress, f"{name} W2 queries")
    f.queries_per_s = rate
    f.queries_p50_ms = _pct(lat, 50) * 1000
    f.queries_p99_ms = _pct(lat, 99) * 1000
    meter.lap("W2")
    mixed, f.mixed_bulk_chunks_per_s = _mixed(
        side, make_side(), chunks, queries, progress, f"{name} W3 mixed"
    )
    f.mixed_p50_ms = _pct(mixed, 50) * 1000
    f.mixed_p99_ms = _pct(mixed, 99) * 1000
    f.mixed_queries = len(mixed)
    meter.lap("W3")
    seconds = QUICK_FLOOD_SECONDS if len(chunks) < FLOOD_CHUNKS * 2 else FLOOD_SECONDS
    flood = _flood(make_side(), make_side(), chunks, queries, seconds)
    f.flood_p50_ms = _pct(flood, 50) * 1000
    f.flood_p99_ms = _pct(flood, 99) * 1000
    meter.lap("W4")
    with _BusyCore():
        busy = _idle(side, idle_queries, progress, f"{name} W5 busy core")
        f.busy_core_p50_ms = _pct(busy, 50) * 1000
        f.busy_core_p99_ms = _pct(busy, 99) * 1000
        f.busy_core_bulk_chunks_per_s = _bulk(side, chunks, progress, f"{name} W5 W1 busy core")
    meter.lap("W5")
    idle = _idle(side, idle_queries, progress, f"{name} idle")
    f.idle_p50_ms = statistics.median(idle) * 1000
    f.idle_p99_ms = _pct(idle, 99) * 1000
    meter.lap("idle")
    if replica_busy is not None:
        f.extra["replica_busy"] = meter.fractions
    return f


# --- the two sides ---------------------------------------------------------------------------


class _DaemonSide:
    """One connection per side object: each benchmark client is its own client."""

    def __init__(self, path: Path | None, model: str) -> None:
        self._client = embedd_client.Client(path, timeout=600.0)
        self._model = model

    def embed(self, texts: list[str], *, cached: bool = False) -> None:
        # cache=False unless asked: every run computes every vector, as the baseline does.
        self._client.embed(texts, self._model, cache=cached)


class _BaselineSide:
    """llama-cpp-python in this process, behind one lock (a Llama context is single-threaded)."""

    def __init__(self, llm: Any, lock: threading.Lock) -> None:
        self._llm = llm
        self._lock = lock

    def embed(self, texts: list[str], *, cached: bool = False) -> None:
        with self._lock:  # no cache in-process: `cached` texts are computed again
            self._llm.embed(texts, normalize=True)


def _two_models(
    socket: Path | None, first: str, second: str, chunks: list[str], progress: _Progress
) -> dict[str, float]:
    """W1 on one model alone, then on two models at once (each its own client): chunks/s."""
    with embedd_client.Client(socket, timeout=600.0) as client:
        client.load(second)
    alone = _bulk(_DaemonSide(socket, first), chunks, progress, "one model W1")
    rates: dict[str, float] = {}

    def run_one(name: str) -> None:
        rates[name] = _bulk(_DaemonSide(socket, name), chunks, progress, f"{name} W1 (two)")

    threads = [threading.Thread(target=run_one, args=(m,)) for m in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"one_model_chunks_per_s": alone, "two_models_chunks_per_s": sum(rates.values())}


def _settings(info: dict[str, Any]) -> str:
    """The daemon's threads and replicas settings as the bench ran them."""
    threads = "auto" if info.get("threads_auto") else info.get("threads")
    replicas = (
        f"auto ({info.get('replicas')})" if info.get("replicas_auto") else info.get("replicas")
    )
    return f"threads {threads}, replicas {replicas}"


def _rss_mb(pid: int) -> float | None:
    rss = read_rss_bytes(pid)
    return None if rss is None else rss / 2**20


def _load_corpus(quick: bool) -> tuple[list[str], list[str]]:
    data = json.loads(CORPUS.read_text())
    chunks: list[str] = data["chunks"]
    queries: list[str] = data["queries"]
    if quick:
        return chunks[:32], queries[:64]
    return chunks, queries


def run(
    socket: Path | None,
    model: str = "default",
    *,
    quick: bool = False,
    baseline: bool = True,
    as_json: bool = False,
    second: str | None = None,
    svg_path: Path | None = None,
) -> int:
    chunks, queries = _load_corpus(quick)
    # What else the machine was doing when the run began: figures mean little without it.
    load_average = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    idle_queries = queries[: 20 if quick else 200]
    progress = _Progress(enabled=sys.stderr.isatty() and not as_json)
    with embedd_client.Client(socket, timeout=600.0) as client:
        hello = client.hello()
        info = client.load(model)
    path, threads = info["path"], int(info["threads"])
    pid = int(hello["pid"])
    stats_client = embedd_client.Client(socket, timeout=600.0)

    def replica_busy() -> list[float]:
        stats = stats_client.stats()["models"].get(model, {})
        return [float(r["busy_seconds"]) for r in stats.get("replicas", [])]

    daemon = run_workloads(
        lambda: _DaemonSide(socket, model),
        chunks,
        queries,
        idle_queries,
        progress,
        "daemon",
        replica_busy,
    )
    # The daemon and its model processes, where llama.cpp and the weights live.
    processes = [m.get("process", {}).get("pid") for m in stats_client.stats()["models"].values()]
    stats_client.close()
    sizes = [_rss_mb(p) for p in [pid, *processes] if isinstance(p, int)]
    daemon.rss_mb = sum(s for s in sizes if s is not None) if sizes else None
    daemon.extra.update(
        server=hello["server"], pid=pid, replicas=info.get("replicas"), settings=_settings(info)
    )
    if second is not None:
        daemon.extra["two_models"] = _two_models(socket, model, second, chunks, progress)

    base: Figures | None = None
    if baseline:
        from llama_cpp import Llama  # only the baseline needs llama.cpp in this process

        llm = Llama(
            model_path=path,
            embedding=True,
            n_threads=threads,
            n_threads_batch=threads,
            n_ctx=512,
            n_batch=512,
            n_ubatch=512,
            flash_attn=True,
            verbose=False,
        )
        lock = threading.Lock()
        base = run_workloads(
            lambda: _BaselineSide(llm, lock), chunks, queries, idle_queries, progress, "baseline"
        )
        base.rss_mb = _rss_mb(os.getpid())
        del llm

    report = _report(daemon, base, model=model, path=path, threads=threads, quick=quick)
    report["load_average"] = load_average
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print(_table(report))
    if svg_path is not None:
        picture = svg(report, cpu=cpu_description(), date=datetime.date.today().isoformat())
        svg_path.write_text(picture)
        print(f"embedd bench: wrote the query latencies to {svg_path}", file=sys.stderr)
    return 0


def _report(
    daemon: Figures, base: Figures | None, *, model: str, path: str, threads: int, quick: bool
) -> dict[str, Any]:
    rows = [
        ("W1 bulk, 32 per request, 1 client", "chunks/s", "bulk_chunks_per_s", True),
        ("W2 queries, 8 clients", "requests/s", "queries_per_s", True),
        ("W2 queries, 8 clients", "p50 ms", "queries_p50_ms", False),
        ("W2 queries, 8 clients", "p99 ms", "queries_p99_ms", False),
        ("W3 query every 10 ms during W1", "p50 ms", "mixed_p50_ms", False),
        ("W3 query every 10 ms during W1", "p99 ms", "mixed_p99_ms", False),
        ("W3 W1 bulk while those queries run", "chunks/s", "mixed_bulk_chunks_per_s", True),
        ("W4 queries during a cache-hit flood", "p50 ms", "flood_p50_ms", False),
        ("W4 queries during a cache-hit flood", "p99 ms", "flood_p99_ms", False),
        ("W5 one query at a time, busy core", "p50 ms", "busy_core_p50_ms", False),
        ("W5 one query at a time, busy core", "p99 ms", "busy_core_p99_ms", False),
        ("W5 W1 bulk with a busy core", "chunks/s", "busy_core_bulk_chunks_per_s", True),
        ("idle, one query at a time", "p50 ms", "idle_p50_ms", False),
        ("idle, one query at a time", "p99 ms", "idle_p99_ms", False),
        ("resident memory", "MB", "rss_mb", False),
    ]
    out_rows = []
    for workload, unit, key, higher_is_better in rows:
        d = getattr(daemon, key)
        b = getattr(base, key) if base is not None else None
        ratio = d / b if d is not None and b else None
        out_rows.append(
            {
                "workload": workload,
                "unit": unit,
                "key": key,
                "daemon": d,
                "baseline": b,
                "ratio": ratio,
                "higher_is_better": higher_is_better,
            }
        )
    return {
        "model": model,
        "path": path,
        "threads": threads,
        "quick": quick,
        "mixed_queries": daemon.mixed_queries,
        "baseline": "llama-cpp-python in-process, one Llama behind a lock, flash_attn, "
        "n_batch=n_ubatch=512",
        "rows": out_rows,
        "daemon": daemon.extra,
    }


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.1f}" if value >= 10 else f"{value:.2f}"


def _table(report: dict[str, Any]) -> str:
    lines = [
        f"embedd bench: model {report['model']}, {report['threads']} threads"
        + (" (quick)" if report["quick"] else ""),
        f"baseline: {report['baseline']} (memory: the bench process)",
        "",
        f"{'workload':<34} {'unit':<11} {'daemon':>9} {'baseline':>9} {'ratio':>7}",
    ]
    for r in report["rows"]:
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"
        lines.append(
            f"{r['workload']:<34} {r['unit']:<11} {_fmt(r['daemon']):>9} "
            f"{_fmt(r['baseline']):>9} {ratio:>7}"
        )
    busy = report["daemon"].get("replica_busy")
    if busy:
        lines.append(
            f"daemon: {report['daemon'].get('settings')}; each replica's busy fraction per "
            "workload:"
        )
        for workload, fractions in busy.items():
            lines.append(f"  {workload:<5} " + " ".join(f"{f:.2f}" for f in fractions))
    two = report["daemon"].get("two_models")
    if two:
        lines.append(
            f"two models driven together: {two['two_models_chunks_per_s']:.1f} chunks/s in all, "
            f"one alone: {two['one_model_chunks_per_s']:.1f} chunks/s"
        )
    return "\n".join(lines)


# --- the picture ----------------------------------------------------------------------------

# What the picture compares: where a desktop feels the difference, a query's wait.
SVG_SITUATIONS = (
    ("idle", "one query at a time, nothing else running", "idle_p50_ms", "idle_p99_ms"),
    ("during bulk", "W3: a query every 10 ms while W1 indexes", "mixed_p50_ms", "mixed_p99_ms"),
    (
        "busy core",
        "W5: one query at a time while another process keeps a core busy",
        "busy_core_p50_ms",
        "busy_core_p99_ms",
    ),
)
SVG_SIDES = (
    ("daemon", "embedd daemon", "#9ecae1", "#2171b5"),
    ("baseline", "in-process llama-cpp-python", "#fdae6b", "#d94801"),
)
_WIDTH = 820
_PLOT_LEFT = 230  # room for the row labels
_PLOT_RIGHT = 660  # room for the value labels after the longest bar
_ROW = 22
_BAR = 14


def cpu_description() -> str:
    """The CPU the bench ran on, for the picture's caption: model name and usable cores."""
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    name = name or platform.processor() or platform.machine() or "unknown CPU"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name}, {cores} cores usable"


def _decades(values: Sequence[float]) -> tuple[int, int]:
    """The powers of ten around the values: a log axis, since the sides differ by up to 1000x."""
    low = min(values)
    high = max(values)
    first = math.floor(math.log10(low))
    last = max(math.ceil(math.log10(high)), first + 1)
    return first, last


def _load_note(load: Any) -> str:
    return f", load average {load:.1f} at the start" if isinstance(load, int | float) else ""


def _ms(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def svg(report: dict[str, Any], *, cpu: str, date: str) -> str:
    """The query latencies of `report` (what `_report` returns) as an SVG document: for each
    situation in SVG_SITUATIONS a bar per side, its length the p99 and its dark part the p50,
    on a logarithmic axis in milliseconds. Sides without figures (no baseline) are left out."""
    rows = {r["key"]: r for r in report["rows"]}
    sides = [side for side in SVG_SIDES if rows["idle_p50_ms"].get(side[0]) is not None]
    values = [
        float(rows[key][side[0]])
        for _s, _t, p50, p99 in SVG_SITUATIONS
        for key in (p50, p99)
        for side in sides
    ]
    first, last = _decades([v for v in values if v > 0] or [1.0])

    def x(value: float) -> float:
        span = _PLOT_RIGHT - _PLOT_LEFT
        clamped = min(max(value, 10.0**first), 10.0**last)
        return _PLOT_LEFT + span * (math.log10(clamped) - first) / (last - first)

    top = 96
    group_height = _ROW * len(sides) + 26
    bottom = top + group_height * len(SVG_SITUATIONS)
    height = bottom + 44
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{height}" '
        f'viewBox="0 0 {_WIDTH} {height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{_WIDTH}" height="{height}" fill="#ffffff"/>',
        '<text x="16" y="26" font-size="16" font-weight="bold">Query latency: embedd against '
        "llama-cpp-python in the client's own process</text>",
        f'<text x="16" y="46" fill="#444444">embedd bench, {escape(date)}, {escape(cpu)}'
        f"{_load_note(report.get('load_average'))}</text>",
        f'<text x="16" y="64" fill="#444444">model {escape(str(report["model"]))}, '
        f"{report['threads']} threads{' (quick)' if report.get('quick') else ''}; "
        "bar: 99th percentile, dark part: median; milliseconds, log scale</text>",
    ]
    legend_x = 16
    for _key, label, light, dark in sides:
        out.append(f'<rect x="{legend_x}" y="74" width="10" height="10" fill="{dark}"/>')
        out.append(f'<rect x="{legend_x + 10}" y="74" width="10" height="10" fill="{light}"/>')
        out.append(f'<text x="{legend_x + 26}" y="83">{escape(label)}</text>')
        legend_x += 40 + 7 * len(label)
    for exponent in range(first, last + 1):
        tick = x(10.0**exponent)
        out.append(
            f'<line x1="{tick:.1f}" y1="{top - 4}" x2="{tick:.1f}" y2="{bottom}" stroke="#dddddd"/>'
        )
        out.append(
            f'<text x="{tick:.1f}" y="{bottom + 16}" text-anchor="middle" fill="#444444">'
            f"{_ms(10.0**exponent)} ms</text>"
        )
    y = top
    for short, title, p50_key, p99_key in SVG_SITUATIONS:
        out.append(
            f'<text x="16" y="{y + 12}"><tspan font-weight="bold">{escape(short)}</tspan>'
            f'<tspan dx="8" fill="#666666">{escape(title)}</tspan></text>'
        )
        y += 18
        for key, label, light, dark in sides:
            p50 = float(rows[p50_key][key])
            p99 = float(rows[p99_key][key])
            for value, colour, which in ((p99, light, "p99"), (p50, dark, "p50")):
                width = max(x(value) - _PLOT_LEFT, 1.0)
                out.append(
                    f'<rect x="{_PLOT_LEFT}" y="{y + (_ROW - _BAR) / 2:.1f}" '
                    f'width="{width:.1f}" height="{_BAR}" fill="{colour}">'
                    f"<title>{escape(label)}, {escape(short)}: {which} {_ms(value)} ms</title>"
                    "</rect>"
                )
            out.append(
                f'<text x="{_PLOT_LEFT - 8}" y="{y + 15}" text-anchor="end">{escape(label)}</text>'
            )
            out.append(
                f'<text x="{x(p99) + 6:.1f}" y="{y + 15}" fill="#333333">'
                f"{_ms(p50)} / {_ms(p99)} ms</text>"
            )
            y += _ROW
        y += group_height - 18 - _ROW * len(sides)
    out.append(
        f'<text x="16" y="{height - 10}" font-size="10" fill="#666666">'
        "labels: median / 99th percentile. Same model file, threads and texts on both sides; "
        "in-process: one Llama behind a lock.</text>"
    )
    out.append("</svg>")
    return "\n".join(out) + "\n"
