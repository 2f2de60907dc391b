"""Which hosts a tensor-parallel group spans: the Cluster and its command-line flags. Light on purpose (no torch,
no TVM): every command's parser registers these flags, and `vlmc --help` should not import the runtime."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Cluster:
    """The hosts a tensor-parallel group spans (--nnodes, --node-rank, --master-addr, --master-port)."""

    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None  # None: a free port of this host (one node)

    def ranks(self, tp: int) -> range:
        """The tensor-parallel ranks this node runs."""
        from ...errors import VlmcError

        if tp % self.nnodes:
            raise VlmcError(f"the LLM artifact has tp={tp}, which does not divide over --nnodes {self.nnodes}")
        per_node = tp // self.nnodes
        return range(self.node_rank * per_node, (self.node_rank + 1) * per_node)


def add_cluster_args(p) -> None:
    g = p.add_argument_group("multi-host tensor parallelism (the artifact's tp ranks spread evenly over the nodes; "
                             "every node runs the same command with its own --node-rank; torchrun's variables are "
                             "read when these are absent)")
    g.add_argument("--nnodes", type=int, help="hosts the ranks run on (default: 1)")
    g.add_argument("--node-rank", dest="node_rank", type=int,
                   help="this host's index: 0 runs rank 0 (and, for serve, the HTTP front and the visual worker); "
                        "others run only their ranks, wait for node 0, and rejoin after failures")
    g.add_argument("--master-addr", dest="master_addr", help="node 0's address, reachable from every node "
                                                             "(default: 127.0.0.1)")
    g.add_argument("--master-port", dest="master_port", type=int,
                   help="a free TCP port on node 0 for the ranks' rendezvous (needed with --nnodes > 1)")


def cluster_from_args(args) -> Cluster:
    """The Cluster of --nnodes/--node-rank/--master-addr/--master-port, or of torchrun's environment when the flags
    are absent (one process per node: torchrun --nproc-per-node 1; torchrun's own store holds MASTER_PORT, so vlmc's
    uses MASTER_PORT + 1)."""
    from ...errors import VlmcError

    env = os.environ
    torchrun = "TORCHELASTIC_RUN_ID" in env and "WORLD_SIZE" in env
    nnodes = args.nnodes if args.nnodes is not None else int(env["WORLD_SIZE"]) if torchrun else 1
    node_rank = args.node_rank if args.node_rank is not None else int(env.get("RANK", 0)) if torchrun else 0
    addr = args.master_addr or (env.get("MASTER_ADDR") if torchrun else None) or "127.0.0.1"
    port = args.master_port if args.master_port is not None else \
        int(env["MASTER_PORT"]) + 1 if torchrun and "MASTER_PORT" in env else None
    if nnodes < 1 or not 0 <= node_rank < nnodes:
        raise VlmcError(f"--node-rank must be in [0, --nnodes) (got {node_rank} of {nnodes})")
    if nnodes > 1 and port is None:
        raise VlmcError("--nnodes > 1 needs --master-port (and --master-addr: node 0's address) on every node")
    if port is not None and not 0 < port < 65536:
        raise VlmcError(f"--master-port must be a TCP port, got {port}")
    return Cluster(nnodes, node_rank, addr, port)
