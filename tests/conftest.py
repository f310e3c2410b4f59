"""Fixtures that start the real daemon (`python -m embedd serve`) on a real socket with the real
bundled model; nothing here is mocked."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from embedd.http.parser import HttpError, HttpHead, HttpParser, HttpRequest
from tests.wire import RawConnection

DATA = Path(__file__).parent / "data"
BUNDLED = Path(__file__).parent.parent / "embedd" / "bundled" / "all-MiniLM-L6-v2-f16.gguf"

# A config exercising what most tests need: the bundled model, one with prompts, and two that
# cannot load (a missing file and a file that is not GGUF); the cache is off.
BASE_CONFIG = """
# The shared daemon computes every vector it is asked for: tests of the model and of timing
# must not be answered from the cache (tests/test_cache.py starts its own daemon for that).
cache_bytes = 0

[models.prompted]
path = "{bundled}"
max_tokens = 256
[models.prompted.prompts]
query = "query: "
document = "passage: "

[models.missing]
path = "{tmp}/no-such-model.gguf"

[models.notgguf]
path = "{tmp}/not-a-model.gguf"
"""


@dataclass
class Daemon:
    socket: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    workdir: Path
    _conns: list[RawConnection] = field(default_factory=list)

    def connect(self) -> RawConnection:
        conn = RawConnection(self.socket)
        self._conns.append(conn)
        return conn

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        with RawConnection(self.socket) as conn:
            return conn.call(op, **args)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def model_stats(self, model: str = "default") -> dict[str, Any]:
        models: dict[str, Any] = self.call("stats")["models"]
        return dict(models[model])

    def wait_for(
        self,
        condition: Callable[[dict[str, Any]], bool],
        what: str,
        *,
        model: str = "default",
        timeout: float = 60.0,
    ) -> dict[str, Any]:
        """Polls the daemon's own `stats` for `model` until `condition` holds, and returns
        those stats: the daemon says when something happened, no sleep stands for it. The
        timeout is only a bound on a wait that normally takes milliseconds, not a speed check."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.model_stats(model)
            if condition(stats):
                return stats
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {timeout:g}s: {what}; last stats: {stats}")
            time.sleep(0.02)

    @contextlib.contextmanager
    def model_stopped(self, model: str = "default") -> Iterator[int]:
        """The model's process stopped (SIGSTOP) for the block, then continued: whatever it was
        given stays in flight until then, however fast the machine, with no workload sized to
        outlast a race. (The daemon replaces a process only after a batch computes for twice
        the request timeout, far beyond any test.) The model must be loaded."""
        pid = int(self.model_stats(model)["process"]["pid"])
        os.kill(pid, signal.SIGSTOP)
        try:
            yield pid
        finally:
            os.kill(pid, signal.SIGCONT)

    def wait_until_computing(
        self, before: dict[str, Any], requests: int = 1, *, model: str = "default"
    ) -> dict[str, Any]:
        """Waits until the model thread has taken `requests` more embed requests than in the
        stats `before` and still has inputs queued: work is in the daemon's hands, unfinished."""
        return self.wait_for(
            lambda s: s["requests"] >= before["requests"] + requests and s["queue_inputs"] > 0,
            f"{requests} request(s) taken by the model thread and still queued",
            model=model,
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        for conn in self._conns:
            conn.close()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"daemon did not exit within {timeout}s:\n{self.log()}") from None


def until_draining(conn: RawConnection, timeout: float = 60.0) -> None:
    """Asks `health` on an open connection (a new one is refused while draining) until the
    daemon reports it is shutting down. The timeout only bounds a wait of milliseconds."""
    deadline = time.monotonic() + timeout
    while conn.call("health")["status"] != "shutting_down":
        assert time.monotonic() < deadline, "the daemon did not start draining"
        time.sleep(0.02)


def short_tmpdir() -> Path:
    # Unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer.
    return Path(tempfile.mkdtemp(prefix="embedd-t"))


