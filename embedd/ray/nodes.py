"""One embedd daemon per Ray node, each kept by an actor pinned to its node.

The actor (`_NodeActor`, named `{name}-{node id}`) holds a `DaemonSupervisor` (it runs
`embedd serve` on a private socket and restarts it) or, with `Daemons(socket=...)`, an
`AttachedDaemon` (the node's OS service). It is pinned to its node (NodeAffinity, not soft: a
Unix socket is only reachable there), restarted by Ray without limit if its process dies, and
reserves the CPUs the daemon computes on, so that Ray does not schedule CPU work onto them.

The steps find their node's actor by name, creating it if the driver did not (a node that
joined later); the driver normally starts them all first with `NodeDaemons`, which also reads
their stats and fingerprints and stops them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import embedd_client
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from embedd.index.records import model_fingerprint
from embedd.ray.progress import DaemonProgress
from embedd.ray.supervisor import (
    HELLO_TIMEOUT,
    START_TIMEOUT,
    STOP_GRACE,
    AttachedDaemon,
    DaemonStartError,
    DaemonSupervisor,
    NodeDaemon,
    sweep_stale,
)

log = logging.getLogger(__name__)

# Calls the actor serves at once: `replace` from every step on the node after one death, and
# the driver's `stats`, must not queue behind a `wait` that lasts a daemon start.
ACTOR_CONCURRENCY = 16
# Seconds beyond the daemon's own start timeout that a caller waits for the actor itself to be
# scheduled and constructed (Ray starts a worker process: seconds; more means no free CPUs).
ACTOR_MARGIN = 60.0
# Whole CPUs per node left to the rest of a pipeline by default: Ray Data's file listing, read
# and write tasks ask for one CPU each unless told otherwise. The steps' actors and the resume
# filter ask for none (STEP_CPUS), so one CPU is enough beside the daemon's on a node of any
# size, and a node of one CPU reserves none for its daemon: then Ray may run a read task there
# beside the daemon, which gives way to it (the daemon's thread policy).
PIPELINE_CPUS = 1.0
# CPUs each step (Embed, Chunk, the resume filter) asks for: none. A step only waits on its
# node's daemon, whose cores the node's actor reserves once; a step asking for a share of a
# CPU could leave a small node without the whole CPU a read task needs, and the job would wait
# forever.
STEP_CPUS = 0.0
# Ray's way of saying "restart (or retry) without limit".
UNLIMITED = -1


@dataclass(frozen=True)
class Daemons:
    """Where each node's daemon comes from (one value, shipped to every step).

    - `socket`: use the daemon the node already runs there (an OS service); None (default):
      run one per node, supervised, with `config` (the daemon's TOML config as text, paths in
      it absolute; None: the bundled model).
    - `cpus`: logical CPUs each node's actor reserves for its daemon (default: all of the
      node's but PIPELINE_CPUS: `daemon_cpus`). The daemon computes on every core that is
      free (its thread policy gives way to other work); the reservation keeps Ray from
      packing the node with other CPU-heavy tasks, and must leave a whole CPU free on some
      node: Ray Data's read, write and repartition tasks (`unembedded` spreads the rows with
      one) ask for one each, and wait forever where none is. An attached daemon's actor
      needs none (`cpus=0`): the service's cores are its own.
    - `name`: the actors' name prefix; two jobs, or two configs, at once need two names.
    - `trust_uids`: another user's daemon to trust (`Client`'s argument), with `socket`.
    """

    socket: str | None = None
    config: str | None = None
    cpus: float | None = None
    name: str = "embedd"
    trust_uids: tuple[int | str, ...] = ()

    def actor_name(self, node_id: str) -> str:
        return f"{self.name}-{node_id}"


class _NodeActor:
    """The actor: its node's daemon, and what steps and the driver ask of it."""

    def __init__(self, daemons: Daemons) -> None:
        self.node_id = ray.get_runtime_context().get_node_id()
        self.trust_uids = daemons.trust_uids
        self.daemon: NodeDaemon = (
            AttachedDaemon(daemons.socket, daemons.trust_uids)
            if daemons.socket is not None
            else DaemonSupervisor(daemons.config)
        )

    def wait(self, timeout: float = START_TIMEOUT) -> tuple[str, int]:
        return self.daemon.wait(timeout)

    def replace(self, pid: int, timeout: float = START_TIMEOUT) -> tuple[str, int]:
        return self.daemon.replace(pid, timeout)

    def stats(self) -> dict[str, Any]:
        out = self.daemon.stats()
        out["node"] = self.node_id
        return out

    def card(self, model: str) -> dict[str, Any]:
        """The model's card from `models`, after loading it (so its fingerprint is known)."""
        socket, _ = self.daemon.wait(START_TIMEOUT)
        with embedd_client.Client(socket, trust_uids=self.trust_uids) as client:
            client.load(model)
            for card in client.models():
                if card["name"] == model:
                    return dict(card)
        raise ValueError(f"the daemon on node {self.node_id} has no model {model!r}")

    def stop(self) -> None:
        try:
            self.daemon.stop()
        finally:
            sweep_stale()  # and what actors lost with their node or driver left here


