"""One budget of cores for every model and replica in the daemon.

Each replica asks it for threads before a batch (`acquire`) and gives them back when the batch
ends (`release`); `threads.threads_for_launch` decides how many, this object only keeps the
count consistent across the model threads that ask at once, remembers when interactive work
was last seen (so bulk leaves a core to queries), and wakes the models it refused when cores
come free. It replaces the single lock that let one decode at a time run in the whole process:
two models now compute at once on different cores, and never with more threads than cores.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from .modelprocess import live_pids
from .threads import (
    INTERACTIVE_RECENT,
    Launch,
    Machine,
    Sampler,
    children_cpu_seconds,
    threads_for_launch,
    usable_cpus,
)

Clock = Callable[[], float]
_log = logging.getLogger("embedd.budget")


class CoreBudget:
    def __init__(
        self, clock: Clock = time.monotonic, sample: Callable[[], Machine] | None = None
    ) -> None:
        self._clock = clock
        # What the machine looks like before each batch; the event loop runs on the main
        # thread, and its load counts as competition. (The tests give a machine by hand.)
        if sample is None:
            sample = Sampler(
                service_tid=threading.main_thread().native_id,
                children=lambda: children_cpu_seconds(live_pids()),
            ).sample
        self._sample = sample
        first = sample()
        self.usable = usable_cpus(first.affinity, first.quota)
        self._lock = threading.Lock()
        self.in_use = 0
        self._interactive_at = -INTERACTIVE_RECENT
        # Wake-ups of the workers refused cores, called once when some come free. Keyed by the
        # wake-up itself, not the model's name: a model being reloaded has two workers, and
        # each must hear (one overwriting the other's left requests waiting forever).
        self._waiting: dict[Callable[[], None], None] = {}
        # Decodes running per model, and the high-water marks `stats` shows.
        self._computing: dict[str, int] = {}
        self.peak_in_use = 0
        self.peak_models = 0
        self.refusals = 0
        # The one thread allowed batches of more than one compute thread (threads.py says why).
        self._wide: object | None = None

    def note_interactive(self) -> None:
        """Interactive work arrived: bulk leaves a core free for the next second."""
        self._interactive_at = self._clock()

    def interactive_recent(self) -> bool:
        return self._clock() - self._interactive_at < INTERACTIVE_RECENT

    def acquire(
        self, model: str, launch: Launch, wake: Callable[[], None], runner: object = None
    ) -> int:
        """Threads for a batch of `model` about to start on `runner` (the replica), held
        until `release`; 0 when it must wait, and then `wake` is called once cores come free."""
        machine = self._sample()
        recent = self.interactive_recent()
        with self._lock:
            launch = replace(launch, wide=self._wide is None or self._wide is runner)
            threads = threads_for_launch(machine, self.in_use, launch, interactive_recent=recent)
            if threads > 1 and launch.configured is None:
                self._wide = runner
            _log.debug(
                "cores: %s, %d in use, %s, recent %s -> %d",
                machine,
                self.in_use,
                launch,
                recent,
                threads,
            )
            if threads == 0:
                self._waiting[wake] = None
                self.refusals += 1
                return 0
            self.in_use += threads
            self._computing[model] = self._computing.get(model, 0) + 1
            self.peak_in_use = max(self.peak_in_use, self.in_use)
            self.peak_models = max(self.peak_models, len(self._computing))
            return threads

    def release(self, model: str, threads: int) -> None:
        with self._lock:
            self.in_use -= threads
            left = self._computing.get(model, 0) - 1
            if left > 0:
                self._computing[model] = left
            else:
                self._computing.pop(model, None)
            waiting = list(self._waiting)
            self._waiting.clear()
        for wake in waiting:
            wake()

    @property
    def wide(self) -> object:
        """The thread allowed batches of more than one compute thread, if any yet."""
        return self._wide

    def retire(self, runner: object) -> None:
        """`runner`'s thread ended (its model unloaded): another may become the wide one."""
        with self._lock:
            if self._wide is runner:
                self._wide = None

    def snapshot(self) -> dict[str, Any]:
        """What `stats` reports under `cores`."""
        with self._lock:
            return {
                "usable": self.usable,
                "in_use": self.in_use,
                "peak_in_use": self.peak_in_use,
                "models_computing": len(self._computing),
                "peak_models_computing": self.peak_models,
                "refusals": self.refusals,
                "interactive_recent": self.interactive_recent(),
            }
