"""Every error code provoked from outside, with its details; the daemon keeps serving after each."""

from __future__ import annotations

import signal
import struct
from pathlib import Path

import msgpack  # type: ignore[import-untyped]
import pytest

from embedd.inference.admission import estimate_tokens
from tests.conftest import Daemon, Reference, start_daemon, until_draining


def _error(response: dict[str, object]) -> dict[str, object]:
    assert response["ok"] is False, response
    err = response["error"]
    assert isinstance(err, dict)
    assert isinstance(err["message"], str) and err["message"]
    return err


def _still_serves(daemon: Daemon) -> None:
    assert daemon.call("embed", input="still here")["ok"]


def _frames(*messages: dict[str, object]) -> bytes:
    """Messages framed for one write: the daemon reads them together, in this order."""
    out = b""
    for message in messages:
        body = msgpack.packb(message)
        out += struct.pack(">I", len(body)) + body
    return out


# --- bad_request ------------------------------------------------------------------------------


def test_empty_string_input_is_bad_request_naming_its_index(daemon: Daemon) -> None:
    err = _error(daemon.call("embed", input=["fine", "also fine", ""]))
    assert err["code"] == "bad_request"
    assert err["index"] == 2
    assert "input[2]" in str(err["message"])


def test_non_string_input_is_bad_request_naming_its_index(daemon: Daemon) -> None:
    err = _error(daemon.call("embed", input=["fine", 42]))
    assert (err["code"], err["index"]) == ("bad_request", 1)
    assert "int" in str(err["message"])


def test_missing_input_is_bad_request_naming_the_key(daemon: Daemon) -> None:
    err = _error(daemon.call("embed"))
    assert (err["code"], err["key"]) == ("bad_request", "input")


def test_unknown_argument_is_bad_request_naming_it(daemon: Daemon) -> None:
    err = _error(daemon.call("embed", input="x", normalise=False))
    assert (err["code"], err["key"]) == ("bad_request", "normalise")


def test_mistyped_argument_is_bad_request_naming_it(daemon: Daemon) -> None:
    err = _error(daemon.call("embed", input="x", normalize="yes"))
    assert (err["code"], err["key"]) == ("bad_request", "normalize")


def test_dimensions_beyond_the_model_is_bad_request_with_limit(daemon: Daemon) -> None:
    err = _error(daemon.call("embed", input="x", dimensions=1000))
    assert (err["code"], err["key"], err["limit"]) == ("bad_request", "dimensions", 384)


def test_unknown_prompt_is_bad_request_listing_known_ones(daemon: Daemon) -> None:
    err = _error(daemon.call("embed", model="prompted", input="x", prompt="search"))
    assert err["code"] == "bad_request" and err["key"] == "prompt"
    assert "query" in str(err["message"])


def test_request_without_an_id_is_bad_request_answered_with_nil_id(daemon: Daemon) -> None:
    with daemon.connect() as conn:
        conn.send({"op": "hello"})
        r = conn.recv()
        assert r["id"] is None
        assert _error(r)["code"] == "bad_request"
        assert conn.call("hello")["ok"]  # the connection goes on


def test_reusing_an_id_in_flight_is_bad_request(daemon: Daemon, reference: Reference) -> None:
    with daemon.connect() as conn:
        conn.send({"id": 5, "op": "embed", "input": reference.chunks[:40]})
        conn.send({"id": 5, "op": "hello"})
        first = conn.recv()
        assert first["id"] == 5
        assert _error(first)["code"] == "bad_request"
        second = conn.recv()
        assert second["id"] == 5 and second["ok"] and second["count"] == 40


# --- unknown_op, unknown_model, model_load_failed -----------------------------------------------


def test_unknown_op_is_unknown_op(daemon: Daemon) -> None:
    err = _error(daemon.call("embedd"))
    assert err["code"] == "unknown_op"
    assert "embed" in str(err["message"])


def test_unknown_model_is_unknown_model_listing_configured_ones(daemon: Daemon) -> None:
    err = _error(daemon.call("embed", model="gpt-9", input="x"))
    assert err["code"] == "unknown_model"
    assert "default" in str(err["message"])


