"""One loaded model as the daemon drives it: a coordinating thread that owns the tokenizer, the
queue and every job's state, and the model process (`modelprocess.py`) whose replica threads
each own a llama context and compute the batches they are given.

The event loop hands the coordinator jobs through `submit` and gets answers back through the
jobs' asyncio futures (completed with `call_soon_threadsafe`), so the loop never waits on
inference or on the tokenizing of long inputs. The coordinator drains whatever has arrived,
tokenizes it, packs inputs from all waiting jobs into llama batches (`scheduler.py` decides
which) and sends each to a free replica with the threads the core budget grants
(`budget.py`); the process's answer comes back on its pipe, the cores go back to the budget at
once, and the coordinator alone writes into jobs and answers them. So a query starts on a free
replica while another computes a bulk batch, and every job's state has one owner.

llama.cpp never runs in the daemon's process: when the model process dies (a native fault, an
out-of-memory kill, a signal), the coordinator notices at once (EOF on its pipe), starts a new
one, retries what was computing, and splits a batch that kills twice until the inputs that
kill the model are found (`crashes.py`); other models never notice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from ..config import ModelConfig
from ..wire.errors import Code, EmbeddError
from .budget import CoreBudget
from .canary import (
    CANARY_TEXT,
    Attempt,
    LoadPlan,
    Refused,
    Verdicts,
    cpu_flags,
    verdict_key,
)
from .crashes import (
    CRASH_STREAK_LIMIT,
    FAILED_RETRY_AFTER,
    Backoff,
    CulpritSearch,
    PoisonMemory,
)
from .jobs import (
    ChunkJob,
    ChunkPiece,
    ChunkResult,
    EmbedJob,
    EmbedResult,
    Job,
    RerankJob,
    TokenizeJob,
    TokenizeResult,
    settle,
    settle_failed,
)
from .modelfile import ModelFile, identify, version_of
from .modelprocess import ModelProcess, ProcessExit, ProcessGone, read_rss_bytes, take_process
from .pipe import (
    Compute,
    Computed,
    ComputeFailed,
    Hello,
    Load,
    Loaded,
    LoadFailed,
    Message,
    ModelInfo,
)
from .scheduler import Item, Scheduler
from .stats import ReplicaStats, WorkerStats
from .threads import Launch
from .tokens import ModelTokenizer

_log = logging.getLogger("embedd.worker")
M = TypeVar("M")

# How long the model thread chunks a text before looking at its queue again: a query waits
# at most this (plus a batch) behind a 10 MB `chunk` request.
CHUNK_SLICE = 0.005
# The canary's batch number: real batches count from 1.
_CANARY_BATCH = 0
# The most of a cross-encoder's window a rerank query may take: the rest is the document's, so
# a document is never read through a slit narrower than this share of the model's limit. A
# longer query is refused (never cut), as an over-long embed input is.
QUERY_SHARE = 0.5


class _Failed(Exception):
    """The model cannot be served; the message says why (a load failure, or a model that
    keeps crashing)."""


@dataclass(eq=False)
class _Batch:
    """A batch sent to a replica: the coordinator fills it in, the pipe's reader adds the
    outcome."""

    number: int
    items: list[Item[EmbedJob]]
    seqs: list[list[int]]
    threads: int
    # Whether every input is bulk (a batch with any interactive input is an interactive one).
    bulk: bool
    replica: _Replica
    vectors: Any = None
    error: str | None = None
    # perf_counter() when sent and when its answer arrived; the decode's own seconds.
    started: float = 0.0
    finished: float = 0.0
    seconds: float = 0.0
    # Set by the reader when the answer arrived (its cores are back in the budget).
    returned: bool = False
    # Model processes that died while computing it, and whether nothing else was computing
    # (then a death is this batch's doing).
    crashes: int = 0
    alone: bool = True
    # A group of a culprit search (run alone, by `CulpritSearch`'s rules).
    suspect: bool = False


class _Replica:
    """One llama context in the model process, as the coordinator books it."""

    def __init__(self, index: int, stats: ReplicaStats) -> None:
        self.index = index
        self.stats = stats


class ModelWorker:
    """Loads one model in a model process and serves jobs until stopped."""

    def __init__(
        self,
        config: ModelConfig,
        loop: asyncio.AbstractEventLoop,
        stats: WorkerStats,
        budget: CoreBudget,
        poison: PoisonMemory | None = None,
        verdicts: Verdicts | None = None,
        *,
        hung_after: float = 240.0,
        load_timeout: float = 600.0,
    ) -> None:
        self.config = config
        # A batch computing longer than this: the model process stopped answering (a deadlock,
        # a stopped process), and is killed so that its work goes the way of a crash's.
        self._hung_after = hung_after
        # The whole load (each process started for it, the weights, the canary) within this;
        # past it the process is killed and the load fails, naming the key.
        self._load_timeout = load_timeout
        self._load_deadline = math.inf
        self._killed_hung: ModelProcess | None = None
        self.budget = budget
        self.info: ModelInfo | None = None
        self.error: str | None = None
        # Set when the model was given up on after crashing again and again, with when it may
        # be tried again (monotonic seconds).
        self.crashed_out: str | None = None
        self.retry_at = 0.0
        # Owned by the model's slot, so the counts survive unloading and reloading.
        self.stats = stats
        self.poison = poison if poison is not None else PoisonMemory()
        self._verdicts = verdicts if verdicts is not None else Verdicts()
        self._loop = loop
        self.loaded: asyncio.Future[ModelInfo] = loop.create_future()
        self.finished: asyncio.Future[None] = loop.create_future()
        self._cond = threading.Condition()
        self._incoming: deque[Job[Any]] = deque()
        self._done: deque[_Batch] = deque()
        # What the model process said besides vectors (Hello, Loaded, LoadFailed), and how
        # it ended, each with the process it came from.
        self._control: deque[tuple[ModelProcess, Message]] = deque()
        self._exits: deque[tuple[ModelProcess, ProcessExit]] = deque()
        self._stopping = False
        self._scheduler: Scheduler[EmbedJob] = Scheduler()
        self._chunking: deque[ChunkJob] = deque()
        # long="split" jobs being cut into windows, a slice at a time between batches; each
        # joins the scheduler once all its windows are known.
        self._splitting: deque[EmbedJob] = deque()
        self._tokenizer: ModelTokenizer | None = None
        self._process: ModelProcess | None = None
        self._load_message: Load | None = None
        # Whether weights are repacked, and why not when they are not (the model card says).
        self.repacking = "on"
        self._replicas: list[_Replica] = []
        self._idle: list[_Replica] = []
        self._flying: dict[int, _Batch] = {}
        self._bulk_in_flight = 0
        # Batches a dying process was computing, to run once more; and inputs of batches that
        # killed two, run alone until the ones to blame are found.
        self._retry: deque[_Batch] = deque()
        self._search: CulpritSearch[Item[EmbedJob]] = CulpritSearch()
        # While a search waits, normal batches and the search's groups take turns.
        self._search_turn = True
        self._backoff = Backoff()
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
    def pid(self) -> int | None:
        """The model process's pid while one runs."""
        process = self._process
        return process.pid if process is not None and process.exit is None else None

    def process_rss(self) -> int | None:
        pid = self.pid
        return read_rss_bytes(pid) if pid is not None else None

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
                if self.crashed_out is not None:
                    raise EmbeddError(Code.MODEL_CRASHED, self.crashed_out, model=self.config.name)
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
        """Finish every job already submitted, then end the model process and the thread."""
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

    # --- the model process's messages, on its pipe's reader thread -----------------------------

    def _on_message(self, process: ModelProcess, message: Message) -> None:
        if not isinstance(message, Computed | ComputeFailed):
            with self._cond:
                self._control.append((process, message))
                self._cond.notify()
            return
        now = time.perf_counter()
        with self._cond:
            batch = self._flying.get(message.batch) if process is self._process else None
            if batch is None or batch.returned:
                return
            batch.returned = True
            batch.finished = now
            if isinstance(message, Computed):
                batch.seconds = message.seconds
                batch.vectors = np.frombuffer(message.vectors, "<f4").reshape(len(batch.seqs), -1)
            else:
                batch.error = message.reason
            if batch.number == _CANARY_BATCH:
                self._cond.notify()
                return  # it held no cores, and the coordinator waits for it by itself
        # The cores are free before the coordinator looks: another model may take them.
        self.budget.release(self.config.name, batch.threads)
        with self._cond:
            self._done.append(batch)
            self._cond.notify()

    def _on_exit(self, process: ModelProcess, exit: ProcessExit) -> None:
        with self._cond:
            self._exits.append((process, exit))
            self._cond.notify()

    # --- the coordinator ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            if self._load():
                self._serve()
        except BaseException as exc:  # never leave a job without an answer
            _log.exception("model thread %s crashed", self.config.name)
            self._fail_everything(EmbeddError(Code.INTERNAL, f"model thread crashed: {exc!r}"))
        finally:
            process = self._process
            if process is not None:
                process.close()
            for replica in self._replicas:
                self.budget.retire(replica)
            self._loop.call_soon_threadsafe(_set_done, self.finished)

    def _load(self) -> bool:
        """Start the model process, load the model in it and prove it computes; False when
        that failed (and every job heard why)."""
        cfg = self.config
        started = time.monotonic()
        try:
            identity = _identify(cfg.path)
            # The process's own time: hashing a large file first is not a hung load.
            self._load_deadline = time.monotonic() + self._load_timeout
            info = self._start(identity)
        except _Failed as exc:
            self._fail_load(str(exc))
            return False
        self.info = replace(
            info,
            fingerprint=identity.fingerprint,
            card={**info.card, **identity.card(), "weight_repacking": self.repacking},
        )
        _log.info(
            "model %s loaded in %.2fs (process %s): dim %d, pooling %s, max_tokens %d, "
            "batch %d tokens, %d replicas, threads %s, weight repacking %s",
            cfg.name,
            time.monotonic() - started,
            self.pid,
            info.dim,
            info.pooling,
            info.max_tokens,
            info.batch_tokens,
            len(self._replicas),
            cfg.threads or "auto (per batch, from the core budget)",
            self.repacking,
        )
        self._loop.call_soon_threadsafe(settle, self.loaded, self.info)
        return True

    def _start(self, identity: ModelFile) -> ModelInfo:
        """A model process with the model loaded, the canary computed where no verdict says
        how this file behaves on this build and CPU (`canary.LoadPlan` decides)."""
        cfg = self.config
        plan: LoadPlan | None = None
        step: Attempt | Refused | None = None
        while True:
            process = self._spawn()
            hello = self._await(process, Hello)
            key = verdict_key(identity.sha256, hello.build, hello.system_info, cpu_flags())
            if plan is None:
                plan = LoadPlan(self._verdicts.get(key))
                step = plan.first()
            if isinstance(step, Refused):
                process.close()
                raise _Failed(step.reason)
            assert step is not None
            self.repacking = plan.repacking
            try:
                loaded = self._load_in(process, step.repack)
                if step.canary:
                    self._canary(process, loaded)
                    self._verdicts.put(key, plan.passed())
                return loaded
            except _Died as died:
                how = died.exit.how
                step = plan.died(how, died.phase, str(cfg.path))
                if isinstance(step, Refused):
                    keep = plan.refusal_to_keep(step, how)
                    if keep is not None:
                        self._verdicts.put(key, keep)
                    raise _Failed(step.reason) from None
                _log.warning(
                    "model %s: llama.cpp died by %s %s with weight repacking on; loading it "
                    "again with repacking off",
                    cfg.name,
                    how,
                    died.phase,
                )

    def _spawn(self) -> ModelProcess:
        process = take_process(self.config.name, self._on_message, self._on_exit)
        self._process = process
        self.stats.process_starts += 1
        return process

    def _await(self, process: ModelProcess, kind: type[M], phase: str = "starting") -> M:
        """Wait for the process's next control message, which must be a `kind`; _Died if the
        process ends first, _Failed if it says the load failed."""
        with self._cond:
            while True:
                for i, (source, message) in enumerate(self._control):
                    if source is process:
                        del self._control[i]
                        if isinstance(message, LoadFailed):
                            raise _Failed(message.reason)
                        if not isinstance(message, kind):
                            raise _Failed(f"model process sent {type(message).__name__}")
                        return message
                self._raise_if_ended(process, phase)
                self._wait_for_load(process, phase)

    def _raise_if_ended(self, process: ModelProcess, phase: str) -> None:
        """_Died if the process's end is among the exits seen (taken from them)."""
        for i, (source, exit) in enumerate(self._exits):
            if source is process:
                del self._exits[i]
                self.stats.crashes += exit.signal is not None
                raise _Died(exit, phase)

    def _wait_for_load(self, process: ModelProcess, phase: str) -> None:
        """Wait (holding the condition) for the process's next word, within the load's
        deadline; past it the process is killed and the load fails naming `load_timeout`."""
        left = self._load_deadline - time.monotonic()
        if left <= 0:
            process.kill()
            raise _Failed(
                f"its model process was still {phase} when load_timeout "
                f"({self._load_timeout:g}s) ran out; killed as hung"
            )
        self._cond.wait(left)

    def _load_in(self, process: ModelProcess, repack: bool) -> ModelInfo:
        """Load the model in a started process and get its replicas ready."""
        cfg = self.config
        message = Load(
            path=str(cfg.path),
            batch_tokens=cfg.batch_tokens,
            max_tokens=cfg.max_tokens,
            gpu_layers=cfg.gpu_layers,
            dim=cfg.dim,
            pooling=cfg.pooling,
            replicas=cfg.replicas,
            threads=cfg.threads,
            usable=self.budget.usable,
            repack=repack,
        )
        with contextlib.suppress(ProcessGone):  # if gone, its exit is on the way
            process.send(message)
        loaded = self._await(process, Loaded, "loading")
        count = loaded.replicas
        self._load_message = message
        self._tokenizer = ModelTokenizer(loaded.tokenizer, self._tokenize_in_process)
        self._gpu = loaded.info.card.get("runs_on") == "gpu"
        if not self._replicas:
            del self.stats.replicas[count:]
            self._replicas = [_Replica(i, self.stats.replica(i)) for i in range(count)]
        self._idle = list(self._replicas)
        info: ModelInfo = loaded.info
        return info

    def _canary(self, process: ModelProcess, info: ModelInfo) -> None:
        """One small batch before any traffic: a native path that kills the process does it
        here, where the coordinator can still choose another."""
        assert self._tokenizer is not None
        self.stats.canaries += 1
        ids, _ = self._tokenizer.tokenize(CANARY_TEXT, truncate_to=info.max_tokens)
        canary = _Batch(_CANARY_BATCH, [], [ids], 1, False, self._replicas[0])
        with self._cond:
            self._flying[_CANARY_BATCH] = canary  # before sending: the answer may come at once
        with contextlib.suppress(ProcessGone):  # if gone, its exit is on the way
            process.send(Compute(_CANARY_BATCH, 0, 1, [len(ids)], np.asarray(ids, "<i4").tobytes()))
        try:
            with self._cond:
                while not canary.returned:
                    self._raise_if_ended(process, "computing its first batch with")
                    self._wait_for_load(process, "computing its first batch")
        finally:
            with self._cond:
                self._flying.pop(_CANARY_BATCH, None)
        if canary.error is not None:
            raise _Failed(f"llama.cpp failed its first batch: {canary.error}")
        if not np.isfinite(canary.vectors).all():
            raise _Failed("llama.cpp computed a vector that is not finite for its first batch")

    def _tokenize_in_process(self, text: str) -> list[int]:
        process = self._process
        if process is None:
            raise ProcessGone("no model process")
        return process.tokenize(text)

    def _restart(self, exit: ProcessExit) -> None:
        """The process died while serving: start another, after the back-off, with what the
        first load decided; give the model up when it keeps dying."""
        cfg = self.config
        while True:
            if self._backoff.streak >= CRASH_STREAK_LIMIT:
                raise _Failed(
                    f"model {cfg.name!r} keeps crashing ({exit.how}, {self._backoff.streak} "
                    "times in a row with no input to blame); it is tried again on the next "
                    f"`load`, or on a request after {FAILED_RETRY_AFTER:g}s"
                )
            delay = self._backoff.delay()
            if delay:
                _log.warning("model %s: starting its process again in %.2fs", cfg.name, delay)
                deadline = time.monotonic() + delay
                with self._cond:
                    # A stopping worker still finishes what it was given: no waiting then.
                    while not self._stopping and (left := deadline - time.monotonic()) > 0:
                        self._cond.wait(left)
            self._load_deadline = time.monotonic() + self._load_timeout
            process = self._spawn()
            self.stats.restarts += 1
            assert self._load_message is not None
            try:
                self._await(process, Hello)
                self._load_in(process, self._load_message.repack)
                return
            except _Died as died:
                _log.error(
                    "model %s: its new process died by %s %s", cfg.name, died.exit.how, died.phase
                )
                exit = died.exit
                self._backoff.died()

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

    def _give_up(self, reason: str) -> None:
        """The model keeps crashing: every job hears why, and requests are refused until the
        retry time (the slot starts a new worker then)."""
        _log.error("model %s: %s", self.config.name, reason)
        self.retry_at = time.monotonic() + FAILED_RETRY_AFTER
        with self._cond:
            self.crashed_out = reason
            self._stopping = True
        self._fail_everything(EmbeddError(Code.MODEL_CRASHED, reason, model=self.config.name))

    def _fail_everything(self, err: EmbeddError) -> None:
        with self._cond:
            jobs: list[Job[Any]] = list(self._incoming)
            self._incoming.clear()
            flying = list(self._flying.values())
        jobs.extend(self._scheduler.clear())
        jobs.extend(self._chunking)
        self._chunking.clear()
        jobs.extend(self._splitting)
        self._splitting.clear()
        jobs.extend(item.job for batch in flying for item in batch.items)
        jobs.extend(item.job for batch in self._retry for item in batch.items)
        jobs.extend(item.job for item in self._search.pending())
        for job in set(jobs):
            if not job.answered:
                job.resolve(err)

    def _launchable(self) -> bool:
        if not self._idle or self._process is None or self._search.running is not None:
            return False  # a culprit search's group computes alone
        if self._refused_at is not None and self._refused_at == self._cores_freed:
            return False  # the budget said no, and no cores came free since
        if self._search and self._search_turn:
            return not self._flying  # the search's next group waits for quiet
        return self._scheduler.has_work() or bool(self._retry) or bool(self._search)

    def _serve(self) -> None:
        while True:
            with self._cond:
                while (
                    not self._incoming
                    and not self._done
                    and not self._exits
                    and not self._launchable()
                    and not self._chunking
                    and not self._splitting
                ):
                    if (
                        self._stopping
                        and not self._flying
                        and not self._scheduler.has_work()
                        and not self._retry
                        and not self._search
                    ):
                        return
                    hung_in = self._hung_in()
                    if hung_in is not None and hung_in <= 0:
                        break
                    self._cond.wait(hung_in)
                arrived = list(self._incoming)
                self._incoming.clear()
                done = list(self._done)
                self._done.clear()
                exits = list(self._exits)
                self._exits.clear()
                self._control.clear()  # nothing but a load waits for those
            for batch in done:
                self._batch_done(batch)
            self._kill_if_hung()
            for process, exit in exits:
                if process is self._process:
                    try:
                        self._died(exit)
                    except _Failed as exc:
                        self._give_up(str(exc))
                        return
            # Interactive jobs first: tokenizing a bulk request must not hold up a query.
            arrived.sort(key=lambda job: job.bulk)
            for job in arrived:
                self._admit(job)
            if arrived:
                # The budget refused bulk; a query that just arrived may still start.
                self._refused_at = None
            for job, dropped in self._scheduler.drop_cancelled():
                self.stats.cancelled += dropped
                job.resolve(EmbeddError(Code.CANCELLED, "request cancelled"))
            self._launch()
            if self._chunking:
                self._chunk_slice()
            if self._splitting:
                self._split_slice()

    # --- a model process that died while serving --------------------------------------------

    def _hung_in(self) -> float | None:
        """Seconds until the oldest computing batch counts as hung (None: nothing computes)."""
        started = [b.started for b in self._flying.values() if not b.returned]
        if not started or self._process is None or self._process is self._killed_hung:
            return None  # nothing computes, or the hung process's exit is on its way
        return min(started) + self._hung_after - time.perf_counter()

    def _kill_if_hung(self) -> None:
        hung_in = self._hung_in()
        process = self._process
        if hung_in is not None and hung_in <= 0 and process is not None and process.exit is None:
            _log.error(
                "model %s: its process %d stopped answering (a batch computing for over %gs); "
                "killing it",
                self.config.name,
                process.pid,
                self._hung_after,
            )
            self._killed_hung = process
            process.kill()  # its exit comes back as any death does

    def _died(self, exit: ProcessExit) -> None:
        """Account for the batches the process was computing, answer the inputs found to kill
        it, and start another process."""
        cfg = self.config
        self.stats.crashes += exit.signal is not None or exit.status != 0
        with self._cond:
            victims = [b for b in self._flying.values() if not b.returned]
            self._flying.clear()
        self._process = None
        for batch in victims:
            self.budget.release(cfg.name, batch.threads)
            batch.replica.stats.computing = False
        self._bulk_in_flight = 0
        self._idle = list(self._replicas)
        _log.error(
            "model %s: its process %d died by %s while computing %d batch(es); starting another",
            cfg.name,
            exit.pid,
            exit.how,
            len(victims),
        )
        counts = True
        for batch in victims:
            live = [item for item in batch.items if not item.job.answered]
            if batch.suspect:
                counts = False
                for item in self._search.crashed():
                    self._blame(item, exit)
                continue
            batch.crashes += 1
            if batch.crashes == 1:
                self._retry.append(batch)
            else:
                alone = batch.alone and len(victims) == 1
                for item in self._search.add(live, crashed_alone=alone):
                    self._blame(item, exit)
        if counts:
            self._backoff.died()
        self._search_turn = True
        self._restart(exit)

    def _blame(self, item: Item[EmbedJob], exit: ProcessExit) -> None:
        """`item` killed the model twice, the second time alone: its request hears so, and its
        tokens are remembered so it is refused next time without a crash."""
        job = item.job
        tokens = job.tokens[item.index]
        self.poison.add(tokens, exit.how)
        self.stats.poison_found += 1
        index = job.index(_input_of(job, item.index))
        _log.error(
            "model %s: input[%d] of a request kills it (%s); refused from now on",
            self.config.name,
            index,
            exit.how,
        )
        if not job.answered:
            self._scheduler.remove(job)
            job.resolve(
                _crashed_error(self.config.name, index, exit.how, again=False, key=_key(job))
            )

    # --- launching batches ------------------------------------------------------------------

    def _launch(self) -> None:
        """Start batches on free replicas for as long as the core budget grants threads: a
        culprit search's group alone, the batches a dead process was computing, then the
        queue."""
        if not self._launchable():
            return
        if self._search and self._search_turn:
            # Nothing computes (`_launchable` saw to it): the next group runs alone.
            group = self._search.next_group()
            if group is not None:
                live = [item for item in group if not item.job.answered]
                if not live:
                    self._search.passed()
                elif not self._send_batch(live, suspect=True):
                    self._search.put_back(group)
            return
        while self._retry and self._launchable():
            batch = self._retry[0]
            live = [item for item in batch.items if not item.job.answered]
            if not live:
                self._retry.popleft()
                continue
            if not self._send_batch(live, crashes=batch.crashes):
                return
            self._retry.popleft()
        while self._launchable() and self._scheduler.has_work():
            if not self._send_batch(None):
                break
        # Normal work had its turn: the search's next group goes once the replicas are quiet.
        self._search_turn = True

    def _send_batch(
        self, items: list[Item[EmbedJob]] | None, *, crashes: int = 0, suspect: bool = False
    ) -> bool:
        """Send the next batch (`items`, or the scheduler's choice) to a free replica; False
        when the budget refused cores or nothing was left to send."""
        model = self.info
        process = self._process
        assert model is not None and process is not None
        # The replica that may borrow cores if it is free (budget.py), else the lowest.
        wide = self.budget.wide
        replica = next((r for r in self._idle if r is wide), self._idle[0])
        interactive = (
            any(not item.job.bulk for item in items)
            if items is not None
            else self._scheduler.has_interactive()
        )
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
            return False
        self._refused_at = None
        if items is None:
            items = self._scheduler.next_batch(
                model.batch_tokens, model.max_seqs, bulk_running=self._bulk_in_flight > 0
            )
        if not items:
            self.budget.release(self.config.name, threads)
            return False
        self._idle.remove(replica)
        self.stats.launched += 1
        bulk = all(item.job.bulk for item in items)
        seqs = [item.job.tokens[item.index] for item in items]
        batch = _Batch(
            number=self.stats.launched,
            items=items,
            seqs=seqs,
            threads=threads,
            bulk=bulk,
            replica=replica,
            crashes=crashes,
            suspect=suspect,
            alone=not self._flying,
        )
        with self._cond:
            for other in self._flying.values():
                other.alone = False
            self._flying[batch.number] = batch
        self._bulk_in_flight += bulk
        replica.stats.computing = True
        batch.started = time.perf_counter()
        # If the process is gone, its exit is on the way and this batch goes with the others
        # that were computing.
        with contextlib.suppress(ProcessGone):
            process.send(
                Compute(
                    batch.number,
                    replica.index,
                    threads,
                    [len(s) for s in seqs],
                    np.concatenate([np.asarray(s, "<i4") for s in seqs]).tobytes(),
                )
            )
        return True

    def _batch_done(self, batch: _Batch) -> None:
        """A replica's batch came back: account for it, fill in its jobs, answer the done."""
        model = self.info
        assert model is not None
        with self._cond:
            self._flying.pop(batch.number, None)
        self._bulk_in_flight -= batch.bulk
        replica = batch.replica
        replica.stats.computing = False
        self._idle.append(replica)
        self._idle.sort(key=lambda r: r.index)  # the lowest free one first: warm caches
        if batch.suspect:
            self._search.passed()
            self._search_turn = False
        st = self.stats
        st.batches += 1
        self._count_overtaken(batch)
        if batch.error is not None:
            _log.error("batch of %d inputs failed: %s", len(batch.items), batch.error)
            err = EmbeddError(Code.INTERNAL, f"inference failed: {batch.error}")
            for job in {item.job for item in batch.items}:
                if not job.answered:
                    self._scheduler.remove(job)
                    job.resolve(err)
            return
        self._backoff.progressed()
        elapsed = batch.seconds
        n_tokens = sum(len(s) for s in batch.seqs)
        replica.stats.record(time.monotonic(), elapsed, batch.threads)
        st.boundary.append(max(0.0, batch.finished - batch.started - batch.seconds))
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
                job.resolve(_embed_result(job))

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

    # --- admitting and tokenizing -----------------------------------------------------------

    def _chunk_slice(self) -> None:
        """Advance the oldest chunk job for at most CHUNK_SLICE seconds."""
        tok = self._tokenizer
        assert tok is not None
        job = self._chunking[0]
        if job.cancelled:
            self._chunking.popleft()
            job.resolve(EmbeddError(Code.CANCELLED, "request cancelled"))
            return
        text = job.texts[0]
        limit = job.max_tokens or tok.max_tokens
        try:
            if job.cursor is None:
                job.cursor = tok.chunk(text, max_tokens=limit, overlap=job.overlap)
            until = time.perf_counter() + CHUNK_SLICE
            for piece in job.cursor:
                job.pieces.append(
                    ChunkPiece(
                        text[piece.start : piece.end],
                        piece.start,
                        piece.end,
                        piece.tokens + tok.frame_size,
                    )
                )
                if time.perf_counter() > until:
                    return
        except ValueError as exc:
            self._chunking.popleft()
            job.resolve(EmbeddError(Code.BAD_REQUEST, str(exc), key="max_tokens"))
            return
        except ProcessGone:
            # Its process died (the exit is on its way): cut this text again from the start.
            job.cursor = None
            job.pieces.clear()
            return
        self._chunking.popleft()
        if not job.pieces and text.strip():
            # Like an embed input of the same text: nothing in it for the model to embed.
            job.resolve(
                EmbeddError(
                    Code.BAD_REQUEST,
                    "input has no tokens the model knows (only control, format, unknown or "
                    "private-use characters)",
                    key="input",
                )
            )
            return
        job.resolve(ChunkResult(job.pieces, limit))

    def _admit(self, job: Job[Any]) -> None:
        tok = self._tokenizer
        assert tok is not None
        if job.cancelled:
            self.stats.cancelled += len(job.texts)
            job.resolve(EmbeddError(Code.CANCELLED, "request cancelled"))
            return
        try:
            if isinstance(job, TokenizeJob):
                ids = _tokenize_within(tok, job)
                pieces = [tok.pieces(t) for t in job.texts] if job.pieces else []
                known = [p for p in pieces if p is not None]
                job.resolve(TokenizeResult(ids, known if job.pieces and known == pieces else None))
                return
            if isinstance(job, ChunkJob):
                self._chunking.append(job)
                return
            assert isinstance(job, EmbedJob)
            if not job.bulk:
                self.budget.note_interactive()
                self._queries[job] = self.stats.launched
                self.stats.queries_during_bulk += self._bulk_in_flight > 0
            if isinstance(job, RerankJob):
                self._tokenize_query(job)
                self._splitting.append(job)
                return
            if job.request.long == "split":
                self._splitting.append(job)
                return
            self._tokenize_embed_job(job)
        except EmbeddError as exc:
            job.resolve(exc)
            return
        except ProcessGone:
            # The process died under llama.cpp's tokenizer: the job waits for the next one.
            if isinstance(job, EmbedJob):
                job.tokens.clear()
                job.groups.clear()
                job.spans.clear()
                job.truncated.clear()
            with self._cond:
                self._incoming.appendleft(job)
            return
        self.stats.requests += 1
        self._scheduler.add(job)

    def _tokenize_embed_job(self, job: EmbedJob) -> None:
        tok = self._tokenizer
        assert tok is not None
        limit = tok.max_tokens
        request = job.request
        for i, raw in enumerate(job.texts):
            text = job.prefix + raw
            # Only the part of a very long text that can matter is tokenized; its count is
            # then a lower bound, still over the limit.
            usable, partial = tok.usable_prefix(text)
            toks, cut = tok.tokenize(usable, truncate_to=limit if request.cuts else None)
            cut = cut or partial
            index = job.index(i)
            if len(toks) <= tok.frame_size:
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
        self._ready(job)

    def _ready(self, job: EmbedJob) -> None:
        """Every sequence of the job is known: refused if one is known to kill the model,
        else room for its vectors, then its turn to batch."""
        for k, tokens in enumerate(job.tokens):
            how = self.poison.killed_by(tokens)
            if how is not None:
                self.stats.poison_refused += 1
                index = job.index(_input_of(job, k))
                raise _crashed_error(self.config.name, index, how, again=True, key=_key(job))
        assert self.info is not None
        width = self.info.outputs or self.info.dim
        job.vectors = np.empty((len(job.tokens), width), dtype=np.float32)
        job.remaining = len(job.tokens)

    def _split_slice(self) -> None:
        """Advance the oldest split job for at most CHUNK_SLICE seconds: a 20 MB text is cut
        into windows between batches, never in one go while queries wait."""
        job = self._splitting[0]
        if job.cancelled:
            self._splitting.popleft()
            self.stats.cancelled += len(job.texts)
            job.resolve(EmbeddError(Code.CANCELLED, "request cancelled"))
            return
        until = time.perf_counter() + CHUNK_SLICE
        step = self._split_pair if isinstance(job, RerankJob) else self._split_input
        try:
            while job.split_next < len(job.texts):
                if not step(job, until):
                    return
                if time.perf_counter() > until:
                    return
            self._ready(job)
        except EmbeddError as exc:
            self._splitting.popleft()
            job.resolve(exc)
            return
        except ProcessGone:
            # Its process died (the exit is on its way): window this input again from its start.
            job.split_cursor = None
            job.split_windows = []
            return
        self._splitting.popleft()
        self.stats.requests += 1
        if isinstance(job, RerankJob):
            self.stats.reranks += 1
            self.stats.pairs += len(job.tokens)
        self._scheduler.add(job)

    def _tokenize_query(self, job: RerankJob) -> None:
        """The query's ids, once per job; refused when it would take more than QUERY_SHARE of
        the model's limit (it is never cut: a cut query asks something else)."""
        tok = self._tokenizer
        assert tok is not None
        most = int(tok.max_tokens * QUERY_SHARE)
        usable, partial = tok.usable_prefix(job.query, limit=most + tok.frame_size)
        ids = tok.bare(usable)
        if partial or len(ids) > most:
            raise EmbeddError(
                Code.INPUT_TOO_LONG,
                f"the query has {'at least ' if partial else ''}{len(ids)} tokens, more than "
                f"{most} (half of the model's limit of {tok.max_tokens}, the most a query may "
                "take beside a document); a query is never cut",
                key="query",
                tokens=len(ids),
                limit=most,
            )
        if not ids:
            raise EmbeddError(
                Code.BAD_REQUEST,
                "the query has no tokens the model knows (only control, unknown or private-use "
                "characters)",
                key="query",
            )
        job.query_ids = ids

    def _split_pair(self, job: EmbedJob, until: float) -> bool:
        """Continue cutting the job's current document into pairs with its query; True when
        that document is done, False when the slice ran out first. A document that fits
        beside the query is one pair; a longer one is cut by the `long="split"` rules
        (paragraphs, then sentences, then words; no overlap), each piece paired with the
        whole query, so nothing of it goes unread."""
        tok = self._tokenizer
        assert tok is not None and isinstance(job, RerankJob)
        room = tok.max_tokens - tok.spec.pair.size - len(job.query_ids)
        i = job.split_next
        text = job.texts[i]
        if job.split_cursor is None:
            job.split_windows = []
            usable, partial = tok.usable_prefix(text, limit=room + tok.frame_size)
            whole = None if partial else tok.bare(usable)
            if whole is not None and len(whole) <= room:
                job.split_windows.append((0, len(text), tok.pair(job.query_ids, whole)))
                job.split_cursor = iter(())
            else:
                job.split_cursor = tok.chunk(text, max_tokens=room + tok.frame_size)
        for c in job.split_cursor:
            piece = tok.bare(text[c.start : c.end])[:room]
            job.split_windows.append((c.start, c.end, tok.pair(job.query_ids, piece)))
            if time.perf_counter() > until:
                return False
        _windows_done(job, "documents", tok.spec.pair.size + len(job.query_ids))
        return True

    def _split_input(self, job: EmbedJob, until: float) -> bool:
        """Continue windowing the job's current input; True when that input is done, False
        when the slice ran out first. An input that fits is one window: exactly the sequence
        it would be without split. Windows each get the prompt and the special frame."""
        tok = self._tokenizer
        assert tok is not None
        limit = tok.max_tokens
        i = job.split_next
        text = job.texts[i]
        if job.split_cursor is None:
            job.split_windows = []
            usable, partial = tok.usable_prefix(job.prefix + text)
            whole = None if partial else tok.tokenize(usable)[0]
            if whole is not None and len(whole) <= limit:
                job.split_windows.append((0, len(text), whole))
                job.split_cursor = iter(())
            else:
                job.split_cursor = tok.chunk(
                    text,
                    max_tokens=limit - _prompt_tokens(tok, job),
                    overlap=job.request.overlap,
                )
        for c in job.split_cursor:
            toks = tok.tokenize(job.prefix + text[c.start : c.end])[0][:limit]
            job.split_windows.append((c.start, c.end, toks))
            if time.perf_counter() > until:
                return False
        _windows_done(job, "input", tok.frame_size + _prompt_tokens(tok, job))
        return True


