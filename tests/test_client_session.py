"""The client's protocol core alone (`_Session` and the op builders): no socket, no daemon."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import embedd_client as ec
import msgpack  # type: ignore[import-untyped]
import numpy as np
import pytest


def frame(message: dict[str, Any]) -> bytes:
    body: bytes = msgpack.packb(message, use_bin_type=True)
    return len(body).to_bytes(4, "big") + body


def sent(data: bytes) -> dict[str, Any]:
    decoded: dict[str, Any] = msgpack.unpackb(data[4:], raw=False)
    return decoded


def test_a_request_gets_a_fresh_id_and_is_framed() -> None:
    session = ec._Session(max_frame=1 << 20)
    rid1, data1 = session.request("hello", {})
    rid2, _ = session.request("health", {})
    assert rid2 == rid1 + 1
    assert sent(data1) == {"id": rid1, "op": "hello"}
    assert session.pending == {rid1, rid2}


def test_an_id_argument_is_refused() -> None:
    with pytest.raises(TypeError):
        ec._Session(max_frame=100).request("hello", {"id": 5})


def test_answers_cut_at_every_byte_boundary_come_out_whole_and_once() -> None:
    session = ec._Session(max_frame=1 << 20)
    a, _ = session.request("hello", {})
    b, _ = session.request("health", {})
    data = frame({"id": b, "ok": True, "x": 2}) + frame({"id": a, "ok": True, "x": 1})
    for cut in range(len(data) + 1):
        s = ec._Session(max_frame=1 << 20, pending={a, b})
        got = s.receive(data[:cut]) + s.receive(data[cut:])
        assert [(rid, m["x"]) for rid, m in got] == [(b, 2), (a, 1)], cut
        assert s.pending == set() and s.worked


def test_answers_to_requests_nobody_waits_for_are_skipped() -> None:
    session = ec._Session(max_frame=1 << 20)
    rid, _ = session.request("embed", {"input": "x"})
    cancel = session.abandon(rid)
    assert cancel is not None and sent(cancel)["target"] == rid
    assert session.receive(frame({"id": rid, "ok": True})) == []


def test_abandoning_an_answered_request_sends_nothing() -> None:
    session = ec._Session(max_frame=1 << 20)
    rid, _ = session.request("hello", {})
    session.receive(frame({"id": rid, "ok": True}))
    assert session.abandon(rid) is None


def test_an_error_frame_without_id_fails_the_stream_with_the_daemons_reason() -> None:
    session = ec._Session(max_frame=1 << 20)
    session.request("hello", {})
    busy = {"code": "busy", "message": "too many connections", "retry_after": 1.0}
    with pytest.raises(ec.BusyError) as info:
        session.receive(frame({"id": None, "ok": False, "error": busy}))
    assert info.value.retry_after == 1.0
    with pytest.raises(ec.BusyError):  # the connection stays failed
        session.receive(b"")


def test_a_frame_over_max_frame_is_refused_before_its_body_arrives() -> None:
    session = ec._Session(max_frame=100)
    with pytest.raises(ec.EmbeddError) as info:
        session.receive((101).to_bytes(4, "big"))
    assert (info.value.code, info.value.limit) == ("frame_too_large", 100)


def test_garbage_from_the_daemon_is_a_protocol_error() -> None:
    with pytest.raises(ec.EmbeddError) as info:
        ec._Session(max_frame=100).receive(b"\x00\x00\x00\x01\xc1")
    assert info.value.code == "protocol_error"


def test_an_http_reply_is_named_as_embedds_http_socket() -> None:
    session = ec._Session(max_frame=ec.DEFAULT_MAX_FRAME)
    session.request("hello", {})
    with pytest.raises(ec.EmbeddError) as info:
        session.receive(b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n\r\n")
    assert info.value.code == "protocol_error"
    assert "this is embedd's HTTP socket, not its msgpack socket" in info.value.message


def test_http_arriving_a_byte_at_a_time_is_named_too_not_a_frame_too_large() -> None:
    # "HTTP" read as a length prefix is 1,213,486,160 bytes, over the default max_frame.
    session = ec._Session(max_frame=ec.DEFAULT_MAX_FRAME)
    for byte in b"HTTP":
        assert session.receive(bytes([byte])) == []
    with pytest.raises(ec.EmbeddError) as info:
        session.receive(b"/")
    assert "HTTP socket" in info.value.message


def test_a_value_msgpack_cannot_carry_is_refused_naming_its_argument() -> None:
    session = ec._Session(max_frame=100)
    with pytest.raises(ec.EmbeddError) as info:
        session.request("embed", {"input": "x", "overlap": 10**20})
    assert (info.value.code, info.value.key) == ("bad_request", "overlap")
    assert "overlap = 100000000000000000000" in info.value.message
    assert session.pending == set()


def test_a_resend_needs_a_connection_that_had_worked_and_an_op_safe_to_repeat() -> None:
    session = ec._Session(max_frame=100)
    assert not session.may_resend(allowed=True, fresh=False)  # it never worked
    session.worked = True
    assert session.may_resend(allowed=True, fresh=False)
    assert not session.may_resend(allowed=True, fresh=True)  # a new connection broke: no
    assert not session.may_resend(allowed=False, fresh=False)  # e.g. shutdown


def test_embed_options_become_the_request_arguments() -> None:
    call = ec._embed(["a"], "m", {"truncate": True, "priority": "bulk", "timeout": 5.0})
    assert call.args == {
        "input": ["a"],
        "model": "m",
        "encoding": "f32",
        "truncate": True,
        "priority": "bulk",
        "timeout": 5.0,
    }
    assert call.wait(150.0) == 5.0 + ec._TIMEOUT_GRACE


@pytest.mark.parametrize("timeout", [0.0, -1.0, float("nan"), float("inf"), 1e10])
def test_a_timeout_the_daemon_would_refuse_is_refused_here_without_overflow(
    timeout: float,
) -> None:
    with pytest.raises(ec.EmbeddError) as info:
        ec._embed("x", "default", {"timeout": timeout})
    assert (info.value.code, info.value.key) == ("bad_request", "timeout")
    assert info.value.limit == ec.MAX_TIMEOUT


def test_embed_results_decode_to_float32_rows() -> None:
    data = np.arange(6, dtype="<f4").tobytes()
    rows = ec._embed(["a", "b"], "m", {}).parse({"count": 2, "dim": 3, "embeddings": data})
    assert rows.shape == (2, 3) and rows.flags.writeable
    one = ec._embed("a", "m", {}).parse({"count": 1, "dim": 3, "embeddings": data[:12]})
    assert one.shape == (3,)


def test_pool_none_answers_a_row_per_window_even_for_one_string() -> None:
    data = np.arange(6, dtype="<f4").tobytes()
    call = ec._embed("a", "m", {"long": "split", "pool": "none"})
    assert call.parse({"count": 2, "dim": 3, "embeddings": data}).shape == (2, 3)


def test_embed_windows_asks_for_every_window_unpooled() -> None:
    call = ec._embed_windows("text", "m", {"overlap": 8, "prompt": "document"})
    assert call.args == {
        "input": ["text"],
        "model": "m",
        "encoding": "f32",
        "overlap": 8,
        "prompt": "document",
        "long": "split",
        "pool": "none",
    }


def test_windows_pair_each_vector_with_its_input_span_and_text() -> None:
    vectors = np.arange(6, dtype="<f4").reshape(3, 2)
    answer = {
        "count": 3,
        "dim": 2,
        "embeddings": vectors.tobytes(),
        "windows": [2, 1],
        "spans": [[0, 4], [2, 6], [0, 2]],
    }
    windows = ec._embed_windows(["abcdef", "xy"], "m", {}).parse(answer)
    assert [(w.input, w.span, w.text) for w in windows] == [
        (0, (0, 4), "abcd"),
        (0, (2, 6), "cdef"),
        (1, (0, 2), "xy"),
    ]
    assert all((w.vector == row).all() for w, row in zip(windows, vectors, strict=True))


@pytest.mark.parametrize(
    ("windows", "spans"),
    [([2, 1], [[0, 4], [0, 2]]), ([1], [[0, 4], [2, 6], [0, 2]]), (None, [[0, 1]] * 3)],
)
def test_window_counts_or_spans_that_do_not_fit_the_vectors_are_a_protocol_error(
    windows: list[int] | None, spans: list[list[int]]
) -> None:
    answer = {
        "count": 3,
        "dim": 2,
        "embeddings": bytes(24),
        "windows": windows,
        "spans": spans,
    }
    with pytest.raises(ec.EmbeddError) as info:
        ec._embed_windows(["abcdef", "xy"], "m", {}).parse(answer)
    assert info.value.code == "protocol_error"


def test_the_async_client_has_every_method_of_the_blocking_one_with_the_same_signature() -> None:
    # One line per op in each shell: this is what keeps the two from drifting apart.
    def public(cls: type) -> dict[str, inspect.Signature]:
        return {
            name: inspect.signature(member)
            for name, member in vars(cls).items()
            if callable(member) and not name.startswith("_")
        }

    sync, asynchronous = public(ec.Client), public(ec.AsyncClient)
    del sync["close"], asynchronous["aclose"]
    assert set(sync) == set(asynchronous)
    for name, signature in sync.items():
        other = asynchronous[name]
        assert signature.parameters == other.parameters, name
        returns = str(other.return_annotation)
        assert returns == str(signature.return_annotation).replace("Iterator", "AsyncIterator")


def test_documents_are_sent_in_bounded_batches_from_any_iterable() -> None:
    texts = (f"t{i}" for i in range(10))
    assert [len(b) for b in ec._batches(texts, 4)] == [4, 4, 2]


CLIENT_DIR = Path(ec.__file__).resolve().parent


def _mypy(tmp_path: Path, call: str) -> subprocess.CompletedProcess[str]:
    snippet = tmp_path / "snippet.py"
    snippet.write_text(f"import embedd_client\n\nembedd_client.Client().{call}\n")
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(snippet)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "MYPYPATH": str(CLIENT_DIR)},
    )


def test_a_misspelt_embed_option_fails_the_type_check(tmp_path: Path) -> None:
    out = _mypy(tmp_path, 'embed("x", normalise=True)')
    assert out.returncode == 1, out.stdout
    assert '"normalise"' in out.stdout


def test_correct_embed_options_pass_the_type_check(tmp_path: Path) -> None:
    out = _mypy(
        tmp_path, 'embed("x", normalize=False, long="split", overlap=8, pool="none", cache=True)'
    )
    assert out.returncode == 0, out.stdout


def test_embed_windows_takes_no_option_that_would_undo_the_split(tmp_path: Path) -> None:
    out = _mypy(tmp_path, 'embed_windows("x", overlap=8, long="truncate")')
    assert out.returncode == 1, out.stdout
    assert '"long"' in out.stdout
