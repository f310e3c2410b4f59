"""`embedd bench` runs its workloads against the real daemon and the in-process baseline and
reports figures; it asserts nothing about speed (these machines are shared and noisy)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import Daemon


def test_bench_quick_json_reports_every_workload_for_daemon_and_baseline(daemon: Daemon) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "embedd",
            "bench",
            "--socket",
            str(daemon.socket),
            "--quick",
            "--json",
            "--second-model",
            "prompted",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    report = json.loads(out.stdout)
    assert report["model"] == "default" and report["quick"] is True
    rows = {r["key"]: r for r in report["rows"]}
    assert set(rows) == {
        "bulk_chunks_per_s",
        "queries_per_s",
        "queries_p50_ms",
        "queries_p99_ms",
        "mixed_p50_ms",
        "mixed_p99_ms",
        "mixed_bulk_chunks_per_s",
        "idle_p50_ms",
        "idle_p99_ms",
        "flood_p50_ms",
        "flood_p99_ms",
        "busy_core_p50_ms",
        "busy_core_p99_ms",
        "busy_core_bulk_chunks_per_s",
        "rss_mb",
    }
    for key, row in rows.items():
        assert row["daemon"] > 0, key
        assert row["baseline"] > 0, key
        assert row["ratio"] == row["daemon"] / row["baseline"]
    assert report["mixed_queries"] > 0
    two = report["daemon"]["two_models"]
    assert two["one_model_chunks_per_s"] > 0 and two["two_models_chunks_per_s"] > 0


def test_bench_reports_each_replicas_busy_fraction_per_workload(daemon: Daemon) -> None:
    command = ["bench", "--socket", str(daemon.socket), "--quick", "--json", "--no-baseline"]
    out = subprocess.run(
        [sys.executable, "-m", "embedd", *command],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    extra = json.loads(out.stdout)["daemon"]
    busy = extra["replica_busy"]
    assert list(busy) == ["W1", "W2", "W3", "W4", "W5", "idle"]
    assert all(len(fractions) == extra["replicas"] for fractions in busy.values())
    assert all(f >= 0 for fractions in busy.values() for f in fractions)
    assert busy["W1"][0] > 0  # the lowest replica computed during bulk


def test_bench_without_daemon_says_so_and_exits_1(tmp_path: object) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "embedd",
            "bench",
            "--socket",
            "/nonexistent/e.sock",
            "--no-baseline",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert "not running" in out.stderr
