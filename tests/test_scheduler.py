"""The batching policy alone: no model, no thread, no event loop (jobs are plain values)."""

from __future__ import annotations

from dataclasses import dataclass, field

from embedd.inference.scheduler import Item, Scheduler


@dataclass(eq=False)
class Job:
    """The scheduler's view of a job (its `Schedulable` protocol), nothing more."""

    owner: object
    bulk: bool = False
    tokens: list[list[int]] = field(default_factory=list)
    cancelled: bool = False


def _job(sizes: list[int], *, owner: str, bulk: bool = False) -> Job:
    return Job(owner=owner, bulk=bulk, tokens=[[0] * n for n in sizes])


def _owners(batch: list[Item[Job]]) -> list[object]:
    return [item.job.owner for item in batch]


def test_interactive_inputs_go_into_the_batch_before_bulk_ones() -> None:
    s: Scheduler[Job] = Scheduler()
    s.add(_job([100] * 50, owner="indexer", bulk=True))
    s.add(_job([10, 10], owner="search"))
    batch = s.next_batch(max_tokens=220, max_seqs=64)
    assert _owners(batch) == ["search", "search"]  # not topped up: it finishes quickly
    assert _owners(s.next_batch(max_tokens=220, max_seqs=64)) == ["indexer", "indexer"]


def test_bulk_work_is_not_starved_by_a_stream_of_interactive_requests() -> None:
    s: Scheduler[Job] = Scheduler()
    s.add(_job([100] * 50, owner="indexer", bulk=True))
    got_bulk = False
    for _ in range(5):
        s.add(_job([10], owner="search"))
        got_bulk = got_bulk or "indexer" in _owners(s.next_batch(max_tokens=256, max_seqs=64))
    assert got_bulk


def test_queries_are_never_topped_up_with_bulk_that_is_computing_elsewhere() -> None:
    s: Scheduler[Job] = Scheduler()
    s.add(_job([100] * 50, owner="indexer", bulk=True))
    for _ in range(10):
        s.add(_job([10], owner="search"))
        batch = s.next_batch(max_tokens=256, max_seqs=64, bulk_running=True)
        assert _owners(batch) == ["search"]


def test_a_large_request_is_sliced_across_batches_in_order() -> None:
    s: Scheduler[Job] = Scheduler()
    job = _job([100] * 10, owner="a", bulk=True)
    s.add(job)
    seen: list[int] = []
    while s.has_work():
        batch = s.next_batch(max_tokens=256, max_seqs=64)
        assert sum(len(job.tokens[i.index]) for i in batch) <= 256
        seen += [i.index for i in batch]
    assert seen == list(range(10))


def test_owners_of_the_same_lane_take_turns() -> None:
    s: Scheduler[Job] = Scheduler()
    for _ in range(5):  # one connection floods five requests...
        s.add(_job([10] * 10, owner="flood", bulk=True))
    s.add(_job([10] * 10, owner="other", bulk=True))  # ...another sends one
    batch = s.next_batch(max_tokens=80, max_seqs=64)
    assert _owners(batch).count("other") == 4
    assert _owners(batch).count("flood") == 4


def test_an_input_is_never_split_and_smaller_ones_fill_the_gap() -> None:
    s: Scheduler[Job] = Scheduler()
    s.add(_job([200, 200], owner="a"))
    s.add(_job([30, 30], owner="b"))
    batch = s.next_batch(max_tokens=256, max_seqs=64)
    assert [(i.job.owner, len(i.job.tokens[i.index])) for i in batch] == [("a", 200), ("b", 30)]


def test_batch_never_exceeds_max_sequences() -> None:
    s: Scheduler[Job] = Scheduler()
    s.add(_job([1] * 100, owner="a"))
    assert len(s.next_batch(max_tokens=512, max_seqs=16)) == 16


def test_cancelled_jobs_are_dropped_with_the_count_of_unscheduled_inputs() -> None:
    s: Scheduler[Job] = Scheduler()
    job = _job([10] * 10, owner="a")
    s.add(job)
    s.next_batch(max_tokens=30, max_seqs=64)  # three inputs reach the model
    job.cancelled = True
    assert s.drop_cancelled() == [(job, 7)]
    assert not s.has_work()
    assert (s.pending_inputs, s.pending_tokens) == (0, 0)


def test_pending_counts_follow_adds_and_batches() -> None:
    s: Scheduler[Job] = Scheduler()
    s.add(_job([5, 6, 7], owner="a"))
    assert (s.pending_inputs, s.pending_tokens) == (3, 18)
    s.next_batch(max_tokens=11, max_seqs=64)
    assert (s.pending_inputs, s.pending_tokens) == (1, 7)