_RemoteNodeActor: Any = ray.remote(_NodeActor)


def _nodes() -> list[dict[str, Any]]:
    """Ray's list of the cluster's nodes (untyped in Ray)."""
    nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]
    return nodes


def _node_cpus(node_id: str) -> float:
    for node in _nodes():
        if node["NodeID"] == node_id:
            return float(node["Resources"].get("CPU", 0.0))
    raise DaemonStartError(f"Ray knows no node {node_id}")


def daemon_cpus(node_cpus: float) -> float:
    """The CPUs a node's actor reserves for its daemon by default: all but PIPELINE_CPUS (a
    node of one CPU reserves none: the daemon still computes there, giving way to the rest)."""
    return max(0.0, node_cpus - PIPELINE_CPUS)


def lost(known: Iterable[str], alive: Iterable[str]) -> list[str]:
    """The nodes of `known` that are not among the `alive` ones, in `known`'s order."""
    living = set(alive)
    return [node for node in known if node not in living]


def node_actor(daemons: Daemons, node_id: str) -> tuple[Any, bool]:
    """The node's actor, and whether this call started it: the one already running under its
    name (started by the driver, another step or another `NodeDaemons`), else a new one
    pinned there."""
    name = daemons.actor_name(node_id)
    try:
        return ray.get_actor(name), False
    except ValueError:  # none by that name yet
        pass
    cpus = daemons.cpus
    if cpus is None:
        cpus = daemon_cpus(_node_cpus(node_id))
    handle = _RemoteNodeActor.options(
        name=name,
        get_if_exists=True,  # another caller may have started it since
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        num_cpus=cpus,
        max_restarts=UNLIMITED,
        max_task_retries=UNLIMITED,
        max_concurrency=ACTOR_CONCURRENCY,
    ).remote(daemons)
    return handle, True


def _get(ref: Any, timeout: float, what: str, cpus: float | None) -> Any:
    try:
        return ray.get(ref, timeout=timeout + ACTOR_MARGIN)
    except ray.exceptions.GetTimeoutError:
        reserve = "the CPUs it reserves" if cpus is None else f"its {cpus:g} CPUs"
        raise DaemonStartError(
            f"{what}: the node's embedd actor did not answer within {timeout + ACTOR_MARGIN:g}s. "
            f"If the node has no free CPUs for {reserve}, start NodeDaemons before the dataset "
            "runs, or give Daemons a smaller `cpus`."
        ) from None


class NodeLink:
    """The node's actor as the steps see it: a `NodeDaemon` whose calls go through Ray."""

    def __init__(self, daemons: Daemons, node_id: str | None = None) -> None:
        self.daemons = daemons
        self.node_id = node_id or ray.get_runtime_context().get_node_id()
        self.actor, self.started = node_actor(daemons, self.node_id)

    def wait(self, timeout: float = START_TIMEOUT) -> tuple[str, int]:
        socket, pid = _get(
            self.actor.wait.remote(timeout), timeout, "waiting for the daemon", self.daemons.cpus
        )
        return str(socket), int(pid)

    def replace(self, pid: int, timeout: float = START_TIMEOUT) -> tuple[str, int]:
        socket, new = _get(
            self.actor.replace.remote(pid, timeout),
            timeout,
            "replacing the daemon",
            self.daemons.cpus,
        )
        return str(socket), int(new)

    def stats(self) -> dict[str, Any]:
        return dict(ray.get(self.actor.stats.remote(), timeout=HELLO_TIMEOUT + ACTOR_MARGIN))

    def stop(self) -> None:
        ray.get(self.actor.stop.remote())


def alive_nodes() -> list[str]:
    """The ids of the cluster's live nodes that have CPUs (where steps can run)."""
    return [n["NodeID"] for n in _nodes() if n["Alive"] and n["Resources"].get("CPU", 0.0) > 0]


