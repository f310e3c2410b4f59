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
    AttachedDaemon,
    DaemonStartError,
    DaemonSupervisor,
    NodeDaemon,
)

# Calls the actor serves at once: `replace` from every step on the node after one death, and
# the driver's `stats`, must not queue behind a `wait` that lasts a daemon start.
ACTOR_CONCURRENCY = 16
# Seconds beyond the daemon's own start timeout that a caller waits for the actor itself to be
# scheduled and constructed (Ray starts a worker process: seconds; more means no free CPUs).
ACTOR_MARGIN = 60.0
# Whole CPUs per node left to the rest of a pipeline by default: Ray Data's file listing, read
# and write tasks ask for one CPU each unless told otherwise, and the steps' actors for a share
# (they mostly wait on the socket: num_cpus=0.25). With one CPU left, a 2-CPU node never ran
# read_parquet's listing task beside two Embed actors (measured: the job waited forever).
PIPELINE_CPUS = 2.0
# Ray's way of saying "restart (or retry) without limit".
UNLIMITED = -1


@dataclass(frozen=True)
class Daemons:
    """Where each node's daemon comes from (one value, shipped to every step).

    - `socket`: use the daemon the node already runs there (an OS service); None (default):
      run one per node, supervised, with `config` (the daemon's TOML config as text, paths in
      it absolute; None: the bundled model).
    - `cpus`: logical CPUs each node's actor reserves for its daemon (default: all of the
      node's but PIPELINE_CPUS). The daemon computes on every core that is free (its thread
      policy gives way to other work); the reservation keeps Ray from packing the node with
      other CPU-heavy tasks, and must leave room for the rest of the pipeline.
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
        self.daemon.stop()


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
        cpus = max(0.0, _node_cpus(node_id) - PIPELINE_CPUS)
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

    def fingerprint(self, model: str = "default") -> str:
        """The model's fingerprint (embedd/index/records.py), the same on every node; a node
        whose file differs fails here, before any vector is computed, naming both."""
        cards = ray.get([link.actor.card.remote(model) for link in self.links.values()])
        prints = {
            node: model_fingerprint(card) for node, card in zip(self.links, cards, strict=True)
        }
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
        """Each node's daemon `stats`, with `supervisor` (pid, socket, restarts); `error`
        for a node whose actor does not answer in time (restarting, or its node gone), so
        that a progress line never waits on one node."""
        refs = {node: link.actor.stats.remote() for node, link in self.links.items()}
        out: dict[str, dict[str, Any]] = {}
        for node, ref in refs.items():
            try:
                out[node] = dict(ray.get(ref, timeout=HELLO_TIMEOUT + ACTOR_MARGIN))
            except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as exc:
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
        """Stop the node daemons this object started (they drain first) and their actors;
        those it found running stay, for whoever started them."""
        links, self.links = self.links, {}
        owned = [link for link in links.values() if link.started]
        ray.get([link.actor.stop.remote() for link in owned])
        for link in owned:
            ray.kill(link.actor)
