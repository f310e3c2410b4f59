"""What the coordinator does when a model process dies: pure rules, no processes.

- A batch that was computing when its process died is retried once on a fresh process (most
  deaths have nothing to do with the input: an OOM kill, a signal from outside).
- A batch that kills a second process is split (`CulpritSearch`): its parts run alone, one at a
  time, halving the ones that kill, until single inputs that kill the model are found. Those
  inputs are answered `model_crashed`; every other input gets its vector.
- The token ids of such an input are remembered (`PoisonMemory`, bounded), so the same input
  is refused at once next time instead of killing the model again.
- Restarts back off (`Backoff`); a model that keeps dying with nothing computed in between is
  marked failed (`CRASH_STREAK_LIMIT`): when every input kills it, no single one is to blame.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Generic, TypeVar

T = TypeVar("T")

# Deaths in a row with no batch computed between them and no input found to blame, after which
# the model is marked failed: a file or a build that dies at every batch would otherwise
# restart forever. Four lets a suspect batch run alone twice (the retry and its first split)
# with room for one unrelated kill.
CRASH_STREAK_LIMIT = 4
# Inputs known to kill a model, remembered per model (the newest first out when full): each
# entry is a 32-byte digest and its signal's name.
POISON_MEMORY = 1024
# Restart delays after consecutive deaths: the first restart is immediate (a one-off), then
# 0.25 s doubling up to 8 s, so a process that dies at start does not spin a core.
BACKOFF_FIRST = 0.25
BACKOFF_MAX = 8.0
# After a model is marked failed for crashing, how long requests are refused before it is
# tried again (a `load` tries at once).
FAILED_RETRY_AFTER = 30.0


def fingerprint(tokens: Sequence[int]) -> bytes:
    """What identifies an input to the model: its token ids (the same text under another
    prompt or truncation is another input)."""
    return hashlib.sha256(b"".join(t.to_bytes(4, "little", signed=True) for t in tokens)).digest()


class PoisonMemory:
    """Inputs that killed the model, with the signal that did it (bounded, least recent out)."""

    def __init__(self, limit: int = POISON_MEMORY) -> None:
        self._limit = limit
        self._known: OrderedDict[bytes, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._known)

    def add(self, tokens: Sequence[int], how: str) -> None:
        key = fingerprint(tokens)
        self._known[key] = how
        self._known.move_to_end(key)
        while len(self._known) > self._limit:
            self._known.popitem(last=False)

    def killed_by(self, tokens: Sequence[int]) -> str | None:
        """The signal this input killed the model with, if it did."""
        key = fingerprint(tokens)
        how = self._known.get(key)
        if how is not None:
            self._known.move_to_end(key)
        return how


class CulpritSearch(Generic[T]):
    """Groups of inputs that killed the model, run alone and halved until the killers are
    found. The caller runs `next_group()` with nothing else computing, then reports `passed`
    or `crashed`; a group of one that crashes alone is a culprit."""

    def __init__(self) -> None:
        self._groups: deque[list[T]] = deque()
        self._running: list[T] | None = None

    def __bool__(self) -> bool:
        return bool(self._groups) or self._running is not None

    @property
    def running(self) -> list[T] | None:
        return self._running

    def add(self, items: list[T], *, crashed_alone: bool) -> list[T]:
        """A batch that killed the model twice; returns the culprit at once when the batch was
        a single input that killed a process with nothing else computing."""
        if crashed_alone and len(items) == 1:
            return list(items)
        if crashed_alone:
            self._groups.extend(_halves(items))
        else:
            self._groups.append(list(items))
        return []

    def next_group(self) -> list[T] | None:
        """The group to run alone now (None while one runs, or when none is left)."""
        if self._running is not None or not self._groups:
            return None
        self._running = self._groups.popleft()
        return self._running

    def passed(self) -> None:
        self._running = None

    def crashed(self) -> list[T]:
        """The running group killed the process: the culprit when it was one input, else its
        halves are queued (first, so a search finishes before the next one starts)."""
        group = self._running
        self._running = None
        if group is None:
            return []
        if len(group) == 1:
            return group
        first, second = _halves(group)
        self._groups.appendleft(second)
        self._groups.appendleft(first)
        return []

    def put_back(self, group: list[T]) -> None:
        """The running group could not start after all (no cores yet): it runs next."""
        self._running = None
        self._groups.appendleft(group)

    def pending(self) -> list[T]:
        """Every input still in the search, running or waiting."""
        out = list(self._running or ())
        for group in self._groups:
            out.extend(group)
        return out


def _halves(items: list[T]) -> tuple[list[T], list[T]]:
    middle = (len(items) + 1) // 2
    return list(items[:middle]), list(items[middle:])


class Backoff:
    """Deaths in a row with nothing computed between them, and the delay before the next
    start that follows from them."""

    def __init__(self, first: float = BACKOFF_FIRST, cap: float = BACKOFF_MAX) -> None:
        self._first = first
        self._cap = cap
        self.streak = 0

    def died(self) -> None:
        """Another death in a row (a culprit search's expected deaths do not count)."""
        self.streak += 1

    def delay(self) -> float:
        """Seconds to wait before starting a process again: none after a first death."""
        if self.streak <= 1:
            return 0.0
        return min(self._cap, self._first * 2.0 ** (self.streak - 2))

    def progressed(self) -> None:
        """A batch computed: the next death is a first one again."""
        self.streak = 0
