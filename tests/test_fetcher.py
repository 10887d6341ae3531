"""WindowFetcher: windows fetched on a pool, at most `min(limit, workers)` at once and at most
`lookahead` ahead of the consumer, handed out in window order; failures surface at their window.

The client is a fake that records which windows started, how many ran at once, and blocks
where a test wants it to (events, never sleeps, decide what runs when). A window's pages are
valid API pages, so `from_pages` builds the real table. Every wait has a timeout, and `next()`
is called on a helper thread, so a broken fetcher fails the test instead of hanging it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import pendulum
import pyarrow as pa
import pytest

from ona_usage import source
from ona_usage.concurrency import AdaptiveLimit
from ona_usage.source import WindowFetcher
from ona_usage.windows import Window, format_rfc3339, tile

WAIT = 5.0  # the most any test waits for anything; reached only when something is broken
QUIET = 0.05  # how long a test watches for something that must not happen
START = pendulum.datetime(2025, 3, 1, tz="UTC")
PROJECT = "proj-7"
ROWS_PER_PAGE = 2


def hours(count: int) -> list[Window]:
    windows = list(tile(START, START.add(hours=count), pendulum.duration(hours=1)))
    assert len(windows) == count
    return windows


def row_ids(k: int, pages: int) -> list[str]:
    return [f"w{k}-p{p}-r{r}" for p in range(pages) for r in range(ROWS_PER_PAGE)]


def page_body(window: Window, k: int, p: int, last: bool) -> bytes:
    records = [
        {
            "id": f"w{k}-p{p}-r{r}",
            "stoppedAt": format_rfc3339(window.start.add(minutes=p, seconds=r)),
            "projectId": PROJECT,
        }
        for r in range(ROWS_PER_PAGE)
    ]
    return json.dumps({"records": records, "pagination": {"nextToken": "" if last else f"t{p + 1}"}}).encode()


class FakeClient:
    """What WindowFetcher uses of a UsageClient: `.limit.limit` and `.raw_pages(window, project)`.

    Window `k` (its index in `windows`) runs `work(k)` and then returns `pages(k)` pages.
    """

    def __init__(
        self,
        windows: list[Window],
        limit: Any,
        *,
        work: Callable[[int], None] = lambda k: None,
        pages: Callable[[int], int] = lambda k: 1,
        on_start: Callable[[int], None] = lambda k: None,
    ) -> None:
        self.limit = limit
        self.windows = windows
        self.index = {window: k for k, window in enumerate(windows)}
        self.work, self.pages, self.on_start = work, pages, on_start
        self.cond = threading.Condition()
        self.started: list[int] = []
        self.finished: list[int] = []
        self.running = 0
        self.most = 0
        self.running_at_start: dict[int, int] = {}
        self.projects: set[str | None] = set()

    def raw_pages(self, window: Window, project_id: str | None = None) -> list[bytes]:
        k = self.index[window]
        with self.cond:
            self.started.append(k)
            self.running += 1
            self.most = max(self.most, self.running)
            self.running_at_start[k] = self.running
            self.projects.add(project_id)
            self.on_start(k)
            self.cond.notify_all()
        try:
            self.work(k)
        finally:
            with self.cond:
                self.running -= 1
                self.finished.append(k)
                self.cond.notify_all()
        count = self.pages(k)
        return [page_body(window, k, p, p == count - 1) for p in range(count)]

    def wait_for(self, predicate: Callable[[], bool], what: str) -> None:
        with self.cond:
            ok = self.cond.wait_for(predicate, WAIT)
            assert ok, f"timed out waiting for {what}: started={self.started} finished={self.finished}"

    def snapshot(self) -> tuple[list[int], int]:
        with self.cond:
            return list(self.started), self.running


class Gates:
    """One event per window that its `work` waits on; opened all at once on leaving the block."""

    def __init__(self, count: int) -> None:
        self.events = [threading.Event() for _ in range(count)]

    def wait(self, k: int) -> None:
        assert self.events[k].wait(WAIT), f"window {k} was never let through"

    def open(self, *ks: int) -> None:
        for k in ks:
            self.events[k].set()

    def __enter__(self) -> Gates:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for event in self.events:
            event.set()


def call(fn: Callable[[], Any], timeout: float = WAIT) -> Any:
    """`fn()` on a helper thread: its result or exception, or a failure if it blocks."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"still blocked after {timeout}s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def take(fetcher: WindowFetcher, client: FakeClient, k: int) -> tuple[Window, int, pa.Table]:
    """The k-th `next()`, called once window k has started.

    Not before, so that these tests check order and limits, not timing; the race between a
    `next()` and the window after it is tested on its own at the end.
    """
    client.wait_for(lambda: k in client.started, f"window {k} to start")
    return call(fetcher.next)


