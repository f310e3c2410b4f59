"""The replica and core-budget policy alone: what it chooses for given cores, quota, load and
traffic; then the budget shared by threads, and the daemon running with it."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from embedd.config import Config, ModelConfig, fit_to_cores
from embedd.inference.budget import CoreBudget
from embedd.inference.threads import (
    INTERACTIVE_RECENT,
    MAX_AUTO_REPLICAS,
    MAX_AUTO_THREADS,
    Launch,
    Machine,
    machine_cpus,
    read_busy_cpu_seconds,
    read_quota,
    read_thread_cpu_ns,
    replicas_for,
    threads_for_launch,
    usable_cpus,
    whole_cores,
)
from tests.conftest import Daemon, Reference, cosines, short_tmpdir, start_daemon, vectors

IDLE_2 = Machine(affinity=2, quota=None, others=0)
QUERY = Launch(interactive=True)
BULK = Launch(interactive=False)


def launch(machine: Machine, in_use: int, what: Launch, *, recent: bool = False) -> int:
    return threads_for_launch(machine, in_use, what, interactive_recent=recent)


# --- replicas -----------------------------------------------------------------------------------


def test_a_model_gets_one_replica_per_usable_core() -> None:
    assert replicas_for(2) == 2
    assert replicas_for(1) == 1


def test_automatic_replicas_are_capped() -> None:
    assert replicas_for(64) == MAX_AUTO_REPLICAS


def test_fixed_threads_divide_the_cores_into_replicas() -> None:
    assert replicas_for(8, threads=2) == 4
    assert replicas_for(2, threads=4) == 1


def test_a_configured_replica_count_wins() -> None:
    assert replicas_for(2, configured=4) == 4


def test_a_gpu_offloaded_model_gets_one_replica() -> None:
    assert replicas_for(16, gpu_offloaded=True) == 1


# --- threads per batch --------------------------------------------------------------------------


def test_a_lone_query_on_an_idle_machine_gets_every_usable_core() -> None:
    assert launch(IDLE_2, 0, QUERY) == 2


def test_bulk_batches_starting_together_split_the_free_cores() -> None:
    assert launch(IDLE_2, 0, Launch(interactive=False, share=2)) == 1
    assert launch(Machine(8, None, 0), 0, Launch(interactive=False, share=4)) == 2


def test_a_batch_takes_the_cores_the_running_ones_leave() -> None:
    assert launch(Machine(4, None, 0), 1, BULK) == 3


def test_one_busy_core_leaves_one_thread() -> None:
    assert launch(Machine(2, None, 1), 0, QUERY) == 1


def test_a_saturated_machine_still_gives_a_query_one_thread() -> None:
    assert launch(Machine(4, None, 39), 0, QUERY) == 1


def test_a_query_does_not_wait_for_other_processes() -> None:
    assert launch(Machine(2, None, 5), 1, QUERY) == 1


def test_bulk_waits_while_our_decodes_and_others_fill_the_cores() -> None:
    assert launch(Machine(2, None, 1), 1, BULK) == 0


def test_bulk_always_runs_when_nothing_of_ours_does() -> None:
    assert launch(Machine(2, None, 5), 0, BULK) == 1


def test_our_threads_never_exceed_the_usable_cores() -> None:
    assert launch(IDLE_2, 2, QUERY) == 0
    assert launch(Machine(8, 2.0, 0), 2, QUERY) == 0


def test_while_queries_are_recent_bulk_leaves_a_core_free() -> None:
    assert launch(IDLE_2, 0, BULK, recent=True) == 1
    assert launch(IDLE_2, 1, BULK, recent=True) == 0


def test_the_reserved_core_goes_to_the_query() -> None:
    assert launch(IDLE_2, 1, QUERY, recent=True) == 1


def test_without_recent_queries_bulk_uses_every_core() -> None:
    assert launch(IDLE_2, 1, BULK) == 1


def test_the_affinity_mask_bounds_the_count_not_the_machines_cores() -> None:
    assert launch(Machine(affinity=3, quota=None, others=0), 0, QUERY) == 3


def test_a_cgroup_quota_is_floored_to_whole_cpus() -> None:
    assert usable_cpus(affinity=8, quota=1.5) == 1
    assert launch(Machine(affinity=8, quota=2.0, others=0), 0, QUERY) == 2


def test_the_automatic_count_is_capped() -> None:
    assert usable_cpus(affinity=64, quota=None) == MAX_AUTO_THREADS


def test_the_users_threads_setting_wins_within_the_budget() -> None:
    fixed = Launch(interactive=False, configured=2)
    assert launch(Machine(2, None, 8), 0, fixed) == 2
    assert launch(IDLE_2, 1, fixed) == 0
    assert launch(IDLE_2, 1, Launch(interactive=True, configured=1)) == 1


def test_a_threads_setting_above_the_cores_runs_on_the_cores() -> None:
    assert launch(IDLE_2, 0, Launch(interactive=True, configured=1024)) == 2
    assert launch(Machine(8, 2.5, 0), 0, Launch(interactive=False, configured=4)) == 2


def test_threads_and_replicas_above_the_cores_are_cut_to_them_each_with_a_note() -> None:
    models = {
        "big": ModelConfig("big", Path("m.gguf"), threads=1024, replicas=256),
        "fits": ModelConfig("fits", Path("m.gguf"), threads=2, replicas=2),
        "auto": ModelConfig("auto", Path("m.gguf")),
    }
    fitted, notes = fit_to_cores(Config(socket=Path("s"), models=models), cores=2)
    assert fitted.models["big"].threads == fitted.models["big"].replicas == 2
    assert fitted.models["fits"] == models["fits"] and fitted.models["auto"] == models["auto"]
    assert notes == [
        "model 'big': threads = 1024 is more than the 2 usable cores (the affinity mask and "
        "the cgroup quota); using 2",
        "model 'big': replicas = 256 is more than the 2 usable cores (the affinity mask and "
        "the cgroup quota); using 2",
    ]


def test_only_the_wide_thread_borrows_cores() -> None:
    assert launch(IDLE_2, 0, Launch(interactive=True, wide=False)) == 1
    assert launch(Machine(8, None, 0), 0, Launch(interactive=False, share=2, wide=False)) == 1


def test_a_gpu_offloaded_model_needs_one_thread() -> None:
    assert launch(Machine(8, None, 0), 0, Launch(interactive=True, gpu_offloaded=True)) == 1


# --- what counts as competition ----------------------------------------------------------------


def test_a_load_counts_a_core_once_it_is_busy_more_than_half_the_window() -> None:
    assert whole_cores(0.06, 0.1) == 1
    assert whole_cores(0.04, 0.1) == 0
    assert whole_cores(0.16, 0.1) == 2
    assert whole_cores(-0.01, 0.1) == 0  # ticks counted on either side of the window


def test_the_machines_busy_cpu_time_is_read_from_proc_stat(tmp_path: Path) -> None:
    # user nice system idle iowait irq softirq steal: idle and iowait are not busy.
    (tmp_path / "stat").write_text("cpu  100 0 50 9000 400 5 5 40 0 0\nprocs_running 3\n")
    ticks = 100 + 50 + 5 + 5 + 40
    assert read_busy_cpu_seconds(tmp_path / "stat") == ticks / os.sysconf("SC_CLK_TCK")
    assert read_busy_cpu_seconds(tmp_path / "missing") is None


def test_a_threads_cpu_time_is_read_from_its_schedstat(tmp_path: Path) -> None:
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "schedstat").write_text("123456789 2000 30\n")
    assert read_thread_cpu_ns(7, tmp_path) == 123456789
    assert read_thread_cpu_ns(8, tmp_path) is None


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


# --- the budget shared by every model's threads -------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def budget(cores: int = 2, clock: Clock | None = None) -> CoreBudget:
    return CoreBudget(clock or Clock(), sample=lambda: Machine(cores, None, 0))


def test_the_budget_counts_the_threads_it_granted_until_released() -> None:
    b = budget()
    assert b.acquire("a", Launch(False, share=2), lambda: None) == 1
    assert b.acquire("b", BULK, lambda: None) == 1
    assert b.in_use == 2
    b.release("a", 1)
    assert b.in_use == 1


def test_a_refused_model_is_woken_when_cores_come_free() -> None:
    b = budget()
    woken: list[str] = []
    assert b.acquire("a", QUERY, lambda: None) == 2
    assert b.acquire("b", QUERY, lambda: woken.append("b")) == 0
    assert woken == []
    b.release("a", 2)
    assert woken == ["b"]


def test_two_workers_of_one_model_refused_at_once_are_both_woken() -> None:
    """While a model reloads, its old worker and its new one share the model's name: each
    wake-up is its worker's own, so neither is lost."""
    b = budget()
    woken: list[str] = []
    assert b.acquire("a", QUERY, lambda: None) == 2
    assert b.acquire("m", QUERY, lambda: woken.append("old worker")) == 0
    assert b.acquire("m", QUERY, lambda: woken.append("new worker")) == 0
    b.release("a", 2)
    assert sorted(woken) == ["new worker", "old worker"]


