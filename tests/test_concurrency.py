"""AdaptiveLimit: a limit that follows Little's law from the measured waits and CPU, halves on
throttling and grows back. It only measures (`measure()`); the window fetcher does the gating
(see tests/test_fetcher.py).

The estimate itself is checked with a fake clock (exact numbers); real threads check that real
sleeps and real CPU move the limit the right way. Assertions are on the controller's state,
never on how long anything took."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from ona_usage import concurrency
from ona_usage.concurrency import ADJUST_EVERY, SAMPLE, AdaptiveLimit

JOIN_TIMEOUT = 10.0


# -- helpers -----------------------------------------------------------------------------------


class FakeClock:
    """Stands in for the `time` module inside `ona_usage.concurrency`: the test moves it."""

    def __init__(self) -> None:
        self.wall = 0.0
        self.cpu = 0.0

    def perf_counter(self) -> float:
        return self.wall

    def thread_time(self) -> float:
        return self.cpu

    def advance(self, wait: float, cpu: float) -> None:
        self.wall += wait + cpu
        self.cpu += cpu


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(concurrency, "time", fake)
    return fake


def request(limit: AdaptiveLimit, clock: FakeClock, wait: float, cpu: float) -> None:
    """One successful request that waited `wait` seconds for the server and spent `cpu` of CPU."""
    with limit.measure():
        clock.advance(wait, cpu)


# Binary fractions, so that wall - cpu comes out exact.
SLEEPY = (1.0, 2**-10)  # waits a lot, almost no CPU: the estimate is far above any ceiling


def run_threads(count: int, target: Callable[[int], None]) -> None:
    """Run `target(i)` on `count` threads; fail if any is still blocked after JOIN_TIMEOUT."""
    errors: list[BaseException] = []

    def wrapped(index: int) -> None:
        try:
            target(index)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=wrapped, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + JOIN_TIMEOUT
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [thread for thread in threads if thread.is_alive()]
    assert not stuck, f"{len(stuck)} of {count} threads still blocked after {JOIN_TIMEOUT}s: a lost wakeup?"
    assert errors == []


def burn(seconds: float) -> None:
    """Spend `seconds` of this thread's CPU, and wait for nothing."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


# -- the estimate, exactly (fake clock) --------------------------------------------------------


def test_starts_at_start_within_maximum() -> None:
    assert (AdaptiveLimit(8).limit, AdaptiveLimit(8).ceiling) == (4, 8)
    assert (AdaptiveLimit(16, start=6).limit, AdaptiveLimit(16, start=6).ceiling) == (6, 16)
    assert (AdaptiveLimit(2).limit, AdaptiveLimit(2).ceiling) == (2, 2)
    assert (AdaptiveLimit(0).maximum, AdaptiveLimit(0).limit, AdaptiveLimit(0).ceiling) == (1, 1, 1)


@pytest.mark.parametrize("start", [0, -3])
def test_start_is_clamped_to_at_least_one(start: int) -> None:
    limit = AdaptiveLimit(8, start=start)
    assert (limit.limit, limit.ceiling, limit.maximum) == (1, 8, 8)


@pytest.mark.parametrize(
    ("maximum", "samples", "expected"),
    [
        pytest.param(16, [(1.25, 0.25)] * 8, 6, id="1+ceil(1.25/0.25)"),
        pytest.param(16, [(1.3125, 0.25)] * 8, 7, id="rounds-up"),
        pytest.param(16, [(w, 0.25) for w in (8, 0.5, 4, 2, 1, 3, 6, 7)], 3, id="lowest-wait"),
        pytest.param(
            16, [(1.0, c) for c in (0.125, 0.5, 0.125, 0.5, 0.125, 0.5, 0.125, 0.5)], 3, id="median-cpu"
        ),
        pytest.param(16, [(0.0, 0.25)] * 8, 1, id="no-wait-means-one"),
        pytest.param(128, [(2**-10, 0.0)] * 8, 99, id="cpu-floored-at-10us"),
        pytest.param(8, [SLEEPY] * 8, 8, id="clamped-to-maximum"),
    ],
)
def test_limit_is_one_plus_lowest_wait_over_median_cpu_after_eight_requests(
    maximum: int, samples: list[tuple[float, float]], expected: int, clock: FakeClock
) -> None:
    limit = AdaptiveLimit(maximum, start=4)
    for wait, cpu in samples[:-1]:
        request(limit, clock, wait, cpu)
    assert limit.limit == 4  # not before the eighth
    request(limit, clock, *samples[-1])
    assert limit.limit == expected


def test_limit_is_reestimated_every_eight_requests_only(clock: FakeClock) -> None:
    limit = AdaptiveLimit(16, start=4)
    for _ in range(8):
        request(limit, clock, 1.25, 0.25)
    assert limit.limit == 6
    history = []
    for _ in range(8):
        request(limit, clock, 0.25, 0.25)
        history.append(limit.limit)
    assert history == [6] * 7 + [2]


