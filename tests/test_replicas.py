"""Several llama contexts over one model, end to end: the real daemon, the bundled model, the
reference vectors; orderings read from the daemon's own stats, never from the clock."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from tests.conftest import Daemon, Reference, cosines, start_daemon, vectors
from tests.gguf_models import write_bert

TWO_REPLICAS = "cache_bytes = 0\n[models.default]\npath = '{bundled}'\nreplicas = 2\n"


def test_a_model_with_two_replicas_gives_the_reference_vectors(
    workdir: Path, own_daemon: list[Daemon], reference: Reference
) -> None:
    d = start_daemon(workdir, TWO_REPLICAS)
    own_daemon.append(d)
    got: dict[int, Any] = {}

    def drive(k: int) -> None:
        lo = 30 * k
        priority = "bulk" if k % 2 else "interactive"
        r = d.call("embed", input=reference.chunks[lo : lo + 30], priority=priority, timeout=300)
        got[k] = vectors(r)

    clients = [threading.Thread(target=drive, args=(k,)) for k in range(4)]
    for t in clients:
        t.start()
    for t in clients:
        t.join(300)
    assert cosines(np.concatenate([got[k] for k in range(4)]), reference.c_vecs[:120]).min() >= (
        0.9999
    )
    stats = d.model_stats()
    assert len(stats["replicas"]) == 2
    assert sum(r["batches"] for r in stats["replicas"]) == stats["batches"]


def test_a_query_is_answered_before_a_bulk_requests_next_batch_ends(
    workdir: Path, own_daemon: list[Daemon], reference: Reference
) -> None:
    d = start_daemon(workdir, TWO_REPLICAS)
    own_daemon.append(d)
    d.call("embed", input="warm up")
    before = d.model_stats()
    bulk: dict[str, Any] = {}

    def index() -> None:
        bulk["r"] = d.call("embed", input=reference.chunks[:60], priority="bulk", timeout=600)

    indexer = threading.Thread(target=index)
    indexer.start()
    d.wait_until_computing(before)
    queries = reference.queries[:5]
    answers = [
        vectors(d.call("embed", input=q, priority="interactive", timeout=300)) for q in queries
    ]
    during = d.model_stats()
    indexer.join(600)
    # The queries really arrived while bulk batches were computing ...
    assert during["queries_during_bulk"] >= 1
    # ... and no bulk batch that started after one of them ended before it was answered.
    assert during["bulk_overtook_queries"] == 0
    assert cosines(np.concatenate(answers), reference.q_vecs[:5]).min() >= 0.9999
    assert cosines(vectors(bulk["r"]), reference.c_vecs[:60]).min() >= 0.9999


def test_stats_list_each_replicas_work(workdir: Path, own_daemon: list[Daemon]) -> None:
    d = start_daemon(workdir, TWO_REPLICAS)
    own_daemon.append(d)
    d.call("embed", input="one query")
    stats = d.model_stats()
    assert [sorted(r) for r in stats["replicas"]] == [
        ["batches", "busy_fraction", "busy_seconds", "computing", "threads"]
    ] * 2
    assert stats["replicas"][0]["batches"] == 1  # the lowest free replica takes a lone batch
    assert stats["replicas"][0]["threads"] >= 1
    model = d.call("models")["models"][0]
    assert (model["replicas"], model["replicas_auto"]) == (2, False)


def test_a_model_whose_contexts_cannot_pool_fails_to_load_and_the_daemon_serves_on(
    workdir: Path, own_daemon: list[Daemon]
) -> None:
    no_pooling = write_bert(workdir / "no-pooling.gguf", pooling=0)
    d = start_daemon(
        workdir,
        TWO_REPLICAS + f"[models.nopool]\npath = '{no_pooling}'\nreplicas = 2\n",
    )
    own_daemon.append(d)
    err = d.call("embed", model="nopool", input="text")["error"]
    assert err["code"] == "model_load_failed" and "not an embedding model" in err["message"]
    model = next(m for m in d.call("models")["models"] if m["name"] == "nopool")
    assert model["state"] == "failed"
    assert vectors(d.call("embed", input="still serving")).shape == (1, 384)