def test_missing_model_file_is_model_load_failed_and_others_keep_serving(daemon: Daemon) -> None:
    err = _error(daemon.call("embed", model="missing", input="x"))
    assert err["code"] == "model_load_failed"
    assert "not found" in str(err["message"])
    models = {m["name"]: m for m in daemon.call("models")["models"]}
    assert models["missing"]["state"] == "failed"
    assert "not found" in models["missing"]["error"]
    _still_serves(daemon)


def test_file_that_is_not_gguf_is_model_load_failed(daemon: Daemon) -> None:
    err = _error(daemon.call("load", model="notgguf"))
    assert err["code"] == "model_load_failed"
    assert "not a GGUF file" in str(err["message"])
    _still_serves(daemon)


# --- input_too_long ---------------------------------------------------------------------------


def test_over_long_input_is_input_too_long_with_index_tokens_and_limit(daemon: Daemon) -> None:
    err = _error(daemon.call("embed", input=["short", "word " * 300]))
    assert err["code"] == "input_too_long"
    assert (err["index"], err["tokens"], err["limit"]) == (1, 302, 256)


# --- busy, timeout, cancelled ------------------------------------------------------------------

BUSY_CONFIG = """
max_inflight = 4
[models.default]
path = "{bundled}"
max_tokens = 256
max_queue_tokens = 2000
"""


def test_full_queue_answers_busy_with_retry_after_at_once(
    workdir: Path, own_daemon: list[Daemon], reference: Reference
) -> None:
    d = start_daemon(workdir, BUSY_CONFIG)
    own_daemon.append(d)
    share = 1000  # one connection's half of max_queue_tokens = 2000
    # A first bulk request just under the connection's share, then one that would exceed it.
    first: list[str] = []
    for chunk in reference.chunks:
        if sum(estimate_tokens(t, 256) for t in [*first, chunk]) > share:
            break
        first.append(chunk)
    rest = reference.chunks[len(first) : len(first) + 2]
    with d.connect() as conn:
        conn.send_raw(
            _frames(
                {"id": 1, "op": "embed", "input": first, "priority": "bulk", "timeout": 600},
                {"id": 2, "op": "embed", "input": rest, "priority": "bulk"},
            )
        )
        # Refused at once: answered while the first is still being computed, not after it.
        second = conn.recv()
        assert second["id"] == 2
        err = _error(second)
        assert err["code"] == "busy"
        assert isinstance(err["retry_after"], float) and err["retry_after"] > 0
        assert err["limit"] == share
        assert conn.recv_for(1)["ok"]
        assert conn.call("embed", input=rest, priority="bulk")["ok"]  # drained: accepted again


def test_too_many_requests_in_flight_on_one_connection_is_busy(
    workdir: Path, own_daemon: list[Daemon], reference: Reference
) -> None:
    d = start_daemon(workdir, BUSY_CONFIG)
    own_daemon.append(d)
    with d.connect() as conn:
        for i in range(1, 6):
            conn.send({"id": i, "op": "embed", "input": reference.chunks[i : i + 2]})
        err = _error(conn.recv_for(5))
        assert (err["code"], err["limit"]) == ("busy", 4)
        assert all(conn.recv_for(i)["ok"] for i in range(1, 5))


def test_request_past_its_timeout_is_timeout_with_limit(
    daemon: Daemon, reference: Reference
) -> None:
    err = _error(daemon.call("embed", input=reference.chunks[:300], timeout=0.05))
    assert (err["code"], err["limit"]) == ("timeout", 0.05)
    _still_serves(daemon)


def test_cancel_answers_the_target_with_cancelled(daemon: Daemon, reference: Reference) -> None:
    before = daemon.model_stats()
    with daemon.connect() as conn:
        conn.send({"id": 1, "op": "embed", "input": reference.chunks[:300]})
        daemon.wait_until_computing(before)
        conn.send({"id": 2, "op": "cancel", "target": 1})
        assert conn.recv_for(2) == {"id": 2, "ok": True, "cancelled": True}
        assert _error(conn.recv_for(1))["code"] == "cancelled"
        assert conn.call("hello")["ok"]


