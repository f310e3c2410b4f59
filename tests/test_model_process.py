"""llama.cpp runs in model processes, never in the daemon: the real daemon, the real model
process, real signals sent to it by PID while it computes (observed in `stats`, never timed),
and the real q8_0 file. What cannot be made to happen here (a CPU with AMX, an input that makes
llama.cpp crash) is tested in tests/test_crashes.py as pure rules with a fake runner."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from embedd.inference.canary import REPACK_OFF_REASON, cpu_flags, verdict_key
from embedd.inference.crashes import CRASH_STREAK_LIMIT
from embedd.inference.modelfile import identify
from tests.conftest import BUNDLED, Daemon, Reference, cosines, start_daemon, vectors

Q8 = Path(__file__).parent / "data" / "models" / "all-MiniLM-L6-v2-q8_0.gguf"
TWO_MODELS = """
cache_bytes = 0
[models.other]
path = "{bundled}"
"""


def _pid(d: Daemon, model: str = "default") -> int:
    pid = d.model_stats(model)["process"]["pid"]
    assert isinstance(pid, int)
    return pid


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def _gone(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


def _wait(condition: Any, what: str, timeout: float = 60.0) -> None:
    """Polls `condition` (the thing itself, not a duration) until it holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {what}")
        time.sleep(0.02)


@pytest.fixture
def two_models(workdir: Path, own_daemon: list[Daemon]) -> Daemon:
    d = start_daemon(workdir, TWO_MODELS, env={"XDG_CACHE_HOME": str(workdir / "cache")})
    own_daemon.append(d)
    for model in ("default", "other"):
        assert d.call("load", model=model)["ok"]
    return d


def test_the_daemon_never_maps_llama_cpp_and_the_model_process_does(two_models: Daemon) -> None:
    assert two_models.call("embed", input="hello")["ok"]
    assert "libllama" not in _maps(two_models.proc.pid)
    assert "libggml" not in _maps(two_models.proc.pid)
    assert "libllama" in _maps(_pid(two_models))


def test_each_model_has_its_own_process_holding_no_socket(two_models: Daemon) -> None:
    pids = {_pid(two_models, "default"), _pid(two_models, "other")}
    assert len(pids) == 2 and two_models.proc.pid not in pids
    for pid in pids:
        assert f"PPid:\t{two_models.proc.pid}\n" in Path(f"/proc/{pid}/status").read_text()
        fds = [os.readlink(f) for f in Path(f"/proc/{pid}/fd").iterdir()]
        assert not [fd for fd in fds if fd.startswith("socket:")], fds


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSEGV, signal.SIGABRT], ids=str)
def test_a_model_process_killed_mid_batch_is_restarted_and_every_input_answered(
    two_models: Daemon, reference: Reference, sig: signal.Signals
) -> None:
    d = two_models
    victim, bystander = _pid(d), _pid(d, "other")
    chunks = reference.chunks[:96]
    answer: dict[str, Any] = {}
    sender = threading.Thread(target=lambda: answer.update(d.call("embed", input=chunks)))
    sender.start()
    d.wait_for(lambda s: any(r["computing"] for r in s["replicas"]), "a batch computing")
    os.kill(victim, sig)
    sender.join()
    assert cosines(vectors(answer), reference.c_vecs[:96]).min() >= 0.9999
    process = d.model_stats()["process"]
    assert (process["crashes"], process["restarts"]) == (1, 1)
    assert process["pid"] not in (None, victim)
    assert _pid(d, "other") == bystander
    assert d.model_stats("other")["process"]["crashes"] == 0
    again = d.call("embed", input=reference.queries[:3])
    assert cosines(vectors(again), reference.q_vecs[:3]).min() >= 0.9999
    assert f"died by {sig.name}" in d.log()