def assert_window(result: tuple[Window, int, pa.Table], windows: list[Window], k: int, pages: int) -> None:
    window, page_count, table = result
    assert (window, page_count) == (windows[k], pages)
    assert table.column("id").to_pylist() == row_ids(k, pages)
    assert set(table.column("project_id").to_pylist()) == {PROJECT}
    stopped = table.column("stopped_at").to_pylist()
    assert all(window.start <= moment < window.end for moment in stopped)


@pytest.fixture(autouse=True)
def no_threads_left_behind() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        left = [t for t in set(threading.enumerate()) - before if t.name.startswith("ona-window") and t.is_alive()]
        if not left:
            return
        time.sleep(0.01)
    raise AssertionError(f"pool threads still alive after the fetcher closed: {left}")


# -- order -------------------------------------------------------------------------------------


def test_windows_come_out_in_order_though_later_ones_finish_first() -> None:
    count = 6
    windows = hours(count)
    done = [threading.Event() for _ in range(count)]

    def work(k: int) -> None:
        # Window k finishes only after window k + 1 has: they finish last to first.
        try:
            if k + 1 < count:
                assert done[k + 1].wait(WAIT), f"window {k + 1} never finished"
        finally:
            done[k].set()

    client = FakeClient(windows, SimpleNamespace(limit=count), work=work, pages=lambda k: k % 3 + 1)
    with WindowFetcher(client, windows, PROJECT, workers=count) as fetcher:  # type: ignore[arg-type]
        results = [take(fetcher, client, k) for k in range(count)]
    assert client.finished == list(reversed(range(count)))
    for k, result in enumerate(results):
        assert_window(result, windows, k, pages=k % 3 + 1)
    assert client.projects == {PROJECT}


def test_a_window_without_pages_comes_out_as_an_empty_table() -> None:
    windows = hours(3)
    client = FakeClient(windows, SimpleNamespace(limit=2), pages=lambda k: 0 if k == 1 else 2)
    with WindowFetcher(client, windows, None, workers=2) as fetcher:  # type: ignore[arg-type]
        results = [take(fetcher, client, k) for k in range(3)]
    assert_window(results[0], windows, 0, pages=2)
    assert results[1][:2] == (windows[1], 0) and results[1][2].num_rows == 0
    assert_window(results[2], windows, 2, pages=2)
    assert client.projects == {None}


# -- how many at once --------------------------------------------------------------------------


@pytest.mark.parametrize(("limit", "workers"), [(1, 8), (3, 8), (100, 3)])
def test_never_more_windows_run_at_once_than_the_limit_or_the_workers(limit: int, workers: int) -> None:
    count = 12
    most = min(limit, workers)
    windows = hours(count)
    hold = threading.Event()

    def work(k: int) -> None:
        if k < most:
            assert hold.wait(WAIT), "the first windows were never let go"
        else:
            time.sleep(0.002)  # a little overlap for a window beyond the limit to show up in

    client = FakeClient(windows, AdaptiveLimit(limit, start=limit), work=work)
    try:
        with WindowFetcher(client, windows, None, workers) as fetcher:  # type: ignore[arg-type]
            # The first `most` run at once (all the places used) ...
            client.wait_for(lambda: client.running == most, f"{most} windows running at once")
            time.sleep(QUIET)  # ... and, while they hold their places, nothing else starts.
            started, running = client.snapshot()
            assert (sorted(started), running) == (list(range(most)), most)
            hold.set()
            results = [take(fetcher, client, k) for k in range(count)]
    finally:
        hold.set()
    assert [window for window, _, _ in results] == windows
    assert client.most == most
    assert max(client.running_at_start.values()) == most


