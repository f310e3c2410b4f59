"""Many clients at once: every answer correct and matched to its id."""

from __future__ import annotations

import random
import threading
from typing import Any

import numpy as np

from tests.conftest import Daemon, Reference, cosines, vectors
from tests.wire import RawConnection

CLIENTS = 16
REQUESTS = 50


def _client(daemon: Daemon, reference: Reference, seed: int, failures: list[str]) -> None:
    rng = random.Random(seed)
    expected: dict[int, tuple[str, Any]] = {}
    try:
        with RawConnection(daemon.socket) as conn:
            # Pipeline all 50 at once (ids deliberately not sequential), then read them back.
            for _ in range(REQUESTS):
                rid = rng.randrange(1, 2**63)
                kind = rng.choice(["one", "many", "tokenize", "hello", "bad", "stats"])
                if kind == "one":
                    i = rng.randrange(len(reference.queries))
                    conn.send({"id": rid, "op": "embed", "input": reference.queries[i]})
                    expected[rid] = (kind, [i])
                elif kind == "many":
                    idx = rng.sample(range(len(reference.queries)), rng.randint(2, 12))
                    texts = [reference.queries[i] for i in idx]
                    conn.send({"id": rid, "op": "embed", "input": texts, "encoding": "list"})
                    expected[rid] = (kind, idx)
                elif kind == "tokenize":
                    i = rng.randrange(len(reference.queries))
                    conn.send({"id": rid, "op": "tokenize", "input": [reference.queries[i]]})
                    expected[rid] = (kind, i)
                elif kind == "bad":
                    conn.send({"id": rid, "op": "embed", "input": ["ok", ""]})
                    expected[rid] = (kind, None)
                else:
                    conn.send({"id": rid, "op": kind})
                    expected[rid] = (kind, None)
            for _ in range(REQUESTS):
                r = conn.recv()
                kind, what = expected.pop(r["id"])
                if kind in ("one", "many"):
                    got = vectors(r)
                    if cosines(got, reference.q_vecs[what]).min() < 0.9999:
                        failures.append(f"{seed}: wrong vectors for {r['id']}")
                elif kind == "tokenize":
                    if not r["ok"] or r["counts"][0] != len(r["ids"][0]):
                        failures.append(f"{seed}: bad tokenize answer {r}")
                elif kind == "bad":
                    if r["ok"] or r["error"]["index"] != 1:
                        failures.append(f"{seed}: bad_request expected, got {r}")
                elif not r["ok"]:
                    failures.append(f"{seed}: {kind} failed: {r}")
            if expected:
                failures.append(f"{seed}: unanswered ids {sorted(expected)}")
    except Exception as exc:  # reported by the test, not lost in a thread
        failures.append(f"{seed}: {exc!r}")


def test_16_clients_with_50_pipelined_mixed_requests_each_get_correct_matched_answers(
    daemon: Daemon, reference: Reference
) -> None:
    failures: list[str] = []
    threads = [
        threading.Thread(target=_client, args=(daemon, reference, seed, failures))
        for seed in range(CLIENTS)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads)
    assert failures == []


def test_identical_texts_from_concurrent_clients_get_identical_vectors(
    daemon: Daemon, reference: Reference
) -> None:
    text = reference.queries[3]
    results: list[np.ndarray[Any, Any]] = []

    def one() -> None:
        with RawConnection(daemon.socket) as conn:
            results.append(vectors(conn.call("embed", input=text)))

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 8
    assert cosines(np.concatenate(results), np.repeat(results[0], 8, axis=0)).min() > 0.99999
