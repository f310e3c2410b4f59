"""The thread policy alone: what it chooses for given affinity, quota and run queue."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from embedd.inference.threads import (
    MAX_AUTO_THREADS,
    Machine,
    read_own_running,
    read_quota,
    read_running,
    threads_for_batch,
    usable_cpus,
)
from tests.conftest import Daemon, Reference, cosines, start_daemon, vectors


def test_an_idle_machine_gets_every_usable_core() -> None:
    assert threads_for_batch(Machine(affinity=2, quota=None, others=0)) == 2


def test_one_busy_core_leaves_one_thread() -> None:
    assert threads_for_batch(Machine(affinity=2, quota=None, others=1)) == 1


def test_a_saturated_machine_still_gets_one_thread() -> None:
    assert threads_for_batch(Machine(affinity=4, quota=None, others=39)) == 1


def test_the_affinity_mask_bounds_the_count_not_the_machines_cores() -> None:
    assert threads_for_batch(Machine(affinity=3, quota=None, others=0)) == 3


def test_a_cgroup_quota_is_floored_to_whole_cpus() -> None:
    assert usable_cpus(affinity=8, quota=1.5) == 1
    assert threads_for_batch(Machine(affinity=8, quota=2.0, others=0)) == 2


def test_the_automatic_count_is_capped() -> None:
    assert usable_cpus(affinity=64, quota=None) == MAX_AUTO_THREADS


def test_the_users_threads_setting_wins() -> None:
    busy = Machine(affinity=2, quota=None, others=8)
    assert threads_for_batch(busy, configured=2) == 2
    assert threads_for_batch(Machine(2, None, 0), configured=1) == 1


def test_a_gpu_offloaded_model_needs_one_thread() -> None:
    assert threads_for_batch(Machine(8, None, 0), gpu_offloaded=True) == 1


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
)
def test_the_cgroup_quota_is_read_from_v2_then_v1(
    tmp_path: Path, files: dict[str, str], expected: float | None
) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert read_quota(tmp_path) == expected


def test_the_run_queue_is_read_from_proc_stat(tmp_path: Path) -> None:
    (tmp_path / "stat").write_text("cpu  1 2 3\nprocs_running 3\nprocs_blocked 0\n")
    assert read_running(tmp_path / "stat") == 3
    assert read_running(tmp_path / "missing") is None


def test_our_own_running_threads_are_read_from_proc_self_task(tmp_path: Path) -> None:
    for tid, state in ((1, "R"), (2, "S"), (3, "R")):
        (tmp_path / str(tid)).mkdir()
        (tmp_path / str(tid) / "stat").write_text(f"{tid} (embedd model) {state} 1 2 3\n")
    assert read_own_running(tmp_path) == 2


def test_models_reports_automatic_threads_and_a_configured_count(daemon: Daemon) -> None:
    models = {m["name"]: m for m in daemon.call("models")["models"]}
    assert models["default"]["threads_auto"] is True
    assert models["default"]["threads"] >= 1


def test_a_configured_thread_count_is_what_the_batches_run_with(
    workdir: Path, own_daemon: list[Daemon]
) -> None:
    d = start_daemon(workdir, "[models.default]\npath = '{bundled}'\nthreads = 1\n")
    own_daemon.append(d)
    d.call("embed", input="count my threads")
    stats = d.call("stats")["models"]["default"]
    assert stats["threads"] == 1
    model = d.call("models")["models"][0]
    assert (model["threads"], model["threads_auto"]) == (1, False)


def test_two_models_driven_together_both_stay_correct(
    workdir: Path, own_daemon: list[Daemon], reference: Reference
) -> None:
    d = start_daemon(workdir, "[models.second]\npath = '{bundled}'\nmax_tokens = 256\n")
    own_daemon.append(d)
    results: dict[str, float] = {}

    def drive(model: str, lo: int) -> None:
        r = d.call("embed", model=model, input=reference.chunks[lo : lo + 40], timeout=300)
        results[model] = float(cosines(vectors(r), reference.c_vecs[lo : lo + 40]).min())

    threads = [
        threading.Thread(target=drive, args=("default", 0)),
        threading.Thread(target=drive, args=("second", 40)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert results["default"] >= 0.9999 and results["second"] >= 0.9999