def test_raising_the_limit_lets_more_run_and_lowering_it_starts_none_beyond_the_new_limit() -> None:
    count = 10
    windows = hours(count)
    limit = SimpleNamespace(limit=1)
    with Gates(count) as gates:
        client = FakeClient(windows, limit, work=gates.wait)
        with WindowFetcher(client, windows, None, workers=8) as fetcher:  # type: ignore[arg-type]
            client.wait_for(lambda: client.started == [0], "window 0 to start")
            time.sleep(QUIET)
            assert client.snapshot() == ([0], 1)

            # Raised to 4: when window 0 finishes, four run at once.
            limit.limit = 4
            gates.open(0)
            client.wait_for(lambda: len(client.started) == 5 and client.running == 4, "windows 1-4 to run")
            assert sorted(client.started) == [0, 1, 2, 3, 4]
            assert client.most == 4

            # Lowered to 2 with 4 running: two finishing leaves 2 running, so none starts ...
            limit.limit = 2
            gates.open(1, 2)
            client.wait_for(lambda: {1, 2} <= set(client.finished), "windows 1 and 2 to finish")
            time.sleep(QUIET)
            started, running = client.snapshot()
            assert (len(started), running) == (5, 2)
            # ... and one more finishing makes room for exactly one.
            gates.open(3)
            client.wait_for(lambda: 5 in client.started, "window 5 to start")
            time.sleep(QUIET)
            started, running = client.snapshot()
            assert (len(started), started[-1], running) == (6, 5, 2)
            assert client.running_at_start[5] == 2

            gates.open(*range(count))
            results = [take(fetcher, client, k) for k in range(count)]
    assert [window for window, _, _ in results] == windows
    assert max(client.running_at_start[k] for k in range(5, count)) <= 2


def wait_until(predicate: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_a_limit_raised_while_a_window_pages_starts_more_windows_before_it_ends() -> None:
    """The client raises its limit as soon as it has timed a few requests, which happens inside
    the first windows: waiting for one of them to end would run a long first round at the
    starting limit (about 2 s of a year's sync at 100 ms a request)."""
    windows = hours(6)
    limit = SimpleNamespace(limit=1)
    timed, first_page_read, second_page = threading.Event(), threading.Event(), threading.Event()
    started: list[int] = []

    class PagingClient:
        def __init__(self) -> None:
            self.limit = limit

        def raw_pages(self, window: Window, project_id: str | None = None) -> Iterator[bytes]:
            k = windows.index(window)
            started.append(k)
            if k:
                yield page_body(window, k, 0, True)
                return
            assert timed.wait(WAIT)
            limit.limit = 4  # what the client does after timing this window's first request
            yield page_body(window, k, 0, False)
            first_page_read.set()
            assert second_page.wait(WAIT), "window 0's second page was never let through"
            yield page_body(window, k, 1, True)

    with WindowFetcher(PagingClient(), windows, None, workers=8) as fetcher:  # type: ignore[arg-type]
        try:
            wait_until(lambda: started == [0])
            time.sleep(QUIET)
            assert started == [0]  # the limit is 1
            timed.set()
            assert first_page_read.wait(WAIT)
            # Windows 1-5 start (and end: one page each), 4 at most at once, while window 0 pages on.
            wait_until(lambda: len(started) == len(windows))
            assert sorted(started) == list(range(len(windows)))
        finally:
            second_page.set()
        results = [call(fetcher.next) for _ in windows]
    assert [(window, pages) for window, pages, _ in results] == [(w, 2 if k == 0 else 1) for k, w in enumerate(windows)]


# -- lookahead ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("workers", "lookahead", "expected"),
    [
        pytest.param(2, 0, 4, id="default-is-twice-the-workers"),
        pytest.param(2, 5, 5, id="larger-lookahead"),
        pytest.param(3, 2, 6, id="never-below-twice-the-workers"),
    ],
)
def test_never_more_windows_fetched_ahead_than_the_lookahead(workers: int, lookahead: int, expected: int) -> None:
    count = 20
    windows = hours(count)
    consumed = 0
    ahead: list[int] = []

    def on_start(k: int) -> None:  # under the client's lock
        ahead.append(len(client.started) - consumed)

    client = FakeClient(windows, SimpleNamespace(limit=8), on_start=on_start)
    with WindowFetcher(client, windows, None, workers, lookahead=lookahead) as fetcher:  # type: ignore[arg-type]
        client.wait_for(lambda: len(client.finished) == expected, f"the first {expected} windows")
        time.sleep(QUIET)  # all done and none taken: the fetcher waits for the consumer
        assert client.snapshot() == (list(range(expected)), 0)
        for k in range(count):
            with client.cond:
                consumed += 1  # counted before `next()` takes the window, so never late
            window, _, _ = take(fetcher, client, k)
            assert window == windows[k]
            # Each window taken makes room for exactly one more.
            want = min(count, expected + k + 1)
            client.wait_for(lambda: len(client.finished) == want, f"{want} windows fetched")
    assert client.started == list(range(count))
    assert max(ahead) == expected


