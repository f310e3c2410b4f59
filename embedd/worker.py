"""The dedicated thread of one loaded model: it owns the llama context and runs every batch.

The event loop hands it jobs through `submit` and gets answers back through the jobs' asyncio
futures (completed with `call_soon_threadsafe`), so the loop never waits on inference or on the
tokenizing of long inputs. The thread drains whatever has arrived, tokenizes it, and packs
inputs from all waiting jobs into each llama batch (`scheduler.py` decides which).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .cache import file_card, model_fingerprint
from .chunking import Chunk
from .config import ModelConfig
from .engine import DecodeError, Engine, ModelInfo, ModelLoadError
from .errors import Code, EmbeddError
from .scheduler import Item, Scheduler
from .threads import Sampler, threads_for_batch, usable_cpus

_log = logging.getLogger("embedd.worker")

# Test-only fault injection, off unless the variable is set: the batch numbers (1-based, comma
# separated) that raise in the model thread, to show that only their requests fail.
_FAULT_BATCHES = frozenset(
    int(n) for n in os.environ.get("EMBEDD_TEST_FAULT_BATCHES", "").split(",") if n.strip()
)

# Held around every llama decode of every model in the process (see _compute).
COMPUTE_LEASE = threading.Lock()

# How long the model thread chunks a text before looking at its queue again: a query waits
# at most this (plus a batch) behind a 10 MB `chunk` request.
CHUNK_SLICE = 0.005

# Recent requests whose latency percentiles `stats` reports (a bounded reservoir: the newest).
_LATENCY_SAMPLES = 2048
# The window (seconds) of the model thread's busy fraction.
_BUSY_WINDOW = 60

# Before the first batch has been timed, assume the throughput measured on a 2-core machine.
_INITIAL_TOKENS_PER_SECOND = 5000.0


@dataclass(eq=False)
class Job:
    """One request's work for the model thread. `cancelled` is set by the loop and read by the
    thread: a stale read only means one more batch computes inputs nobody will read."""

    texts: list[str]
    future: asyncio.Future[dict[str, Any]]
    loop: asyncio.AbstractEventLoop
    owner: object = None
    cancelled: bool = False
    # perf_counter() when submitted, and when its first batch started (latency figures).
    submitted: float = 0.0
    started: float | None = None

    def resolve(self, result: dict[str, Any] | EmbeddError) -> None:
        self.loop.call_soon_threadsafe(_settle, self.future, result)


@dataclass(eq=False)
class EmbedJob(Job):
    truncate: bool = False
    normalize: bool = True
    dimensions: int | None = None
    bulk: bool = False
    # Where each text stands in the client's request (texts may be a deduplicated subset),
    # so that errors name the client's index.
    indices: list[int] = field(default_factory=list)
    # long="split": over-long inputs become windows (each its own sequence) of at most the
    # limit, overlapping by `overlap` tokens, pooled by `pool` ("mean" or "none"). `prefix` (a
    # prompt) is then given to every window, so `texts` come without it.
    split: bool = False
    overlap: int = 0
    pool: str = "mean"
    prefix: str = ""
    # Filled in by the model thread: token ids per sequence (one per input, or per window).
    tokens: list[list[int]] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)
    # Per input: its sequences' indices in `tokens`, and their character spans in the input.
    groups: list[list[int]] = field(default_factory=list)
    spans: list[list[tuple[int, int]]] = field(default_factory=list)
    vectors: npt.NDArray[np.float32] | None = None
    remaining: int = 0


@dataclass(eq=False)
class TokenizeJob(Job):
    pass


@dataclass(eq=False)
class ChunkJob(Job):
    """Cutting one text into chunks, done a slice at a time between batches (see _serve), so
    a 10 MB text never holds up the queries waiting for this model."""

    max_tokens: int | None = None
    overlap: int = 0
    chunks: list[dict[str, Any]] = field(default_factory=list)
    _pieces: Iterator[Chunk] | None = None


def _settle(future: asyncio.Future[dict[str, Any]], result: dict[str, Any] | EmbeddError) -> None:
    if future.done():  # timed out or cancelled meanwhile
        return
    if isinstance(result, EmbeddError):
        future.set_exception(result)
    else:
        future.set_result(result)


@dataclass
class WorkerStats:
    """Counts and recent timings of one model. Written by its thread, read by the loop (deque
    appends and copies are atomic under the GIL, so a reader sees a consistent list)."""

    requests: int = 0
    inputs: int = 0
    tokens: int = 0
    batches: int = 0
    cancelled: int = 0
    tokens_per_second: float = _INITIAL_TOKENS_PER_SECOND
    # Compute threads the last batch ran with.
    last_threads: int = 0
    # (queue wait, compute, total) seconds of recent embed requests.
    latencies: deque[tuple[float, float, float]] = field(
        default_factory=lambda: deque(maxlen=_LATENCY_SAMPLES)
    )
    # Seconds spent computing, per whole second of the clock, for the last minute: the model
    # thread's busy fraction in constant memory however many batches run.
    busy: deque[tuple[int, float]] = field(default_factory=lambda: deque(maxlen=_BUSY_WINDOW))

    def record_busy(self, now: float, seconds: float) -> None:
        second = int(now)
        if self.busy and self.busy[-1][0] == second:
            self.busy[-1] = (second, self.busy[-1][1] + seconds)
        else:
            self.busy.append((second, seconds))

    def latency_ms(self) -> dict[str, dict[str, float]]:
        rows = list(self.latencies)
        out: dict[str, dict[str, float]] = {}
        for i, name in enumerate(("queue_wait", "compute", "total")):
            values = sorted(r[i] for r in rows)
            if values:
                out[name] = {
                    f"p{q}": round(1000 * values[min(len(values) - 1, len(values) * q // 100)], 3)
                    for q in (50, 95, 99)
                }
        return out

    def busy_fraction(self, now: float) -> float:
        since = int(now) - _BUSY_WINDOW
        busy = sum(seconds for second, seconds in list(self.busy) if second > since)
        return round(min(1.0, busy / _BUSY_WINDOW), 4)


class ModelWorker:
    """Loads one model on its own thread and serves jobs until stopped."""

    def __init__(
        self, config: ModelConfig, loop: asyncio.AbstractEventLoop, stats: WorkerStats
    ) -> None:
        self.config = config
        self.info: ModelInfo | None = None
        self.error: str | None = None
        # Owned by the model's slot, so the counts survive unloading and reloading.
        self.stats = stats
        self._loop = loop
        self.loaded: asyncio.Future[ModelInfo] = loop.create_future()
        self.finished: asyncio.Future[None] = loop.create_future()
        self._cond = threading.Condition()
        self._incoming: deque[Job] = deque()
        self._stopping = False
        self._scheduler: Scheduler[EmbedJob] = Scheduler()
        self._sampler = Sampler()
        self._chunking: deque[ChunkJob] = deque()
        # Which file was loaded (inode, size, mtime): a different one on disk means the model
        # was replaced, and the slot loads the new one for the next request.
        self.file_id = file_id(config.path)
        self._thread = threading.Thread(
            target=self._run, name=f"embedd-model-{config.name}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    @property
    def queued_inputs(self) -> int:
        return self._scheduler.pending_inputs

    @property
    def queued_tokens(self) -> int:
        return self._scheduler.pending_tokens

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                if self.error is not None:
                    raise EmbeddError(
                        Code.MODEL_LOAD_FAILED,
                        f"model {self.config.name!r} failed to load: {self.error}",
                    )
                raise EmbeddError(Code.SHUTTING_DOWN, f"model {self.config.name!r} is unloading")
            job.submitted = time.perf_counter()
            self._incoming.append(job)
            self._cond.notify()

    def stop(self) -> None:
        """Finish every job already submitted, then free the model and end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def wake(self) -> None:
        """Make the thread look at its queue again (after a job was cancelled)."""
        with self._cond:
            self._cond.notify()

    # --- the thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        engine: Engine | None = None
        try:
            engine = self._load()
            if engine is not None:
                self._serve(engine)
        except BaseException as exc:  # never leave a job without an answer
            _log.exception("model thread %s crashed", self.config.name)
            self._fail_everything(EmbeddError(Code.INTERNAL, f"model thread crashed: {exc!r}"))
        finally:
            if engine is not None:
                engine.close()
            self._loop.call_soon_threadsafe(_set_done, self.finished)

    def _load(self) -> Engine | None:
        cfg = self.config
        started = time.monotonic()
        try:
            engine = Engine(
                cfg.path,
                threads=cfg.threads or usable_cpus(self._sampler.affinity, self._sampler.quota),
                batch_tokens=cfg.batch_tokens,
                max_tokens=cfg.max_tokens,
                pooling=cfg.pooling,
                gpu_layers=cfg.gpu_layers,
                dim=cfg.dim,
            )
        except ModelLoadError as exc:
            self.error = str(exc)
        except Exception as exc:
            self.error = f"unexpected failure loading {cfg.path}: {exc!r}"
        if self.error is not None:
            _log.error("model %s failed to load: %s", cfg.name, self.error)
            err = EmbeddError(
                Code.MODEL_LOAD_FAILED, f"model {cfg.name!r} failed to load: {self.error}"
            )
            with self._cond:
                self._stopping = True
            # The state turns `failed` before any job hears of it, so a client that reacts to
            # the error by asking `models` sees the same.
            self._loop.call_soon_threadsafe(_set_exc, self.loaded, err)
            self._fail_everything(err)
            return None
        self.info = replace(
            engine.info,
            fingerprint=model_fingerprint(cfg.path),
            card={**engine.card, **file_card(cfg.path)},
        )
        _log.info(
            "model %s loaded in %.2fs: dim %d, pooling %s, max_tokens %d, batch %d tokens, "
            "threads %s",
            cfg.name,
            time.monotonic() - started,
            engine.info.dim,
            engine.info.pooling,
            engine.info.max_tokens,
            engine.info.batch_tokens,
            cfg.threads or "auto (per batch, from the free cores)",
        )
        self._loop.call_soon_threadsafe(_set_result, self.loaded, self.info)
        return engine

    def _fail_everything(self, err: EmbeddError) -> None:
        with self._cond:
            jobs = list(self._incoming)
            self._incoming.clear()
        jobs.extend(self._scheduler.clear())
        jobs.extend(self._chunking)
        self._chunking.clear()
        for job in jobs:
            job.resolve(err)

    def _serve(self, engine: Engine) -> None:
        while True:
            with self._cond:
                while not self._incoming and not self._scheduler.has_work() and not self._chunking:
                    if self._stopping:
                        return
                    self._cond.wait()
                arrived = list(self._incoming)
                self._incoming.clear()
            for job in arrived:
                self._admit(engine, job)
            for job, dropped in self._scheduler.drop_cancelled():
                self.stats.cancelled += dropped
                job.resolve(EmbeddError(Code.CANCELLED, "request cancelled"))
            batch = self._scheduler.next_batch(engine.info.batch_tokens, engine.info.max_seqs)
            if batch:
                self._compute(engine, batch)
            if self._chunking:
                self._chunk_slice(engine)

    def _chunk_slice(self, engine: Engine) -> None:
        """Advance the oldest chunk job for at most CHUNK_SLICE seconds."""
        job = self._chunking[0]
        if job.cancelled:
            self._chunking.popleft()
            job.resolve(EmbeddError(Code.CANCELLED, "request cancelled"))
            return
        try:
            if job._pieces is None:
                limit = job.max_tokens or engine.info.max_tokens
                job._pieces = engine.chunk(job.texts[0], max_tokens=limit, overlap=job.overlap)
            until = time.perf_counter() + CHUNK_SLICE
            for piece in job._pieces:
                text = job.texts[0][piece.start : piece.end]
                job.chunks.append(
                    {
                        "text": text,
                        "span": [piece.start, piece.end],
                        "tokens": piece.tokens + engine.frame_size,
                    }
                )
                if time.perf_counter() > until:
                    return
        except ValueError as exc:
            self._chunking.popleft()
            job.resolve(EmbeddError(Code.BAD_REQUEST, str(exc), key="max_tokens"))
            return
        self._chunking.popleft()
        job.resolve({"chunks": job.chunks, "max_tokens": job.max_tokens or engine.info.max_tokens})

    def _admit(self, engine: Engine, job: Job) -> None:
        if job.cancelled:
            self.stats.cancelled += len(job.texts)
            job.resolve(EmbeddError(Code.CANCELLED, "request cancelled"))
            return
        try:
            if isinstance(job, TokenizeJob):
                ids = [engine.tokenize(t)[0] for t in job.texts]
                job.resolve({"ids": ids, "counts": [len(i) for i in ids]})
                return
            if isinstance(job, ChunkJob):
                self._chunking.append(job)
                return
            assert isinstance(job, EmbedJob)
            self._tokenize_embed_job(engine, job)
        except EmbeddError as exc:
            job.resolve(exc)
            return
        self.stats.requests += 1
        self._scheduler.add(job)

    def _tokenize_embed_job(self, engine: Engine, job: EmbedJob) -> None:
        limit = engine.info.max_tokens
        for i, text in enumerate(job.texts):
            if job.split:
                self._split_input(engine, job, i, text)
                continue
            # Only the part of a very long text that can matter is tokenized; its count is
            # then a lower bound, still over the limit.
            usable, partial = engine.usable_prefix(text)
            toks, cut = engine.tokenize(usable, truncate_to=limit if job.truncate else None)
            cut = cut or partial
            index = job.indices[i] if job.indices else i
            if len(toks) <= engine.frame_size:
                # Only the special frame (the text was NULs, control or unknown characters):
                # its vector would be the same for every such text, so it is refused like "".
                raise EmbeddError(
                    Code.BAD_REQUEST,
                    f"input[{index}] has no tokens the model knows (only control, unknown or "
                    "private-use characters)",
                    key="input",
                    index=index,
                )
            if len(toks) > limit:
                raise EmbeddError(
                    Code.INPUT_TOO_LONG,
                    f"input[{index}] has {'at least ' if partial else ''}{len(toks)} tokens, "
                    f"more than the model's limit of {limit}; shorten it or send truncate=true",
                    index=index,
                    tokens=len(toks),
                    limit=limit,
                )
            job.groups.append([len(job.tokens)])
            job.spans.append([(0, len(text))])
            job.tokens.append(toks)
            job.truncated.append(cut)
        job.vectors = np.empty((len(job.tokens), engine.info.dim), dtype=np.float32)
        job.remaining = len(job.tokens)

    def _split_input(self, engine: Engine, job: EmbedJob, i: int, text: str) -> None:
        """One input as windows within the limit, each with the prompt and the special frame;
        an input that fits is one window: exactly the sequence it would be without split."""
        limit = engine.info.max_tokens
        prefix_tokens = len(engine.tokenize(job.prefix)[0]) - engine.frame_size if job.prefix else 0
        whole, _ = engine.tokenize(job.prefix + text)
        if len(whole) <= limit:
            windows = [(0, len(text), whole)]
        else:
            windows = [
                (c.start, c.end, engine.tokenize(job.prefix + text[c.start : c.end])[0])
                for c in engine.chunk(text, max_tokens=limit - prefix_tokens, overlap=job.overlap)
            ]
        if not windows or len(windows[0][2]) <= engine.frame_size + prefix_tokens:
            index = job.indices[i] if job.indices else i
            raise EmbeddError(
                Code.BAD_REQUEST,
                f"input[{index}] has no tokens the model knows",
                key="input",
                index=index,
            )
        job.groups.append(list(range(len(job.tokens), len(job.tokens) + len(windows))))
        job.spans.append([(start, end) for start, end, _ in windows])
        job.tokens.extend(toks[:limit] for _, _, toks in windows)
        job.truncated.append(False)

    def _compute(self, engine: Engine, batch: list[Item[EmbedJob]]) -> None:
        seqs = [item.job.tokens[item.index] for item in batch]
        n_tokens = sum(len(s) for s in seqs)
        started = time.perf_counter()
        try:
            if self.stats.batches + 1 in _FAULT_BATCHES:
                raise RuntimeError(f"fault injected in batch {self.stats.batches + 1}")
            threads = threads_for_batch(
                self._sampler.sample(),
                configured=self.config.threads,
                gpu_offloaded=engine.card["runs_on"] == "gpu",
            )
            # One decode at a time across all models: two full-width thread pools at once would
            # oversubscribe the cores, which is the cliff the thread policy avoids.
            with COMPUTE_LEASE:
                engine.set_threads(threads)
                vectors = engine.embed(seqs)
            self.stats.last_threads = threads
        except Exception as exc:  # one batch fails, the thread keeps serving
            if not isinstance(exc, DecodeError):
                _log.exception("batch of %d inputs failed", len(batch))
            self.stats.batches += 1
            err = EmbeddError(Code.INTERNAL, f"inference failed: {exc}")
            for job in {item.job for item in batch}:
                self._scheduler.remove(job)
                job.resolve(err)
            return
        finished = time.perf_counter()
        elapsed = finished - started
        st = self.stats
        st.record_busy(time.monotonic(), elapsed)
        st.batches += 1
        st.inputs += len(batch)
        st.tokens += n_tokens
        # Only well-filled batches measure throughput: small ones look slow per token, and
        # retry_after estimates built on them were hours long.
        if elapsed > 0 and n_tokens * 2 >= engine.info.batch_tokens:
            st.tokens_per_second = 0.8 * st.tokens_per_second + 0.2 * (n_tokens / elapsed)
        for item, vec in zip(batch, vectors, strict=True):
            job = item.job
            assert job.vectors is not None
            if job.started is None:
                job.started = started
            job.vectors[item.index] = vec
            job.remaining -= 1
            if job.remaining == 0:
                st.latencies.append(
                    (job.started - job.submitted, finished - job.started, finished - job.submitted)
                )
                job.resolve(_finish(job))


