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
from dataclasses import replace
from typing import Any

import numpy as np

from ..config import ModelConfig
from ..wire.errors import Code, EmbeddError
from .engine import DecodeError, Engine, ModelInfo, ModelLoadError
from .jobs import (
    ChunkJob,
    ChunkPiece,
    ChunkResult,
    EmbedJob,
    EmbedResult,
    Job,
    TokenizeJob,
    TokenizeResult,
    settle,
    settle_failed,
)
from .modelfile import identify, version_of
from .scheduler import Item, Scheduler
from .stats import WorkerStats
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
        self._incoming: deque[Job[Any]] = deque()
        self._stopping = False
        self._scheduler: Scheduler[EmbedJob] = Scheduler()
        self._sampler = Sampler()
        self._chunking: deque[ChunkJob] = deque()
        # long="split" jobs being cut into windows, a slice at a time between batches; each
        # joins the scheduler once all its windows are known.
        self._splitting: deque[EmbedJob] = deque()
        # Which file was loaded (inode, size, mtime): a different one on disk means the model
        # was replaced, and the slot loads the new one for the next request.
        self.file_version = version_of(config.path)
        self._thread = threading.Thread(
            target=self._run, name=f"embedd-model-{config.name}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    @property
    def queued_inputs(self) -> int:
        return self._scheduler.pending_inputs

    @property
    def chunking_inputs(self) -> int:
        """Texts of `chunk` requests still being cut (one text each)."""
        return len(self._chunking)

    @property
    def splitting_inputs(self) -> int:
        """Inputs of long="split" requests still being cut into windows (not yet queued)."""
        return sum(len(job.texts) - job.split_next for job in list(self._splitting))

    @property
    def queued_tokens(self) -> int:
        return self._scheduler.pending_tokens

    def submit(self, job: Job[Any]) -> None:
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
            self._fail_load(self.error)
            return None
        try:
            identity = identify(cfg.path)
        except OSError as exc:
            engine.close()
            self._fail_load(f"cannot read {cfg.path}: {exc}")
            return None
        self.info = replace(
            engine.info, fingerprint=identity.fingerprint, card={**engine.card, **identity.card()}
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
        self._loop.call_soon_threadsafe(settle, self.loaded, self.info)
        return engine

    def _fail_load(self, reason: str) -> None:
        self.error = reason
        _log.error("model %s failed to load: %s", self.config.name, reason)
        err = EmbeddError(
            Code.MODEL_LOAD_FAILED, f"model {self.config.name!r} failed to load: {reason}"
        )
        with self._cond:
            self._stopping = True
        # The state turns `failed` before any job hears of it, so a client that reacts to the
        # error by asking `models` sees the same.
        self._loop.call_soon_threadsafe(settle_failed, self.loaded, err)
        self._fail_everything(err)

    def _fail_everything(self, err: EmbeddError) -> None:
        with self._cond:
            jobs = list(self._incoming)
            self._incoming.clear()
        jobs.extend(self._scheduler.clear())
        jobs.extend(self._chunking)
        self._chunking.clear()
        jobs.extend(self._splitting)
        self._splitting.clear()
        for job in jobs:
            job.resolve(err)

    def _serve(self, engine: Engine) -> None:
        while True:
            with self._cond:
                while (
                    not self._incoming
                    and not self._scheduler.has_work()
                    and not self._chunking
                    and not self._splitting
                ):
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
            if self._splitting:
                self._split_slice(engine)

    def _chunk_slice(self, engine: Engine) -> None:
        """Advance the oldest chunk job for at most CHUNK_SLICE seconds."""
        job = self._chunking[0]
        if job.cancelled:
            self._chunking.popleft()
            job.resolve(EmbeddError(Code.CANCELLED, "request cancelled"))
            return
        text = job.texts[0]
        limit = job.max_tokens or engine.info.max_tokens
        try:
            if job.cursor is None:
                job.cursor = engine.chunk(text, max_tokens=limit, overlap=job.overlap)
            until = time.perf_counter() + CHUNK_SLICE
            for piece in job.cursor:
                job.pieces.append(
                    ChunkPiece(
                        text[piece.start : piece.end],
                        piece.start,
                        piece.end,
                        piece.tokens + engine.frame_size,
                    )
                )
                if time.perf_counter() > until:
                    return
        except ValueError as exc:
            self._chunking.popleft()
            job.resolve(EmbeddError(Code.BAD_REQUEST, str(exc), key="max_tokens"))
            return
        self._chunking.popleft()
        job.resolve(ChunkResult(job.pieces, limit))

    def _admit(self, engine: Engine, job: Job[Any]) -> None:
        if job.cancelled:
            self.stats.cancelled += len(job.texts)
            job.resolve(EmbeddError(Code.CANCELLED, "request cancelled"))
            return
        try:
            if isinstance(job, TokenizeJob):
                job.resolve(TokenizeResult([engine.tokenize(t)[0] for t in job.texts]))
                return
            if isinstance(job, ChunkJob):
                self._chunking.append(job)
                return
            assert isinstance(job, EmbedJob)
            if job.request.long == "split":
                self._splitting.append(job)
                return
            self._tokenize_embed_job(engine, job)
        except EmbeddError as exc:
            job.resolve(exc)
            return
        self.stats.requests += 1
        self._scheduler.add(job)

    def _tokenize_embed_job(self, engine: Engine, job: EmbedJob) -> None:
        limit = engine.info.max_tokens
        request = job.request
        for i, raw in enumerate(job.texts):
            text = job.prefix + raw
            # Only the part of a very long text that can matter is tokenized; its count is
            # then a lower bound, still over the limit.
            usable, partial = engine.usable_prefix(text)
            toks, cut = engine.tokenize(usable, truncate_to=limit if request.cuts else None)
            cut = cut or partial
            index = job.index(i)
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
        self._ready(engine, job)

    def _ready(self, engine: Engine, job: EmbedJob) -> None:
        """Every sequence of the job is known: room for its vectors, then its turn to batch."""
        job.vectors = np.empty((len(job.tokens), engine.info.dim), dtype=np.float32)
        job.remaining = len(job.tokens)

    def _split_slice(self, engine: Engine) -> None:
        """Advance the oldest split job for at most CHUNK_SLICE seconds: a 20 MB text is cut
        into windows between batches, never in one go while queries wait."""
        job = self._splitting[0]
        if job.cancelled:
            self._splitting.popleft()
            self.stats.cancelled += len(job.texts)
            job.resolve(EmbeddError(Code.CANCELLED, "request cancelled"))
            return
        until = time.perf_counter() + CHUNK_SLICE
        try:
            while job.split_next < len(job.texts):
                if not self._split_input(engine, job, until):
                    return
                if time.perf_counter() > until:
                    return
        except EmbeddError as exc:
            self._splitting.popleft()
            job.resolve(exc)
            return
        self._splitting.popleft()
        self._ready(engine, job)
        self.stats.requests += 1
        self._scheduler.add(job)

    def _split_input(self, engine: Engine, job: EmbedJob, until: float) -> bool:
        """Continue windowing the job's current input; True when that input is done, False
        when the slice ran out first. An input that fits is one window: exactly the sequence
        it would be without split. Windows each get the prompt and the special frame."""
        limit = engine.info.max_tokens
        i = job.split_next
        text = job.texts[i]
        if job.split_cursor is None:
            job.split_windows = []
            usable, partial = engine.usable_prefix(job.prefix + text)
            whole = None if partial else engine.tokenize(usable)[0]
            if whole is not None and len(whole) <= limit:
                job.split_windows.append((0, len(text), whole))
                job.split_cursor = iter(())
            else:
                job.split_cursor = engine.chunk(
                    text,
                    max_tokens=limit - _prompt_tokens(engine, job),
                    overlap=job.request.overlap,
                )
        for c in job.split_cursor:
            toks = engine.tokenize(job.prefix + text[c.start : c.end])[0][:limit]
            job.split_windows.append((c.start, c.end, toks))
            if time.perf_counter() > until:
                return False
        windows = job.split_windows
        if not windows or len(windows[0][2]) <= engine.frame_size + _prompt_tokens(engine, job):
            index = job.index(i)
            raise EmbeddError(
                Code.BAD_REQUEST,
                f"input[{index}] has no tokens the model knows",
                key="input",
                index=index,
            )
        job.groups.append(list(range(len(job.tokens), len(job.tokens) + len(windows))))
        job.spans.append([(start, end) for start, end, _ in windows])
        job.tokens.extend(toks for _, _, toks in windows)
        job.truncated.append(False)
        job.split_cursor = None
        job.split_windows = []
        job.split_next += 1
        return True

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
            rate = n_tokens / elapsed
            # The first measurement replaces the guess; later ones move an average.
            st.tokens_per_second = (
                0.8 * st.tokens_per_second + 0.2 * rate if st.throughput_measured else rate
            )
            st.throughput_measured = True
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


def _prompt_tokens(engine: Engine, job: EmbedJob) -> int:
    """Tokens the prompt adds to each window (short: tokenized again rather than kept)."""
    return len(engine.tokenize(job.prefix)[0]) - engine.frame_size if job.prefix else 0


def _finish(job: EmbedJob) -> EmbedResult:
    """Post-process on this thread, so the event loop only assembles and sends: windows pooled
    (token-weighted mean) or kept, then dimensions cut, then normalized."""
    assert job.vectors is not None
    request = job.request
    counts = [len(t) for t in job.tokens]
    if request.long == "split" and request.pool == "mean":
        rows = []
        for group in job.groups:
            weights = np.asarray([counts[k] for k in group], dtype=np.float64)
            mean = (job.vectors[group] * weights[:, None]).sum(axis=0) / weights.sum()
            rows.append(mean.astype(np.float32))
        vecs = np.stack(rows)
    else:
        vecs = job.vectors
    if request.dimensions is not None:
        vecs = vecs[:, : request.dimensions]
    if request.normalize:
        norms = np.linalg.norm(vecs, axis=1, keepdims=True)
        vecs = (vecs / np.where(norms > 0, norms, 1.0)).astype(np.float32)
    return EmbedResult(
        vectors=np.ascontiguousarray(vecs, dtype="<f4"),
        tokens=[sum(counts[k] for k in group) for group in job.groups],
        truncated=job.truncated,
        windows=[len(group) for group in job.groups],
        spans=[span for spans in job.spans for span in spans],
    )


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