@pytest.mark.parametrize("workers", [1, 3])
def test_no_window_starts_once_those_waiting_hold_max_rows(workers: int) -> None:
    """However many rows a window holds, what waits to be taken stays under `max_rows` plus
    what was already running when that bound was reached."""
    count, pages, max_rows = 12, 3, 10  # 6 rows a window
    per_window = pages * ROWS_PER_PAGE
    windows = hours(count)
    client = FakeClient(windows, SimpleNamespace(limit=8), pages=lambda k: pages)
    with WindowFetcher(client, windows, None, workers, lookahead=count, max_rows=max_rows) as fetcher:  # type: ignore[arg-type]
        for k in range(count):
            # quiet: all started windows are done, and nothing more starts
            client.wait_for(lambda: client.running == 0 and len(client.finished) == len(client.started), "a quiet fetcher")
            time.sleep(QUIET)
            started, running = client.snapshot()
            waiting = (len(started) - k) * per_window
            assert running == 0 and started == list(range(len(started)))
            assert waiting < max_rows + workers * per_window, (k, started)
            assert waiting >= max_rows or len(started) == count, (k, started)  # and not stalled below it
            if workers == 1:  # one at a time: exactly as many windows as reach the bound
                assert waiting == min(2 * per_window, (count - k) * per_window), (k, started)
            assert_window(call(fetcher.next), windows, k, pages)
    assert client.started == list(range(count))


class PagingClient(FakeClient):
    """Serves each window's pages one by one, as the API does, counting the pages each has read."""

    def __init__(self, windows: list[Window], limit: Any, pages: int, hold: tuple[int, int, threading.Event] | None = None) -> None:
        super().__init__(windows, limit)
        self.count = pages
        self.served = [0] * len(windows)
        self.hold = hold  # (window, page, event): that window stops before that page until the event is set

    def raw_pages(self, window: Window, project_id: str | None = None) -> Iterator[bytes]:  # type: ignore[override]
        k = self.index[window]
        for p in range(self.count):
            if self.hold and self.hold[:2] == (k, p):
                assert self.hold[2].wait(WAIT)
            with self.cond:
                self.served[k] += 1
                self.cond.notify_all()
            yield page_body(window, k, p, p == self.count - 1)

    def quiet(self) -> list[int]:
        """The pages each window has read, once no window reads any more."""
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            with self.cond:
                before = list(self.served)
            time.sleep(QUIET)
            with self.cond:
                if self.served == before:
                    return before
        raise AssertionError(f"the windows never stopped paging: {self.served}")


def test_windows_behind_the_first_stop_paging_while_the_rows_held_reach_max_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """A dense window does not hold its whole day in memory: the windows behind the one `next()`
    waits for pause between pages once the rows held reach `max_rows`, and go on as room is made."""
    monkeypatch.setattr(WindowFetcher, "DECODE_PAGES", 5)  # 10 rows per decode
    count, pages, max_rows, workers = 4, 40, 30, 4  # 80 rows a window
    windows = hours(count)
    client = PagingClient(windows, SimpleNamespace(limit=8), pages)

    with WindowFetcher(client, windows, None, workers, lookahead=count, max_rows=max_rows) as fetcher:  # type: ignore[arg-type]
        for k in range(count):
            served = client.quiet()
            behind = served[k + 1 :]
            assert all(n < pages for n in behind), served  # the others paused part-way ...
            held = sum(min(n, pages) for n in behind) * ROWS_PER_PAGE
            assert held < max_rows + workers * WindowFetcher.DECODE_PAGES * ROWS_PER_PAGE, served  # ... near the bound
            assert_window(call(fetcher.next), windows, k, pages)  # the window `next()` waits for never waits
    assert client.served == [pages] * count


