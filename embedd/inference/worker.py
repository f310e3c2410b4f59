"""The threads of one loaded model: a coordinating thread that owns the weights, the tokenizer
and the queue, and one replica thread per llama context, which runs the batches it is given.

The event loop hands the coordinator jobs through `submit` and gets answers back through the
jobs' asyncio futures (completed with `call_soon_threadsafe`), so the loop never waits on
inference or on the tokenizing of long inputs. The coordinator drains whatever has arrived,
tokenizes it, packs inputs from all waiting jobs into llama batches (`scheduler.py` decides
which) and starts each on a free replica with the threads the core budget grants
(`budget.py`); a replica computes, gives its threads back and hands the vectors to the
coordinator, which alone writes into jobs and answers them. So a query starts on a free
replica while another computes a bulk batch, and every job's state has one owner.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..config import ModelConfig
from ..wire.errors import Code, EmbeddError
from .budget import CoreBudget
from .engine import Context, DecodeError, Model, ModelInfo, ModelLoadError
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
from .stats import ReplicaStats, WorkerStats
from .threads import Launch, replicas_for

_log = logging.getLogger("embedd.worker")

# Test-only fault injection, off unless the variable is set: the batch numbers (1-based, comma
# separated) that raise in the model thread, to show that only their requests fail.
_FAULT_BATCHES = frozenset(
    int(n) for n in os.environ.get("EMBEDD_TEST_FAULT_BATCHES", "").split(",") if n.strip()
)

# How long the model thread chunks a text before looking at its queue again: a query waits
# at most this (plus a batch) behind a 10 MB `chunk` request.
CHUNK_SLICE = 0.005


@dataclass(eq=False)
class _Batch:
    """A batch handed to a replica: the coordinator fills it in, the replica adds the outcome."""

    number: int
    items: list[Item[EmbedJob]]
    seqs: list[list[int]]
    threads: int
    # Whether every input is bulk (a batch with any interactive input is an interactive one).
    bulk: bool
    replica: _Replica
    vectors: Any = None
    error: Exception | None = None
    started: float = 0.0
    finished: float = 0.0


class _Replica:
    """One llama context and the thread that owns it: it creates the context, computes the
    batches the coordinator gives it, and frees the context when told to stop."""

    def __init__(self, index: int, worker: ModelWorker, stats: ReplicaStats) -> None:
        self.index = index
        self.stats = stats
        self._worker = worker
        self.mailbox: queue.SimpleQueue[_Batch | None] = queue.SimpleQueue()
        self.thread = threading.Thread(
            target=self._run,
            name=f"embedd-model-{worker.config.name}-replica-{index}",
            daemon=True,
        )

    def start(self, model: Model, created: queue.SimpleQueue[str | Exception]) -> None:
        self._model = model
        self._created = created
        self.thread.start()

    def _run(self) -> None:
        worker = self._worker
        try:
            context = self._model.new_context(
                threads=worker.budget.usable, pooling=worker.config.pooling
            )
        except Exception as exc:
            self._created.put(exc)
            return
        self._created.put(context.pooling)
        try:
            while (batch := self.mailbox.get()) is not None:
                self._compute(context, batch)
        finally:
            context.close()
            worker.budget.retire(self)

    def _compute(self, context: Context, batch: _Batch) -> None:
        worker = self._worker
        batch.started = time.perf_counter()
        try:
            if batch.number in _FAULT_BATCHES:
                raise RuntimeError(f"fault injected in batch {batch.number}")
            context.set_threads(batch.threads)
            batch.vectors = context.embed(batch.seqs)
        except Exception as exc:  # one batch fails, the replica keeps serving
            batch.error = exc
        finally:
            batch.finished = time.perf_counter()
            # The cores are free before the coordinator looks: another model may take them.
            worker.budget.release(worker.config.name, batch.threads)
            worker.completed(batch)


class ModelWorker:
    """Loads one model and serves jobs on its threads until stopped."""

    def __init__(
        self,
        config: ModelConfig,
        loop: asyncio.AbstractEventLoop,
        stats: WorkerStats,
        budget: CoreBudget,
    ) -> None:
        self.config = config
        self.budget = budget
        self.info: ModelInfo | None = None
        self.error: str | None = None
        # Owned by the model's slot, so the counts survive unloading and reloading.
        self.stats = stats
        self._loop = loop
        self.loaded: asyncio.Future[ModelInfo] = loop.create_future()
        self.finished: asyncio.Future[None] = loop.create_future()
        self._cond = threading.Condition()
        self._incoming: deque[Job[Any]] = deque()
        self._done: deque[_Batch] = deque()
        self._stopping = False
        self._scheduler: Scheduler[EmbedJob] = Scheduler()
        self._chunking: deque[ChunkJob] = deque()
        # long="split" jobs being cut into windows, a slice at a time between batches; each
        # joins the scheduler once all its windows are known.
        self._splitting: deque[EmbedJob] = deque()
        self._model: Model | None = None
        self._replicas: list[_Replica] = []
        self._idle: list[_Replica] = []
        self._flying: set[_Batch] = set()
        self._bulk_in_flight = 0
        # Cores came free (the budget's wake-ups count up); a refused launch remembers the
        # count it saw, and is retried once it moves.
        self._cores_freed = 0
        self._refused_at: int | None = None
        self._gpu = False
        # Interactive jobs not yet answered, with the launch count when they arrived.
        self._queries: dict[EmbedJob, int] = {}
        # Which file was loaded (inode, size, mtime): a different one on disk means the model
        # was replaced, and the slot loads the new one for the next request.
        self.file_version = version_of(config.path)
        self._thread = threading.Thread(
            target=self._run, name=f"embedd-model-{config.name}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    @property
    def replicas(self) -> int:
        return len(self._replicas)

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
        """Finish every job already submitted, then free the model and end the threads."""
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def wake(self) -> None:
        """Make the coordinator look at its queue again (after a job was cancelled)."""
        with self._cond:
            self._cond.notify()

    def cores_freed(self) -> None:
        """The budget's wake-up: a launch it refused may go now."""
        with self._cond:
            self._cores_freed += 1
            self._cond.notify()

    def completed(self, batch: _Batch) -> None:
        """A replica's batch is done (vectors or error): the coordinator takes it from here."""
        with self._cond:
            self._done.append(batch)
            self._cond.notify()

    # --- the coordinator ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            model = self._load()
            if model is not None:
                self._serve(model)
        except BaseException as exc:  # never leave a job without an answer
            _log.exception("model thread %s crashed", self.config.name)
            self._fail_everything(EmbeddError(Code.INTERNAL, f"model thread crashed: {exc!r}"))
        finally:
            for replica in self._replicas:
                replica.mailbox.put(None)
            for replica in self._replicas:
                replica.thread.join()
            # The weights go last: every context over them is closed by now.
            if self._model is not None:
                self._model.close()
            self._loop.call_soon_threadsafe(_set_done, self.finished)

    def _load(self) -> Model | None:
        """The loaded model with its replicas ready, or None (the load failed, and every job
        hears why)."""
        cfg = self.config
        started = time.monotonic()
        model: Model | None = None
        pooling = ""
        try:
            model = self._model = Model(
                cfg.path,
                batch_tokens=cfg.batch_tokens,
                max_tokens=cfg.max_tokens,
                gpu_layers=cfg.gpu_layers,
                dim=cfg.dim,
            )
            self._gpu = model.card["runs_on"] == "gpu"
            pooling = self._start_replicas(model)
        except ModelLoadError as exc:
            self.error = str(exc)
        except Exception as exc:
            self.error = f"unexpected failure loading {cfg.path}: {exc!r}"
        if self.error is None and model is not None:
            try:
                identity = identify(cfg.path)
            except OSError as exc:
                self.error = f"cannot read {cfg.path}: {exc}"
        if self.error is not None or model is None:
            self._fail_load(self.error or "unknown")
            return None
        info = model.info(pooling)
        self.info = replace(
            info, fingerprint=identity.fingerprint, card={**model.card, **identity.card()}
        )
        _log.info(
            "model %s loaded in %.2fs: dim %d, pooling %s, max_tokens %d, batch %d tokens, "
            "%d replicas, threads %s",
            cfg.name,
            time.monotonic() - started,
            info.dim,
            info.pooling,
            info.max_tokens,
            info.batch_tokens,
            len(self._replicas),
            cfg.threads or "auto (per batch, from the core budget)",
        )
        self._loop.call_soon_threadsafe(settle, self.loaded, self.info)
        return model

    def _start_replicas(self, model: Model) -> str:
        """Start the replicas, each creating its own context; the pooling they report."""
        cfg = self.config
        count = replicas_for(
            self.budget.usable,
            configured=cfg.replicas,
            threads=cfg.threads,
            gpu_offloaded=self._gpu,
        )
        del self.stats.replicas[count:]
        created: queue.SimpleQueue[str | Exception] = queue.SimpleQueue()
        for index in range(count):
            replica = _Replica(index, self, self.stats.replica(index))
            self._replicas.append(replica)
            replica.start(model, created)
        outcomes = [created.get() for _ in range(count)]
        failed = [o for o in outcomes if isinstance(o, Exception)]
        if failed:
            raise failed[0]
        self._idle = list(self._replicas)
        return str(outcomes[0])

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
            jobs: list[Job[Any]] = list(self._incoming)
            self._incoming.clear()
        jobs.extend(self._scheduler.clear())
        jobs.extend(self._chunking)
        self._chunking.clear()
        jobs.extend(self._splitting)
        self._splitting.clear()
        jobs.extend(item.job for batch in self._flying for item in batch.items)
        for job in set(jobs):
            if not job.answered:
                job.resolve(err)

    def _launchable(self) -> bool:
        return (
            bool(self._idle)
            and self._scheduler.has_work()
            and (self._refused_at is None or self._refused_at != self._cores_freed)
        )

    def _serve(self, model: Model) -> None:
        while True:
            with self._cond:
                while (
                    not self._incoming
                    and not self._done
                    and not self._launchable()
                    and not self._chunking
                    and not self._splitting
                ):
                    if self._stopping and not self._flying and not self._scheduler.has_work():
                        return
                    self._cond.wait()
                arrived = list(self._incoming)
                self._incoming.clear()
                done = list(self._done)
                self._done.clear()
            for batch in done:
                self._finish(model, batch)
            # Interactive jobs first: tokenizing a bulk request must not hold up a query.
            arrived.sort(key=lambda job: job.bulk)
            for job in arrived:
                self._admit(model, job)
            if arrived:
                # The budget refused bulk; a query that just arrived may still start.
                self._refused_at = None
            for job, dropped in self._scheduler.drop_cancelled():
                self.stats.cancelled += dropped
                job.resolve(EmbeddError(Code.CANCELLED, "request cancelled"))
            self._launch(model)
            if self._chunking:
                self._chunk_slice(model)
            if self._splitting:
                self._split_slice(model)

    def _launch(self, model: Model) -> None:
        """Start batches on free replicas for as long as the core budget grants threads."""
        while self._launchable():
            # The replica that may borrow cores if it is free (budget.py), else the lowest.
            wide = self.budget.wide
            replica = next((r for r in self._idle if r is wide), self._idle[0])
            interactive = self._scheduler.has_interactive()
            # Bulk batches that can start now split the free cores; a query takes what is free.
            ready = -(-self._scheduler.pending_tokens // model.batch_tokens)
            share = 1 if interactive else max(1, min(len(self._idle), ready))
            seen = self._cores_freed
            threads = self.budget.acquire(
                self.config.name,
                Launch(interactive, share, self.config.threads, self._gpu),
                self.cores_freed,
                replica,
            )
            if threads == 0:
                self._refused_at = seen
                return
            self._refused_at = None
            items = self._scheduler.next_batch(
                model.batch_tokens, model.max_seqs, bulk_running=self._bulk_in_flight > 0
            )
            if not items:
                self.budget.release(self.config.name, threads)
                return
            self._idle.remove(replica)
            self.stats.launched += 1
            bulk = all(item.job.bulk for item in items)
            batch = _Batch(
                number=self.stats.launched,
                items=items,
                seqs=[item.job.tokens[item.index] for item in items],
                threads=threads,
                bulk=bulk,
                replica=replica,
            )
            self._flying.add(batch)
            self._bulk_in_flight += bulk
            replica.stats.computing = True
            replica.mailbox.put(batch)

    def _finish(self, model: Model, batch: _Batch) -> None:
        """A replica's batch came back: account for it, fill in its jobs, answer the done."""
        self._flying.discard(batch)
        self._bulk_in_flight -= batch.bulk
        replica = batch.replica
        replica.stats.computing = False
        self._idle.append(replica)
        self._idle.sort(key=lambda r: r.index)  # the lowest free one first: warm caches
        st = self.stats
        st.batches += 1
        self._count_overtaken(batch)
        if batch.error is not None:
            if not isinstance(batch.error, DecodeError):
                _log.error("batch of %d inputs failed", len(batch.items), exc_info=batch.error)
            err = EmbeddError(Code.INTERNAL, f"inference failed: {batch.error}")
            for job in {item.job for item in batch.items}:
                if not job.answered:
                    self._scheduler.remove(job)
                    job.resolve(err)
            return
        elapsed = batch.finished - batch.started
        n_tokens = sum(len(s) for s in batch.seqs)
        replica.stats.record(time.monotonic(), elapsed, batch.threads)
        st.inputs += len(batch.items)
        st.tokens += n_tokens
        st.last_threads = batch.threads
        # Only well-filled batches measure throughput: small ones look slow per token, and
        # retry_after estimates built on them were hours long. A batch's rate per thread,
        # times the cores every replica can use together, is the model's capacity.
        if elapsed > 0 and n_tokens * 2 >= model.batch_tokens:
            rate = n_tokens / elapsed / batch.threads * self.budget.usable
            # The first measurement replaces the guess; later ones move an average.
            st.tokens_per_second = (
                0.8 * st.tokens_per_second + 0.2 * rate if st.throughput_measured else rate
            )
            st.throughput_measured = True
        for item, vec in zip(batch.items, batch.vectors, strict=True):
            job = item.job
            if job.answered:  # failed or cancelled meanwhile: nobody reads these vectors
                continue
            assert job.vectors is not None
            if job.started is None:
                job.started = batch.started
            job.vectors[item.index] = vec
            job.remaining -= 1
            if job.remaining == 0:
                st.latencies.append(
                    (
                        job.started - job.submitted,
                        batch.finished - job.started,
                        batch.finished - job.submitted,
                    )
                )
                job.resolve(_finish(job))

    def _count_overtaken(self, batch: _Batch) -> None:
        """A batch ended: if bulk, did it start after a query that is still waiting? (And
        forget the queries answered meanwhile.)"""
        overtook = False
        for job, arrived_at in list(self._queries.items()):
            if job.answered:
                del self._queries[job]
            elif batch.bulk and batch.number > arrived_at:
                overtook = True
        self.stats.bulk_overtook_queries += overtook

    def _chunk_slice(self, model: Model) -> None:
        """Advance the oldest chunk job for at most CHUNK_SLICE seconds."""
        job = self._chunking[0]
        if job.cancelled:
            self._chunking.popleft()
            job.resolve(EmbeddError(Code.CANCELLED, "request cancelled"))
            return
        text = job.texts[0]
        limit = job.max_tokens or model.max_tokens
        try:
            if job.cursor is None:
                job.cursor = model.chunk(text, max_tokens=limit, overlap=job.overlap)
            until = time.perf_counter() + CHUNK_SLICE
            for piece in job.cursor:
                job.pieces.append(
                    ChunkPiece(
                        text[piece.start : piece.end],
                        piece.start,
                        piece.end,
                        piece.tokens + model.frame_size,
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

    def _admit(self, model: Model, job: Job[Any]) -> None:
        if job.cancelled:
            self.stats.cancelled += len(job.texts)
            job.resolve(EmbeddError(Code.CANCELLED, "request cancelled"))
            return
        try:
            if isinstance(job, TokenizeJob):
                job.resolve(TokenizeResult([model.tokenize(t)[0] for t in job.texts]))
                return
            if isinstance(job, ChunkJob):
                self._chunking.append(job)
                return
            assert isinstance(job, EmbedJob)
            if not job.bulk:
                self.budget.note_interactive()
                self._queries[job] = self.stats.launched
                self.stats.queries_during_bulk += self._bulk_in_flight > 0
            if job.request.long == "split":
                self._splitting.append(job)
                return
            self._tokenize_embed_job(model, job)
        except EmbeddError as exc:
            job.resolve(exc)
            return
        self.stats.requests += 1
        self._scheduler.add(job)

    def _tokenize_embed_job(self, model: Model, job: EmbedJob) -> None:
        limit = model.max_tokens
        request = job.request
        for i, raw in enumerate(job.texts):
            text = job.prefix + raw
            # Only the part of a very long text that can matter is tokenized; its count is
            # then a lower bound, still over the limit.
            usable, partial = model.usable_prefix(text)
            toks, cut = model.tokenize(usable, truncate_to=limit if request.cuts else None)
            cut = cut or partial
            index = job.index(i)
            if len(toks) <= model.frame_size:
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
        self._ready(model, job)

    def _ready(self, model: Model, job: EmbedJob) -> None:
        """Every sequence of the job is known: room for its vectors, then its turn to batch."""
        job.vectors = np.empty((len(job.tokens), model.dim), dtype=np.float32)
        job.remaining = len(job.tokens)

    def _split_slice(self, model: Model) -> None:
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
                if not self._split_input(model, job, until):
                    return
                if time.perf_counter() > until:
                    return
        except EmbeddError as exc:
            self._splitting.popleft()
            job.resolve(exc)
            return
        self._splitting.popleft()
        self._ready(model, job)
        self.stats.requests += 1
        self._scheduler.add(job)

    def _split_input(self, model: Model, job: EmbedJob, until: float) -> bool:
        """Continue windowing the job's current input; True when that input is done, False
        when the slice ran out first. An input that fits is one window: exactly the sequence
        it would be without split. Windows each get the prompt and the special frame."""
        limit = model.max_tokens
        i = job.split_next
        text = job.texts[i]
        if job.split_cursor is None:
            job.split_windows = []
            usable, partial = model.usable_prefix(job.prefix + text)
            whole = None if partial else model.tokenize(usable)[0]
            if whole is not None and len(whole) <= limit:
                job.split_windows.append((0, len(text), whole))
                job.split_cursor = iter(())
            else:
                job.split_cursor = model.chunk(
                    text,
                    max_tokens=limit - _prompt_tokens(model, job),
                    overlap=job.request.overlap,
                )
        for c in job.split_cursor:
            toks = model.tokenize(job.prefix + text[c.start : c.end])[0][:limit]
            job.split_windows.append((c.start, c.end, toks))
            if time.perf_counter() > until:
                return False
        windows = job.split_windows
        if not windows or len(windows[0][2]) <= model.frame_size + _prompt_tokens(model, job):
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


def _prompt_tokens(model: Model, job: EmbedJob) -> int:
    """Tokens the prompt adds to each window (short: tokenized again rather than kept)."""
    return len(model.tokenize(job.prefix)[0]) - model.frame_size if job.prefix else 0


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
