"""How many windows a sync fetches at once: enough to hide the API's latency, and no more.

Up to `--workers` threads fetch windows, a request at a time each, but more requests at once
only help while each one spends most of its time waiting for the server. Against a fast API
the threads wait on each other for the GIL instead: measured on 2 cores against the local
emulator (0 ms), 16 windows at once took 28 s for a year of records and 4 took 19 s, while at
50 ms per request 16 are needed. The client measures every request (`measure`); the window
fetcher starts a window only while fewer than `limit` are running. Gating whole windows, not
each request, keeps the threads that wait asleep in the pool's queue instead of waking one per
page.

So the limit follows Little's law: with `w` seconds waiting for the server and `c` seconds of
our own CPU per request, `1 + w / c` requests keep one core busy. `w` is the shortest of the
recent waits, since waits measured under contention include time queued for the GIL (their
mean would feed on itself). A 429 halves the limit in force and caps it there (the ceiling),
which grows back by one after a run of successes (additive increase, multiplicative decrease).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

SAMPLE = 32  # requests remembered for the estimate
ADJUST_EVERY = 8  # requests between two estimates


class AdaptiveLimit:
    """How many requests to keep in flight, from the measured latency, within `[1, maximum]`."""

    def __init__(self, maximum: int, *, start: int = 4) -> None:
        self.maximum = max(1, maximum)
        self.limit = min(max(start, 1), self.maximum)
        self.ceiling = self.maximum
        self._lock = threading.Lock()
        self._waits: deque[float] = deque(maxlen=SAMPLE)
        self._cpus: deque[float] = deque(maxlen=SAMPLE)
        self._done = 0
        self._since_throttle = 0

    @contextmanager
    def measure(self) -> Iterator[None]:
        """Time one request; only those that succeed count (a failure's time says nothing)."""
        wall, cpu = time.perf_counter(), time.thread_time()
        yield
        wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
        with self._lock:
            self._record(wall, cpu)

    def throttled(self) -> None:
        """The API answered 429: halve what we send at once until it has recovered."""
        with self._lock:
            self.ceiling = max(1, min(self.ceiling, self.limit) // 2)
            self.limit = min(self.limit, self.ceiling)
            self._since_throttle = 0

    def _record(self, wall: float, cpu: float) -> None:
        self._waits.append(max(wall - cpu, 0.0))
        self._cpus.append(cpu)
        self._done += 1
        self._since_throttle += 1
        if self.ceiling < self.maximum and self._since_throttle >= 4 * self.ceiling:
            self.ceiling += 1
            self._since_throttle = 0
        if self._done % ADJUST_EVERY == 0:
            self.limit = max(1, min(self.ceiling, self._estimate()))

    def _estimate(self) -> int:
        waits = sorted(self._waits)
        wait = waits[0]
        cpus = sorted(self._cpus)
        cpu = max(cpus[len(cpus) // 2], 1e-5)
        return 1 + math.ceil(wait / cpu)