def test_the_window_next_waits_for_reads_on_though_the_rows_held_reach_max_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Taken while it is still paging and the others have filled the room, the first window
    goes on to its end: it is what frees the room."""
    monkeypatch.setattr(WindowFetcher, "DECODE_PAGES", 5)
    count, pages, max_rows = 3, 40, 30
    windows = hours(count)
    release = threading.Event()
    client = PagingClient(windows, SimpleNamespace(limit=8), pages, hold=(0, 12, release))
    with WindowFetcher(client, windows, None, 3, lookahead=count, max_rows=max_rows) as fetcher:  # type: ignore[arg-type]
        served = client.quiet()
        assert all(n < pages for n in served), served  # the room is full: all wait, window 0 at the latest at page 12
        taking = ThreadPoolExecutor(1).submit(fetcher.next)
        time.sleep(QUIET)  # `next()` now waits for window 0, which is held mid-window
        release.set()
        assert_window(taking.result(WAIT), windows, 0, pages)
        for k in range(1, count):
            assert_window(call(fetcher.next), windows, k, pages)


# -- failures ----------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [1, 8])
def test_a_failed_window_raises_from_its_own_next_and_the_others_come_out_normally(limit: int) -> None:
    count, bad = 6, 3
    windows = hours(count)
    failed = threading.Event()

    def work(k: int) -> None:
        if k == bad:
            failed.set()
            raise RuntimeError(f"boom in window {k}")
        if k < bad and limit > bad:
            # The windows before it finish only after it failed: its error is ready first.
            assert failed.wait(WAIT), "the bad window never ran"

    client = FakeClient(windows, SimpleNamespace(limit=limit), work=work, pages=lambda k: 2)
    with WindowFetcher(client, windows, None, workers=8) as fetcher:  # type: ignore[arg-type]
        for k in range(bad):
            assert_window(take(fetcher, client, k), windows, k, pages=2)
        with pytest.raises(RuntimeError, match=f"boom in window {bad}"):
            take(fetcher, client, bad)
        # The failed window gave its place back: the rest still come (with limit 1 too).
        for k in range(bad + 1, count):
            assert_window(take(fetcher, client, k), windows, k, pages=2)
    assert sorted(client.started) == list(range(count))


# -- close -------------------------------------------------------------------------------------


def test_close_waits_only_for_the_running_windows_and_starts_no_other() -> None:
    count = 10
    windows = hours(count)
    with Gates(count) as gates:

        def work(k: int) -> None:
            if k < 2:
                gates.wait(k)
            else:
                time.sleep(0.3)  # were they run, close() would be slow

        client = FakeClient(windows, SimpleNamespace(limit=2), work=work)
        fetcher = WindowFetcher(client, windows, None, workers=2)  # type: ignore[arg-type]
        client.wait_for(lambda: client.running == 2, "windows 0 and 1 to run")
        closing = threading.Event()

        def let_the_running_ones_finish() -> None:
            closing.wait(WAIT)
            time.sleep(0.2)  # close() has long given up the windows it had not started
            gates.open(0, 1)

        opener = threading.Thread(target=let_the_running_ones_finish, daemon=True)
        opener.start()
        began = time.monotonic()
        closing.set()
        call(fetcher.close)
        took = time.monotonic() - began
        opener.join(WAIT)
    assert sorted(client.started) == [0, 1]
    assert sorted(client.finished) == [0, 1]
    assert took < 1.0, f"close() took {took:.2f}s"


def test_close_with_windows_fetched_ahead_returns_at_once_and_fetches_no_more() -> None:
    count = 20
    windows = hours(count)
    client = FakeClient(windows, SimpleNamespace(limit=2))
    fetcher = WindowFetcher(client, windows, None, workers=2)  # type: ignore[arg-type]
    assert take(fetcher, client, 0)[0] == windows[0]
    client.wait_for(lambda: len(client.finished) == 5, "the lookahead of 4 to refill")
    began = time.monotonic()
    call(fetcher.close)
    took = time.monotonic() - began
    time.sleep(QUIET)
    assert client.snapshot() == (list(range(5)), 0)
    assert took < 1.0, f"close() took {took:.2f}s"


def test_leaving_the_with_block_early_closes_the_fetcher() -> None:
    count = 20
    windows = hours(count)
    client = FakeClient(windows, SimpleNamespace(limit=2))
    with pytest.raises(KeyError):
        with WindowFetcher(client, windows, None, workers=2) as fetcher:  # type: ignore[arg-type]
            take(fetcher, client, 0)
            raise KeyError("the load failed")
    time.sleep(QUIET)
    started, running = client.snapshot()
    assert running == 0 and len(started) <= 5  # what was in flight, never the rest


# -- a race once found: the next window submitted only after the last one's result was out ------


def test_next_right_after_the_only_window_was_taken_gets_the_next_window(monkeypatch: pytest.MonkeyPatch) -> None:
    tried = threading.Event()
    first = threading.Event()
    go = threading.Event()

    class LateCallbacks(ThreadPoolExecutor):
        """Runs a callback of its own before the fetcher's: the first window's result is out,
        and the fetcher's callback held back until the consumer has asked for the next."""

        def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
            future = super().submit(fn, *args, **kwargs)
            if not first.is_set():
                first.set()
                future.add_done_callback(lambda _: tried.wait(0.5))
            return future

    monkeypatch.setattr(source, "ThreadPoolExecutor", LateCallbacks)
    windows = hours(2)
    client = FakeClient(windows, SimpleNamespace(limit=1), work=lambda k: go.wait(WAIT))
    with WindowFetcher(client, windows, None, workers=1) as fetcher:  # type: ignore[arg-type]
        go.set()
        assert call(fetcher.next)[0] == windows[0]
        try:
            second = call(fetcher.next)  # in the real sync, dlt's loop asks right away too
        finally:
            tried.set()
        assert second[0] == windows[1]