def test_a_model_that_keeps_dying_is_marked_failed_and_a_load_brings_it_back(
    two_models: Daemon, reference: Reference
) -> None:
    d = two_models
    seen: list[int] = []
    for _ in range(CRASH_STREAK_LIMIT):
        _wait(
            lambda: (p := d.model_stats()["process"]["pid"]) is not None and p not in seen,
            "a new model process",
        )
        seen.append(_pid(d))
        os.kill(seen[-1], signal.SIGKILL)
    stats = d.wait_for(lambda s: s["state"] == "failed", "the model marked failed")
    assert "keeps crashing" in stats["error"]
    refused = d.call("embed", input="hello")["error"]
    assert refused["code"] == "model_crashed" and "keeps crashing" in refused["message"]
    card = {m["name"]: m for m in d.call("models")["models"]}["default"]
    assert card["state"] == "failed" and "keeps crashing" in card["error"]
    assert "keeps crashing" in d.call("health")["models_failed"]["default"]
    assert d.call("embed", input="hello", model="other")["ok"]
    assert d.call("load")["ok"]
    back = d.call("embed", input=reference.queries[:2])
    assert cosines(vectors(back), reference.q_vecs[:2]).min() >= 0.9999


def test_a_model_process_ends_when_the_daemon_is_killed(two_models: Daemon) -> None:
    pids = [_pid(two_models), _pid(two_models, "other")]
    two_models.proc.kill()
    two_models.proc.wait()
    for pid in pids:
        _wait(lambda pid=pid: _gone(pid), f"model process {pid} gone")


def test_the_canary_runs_once_per_file_build_and_cpu(
    workdir: Path, own_daemon: list[Daemon]
) -> None:
    env = {"XDG_CACHE_HOME": str(workdir / "cache")}
    first = start_daemon(workdir, env=env)
    own_daemon.append(first)
    assert first.call("load")["ok"]
    assert first.model_stats()["process"]["canaries"] == 1
    kept = json.loads((workdir / "cache" / "embedd" / "native-verdicts.json").read_text())
    assert [v["repack"] for v in kept.values()] == [True]
    first.stop()
    second = start_daemon(workdir, env=env)
    own_daemon.append(second)
    assert second.call("load")["ok"]
    assert second.model_stats()["process"]["canaries"] == 0
    card = {m["name"]: m for m in second.call("models")["models"]}["default"]
    assert card["weight_repacking"] == "on"


def _keep_verdict(cache: Path, model: Path, verdict: dict[str, Any]) -> None:
    """Writes the verdict a model process on this machine would be judged by."""
    import llama_cpp as lc

    lc.llama_backend_init()
    info = lc.llama_print_system_info()
    key = verdict_key(
        identify(model).sha256,
        f"llama-cpp-python {lc.__version__}",
        info.decode() if isinstance(info, bytes) else str(info),
        cpu_flags(),
    )
    (cache / "embedd").mkdir(parents=True, exist_ok=True)
    (cache / "embedd" / "native-verdicts.json").write_text(json.dumps({key: verdict}))


def test_a_kept_verdict_of_repacking_off_loads_without_it_and_gives_the_reference_vectors(
    workdir: Path, own_daemon: list[Daemon], reference: Reference
) -> None:
    config = f'[models.q8]\npath = "{Q8}"\n'
    _keep_verdict(
        workdir / "cache", Q8, {"repack": False, "refused": False, "reason": REPACK_OFF_REASON}
    )
    d = start_daemon(workdir, config, env={"XDG_CACHE_HOME": str(workdir / "cache")})
    own_daemon.append(d)
    got = d.call("embed", model="q8", input=reference.queries[:40])
    assert cosines(vectors(got), reference.q_vecs[:40]).min() >= 0.999
    card = {m["name"]: m for m in d.call("models")["models"]}["q8"]
    assert card["weight_repacking"] == f"off: {REPACK_OFF_REASON}"
    assert d.model_stats("q8")["process"]["canaries"] == 0


def test_a_model_known_to_die_on_this_cpu_is_refused_without_a_crash(
    workdir: Path, own_daemon: list[Daemon]
) -> None:
    reason = "the model process died by SIGILL computing its first batch with it"
    _keep_verdict(workdir / "cache", BUNDLED, {"repack": False, "refused": True, "reason": reason})
    d = start_daemon(workdir, env={"XDG_CACHE_HOME": str(workdir / "cache")})
    own_daemon.append(d)
    error = d.call("embed", input="hello")["error"]
    assert error["code"] == "model_load_failed" and reason in error["message"]
    assert d.model_stats()["process"]["crashes"] == 0


