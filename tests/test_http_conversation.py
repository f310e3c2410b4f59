"""The HTTP conversation alone: bytes in, actions out, no sockets, no daemon."""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedd.http import api as http_api
from embedd.http.api import ApiError, Response
from embedd.http.conversation import (
    PIPELINE_BUFFER,
    Action,
    HttpConversation,
    HttpLimits,
    RunEndpoint,
    refusal,
)
from embedd.http.parser import HttpError, HttpParser
from embedd.transport.counters import Tally
from embedd.wire.answers import EmbedAnswer, Usage
from embedd.wire.conversation import CancelTask, Close, Send
from embedd.wire.errors import Code, EmbeddError
from embedd.wire.messages import Limits
from tests.conftest import parse_all

KEY = "s3cret"
LIMITS = HttpLimits(max_body=1 << 20)


def post(path: str, body: bytes, *, key: str | None = None, extra: str = "") -> bytes:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    head = f"POST {path} HTTP/1.1\r\nContent-Length: {len(body)}\r\n{auth}{extra}\r\n"
    return head.encode() + body


def get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\n{extra}\r\n".encode()


def dispatches(actions: list[Action]) -> list[RunEndpoint]:
    return [a for a in actions if isinstance(a, RunEndpoint)]


def statuses(actions: list[Action]) -> list[int]:
    """The status of every response sent (100 Continue excluded)."""
    out = []
    for a in actions:
        if isinstance(a, Send) and a.data.startswith(b"HTTP/1.1 ") and a.data[9:12] != b"100":
            out.append(int(a.data.split(b" ", 2)[1]))
    return out


OK = Response(HTTPStatus.OK, {"ok": True})


def test_a_request_is_dispatched_once_and_its_answer_keeps_the_connection() -> None:
    conv = HttpConversation(LIMITS)
    [d] = dispatches(conv.receive_data(get("/health")))
    assert d.route.name == "health" and conv.inflight == 1
    [answer] = conv.finish(d.rid, OK)
    assert isinstance(answer, Send) and b"Connection: keep-alive" in answer.data
    assert conv.finish(d.rid, OK) == []  # never twice
    assert not conv.reading_done and conv.inflight == 0


def test_pipelined_requests_are_taken_one_at_a_time() -> None:
    conv = HttpConversation(LIMITS)
    actions = conv.receive_data(get("/health") + get("/api/version") + get("/v1/models"))
    [first] = dispatches(actions)
    assert conv.inflight == 1
    [second] = dispatches(conv.finish(first.rid, OK))
    [third] = dispatches(conv.finish(second.rid, OK))
    assert [first.route.name, second.route.name, third.route.name] == [
        "health",
        "ollama_version",
        "openai_models",
    ]


