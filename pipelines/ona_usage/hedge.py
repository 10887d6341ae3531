"""Hedged requests: a straggler gets a twin, and whichever answers first wins.

A request that hangs (the server accepted it and sits on it) would otherwise hold its window
until the client's timeout, 60 s by default, while the adaptive limit keeps only a few windows
in flight. List calls are idempotent, so once a request has been in flight far longer than the
requests of this run have taken (`delay`), the same request goes out again on a fresh
connection, and again after another `delay` (at most `MAX_TWINS` twins). The first answer is
used; the others are abandoned, their connections shut down so their threads stop waiting. The
timeout stays the last resort for an API that is slow everywhere.

The request itself runs on the calling thread, as it would without hedging; a single watchdog
thread starts the twins when a deadline passes, so a request that answers in time costs no
more than a heap push and pop.
"""

from __future__ import annotations

import heapq
import itertools
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

import httpx

T = TypeVar("T")

HEDGE_FACTOR = 10.0  # a request is a straggler after this many times the recent slow latency
MIN_DELAY = 0.25  # seconds: never hedge sooner, whatever the latency
COLD_DELAY = 2.0  # seconds: the delay until enough requests have been timed
SAMPLES = 64  # recent request times the delay is computed from
MIN_SAMPLES = 8
MAX_TWINS = 2  # a straggler gets a twin after `delay`, and another after twice that


class Hedger:
    """Runs requests on the calling thread, and twins of the stragglers; thread-safe, one per client."""

    def __init__(self, workers: int, timeout: float) -> None:
        self._timeout = timeout
        self._pool = ThreadPoolExecutor(max_workers=MAX_TWINS * max(workers, 1) + 1, thread_name_prefix="ona-hedge")
        self._watchdog = _Watchdog()
        self._times: deque[float] = deque(maxlen=SAMPLES)
        self._lock = threading.Lock()
        self.hedged = 0  # requests that got a twin

    def delay(self) -> float | None:
        """How long a request may take before it gets a twin; None where the timeout comes first."""
        with self._lock:
            times = sorted(self._times)
        if len(times) < MIN_SAMPLES:
            delay = COLD_DELAY
        else:
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
        """`send` on `primary`, with twins on `spare()` transports for a straggler.

        Returns the first answer and the transport that brought it (the one to keep using).
        """
        delay = self.delay()
        started = time.perf_counter()
        if delay is None:
            return send(primary), primary
        race = _Race(primary)

        def hedge() -> None:
            transport = race.add_twin(spare)
            if transport is None:
                return  # the request answered meanwhile
            if race.twins == 1:
                with self._lock:
                    self.hedged += 1
            on_hedge(delay)
            future = self._pool.submit(send, transport)
            future.add_done_callback(lambda f: race.twin_done(f, transport))
            if race.twins < MAX_TWINS:
                race.timer = self._watchdog.arm(delay, hedge)

        race.timer = self._watchdog.arm(delay, hedge)
        try:
            response = send(primary)
        except BaseException:
            race.timer.cancel()
            if not race.await_twin():
                raise  # no twin, or none that answered: the primary's own failure
            return race.result()
        race.timer.cancel()
        if race.primary_done():
            if race.twins == 0:  # only requests that needed no twin tell what normal is
                with self._lock:
                    self._times.append(time.perf_counter() - started)
            return response, primary
        return race.result()  # a twin won just before; the primary's answer is dropped

    def close(self) -> None:
        self._watchdog.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)


class _Race(Generic[T]):
    """The primary and its twins: the first to answer wins, the others are shut down."""

    def __init__(self, primary: httpx.BaseTransport) -> None:
        self._lock = threading.Lock()
        self._primary = primary
        self._twins: list[httpx.BaseTransport] = []
        self._running = 0
        self._winner: tuple[T, httpx.BaseTransport] | None = None
        self._finished = False
        self._primary_failed = False
        self._settled = threading.Event()  # a twin won, or every twin failed
        self.timer: _Entry | None = None

    @property
    def twins(self) -> int:
        return len(self._twins)

    def add_twin(self, spare: Callable[[], httpx.BaseTransport]) -> httpx.BaseTransport | None:
        with self._lock:
            if self._finished:
                return None
            transport = spare()
            self._twins.append(transport)
            self._running += 1
            return transport

    def primary_done(self) -> bool:
        """The primary answered: it wins unless a twin already did."""
        with self._lock:
            if self._finished:
                return False
            self._finished = True
            losers = list(self._twins)
        for transport in losers:
            _abandon(transport)
        return True

    def twin_done(self, future: Future, transport: httpx.BaseTransport) -> None:
        with self._lock:
            self._running -= 1
            won = not self._finished and future.exception() is None
            if won:
                self._finished = True
                self._winner = (future.result(), transport)
            losers = [t for t in (self._primary, *self._twins) if t is not transport] if won else []
            settled = won or (self._running == 0 and self._primary_failed)
        if not won:
            transport.close()
        for loser in losers:
            _abandon(loser)
        if won or settled:
            self._settled.set()

    def await_twin(self) -> bool:
        """After the primary failed: whether a twin answered (waiting for those still running)."""
        with self._lock:
            if self._winner is not None:
                return True
            self._primary_failed = True
            if self._running == 0:
                self._finished = True  # no twin may start now
                return False
        self._settled.wait()
        return self._winner is not None

    def result(self) -> tuple[T, httpx.BaseTransport]:
        self._settled.wait()
        assert self._winner is not None
        return self._winner


class _Entry:
    __slots__ = ("deadline", "callback", "cancelled")

    def __init__(self, deadline: float, callback: Callable[[], None]) -> None:
        self.deadline, self.callback, self.cancelled = deadline, callback, False

    def cancel(self) -> None:
        self.cancelled = True


class _Watchdog:
    """One thread that runs callbacks at their deadlines; arming and cancelling are cheap."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _Entry]] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def arm(self, delay: float, callback: Callable[[], None]) -> _Entry:
        entry = _Entry(time.monotonic() + delay, callback)
        with self._wake:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="ona-hedge-watchdog", daemon=True)
                self._thread.start()
            heapq.heappush(self._heap, (entry.deadline, next(self._order), entry))
            if self._heap[0][2] is entry:
                self._wake.notify()
        return entry

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while self._heap and self._heap[0][2].cancelled:
                    heapq.heappop(self._heap)
                if self._stopped:
                    return
                if not self._heap or self._heap[0][0] > time.monotonic():
                    self._wake.wait(self._heap[0][0] - time.monotonic() if self._heap else None)
                    continue
                _, _, entry = heapq.heappop(self._heap)
            entry.callback()


def _abandon(transport: httpx.BaseTransport) -> None:
    """Stop waiting for a request's answer: shut its connection down, so its reader wakes now."""
    abort = getattr(transport, "abort", None)
    if abort is not None:
        abort()
    transport.close()