def _windows_done(job: EmbedJob, key: str, frame: int) -> None:
    """The job's current input is cut into its windows (`split_windows`): they become its
    group of sequences, with their spans. A first window of no more than the `frame` tokens
    (special tokens, prompt or query) holds nothing of the text: refused, naming the input."""
    i = job.split_next
    windows = job.split_windows
    if not windows or len(windows[0][2]) <= frame:
        index = job.index(i)
        raise EmbeddError(
            Code.BAD_REQUEST,
            f"{key}[{index}] has no tokens the model knows",
            key=key,
            index=index,
        )
    job.groups.append(list(range(len(job.tokens), len(job.tokens) + len(windows))))
    job.spans.append([(start, end) for start, end, _ in windows])
    job.tokens.extend(toks for _, _, toks in windows)
    job.truncated.append(False)
    job.split_cursor = None
    job.split_windows = []
    job.split_next += 1


class _Died(Exception):
    """The model process ended while the coordinator waited on it."""

    def __init__(self, exit: ProcessExit, phase: str) -> None:
        super().__init__(f"died by {exit.how} {phase}")
        self.exit = exit
        self.phase = phase


def _identify(path: Path) -> ModelFile:
    """The file's identity (its sha256 keys the canary's verdicts); the model process checks
    the rest of the file."""
    try:
        return identify(path)
    except FileNotFoundError:
        raise _Failed(f"model file not found: {path}") from None
    except IsADirectoryError:
        raise _Failed(f"model path is not a file: {path}") from None
    except OSError as exc:
        raise _Failed(f"cannot read model file {path}: {exc.strerror or exc}") from None