class NodeDaemons:
    """The driver's handle on every node's daemon: `start` one actor per node (or use as a
    context manager, which stops at the end those it started), then hand `daemons` to the
    steps. Also the model's fingerprint (checked equal on every node: the same file
    everywhere), every node's `stats` and pid, and a progress reporter."""

    def __init__(self, daemons: Daemons | None = None) -> None:
        self.daemons = daemons or Daemons()
        self.links: dict[str, NodeLink] = {}

    def start(self, timeout: float = START_TIMEOUT) -> Self:
        for node_id in alive_nodes():
            if node_id not in self.links:
                self.links[node_id] = NodeLink(self.daemons, node_id)
        for link in self.links.values():
            link.wait(timeout)
        return self

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def lost(self) -> list[str]:
        """The nodes this object started or found a daemon on that Ray now counts dead."""
        return lost(self.links, alive_nodes())

    def fingerprint(self, model: str = "default") -> str:
        """The model's fingerprint (embedd/index/records.py), the same on every live node; a
        node whose file differs fails here, before any vector is computed, naming both."""
        gone = set(self.lost())
        links = {node: link for node, link in self.links.items() if node not in gone}
        cards = ray.get([link.actor.card.remote(model) for link in links.values()])
        prints = {node: model_fingerprint(card) for node, card in zip(links, cards, strict=True)}
        if len(set(prints.values())) > 1:
            listed = ", ".join(f"{node[:8]}: {fp[:16]}" for node, fp in prints.items())
            raise ValueError(
                f"model {model!r} differs between nodes ({listed}): their vectors would not be "
                "comparable; give every node the same model file"
            )
        if not prints:
            raise DaemonStartError("no node daemons: call start() first")
        return next(iter(prints.values()))

    def stats(self) -> dict[str, dict[str, Any]]:
        """Each node's daemon `stats`, with `supervisor` (pid, socket, restarts). A node Ray
        counts dead is not asked (its actor can never run again: asking would wait, then
        fail) and has `lost` and `error` instead; a live node whose actor does not answer in
        time (restarting) has `error`. So a progress line never waits on, or stops for, one
        node."""
        gone = set(self.lost())
        refs = {
            node: link.actor.stats.remote() for node, link in self.links.items() if node not in gone
        }
        out: dict[str, dict[str, Any]] = {}
        for node in self.links:
            if node in gone:
                out[node] = {"error": "its node is lost", "lost": True, "supervisor": {}}
                continue
            try:
                out[node] = dict(ray.get(refs[node], timeout=HELLO_TIMEOUT + ACTOR_MARGIN))
            except ray.exceptions.RayError as exc:  # its node lost since, or a restart
                out[node] = {"error": f"its actor did not answer ({type(exc).__name__})",
                             "supervisor": {}}  # fmt: skip
        return out

    def pids(self) -> dict[str, int | None]:
        return {node: s["supervisor"].get("pid") for node, s in self.stats().items()}

    def progress(self, every: float = 10.0) -> DaemonProgress:
        """A reporter that logs each node daemon's throughput, queue and busy answers every
        `every` seconds while a dataset runs (a context manager)."""
        return DaemonProgress(self, every=every)

    def stop(self) -> None:
        """Stop the node daemons this object started (they drain first, their private
        directories are removed) and their actors; those it found running stay, for whoever
        started them. A node lost meanwhile is skipped (logged): its daemon went with it, and
        its directory is removed by the next daemon or `stop` on its machine. Every other
        node is stopped whatever happens to one of them."""
        links, self.links = self.links, {}
        owned = {node: link for node, link in links.items() if link.started}
        gone = set(lost(owned, alive_nodes()))
        refs = {node: link.actor.stop.remote() for node, link in owned.items() if node not in gone}
        for node, ref in refs.items():
            try:
                ray.get(ref, timeout=STOP_GRACE + ACTOR_MARGIN)
            except ray.exceptions.RayError as exc:  # lost since, or stuck: said once, here
                log.warning("embedd: node %s's daemon did not stop (%s)", node[:8], exc)
        for node in sorted(gone):
            log.warning("embedd: node %s was lost; its daemon went with it", node[:8])
        for link in owned.values():
            try:
                ray.kill(link.actor)
            except ray.exceptions.RayError as exc:
                log.warning("embedd: node %s's actor: %s", link.node_id[:8], exc)
