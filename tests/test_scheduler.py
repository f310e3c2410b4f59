"""The batching policy alone (no model, no thread)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from embedd.scheduler import Item, Scheduler
from embedd.worker import EmbedJob


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


def _job(
    loop: asyncio.AbstractEventLoop, sizes: list[int], *, owner: str, bulk: bool = False
) -> EmbedJob:
    job = EmbedJob(texts=["x"] * len(sizes), future=loop.create_future(), loop=loop, owner=owner)
    job.bulk = bulk
    job.tokens = [[0] * n for n in sizes]
    return job


def _owners(batch: list[Item]) -> list[object]:
    return [item.job.owner for item in batch]


def test_interactive_inputs_go_into_the_batch_before_bulk_ones(
    loop: asyncio.AbstractEventLoop,
) -> None:
    s = Scheduler()
    s.add(_job(loop, [100] * 50, owner="indexer", bulk=True))
    s.add(_job(loop, [10, 10], owner="search"))
    batch = s.next_batch(max_tokens=220, max_seqs=64)
    assert _owners(batch) == ["search", "search"]  # not topped up: it finishes quickly
    assert _owners(s.next_batch(max_tokens=220, max_seqs=64)) == ["indexer", "indexer"]


def test_bulk_work_is_not_starved_by_a_stream_of_interactive_requests(
    loop: asyncio.AbstractEventLoop,
) -> None:
    s = Scheduler()
    s.add(_job(loop, [100] * 50, owner="indexer", bulk=True))
    got_bulk = False
    for _ in range(5):
        s.add(_job(loop, [10], owner="search"))
        got_bulk = got_bulk or "indexer" in _owners(s.next_batch(max_tokens=256, max_seqs=64))
    assert got_bulk


def test_a_large_request_is_sliced_across_batches_in_order(loop: asyncio.AbstractEventLoop) -> None:
    s = Scheduler()
    job = _job(loop, [100] * 10, owner="a", bulk=True)
    s.add(job)
    seen: list[int] = []
    while s.has_work():
        batch = s.next_batch(max_tokens=256, max_seqs=64)
        assert sum(len(job.tokens[i.index]) for i in batch) <= 256
        seen += [i.index for i in batch]
    assert seen == list(range(10))


def test_owners_of_the_same_lane_take_turns(loop: asyncio.AbstractEventLoop) -> None:
    s = Scheduler()
    for _ in range(5):  # one connection floods five requests...
        s.add(_job(loop, [10] * 10, owner="flood", bulk=True))
    s.add(_job(loop, [10] * 10, owner="other", bulk=True))  # ...another sends one
    batch = s.next_batch(max_tokens=80, max_seqs=64)
    assert _owners(batch).count("other") == 4
    assert _owners(batch).count("flood") == 4


def test_an_input_is_never_split_and_smaller_ones_fill_the_gap(
    loop: asyncio.AbstractEventLoop,
) -> None:
    s = Scheduler()
    s.add(_job(loop, [200, 200], owner="a"))
    s.add(_job(loop, [30, 30], owner="b"))
    batch = s.next_batch(max_tokens=256, max_seqs=64)
    assert [(i.job.owner, len(i.job.tokens[i.index])) for i in batch] == [("a", 200), ("b", 30)]


def test_batch_never_exceeds_max_sequences(loop: asyncio.AbstractEventLoop) -> None:
    s = Scheduler()
    s.add(_job(loop, [1] * 100, owner="a"))
    assert len(s.next_batch(max_tokens=512, max_seqs=16)) == 16


def test_cancelled_jobs_are_dropped_with_the_count_of_unscheduled_inputs(
    loop: asyncio.AbstractEventLoop,
) -> None:
    s = Scheduler()
    job = _job(loop, [10] * 10, owner="a")
    s.add(job)
    s.next_batch(max_tokens=30, max_seqs=64)  # three inputs reach the model
    job.cancelled = True
    assert s.drop_cancelled() == [(job, 7)]
    assert not s.has_work()
    assert (s.pending_inputs, s.pending_tokens) == (0, 0)


def test_pending_counts_follow_adds_and_batches(loop: asyncio.AbstractEventLoop) -> None:
    s = Scheduler()
    s.add(_job(loop, [5, 6, 7], owner="a"))
    assert (s.pending_inputs, s.pending_tokens) == (3, 18)
    s.next_batch(max_tokens=11, max_seqs=64)
    assert (s.pending_inputs, s.pending_tokens) == (1, 7)