def test_two_models_computing_at_once_are_the_peak_the_budget_reports() -> None:
    b = budget()
    b.acquire("a", Launch(False, share=2), lambda: None)
    b.acquire("b", BULK, lambda: None)
    snap = b.snapshot()
    assert (snap["peak_models_computing"], snap["peak_in_use"], snap["usable"]) == (2, 2, 2)


def test_the_first_thread_to_borrow_cores_is_the_only_one_that_may() -> None:
    b = budget()
    first, second = object(), object()
    assert b.acquire("a", QUERY, lambda: None, first) == 2
    b.release("a", 2)
    assert b.acquire("a", QUERY, lambda: None, second) == 1
    b.release("a", 1)
    b.retire(first)
    assert b.acquire("a", QUERY, lambda: None, second) == 2


def test_interactive_work_stays_recent_for_its_window() -> None:
    clock = Clock()
    b = budget(clock=clock)
    b.note_interactive()
    assert b.acquire("a", BULK, lambda: None) == 1  # one core left for queries
    clock.now += INTERACTIVE_RECENT
    assert not b.interactive_recent()
    assert b.acquire("a", BULK, lambda: None) == 1  # the reserved core goes back to bulk


def test_threads_asking_at_once_never_exceed_the_cores() -> None:
    b = budget(cores=4)
    granted: list[int] = []
    lock = threading.Lock()

    def ask() -> None:
        for _ in range(200):
            n = b.acquire("m", QUERY, lambda: None)
            with lock:
                granted.append(b.in_use)
            if n:
                b.release("m", n)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(granted) <= 4 and b.in_use == 0 and b.peak_in_use <= 4


