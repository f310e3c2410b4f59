"""Which inputs go into the next llama batch.

Pure bookkeeping, no llama and no threads (the model thread owns the one instance), so the
policy can be read and tested on its own:
- interactive jobs fill the batch before any bulk job gets a slot, and such a batch is not
  topped up with bulk inputs, so a query waits for at most the one batch being computed plus
  its own short one, never behind an indexer's backlog;
- within a lane, the clients (connections) that have work take turns one input at a time, so
  one connection flooding requests does not starve the others; a client's own jobs go in order;
- a request of thousands of inputs is therefore computed in batch-sized slices, with others'
  inputs between them; its answer is still assembled whole by the worker;
- an input is never split across batches (non-causal models must see it whole).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar


class Schedulable(Protocol):
    """What the scheduler needs of a job (worker.J is one); identity is its hash."""

    bulk: bool
    # Whose turn it is: the connection (or HTTP request) the job came from.
    owner: object
    # Token ids of each input, known once the model thread has tokenized the job.
    tokens: list[list[int]]
    cancelled: bool


J = TypeVar("J", bound=Schedulable)


# Consecutive interactive-only batches after which waiting bulk work shares the next batch.
_MAX_BULK_SKIPS = 4


@dataclass(frozen=True, slots=True)
class Item(Generic[J]):
    job: J
    index: int


class _Lane(Generic[J]):
    """Per-owner FIFO queues of jobs, visited in rotation."""

    def __init__(self) -> None:
        self.owners: OrderedDict[object, deque[J]] = OrderedDict()

    def __bool__(self) -> bool:
        return bool(self.owners)


class Scheduler(Generic[J]):
    def __init__(self) -> None:
        self._interactive: _Lane[J] = _Lane()
        self._bulk: _Lane[J] = _Lane()
        self._cursor: dict[J, int] = {}
        self._bulk_skipped = 0
        self.pending_inputs = 0
        self.pending_tokens = 0

    def _lane(self, job: J) -> _Lane[J]:
        return self._bulk if job.bulk else self._interactive

    def add(self, job: J) -> None:
        lane = self._lane(job)
        lane.owners.setdefault(job.owner, deque()).append(job)
        self._cursor[job] = 0
        self.pending_inputs += len(job.tokens)
        self.pending_tokens += sum(len(t) for t in job.tokens)

    def has_work(self) -> bool:
        return bool(self._interactive or self._bulk)

    def has_interactive(self) -> bool:
        """Whether the next batch carries interactive work (it is then an interactive one)."""
        return bool(self._interactive)

    def _forget(self, job: J) -> int:
        """Drop a job's not-yet-scheduled inputs; returns how many there were."""
        start = self._cursor.pop(job)
        rest = job.tokens[start:]
        self.pending_inputs -= len(rest)
        self.pending_tokens -= sum(len(t) for t in rest)
        lane = self._lane(job)
        queue = lane.owners[job.owner]
        queue.remove(job)
        if not queue:
            del lane.owners[job.owner]
        return len(rest)

    def remove(self, job: J) -> None:
        if job in self._cursor:
            self._forget(job)

    def drop_cancelled(self) -> list[tuple[J, int]]:
        cancelled = [job for job in self._cursor if job.cancelled]
        return [(job, self._forget(job)) for job in cancelled]

    def clear(self) -> list[J]:
        jobs = list(self._cursor)
        self._interactive = _Lane()
        self._bulk = _Lane()
        self._cursor.clear()
        self.pending_inputs = 0
        self.pending_tokens = 0
        return jobs

    def next_batch(
        self, max_tokens: int, max_seqs: int, *, bulk_running: bool = False
    ) -> list[Item[J]]:
        """The inputs of the next batch. `bulk_running`: a bulk batch of this model is
        computing on another replica, so bulk is progressing without sharing this one."""
        batch: list[Item[J]] = []
        budget = self._fill(self._interactive, batch, max_tokens, max_seqs)
        if batch and self._bulk and (bulk_running or self._bulk_skipped < _MAX_BULK_SKIPS):
            # A batch carrying interactive work is not topped up with bulk inputs: it finishes
            # in a few milliseconds instead of a full batch time, which is what a waiting
            # query feels. Bulk still gets a batch at least every few, so it cannot starve,
            # unless it is computing elsewhere already (a query topped up with a full bulk
            # batch every fifth time took 140 ms instead of 5: W3 p90).
            self._bulk_skipped = 0 if bulk_running else self._bulk_skipped + 1
            return batch
        self._bulk_skipped = 0
        self._fill(self._bulk, batch, budget, max_seqs)
        return batch

    def _fill(self, lane: _Lane[J], batch: list[Item[J]], budget: int, max_seqs: int) -> int:
        # Each pass offers every owner of the lane one slot, for the next input of its oldest
        # job. An owner whose next input does not fit waits for the next batch (inputs are
        # never split); the others may still fill the gap.
        progress = True
        while progress and lane and len(batch) < max_seqs:
            progress = False
            for owner in list(lane.owners):
                if len(batch) >= max_seqs:
                    break
                queue = lane.owners[owner]
                job = queue[0]
                i = self._cursor[job]
                n = len(job.tokens[i])
                if n > budget:
                    continue
                batch.append(Item(job, i))
                budget -= n
                self.pending_inputs -= 1
                self.pending_tokens -= n
                progress = True
                if i + 1 == len(job.tokens):
                    del self._cursor[job]
                    queue.popleft()
                    if not queue:
                        del lane.owners[owner]
                else:
                    self._cursor[job] = i + 1
                # Rotate: the owner just served goes to the back for the next batch.
                if owner in lane.owners:
                    lane.owners.move_to_end(owner)
        return budget
