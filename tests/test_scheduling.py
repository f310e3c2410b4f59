"""Priorities, fairness and cancellation, observed from outside the real daemon."""

from __future__ import annotations

import threading
import time

from tests.conftest import Daemon, Reference
from tests.wire import RawConnection


def test_interactive_requests_sent_during_a_bulk_request_complete_before_it(
    daemon: Daemon, reference: Reference
) -> None:
    finished: list[str] = []
    daemon.call("load")
    before = daemon.model_stats()

    def bulk() -> None:
        with RawConnection(daemon.socket) as conn:
            r = conn.call("embed", input=reference.chunks[:40], timeout=600)
            assert r["ok"]
            finished.append("bulk")

    indexer = threading.Thread(target=bulk)
    with daemon.connect() as conn:
        # The model process stopped: the bulk request's first batches stay in flight and the
        # rest stays queued while the queries arrive.
        with daemon.model_stopped():
            indexer.start()
            daemon.wait_until_computing(before)
            queries = [conn.request("embed", input=reference.queries[i]) for i in range(5)]
            daemon.wait_until_computing(before, requests=6)
        for rid in queries:
            assert conn.recv_for(rid)["ok"]
        finished.append("queries")
    indexer.join(300)
    assert finished == ["queries", "bulk"]


def test_explicit_bulk_priority_yields_to_interactive_work(
    daemon: Daemon, reference: Reference
) -> None:
    daemon.call("load")
    before = daemon.model_stats()
    with daemon.connect() as conn:
        with daemon.model_stopped():
            slow = conn.request(
                "embed", input=reference.chunks[150:180], priority="bulk", timeout=600
            )
            daemon.wait_until_computing(before)  # the bulk request is in the model's queue
            quick = conn.request("embed", input=reference.chunks[230:234], priority="interactive")
            daemon.wait_until_computing(before, requests=2)
        first = conn.recv()
        assert first["id"] == quick and first["ok"]
        assert conn.recv_for(slow)["ok"]


def test_two_clients_flooding_at_the_same_priority_both_make_progress(
    daemon: Daemon, reference: Reference
) -> None:
    done: dict[str, list[float]] = {"a": [], "b": []}

    def flood(name: str, offset: int) -> None:
        with RawConnection(daemon.socket) as conn:
            ids = [
                conn.request("embed", input=reference.chunks[offset + 4 * k : offset + 4 * k + 4])
                for k in range(8)
            ]
            for rid in ids:
                assert conn.recv_for(rid)["ok"]
                done[name].append(time.monotonic())

    threads = [
        threading.Thread(target=flood, args=("a", 0)),
        threading.Thread(target=flood, args=("b", 300)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(done["a"]) == len(done["b"]) == 8
    # Neither waited for the other to finish everything: each got answers while the other
    # still had work queued.
    assert done["a"][0] < done["b"][-1]
    assert done["b"][0] < done["a"][-1]


def test_cancelled_inputs_never_reach_the_model_and_are_counted(
    daemon: Daemon, reference: Reference
) -> None:
    daemon.call("load")
    before = daemon.call("stats")["models"]["default"]
    # The model process stopped: the request's first batches in flight, the rest queued.
    with daemon.connect() as conn, daemon.model_stopped():
        rid = conn.request("embed", input=reference.chunks_long[:40], truncate=True)
        daemon.wait_until_computing(before)
        assert conn.call("cancel", target=rid)["cancelled"] is True
        assert conn.recv_for(rid)["error"]["code"] == "cancelled"
    # The model thread drops the rest at its next batch boundary.
    after = daemon.wait_for(
        lambda s: s["inputs"] + s["cancelled"] >= before["inputs"] + before["cancelled"] + 40,
        "all 40 inputs computed or dropped",
    )
    dropped = after["cancelled"] - before["cancelled"]
    computed = after["inputs"] - before["inputs"]
    assert dropped > 0
    assert computed + dropped == 40
    assert computed < 40
