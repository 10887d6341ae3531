"""Hedged requests: a straggler gets a twin, and whichever answers first wins.

A request that hangs (the server accepted it and sits on it) would otherwise hold its window
until the client's timeout, 60 s by default, while the adaptive limit keeps only a few windows
in flight. List calls are idempotent, so once a request has been in flight far longer than the
requests of this run have taken (`delay`), the same request goes out again on a fresh
connection. The first answer is used; the other is abandoned: its connection is shut down so
its thread stops waiting. The timeout stays the last resort for an API slow everywhere.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TypeVar

import httpx

T = TypeVar("T")

HEDGE_FACTOR = 10.0  # a request is a straggler after this many times the recent slow latency
MIN_DELAY = 1.0  # seconds: never hedge sooner, whatever the latency
SAMPLES = 64  # recent request times the delay is computed from
MIN_SAMPLES = 8  # no hedging before this many requests answered


class Hedger:
    """Runs a request, and its twin once it straggles; thread-safe, one per client."""

    def __init__(self, workers: int, timeout: float) -> None:
        self._timeout = timeout
        self._pool = ThreadPoolExecutor(max_workers=2 * max(workers, 1) + 2, thread_name_prefix="ona-hedge")
        self._times: deque[float] = deque(maxlen=SAMPLES)
        self._lock = threading.Lock()
        self.hedged = 0  # requests that got a twin
        self.won = 0  # of those, the twin answered first

    def observe(self, seconds: float) -> None:
        """The time an answered request took."""
        with self._lock:
            self._times.append(seconds)

    def delay(self) -> float | None:
        """How long a request may take before it gets a twin; None while too little is known."""
        with self._lock:
            if len(self._times) < MIN_SAMPLES:
                return None
            times = sorted(self._times)
        p90 = times[min(len(times) - 1, math.ceil(0.9 * len(times)) - 1)]
        delay = max(MIN_DELAY, HEDGE_FACTOR * p90)
        return delay if delay < self._timeout / 2 else None

    def run(
        self,
        send: Callable[[httpx.BaseTransport], T],
        primary: httpx.BaseTransport,
        spare: Callable[[], httpx.BaseTransport],
        on_hedge: Callable[[float], None],
    ) -> tuple[T, httpx.BaseTransport]:
        """`send` on `primary`; after `delay()`, also on a `spare()` transport. The first answer and its transport.

        The transport returned is the one to keep using: the loser's is shut down and closed.
        """
        delay = self.delay()
        if delay is None:
            return send(primary), primary
        first = self._pool.submit(send, primary)
        try:
            return first.result(timeout=delay), primary
        except FutureTimeout:
            pass
        with self._lock:
            self.hedged += 1
        on_hedge(delay)
        twin_transport = spare()
        twin = self._pool.submit(send, twin_transport)
        transports: dict[Future[T], httpx.BaseTransport] = {first: primary, twin: twin_transport}
        pending: set[Future[T]] = set(transports)
        error: BaseException | None = None
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                if future.exception() is None:
                    for loser in pending:
                        _abandon(transports[loser])
                    if future is twin:
                        with self._lock:
                            self.won += 1
                    return future.result(), transports[future]
                error = future.exception()
                transports[future].close()
        assert error is not None
        raise error

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _abandon(transport: httpx.BaseTransport) -> None:
    """Stop waiting for a request's answer: shut its connection down, so its reader wakes now."""
    abort = getattr(transport, "abort", None)
    if abort is not None:
        abort()
    transport.close()
