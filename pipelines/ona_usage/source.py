"""The dlt source `ona_usage` and its resource `environment_usage_records`.

The resource keeps dlt's incremental cursor on `stopped_at` (the newest `stoppedAt` loaded) and,
beside it in the resource state, `fetched_through`: the end of the last window a committed run
fetched (and `fetched_at`, when). A scheduled run asks the API for the range from there, less
the lookback where late records may still appear, to now (see `resume_point`), in windows of at most a day, fetches several windows at once, and
yields one Arrow table per window. Rows are merged on `id`, so a record read twice ends up once
with its latest values. The state is committed with the data, in the destination, so a failed
run moves neither and a run on a fresh machine resumes from there.

A command can run its range as several loads (chunks), each committing its windows; the
caller plans them (`pipeline.py`) and one `WindowFetcher` fetches ahead across them. A backfill (`end_date` set) uses dlt's stateless `end_value` mode: the scheduled cursor
does not move, and the backfill's own progress is kept under `backfills` in the resource state.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Optional

import dlt
import pendulum
import pyarrow as pa
from dlt.extract.resource import DltResource

from ona_usage import settings
from ona_usage.client import UsageClient
from ona_usage.records import COLUMNS, first_of_each_id, from_pages
from ona_usage.windows import Window, format_rfc3339, parse_duration, parse_window_size, tile, to_utc

RESOURCE_NAME = "environment_usage_records"
CURSOR_COLUMN = "stopped_at"
BATCH_ROWS = 50_000


class ExtractStats:
    """What runs fetched, for progress and the summary; shared by the chunks of one command."""

    def __init__(self, on_window: Callable[[ExtractStats, Window, int], None] | None = None) -> None:
        self.on_window = on_window
        self.windows_total = 0
        self.windows_done = 0
        self.pages = 0
        self.records = 0
        self.retries: Callable[[], int] = lambda: 0  # the client's retry count, once there is a client

    def window_done(self, window: Window, pages: int, records: int) -> None:
        self.windows_done += 1
        self.pages += pages
        self.records += records
        if self.on_window:
            self.on_window(self, window, records)


def resume_point(
    lagged_start: pendulum.DateTime,
    fetched_through: Any,
    fetched_at: Any,
    lookback: pendulum.Duration,
) -> pendulum.DateTime:
    """Where a scheduled run starts: the end of what was fetched, less what may have been late.

    A record can show up in the API a while after it stopped (ingestion lag), so a window is
    only final once it ended more than `lookback` before it was fetched. The next run starts
    at the end of the last committed run, or `lookback` before the moment that run fetched,
    whichever is earlier: right after the previous chunk during a long catch-up, and
    `lookback` before the end of the previous run on a schedule. `lagged_start` is dlt's
    `cursor - lookback` (never before the first run's start date), the floor.
    """
    if fetched_through is None:
        return lagged_start
    settled = to_utc(fetched_at or fetched_through) - lookback
    return max(lagged_start, min(to_utc(fetched_through), settled))


def backfill_key(start: pendulum.DateTime, end: pendulum.DateTime, project_id: str | None) -> str:
    return f"{format_rfc3339(start)}/{format_rfc3339(end)}/{project_id or '*'}"


@dlt.source(name="ona_usage", max_table_nesting=0)
def ona_usage(
    api_key: Optional[str] = dlt.secrets.value,
    base_url: str = settings.DEFAULT_BASE_URL,
    start_date: Optional[str] = None,
    end_date: Optional[str] = None,
    project_id: Optional[str] = None,
    window: str = settings.DEFAULT_WINDOW,
    lookback: str = settings.DEFAULT_LOOKBACK,
    page_size: int = settings.DEFAULT_PAGE_SIZE,
    workers: int = settings.DEFAULT_WORKERS,
    allow_insecure_http: bool = False,
    client: Optional[UsageClient] = None,
    stats: Optional[ExtractStats] = None,
    chunk: Optional[Chunk] = None,
    backfill: Optional[str] = None,
) -> DltResource:
    """Ona environment usage records, merged on `id`, with an incremental cursor on `stopped_at`.

    Args:
        api_key: Ona API key (personal access token). Falls back to `ONA_API_KEY`, then
            `GITPOD_API_KEY`.
        base_url: API base URL, `https://app.gitpod.io/api` or `https://app.ona.com/api`.
        start_date: Where the first run starts (ISO date or datetime, UTC); later runs resume
            from the state. Defaults to 30 days before the first run.
        end_date: Exclusive end of a one-off backfill of `[start_date, end_date)`; such a run
            leaves the scheduled cursor alone.
        project_id: Only records of this project.
        window: Size of each request's date range: at most `1d`, e.g. `6h`.
        lookback: How much of the last run's range each run reads again, to catch late records.
        page_size: Records per page, 1 to 100.
        workers: At most this many windows fetched at once (see `concurrency.py`).
        allow_insecure_http: Allow a plain `http://` base URL that is not loopback.
        client: An existing client to use instead of `api_key`, `base_url` and `page_size`.
        stats: Counters the caller reads for progress and the run's summary.
        chunk: The windows of this load, planned by the caller (`pipeline.py`), which runs a
            command's range as several loads; without it the run plans its own range.
        backfill: The key under which a backfill records its progress (see `backfill_key`).
    """
    if client is None:
        key = api_key or settings.api_key_from_env()
        if not key:
            raise ValueError(settings.MISSING_KEY_MESSAGE)
        client = UsageClient(
            key, base_url, page_size=page_size, allow_insecure_http=allow_insecure_http, concurrency=workers
        )
    return usage_records(
        client,
        start_date=to_utc(start_date) if start_date else settings.default_start_date(),
        end_date=to_utc(end_date) if end_date else None,
        project_id=project_id,
        window_size=parse_window_size(window),
        lookback=parse_duration(lookback, name="lookback"),
        workers=workers,
        stats=stats,
        chunk=chunk,
        backfill=backfill,
    )


def usage_records(
    client: UsageClient,
    *,
    start_date: pendulum.DateTime,
    end_date: pendulum.DateTime | None = None,
    project_id: str | None = None,
    window_size: pendulum.Duration = pendulum.duration(days=1),
    lookback: pendulum.Duration = pendulum.duration(hours=2),
    workers: int = settings.DEFAULT_WORKERS,
    stats: ExtractStats | None = None,
    chunk: Chunk | None = None,
    backfill: str | None = None,
) -> DltResource:
    """The resource over an existing client, so the caller can read the client's counters."""
    stats = stats if stats is not None else ExtractStats()

    @dlt.resource(
        name=RESOURCE_NAME,
        # Each load's rows are unique by `id` (`first_of_each_id`), which spares the warehouse a
        # window function over every load's rows; `id`s already in the table are replaced.
        write_disposition={"disposition": "merge", "deduplicated": True},
        primary_key="id",
        columns=COLUMNS,
    )
    def environment_usage_records(
        stopped_at: dlt.sources.incremental[pendulum.DateTime] = dlt.sources.incremental(
            CURSOR_COLUMN,
            initial_value=start_date,
            end_value=end_date,
            lag=lookback.total_seconds() or None,
            range_start="closed",
            range_end="open",
            # Rows are merged on `id`, so dlt's boundary de-duplication is redundant work.
            primary_key=(),
        ),
    ) -> Iterator[pa.Table]:
        state = dlt.current.resource_state()
        plan = chunk
        if plan is None:  # used on its own: plan the whole range as one load
            plan = _plan_alone(client, to_utc(stopped_at.start_value), state, end_date, window_size, lookback, project_id, workers)
        try:
            batch: list[pa.Table] = []
            seen: set[str] = set()
            for _ in plan.windows:
                window, pages, table = plan.fetcher.next()
                stats.window_done(window, pages, table.num_rows)
                table = first_of_each_id(table, seen)
                if table.num_rows:
                    batch.append(table)
                # dlt writes each item it gets as Parquet: a few large tables beat many small ones.
                if sum(t.num_rows for t in batch) >= BATCH_ROWS:
                    yield pa.concat_tables(batch)
                    batch = []
            if batch:
                yield pa.concat_tables(batch)
        finally:
            if chunk is None:
                plan.fetcher.close()
        # Reached only when every window was fetched; committed with the rows, or not at all.
        if not plan.windows:
            return
        through = plan.windows[-1].end
        if backfill:
            state.setdefault("backfills", {})[backfill] = {
                "through": through,
                "done": plan.last,
                "updated_at": pendulum.now("UTC"),
            }
        elif end_date is None:
            state["fetched_through"], state["fetched_at"] = through, plan.fetched_at

    return environment_usage_records


def _plan_alone(
    client: UsageClient,
    lagged_start: pendulum.DateTime,
    state: dict[str, Any],
    end_date: pendulum.DateTime | None,
    window_size: pendulum.Duration,
    lookback: pendulum.Duration,
    project_id: str | None,
    workers: int,
) -> Chunk:
    now = pendulum.now("UTC")
    if end_date is None:
        start, end = resume_point(lagged_start, state.get("fetched_through"), state.get("fetched_at"), lookback), now
    else:
        start, end = lagged_start, end_date
    windows = list(tile(start, end, window_size))
    return Chunk(windows, WindowFetcher(client, windows, project_id, workers), last=True, fetched_at=now)


class Chunk:
    """The windows one load fetches, taken in order from a fetcher shared by all the loads."""

    def __init__(self, windows: list[Window], fetcher: WindowFetcher, *, last: bool, fetched_at: pendulum.DateTime):
        self.windows = windows
        self.fetcher = fetcher
        self.last = last
        self.fetched_at = fetched_at


class WindowFetcher:
    """Fetches planned windows concurrently and hands them out in order.

    It keeps up to `lookahead` windows (at least `2 * workers`) in flight or ready, also while
    dlt normalizes and loads the previous chunk, so the API is not idle while the warehouse
    works; a chunk's worth of lookahead keeps both busy. Of those, it runs at most as many at
    once as the client's adaptive limit allows (see `concurrency.py`), up to `workers`.
    """

    def __init__(
        self, client: UsageClient, windows: list[Window], project_id: str | None, workers: int, lookahead: int = 0
    ) -> None:
        self._client = client
        self._project_id = project_id
        self._todo = iter(windows)
        self._workers = max(workers, 1)
        self._lookahead = max(2 * self._workers, lookahead)
        self._pool = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="ona-window")
        self._pending: deque[Future[tuple[Window, int, pa.Table]]] = deque()
        self._running = 0
        self._lock = threading.Lock()  # `_fill` runs on the consumer thread and on the workers
        self._fill()

    def __enter__(self) -> WindowFetcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def next(self) -> tuple[Window, int, pa.Table]:
        """The next window's page count and table; raises what fetching it raised."""
        with self._lock:
            future = self._pending.popleft()
        self._fill()
        return future.result()

    def close(self) -> None:
        with self._lock:
            self._todo = iter(())
            for future in self._pending:
                future.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _fill(self) -> None:
        with self._lock:
            while len(self._pending) < self._lookahead and self._running < min(self._client.limit.limit, self._workers):
                window = next(self._todo, None)
                if window is None:
                    return
                self._running += 1
                self._pending.append(self._pool.submit(self._fetch, window))

    def _fetch(self, window: Window) -> tuple[Window, int, pa.Table]:
        try:
            pages = list(self._client.raw_pages(window, self._project_id))
            return window, len(pages), from_pages(pages, window)
        finally:
            # Before the result is set, not in a done callback: `next()` may be waiting on this
            # window, and must find the following one already submitted when it returns.
            with self._lock:
                self._running -= 1
            self._fill()