def test_while_a_request_is_answered_the_shell_reads_only_a_bounded_amount() -> None:
    conv = HttpConversation(LIMITS)
    [d] = dispatches(conv.receive_data(get("/health")))
    assert conv.wants_data  # a close by the client must still be seen
    assert conv.receive_data(get("/health") * (PIPELINE_BUFFER // 20)) == []
    assert not conv.wants_data
    assert not conv.mid_frame  # bytes behind the answered request start no frame deadline
    assert dispatches(conv.finish(d.rid, OK))


def test_the_key_is_checked_on_the_head_before_any_body_arrives() -> None:
    conv = HttpConversation(HttpLimits(max_body=1 << 30, api_key=KEY))
    head = b"POST /v1/embeddings HTTP/1.1\r\nContent-Length: 1000000000\r\n\r\n"
    actions = conv.receive_data(head)
    assert statuses(actions) == [401] and isinstance(actions[-1], Close)
    assert conv.reading_done and not dispatches(actions)


def test_an_unknown_path_without_the_key_is_refused_too() -> None:
    conv = HttpConversation(HttpLimits(max_body=1 << 20, api_key=KEY))
    assert statuses(conv.receive_data(post("/nowhere", b"x" * 100))) == [401]


def test_the_right_key_and_the_health_probe_pass() -> None:
    conv = HttpConversation(HttpLimits(max_body=1 << 20, api_key=KEY))
    [d] = dispatches(conv.receive_data(post("/v1/embeddings", b"{}", key=KEY)))
    assert d.request.body == b"{}"
    conv.finish(d.rid, OK)
    assert dispatches(conv.receive_data(get("/health")))


@pytest.mark.parametrize("key", [KEY, None])
@pytest.mark.parametrize("line", ["GET /health", "OPTIONS /v1/embeddings", "OPTIONS /x"])
@pytest.mark.parametrize("framing", ["Content-Length: 1000000000", "Transfer-Encoding: chunked"])
def test_a_request_that_needs_no_key_takes_no_body(
    key: str | None, line: str, framing: str
) -> None:
    conv = HttpConversation(HttpLimits(max_body=1 << 30, api_key=key))
    actions = conv.receive_data(f"{line} HTTP/1.1\r\n{framing}\r\n\r\n".encode())
    assert statuses(actions) == [413] and isinstance(actions[-1], Close)
    assert b"takes no body" in b"".join(a.data for a in actions if isinstance(a, Send))
    assert conv.reading_done and not dispatches(actions)


def test_a_request_that_needs_no_key_with_an_empty_body_is_served() -> None:
    conv = HttpConversation(HttpLimits(max_body=1 << 20, api_key=KEY))
    assert dispatches(conv.receive_data(get("/health", "Content-Length: 0\r\n")))


def test_a_401_carries_the_cors_headers_for_an_allowed_origin_only() -> None:
    limits = HttpLimits(max_body=1 << 20, api_key=KEY, cors_origins=("http://app.example",))
    allowed = HttpConversation(limits).receive_data(
        post("/v1/embeddings", b"{}", extra="Origin: http://app.example\r\n")
    )
    assert statuses(allowed) == [401]
    assert b"Access-Control-Allow-Origin: http://app.example\r\n" in allowed[0].data  # type: ignore[union-attr]
    other = HttpConversation(limits).receive_data(
        post("/v1/embeddings", b"{}", extra="Origin: https://evil.example\r\n")
    )
    assert statuses(other) == [401]
    assert b"Access-Control-Allow-Origin" not in other[0].data  # type: ignore[union-attr]


def test_expect_100_continue_is_answered_after_the_head() -> None:
    conv = HttpConversation(LIMITS)
    head = b"POST /api/embed HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
    [cont] = conv.receive_data(head)
    assert cont == Send(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert dispatches(conv.receive_data(b"{}"))


def test_a_half_closed_client_gets_every_answer_then_the_close() -> None:
    conv = HttpConversation(LIMITS)
    [a] = dispatches(conv.receive_data(get("/health") + get("/api/version")))
    assert conv.peer_closed(gone=False) == []
    [b] = dispatches(conv.finish(a.rid, OK))
    actions = conv.finish(b.rid, OK)
    assert statuses(actions) == [200] and isinstance(actions[-1], Close)


def test_a_client_that_goes_away_has_its_work_cancelled() -> None:
    conv = HttpConversation(LIMITS)
    [d] = dispatches(conv.receive_data(get("/health")))
    assert conv.peer_closed(gone=True) == [CancelTask(d.rid)]
    assert conv.finish(d.rid, EmbeddError(Code.CANCELLED, "gone")) == [Close()]


def test_a_request_that_stops_arriving_gets_408_and_the_close() -> None:
    conv = HttpConversation(LIMITS)
    conv.receive_data(post("/api/embed", b"{}")[:-1])
    assert conv.mid_frame
    actions = conv.timed_out()
    assert statuses(actions) == [408] and actions[-1] == Close()


def test_an_idle_connection_that_times_out_just_closes() -> None:
    assert HttpConversation(LIMITS).timed_out() == [Close()]


def test_the_drain_closes_an_idle_connection_and_lets_one_in_flight_answer() -> None:
    assert HttpConversation(LIMITS).shutdown() == [Close()]
    conv = HttpConversation(LIMITS)
    [d] = dispatches(conv.receive_data(get("/health") + get("/health")))
    assert conv.shutdown() == []
    answer, close = conv.finish(d.rid, OK)
    assert isinstance(answer, Send) and b"Connection: close" in answer.data
    assert close == Close()


def test_an_error_takes_its_apis_shape() -> None:
    conv = HttpConversation(LIMITS)
    [d] = dispatches(conv.receive_data(post("/api/embed", b"{}")))
    [answer] = conv.finish(d.rid, EmbeddError(Code.UNKNOWN_MODEL, "no model x"))
    assert answer.data.startswith(b"HTTP/1.1 404")  # type: ignore[union-attr]
    assert answer.data.endswith(b'{"error":"no model x"}')  # type: ignore[union-attr]


def test_a_refusal_at_the_door_for_too_many_connections_is_503() -> None:
    busy = EmbeddError(Code.BUSY, "too many connections", retry_after=1.0, limit=8)
    data = refusal(busy)
    assert data.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in data


@pytest.mark.parametrize("size", [b"0x1c", b"+1c", b"1_0", b"-0", b" 1c", b"", b"1" * 17])
def test_a_chunk_size_that_is_not_hex_digits_is_refused(size: bytes) -> None:
    head = b"POST /api/embed HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = size + b"\r\n" + b"x" * 28 + b"\r\n0\r\n\r\n"
    [event] = parse_all(HttpParser(max_body=1 << 20), head + body)
    assert isinstance(event, HttpError) and event.status == HTTPStatus.BAD_REQUEST


def test_json_nested_a_hundred_thousand_deep_is_400() -> None:
    with pytest.raises(ApiError) as info:
        http_api.parse_json(b"[" * 100_000)
    assert info.value.response.status == HTTPStatus.BAD_REQUEST


def test_a_json_float_answer_is_sized_at_its_encoded_size_not_four_bytes() -> None:
    # The defect's request: 40,000 texts of 384 dimensions as JSON floats.
    size = http_api.answer_bytes(40_000, 384, "float")
    assert size > 40_000 * 384 * 20
    with pytest.raises(EmbeddError) as info:
        http_api.check_answer_size(size, 64 * 1024 * 1024)
    assert "max_response" in info.value.message


@pytest.mark.parametrize("fmt", ["float", "base64"])
@pytest.mark.parametrize("dim", [1, 2, 3, 64, 384, 1024])
def test_an_embedding_answers_sizing_covers_its_json(fmt: str, dim: int) -> None:
    # The widest JSON floats: negative, 17 significant digits and an exponent.
    vectors = np.full((3, dim), -1.2345678e-05, dtype=np.float32)
    answer = EmbedAnswer("default", vectors, [9] * 3, [False] * 3, [1] * 3, Usage(27))
    call = http_api.openai_embed(
        {"model": "default", "input": ["x"] * 3, "encoding_format": fmt}, Limits()
    )
    encoded = http_api.openai_embed_json(call, answer)
    assert len(encoded) <= http_api.answer_sizing(fmt).size(3, dim)
    assert json.loads(encoded)["usage"]["prompt_tokens"] == 27


def test_every_http_response_is_counted_ok_or_under_its_code() -> None:
    tally = Tally()
    conv = HttpConversation(HttpLimits(max_body=1 << 20, api_key=KEY), tally)
    [first] = dispatches(conv.receive_data(post("/v1/embeddings", b"{}", key=KEY)))
    conv.finish(first.rid, OK)
    [second] = dispatches(conv.receive_data(post("/api/embed", b"{}", key=KEY)))
    conv.finish(second.rid, EmbeddError(Code.UNKNOWN_MODEL, "no such model"))
    assert statuses(conv.receive_data(get("/nowhere", f"Authorization: Bearer {KEY}\r\n"))) == [404]
    assert statuses(conv.receive_data(get("/v1/models"))) == [401]
    assert (tally.total, tally.ok) == (4, 1)
    assert tally.errors == {"unknown_model": 1, "http_404": 1, "http_401": 1}


# --- hypothesis: every request answered exactly once, or the connection closed with a 4xx --


def drive(conv: HttpConversation, pieces: list[bytes], answer: Any) -> list[Action]:
    """Feed `pieces`, finishing each dispatch at once with `answer(dispatch)`; checks that
    every dispatch gets exactly one response and nothing follows a Close."""
    seen: list[Action] = []
    pending = [a for p in pieces for a in conv.receive_data(p)]
    rids: set[int] = set()
    while pending:
        action = pending.pop(0)
        assert not any(isinstance(a, Close) for a in seen), "an action after Close"
        seen.append(action)
        if isinstance(action, RunEndpoint):
            assert action.rid not in rids
            rids.add(action.rid)
            response = answer(action)
            out = conv.finish(action.rid, response)
            # Its answer comes first (then whatever the next request gets), and only once.
            assert statuses(out[:1]) == [response.status], out
            assert conv.finish(action.rid, response) == []
            pending = out + pending
    seen += conv.peer_closed(gone=False)
    return seen


def _check_outcome(actions: list[Action]) -> None:
    codes = statuses(actions)
    dispatched = len(dispatches(actions))
    assert len(codes) >= dispatched
    # Answers not produced by a dispatch are the conversation's own refusals: all 4xx.
    own = [c for c in codes if c != 200]
    assert all(400 <= c < 500 for c in own), codes
    assert isinstance(actions[-1], Close) or not actions


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=600), st.integers(min_value=1, max_value=64))
def test_any_bytes_in_any_pieces_get_one_answer_per_request_or_a_4xx_close(
    data: bytes, piece: int
) -> None:
    conv = HttpConversation(HttpLimits(max_body=256))
    pieces = [data[i : i + piece] for i in range(0, len(data), piece)]
    _check_outcome(drive(conv, pieces, lambda d: OK))


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.sampled_from([get("/health"), get("/nowhere"), post("/api/embed", b"{}"), b"\r\n"]),
        max_size=6,
    ),
    st.binary(max_size=40),
)
def test_valid_requests_followed_by_garbage_are_each_answered(
    requests: list[bytes], tail: bytes
) -> None:
    conv = HttpConversation(LIMITS)
    _check_outcome(drive(conv, [b"".join(requests) + tail], lambda d: OK))


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
BODIES = st.one_of(
    JSON,
    st.fixed_dictionaries(
        {"model": st.sampled_from(["default", "x", 5, None]), "input": JSON},
        optional={
            "encoding_format": st.sampled_from(["float", "base64", "hex", 1]),
            "dimensions": st.integers(-2, 500) | st.none(),
            "truncate": JSON,
            "prompt": JSON,
        },
    ),
)