# --- the daemon ---------------------------------------------------------------------------------


def test_models_reports_automatic_threads_and_replicas(daemon: Daemon) -> None:
    models = {m["name"]: m for m in daemon.call("models")["models"]}
    assert models["default"]["threads_auto"] is True
    assert models["default"]["threads"] >= 1
    assert models["default"]["replicas_auto"] is True
    assert models["default"]["replicas"] >= 1


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


@pytest.fixture(scope="module")
def oversized() -> Iterator[Daemon]:
    """A daemon told to run 1,024 threads and 256 replicas, on this machine's cores."""
    workdir = short_tmpdir()
    d = start_daemon(
        workdir, "[models.default]\npath = '{bundled}'\nthreads = 1024\nreplicas = 256\n"
    )
    d.call("embed", input="count my threads")
    yield d
    d.stop()
    shutil.rmtree(workdir, ignore_errors=True)


def _cores() -> int:
    return machine_cpus(len(os.sched_getaffinity(0)), read_quota())


def test_a_threads_setting_above_the_cores_computes_on_the_cores_and_the_log_says_so(
    oversized: Daemon,
) -> None:
    cores = _cores()
    assert oversized.call("stats")["models"]["default"]["threads"] == cores
    assert oversized.call("models")["models"][0]["threads"] == cores
    assert f"threads = 1024 is more than the {cores} usable cores" in oversized.log()


def test_a_replicas_setting_above_the_cores_starts_one_per_core_and_the_log_says_so(
    oversized: Daemon,
) -> None:
    cores = _cores()
    assert oversized.call("models")["models"][0]["replicas"] == cores
    assert len(oversized.call("stats")["models"]["default"]["replicas"]) == cores
    assert f"replicas = 256 is more than the {cores} usable cores" in oversized.log()


def test_two_models_compute_at_once_within_the_core_budget(
    workdir: Path, own_daemon: list[Daemon], reference: Reference
) -> None:
    d = start_daemon(
        workdir,
        "[models.default]\npath = '{bundled}'\nthreads = 1\nreplicas = 1\n"
        "[models.second]\npath = '{bundled}'\nthreads = 1\nreplicas = 1\n",
    )
    own_daemon.append(d)
    cores = d.call("stats")["cores"]
    if cores["usable"] < 2:
        pytest.skip("two models at once need two usable cores")
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
    cores = d.call("stats")["cores"]
    assert cores["peak_models_computing"] == 2
    assert cores["peak_in_use"] <= cores["usable"]
