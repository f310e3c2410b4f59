"""The per-connection conversation alone: bytes in, actions out; no socket, no daemon, no model."""

from __future__ import annotations

from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest

from embedd.transport.counters import Tally
from embedd.wire.conversation import (
    Action,
    CancelTask,
    Close,
    Conversation,
    ConversationLimits,
    RunRequest,
    Send,
)
from embedd.wire.errors import Code, EmbeddError
from embedd.wire.framing import FrameDecoder, encode_frame
from embedd.wire.messages import MAX_ECHO, Embed

LIMITS = ConversationLimits(max_frame=1 << 20, max_inflight=4, max_inputs=100)


def frame(**message: Any) -> bytes:
    return encode_frame(message)


def sent(actions: list[Action]) -> list[dict[str, Any]]:
    """The messages the actions write, decoded."""
    out: list[dict[str, Any]] = []
    decoder = FrameDecoder(1 << 30)
    for action in actions:
        if isinstance(action, Send):
            out += [m for m in decoder.feed(bytes(action.data)) if isinstance(m, dict)]
    return out


def dispatched(actions: list[Action]) -> list[int]:
    return [a.request.id for a in actions if isinstance(a, RunRequest)]


def test_a_request_is_dispatched_as_its_typed_value() -> None:
    conv = Conversation(LIMITS)
    actions = conv.receive_data(frame(id=1, op="embed", input=["a", "b"], truncate=True))
    assert actions == [RunRequest(actions[0].request)]  # type: ignore[union-attr]
    req = actions[0].request  # type: ignore[union-attr]
    assert req.args == Embed(input=("a", "b"), truncate=True, single=False)


def test_a_finished_request_is_answered_with_its_id_and_counted() -> None:
    tally = Tally()
    conv = Conversation(LIMITS, tally.count)
    conv.receive_data(frame(id=7, op="health"))
    assert sent(conv.finish(7, {"status": "ok"})) == [{"id": 7, "ok": True, "status": "ok"}]
    assert (tally.total, tally.ok) == (1, 1)
    assert conv.inflight == 0


def test_a_frame_split_at_every_byte_boundary_dispatches_once() -> None:
    data = frame(id=1, op="hello") + frame(id=2, op="health")
    for cut in range(len(data) + 1):
        conv = Conversation(LIMITS)
        ids = dispatched(conv.receive_data(data[:cut])) + dispatched(conv.receive_data(data[cut:]))
        assert ids == [1, 2], cut


def test_an_id_already_in_flight_is_refused_and_the_first_keeps_running() -> None:
    conv = Conversation(LIMITS)
    conv.receive_data(frame(id=1, op="hello"))
    [answer] = sent(conv.receive_data(frame(id=1, op="health")))
    assert answer["id"] == 1 and answer["error"]["code"] == "bad_request"
    assert conv.inflight == 1
    assert sent(conv.finish(1, {"x": 1})) == [{"id": 1, "ok": True, "x": 1}]


def test_an_id_may_be_reused_once_its_answer_was_sent() -> None:
    conv = Conversation(LIMITS)
    conv.receive_data(frame(id=1, op="hello"))
    conv.finish(1, {})
    assert dispatched(conv.receive_data(frame(id=1, op="hello"))) == [1]


def test_more_requests_than_max_inflight_get_busy_naming_the_limit() -> None:
    conv = Conversation(LIMITS)
    for i in range(4):
        conv.receive_data(frame(id=i, op="hello"))
    [answer] = sent(conv.receive_data(frame(id=9, op="hello")))
    assert answer["error"]["code"] == "busy"
    assert answer["error"]["limit"] == 4 and answer["error"]["retry_after"] > 0


def test_cancel_in_the_same_read_as_its_target_cancels_and_answers_both() -> None:
    conv = Conversation(LIMITS)
    actions = conv.receive_data(
        frame(id=1, op="embed", input="x") + frame(id=2, op="cancel", target=1)
    )
    assert dispatched(actions) == [1]
    assert CancelTask(1) in actions
    assert sent(actions) == [{"id": 2, "ok": True, "cancelled": True}]
    # The shell reports the cancelled task; the target gets its own `cancelled` answer.
    [answer] = sent(conv.finish(1, EmbeddError(Code.CANCELLED, "task cancelled")))
    assert answer["id"] == 1 and answer["error"]["code"] == "cancelled"
    assert "by the client" in answer["error"]["message"]


def test_cancel_of_an_unknown_or_finished_id_answers_false() -> None:
    conv = Conversation(LIMITS)
    assert sent(conv.receive_data(frame(id=2, op="cancel", target=1))) == [
        {"id": 2, "ok": True, "cancelled": False}
    ]


def test_a_bad_request_is_answered_with_its_id_and_the_connection_stays() -> None:
    conv = Conversation(LIMITS)
    [answer] = sent(conv.receive_data(frame(id=3, op="embed", input=[1])))
    assert answer["id"] == 3 and answer["error"]["index"] == 0
    assert not conv.reading_done


def test_a_request_without_a_usable_id_is_answered_with_nil_id() -> None:
    conv = Conversation(LIMITS)
    [answer] = sent(conv.receive_data(frame(id="one", op="hello")))
    assert answer["id"] is None and answer["error"]["key"] == "id"


def test_a_float_id_is_refused_under_that_same_id_so_the_caller_can_match_it() -> None:
    conv = Conversation(LIMITS)
    [answer] = sent(conv.receive_data(frame(id=4294967296.0, op="hello")))
    assert answer["id"] == 4294967296.0 and answer["error"]["key"] == "id"
    assert "uint" in answer["error"]["message"]