def _translate(d: RunEndpoint) -> Response:
    """What the endpoint does before the daemon: the body's JSON and its translation onto
    the typed request. Errors take the route's shape, as the shell reports them."""
    try:
        body = http_api.parse_json(d.request.body)
        if d.route.name == "openai_embeddings":
            http_api.openai_embed(body, Limits())
        else:
            http_api.ollama_embed(body, Limits())
    except ApiError as exc:
        return exc.response
    except EmbeddError as exc:
        return d.route.errors(exc)
    return OK


@settings(max_examples=100, deadline=None)
@given(BODIES, st.sampled_from(["/v1/embeddings", "/api/embed"]))
def test_any_json_body_on_the_embedding_endpoints_is_answered_once_with_200_or_4xx(
    body: Any, path: str
) -> None:
    conv = HttpConversation(LIMITS)
    data = json.dumps(body).encode()
    actions = drive(conv, [post(path, data)], _translate)
    [code] = statuses(actions)  # exactly one answer
    assert code == 200 or 400 <= code < 500


@pytest.mark.slow
@settings(max_examples=5000, deadline=None)
@given(st.binary(max_size=4096), st.integers(min_value=1, max_value=512))
def test_many_more_bytes_in_any_pieces(data: bytes, piece: int) -> None:
    conv = HttpConversation(HttpLimits(max_body=1024))
    pieces = [data[i : i + piece] for i in range(0, len(data), piece)]
    _check_outcome(drive(conv, pieces, lambda d: OK))


@pytest.mark.slow
@settings(max_examples=3000, deadline=None)
@given(BODIES, st.sampled_from(["/v1/embeddings", "/api/embed"]))
def test_many_more_json_bodies(body: Any, path: str) -> None:
    conv = HttpConversation(LIMITS)
    actions = drive(conv, [post(path, json.dumps(body).encode())], _translate)
    [code] = statuses(actions)
    assert code == 200 or 400 <= code < 500
