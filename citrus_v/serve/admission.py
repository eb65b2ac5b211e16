"""Load shedding: every admitted request reserves its memory estimate from one server-wide budget.

A request's estimate (:class:`~citrus_v.serve.request_budget.MemoryModel`) is reserved before any of its images
is decoded and held while it is decoded, waits in the batcher's queue and is generated; it is released when the
last of its jobs is answered, failed or cancelled, when the answer is sent, or — whatever happened in between, a
client gone before its stream started included — when the request and its decoded images are freed. A request
that would take the reservations past the budget is answered **429** ``server_busy`` with ``Retry-After`` (whole
seconds: how long requests have recently held their reservations); one whose estimate alone passes the whole
budget can never be served and is answered **413** ``request_memory_exceeded``. So the decoded images of queued
and running requests together stay within the budget however many clients send at once.
"""

from __future__ import annotations

import math
import os
import threading
import time
import weakref
from pathlib import Path

from .errors import ApiError

MIB = 1024 * 1024
# the memory a container may use, under cgroup v2 ("max" when unlimited)
CGROUP_MEMORY_LIMIT = Path("/sys/fs/cgroup/memory.max")
# the default budget: this share of the memory the server may use (the machine's, or its container's)
DEFAULT_MEMORY_SHARE = 0.25
RETRY_AFTER_BOUNDS_S = (1, 60)
_HOLD_SMOOTHING = 0.2  # weight of the latest hold time in the running estimate


def available_memory_bytes(cgroup_limit: Path = CGROUP_MEMORY_LIMIT) -> int:
    """The memory this process may use: the machine's physical memory, or the container's limit when lower."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        text = cgroup_limit.read_text().strip()
    except OSError:
        return physical
    return min(physical, int(text)) if text.isdigit() else physical


def default_inflight_memory_mb() -> int:
    """The default of ``--max_inflight_memory_mb``: a quarter of the memory the server may use."""
    return max(1, int(available_memory_bytes() * DEFAULT_MEMORY_SHARE) // MIB)


class ServerBusy(ApiError):
    """429: the server's memory budget is taken by requests in flight; ``headers`` carry ``Retry-After``."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(429, message, "server_busy", "server_error", headers={"Retry-After": str(retry_after)})
        self.retry_after = retry_after


class Reservation:
    """One admitted request's share of the budget, held by ``holders`` jobs; released once, however many of
    :meth:`release`, :meth:`done_one` and the finaliser of :meth:`release_with` come to it."""

    def __init__(self, admission: MemoryAdmission, nbytes: int, holders: int = 1) -> None:
        self.admission = admission
        self.nbytes = int(nbytes)
        self._holders = max(1, int(holders))
        self._lock = threading.RLock()  # a finaliser may release while this thread holds it
        self._released = False
        self._since = time.monotonic()

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        """Give the bytes back (once)."""
        with self._lock:
            if self._released:
                return
            self._released = True
        self.admission.give_back(self.nbytes, time.monotonic() - self._since)

    def done_one(self, *_ignored: object) -> None:
        """One holder is done (a job answered, failed or cancelled: usable as a future's done callback); the
        last one releases."""
        with self._lock:
            self._holders -= 1
            last = self._holders <= 0
        if last:
            self.release()

    def release_with(self, owner: object) -> None:
        """Release, at the latest, when ``owner`` (what holds the decoded images) is freed."""
        weakref.finalize(owner, self.release)


class MemoryAdmission:
    """The server-wide memory budget (``budget_bytes``) and the reservations taken from it."""

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes <= 0:
            raise ValueError(f"the memory budget must be above 0 bytes, got {budget_bytes}")
        self.budget = int(budget_bytes)
        self._lock = threading.RLock()  # a finaliser may release while this thread holds it
        self.reserved = 0
        self.peak_reserved = 0
        self.admitted = 0
        self.shed = 0
        self._hold_s: float | None = None

    def reserve(self, nbytes: int, holders: int = 1, what: str = "the request") -> Reservation:
        """Reserve ``nbytes`` for ``holders`` jobs; raises 413 when ``nbytes`` alone passes the budget and
        :class:`ServerBusy` (429) when the reservations in flight leave too little of it."""
        nbytes = int(nbytes)
        if nbytes > self.budget:
            raise ApiError(
                413,
                f"{what} would take about {_mib(nbytes)} MiB of memory to decode and serve, more than this server's "
                f"whole budget of {_mib(self.budget)} MiB for requests in flight (--max_inflight_memory_mb); send "
                "fewer or smaller images, or fewer choices (n)",
                "request_memory_exceeded",
                param="messages",
            )
        with self._lock:
            if self.reserved + nbytes > self.budget:
                self.shed += 1
                in_use = self.reserved
                busy = True
            else:
                self.reserved += nbytes
                self.peak_reserved = max(self.peak_reserved, self.reserved)
                self.admitted += 1
                busy = False
        if busy:
            wait = self.retry_after()
            raise ServerBusy(
                f"the server is busy: requests in flight hold {_mib(in_use)} MiB of its {_mib(self.budget)} MiB "
                f"budget and {what} needs about {_mib(nbytes)} MiB; retry after {wait} s",
                wait,
            )
        return Reservation(self, nbytes, holders)

    def give_back(self, nbytes: int, held_s: float) -> None:
        with self._lock:
            self.reserved -= nbytes
            previous = self._hold_s
            self._hold_s = held_s if previous is None else previous + _HOLD_SMOOTHING * (held_s - previous)

    def retry_after(self) -> int:
        """Whole seconds a shed client should wait: how long reservations have recently been held."""
        low, high = RETRY_AFTER_BOUNDS_S
        held = self._hold_s if self._hold_s is not None else float(low)
        return int(min(max(math.ceil(held), low), high))


def _mib(nbytes: int) -> str:
    return f"{nbytes / MIB:.0f}" if nbytes >= MIB else f"{nbytes / MIB:.2f}"
