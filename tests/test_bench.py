"""`embedd bench` runs its workloads against the real daemon and the in-process baseline and
reports figures; it asserts nothing about speed (these machines are shared and noisy)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any
from xml.etree import ElementTree

import pytest

from tests.conftest import Daemon


@pytest.fixture(scope="module")
def quick_report(daemon: Daemon) -> dict[str, Any]:
    """One quick run for this file's tests: a whole run, even a quick one, is the file's cost."""
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
    report: dict[str, Any] = json.loads(out.stdout)
    return report


def test_bench_quick_json_reports_every_workload_for_daemon_and_baseline(
    quick_report: dict[str, Any],
) -> None:
    report = quick_report
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


def test_bench_with_a_second_model_reports_one_model_against_two(
    quick_report: dict[str, Any],
) -> None:
    two = quick_report["daemon"]["two_models"]
    assert two["one_model_chunks_per_s"] > 0 and two["two_models_chunks_per_s"] > 0


def test_bench_reports_each_replicas_busy_fraction_per_workload(
    quick_report: dict[str, Any],
) -> None:
    extra = quick_report["daemon"]
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


# --- the picture (`embedd bench --svg`): a pure function of the report --------------------------

SVG = "{http://www.w3.org/2000/svg}"


def _figures_report(*, baseline: bool = True) -> dict[str, Any]:
    from embedd.cli.bench import Figures, _report

    daemon = Figures(
        idle_p50_ms=3.86, idle_p99_ms=19.8, mixed_p50_ms=8.65, mixed_p99_ms=35.6,
        busy_core_p50_ms=8.13, busy_core_p99_ms=36.4,
    )  # fmt: skip
    base = Figures(
        idle_p50_ms=3.03, idle_p99_ms=17.8, mixed_p50_ms=1116.0, mixed_p99_ms=2084.8,
        busy_core_p50_ms=10.2, busy_core_p99_ms=162.3,
    )  # fmt: skip
    return _report(
        daemon, base if baseline else None, model="default", path="m.gguf", threads=2, quick=False
    )


def _bars(picture: str) -> dict[str, float]:
    """Each bar's tooltip (`side, situation: p50 N ms`) -> its width."""
    root = ElementTree.fromstring(picture)
    return {
        title.text or "": float(rect.attrib["width"])
        for rect in root.iter(f"{SVG}rect")
        if (title := rect.find(f"{SVG}title")) is not None
    }


def test_the_svg_is_well_formed_and_names_its_date_and_cpu() -> None:
    from embedd.cli.bench import svg

    picture = svg(_figures_report(), cpu="Xeon <AMX> & co, 2 cores usable", date="2026-12-05")
    root = ElementTree.fromstring(picture)
    text = " ".join(t.text or "" for t in root.iter(f"{SVG}text"))
    assert root.tag == f"{SVG}svg"
    assert "2026-12-05" in text and "Xeon <AMX> & co, 2 cores usable" in text


def test_the_svg_draws_p50_and_p99_of_each_situation_for_both_sides() -> None:
    from embedd.cli.bench import svg

    bars = _bars(svg(_figures_report(), cpu="cpu", date="2026-12-05"))
    assert set(bars) == {
        f"{side}, {situation}: {which} {value} ms"
        for side, figures in (
            ("embedd daemon", (("3.86", "19.8"), ("8.65", "35.6"), ("8.13", "36.4"))),
            (
                "in-process llama-cpp-python",
                (("3.03", "17.8"), ("1,116", "2,085"), ("10.2", "162")),
            ),
        )
        for situation, (p50, p99) in zip(("idle", "during bulk", "busy core"), figures, strict=True)
        for which, value in (("p50", p50), ("p99", p99))
    }


def test_the_svg_bars_are_ordered_as_their_latencies() -> None:
    from embedd.cli.bench import svg

    bars = _bars(svg(_figures_report(), cpu="cpu", date="2026-12-05"))
    widths = [width for _title, width in sorted(bars.items(), key=lambda kv: _ms_of(kv[0]))]
    assert widths == sorted(widths)


def _ms_of(title: str) -> float:
    return float(title.rsplit(" ", 2)[1].replace(",", ""))


def test_the_svg_without_a_baseline_draws_only_the_daemon() -> None:
    from embedd.cli.bench import svg

    bars = _bars(svg(_figures_report(baseline=False), cpu="cpu", date="2026-12-05"))
    assert len(bars) == 6 and all(title.startswith("embedd daemon,") for title in bars)


def test_the_svg_gives_the_load_average_the_run_started_with() -> None:
    from embedd.cli.bench import svg

    report = {**_figures_report(), "load_average": 1.25}
    root = ElementTree.fromstring(svg(report, cpu="cpu", date="2026-12-05"))
    assert any("load average 1.2" in (t.text or "") for t in root.iter(f"{SVG}text"))
