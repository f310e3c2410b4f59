"""The configured models and their lifecycle: unloaded -> loading -> ready (or failed).

Runs on the event loop. A model's worker (its coordinating thread and model process) is created
on first use or on `load`, replaced after a failed load (so fixing the file and retrying works
without a restart) and after it gave up on a model that kept crashing (at the next `load`, or
at the next request once its back-off has passed), stopped on `unload`, and stopped by the idle
sweep after `keep_alive` seconds without work.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from ..config import Config, ModelConfig
from ..wire.errors import Code, EmbeddError
from ..wire.messages import Embed
from .admission import TOKENIZED_PER_COMPUTED, Admission, estimate_tokens
from .budget import CoreBudget
from .canary import Verdicts
from .crashes import PoisonMemory
from .jobs import (
    RERANK_REQUEST,
    ChunkJob,
    ChunkResult,
    EmbedJob,
    EmbedResult,
    Job,
    RerankJob,
    TokenizeJob,
    TokenizeResult,
)
from .modelfile import version_of
from .pipe import ModelInfo
from .stats import WorkerStats
from .threads import replicas_for
from .worker import ModelWorker

_log = logging.getLogger("embedd.models")

R = TypeVar("R")

# Before a model without a configured `max_tokens` has loaded, its texts are counted up to
# this many tokens each (the context length most embedding models have).
_UNKNOWN_MAX_TOKENS = 512

# Monotonic seconds: `time.monotonic` in the daemon, a clock the test advances in the tests of
# keep_alive (trio's MockClock is the model), so that idling out is checked without waiting.
Clock = Callable[[], float]


class ModelSlot:
    def __init__(
        self,
        config: ModelConfig,
        loop: asyncio.AbstractEventLoop,
        budget: CoreBudget,
        clock: Clock = time.monotonic,
        hung_after: float = 240.0,
    ) -> None:
        self.config = config
        self.budget = budget
        # A batch computing this long means its model process stopped answering.
        self.hung_after = hung_after
        self._loop = loop
        self._clock = clock
        self.worker: ModelWorker | None = None
        self.last_info: ModelInfo | None = None
        self.last_error: str | None = None
        self.stats = WorkerStats()
        self.last_used = clock()
        self.active_jobs = 0
        self.loads = 0
        self.unloads = 0
        self.admission = Admission(config.max_queue_tokens)
        # Inputs known to kill this model, kept across restarts and reloads of the same file.
        self.poison = PoisonMemory()
        self._poison_file = version_of(config.path)
        self.verdicts = Verdicts()

    @property
    def state(self) -> str:
        w = self.worker
        if w is None:
            return "failed" if self.last_error else "unloaded"
        if w.crashed_out is not None:
            return "failed"
        if not w.loaded.done():
            return "loading"
        if w.loaded.exception() is not None:
            return "failed"
        return "ready"

    def describe(self) -> dict[str, Any]:
        info = self.last_info
        state = self.state
        out: dict[str, Any] = {
            **(dict(info.card) if info else {}),
            "name": self.config.name,
            "path": str(self.config.path),
            "state": state,
            "dim": info.dim if info else None,
            "max_tokens": info.max_tokens if info else self.config.max_tokens,
            "pooling": info.pooling if info else self.config.pooling,
            # The configured count, or the most the automatic policy may use.
            "threads": self.config.threads or self.budget.usable,
            "threads_auto": self.config.threads is None,
            # Contexts computing side by side: the loaded count, else what a load would start.
            "replicas": self.worker.replicas
            if self.worker is not None and state == "ready"
            else replicas_for(
                self.budget.usable, configured=self.config.replicas, threads=self.config.threads
            ),
            "replicas_auto": self.config.replicas is None,
            "memory": info.memory if info and state == "ready" else 0,
            "prompts": sorted(self.config.prompts),
            # The model file's content fingerprint (what the vector cache and indexes key on).
            "fingerprint": info.fingerprint if info else None,
            "n_ctx_train": info.n_ctx_train if info else None,
            "dim_expected": self.config.dim,
            "aliases": list(self.config.aliases),
            # The model process that runs llama.cpp for it, while loaded.
            "pid": self.worker.pid if self.worker is not None else None,
        }
        if state == "failed":
            out["error"] = self.error
        return out

    @property
    def error(self) -> str | None:
        """Why the model is failed: it kept crashing, or its last load failed."""
        w = self.worker
        if w is not None and w.crashed_out is not None:
            return w.crashed_out
        return self.last_error

    def _ensure_worker(self, *, now: bool = False) -> ModelWorker:
        w = self.worker
        if w is not None and w.crashed_out is not None:
            if not now and time.monotonic() < w.retry_at:
                raise EmbeddError(Code.MODEL_CRASHED, w.crashed_out, model=self.config.name)
            _log.info("model %s: trying it again after it kept crashing", self.config.name)
            self.worker = None
            w = None
        if w is not None and (not w.loaded.done() or w.loaded.exception() is None):
            if not w.loaded.done() or version_of(self.config.path) == w.file_version:
                return w
            # The file was replaced on disk: the old copy (in memory, never mapped) finishes
            # what it was given while the new file loads for what comes next.
            _log.warning(
                "model %s: %s changed on disk; loading the new file",
                self.config.name,
                self.config.path,
            )
            self.worker = None
            w.stop()
        _log.info("loading model %s from %s", self.config.name, self.config.path)
        version = version_of(self.config.path)
        if version != self._poison_file:
            # Another file: what killed the old one says nothing about it.
            self.poison = PoisonMemory()
            self._poison_file = version
        w = ModelWorker(
            self.config,
            self._loop,
            self.stats,
            self.budget,
            self.poison,
            self.verdicts,
            hung_after=self.hung_after,
        )
        w.loaded.add_done_callback(functools.partial(self._on_loaded, w))
        self.worker = w
        w.start()
        return w

    def _on_loaded(self, worker: ModelWorker, fut: asyncio.Future[ModelInfo]) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is None:
            self.loads += 1
            self.last_info = fut.result()
            self.last_error = None
        else:
            self.last_error = worker.error

    async def load(self, timeout: float, *, explicit: bool = False) -> ModelInfo:
        """The loaded model's description, loading it first if need be. An `explicit` load
        (the `load` op, preloading) tries a model that kept crashing again at once; a request
        waits out its back-off."""
        w = self._ensure_worker(now=explicit)
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(w.loaded)
        except TimeoutError:
            raise EmbeddError(
                Code.TIMEOUT,
                f"model {self.config.name!r} did not load within {timeout:g}s",
                limit=timeout,
            ) from None

    @property
    def max_tokens(self) -> int:
        """The model's limit: known once loaded, else configured, else assumed."""
        info = self.last_info
        return info.max_tokens if info else (self.config.max_tokens or _UNKNOWN_MAX_TOKENS)

    def touch(self) -> None:
        """Restart the idle clock (`keep_alive`): an explicit `load` counts as a use."""
        self.last_used = self._clock()

    def idle_expired(self, now: float) -> bool:
        """Whether the idle sweep unloads this model at `now`: it is loaded, has no job in
        hand, and was last used `keep_alive` seconds ago or more (`keep_alive = 0`: never)."""
        ka = self.config.keep_alive
        return (
            ka > 0
            and self.state == "ready"
            and self.active_jobs == 0
            and now - self.last_used >= ka
        )

    async def unload(self) -> None:
        w = self.worker
        if w is None:
            return
        self.worker = None
        w.stop()
        await asyncio.shield(w.finished)
        self.unloads += 1
        _log.info("model %s unloaded", self.config.name)

    async def embed(
        self,
        request: Embed,
        texts: list[str],
        *,
        prefix: str,
        indices: list[int],
        bulk: bool,
        owner: object,
        timeout: float,
        timeout_reported: float,
    ) -> EmbedResult:
        """Vectors of `texts` (distinct inputs of `request`, without the prompt `prefix`)."""
        job = EmbedJob(
            texts,
            self._loop.create_future(),
            self._loop,
            owner=owner,
            bulk=bulk,
            request=request,
            prefix=prefix,
            indices=indices,
        )
        return await self._run(job, timeout, timeout_reported=timeout_reported)

    async def rerank(
        self,
        query: str,
        documents: list[str],
        *,
        indices: list[int],
        bulk: bool,
        owner: object,
        timeout: float,
        timeout_reported: float,
    ) -> EmbedResult:
        """Every query/document pair's classifier row, grouped by document (`windows` says
        how many pieces each document was scored in, in order)."""
        job = RerankJob(
            documents,
            self._loop.create_future(),
            self._loop,
            owner=owner,
            bulk=bulk,
            request=RERANK_REQUEST,
            indices=indices,
            query=query,
        )
        return await self._run(job, timeout, timeout_reported=timeout_reported)

    async def tokenize(
        self, texts: list[str], timeout: float, max_ids: int | None = None, pieces: bool = False
    ) -> TokenizeResult:
        job = TokenizeJob(
            texts, self._loop.create_future(), self._loop, max_ids=max_ids, pieces=pieces
        )
        return await self._run(job, timeout)

    async def chunk(
        self, text: str, *, max_tokens: int, overlap: int, timeout: float
    ) -> ChunkResult:
        job = ChunkJob(
            [text], self._loop.create_future(), self._loop, max_tokens=max_tokens, overlap=overlap
        )
        return await self._run(job, timeout)

    async def _run(
        self, job: Job[R], timeout: float, *, timeout_reported: float | None = None
    ) -> R:
        """Queue a job and wait for its answer; cancels the job's remaining work if the caller
        gives up (timeout, `cancel`, or the client going away)."""
        cap: int | None = self.max_tokens
        prefix = ""
        if isinstance(job, EmbedJob):
            prefix = job.prefix
            if job.request.long == "split":
                cap = None  # every window is computed: the whole text counts
        estimate = sum(estimate_tokens(prefix + t, cap) for t in job.texts)
        if isinstance(job, RerankJob):
            # The query is computed again beside every document (and every piece of one).
            estimate += len(job.texts) * estimate_tokens(job.query, self.max_tokens)
        if not isinstance(job, EmbedJob):
            # Tokenize and chunk go through the whole text, but only tokenize it.
            whole = sum(estimate_tokens(t, None) for t in job.texts)
            estimate = max(1, whole // TOKENIZED_PER_COMPUTED)
        bulk = job.bulk
        err = self.admission.check(
            estimate, bulk=bulk, owner=job.owner, tokens_per_second=self.stats.tokens_per_second
        )
        if err is not None:
            raise err
        deadline = self._loop.time() + timeout
        self.active_jobs += 1
        self.admission.add(estimate, bulk=bulk, owner=job.owner)
        try:
            worker = self._ensure_worker()
            worker.submit(job)
            try:
                async with asyncio.timeout_at(deadline):
                    return await job.future
            except TimeoutError:
                job.cancelled = True
                worker.wake()
                limit = timeout_reported if timeout_reported is not None else timeout
                raise EmbeddError(
                    Code.TIMEOUT,
                    f"request not done within its timeout of {limit:g}s",
                    limit=limit,
                ) from None
            except asyncio.CancelledError:
                job.cancelled = True
                worker.wake()
                raise
        finally:
            self.active_jobs -= 1
            self.admission.remove(estimate, bulk=bulk, owner=job.owner)
            self.last_used = self._clock()


class ModelRegistry:
    def __init__(
        self, config: Config, loop: asyncio.AbstractEventLoop, clock: Clock = time.monotonic
    ) -> None:
        self.config = config
        self.clock = clock
        # One budget of cores for every model's replicas.
        self.budget = CoreBudget()
        self.slots: Mapping[str, ModelSlot] = {
            # Twice the daemon's request timeout: no request waits that long for one batch.
            name: ModelSlot(mc, loop, self.budget, clock, hung_after=2 * config.request_timeout)
            for name, mc in config.models.items()
        }
        # Every name a request may use, aliases included: one slot (one loaded copy) each.
        self.by_name: Mapping[str, ModelSlot] = {
            **{alias: slot for slot in self.slots.values() for alias in slot.config.aliases},
            **self.slots,
        }

    def get(self, name: str) -> ModelSlot:
        slot = self.by_name.get(name)
        if slot is None:
            raise EmbeddError(
                Code.UNKNOWN_MODEL,
                f"unknown model {name!r}; configured models: {', '.join(sorted(self.slots))}",
            )
        return slot

    def prompt_prefix(self, slot: ModelSlot, prompt: str | None) -> str:
        if prompt is None:
            return ""
        prompts = slot.config.prompts
        if prompt not in prompts:
            known = ", ".join(sorted(prompts)) or "none configured"
            raise EmbeddError(
                Code.BAD_REQUEST,
                f"model {slot.config.name!r} has no prompt {prompt!r} (known: {known})",
                key="prompt",
            )
        return prompts[prompt]

    async def sweep_idle(self) -> None:
        now = self.clock()
        for slot in self.slots.values():
            if slot.idle_expired(now):
                _log.info(
                    "model %s idle for %.0fs: unloading", slot.config.name, now - slot.last_used
                )
                await slot.unload()

    async def close(self, timeout: float | None = None) -> None:
        """Unload every model, waiting at most `timeout` for the work they hold (a long
        tokenization among it): after that the daemon exits without them, and their model
        processes end with it (EOF on their pipes, and the parent-death signal)."""
        unloads = {name: asyncio.ensure_future(slot.unload()) for name, slot in self.slots.items()}
        if not unloads:
            return
        _, pending = await asyncio.wait(unloads.values(), timeout=timeout)
        if pending:
            busy = sorted(name for name, task in unloads.items() if task in pending)
            _log.warning(
                "models still working after the shutdown grace, left to end with the daemon: %s",
                ", ".join(busy),
            )
