"""The HTTP front: the pure parser alone, then the real daemon with real clients (the official
openai SDK, curl, raw sockets) on its Unix socket and loopback TCP port."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http import HTTPStatus
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedd.config import BUNDLED_ALIASES
from embedd.http.parser import MAX_HEAD, MAX_HEADERS, HttpError, HttpParser, HttpRequest
from tests.conftest import (
    Daemon,
    Reference,
    cosines,
    free_port,
    http_front_args,
    parse_all,
    short_tmpdir,
    start_daemon,
    vectors,
)

# --- the parser alone ---------------------------------------------------------------------


def _request(body: bytes = b'{"input":"x"}', extra: str = "") -> bytes:
    return (
        f"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


def test_a_request_split_at_every_byte_boundary_parses_the_same() -> None:
    data = _request() + _request(b'{"input":"y"}')
    for cut in range(len(data) + 1):
        parser = HttpParser(max_body=1 << 20)
        events = parse_all(parser, data[:cut]) + parse_all(parser, data[cut:])
        assert [e.body for e in events if isinstance(e, HttpRequest)] == [
            b'{"input":"x"}',
            b'{"input":"y"}',
        ], cut


def test_a_chunked_body_is_reassembled() -> None:
    head = b"POST /api/embed HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n"
    [request] = parse_all(HttpParser(max_body=100), head + body)
    assert isinstance(request, HttpRequest) and request.body == b"hello world"


def test_connection_close_and_http_1_0_end_keep_alive() -> None:
    [a] = parse_all(HttpParser(max_body=10), b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n")
    [b] = parse_all(HttpParser(max_body=10), b"GET /health HTTP/1.0\r\n\r\n")
    assert isinstance(a, HttpRequest) and not a.keep_alive
    assert isinstance(b, HttpRequest) and not b.keep_alive


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"NOT A REQUEST LINE AT ALL\r\n\r\n", HTTPStatus.BAD_REQUEST),
        (b"GET / HTTP/2.0\r\n\r\n", HTTPStatus.HTTP_VERSION_NOT_SUPPORTED),
        (
            b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD + b"\r\n\r\n",
            HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
        ),
        (
            b"GET / HTTP/1.1\r\n"
            + b"".join(b"X%d: y\r\n" % i for i in range(MAX_HEADERS + 1))
            + b"\r\n",
            HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
        ),
        (b"POST / HTTP/1.1\r\nContent-Length: 999\r\n\r\n", HTTPStatus.REQUEST_ENTITY_TOO_LARGE),
        (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", HTTPStatus.BAD_REQUEST),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", HTTPStatus.NOT_IMPLEMENTED),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", HTTPStatus.BAD_REQUEST),
        (b"GET / HTTP/1.1\r\nbad header\r\n\r\n", HTTPStatus.BAD_REQUEST),
    ],
)
def test_malformed_requests_get_their_status_and_close(data: bytes, status: HTTPStatus) -> None:
    parser = HttpParser(max_body=100)
    events = parse_all(parser, data)
    assert isinstance(events[-1], HttpError) and events[-1].status == status
    assert parser.closed and parse_all(parser, _request()) == []


# --- the daemon ------------------------------------------------------------------------------


class Front:
    def __init__(self, daemon: Daemon, port: int, key: str) -> None:
        self.daemon = daemon
        self.port = port
        self.key = key
        self.http_socket = daemon.workdir / "http.sock"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def raw(self, data: bytes, *, tcp: bool = False, timeout: float = 30.0) -> bytes:
        """Send bytes, return everything the daemon sends until it closes."""
        if tcp:
            s = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        else:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout)
            s.connect(str(self.http_socket))
        with s:
            s.sendall(data)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
            return out

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else b""
        head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        reply = self.raw(head.encode() + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        status_line, _, rest = reply.partition(b"\r\n")
        _, _, body_bytes = rest.partition(b"\r\n\r\n")
        try:
            return int(status_line.split()[1]), json.loads(body_bytes)
        except ValueError:
            return int(status_line.split()[1]), body_bytes.decode()


@pytest.fixture(scope="module")
def front() -> Iterator[Front]:
    workdir = short_tmpdir()
    port = free_port()
    d = start_daemon(
        workdir,
        "frame_timeout = 2\n[models.prompted]\npath = '{bundled}'\n"
        "[models.prompted.prompts]\nquery = 'query: '\n",
        extra_args=http_front_args(workdir, port),
    )
    key = (workdir / "key").read_text().strip()
    assert oct((workdir / "key").stat().st_mode & 0o777) == "0o600"
    yield Front(d, port, key)
    d.stop()
    shutil.rmtree(workdir, ignore_errors=True)


def test_the_openai_sdk_gets_the_reference_vectors_with_base64_and_float(
    front: Front, reference: Reference
) -> None:
    client = openai.OpenAI(base_url=front.base_url, api_key=front.key)
    texts = reference.queries[:5]
    default = client.embeddings.create(model="default", input=texts)  # base64 on the wire
    floats = client.embeddings.create(model="default", input=texts, encoding_format="float")
    a = np.array([d.embedding for d in default.data], dtype=np.float32)
    b = np.array([d.embedding for d in floats.data], dtype=np.float32)
    assert cosines(a, reference.q_vecs[:5]).min() >= 0.9999
    assert cosines(a, b).min() >= 0.99999
    msgpack_path = vectors(front.daemon.call("embed", input=texts))
    assert cosines(a, msgpack_path).min() >= 0.99999
    assert [d.index for d in default.data] == list(range(5))
    assert default.usage.prompt_tokens == default.usage.total_tokens > 0
    assert default.model == "default" and default.object == "list"


def test_the_openai_sdk_dimensions_and_extensions(front: Front) -> None:
    client = openai.OpenAI(base_url=front.base_url, api_key=front.key)
    short = client.embeddings.create(model="default", input="a text", dimensions=64)
    assert len(short.data[0].embedding) == 64
    assert abs(np.linalg.norm(short.data[0].embedding) - 1.0) < 1e-4
    cut = client.embeddings.create(
        model="default", input="word " * 400, extra_body={"truncate": True, "priority": "bulk"}
    )
    assert len(cut.data[0].embedding) == 384
    query = client.embeddings.create(model="prompted", input="x", extra_body={"prompt": "query"})
    assert query.usage.prompt_tokens > 3


def test_openai_errors_have_openais_shape_and_status(front: Front) -> None:
    client = openai.OpenAI(base_url=front.base_url, api_key=front.key, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-model", input="x")
    with pytest.raises(openai.BadRequestError) as info:
        # Over-long inputs are split unless the request says otherwise (test_http_apps.py).
        client.embeddings.create(
            model="default", input="word " * 400, extra_body={"truncate": False}
        )
    error = info.value.body
    assert isinstance(error, dict)
    assert (error["code"], error["index"], error["limit"]) == ("input_too_long", 0, 256)
    with pytest.raises(openai.BadRequestError) as ids:
        client.embeddings.create(model="default", input=[[101, 7592, 102]])
    assert "check_embedding_ctx_length=False" in str(ids.value)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=front.base_url, api_key="wrong", max_retries=0).models.list()


def test_the_openai_sdk_lists_models(front: Front) -> None:
    client = openai.OpenAI(base_url=front.base_url, api_key=front.key)
    names = {m.id for m in client.models.list()}
    assert names == {"default", "prompted", *BUNDLED_ALIASES}


def test_tcp_without_the_key_is_refused_with_401(front: Front) -> None:
    reply = front.raw(b"GET /v1/models HTTP/1.1\r\nConnection: close\r\n\r\n", tcp=True)
    assert reply.startswith(b"HTTP/1.1 401")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_on_the_unix_socket_speaks_both_apis(front: Front, reference: Reference) -> None:
    def curl(path: str, body: dict[str, Any]) -> Any:
        out = subprocess.run(
            ["curl", "-sf", "--unix-socket", str(front.http_socket), f"http://embedd{path}",
             "-H", "Content-Type: application/json", "-d", json.dumps(body)],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        return json.loads(out.stdout)

    text = reference.queries[0]
    openai_vec = curl("/v1/embeddings", {"model": "default", "input": text})["data"][0]
    ollama = curl("/api/embed", {"model": "default:latest", "input": [text]})
    legacy = curl("/api/embeddings", {"model": "default", "prompt": text})
    for vec in (openai_vec["embedding"], ollama["embeddings"][0], legacy["embedding"]):
        got = np.asarray([vec], dtype=np.float32)
        assert cosines(got, reference.q_vecs[:1])[0] >= 0.9999
    assert ollama["prompt_eval_count"] > 0 and ollama["total_duration"] > 0


def test_ollama_probes_find_embedd(front: Front) -> None:
    assert front.call("GET", "/api/version")[0] == 200
    status, tags = front.call("GET", "/api/tags")
    names = {m["name"] for m in tags["models"]}
    assert status == 200 and names == {"default", "prompted", *BUNDLED_ALIASES}
    front.call("POST", "/api/embed", {"model": "default", "input": "load it"})
    status, ps = front.call("GET", "/api/ps")
    assert status == 200 and "default" in {m["name"] for m in ps["models"]}


def test_ollama_takes_long_inputs_by_default_and_honours_truncate_false(front: Front) -> None:
    status, _ = front.call("POST", "/api/embed", {"model": "default", "input": "w " * 600})
    assert status == 200
    status, body = front.call(
        "POST", "/api/embed", {"model": "default", "input": "w " * 600, "truncate": False}
    )
    assert status == 400 and "limit" in body["error"]


def test_health_and_metrics(front: Front) -> None:
    status, body = front.call("GET", "/health")
    assert status == 200 and body["status"] == "ok"
    status, text = front.call("GET", "/metrics")
    assert status == 200 and "embedd_requests_total" in text
    assert 'embedd_model_inputs_total{model="default"}' in text


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /nowhere HTTP/1.1\r\nConnection: close\r\n\r\n", 404),
        (
            b"POST /v1/embeddings HTTP/1.1\r\nContent-Length: 5\r\nConnection: close\r\n\r\nnot j",
            400,
        ),
        (b"POST /v1/embeddings HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n", 413),
        (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n", 431),
        (
            b"POST /v1/embeddings HTTP/1.1\r\nContent-Length: 20\r\nConnection: close\r\n\r\n"
            b'{"model": 5, "in',  # shorter than announced, then silence
            408,
        ),
    ],
)
def test_malformed_http_gets_its_status_and_the_daemon_keeps_serving(
    front: Front, data: bytes, status: int
) -> None:
    reply = front.raw(data, timeout=60)
    assert reply.startswith(f"HTTP/1.1 {status}".encode()), reply[:200]
    assert front.call("GET", "/health")[0] == 200


def test_wrong_types_are_400_naming_the_key(front: Front) -> None:
    status, body = front.call("POST", "/v1/embeddings", {"model": "default", "input": [1.5]})
    assert status == 400 and body["error"]["param"] == "input"


def test_sixteen_http_and_sixteen_msgpack_clients_at_once_are_all_correct(
    front: Front, reference: Reference
) -> None:
    failures: list[str] = []

    def http_client(n: int) -> None:
        client = openai.OpenAI(base_url=front.base_url, api_key=front.key)
        i = n % 20
        got = client.embeddings.create(model="default", input=reference.queries[i : i + 3])
        vecs = np.array([d.embedding for d in got.data], dtype=np.float32)
        if cosines(vecs, reference.q_vecs[i : i + 3]).min() < 0.9999:
            failures.append(f"http {n}")

    def msgpack_client(n: int) -> None:
        i = 20 + n % 20
        r = front.daemon.call("embed", input=reference.queries[i : i + 3])
        if cosines(vectors(r), reference.q_vecs[i : i + 3]).min() < 0.9999:
            failures.append(f"msgpack {n}")

    threads = [threading.Thread(target=http_client, args=(n,)) for n in range(16)]
    threads += [threading.Thread(target=msgpack_client, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert failures == []


def test_tcp_without_a_key_file_refuses_to_start(workdir: Path, own_daemon: list[Daemon]) -> None:
    d = start_daemon(workdir, extra_args=("--http", f"127.0.0.1:{free_port()}"), wait=False)
    own_daemon.append(d)
    assert d.proc.wait(30) == 2  # a usage error, found before anything starts
    assert "--api-key-file" in d.log() and "--no-api-key" in d.log()
    assert not d.socket.exists()


def test_a_non_loopback_address_is_refused_unless_allowed(
    workdir: Path, own_daemon: list[Daemon]
) -> None:
    args = ("--http", "0.0.0.0:1", "--no-api-key")
    d = start_daemon(workdir, extra_args=args, wait=False)
    own_daemon.append(d)
    assert d.proc.wait(30) == 2
    assert "not a loopback address" in d.log()
    assert not d.socket.exists()


def test_a_key_file_others_can_read_stops_the_start_before_any_socket(
    workdir: Path, own_daemon: list[Daemon]
) -> None:
    key = workdir / "key"
    key.write_text("k" * 40 + "\n")
    key.chmod(0o644)
    args = ("--http", f"127.0.0.1:{free_port()}", "--api-key-file", str(key))
    d = start_daemon(workdir, extra_args=args, wait=False)
    own_daemon.append(d)
    assert d.proc.wait(30) == 1
    assert "chmod 600" in d.log() and not d.socket.exists()


def test_a_client_that_disconnects_has_its_work_cancelled(
    front: Front, reference: Reference
) -> None:
    before = front.daemon.model_stats()
    body = json.dumps({"model": "default", "input": reference.chunks[:300]}).encode()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(front.http_socket))
    s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    front.daemon.wait_until_computing(before)  # the request's inputs are in the model's queue
    s.close()
    front.daemon.wait_for(
        lambda now: now["cancelled"] > before["cancelled"], "the request's work cancelled"
    )


# Runs between fork and the daemon, as systemd would: the msgpack socket as fd 3 and the HTTP
# one (a second .socket unit with FileDescriptorName=http) as fd 4.
_TWO_SOCKETS = """
import os, sys
a, b = int(sys.argv[1]), int(sys.argv[2])
os.dup2(a, 3)
os.dup2(b, 4)
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDS"] = "2"
os.environ["LISTEN_FDNAMES"] = "embedd.socket:http"
os.execv(sys.argv[3], sys.argv[3:])
"""


def test_socket_activation_passes_the_http_socket_too(tmp_path: Path) -> None:
    workdir = short_tmpdir()
    listeners = []
    for name in ("embedd.sock", "http.sock"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(workdir / name))
        s.listen(16)
        listeners.append(s)
    log = (workdir / "log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-c", _TWO_SOCKETS, str(listeners[0].fileno()),
         str(listeners[1].fileno()), sys.executable, "-m", "embedd", "serve",
         "--config", "/dev/null"],
        pass_fds=[s.fileno() for s in listeners], stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        reply = b""
        while time.monotonic() < deadline and not reply.startswith(b"HTTP/1.1 200"):
            try:
                c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                c.settimeout(10)
                c.connect(str(workdir / "http.sock"))
                c.sendall(b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n")
                reply = c.recv(4096)
                c.close()
            except OSError:
                time.sleep(0.1)
        assert reply.startswith(b"HTTP/1.1 200"), (workdir / "log").read_text()
        assert b'"status":"ok"' in reply
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
        for s in listeners:
            s.close()
        shutil.rmtree(workdir, ignore_errors=True)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=1024), st.integers(min_value=1, max_value=64))
def test_the_http_parser_survives_any_bytes_in_any_pieces(data: bytes, piece: int) -> None:
    parser = HttpParser(max_body=512)
    events: list[HttpRequest | HttpError] = []
    for i in range(0, len(data), piece):
        events += parse_all(parser, data[i : i + piece])
    errors = [e for e in events if isinstance(e, HttpError)]
    assert len(errors) <= 1 and (not errors or events[-1] is errors[0])
    assert all(len(e.body) <= 512 for e in events if isinstance(e, HttpRequest))


def test_http_requests_are_counted_in_stats_as_the_msgpack_ones_are(front: Front) -> None:
    before = front.daemon.call("stats")["requests"]
    assert front.call("POST", "/v1/embeddings", {"model": "default", "input": "x"})[0] == 200
    assert front.call("POST", "/api/embed", {"model": "default", "input": ["a", "b"]})[0] == 200
    assert front.call("GET", "/v1/models")[0] == 200
    status, body = front.call("POST", "/v1/embeddings", {"model": "default", "input": "x", "n": 1})
    assert status == 400 and body["error"]["code"] == "bad_request"
    assert front.call("GET", "/no/such/path")[0] == 404
    keyless = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    assert front.raw(keyless, tcp=True).startswith(b"HTTP/1.1 401")
    after = front.daemon.call("stats")["requests"]
    # The six HTTP requests, and the first `stats` (counted once it was answered).
    assert after["total"] - before["total"] == 6 + 1
    assert after["ok"] - before["ok"] == 3 + 1
    errors = Counter(after["errors"])
    errors.subtract(before["errors"])
    assert +errors == {"bad_request": 1, "http_404": 1, "http_401": 1}
