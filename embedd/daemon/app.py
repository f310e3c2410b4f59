"""The composition root: builds the daemon's parts, wires them, and runs them to a clean exit.

Nothing else constructs a `Daemon`, a `Server` or a `Supervisor`; each depends only on what it
is handed here (the server on a small handler protocol, the supervisor on a status snapshot),
so the modules below import each other in one direction only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

from .. import __version__
from ..config import Config
from ..http import metrics
from ..http.server import HttpServer, HttpSetupError
from ..inference.modelprocess import start_spare
from ..transport.activation import ActivationError, inherited_sockets
from ..transport.counters import ConnectionCounts, Tally
from ..transport.msgpack_server import Server
from ..transport.sockets import SocketInUseError
from .ops import Daemon
from .supervise import Supervisor

_log = logging.getLogger("embedd.app")

# After SIGTERM, connections keep reading this long before work is refused: requests a client
# sent just before the signal may still sit in socket buffers, and are served, not refused.
_SIGNAL_SETTLE = 0.2
# How often idle models are looked at for `keep_alive`.
_SWEEP_EVERY = 1.0
# The exit status when a second SIGTERM/SIGINT cuts the shutdown short (README, Logs and signals).
FORCED_EXIT = 1


class _JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers (`--log-format json`)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(verbose: bool, log_format: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter(
                "%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S"
            )
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # llama.cpp's own chatter (model metadata, graph sizes) only with --verbose.
    logging.getLogger("embedd.llama").setLevel(logging.DEBUG if verbose else logging.WARNING)


async def _sweep(daemon: Daemon) -> None:
    while True:
        await asyncio.sleep(_SWEEP_EVERY)
        await daemon.models.sweep_idle()


async def _write_metrics(daemon: Daemon, path: Path, every: float) -> None:
    while True:
        try:
            metrics.write_atomically(path, metrics.render(daemon.stats().to_wire()))
        except OSError as exc:
            _log.warning("cannot write the metrics file %s: %s", path, exc)
        await asyncio.sleep(every)


class _Shutdown:
    """The way out, one named phase at a time (as uvicorn's), each logged as it begins: stop
    accepting, ask connections to finish, wait for their answers (within `shutdown_grace`),
    wait for model work (within what is left of it), release the models and the listeners."""

    def __init__(
        self,
        config: Config,
        daemon: Daemon,
        listeners: list[Server | HttpServer],
        background: list[asyncio.Task[None]],
    ) -> None:
        self.config = config
        self.daemon = daemon
        self.listeners = listeners
        self.background = background
        self.loop = asyncio.get_running_loop()
        self.grace_ends = 0.0

    async def run(self) -> None:
        await self.stop_accepting()
        await self.ask_connections_to_finish()
        await self.wait_for_answers()
        await self.wait_for_model_work()
        await self.release()

    async def stop_accepting(self) -> None:
        _log.info("shutdown: stop accepting connections")
        for listener in self.listeners:
            await listener.stop_accepting()

    async def ask_connections_to_finish(self) -> None:
        _log.info("shutdown: asking connections to finish")
        # Requests a client sent just before the signal may still sit in socket buffers: they
        # are read and served, not refused.
        await asyncio.sleep(_SIGNAL_SETTLE)
        self.daemon.draining = True

    async def wait_for_answers(self) -> None:
        grace = self.config.shutdown_grace
        _log.info(
            "shutdown: waiting for answers: finishing %d requests in flight (at most %gs)",
            sum(listener.inflight for listener in self.listeners),
            grace,
        )
        # Both fronts answer what they accepted within the one grace; the models' remaining
        # work (a tokenization in progress) gets what is left of it, and no more.
        self.grace_ends = self.loop.time() + grace
        await asyncio.gather(*(listener.drain(grace) for listener in self.listeners))

    async def wait_for_model_work(self) -> None:
        left = max(0.0, self.grace_ends - self.loop.time())
        _log.info("shutdown: waiting for model work (at most %gs)", left)
        for task in self.background:
            task.cancel()
        await self.daemon.models.close(left)

    async def release(self) -> None:
        _log.info("shutdown: releasing the listeners")
        for listener in self.listeners:
            await listener.close()


def _force_exit(sig: signal.Signals) -> None:
    """A second signal while shutting down: exit now, without waiting for anything. Model
    processes die with the daemon (PR_SET_PDEATHSIG); a socket file left behind is replaced at
    the next start."""
    _log.warning("%s again while shutting down: exiting at once (status %d)", sig.name, FORCED_EXIT)
    logging.shutdown()
    os._exit(FORCED_EXIT)


async def serve(config: Config) -> int:
    loop = asyncio.get_running_loop()
    tally = Tally()
    connections = ConnectionCounts()
    daemon = Daemon(config, loop, tally=tally, connections=connections)
    server = Server(config, daemon, tally=tally, connections=connections)
    http: HttpServer | None = None
    try:
        # Sockets passed by systemd or launchd are served instead of binding our own.
        passed = inherited_sockets()
        if config.http or config.http_socket or passed.http:
            http = HttpServer(config, daemon, daemon.stats, connections, tally=tally)
            http.prepare()  # before any socket: a bad key file stops the start at once
        await server.start(passed.msgpack)
        if http is not None:
            await http.start(passed.http)
    except (SocketInUseError, ActivationError, HttpSetupError, OSError) as exc:
        _log.error("%s", exc)
        await server.close()
        return 1
    if config.models:
        # A model process imports while the first client's request is on its way.
        start_spare()
    # Windows has no signal handlers in asyncio: Ctrl-C ends the process there.
    signals = (signal.SIGTERM, signal.SIGINT) if sys.platform != "win32" else ()

    def on_signal(sig: signal.Signals) -> None:
        if daemon.stop_requested.is_set():
            _force_exit(sig)
        daemon.stop_requested.set()

    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)
    sweeper = asyncio.create_task(_sweep(daemon))
    background = [sweeper]
    if config.metrics_file is not None:
        every = config.metrics_every
        background.append(asyncio.create_task(_write_metrics(daemon, config.metrics_file, every)))
    _log.info(
        "embedd %s serving on %s%s (pid %d; models: %s)",
        __version__,
        server.address,
        f" (passed by {server.inherited.manager})" if server.inherited else "",
        os.getpid(),
        ", ".join(sorted(config.models)),
    )
    supervisor = Supervisor(daemon, server)
    supervisor.start()
    try:
        await daemon.stop_requested.wait()
        supervisor.stopping()
        listeners: list[Server | HttpServer] = [server] if http is None else [server, http]
        await _Shutdown(config, daemon, listeners, background).run()
    finally:
        await supervisor.close()
        for sig in signals:
            loop.remove_signal_handler(sig)
    _log.info("stopped")
    return 0


def run(config: Config, *, verbose: bool = False) -> int:
    """Run the daemon until SIGTERM/SIGINT (or an allowed `shutdown`); returns the exit code."""
    setup_logging(verbose, config.log_format)
    try:
        return asyncio.run(serve(config))
    except OSError as exc:
        _log.error("cannot serve on %s: %s", config.socket, exc)
        return 1
