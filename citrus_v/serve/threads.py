"""How many intra-op threads torch uses while serving on CPU.

torch's default is one thread per core. A server also needs CPU for the HTTP side (reading bodies, decoding
images, writing answers), and every parallel torch op waits at a barrier for all its threads: when one of
them shares its core with anything else, each op stalls for a scheduler time slice. So on CPU the server
leaves one core free by default.
"""

from __future__ import annotations

import os

import torch


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the platform reports it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_num_threads(device: str | torch.device) -> int | None:
    """Threads for serving on ``device``: all usable cores but one on CPU; ``None`` (torch's choice) elsewhere."""
    if torch.device(device).type != "cpu":
        return None
    return max(1, usable_cores() - 1)


def configure_threads(device: str | torch.device, requested: int | None = None) -> int:
    """Set torch's intra-op threads for serving (``requested``, else :func:`default_num_threads`).

    Call before the model runs: each thread that runs torch ops takes the count when it first runs one.
    Returns the count in effect.
    """
    if requested is not None and requested < 1:
        raise ValueError(f"the number of threads must be at least 1, got {requested}")
    count = requested if requested is not None else default_num_threads(device)
    if count is not None:
        torch.set_num_threads(count)
    return torch.get_num_threads()
