"""What an operator sees: `embedd status`, the Prometheus metrics file, JSON logs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from embedd.inference.cache import CacheKey, Entry, VectorCache
from embedd.wire.options import VectorOptions
from tests.conftest import Daemon, start_daemon


def test_status_shows_latency_busy_fraction_and_connections(daemon: Daemon) -> None:
    daemon.call("embed", input=["count this", "and this"])
    out = subprocess.run(
        [sys.executable, "-m", "embedd", "status", "--socket", str(daemon.socket)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert "timed out" in out.stdout and "MB resident" in out.stdout
    assert "model processes" in out.stdout  # where llama.cpp and the weights live
    assert "WAIT ms p50/p95/p99" in out.stdout and "BUSY" in out.stdout
    report = json.loads(
        subprocess.run(
            [sys.executable, "-m", "embedd", "status", "--json", "--socket", str(daemon.socket)],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout
    )  # fmt: skip
    model = report["stats"]["models"]["default"]
    assert set(model["latency_ms"]) == {"queue_wait", "compute", "total"}
    assert 0 <= model["busy_fraction"] <= 1 and model["loads"] >= 1
    assert report["stats"]["rss_bytes"] > 10_000_000


def test_the_metrics_file_is_written_atomically_in_prometheus_text(
    workdir: Path, own_daemon: list[Daemon]
) -> None:
    path = workdir / "metrics" / "embedd.prom"
    d = start_daemon(workdir, "metrics_every = 1\n", extra_args=("--metrics-file", str(path)))
    own_daemon.append(d)
    d.call("embed", input="something to count")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if path.exists() and 'embedd_model_inputs_total{model="default"} 1' in path.read_text():
            break
        time.sleep(0.2)
    text = path.read_text()
    assert "# TYPE embedd_requests_total counter" in text
    assert 'embedd_model_inputs_total{model="default"} 1' in text
    assert not list(path.parent.glob(".*.tmp"))  # written beside, then renamed


def test_json_logs_are_one_object_per_line(workdir: Path, own_daemon: list[Daemon]) -> None:
    d = start_daemon(workdir, extra_args=("--log-format", "json"))
    own_daemon.append(d)
    d.call("load")
    d.stop()
    lines = [line for line in d.log().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]
    assert {"time", "level", "logger", "message"} <= set(entries[0])
    assert any("serving on" in e["message"] for e in entries)


def test_the_cache_counts_bytes_not_characters() -> None:
    cache = VectorCache(max_bytes=10_000)
    vec = __import__("numpy").zeros(4, "float32")
    key = CacheKey("f", 256, "mean", "", "é" * 1000, VectorOptions())
    cache.put(key, Entry(vec, 3, False))
    assert cache.bytes >= 2000 + vec.nbytes  # 1,000 characters, 2,000 bytes of UTF-8


def test_the_model_process_figures_are_metrics() -> None:
    from embedd.http import metrics

    text = metrics.render(
        {"models": {"q8": {"process": {"crashes": 2, "restarts": 2, "rss_bytes": 1024}}}}
    )
    assert 'embedd_model_process_crashes_total{model="q8"} 2' in text
    assert 'embedd_model_process_restarts_total{model="q8"} 2' in text
    assert 'embedd_model_process_resident_bytes{model="q8"} 1024' in text
