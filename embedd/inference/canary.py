"""Known-bad native paths, found once per machine and then avoided.

A new model process computes one small batch (the canary) before it takes traffic. If that
kills it with SIGILL, the CPU lacks an instruction the build chose for it: on CPUs with AMX,
llama.cpp's repacked path for quantized weights (q8_0, q4) does exactly that, and loading with
weight repacking off (llama-server's `--no-repack`) computes the same vectors. The verdict is
kept per (file sha256, llama.cpp build and its CPU features, the CPU's flags), so the canary's
cost is paid once per machine, build and file, and a rebuilt library or another CPU asks again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_log = logging.getLogger("embedd.canary")

# What the canary embeds: a sentence of ordinary words, long enough to run every kernel of the
# matrix path (a few tokens per row), short enough to cost a millisecond.
CANARY_TEXT = "The quick brown fox jumps over the lazy dog, twice, before breakfast."
# Verdicts kept, newest last: one per model file, build and CPU a machine has seen.
MAX_VERDICTS = 256


@dataclass(frozen=True)
class Verdict:
    """Whether weights may be repacked; `refused` when the model dies even without it."""

    repack: bool
    refused: bool
    reason: str


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model and feature flags, as the kernel lists them (the processor's name where
    there is no /proc)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return platform.processor() or platform.machine()
    model = flags = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = " ".join(sorted(value.split()))
    return f"{model}|{flags}"


def verdict_key(sha256: str, build: str, system_info: str, flags: str) -> str:
    return hashlib.sha256("\n".join((sha256, build, system_info, flags)).encode()).hexdigest()


def default_path(env: dict[str, str] | None = None) -> Path:
    env = dict(os.environ) if env is None else env
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "embedd" / "native-verdicts.json"


class Verdicts:
    """The verdicts on disk (a small JSON file in the user's cache directory). A file that
    cannot be read or written only means the canary runs again."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path if path is not None else default_path()

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, key: str) -> Verdict | None:
        entry = self._read().get(key)
        if not isinstance(entry, dict):
            return None
        try:
            return Verdict(bool(entry["repack"]), bool(entry["refused"]), str(entry["reason"]))
        except KeyError:
            return None

    def put(self, key: str, verdict: Verdict) -> None:
        data = self._read()
        data.pop(key, None)
        data[key] = {"repack": verdict.repack, "refused": verdict.refused, "reason": verdict.reason}
        while len(data) > MAX_VERDICTS:
            data.pop(next(iter(data)))
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".verdicts-")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
            os.replace(tmp, self.path)
        except OSError as exc:
            _log.warning("cannot keep the canary's verdict in %s: %s", self.path, exc)
            with contextlib.suppress(OSError, UnboundLocalError):
                os.unlink(tmp)


@dataclass(frozen=True)
class Attempt:
    """Load the model with `repack` as given, and run the canary when `canary`."""

    repack: bool
    canary: bool


@dataclass(frozen=True)
class Refused:
    reason: str


class LoadPlan:
    """How a model is loaded, from the verdict kept for it and what happens on the way: pure,
    so each path is tested without a CPU that has it.

    No verdict: load with repacking and run the canary. A death by SIGILL (while loading or in
    the canary) with repacking on: load again with it off, canary again. A SIGILL with it off,
    or any other death: refused, with the signal named. A verdict: load as it says, no canary.
    """

    def __init__(self, known: Verdict | None) -> None:
        self.known = known
        self.repack = known.repack if known is not None else True
        self.fell_back = False

    def first(self) -> Attempt | Refused:
        if self.known is not None and self.known.refused:
            return Refused(self.known.reason)
        return Attempt(self.repack, canary=self.known is None)

    def died(self, how: str, phase: str, path: str) -> Attempt | Refused:
        """The model process died (`how`: a signal's name or an exit status) `phase`."""
        if how == "SIGILL" and self.repack:
            self.repack = False
            self.fell_back = True
            return Attempt(False, canary=True)
        reason = f"the model process died by {how} {phase} {path}"
        if self.fell_back:
            reason += " with weight repacking off as well"
        if how == "SIGILL":
            reason += (
                ": this llama.cpp build uses an instruction this CPU lacks (rebuild "
                "llama-cpp-python on this machine)"
            )
        return Refused(reason)

    def passed(self) -> Verdict:
        """The canary passed: the verdict to keep."""
        if self.repack:
            return Verdict(True, False, "passed the canary")
        return Verdict(False, False, REPACK_OFF_REASON)

    def refusal_to_keep(self, refused: Refused, how: str) -> Verdict | None:
        """A refusal worth remembering: only SIGILL says something about the CPU and build
        (other deaths may be the moment's: memory, a signal from outside)."""
        return Verdict(False, True, refused.reason) if how == "SIGILL" else None

    @property
    def repacking(self) -> str:
        """What the model card says about weight repacking."""
        if self.repack:
            return "on"
        reason = self.known.reason if self.known is not None and not self.fell_back else None
        return f"off: {reason or REPACK_OFF_REASON}"


REPACK_OFF_REASON = (
    "llama.cpp died by SIGILL computing with weight repacking on this CPU (canary); loaded "
    "with it off"
)
