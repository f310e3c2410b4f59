"""A stand-in for systemd's socket activation, for the tests: it owns the listening socket and
a `NOTIFY_SOCKET`, and starts the real daemon with the socket as fd 3 and `LISTEN_*` set,
exactly as systemd does (sd_listen_fds(3)); it can start the daemon again when a client
connects after it exited."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import BUNDLED

# Runs in the child between fork and the daemon: fd 3 is the socket and LISTEN_PID is the
# pid the daemon will have, since exec keeps it.
_WRAPPER = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_FDNAMES"] = "embedd.socket"
os.execv(sys.argv[2], sys.argv[2:])
"""


class Manager:
    def __init__(self, workdir: Path, *, mode: int = 0o600, dir_mode: int = 0o700) -> None:
        self.workdir = workdir
        run = workdir / "run"
        run.mkdir(mode=dir_mode)
        os.chmod(run, dir_mode)
        self.path = run / "embedd.sock"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(self.path))
        os.chmod(self.path, mode)
        self.listener.listen(64)
        self.notify_path = workdir / "notify.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.messages: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []

    def spawn(
        self,
        *args: str,
        config: str = "",
        env: dict[str, str] | None = None,
        fd: int | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start `python -m embedd serve ARGS` with the socket (or `fd`) as fd 3."""
        cfg = self.workdir / "config.toml"
        cfg.write_text(config.format(bundled=BUNDLED, tmp=self.workdir))
        log = self.workdir / f"daemon-{len(self.logs)}.log"
        self.logs.append(log)
        passed = self.listener.fileno() if fd is None else fd
        full_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "WATCHDOG_"))},
            "NOTIFY_SOCKET": str(self.notify_path),
            **(env or {}),
        }
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    _WRAPPER,
                    str(passed),
                    sys.executable,
                    "-m",
                    "embedd",
                    "serve",
                    "--config",
                    str(cfg),
                    *args,
                ],
                pass_fds=(passed,),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=full_env,
            )
        self.procs.append(proc)
        return proc

    def log(self, index: int = -1) -> str:
        return self.logs[index].read_text(errors="replace")

    def expect(self, line: str, timeout: float = 30.0) -> str:
        """The next notification containing the line `line` (e.g. READY=1)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                logs = "\n".join(self.log(i) for i in range(len(self.logs)))
                raise AssertionError(f"no {line} within {timeout}s; got {self.messages}\n{logs}")
            self.notify.settimeout(remaining)
            try:
                message = self.notify.recv(65536).decode()
            except TimeoutError:
                continue
            self.messages.append(message)
            if line in message.split("\n"):
                return message

    def drain(self, duration: float) -> list[str]:
        """Notifications sent within the next `duration` seconds (older ones are skipped)."""
        self.notify.setblocking(False)
        try:
            while True:
                self.messages.append(self.notify.recv(65536).decode())
        except BlockingIOError:
            pass
        got: list[str] = []
        deadline = time.monotonic() + duration
        while (remaining := deadline - time.monotonic()) > 0:
            self.notify.settimeout(remaining)
            try:
                got.append(self.notify.recv(65536).decode())
            except TimeoutError:
                break
        self.messages += got
        return got

    def pending_connection(self, timeout: float) -> bool:
        """Whether a client waits in the listening socket (what makes systemd start us)."""
        readable, _, _ = select.select([self.listener], [], [], timeout)
        return bool(readable)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.listener.close()
        self.notify.close()
