"""A Ray cluster of several nodes on one machine, on the loopback interface only: for trying
embedd.ray's multi-node behaviour (a daemon per node, work spread over nodes, a node lost
mid-run) without a second machine, and for the tests that prove it.

    python -m embedd.ray.cluster [--nodes 2] [--cpus 1] [--no-pin]

starts the nodes, prints the address and the line a driver connects with, and stops them all on
Ctrl-C. Each node is a real raylet with its own object store and workers; with `pin`, each is
bound to its own core (sched_setaffinity, inherited by its workers and their daemons) while the
machine has a core for each.

Two of Ray's habits need working around, and a driver of the cluster needs the same:
- Ray replaces 127.0.0.1 and "localhost" by the host's outward address wherever an address is
  given (`ray.init`, `ray start`), where nothing listens: the nodes use LOOPBACK, another address
  of the loopback interface that Ray takes as it is, and drivers connect to the head there
  (`ray.init(address="127.0.0.2:PORT")`).
- A head node started here would become every later `ray.init()`'s default cluster on the
  machine (Ray records the last one started in its temp directory); this one is not recorded.

Ray's token authentication needs nothing more here: the nodes and drivers on one machine read
the token from ~/.ray/auth_token.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self

import ray

# An address of the loopback interface (Linux routes all of 127.0.0.0/8 there) that Ray does
# not rewrite, as it rewrites 127.0.0.1.
LOOPBACK = "127.0.0.2"
# Each node's object store (bytes): a corpus job moves batches of text and vectors, megabytes;
# Ray's default (30% of the memory) would have every node of one machine claim it.
OBJECT_STORE_BYTES = 150 * 2**20
# How fast the head judges a node lost: Ray's defaults (a health check every 3 s, 5 failed in a
# row) take ~15 s for a killed raylet, whose checks fail at once (connection refused). Checking
# every second takes ~5 s; each check still has Ray's default 10 s to answer, so that a busy
# machine's slow raylet is not taken for a lost one.
FAST_FAILURE_DETECTION = {
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 10000,
    "health_check_failure_threshold": 5,
}


def core_plan(nodes: int, cores: Sequence[int]) -> list[set[int] | None]:
    """The cores each node is bound to: its own one while there are as many cores as nodes,
    else none (None: the node shares all the cores the process may use)."""
    if nodes < 1:
        raise ValueError("a cluster has at least one node")
    ordered = sorted(cores)
    if len(ordered) < nodes:
        return [None] * nodes
    return [{ordered[i]} for i in range(nodes)]


class LocalCluster:
    """`nodes` Ray nodes of `cpus` logical CPUs each on this machine, on LOOPBACK only (a
    context manager: started on entry, every process stopped at exit). `pin`: bind each node
    to its own core where the machine has enough. `system_config`: Ray's `_system_config`
    for the head (FAST_FAILURE_DETECTION for tests that lose a node)."""

    def __init__(
        self,
        nodes: int = 2,
        cpus: int = 1,
        *,
        pin: bool = True,
        system_config: dict[str, Any] | None = None,
    ) -> None:
        self.cpus = cpus
        self.system_config = dict(system_config or {})
        allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self.plan = core_plan(nodes, allowed) if pin and allowed else [None] * nodes
        self.nodes: list[Any] = []  # ray._private.node.Node, head first

    @property
    def address(self) -> str:
        """The head's address, for `ray.init(address=...)`."""
        if not self.nodes:
            raise RuntimeError("the cluster is not started")
        return str(self.nodes[0].gcs_address)

    def start(self) -> Self:
        from ray._private.node import Node
        from ray._private.parameter import RayParams

        own = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        try:
            for cores in self.plan:
                if cores is not None:
                    os.sched_setaffinity(0, cores)  # what the node's processes inherit
                params: dict[str, Any] = {
                    "num_cpus": self.cpus,
                    "num_gpus": 0,
                    "node_ip_address": LOOPBACK,
                    "object_store_memory": OBJECT_STORE_BYTES,
                    "include_dashboard": False,
                    "min_worker_port": 0,
                    "max_worker_port": 0,
                }
                if not self.nodes:
                    params["_system_config"] = self.system_config
                else:
                    params.update(
                        gcs_address=self.address,
                        include_log_monitor=False,  # one per machine: the head's
                        node_manager_port=0,
                        dashboard_agent_listen_port=None,
                    )
                node = Node(RayParams(**params), head=not self.nodes, shutdown_at_exit=True,
                            spawn_reaper=True)  # fmt: skip
                self.nodes.append(node)
        except BaseException:
            self.shutdown()
            raise
        finally:
            if own is not None:
                os.sched_setaffinity(0, own)
        return self

    def connect(self, **init: Any) -> Any:
        """`ray.init` for this process as a driver of the cluster, naming LOOPBACK as its own
        address (the nodes' one)."""
        return ray.init(address=self.address, _node_ip_address=LOOPBACK, **init)

    def raylet_pid(self, index: int) -> int:
        """The pid of node `index`'s raylet (0: the head)."""
        return int(self.nodes[index].all_processes["raylet"][0].process.pid)

    def node_id(self, index: int) -> str:
        return str(self.nodes[index].node_id)

    def kill_raylet(self, index: int) -> None:
        """SIGKILL node `index`'s raylet, as a crashed machine would lose it: its workers exit
        on their own, and the head marks the node dead once its health checks fail."""
        process = self.nodes[index].all_processes["raylet"][0].process
        process.send_signal(signal.SIGKILL)
        process.wait()

    def shutdown(self) -> None:
        """Stop every process of every node, the head's last."""
        for node in reversed(self.nodes):
            node.kill_all_processes(check_alive=False, allow_graceful=False, wait=True)
        self.nodes = []

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m embedd.ray.cluster",
        description="Start a Ray cluster of several nodes on this machine (loopback only).",
    )
    parser.add_argument("--nodes", type=int, default=2, help="raylets to start (default 2)")
    parser.add_argument("--cpus", type=int, default=1, help="logical CPUs per node (default 1)")
    parser.add_argument("--no-pin", action="store_true", help="do not bind nodes to cores")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with LocalCluster(args.nodes, args.cpus, pin=not args.no_pin) as cluster:
        pinned = ", ".join("all cores" if c is None else f"core {min(c)}" for c in cluster.plan)
        print(f"{args.nodes} nodes of {args.cpus} CPU(s) ({pinned}) at {cluster.address}")
        print(f'drivers: ray.init(address="{cluster.address}")')
        print("Ctrl-C stops them.", flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