# -- loads that end early ------------------------------------------------------------------------


def test_a_load_ends_early_once_every_window_left_is_in_flight_and_the_next_is_not_there() -> None:
    """With `early_rows`, a load that holds that many commits while the last windows arrive,
    instead of after them; with fewer, or with the next window there, it takes on."""
    windows = hours(6)  # 2 rows each (one page)
    with Gates(len(windows)) as gates:
        client = FakeClient(windows, SimpleNamespace(limit=8), work=gates.wait)
        with WindowFetcher(client, windows, None, workers=8) as fetcher:  # type: ignore[arg-type]
            feed = source.Feed(windows, fetcher, fetched_at=START, organization_id="org", early_rows=4)
            client.wait_for(lambda: len(client.started) == 6, "every window to start")
            gates.open(0, 1)
            # Window 0 alone (2 rows) is below early_rows, so the load waits for window 1; with it,
            # it holds 4, and every window left is in flight: it ends.
            first = call(lambda: [window for window, _, _ in feed.next_load()])
            assert first == windows[:2]
            assert not feed.last
            gates.open(2, 3, 4, 5)
            rest = []
            while not feed.last:
                rest += call(lambda: [window for window, _, _ in feed.next_load()])
            assert rest == windows[2:]


def test_without_early_rows_a_load_waits_for_the_windows_in_flight() -> None:
    windows = hours(4)
    with Gates(len(windows)) as gates:
        client = FakeClient(windows, SimpleNamespace(limit=8), work=gates.wait)
        with WindowFetcher(client, windows, None, workers=8) as fetcher:  # type: ignore[arg-type]
            feed = source.Feed(windows, fetcher, fetched_at=START, organization_id="org")
            client.wait_for(lambda: len(client.started) == 4, "every window to start")
            gates.open(0, 1)
            threading.Timer(QUIET, gates.open, (2, 3)).start()
            assert call(lambda: [window for window, _, _ in feed.next_load()]) == windows
            assert feed.last