def start_daemon(
    workdir: Path,
    config: str = "",
    *,
    extra_args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    wait: bool = True,
    socket: Path | None = None,
    pass_socket: bool = True,
    umask: int = 0o022,
) -> Daemon:
    sock = socket if socket is not None else workdir / "run" / "embedd.sock"
    cfg = workdir / "config.toml"
    (workdir / "not-a-model.gguf").write_text("this is not a model\n")
    cfg.write_text(config.format(bundled=BUNDLED, tmp=workdir))
    log_path = workdir / f"daemon-{time.monotonic_ns()}.log"
    full_env = {**os.environ, **(env or {})}
    socket_args = ["--socket", str(sock)] if pass_socket else []
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "embedd",
                "serve",
                *socket_args,
                "--config",
                str(cfg),
                *extra_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            umask=umask,
        )
    daemon = Daemon(sock, proc, log_path, workdir)
    if wait:
        wait_until_serving(daemon)
    return daemon


def wait_until_serving(daemon: Daemon, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {daemon.proc.returncode}:\n{daemon.log()}")
        try:
            if daemon.call("hello")["ok"]:
                return
        except OSError:
            pass
        time.sleep(0.05)
    daemon.stop(signal.SIGKILL)
    raise AssertionError(f"daemon did not answer within {timeout}s:\n{daemon.log()}")


@contextlib.contextmanager
def running_daemon(config: str = "", **options: Any) -> Iterator[Daemon]:
    """A daemon started with `config` (and `start_daemon`'s `options`) in a folder of its
    own, for the block: stopped and its folder removed after."""
    workdir = short_tmpdir()
    d = start_daemon(workdir, config, **options)
    try:
        yield d
    finally:
        d.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def daemon() -> Iterator[Daemon]:
    """One daemon shared by the tests that do not change its state."""
    with running_daemon(BASE_CONFIG) as d:
        yield d


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = short_tmpdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def own_daemon(workdir: Path) -> Iterator[list[Daemon]]:
    """Daemons a test starts itself (with its own config); stopped afterwards if still running."""
    started: list[Daemon] = []
    yield started
    for d in started:
        if d.proc.poll() is None:
            d.stop(signal.SIGKILL)


@dataclass(frozen=True)
class Reference:
    queries: list[str]
    chunks: list[str]
    chunks_long: list[str]
    q_vecs: npt.NDArray[np.float32]
    c_vecs: npt.NDArray[np.float32]
    cl_vecs: npt.NDArray[np.float32]


@pytest.fixture(scope="session")
def reference() -> Reference:
    docs = json.loads((DATA / "stdlib_docs.json").read_text())
    long = json.loads((DATA / "stdlib_docs_long.json").read_text())
    return Reference(
        queries=docs["queries"],
        chunks=docs["chunks"],
        chunks_long=long["chunks_long"],
        q_vecs=np.load(DATA / "st_queries.npy"),
        c_vecs=np.load(DATA / "st_chunks.npy"),
        cl_vecs=np.load(DATA / "st_chunks_long.npy"),
    )


def vectors(response: dict[str, Any]) -> npt.NDArray[np.float32]:
    assert response["ok"], response
    raw = response["embeddings"]
    if response["encoding"] == "list":
        return np.asarray(raw, dtype=np.float32)
    return np.frombuffer(raw, "<f4").reshape(response["count"], response["dim"])


def cosines(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    a64 = a.astype(np.float64)
    b64 = b.astype(np.float64)
    dots = (a64 * b64).sum(axis=1)
    result: npt.NDArray[np.float64] = dots / (
        np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    )
    return result


def parse_all(parser: HttpParser, data: bytes) -> list[HttpRequest | HttpError]:
    """Every request (or the error) `data` completes in `parser`; heads are not reported."""
    parser.receive(data)
    out: list[HttpRequest | HttpError] = []
    while (event := parser.next_event()) is not None:
        if not isinstance(event, HttpHead):
            out.append(event)
    return out


def http_front_args(workdir: Path, port: int) -> tuple[str, ...]:
    """The daemon's arguments for its HTTP front on a Unix socket in `workdir` and on loopback
    `port`, with the API key written to `workdir/key`."""
    socket, key = str(workdir / "http.sock"), str(workdir / "key")
    return ("--http-socket", socket, "--http", f"127.0.0.1:{port}", "--api-key-file", key)


def free_port() -> int:
    """A loopback TCP port nobody listens on now (for a daemon's --http)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