def test_an_echoed_huge_value_is_bounded_in_the_error() -> None:
    conv = Conversation(LIMITS)
    [answer] = sent(conv.receive_data(frame(id="x" * 100_000, op="hello")))
    assert len(answer["error"]["message"]) < MAX_ECHO * 3


def test_invalid_utf8_in_an_input_is_refused_by_index_and_the_connection_stays() -> None:
    conv = Conversation(LIMITS)
    body = msgpack.packb({"id": 5, "op": "embed"})[: -0 or None]
    # A map of 3 keys whose `input` list holds an unpaired surrogate encoded as a JS library
    # does (ED A0 80 is not UTF-8).
    body = b"\x83\xa2id\x05\xa2op\xa5embed\xa5input\x92\xa1a\xa3\xed\xa0\x80"
    [answer] = sent(conv.receive_data(len(body).to_bytes(4, "big") + body))
    assert answer["id"] == 5 and answer["error"]["code"] == "bad_request"
    assert answer["error"]["index"] == 1
    assert not conv.reading_done


@pytest.mark.parametrize(
    "body",
    [
        msgpack.packb({b"id": 1, "op": "hello"}),  # a bytes key
        b"\x82\xa2id\x01\xa2id\x02",  # a duplicate key
        msgpack.packb([1, 2]),  # not a map
        b"\xc1",  # never-used msgpack byte
    ],
)
def test_a_broken_body_answers_protocol_error_and_closes(body: bytes) -> None:
    conv = Conversation(LIMITS)
    actions = conv.receive_data(len(body).to_bytes(4, "big") + body)
    [answer] = sent(actions)
    assert answer["id"] is None and answer["error"]["code"] == "protocol_error"
    assert actions[-1] == Close()


def test_requests_read_before_a_broken_frame_are_answered_before_the_close() -> None:
    conv = Conversation(LIMITS)
    actions = conv.receive_data(frame(id=1, op="hello") + b"\xff\xff\xff\xff")
    assert dispatched(actions) == [1]
    assert sent(actions)[0]["error"]["code"] == "frame_too_large"
    assert Close() not in actions
    after = conv.finish(1, {"ok": 1})
    assert sent(after)[0]["id"] == 1 and after[-1] == Close()


def test_after_a_half_close_answers_still_go_out_then_close() -> None:
    conv = Conversation(LIMITS)
    conv.receive_data(frame(id=1, op="hello") + frame(id=2, op="health"))
    assert conv.peer_closed(gone=False) == []
    assert len(sent(conv.finish(1, {}))) == 1
    last = conv.finish(2, {})
    assert len(sent(last)) == 1 and last[-1] == Close()


def test_a_peer_that_is_gone_has_its_work_cancelled_and_nothing_written() -> None:
    tally = Tally()
    conv = Conversation(LIMITS, tally.count)
    conv.receive_data(frame(id=1, op="hello"))
    assert conv.peer_closed(gone=True) == [CancelTask(1)]
    assert conv.finish(1, EmbeddError(Code.CANCELLED, "gone")) == [Close()]
    assert tally.errors["cancelled"] == 1  # counted although it could not be written


def test_abandon_answers_now_and_stops_the_task() -> None:
    conv = Conversation(LIMITS)
    conv.receive_data(frame(id=1, op="embed", input="x"))
    actions = conv.abandon(1, EmbeddError(Code.SHUTTING_DOWN, "grace passed"))
    assert actions[0] == CancelTask(1)
    assert sent(actions)[0]["error"]["code"] == "shutting_down"
    assert conv.finish(1, EmbeddError(Code.CANCELLED, "late")) == []  # answered only once


def test_every_answer_is_counted_once() -> None:
    tally = Tally()
    conv = Conversation(LIMITS, tally.count)
    conv.receive_data(
        frame(id=1, op="hello") + frame(id=2, op="nope") + frame(id=3, op="cancel", target=1)
    )
    conv.finish(1, EmbeddError(Code.CANCELLED, "x"))
    assert tally.total == 3
    assert tally.errors == {"unknown_op": 1, "cancelled": 1}


@pytest.mark.parametrize("method", [b"GET", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"HEAD"])
def test_an_http_request_gets_a_plain_http_400_naming_the_http_socket(method: bytes) -> None:
    tally = Tally()
    conv = Conversation(LIMITS, tally.count)
    actions = conv.receive_data(method + b" /v1/embeddings HTTP/1.1\r\nHost: x\r\n\r\n")
    sent = b"".join(a.data for a in actions if isinstance(a, Send))
    assert sent.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"--http-socket" in sent and b"msgpack socket" in sent
    assert isinstance(actions[-1], Close)
    assert tally.errors == {"protocol_error": 1}


def test_an_http_request_sent_a_byte_at_a_time_is_recognised_too() -> None:
    conv = Conversation(LIMITS)
    actions: list[Action] = []
    for byte in b"POST /api/embed HTTP/1.1\r\n":
        actions += conv.receive_data(bytes([byte]))
    assert any(isinstance(a, Send) and a.data.startswith(b"HTTP/1.1 400") for a in actions)


def test_an_oversized_frame_that_is_not_http_still_gets_frame_too_large() -> None:
    tally = Tally()
    conv = Conversation(LIMITS, tally.count)
    actions = conv.receive_data(b"\xff\xff\xff\xff")
    sent = [a for a in actions if isinstance(a, Send)]
    assert sent and not sent[0].data.startswith(b"HTTP/")
    assert tally.errors == {"frame_too_large": 1}
