"""The daemon's handle on one model process: it starts `runner.py`, writes messages to it, and
reads its answers on a thread of its own, which also notices the moment the process ends (EOF
on its pipe, never a poll) and says how (`ProcessExit`: the signal or the exit status).

A model process gets two pipes and nothing else of the daemon: no socket, no config, and no
other file descriptor (`close_fds`). It ends with the daemon (EOF on its pipe, and a
parent-death signal). The thread that starts it must outlive it: Linux's parent-death signal
fires when the *thread* that forked the child ends, which is why only a model's coordinating
thread starts its processes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .pipe import (
    Hello,
    LogLine,
    Message,
    PipeDecoder,
    PipeError,
    Tokenize,
    Tokenized,
    encode,
)

_log = logging.getLogger("embedd.modelprocess")
# Bytes read from the pipe at a time: a batch of 64 vectors of 4,096 dimensions is 1 MiB.
_READ_SIZE = 1 << 20

# Every live model process's pid: the core budget counts their CPU time as ours.
_LIVE: set[int] = set()
_LIVE_LOCK = threading.Lock()


def live_pids() -> list[int]:
    with _LIVE_LOCK:
        return sorted(_LIVE)


@dataclass(frozen=True)
class ProcessExit:
    """How a model process ended: by a signal (its name), or with an exit status."""

    pid: int
    signal: str | None
    status: int | None

    @property
    def how(self) -> str:
        if self.signal is not None:
            return self.signal
        return f"exit status {self.status}"


class ProcessGone(Exception):
    """The model process ended before it answered."""


def _describe(pid: int, returncode: int) -> ProcessExit:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return ProcessExit(pid, name, None)
    return ProcessExit(pid, None, returncode)


OnMessage = Callable[["ModelProcess", Message], None]
OnExit = Callable[["ModelProcess", ProcessExit], None]


class ModelProcess:
    """One running model process. `on_message` and `on_exit` are called on its reader thread;
    `on_exit` exactly once, after every message the process sent. A spare process (started
    before any model needs it) holds what it hears until `adopt` says who listens."""

    def __init__(
        self,
        name: str,
        on_message: OnMessage | None = None,
        on_exit: OnExit | None = None,
    ) -> None:
        self.name = name
        self._on_message = on_message
        self._on_exit = on_exit
        # What a spare heard before it was adopted (its Hello, or its end).
        self._held: list[Message | ProcessExit] = []
        self._write_lock = threading.Lock()
        self._state = threading.Condition()
        self._tokenized: dict[int, bytes] = {}
        self._next_request = 0
        self.exit: ProcessExit | None = None
        self.hello: Hello | None = None
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        try:
            self._proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "embedd.inference.runner",
                    str(to_child_r),
                    str(from_child_w),
                    str(os.getpid()),
                ],
                stdin=subprocess.DEVNULL,
                # Native code that prints to stdout lands in the daemon's log, not in a frame.
                stdout=sys.stderr.fileno(),
                close_fds=True,
                pass_fds=(to_child_r, from_child_w),
            )
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self.pid = self._proc.pid
        self._out = to_child_w
        self._in = from_child_r
        with _LIVE_LOCK:
            _LIVE.add(self.pid)
        self._reader = threading.Thread(
            target=self._read, name=f"embedd-model-{name}-pipe", daemon=True
        )
        self._reader.start()

    def send(self, message: Message) -> None:
        """Write one message; ProcessGone if the process has ended."""
        frame = memoryview(encode(message))
        with self._write_lock:
            try:
                while frame:
                    frame = frame[os.write(self._out, frame) :]
            except (BrokenPipeError, OSError) as exc:
                raise ProcessGone(f"model process {self.pid} is gone: {exc}") from None

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's ids of `text` without the special frame, computed in the process;
        ProcessGone if it ends first."""
        with self._state:
            request = self._next_request
            self._next_request += 1
        self.send(Tokenize(request, text))
        with self._state:
            while request not in self._tokenized and self.exit is None:
                self._state.wait()
            ids = self._tokenized.pop(request, None)
        if ids is None:
            raise ProcessGone(f"model process {self.pid} ended while tokenizing")
        out: list[int] = np.frombuffer(ids, "<i4").tolist()
        return out

    def kill(self) -> None:
        """End it now (SIGKILL); `on_exit` follows on the reader thread."""
        with contextlib.suppress(ProcessLookupError):
            self._proc.kill()

    def close(self) -> None:
        """Close its pipe: the process exits at EOF (it has nothing to flush)."""
        with self._write_lock:
            if self._out >= 0:
                os.close(self._out)
                self._out = -1

    def _read(self) -> None:
        decoder = PipeDecoder()
        try:
            while data := os.read(self._in, _READ_SIZE):
                for message in decoder.feed(data):
                    self._dispatch(message)
        except PipeError as exc:
            _log.error(
                "model %s: process %d sent garbage (%s); ending it", self.name, self.pid, exc
            )
            self.kill()
        except OSError as exc:
            _log.error("model %s: reading process %d failed: %s", self.name, self.pid, exc)
            self.kill()
        os.close(self._in)
        returncode = self._proc.wait()
        with _LIVE_LOCK:
            _LIVE.discard(self.pid)
        self.close()
        exit = _describe(self.pid, returncode)
        with self._state:
            self.exit = exit
            self._state.notify_all()
        self._deliver(exit)

    def adopt(self, name: str, on_message: OnMessage, on_exit: OnExit) -> None:
        """A spare becomes `name`'s: what it heard so far is delivered now, in order."""
        with self._state:
            self.name = name
            self._on_message = on_message
            self._on_exit = on_exit
            held, self._held = self._held, []
        for item in held:
            self._deliver(item)

    def _deliver(self, item: Message | ProcessExit) -> None:
        with self._state:
            if self._on_message is None or self._on_exit is None:
                self._held.append(item)
                return
            on_message, on_exit = self._on_message, self._on_exit
        if isinstance(item, ProcessExit):
            on_exit(self, item)
        else:
            on_message(self, item)

    def _dispatch(self, message: Message) -> None:
        if isinstance(message, Tokenized):
            with self._state:
                self._tokenized[message.request] = message.ids
                self._state.notify_all()
        elif isinstance(message, LogLine):
            logging.getLogger(message.logger).log(
                message.level, "[model %s] %s", self.name, message.message
            )
        else:
            if isinstance(message, Hello):
                self.hello = message
            self._deliver(message)


# One model process started before any model asked for it (`start_spare`): Python, numpy and
# llama.cpp take about 0.3 s to import, which the first model's first answer would otherwise
# wait for. Only one, and not replaced once taken: an idle one holds about 40 MB.
_spare: ModelProcess | None = None
_spare_lock = threading.Lock()


def start_spare() -> None:
    """Start the spare; call from a thread that lives as long as the daemon (the parent-death
    signal is tied to the thread that starts a process)."""
    global _spare
    with _spare_lock:
        if _spare is None:
            _spare = ModelProcess("spare")


def take_process(name: str, on_message: OnMessage, on_exit: OnExit) -> ModelProcess:
    """The spare if one is still alive, else a new process, listened to by `name`'s worker."""
    global _spare
    with _spare_lock:
        spare, _spare = _spare, None
    if spare is not None and spare.exit is None:
        spare.adopt(name, on_message, on_exit)
        return spare
    return ModelProcess(name, on_message, on_exit)


def read_rss_bytes(pid: int) -> int | None:
    """Resident memory of a process (VmRSS), None where unknown."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
