"""The Python client (`embedd_client`) against the real daemon; nothing is mocked."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from pathlib import Path

import embedd_client as ec
import numpy as np
import numpy.typing as npt
import pytest

from embedd.config import default_socket_path as daemon_default_socket_path
from tests.conftest import Daemon, Reference, cosines, short_tmpdir, start_daemon

DIM = 384
Vec = npt.NDArray[np.float32]


def _norm(v: Vec) -> float:
    return float(np.linalg.norm(v.astype(np.float64)))


def _restart(old: Daemon, workdir: Path, own_daemon: list[Daemon]) -> Daemon:
    """Stop the daemon and start a new one on the same socket, as a service manager would."""
    assert old.stop() == 0
    new = start_daemon(workdir)
    own_daemon.append(new)
    assert new.socket == old.socket
    return new


# --- the socket path --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "env",
    [
        {"EMBEDD_SOCKET": "/x/e.sock", "XDG_RUNTIME_DIR": "/run/user/7"},
        {"EMBEDD_SOCKET": "", "XDG_RUNTIME_DIR": "/run/user/7"},
        {},
    ],
)
def test_default_socket_path_agrees_with_the_daemon(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str]
) -> None:
    monkeypatch.delenv("EMBEDD_SOCKET", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert ec.default_socket_path() == daemon_default_socket_path()


def test_default_socket_path_prefers_embedd_socket_then_runtime_dir_then_tmp(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EMBEDD_SOCKET", "/x/e.sock")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/7")
    assert ec.default_socket_path() == Path("/x/e.sock")
    monkeypatch.delenv("EMBEDD_SOCKET")
    assert ec.default_socket_path() == Path("/run/user/7/embedd/embedd.sock")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert ec.default_socket_path() == Path(f"/tmp/embedd-{os.getuid()}/embedd.sock")


# --- blocking client: operations -------------------------------------------------------------


def test_hello_reports_protocol_1_and_the_daemon_pid(daemon: Daemon) -> None:
    with ec.Client(daemon.socket) as client:
        hello = client.hello()
    assert hello["protocol"] == 1
    assert hello["pid"] == daemon.proc.pid
    assert "default" in hello["models"]


def test_request_returns_the_result_without_id_and_ok(daemon: Daemon) -> None:
    with ec.Client(daemon.socket) as client:
        result = client.request("health")
    assert "id" not in result and "ok" not in result
    assert result["status"] == "ok"


def test_request_refuses_an_id_argument(daemon: Daemon) -> None:
    with ec.Client(daemon.socket) as client, pytest.raises(TypeError):
        client.request("hello", id=5)


def test_health_and_stats_answer(daemon: Daemon) -> None:
    with ec.Client(daemon.socket) as client:
        assert client.health()["status"] == "ok"
        stats = client.stats()
    assert stats["connections"]["open"] >= 1
    assert "default" in stats["models"]


def test_models_lists_every_configured_model(daemon: Daemon) -> None:
    with ec.Client(daemon.socket) as client:
        models = client.models()
    assert {m["name"] for m in models} == {"default", "prompted", "missing", "notgguf"}
    assert all("state" in m and "path" in m for m in models)


def test_load_and_unload_return_the_model_map(daemon: Daemon) -> None:
    with ec.Client(daemon.socket) as client:
        loaded = client.load("prompted")
        assert (loaded["name"], loaded["state"], loaded["dim"]) == ("prompted", "ready", DIM)
        unloaded = client.unload("prompted")
    assert (unloaded["state"], unloaded["memory"]) == ("unloaded", 0)


def test_embed_single_string_returns_1d_vector(daemon: Daemon) -> None:
    with ec.Client(daemon.socket) as client:
        v = client.embed("The quick brown fox")
    assert v.shape == (DIM,)
    assert v.dtype == np.float32
    assert abs(_norm(v) - 1.0) < 1e-5


def test_embed_list_returns_2d_array_in_input_order(daemon: Daemon) -> None:
    texts = ["alpha", "a completely different sentence", "gamma"]
    with ec.Client(daemon.socket) as client:
        batch = client.embed(texts)
        one_by_one = np.stack([client.embed(t) for t in texts])
    assert batch.shape == (3, DIM)
    # Batching changes the last digits, hence cosines rather than equality.
    assert cosines(batch, one_by_one).min() >= 0.9999


def test_embed_returns_a_writable_array(daemon: Daemon) -> None:
    with ec.Client(daemon.socket) as client:
        v = client.embed(["x", "y"])
    v *= 2  # would raise on a read-only view of the response bytes
    assert v.flags.writeable


def test_embed_matches_the_reference_vectors(daemon: Daemon, reference: Reference) -> None:
    with ec.Client(daemon.socket) as client:
        got = client.embed(reference.queries[:20])
    assert cosines(got, reference.q_vecs[:20]).min() >= 0.9999


def test_embed_dimensions_keeps_the_first_components_renormalized(daemon: Daemon) -> None:
    with ec.Client(daemon.socket) as client:
        full = client.embed("matryoshka")
        cut = client.embed("matryoshka", dimensions=64)
    assert cut.shape == (64,)
    assert abs(_norm(cut) - 1.0) < 1e-5
    assert cosines(cut[None, :], full[None, :64])[0] >= 0.99999  # two separate decodes


def test_embed_without_normalize_returns_raw_vectors(daemon: Daemon) -> None:
    with ec.Client(daemon.socket) as client:
        raw = client.embed("hello there", normalize=False)
        norm = client.embed("hello there")
    assert _norm(raw) > 1.5
    assert cosines(raw[None, :], norm[None, :])[0] >= 0.99999  # two separate decodes


def test_embed_truncate_accepts_an_input_that_is_too_long(daemon: Daemon) -> None:
    with ec.Client(daemon.socket) as client:
        v = client.embed(["word " * 400, "short"], truncate=True)
    assert v.shape == (2, DIM)


def test_embed_prompt_equals_spelling_out_the_prefix(daemon: Daemon) -> None:
    with ec.Client(daemon.socket) as client:
        prompted = client.embed("open a file", "prompted", prompt="query")
        spelled = client.embed("query: open a file", "prompted")
    assert cosines(prompted[None, :], spelled[None, :])[0] >= 0.99999  # two separate decodes


def test_embed_timeout_is_sent_to_the_daemon(daemon: Daemon, reference: Reference) -> None:
    with ec.Client(daemon.socket) as client:
        with pytest.raises(ec.EmbeddError) as info:
            client.embed(reference.chunks[:300], timeout=0.05)
        assert info.value.code == "timeout"
        assert info.value.limit == 0.05  # the daemon's error, not ours
        assert client.health()["status"] == "ok"


def test_tokenize_returns_one_id_list_per_input(daemon: Daemon) -> None:
    with ec.Client(daemon.socket) as client:
        assert client.tokenize(["hello world", "hi"]) == [[101, 7592, 2088, 102], [101, 7632, 102]]
        assert client.tokenize("hello world") == [[101, 7592, 2088, 102]]


def test_tokenize_with_prompt_counts_the_prefix(daemon: Daemon) -> None:
    with ec.Client(daemon.socket) as client:
        plain = client.tokenize("x", "prompted")
        prompted = client.tokenize("x", "prompted", prompt="query")
    assert len(prompted[0]) > len(plain[0])


# --- long inputs: split into windows --------------------------------------------------------


def _long_text(reference: Reference) -> str:
    return " ".join(reference.chunks_long[:3])  # ~480 tokens: two or three windows


def test_embed_long_split_gives_one_vector_per_input(daemon: Daemon, reference: Reference) -> None:
    with ec.Client(daemon.socket) as client:
        assert client.embed(_long_text(reference), long="split").shape == (DIM,)
        assert client.embed([_long_text(reference), "short"], long="split").shape == (2, DIM)


def test_an_input_that_fits_gets_the_same_vector_with_long_split(daemon: Daemon) -> None:
    with ec.Client(daemon.socket) as client:
        split = client.embed("a short sentence", long="split", overlap=8)
        plain = client.embed("a short sentence")
    assert cosines(split[None, :], plain[None, :])[0] >= 0.9999


def test_embed_with_pool_none_gives_a_row_per_window_even_for_one_string(
    daemon: Daemon, reference: Reference
) -> None:
    with ec.Client(daemon.socket) as client:
        rows = client.embed(_long_text(reference), long="split", pool="none")
        windows = client.embed_windows(_long_text(reference))
    assert rows.shape == (len(windows), DIM) and len(windows) > 1


def test_embed_windows_are_the_chunk_ops_chunks_with_their_vectors(
    daemon: Daemon, reference: Reference
) -> None:
    text = _long_text(reference)
    with ec.Client(daemon.socket) as client:
        windows = client.embed_windows(text, overlap=16)
        chunks = client.chunk(text, overlap=16)
        alone = client.embed([c["text"] for c in chunks])
    assert [w.span for w in windows] == [tuple(c["span"]) for c in chunks]
    assert [w.text for w in windows] == [c["text"] for c in chunks]
    assert all(w.input == 0 and w.text == text[w.span[0] : w.span[1]] for w in windows)
    assert cosines(np.stack([w.vector for w in windows]), alone).min() >= 0.9999


def test_embed_windows_says_which_input_each_window_is_from(
    daemon: Daemon, reference: Reference
) -> None:
    texts = [_long_text(reference), "short", _long_text(reference)]
    with ec.Client(daemon.socket) as client:
        windows = client.embed_windows(texts)
        short = client.embed("short")
    per_input = [[w for w in windows if w.input == i] for i in range(3)]
    assert [w.input for w in windows] == sorted(w.input for w in windows)  # in input order
    assert len(per_input[0]) == len(per_input[2]) > 1
    (only,) = per_input[1]
    assert (only.span, only.text) == ((0, 5), "short")
    assert cosines(only.vector[None, :], short[None, :])[0] >= 0.9999


def test_async_embed_windows_matches_the_blocking_client(
    daemon: Daemon, reference: Reference
) -> None:
    async def main() -> list[ec.Window]:
        async with ec.AsyncClient(daemon.socket) as client:
            return await client.embed_windows(_long_text(reference), overlap=16)

    got = asyncio.run(main())
    with ec.Client(daemon.socket) as client:
        expected = client.embed_windows(_long_text(reference), overlap=16)
    assert [(w.input, w.span, w.text) for w in got] == [(w.input, w.span, w.text) for w in expected]
    vectors = np.stack([w.vector for w in got])
    assert cosines(vectors, np.stack([w.vector for w in expected])).min() >= 0.9999


# --- errors ----------------------------------------------------------------------------------


def _shutdown(client: ec.Client) -> None:
    client.shutdown()


# Every code raises EmbeddError with that code; only the codes a caller acts on differently
# raise a subclass (input_too_long: resend with truncate or long="split").
ERROR_CASES = [
    ("bad_request", ec.EmbeddError, lambda c: c.embed(["ok", ""])),
    ("unknown_op", ec.EmbeddError, lambda c: c.request("no_such_op")),
    ("unknown_model", ec.EmbeddError, lambda c: c.embed("x", "no-such-model")),
    ("model_load_failed", ec.EmbeddError, lambda c: c.load("missing")),
    ("input_too_long", ec.InputTooLongError, lambda c: c.embed("word " * 400)),
    ("forbidden", ec.EmbeddError, _shutdown),
]


@pytest.mark.parametrize(("code", "cls", "call"), ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_error_codes_raise_embedd_error_with_the_code_and_a_class_only_where_acted_on(
    daemon: Daemon, code: str, cls: type[ec.EmbeddError], call: object
) -> None:
    assert callable(call)
    with ec.Client(daemon.socket) as client:
        with pytest.raises(cls) as info:
            call(client)
        assert type(info.value) is cls
        assert info.value.code == code
        assert info.value.details["code"] == code
        assert info.value.message
        assert client.hello()["protocol"] == 1  # the connection survives


def test_input_too_long_error_carries_index_tokens_and_limit(daemon: Daemon) -> None:
    with ec.Client(daemon.socket) as client, pytest.raises(ec.InputTooLongError) as info:
        client.embed(["fine", "word " * 400])
    err = info.value
    assert (err.index, err.tokens, err.limit) == (1, 402, 256)
    assert err.retry_after is None and err.key is None


def test_bad_request_error_names_the_offending_key(daemon: Daemon) -> None:
    with ec.Client(daemon.socket) as client, pytest.raises(ec.EmbeddError) as info:
        client.request("embed", input="x", normalise=True)
    assert (info.value.code, info.value.key) == ("bad_request", "normalise")


def test_unknown_error_code_maps_to_the_base_class() -> None:
    # No daemon sends an unknown code today; a newer one might. Pure mapping, no I/O.
    err = ec._error_from_map({"code": "brand_new", "message": "m", "extra": 1})
    assert type(err) is ec.EmbeddError
    assert (err.code, err.message, err.details["extra"]) == ("brand_new", "m", 1)


@pytest.mark.parametrize(
    ("code", "cls"), [("busy", ec.BusyError), ("input_too_long", ec.InputTooLongError)]
)
def test_the_codes_a_caller_acts_on_map_to_their_subclass(
    code: str, cls: type[ec.EmbeddError]
) -> None:
    err = ec._error_from_map({"code": code, "message": "m", "retry_after": 2})
    assert type(err) is cls and isinstance(err, ec.EmbeddError)
    assert err.code == code


def test_errors_met_before_the_daemon_are_embedd_errors_with_their_own_code() -> None:
    assert ec.DaemonUnavailableError("m").code == "unavailable"
    assert ec.UntrustedDaemonError("m").code == "untrusted"
    assert issubclass(ec.DaemonUnavailableError, ec.EmbeddError)
    assert issubclass(ec.UntrustedDaemonError, ec.EmbeddError)


def test_oversize_request_raises_frame_too_large_and_the_client_recovers(daemon: Daemon) -> None:
    with ec.Client(daemon.socket) as client:
        with pytest.raises(ec.EmbeddError) as info:
            client.embed("x" * (65 * 1024 * 1024))
        assert info.value.code == "frame_too_large"
        assert info.value.limit == 64 * 1024 * 1024
        assert client.hello()["protocol"] == 1


def test_client_refuses_a_response_frame_over_its_max_frame(daemon: Daemon) -> None:
    with ec.Client(daemon.socket, max_frame=1000) as client:
        with pytest.raises(ec.EmbeddError) as info:
            client.embed(["a", "b", "c"])  # 3 x 384 x 4 bytes of vectors
        assert info.value.code == "frame_too_large"
        assert info.value.limit == 1000
        assert client.hello()["protocol"] == 1


def test_client_timeout_raises_request_timeout_and_the_client_recovers(
    daemon: Daemon, reference: Reference
) -> None:
    with ec.Client(daemon.socket, timeout=0.05) as client:
        with pytest.raises(ec.EmbeddError) as info:
            client.embed(reference.chunks[:300])
        assert info.value.code == "timeout"
        assert info.value.limit == 0.05
        client.timeout = 30.0
        assert client.hello()["protocol"] == 1


def test_no_daemon_raises_daemon_unavailable_naming_the_socket() -> None:
    path = short_tmpdir() / "nothing.sock"
    with ec.Client(path) as client, pytest.raises(ec.DaemonUnavailableError) as info:
        client.hello()
    assert info.value.code == "unavailable"
    assert str(path) in info.value.message
    assert "embedd serve" in info.value.message


def test_an_option_msgpack_cannot_carry_is_a_bad_request_naming_it(daemon: Daemon) -> None:
    with ec.Client(daemon.socket) as client:
        with pytest.raises(ec.EmbeddError) as info:
            client.embed("x", long="split", overlap=10**20)
        assert (info.value.code, info.value.key) == ("bad_request", "overlap")
        assert "overlap" in info.value.message
        assert client.hello()["protocol"] == 1  # nothing was sent: the connection is fine


def test_connecting_to_the_http_socket_says_so(workdir: Path, own_daemon: list[Daemon]) -> None:
    # The HTTP front answers a msgpack frame once its frame_timeout passes: keep that short.
    http = workdir / "http.sock"
    d = start_daemon(workdir, "frame_timeout = 0.5\n", extra_args=("--http-socket", str(http)))
    own_daemon.append(d)
    with ec.Client(http) as client, pytest.raises(ec.EmbeddError) as info:
        client.hello()
    assert info.value.code == "protocol_error"
    assert "this is embedd's HTTP socket, not its msgpack socket" in info.value.message


def test_without_unix_sockets_the_client_says_the_platform_is_unsupported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delattr(socket, "AF_UNIX")  # as on Windows
    with (
        ec.Client("/nowhere/embedd.sock") as client,
        pytest.raises(ec.DaemonUnavailableError) as info,
    ):
        client.hello()
    assert "Windows is not supported" in info.value.message


# --- blocking client: reconnecting -----------------------------------------------------------


def test_client_reconnects_once_after_daemon_restart(
    workdir: Path, own_daemon: list[Daemon]
) -> None:
    first = start_daemon(workdir)
    own_daemon.append(first)
    with ec.Client(first.socket) as client:
        assert client.hello()["pid"] == first.proc.pid
        second = _restart(first, workdir, own_daemon)
        assert client.hello()["pid"] == second.proc.pid


def test_the_same_client_works_after_the_daemon_is_killed_and_restarted(
    workdir: Path, own_daemon: list[Daemon]
) -> None:
    first = start_daemon(workdir)
    own_daemon.append(first)
    with ec.Client(first.socket) as client:
        assert client.hello()["pid"] == first.proc.pid
        first.stop(signal.SIGKILL)
        second = start_daemon(workdir)  # replaces the stale socket file SIGKILL left behind
        own_daemon.append(second)
        assert client.embed("after a crash").shape == (384,)
        assert client.hello()["pid"] == second.proc.pid


def test_embed_documents_yields_bounded_batches_in_order(
    daemon: Daemon, reference: Reference
) -> None:
    texts = iter(reference.queries[:10])  # any iterable, consumed lazily
    with ec.Client(daemon.socket) as client:
        batches = list(client.embed_documents(texts, batch_size=4))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert cosines(np.concatenate(batches), reference.q_vecs[:10]).min() >= 0.9999


def test_embed_query_returns_one_vector(daemon: Daemon, reference: Reference) -> None:
    with ec.Client(daemon.socket) as client:
        vec = client.embed_query(reference.queries[0])
    assert vec.shape == (384,)
    assert cosines(vec[None, :], reference.q_vecs[:1])[0] >= 0.9999


def test_async_embed_documents_and_query(daemon: Daemon, reference: Reference) -> None:
    async def main() -> list[ec.Vectors]:
        async with ec.AsyncClient(daemon.socket) as client:
            out = [b async for b in client.embed_documents(reference.queries[:5], batch_size=3)]
            out.append((await client.embed_query(reference.queries[5]))[None, :])
            return out

    got = asyncio.run(main())
    assert [len(b) for b in got] == [3, 2, 1]
    assert cosines(np.concatenate(got), reference.q_vecs[:6]).min() >= 0.9999


def test_client_raises_unavailable_when_the_daemon_is_gone(
    workdir: Path, own_daemon: list[Daemon]
) -> None:
    d = start_daemon(workdir)
    own_daemon.append(d)
    with ec.Client(d.socket) as client:
        assert client.hello()["pid"] == d.proc.pid
        assert d.stop() == 0
        with pytest.raises(ec.DaemonUnavailableError):
            client.hello()


def test_shutdown_when_allowed_stops_the_daemon(workdir: Path, own_daemon: list[Daemon]) -> None:
    d = start_daemon(workdir, "allow_shutdown = true\n")
    own_daemon.append(d)
    with ec.Client(d.socket) as client:
        client.shutdown()
    assert d.proc.wait(30) == 0


# --- asyncio client --------------------------------------------------------------------------


async def _until_queued(client: ec.AsyncClient) -> None:
    """Polls the daemon's own stats until a request of ours waits in the model's queue, so
    that what follows happens while the daemon holds work for us (no sleep stands for it)."""
    deadline = time.monotonic() + 30
    while (await client.stats())["models"]["default"]["queue_inputs"] == 0:
        assert time.monotonic() < deadline, "no request of ours reached the daemon's queue"


def test_async_client_embeds_a_string_and_a_list(daemon: Daemon) -> None:
    async def main() -> tuple[Vec, Vec]:
        async with ec.AsyncClient(daemon.socket) as client:
            return await client.embed("one"), await client.embed(["one", "two"])

    single, batch = asyncio.run(main())
    assert single.shape == (DIM,) and batch.shape == (2, DIM)
    assert cosines(single[None, :], batch[:1])[0] >= 0.9999


def test_async_client_has_the_same_operations(daemon: Daemon) -> None:
    async def main() -> None:
        async with ec.AsyncClient(daemon.socket) as client:
            assert (await client.hello())["pid"] == daemon.proc.pid
            assert (await client.health())["status"] == "ok"
            assert "default" in (await client.stats())["models"]
            assert "default" in {m["name"] for m in await client.models()}
            assert (await client.load("default"))["state"] == "ready"
            assert await client.tokenize(["hi"]) == [[101, 7632, 102]]
            assert (await client.request("health"))["status"] == "ok"
            with pytest.raises(ec.EmbeddError) as info:
                await client.shutdown()
            assert info.value.code == "forbidden"

    asyncio.run(main())


def test_async_client_pipelines_many_requests_on_one_connection(
    daemon: Daemon, reference: Reference
) -> None:
    texts = reference.queries[:100]

    async def main() -> list[Vec]:
        async with ec.AsyncClient(daemon.socket) as client:
            rows: list[Vec] = await asyncio.gather(*(client.embed(t) for t in texts))
            return rows

    with ec.Client(daemon.socket) as observer:
        before = observer.stats()["connections"]["total"]
        got = np.stack(asyncio.run(main()))
        after = observer.stats()["connections"]["total"]
        expected = observer.embed(texts)
    assert after - before == 1
    # Each answer reached its own caller. (Batching changes the last digits, hence cosines.)
    assert cosines(got, expected).min() >= 0.9999
    assert (np.argmax(got @ expected.T, axis=1) == np.arange(len(texts))).all()


def test_async_client_responses_arrive_out_of_order(daemon: Daemon, reference: Reference) -> None:
    daemon.call("load")

    async def main() -> bool:
        async with ec.AsyncClient(daemon.socket) as client:
            with daemon.model_stopped():  # the big request cannot finish meanwhile
                big = asyncio.create_task(client.embed(reference.chunks[:20]))
                await _until_queued(client)
                await client.health()
                overtaken = not big.done()
            assert (await big).shape == (20, DIM)
            return overtaken

    assert asyncio.run(main())


def test_async_client_errors_do_not_affect_other_requests(daemon: Daemon) -> None:
    async def main() -> list[object]:
        async with ec.AsyncClient(daemon.socket) as client:
            results: list[object] = await asyncio.gather(
                client.embed("fine"),
                client.embed(["ok", ""]),
                client.hello(),
                return_exceptions=True,
            )
            return results

    vec, err, hello = asyncio.run(main())
    assert isinstance(vec, np.ndarray) and vec.shape == (DIM,)
    assert isinstance(err, ec.EmbeddError) and err.code == "bad_request" and err.index == 1
    assert isinstance(hello, dict) and hello["protocol"] == 1


def test_async_client_timeout_raises_request_timeout(daemon: Daemon, reference: Reference) -> None:
    async def main() -> None:
        async with ec.AsyncClient(daemon.socket, timeout=0.05) as client:
            with pytest.raises(ec.EmbeddError) as info:
                await client.embed(reference.chunks[:300])
            assert info.value.code == "timeout"
            client.timeout = 30.0
            assert (await client.hello())["protocol"] == 1

    asyncio.run(main())


def test_async_client_cancelling_a_task_cancels_the_request_on_the_daemon(
    daemon: Daemon, reference: Reference
) -> None:
    def cancelled_inputs() -> int:
        with ec.Client(daemon.socket) as observer:
            n: int = observer.stats()["models"]["default"]["cancelled"]
            return n

    async def main() -> None:
        async with ec.AsyncClient(daemon.socket) as client:
            await client.load()
            task = asyncio.create_task(client.embed(reference.chunks[:300]))
            await _until_queued(client)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert (await client.hello())["protocol"] == 1

    before = cancelled_inputs()
    asyncio.run(main())
    deadline = time.monotonic() + 10
    while cancelled_inputs() == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cancelled_inputs() > before


def test_async_client_fails_pending_requests_when_the_connection_drops(
    workdir: Path, own_daemon: list[Daemon], reference: Reference
) -> None:
    d = start_daemon(workdir)
    own_daemon.append(d)

    async def main() -> None:
        async with ec.AsyncClient(d.socket) as client:
            await client.load()
            pending = [
                asyncio.create_task(client.embed(reference.chunks[i : i + 100]))
                for i in (0, 100, 200)
            ]
            await _until_queued(client)
            d.proc.send_signal(signal.SIGKILL)
            results = await asyncio.gather(*pending, return_exceptions=True)
            assert all(isinstance(r, ec.DaemonUnavailableError) for r in results), results
            with pytest.raises(ec.DaemonUnavailableError):
                await client.hello()

    asyncio.run(main())


def test_async_client_reconnects_after_daemon_restart(
    workdir: Path, own_daemon: list[Daemon]
) -> None:
    first = start_daemon(workdir)
    own_daemon.append(first)

    async def hello_pid(client: ec.AsyncClient) -> int:
        pid: int = (await client.hello())["pid"]
        return pid

    # The loop does not run between the two calls, so the client's reader task cannot see the
    # old connection die: the second call itself must notice and resend.
    client = ec.AsyncClient(first.socket)
    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(hello_pid(client)) == first.proc.pid
        second = _restart(first, workdir, own_daemon)
        assert loop.run_until_complete(hello_pid(client)) == second.proc.pid
    finally:
        loop.run_until_complete(client.aclose())
        loop.close()
