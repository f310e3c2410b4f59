"""A model process: `python -m embedd.inference.runner FD_IN FD_OUT PARENT_PID`, started by the
daemon (`modelprocess.py`), one per loaded model. It owns everything llama.cpp for that model:
the weights, one context per replica thread, and llama.cpp's tokenizer for vocabularies the
daemon does not tokenize itself.

It reads no config and holds no socket: what to load comes over the pipe (`pipe.Load`). It ends
with the daemon: at EOF on its pipe, and by a parent-death signal where the OS has one (Linux),
so a SIGKILLed daemon leaves no model process behind. A native fault here (SIGILL, SIGSEGV,
abort) ends this process only; the daemon sees EOF and decides what to retry.
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import signal
import sys
import threading
import time
from pathlib import Path

import llama_cpp as lc
import numpy as np

from .engine import Model, ModelLoadError, install_llama_log
from .pipe import (
    Compute,
    Computed,
    ComputeFailed,
    Hello,
    Load,
    Loaded,
    LoadFailed,
    LogLine,
    Message,
    PipeDecoder,
    PipeError,
    Tokenize,
    Tokenized,
    encode,
)
from .threads import replicas_for

# Bytes read from the pipe at a time.
_READ_SIZE = 1 << 16
# prctl(2): deliver a signal to this process when its parent thread ends.
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """Ask the kernel for SIGKILL when the daemon goes, then check it has not already gone
    (a parent that died before the prctl would never send it)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(0)


class _Writer:
    """Every thread's messages to the daemon, one whole frame at a time."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()

    def send(self, message: Message) -> None:
        frame = memoryview(encode(message))
        with self._lock:
            while frame:
                try:
                    n = os.write(self._fd, frame)
                except BrokenPipeError:
                    os._exit(0)  # the daemon is gone
                frame = frame[n:]


class _PipeLog(logging.Handler):
    """Log records go to the daemon, which writes them in its own format."""

    def __init__(self, writer: _Writer) -> None:
        super().__init__()
        self._writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        self._writer.send(LogLine(record.levelno, record.name, record.getMessage()))


class _Process:
    def __init__(self, writer: _Writer) -> None:
        self._writer = writer
        self._model: Model | None = None
        self._mailboxes: list[queue.SimpleQueue[Compute]] = []

    def handle(self, message: Message) -> None:
        if isinstance(message, Compute):
            self._mailboxes[message.replica].put(message)
        elif isinstance(message, Tokenize):
            if self._model is None:
                raise PipeError("Tokenize before Load")
            ids = self._model.tokenize_bare(message.text)
            self._writer.send(Tokenized(message.request, np.asarray(ids, "<i4").tobytes()))
        elif isinstance(message, Load):
            self._load(message)
        else:
            raise PipeError(f"a model process takes no {type(message).__name__}")

    def _load(self, load: Load) -> None:
        try:
            model = Model(
                Path(load.path),
                batch_tokens=load.batch_tokens,
                max_tokens=load.max_tokens,
                gpu_layers=load.gpu_layers,
                dim=load.dim,
                repack=load.repack,
            )
        except ModelLoadError as exc:
            self._writer.send(LoadFailed(str(exc)))
            return
        except Exception as exc:
            self._writer.send(LoadFailed(f"unexpected failure loading {load.path}: {exc!r}"))
            return
        self._model = model
        count = replicas_for(
            load.usable,
            configured=load.replicas,
            threads=load.threads,
            gpu_offloaded=model.card["runs_on"] == "gpu",
        )
        created: queue.SimpleQueue[tuple[str, int] | Exception] = queue.SimpleQueue()
        for index in range(count):
            mailbox: queue.SimpleQueue[Compute] = queue.SimpleQueue()
            self._mailboxes.append(mailbox)
            threading.Thread(
                target=self._replica,
                args=(model, load, mailbox, created),
                name=f"replica-{index}",
                daemon=True,
            ).start()
        outcomes = [created.get() for _ in range(count)]
        failed = [o for o in outcomes if isinstance(o, Exception)]
        if failed:
            self._writer.send(LoadFailed(str(failed[0])))
            return
        first = outcomes[0]
        assert not isinstance(first, Exception)
        pooling, outputs = first
        self._writer.send(Loaded(model.info(pooling, outputs), model.tokenizer_spec, count))

    def _replica(
        self,
        model: Model,
        load: Load,
        mailbox: queue.SimpleQueue[Compute],
        created: queue.SimpleQueue[tuple[str, int] | Exception],
    ) -> None:
        """One llama context, created, used and never shared by this thread."""
        try:
            context = model.new_context(threads=load.threads or load.usable, pooling=load.pooling)
        except Exception as exc:
            created.put(exc)
            return
        created.put((context.pooling, context.outputs))
        while True:
            job = mailbox.get()
            tokens = np.frombuffer(job.tokens, "<i4")
            seqs, start = [], 0
            for n in job.lengths:
                seqs.append(tokens[start : start + n].tolist())
                start += n
            began = time.perf_counter()
            try:
                context.set_threads(job.threads)
                vectors = context.embed(seqs)
            except Exception as exc:  # one batch fails, the replica keeps serving
                self._writer.send(ComputeFailed(job.batch, str(exc)))
                continue
            seconds = time.perf_counter() - began
            self._writer.send(Computed(job.batch, vectors.astype("<f4").tobytes(), seconds))


def main(argv: list[str]) -> int:
    fd_in, fd_out, parent = (int(a) for a in argv[1:4])
    _die_with_parent(parent)
    # llama.cpp's own messages reach the daemon as log lines; stdout is not the pipe, and
    # nothing native that prints there can corrupt a frame.
    writer = _Writer(fd_out)
    root = logging.getLogger()
    root.addHandler(_PipeLog(writer))
    # Everything goes over: the daemon's own level decides what is written.
    root.setLevel(logging.DEBUG)
    install_llama_log()
    info = lc.llama_print_system_info()
    writer.send(
        Hello(
            os.getpid(),
            f"llama-cpp-python {lc.__version__}",
            info.decode("utf-8", "replace") if isinstance(info, bytes) else str(info),
        )
    )
    process = _Process(writer)
    decoder = PipeDecoder()
    while True:
        data = os.read(fd_in, _READ_SIZE)
        if not data:
            break  # the daemon closed the pipe: unloading, or gone
        for message in decoder.feed(data):
            process.handle(message)
    # Contexts and weights go with the process: nothing is left to flush, and a replica
    # thread in the middle of a batch must not be waited for.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
