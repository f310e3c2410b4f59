"""Queue admission alone (pure): what one big or greedy client can and cannot take."""

from __future__ import annotations

from embedd.inference.admission import MAX_RETRY_AFTER, Admission, estimate_tokens


def test_a_text_counts_at_most_the_models_limit_however_long() -> None:
    assert estimate_tokens("x" * 50_000_000, 256) == 256
    assert estimate_tokens("short text", 256) == len(b"short text") // 3 + 2


def test_interactive_work_is_admitted_whatever_bulk_work_is_queued() -> None:
    a = Admission(max_queue_tokens=1000)
    a.add(500, bulk=True, owner="indexer-1")
    a.add(500, bulk=True, owner="indexer-2")
    assert a.check(10, bulk=False, owner="search", tokens_per_second=5000) is None


def test_a_single_bulk_request_over_a_connections_share_is_refused_at_once() -> None:
    a = Admission(max_queue_tokens=1000)
    err = a.check(600, bulk=True, owner="indexer", tokens_per_second=5000)
    assert err is not None and err.code == "busy"
    assert err.details["limit"] == 500 and "in parts" in err.message


def test_one_connection_cannot_take_more_than_its_share_of_the_bulk_queue() -> None:
    a = Admission(max_queue_tokens=1000)
    a.add(400, bulk=True, owner="greedy")
    assert a.check(200, bulk=True, owner="greedy", tokens_per_second=5000) is not None
    assert a.check(200, bulk=True, owner="other", tokens_per_second=5000) is None


def test_a_full_lane_answers_busy_with_a_bounded_retry_after() -> None:
    a = Admission(max_queue_tokens=1000)
    a.add(450, bulk=True, owner="x")
    a.add(450, bulk=True, owner="y")
    err = a.check(400, bulk=True, owner="z", tokens_per_second=0.001)
    assert err is not None and err.details["retry_after"] == MAX_RETRY_AFTER


def test_an_empty_lane_takes_any_request_within_the_share() -> None:
    a = Admission(max_queue_tokens=1000)
    assert a.check(500, bulk=True, owner="x", tokens_per_second=5000) is None
    assert a.check(1000, bulk=False, owner="x", tokens_per_second=5000) is None


def test_removing_work_frees_its_owners_share() -> None:
    a = Admission(max_queue_tokens=1000)
    a.add(500, bulk=True, owner="x")
    a.remove(500, bulk=True, owner="x")
    assert a.by_owner == {} and a.queued[True] == 0
