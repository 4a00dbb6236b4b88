"""Which Ray the driver uses, and whether it is still there.

- `connect(None)` with no `RAY_ADDRESS` starts a new local instance (`address="local"`). A plain
  `ray.init()` would instead join the latest cluster that `ray start` left on the machine,
  someone else's, and take it down with us or go down with it; `local` never does.
- `connect("auto")`, `connect("host:port")` or `RAY_ADDRESS` join an existing cluster.
- `Cluster.reachable()` asks whether the cluster's GCS still accepts connections: when it does
  not, actors die and nothing new can start, so the driver stops (see `driver.ClusterLost`)
  instead of recording every shard as failed or waiting for Ray's own 60-second abort.
"""

import dataclasses
import os
import socket
from typing import Literal

import ray

RAY_INIT = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}


@dataclasses.dataclass(frozen=True)
class Cluster:
    """The Ray cluster the driver is connected to.

    Attributes:
        mode: `embedded` (started by this driver, gone when it exits) or `joined`.
        address: the cluster's GCS address (`host:port`).
        nodes: alive nodes.
        cpus / gpus: totals over alive nodes.
        max_node_cpus / max_node_gpus: the most any one node has (an actor fits on one node).
    """

    mode: Literal["embedded", "joined"]
    address: str
    nodes: int
    cpus: float
    gpus: float
    max_node_cpus: float
    max_node_gpus: float

    def describe(self) -> str:
        """The line the CLI prints after `ray: `."""
        what = "started an embedded local Ray" if self.mode == "embedded" else "joined the cluster"
        return (
            f"{what} at {self.address} ({self.nodes} node{'s' * (self.nodes != 1)}, "
            f"{self.cpus:g} CPUs, {self.gpus:g} GPUs)"
        )

    def reachable(self, timeout: float = 2.0) -> bool:
        """The GCS accepts a TCP connection (a dead head refuses it at once)."""
        host, _, port = self.address.rpartition(":")
        try:
            with socket.create_connection((host, int(port)), timeout=timeout):
                return True
        except OSError:
            return False


def describe_cluster(mode: Literal["embedded", "joined"]) -> Cluster:
    """Read the connected cluster's address and resources."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    per_node = [n.get("Resources", {}) for n in nodes]
    return Cluster(
        mode=mode,
        address=ray.get_runtime_context().gcs_address,
        nodes=len(nodes),
        cpus=sum(r.get("CPU", 0) for r in per_node),
        gpus=sum(r.get("GPU", 0) for r in per_node),
        max_node_cpus=max((r.get("CPU", 0) for r in per_node), default=0),
        max_node_gpus=max((r.get("GPU", 0) for r in per_node), default=0),
    )


def connect(address: str | None, num_cpus: int | None = None) -> Cluster:
    """Join `address` (or `RAY_ADDRESS`), or with neither start an embedded local Ray.

    Args:
        address: `auto`, `host:port`, `ray://...`, or None.
        num_cpus: CPUs for an embedded Ray (None: all of this machine's).

    Returns:
        The cluster now connected to.

    Raises:
        ConnectionError: the address names no running cluster (from Ray).
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, **RAY_INIT)
        return describe_cluster("joined")
    ray.init(address="local", num_cpus=num_cpus, **RAY_INIT)
    return describe_cluster("embedded")
