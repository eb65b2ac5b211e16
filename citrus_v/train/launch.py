"""Multi-process launch, as ms-swift's: ``NPROC_PER_NODE=N citrus-v sft ...`` re-runs itself under torchrun (DDP),
and ``NNODES``, ``NODE_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` beside it spread the run over several machines.

Each machine runs the same command with its own ``NODE_RANK`` (0 to ``NNODES - 1``); ``MASTER_ADDR`` and
``MASTER_PORT`` name the machine with ``NODE_RANK=0``, where torchrun's static rendezvous meets.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass

# torchrun's own default rendezvous port, which every node must agree on when MASTER_PORT is not set
TORCHRUN_DEFAULT_PORT = 29500


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def _count(environ: Mapping[str, str], name: str, default: int, least: int) -> int:
    value = environ.get(name, "").strip() or str(default)
    try:
        count = int(value)
    except ValueError as err:
        raise ValueError(f"{name}={value!r} is not a whole number") from err
    if count < least:
        raise ValueError(f"{name} must be at least {least}, got {count}")
    return count


def nproc_per_node(environ: Mapping[str, str] | None = None) -> int:
    return _count(os.environ if environ is None else environ, "NPROC_PER_NODE", 1, 1)


@dataclass(frozen=True)
class Topology:
    """Where this launch sits: processes per node, nodes, this node's rank and the rendezvous address."""

    nproc_per_node: int
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int

    @property
    def distributed(self) -> bool:
        return self.nproc_per_node > 1 or self.nnodes > 1

    def torchrun_flags(self) -> list[str]:
        return [
            f"--nproc_per_node={self.nproc_per_node}",
            f"--nnodes={self.nnodes}",
            f"--node_rank={self.node_rank}",
            f"--master_addr={self.master_addr}",
            f"--master_port={self.master_port}",
        ]

    def describe(self) -> str:
        return (
            f"torchrun: node {self.node_rank} of {self.nnodes}, {self.nproc_per_node} process(es) per node, "
            f"{self.nnodes * self.nproc_per_node} in all; rendezvous at {self.master_addr}:{self.master_port}"
        )


def topology(environ: Mapping[str, str] | None = None) -> Topology:
    """The launch ms-swift's variables ask for; a value that cannot work is an error naming the variable."""
    environ = os.environ if environ is None else environ
    nproc = nproc_per_node(environ)
    nnodes = _count(environ, "NNODES", 1, 1)
    node_rank = _count(environ, "NODE_RANK", 0, 0)
    if node_rank >= nnodes:
        raise ValueError(f"NODE_RANK={node_rank} must be below NNODES={nnodes} (nodes count from 0)")
    address = environ.get("MASTER_ADDR", "").strip()
    if nnodes > 1 and not address:
        raise ValueError(
            f"NNODES={nnodes} needs MASTER_ADDR: the address of the machine started with NODE_RANK=0, the same "
            "on every node (and MASTER_PORT, a free port there)"
        )
    if "MASTER_PORT" in environ:
        port = _count(environ, "MASTER_PORT", TORCHRUN_DEFAULT_PORT, 1)
    else:  # one machine: any free port; several: the port all of them default to
        port = free_port() if nnodes == 1 else TORCHRUN_DEFAULT_PORT
    return Topology(nproc, nnodes, node_rank, address or "127.0.0.1", port)


def launch_torchrun(argv: list[str], where: Topology) -> int:
    """Run ``citrus-v ARGV`` under torchrun on this node, as ``where`` says; return the exit code."""
    command = [sys.executable, "-m", "torch.distributed.run", *where.torchrun_flags(), "-m", "citrus_v.cli", *argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // where.nproc_per_node)))
    print(where.describe(), file=sys.stderr, flush=True)
    return subprocess.call(command, env=env)