def test_cancel_in_the_same_write_as_its_target_still_answers_the_target(
    daemon: Daemon,
) -> None:
    with daemon.connect() as conn:
        conn.send_raw(
            _frames({"id": 1, "op": "embed", "input": "x"}, {"id": 2, "op": "cancel", "target": 1})
        )
        assert conn.recv_for(2)["cancelled"] is True
        assert _error(conn.recv_for(1))["code"] == "cancelled"
        assert conn.call("hello")["ok"]
        conn.send({"id": 1, "op": "embed", "input": "the id is free again"})
        assert conn.recv_for(1)["ok"]


# --- frame_too_large, protocol_error: the stream is closed -------------------------------------


def test_oversize_frame_is_frame_too_large_then_the_connection_closes(daemon: Daemon) -> None:
    with daemon.connect() as conn:
        conn.send_raw(struct.pack(">I", 64 * 1024 * 1024 + 1))
        r = conn.recv()
        assert r["id"] is None
        err = _error(r)
        assert (err["code"], err["limit"]) == ("frame_too_large", 64 * 1024 * 1024)
        assert conn.is_closed_by_peer()
    _still_serves(daemon)


def test_body_that_is_not_msgpack_is_protocol_error_then_close(daemon: Daemon) -> None:
    with daemon.connect() as conn:
        conn.send_raw(struct.pack(">I", 3) + b"\xc1\xc1\xc1")
        assert _error(conn.recv())["code"] == "protocol_error"
        assert conn.is_closed_by_peer()
    _still_serves(daemon)


def test_body_that_is_not_a_map_is_protocol_error(daemon: Daemon) -> None:
    body = msgpack.packb(["id", 1])
    with daemon.connect() as conn:
        conn.send_raw(struct.pack(">I", len(body)) + body)
        assert _error(conn.recv())["code"] == "protocol_error"


def test_valid_frame_before_garbage_is_still_answered(daemon: Daemon) -> None:
    body = msgpack.packb({"id": 9, "op": "hello"})
    with daemon.connect() as conn:
        conn.send_raw(struct.pack(">I", len(body)) + body + b"\x00\x00\x00\x02\xc1\xc1")
        answers = {conn.recv()["id"], conn.recv()["id"]}
        assert answers == {9, None}


# --- forbidden, shutting_down ------------------------------------------------------------------


def test_shutdown_is_forbidden_unless_allowed(daemon: Daemon) -> None:
    err = _error(daemon.call("shutdown"))
    assert err["code"] == "forbidden"
    assert "allow_shutdown" in str(err["message"])
    _still_serves(daemon)


def test_shutdown_when_allowed_stops_the_daemon(workdir: Path, own_daemon: list[Daemon]) -> None:
    d = start_daemon(workdir, "allow_shutdown = true\n")
    own_daemon.append(d)
    answer = d.call("shutdown")
    assert answer["ok"] is True and set(answer) == {"id", "ok"}
    assert d.proc.wait(30) == 0
    assert not d.socket.exists()


def test_new_request_while_draining_is_shutting_down(
    workdir: Path, own_daemon: list[Daemon]
) -> None:
    # A grace longer than the test: request 1 is answered once the model continues.
    d = start_daemon(workdir, "shutdown_grace = 600\n")
    own_daemon.append(d)
    d.call("load")
    conn = d.connect()
    with d.model_stopped():
        conn.send({"id": 1, "op": "embed", "input": ["in flight", "at the signal"]})
        d.wait_for(lambda s: s["requests"] >= 1, "request 1 taken by the model thread")
        d.proc.send_signal(signal.SIGTERM)
        until_draining(conn)
        conn.send({"id": 2, "op": "embed", "input": "late"})
        assert _error(conn.recv_for(2))["code"] == "shutting_down"
        conn.send({"id": 3, "op": "health"})
        assert conn.recv_for(3)["status"] == "shutting_down"
    assert conn.recv_for(1)["ok"]
    assert d.proc.wait(30) == 0


@pytest.mark.parametrize("bad_id", [-1, "7", 1.5, None])
def test_invalid_id_is_bad_request(daemon: Daemon, bad_id: object) -> None:
    with daemon.connect() as conn:
        conn.send({"id": bad_id, "op": "hello"})
        err = _error(conn.recv())
        assert (err["code"], err["key"]) == ("bad_request", "id")