def _input_of(job: EmbedJob, sequence: int) -> int:
    """Which of the job's texts a sequence (an input, or one of its windows) belongs to."""
    for i, group in enumerate(job.groups):
        if sequence in group:
            return i
    return sequence


def _crashed_error(
    model: str, index: int, how: str, *, again: bool, key: str = "input"
) -> EmbeddError:
    """`key`: what the request calls its texts (`documents` for a rerank)."""
    if again:
        message = (
            f"{key}[{index}] is refused: it crashed model {model!r} ({how}) before, and would again"
        )
    else:
        message = (
            f"{key}[{index}] crashes model {model!r} ({how}): llama.cpp died computing it, on "
            "two model processes; it is refused from now on (the other inputs computing with "
            "it were answered)"
        )
    return EmbeddError(Code.MODEL_CRASHED, message, index=index, signal=how, model=model)


def _key(job: EmbedJob) -> str:
    """What the job's request calls its texts."""
    return "documents" if isinstance(job, RerankJob) else "input"


def _tokenize_within(tok: ModelTokenizer, job: TokenizeJob) -> list[list[int]]:
    """Each text's ids, refused as soon as they pass `max_ids` in all: a text is tokenized
    only as far as the ids left room for, never whole first."""
    left = job.max_ids
    out: list[list[int]] = []
    for i, text in enumerate(job.texts):
        usable, partial = tok.usable_prefix(text, limit=left)
        ids = tok.tokenize(usable)[0]
        if left is not None:
            if partial or len(ids) > left:
                raise EmbeddError(
                    Code.BAD_REQUEST,
                    f"the token ids of input[{i}] and those before it would not fit in "
                    f"max_response ({job.max_ids} ids at most); send less text per request",
                    key="input",
                    index=i,
                    limit=job.max_ids,
                )
            left -= len(ids)
        out.append(ids)
    return out


def _prompt_tokens(tok: ModelTokenizer, job: EmbedJob) -> int:
    """Tokens the prompt adds to each window (short: tokenized again rather than kept)."""
    return len(tok.tokenize(job.prefix)[0]) - tok.frame_size if job.prefix else 0


def _embed_result(job: EmbedJob) -> EmbedResult:
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
