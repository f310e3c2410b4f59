"""Long inputs split into windows, and the `chunk` op, against the real daemon and model."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tests.conftest import Daemon, Reference, cosines, start_daemon, vectors


def _long_text(reference: Reference) -> str:
    return "\n\n".join(reference.chunks[:6])  # ~1,000 tokens: four windows of 256


def test_split_of_a_text_under_the_limit_is_the_plain_vector(
    daemon: Daemon, reference: Reference
) -> None:
    text = reference.chunks[0]
    plain = daemon.call("embed", input=text)
    split = daemon.call("embed", input=text, long="split")
    assert split["windows"] == [1] and split["tokens"] == plain["tokens"]
    # One window of the same tokens; two separate decodes, so equal up to the last bits.
    assert cosines(vectors(split), vectors(plain))[0] >= 0.99999


def test_split_windows_are_within_the_limit_and_cover_the_text_with_the_overlap(
    daemon: Daemon, reference: Reference
) -> None:
    text = _long_text(reference)
    r = daemon.call("embed", input=text, long="split", pool="none", overlap=32)
    spans = r["spans"]
    assert r["windows"] == [len(spans)] and len(spans) >= 4
    assert r["count"] == len(spans)
    for start, end in spans:
        piece = text[start:end]
        count = daemon.call("tokenize", input=piece)["counts"][0]
        assert count <= 256
    # Consecutive windows overlap, and together they cover every word of the text.
    for (_s1, e1), (s2, _e2) in itertools.pairwise(spans):
        assert s2 < e1
        assert daemon.call("tokenize", input=text[s2:e1])["counts"][0] - 2 <= 32
    covered = np.zeros(len(text), dtype=bool)
    for start, end in spans:
        covered[start:end] = True
    assert all(covered[i] or text[i].isspace() for i in range(len(text)))


def test_split_mean_is_the_token_weighted_mean_of_the_windows(
    daemon: Daemon, reference: Reference
) -> None:
    text = _long_text(reference)
    raw = daemon.call("embed", input=text, long="split", pool="none", normalize=False)
    windows = vectors(raw)
    weights = np.asarray(
        [daemon.call("tokenize", input=text[s:e])["counts"][0] for s, e in raw["spans"]],
        dtype=np.float64,
    )
    expected = (windows * weights[:, None]).sum(axis=0) / weights.sum()
    expected /= np.linalg.norm(expected)
    pooled = daemon.call("embed", input=[text, "short"], long="split")
    assert pooled["windows"] == [len(raw["spans"]), 1]
    assert pooled["usage"]["prompt_tokens"] == int(weights.sum()) + pooled["tokens"][1]
    assert cosines(vectors(pooled)[:1], expected[None, :].astype(np.float32))[0] > 0.99999


def test_split_refuses_pool_or_overlap_without_split_and_a_too_large_overlap(
    daemon: Daemon,
) -> None:
    assert daemon.call("embed", input="x", pool="none")["error"]["key"] == "long"
    assert daemon.call("embed", input="x", long="split", overlap=200)["error"]["key"] == "overlap"
    assert daemon.call("embed", input="x", long="split", truncate=True)["error"]["key"] == "long"


def test_chunk_returns_spans_that_map_back_within_the_limit(
    daemon: Daemon, reference: Reference
) -> None:
    text = _long_text(reference)
    r = daemon.call("chunk", input=text, max_tokens=100, overlap=10)
    assert r["max_tokens"] == 100 and len(r["chunks"]) >= 8
    for c in r["chunks"]:
        start, end = c["span"]
        assert text[start:end] == c["text"]
        assert c["tokens"] == daemon.call("tokenize", input=c["text"])["counts"][0] <= 100
        after = text[end : end + 1]
        assert after == "" or after.isspace() or not text[end - 1].isalnum()
    assert daemon.call("chunk", input=text, max_tokens=100, overlap=10) == r  # deterministic


def test_chunk_defaults_to_the_models_limit_and_refuses_more(daemon: Daemon) -> None:
    assert daemon.call("chunk", input="a short text")["max_tokens"] == 256
    assert daemon.call("chunk", input="x", max_tokens=1000)["error"]["limit"] == 256


def test_a_ten_megabyte_chunk_request_does_not_stall_other_clients(
    daemon: Daemon, reference: Reference
) -> None:
    text = ("\n\n".join(reference.chunks) + "\n\n") * 25  # ~10 MB
    with daemon.connect() as chunker:
        chunker.send({"id": 1, "op": "chunk", "input": text})
        _poll(daemon, lambda m: m["chunking_inputs"] == 1)
        assert daemon.call("embed", input=reference.queries[0])["ok"]
        # Cutting 10 MB takes thousands of slices; the query waited for one, so the chunk
        # request is still being cut when the query has its answer.
        assert _stats(daemon)["chunking_inputs"] == 1
        r = chunker.recv_for(1)
    assert r["ok"] and len(r["chunks"]) > 1000


def _stats(daemon: Daemon) -> dict[str, Any]:
    models: dict[str, Any] = daemon.call("stats")["models"]["default"]
    return models


def _poll(daemon: Daemon, ready: Callable[[dict[str, Any]], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ready(_stats(daemon)):
        assert time.monotonic() < deadline, "the daemon never reached the awaited state"
        time.sleep(0.01)


def test_a_split_text_is_cut_between_batches_so_another_clients_query_is_answered_meanwhile(
    workdir: Path, own_daemon: list[Daemon], reference: Reference
) -> None:
    # Room in the bulk queue for a 5 MB text counted whole (~1.7 M tokens by the estimate).
    d = start_daemon(workdir, '[models.default]\npath = "{bundled}"\nmax_queue_tokens = 10000000\n')
    own_daemon.append(d)
    text = ("\n\n".join(reference.chunks) + "\n\n") * 12  # 4.4 MB
    with d.connect() as splitter:
        splitter.send({"id": 1, "op": "embed", "input": text, "long": "split", "pool": "none"})
        _poll(d, lambda m: m["splitting_inputs"] == 1)
        answer = d.call("embed", input=reference.queries[0])
        assert answer["ok"]
        # Cutting a 4.4 MB text takes thousands of slices; the query waited for one, so the
        # split request is still being cut when the query has its answer.
        assert _stats(d)["splitting_inputs"] == 1
    _poll(d, lambda m: m["splitting_inputs"] == 0)  # the splitter left: its work is dropped


def test_a_split_request_is_admitted_by_all_its_tokens_as_bulk(
    daemon: Daemon, reference: Reference
) -> None:
    text = ("\n\n".join(reference.chunks) + "\n\n") * 5  # 1.8 MB: ~610,000 tokens by estimate
    before = _stats(daemon)["batches"]
    r = daemon.call("embed", input=text, long="split")
    # One text, yet more than one connection's share of the bulk queue (500,000 tokens of the
    # default max_queue_tokens): counted whole and as bulk, refused before any work.
    assert not r["ok"] and r["error"]["code"] == "busy"
    assert "share of the bulk queue" in r["error"]["message"]
    assert _stats(daemon)["batches"] == before


def test_a_windows_answer_over_max_response_is_refused_before_any_work(
    workdir: Path, own_daemon: list[Daemon], reference: Reference
) -> None:
    d = start_daemon(workdir, "max_response = 262144\n")  # room for ~170 window vectors
    own_daemon.append(d)
    text = "\n\n".join(reference.chunks[:300])  # ~50,000 tokens: ~200 windows
    d.call("embed", input="warm the model up")
    before = _stats(d)["tokens"]
    r = d.call("embed", input=text, long="split", pool="none")
    assert not r["ok"] and r["error"]["code"] == "bad_request"
    assert "max_response" in r["error"]["message"]
    assert _stats(d)["tokens"] == before
