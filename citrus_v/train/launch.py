"""Multi-process launch: ``NPROC_PER_NODE=N citrus-v sft ...`` re-runs itself under torchrun (DDP)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def nproc_per_node() -> int:
    value = os.environ.get("NPROC_PER_NODE", "1").strip() or "1"
    try:
        count = int(value)
    except ValueError as err:
        raise ValueError(f"NPROC_PER_NODE={value!r} is not a number of processes") from err
    if count < 1:
        raise ValueError(f"NPROC_PER_NODE must be at least 1, got {count}")
    return count


def launch_torchrun(argv: list[str], nproc: int) -> int:
    """Run ``citrus-v ARGV`` in ``nproc`` processes on this node; return the exit code."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--nnodes=1",
        f"--master_addr={os.environ.get('MASTER_ADDR', '127.0.0.1')}",
        f"--master_port={os.environ.get('MASTER_PORT', str(free_port()))}",
        "-m",
        "citrus_v.cli",
        *argv,
    ]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.call(command, env=env)
