"""Correct vectors: every reference text through the daemon against the reference
implementation's (sentence-transformers) vectors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import numpy.typing as npt
import pytest

from tests.conftest import Daemon, Reference, cosines, vectors
from tests.wire import RawConnection

T = TypeVar("T")

# The default run checks every SPREAD-th reference chunk (spread over the whole file, so every
# document of the set is represented); `pytest -m slow` checks all of them. Embedding all 583
# chunks twice (short and truncated long ones) is most of this file's time on a 2-core machine.
SPREAD = 4


def _spread(items: Sequence[T]) -> list[T]:
    return list(items[::SPREAD])


def _embed_all(conn: RawConnection, texts: list[str], **options: object) -> list[dict[str, object]]:
    """Pipelined in requests of 32, the way an indexer would send them."""
    ids = [
        conn.request("embed", input=texts[i : i + 32], timeout=600, **options)
        for i in range(0, len(texts), 32)
    ]
    return [conn.recv_for(rid) for rid in ids]


def test_every_reference_query_matches_at_cosine_0_9999(
    daemon: Daemon, reference: Reference
) -> None:
    with daemon.connect() as conn:
        got = np.concatenate([vectors(r) for r in _embed_all(conn, reference.queries)])
    assert got.shape == reference.q_vecs.shape
    assert cosines(got, reference.q_vecs).min() >= 0.9999


def _check_chunks(daemon: Daemon, texts: list[str], expected: npt.NDArray[np.float32]) -> None:
    with daemon.connect() as conn:
        responses = _embed_all(conn, texts)
    got = np.concatenate([vectors(r) for r in responses])
    assert cosines(got, expected).min() >= 0.9999
    assert not any(any(r["truncated"]) for r in responses)  # type: ignore[arg-type]


def _check_long_chunks(daemon: Daemon, texts: list[str], expected: npt.NDArray[np.float32]) -> None:
    with daemon.connect() as conn:
        responses = _embed_all(conn, texts, truncate=True)
    got = np.concatenate([vectors(r) for r in responses])
    assert cosines(got, expected).min() >= 0.9999
    flags = [f for r in responses for f in r["truncated"]]  # type: ignore[attr-defined]
    assert any(flags)  # some really were cut, and said so
    tokens = [t for r in responses for t in r["tokens"]]  # type: ignore[attr-defined]
    assert max(tokens) == 256


def test_reference_chunks_spread_over_the_set_match_at_cosine_0_9999(
    daemon: Daemon, reference: Reference
) -> None:
    _check_chunks(daemon, _spread(reference.chunks), reference.c_vecs[::SPREAD])


@pytest.mark.slow
def test_every_reference_chunk_matches_at_cosine_0_9999(
    daemon: Daemon, reference: Reference
) -> None:
    _check_chunks(daemon, reference.chunks, reference.c_vecs)


def test_long_chunks_spread_over_the_set_truncated_match_the_reference_truncation(
    daemon: Daemon, reference: Reference
) -> None:
    _check_long_chunks(daemon, _spread(reference.chunks_long), reference.cl_vecs[::SPREAD])


@pytest.mark.slow
def test_every_long_chunk_truncated_matches_the_reference_truncation(
    daemon: Daemon, reference: Reference
) -> None:
    _check_long_chunks(daemon, reference.chunks_long, reference.cl_vecs)


def test_long_chunks_without_truncate_fail_naming_the_first_long_input(
    daemon: Daemon, reference: Reference
) -> None:
    tok = daemon.call("tokenize", input=reference.chunks_long)
    first_long = next(i for i, n in enumerate(tok["counts"]) if n > 256)
    r = daemon.call("embed", input=reference.chunks_long)
    assert r["ok"] is False
    err = r["error"]
    assert err["code"] == "input_too_long"
    assert err["index"] == first_long
    assert err["tokens"] == tok["counts"][first_long]
    assert err["limit"] == 256


def test_vectors_do_not_depend_on_what_shares_their_batch(
    daemon: Daemon, reference: Reference
) -> None:

    texts = reference.queries[:8] + reference.chunks[:8]
    alone = np.concatenate([vectors(daemon.call("embed", input=t)) for t in texts])
    mixed = vectors(daemon.call("embed", input=texts))
    assert cosines(alone, mixed).min() >= 0.99999