def test_estimate_forgets_requests_older_than_the_last_32(clock: FakeClock) -> None:
    limit = AdaptiveLimit(16, start=4)
    for _ in range(8):
        request(limit, clock, 0.25, 0.25)
    assert limit.limit == 2
    at_estimates = []
    for done in range(9, 41):
        request(limit, clock, 1.0, 0.25)
        if done % ADJUST_EVERY == 0:
            at_estimates.append((done, limit.limit))
    assert SAMPLE == 32
    # The short waits of the first 8 keep the estimate down while they are among the last 32.
    assert at_estimates == [(16, 2), (24, 2), (32, 2), (40, 5)]


# -- throttling (fake clock) -------------------------------------------------------------------


def test_throttled_halves_ceiling_and_limit() -> None:
    limit = AdaptiveLimit(16, start=16)
    states = []
    for _ in range(5):
        limit.throttled()
        states.append((limit.ceiling, limit.limit))
    assert states == [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]

    odd = AdaptiveLimit(7, start=7)
    odd.throttled()
    assert (odd.ceiling, odd.limit) == (3, 3)


def test_throttled_below_the_ceiling_halves_the_limit_in_force() -> None:
    # What is halved is what was in flight: a limit of 4 under a ceiling of 16 becomes 2 (and
    # the ceiling with it), not 8.
    limit = AdaptiveLimit(16, start=4)
    limit.throttled()
    assert (limit.ceiling, limit.limit) == (2, 2)


def test_ceiling_grows_back_by_one_after_four_times_ceiling_successes(clock: FakeClock) -> None:
    limit = AdaptiveLimit(8, start=8)
    limit.throttled()
    limit.throttled()
    assert (limit.ceiling, limit.limit) == (2, 2)
    # The ceiling c grows to c + 1 after 4 * c successes: 8 at 2, then 12 at 3, 16 at 4, ...
    growth = {8: 3, 8 + 12: 4, 20 + 16: 5, 36 + 20: 6, 56 + 24: 7, 80 + 28: 8}
    expected_ceiling, expected_limit = 2, 2
    for done in range(1, 200):
        request(limit, clock, *SLEEPY)
        expected_ceiling = growth.get(done, expected_ceiling)
        if done % ADJUST_EVERY == 0:
            expected_limit = expected_ceiling  # the estimate is far above: the ceiling holds it
        assert (done, limit.ceiling, limit.limit) == (done, expected_ceiling, expected_limit)
    assert (limit.ceiling, limit.limit) == (8, 8)  # and never past the maximum


def test_throttling_again_restarts_the_count_towards_growth(clock: FakeClock) -> None:
    limit = AdaptiveLimit(8, start=2)
    limit.throttled()
    assert (limit.ceiling, limit.limit) == (1, 1)
    for _ in range(3):
        request(limit, clock, *SLEEPY)
    limit.throttled()  # 3 of the 4 successes needed: they no longer count
    assert (limit.ceiling, limit.limit) == (1, 1)
    ceilings = []
    for _ in range(4):
        request(limit, clock, *SLEEPY)
        ceilings.append(limit.ceiling)
    assert ceilings == [1, 1, 1, 2]


# -- failures ----------------------------------------------------------------------------------


def test_a_failed_request_is_not_timed(clock: FakeClock) -> None:
    limit = AdaptiveLimit(16, start=1)
    for _ in range(7):
        request(limit, clock, 1.25, 0.25)
    with pytest.raises(ValueError, match="boom"):
        with limit.measure():
            clock.advance(0.0, 0.25)  # would make the estimate 1 if it were recorded
            raise ValueError("boom")
    assert limit.limit == 1  # the failure was not the eighth request
    request(limit, clock, 1.25, 0.25)
    assert limit.limit == 6  # 1 + 1.25 / 0.25, from the eight successes alone


def test_failures_do_not_count_towards_the_ceiling_growing_back(clock: FakeClock) -> None:
    limit = AdaptiveLimit(8, start=2)
    limit.throttled()
    for _ in range(10):
        with pytest.raises(RuntimeError):
            with limit.measure():
                clock.advance(*SLEEPY)
                raise RuntimeError("429")
    assert limit.ceiling == 1
    for _ in range(4):
        request(limit, clock, *SLEEPY)
    assert limit.ceiling == 2


# -- real threads ------------------------------------------------------------------------------


def test_requests_that_wait_on_the_server_raise_the_limit_to_the_maximum() -> None:
    limit = AdaptiveLimit(8)
    assert limit.limit == 4

    def worker(_: int) -> None:
        for _ in range(4):
            with limit.measure():
                time.sleep(0.02)

    run_threads(16, worker)
    assert (limit.limit, limit.ceiling) == (8, 8)


def test_requests_that_only_burn_cpu_lower_the_limit() -> None:
    limit = AdaptiveLimit(8, start=8)
    done = []

    def worker(_: int) -> None:
        for _ in range(12):
            with limit.measure():
                burn(0.002)
            done.append(1)

    run_threads(8, worker)
    assert len(done) == 96
    assert 1 <= limit.limit <= 3
    assert limit.ceiling == 8  # nothing was throttled


