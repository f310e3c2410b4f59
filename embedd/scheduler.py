"""Which inputs go into the next llama batch.

Pure bookkeeping, no llama and no threads (the model thread owns the one instance), so the
policy can be read and tested on its own:
- interactive jobs fill the batch before any bulk job gets a slot;
- within a lane, jobs take turns one input at a time (round robin), so a request of thousands
  of inputs is computed in slices and a small request queued behind it still gets into the
  very next batch;
- an input is never split across batches (non-causal models must see it whole).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .worker import EmbedJob


@dataclass(frozen=True, slots=True)
class Item:
    job: EmbedJob
    index: int


class _Lane:
    def __init__(self) -> None:
        self.jobs: deque[EmbedJob] = deque()
        self.cursor: dict[EmbedJob, int] = {}


class Scheduler:
    def __init__(self) -> None:
        self._interactive = _Lane()
        self._bulk = _Lane()
        self.pending_inputs = 0
        self.pending_tokens = 0

    def _lane(self, job: EmbedJob) -> _Lane:
        return self._bulk if job.bulk else self._interactive

    def add(self, job: EmbedJob) -> None:
        lane = self._lane(job)
        lane.jobs.append(job)
        lane.cursor[job] = 0
        self.pending_inputs += len(job.tokens)
        self.pending_tokens += sum(len(t) for t in job.tokens)

    def has_work(self, _stopping: bool = False) -> bool:
        return bool(self._interactive.jobs or self._bulk.jobs)

    def _forget(self, lane: _Lane, job: EmbedJob) -> int:
        """Drop a job's not-yet-scheduled inputs; returns how many there were."""
        start = lane.cursor.pop(job)
        rest = job.tokens[start:]
        self.pending_inputs -= len(rest)
        self.pending_tokens -= sum(len(t) for t in rest)
        return len(rest)

    def remove(self, job: EmbedJob) -> None:
        lane = self._lane(job)
        if job in lane.cursor:
            self._forget(lane, job)
            lane.jobs.remove(job)

    def drop_cancelled(self) -> list[tuple[EmbedJob, int]]:
        dropped: list[tuple[EmbedJob, int]] = []
        for lane in (self._interactive, self._bulk):
            for job in [j for j in lane.jobs if j.cancelled]:
                dropped.append((job, self._forget(lane, job)))
                lane.jobs.remove(job)
        return dropped

    def clear(self) -> list[EmbedJob]:
        jobs = [*self._interactive.jobs, *self._bulk.jobs]
        self._interactive = _Lane()
        self._bulk = _Lane()
        self.pending_inputs = 0
        self.pending_tokens = 0
        return jobs

    def next_batch(self, max_tokens: int, max_seqs: int) -> list[Item]:
        batch: list[Item] = []
        budget = max_tokens
        for lane in (self._interactive, self._bulk):
            budget = self._fill(lane, batch, budget, max_seqs)
        return batch

    def _fill(self, lane: _Lane, batch: list[Item], budget: int, max_seqs: int) -> int:
        # Round robin: each pass offers every job of the lane one slot; a job whose next input
        # does not fit waits for the next batch (never split), others may still fill the gap.
        progress = True
        while progress and len(batch) < max_seqs and lane.jobs:
            progress = False
            for _ in range(len(lane.jobs)):
                if len(batch) >= max_seqs:
                    break
                job = lane.jobs[0]
                lane.jobs.rotate(-1)
                i = lane.cursor[job]
                n = len(job.tokens[i])
                if n > budget:
                    continue
                batch.append(Item(job, i))
                budget -= n
                self.pending_inputs -= 1
                self.pending_tokens -= n
                progress = True
                if i + 1 == len(job.tokens):
                    del lane.cursor[job]
                    lane.jobs.remove(job)
                else:
                    lane.cursor[job] = i + 1
        return budget