def test_the_q8_0_model_gives_the_reference_vectors(
    workdir: Path, own_daemon: list[Daemon], reference: Reference
) -> None:
    d = start_daemon(
        workdir, f'[models.q8]\npath = "{Q8}"\n', env={"XDG_CACHE_HOME": str(workdir / "c")}
    )
    own_daemon.append(d)
    queries = d.call("embed", model="q8", input=reference.queries[:100])
    chunks = d.call("embed", model="q8", input=reference.chunks[:100])
    assert cosines(vectors(queries), reference.q_vecs[:100]).min() >= 0.999
    assert cosines(vectors(chunks), reference.c_vecs[:100]).min() >= 0.999
    assert d.model_stats("q8")["process"]["crashes"] == 0


@pytest.mark.skipif(
    " amx_int8 " not in f" {cpu_flags().partition('|')[2]} ",
    reason="llama.cpp's repacked q8_0 path dies by SIGILL only on CPUs with AMX; this one has none",
)
def test_on_an_amx_cpu_the_q8_0_model_falls_back_to_unrepacked_weights(
    workdir: Path, own_daemon: list[Daemon], reference: Reference
) -> None:
    d = start_daemon(
        workdir, f'[models.q8]\npath = "{Q8}"\n', env={"XDG_CACHE_HOME": str(workdir / "c")}
    )
    own_daemon.append(d)
    got = d.call("embed", model="q8", input=reference.queries[:40])
    assert cosines(vectors(got), reference.q_vecs[:40]).min() >= 0.999
    card = {m["name"]: m for m in d.call("models")["models"]}["q8"]
    assert card["weight_repacking"].startswith("off: llama.cpp died by SIGILL")
    assert "SIGILL" in d.log()
    assert d.call("health")["status"] == "ok"


def test_reloading_under_load_leaves_no_request_or_unload_unanswered(
    workdir: Path, own_daemon: list[Daemon], reference: Reference
) -> None:
    """Old and new workers of one model wait for cores at once while it reloads: each
    wake-up is its own worker's, so none waits until its timeout."""
    d = start_daemon(workdir, "cache_bytes = 0\nrequest_timeout = 120\n")
    own_daemon.append(d)
    answers: list[dict[str, Any]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def embedder(k: int) -> None:
        with d.connect() as conn:
            while not stop.is_set():
                texts = reference.chunks[k * 8 : k * 8 + 8]
                answer = conn.call("embed", input=texts, priority="bulk")
                good = (
                    answer["ok"]
                    and cosines(vectors(answer), reference.c_vecs[k * 8 : k * 8 + 8]).min()
                    >= 0.9999
                )
                with lock:
                    answers.append({"ok": good, "answer": answer if not good else None})

    clients = [threading.Thread(target=embedder, args=(k,)) for k in range(3)]
    for t in clients:
        t.start()
    try:
        for _ in range(5):
            assert d.call("unload")["ok"]
            assert d.call("load")["ok"]
    finally:
        stop.set()
        for t in clients:
            t.join()
    assert answers and all(a["ok"] for a in answers), [a for a in answers if not a["ok"]][:3]
    assert d.model_stats()["unloads"] >= 5


def test_a_model_process_that_stops_answering_is_replaced_and_the_batch_computed_again(
    workdir: Path, own_daemon: list[Daemon], reference: Reference
) -> None:
    # A batch older than twice request_timeout means the process stopped answering.
    d = start_daemon(workdir, "cache_bytes = 0\nrequest_timeout = 5\n")
    own_daemon.append(d)
    assert d.call("load")["ok"]
    stopped = _pid(d)
    os.kill(stopped, signal.SIGSTOP)  # alive, holding its pipe, computing nothing
    try:
        answer = d.call("embed", input=reference.queries[:4], timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stopped, signal.SIGCONT)
    assert cosines(vectors(answer), reference.q_vecs[:4]).min() >= 0.9999
    process = d.model_stats()["process"]
    assert process["crashes"] == 1 and process["pid"] != stopped
    assert "stopped answering" in d.log()