def _finish(job: EmbedJob) -> dict[str, Any]:
    """Post-process on this thread, so the event loop only assembles and sends: windows pooled
    (token-weighted mean) or kept, then dimensions cut, then normalized."""
    assert job.vectors is not None
    counts = [len(t) for t in job.tokens]
    if job.split and job.pool == "mean":
        rows = []
        for group in job.groups:
            weights = np.asarray([counts[k] for k in group], dtype=np.float64)
            mean = (job.vectors[group] * weights[:, None]).sum(axis=0) / weights.sum()
            rows.append(mean.astype(np.float32))
        vecs = np.stack(rows)
    else:
        vecs = job.vectors
    if job.dimensions is not None:
        vecs = vecs[:, : job.dimensions]
    if job.normalize:
        norms = np.linalg.norm(vecs, axis=1, keepdims=True)
        vecs = (vecs / np.where(norms > 0, norms, 1.0)).astype(np.float32)
    return {
        "vectors": np.ascontiguousarray(vecs, dtype="<f4"),
        "tokens": [sum(counts[k] for k in group) for group in job.groups],
        "truncated": job.truncated,
        "windows": [len(group) for group in job.groups],
        "spans": [list(span) for spans in job.spans for span in spans],
    }


def file_id(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _set_result(future: asyncio.Future[ModelInfo], info: ModelInfo) -> None:
    if not future.done():
        future.set_result(info)


def _set_exc(future: asyncio.Future[ModelInfo], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
        # Nobody may be awaiting a failed load; the error is reported through the jobs.
        future.exception()


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
