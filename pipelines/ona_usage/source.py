"""The dlt source `ona_usage`: usage records, and the names of the ids in them.

`environment_usage_records` keeps dlt's incremental cursor on `stopped_at` and, beside it in the
resource state, `fetched_through` (the end of the last window a committed run fetched) and
`fetched_at` (when). A run asks the API for the windows `windows.plan` gives (from there, less
the lookback where late records may still appear, to now), fetches several at once, and yields
one Arrow table per batch of windows. Rows are merged on `id`, so a record read twice ends up
once with its latest values. dlt commits the state with the rows, in the destination, so a
failed run moves neither and a run on a fresh machine resumes from there.

A backfill (`end_date` set) uses dlt's stateless `end_value` mode: the scheduled cursor does not
move, and the backfill's own progress is kept under `backfills` in the resource state.

`ona-usage sync` runs the very same resources, a chunk of windows per load (`pipeline.py`):
`usage_records` then takes its windows from a `Feed` the runner shares across the chunks.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import date, datetime
from typing import Any, Optional

import dlt
import pendulum
import pyarrow as pa
from dlt.common.runtime import signals
from dlt.common.schema import Schema
from dlt.extract.resource import DltResource
from dlt.extract.source import DltSource

from ona_usage import settings
from ona_usage.client import UsageClient, make_client
from ona_usage.names import name_resources, rate_card_resource
from ona_usage.records import COLUMNS, first_of_each_id, from_pages, with_organization
from ona_usage.settings import Settings
from ona_usage.state import CURSOR_COLUMN, RESOURCE_NAME, SOURCE_NAME, SyncState, backfill_key
from ona_usage.windows import Window, plan

logger = logging.getLogger(__name__)

BATCH_ROWS = 50_000  # dlt writes each item as Parquet: a few large tables beat many small ones


@dlt.source(name=SOURCE_NAME, max_table_nesting=0)
def ona_usage(
    api_key: Optional[str] = dlt.secrets.value,
    base_url: Optional[str] = None,
    start_date: Optional[str] = None,
    end_date: Optional[str] = None,
    project_id: Optional[str] = None,
    window: str = settings.DEFAULT_WINDOW,
    lookback: str = settings.DEFAULT_LOOKBACK,
    page_size: int = settings.DEFAULT_PAGE_SIZE,
    workers: int = settings.DEFAULT_WORKERS,
) -> list[DltResource]:
    """Ona environment usage records, merged on `id` with a cursor on `stopped_at`, and their names.

    Resources: `environment_usage_records` (each row with the key's `organization_id`), the lists
    `projects`, `environment_classes`, `runners` and `members`, and `rate_card` where one is
    configured. Every argument can also come from `[sources.ona_usage]` in dlt's config, or
    `SOURCES__ONA_USAGE__<NAME>`; so can `timeout`, `max_attempts`, `backoff`, `names`,
    `rate_card`, `rate_card_file`, `credit_price` and `currency`, exactly as for `ona-usage sync`.

    Args:
        api_key: Ona API key (personal access token). Falls back to `ONA_API_KEY`, then
            `GITPOD_API_KEY`.
        base_url: API base URL; defaults to `ONA_BASE_URL`, else `https://app.ona.com/api`.
        start_date: Where the first run starts (ISO date or datetime, UTC); later runs resume
            from the state. Defaults to 30 days before the first run.
        end_date: Exclusive end of a one-off backfill of `[start_date, end_date)`; such a run
            leaves the scheduled cursor alone and resumes after its last committed load.
        project_id: Only records of this project.
        window: Size of each request's date range, dividing a day evenly: `1d`, `12h`, ... `1h`.
        lookback: How much of the last run's range each run reads again, to catch late records.
        page_size: Records per page, 1 to 100.
        workers: At most this many windows fetched at once.
    """
    config = settings.resolve(
        {
            "api_key": api_key,
            "base_url": base_url,
            "start_date": _text(start_date),
            "project_id": project_id,
            "window": window,
            "lookback": lookback,
            "page_size": page_size,
            "workers": workers,
        }
    )
    config.require_api_key()
    _rows_carry_their_load_id()
    backfill = settings.parse_range(_text(start_date), _text(end_date)) if end_date is not None else None
    resources = [usage_records(config, backfill)]
    if config.names:
        resources += name_resources(config)
    if config.rate_card:
        resources.append(rate_card_resource(config))
    return resources


def source_of(resources: list[DltResource]) -> DltSource:
    """Resources of this module as the `ona_usage` source: its schema and its place in the state."""
    _rows_carry_their_load_id()
    source = DltSource(Schema(SOURCE_NAME), SOURCE_NAME, resources)
    source.max_table_nesting = 0
    return source


def _rows_carry_their_load_id() -> None:
    """Arrow tables skip dlt's row normalizer, which adds `_dlt_load_id`; ask for it, so every
    row says which load wrote it (and `status` can count the last load's rows)."""
    dlt.config["normalize.parquet_normalizer.add_dlt_load_id"] = True


class ExtractStats:
    """What was fetched, for progress and the summary; shared by the chunks of one command."""

    def __init__(self, on_window: Callable[[ExtractStats, Window, int], None] | None = None) -> None:
        self.on_window = on_window
        self.windows_total = 0
        self.windows_done = 0
        self.pages = 0
        self.records = 0
        self.retries: Callable[[], int] = lambda: 0  # the client's retry count, once there is a client
        self.chunks_committed = 0
        self.committed_through: pendulum.DateTime | None = None  # the end of the last committed window

    def chunk_committed(self, through: pendulum.DateTime | None) -> None:
        self.chunks_committed += 1
        self.committed_through = through or self.committed_through

    def window_done(self, window: Window, pages: int, records: int) -> None:
        self.windows_done += 1
        self.pages += pages
        self.records += records
        if self.on_window:
            self.on_window(self, window, records)


class Feed:
    """The windows of a command's plan, handed out a load (chunk) at a time by one fetcher.

    A load takes windows until it has `max_windows` of them, has spent `max_seconds` fetching,
    or holds `max_rows` records, whichever comes first: a kill loses at most about that much
    work, and a load's memory does not grow with how busy the organization is. The next
    load of the command goes on from there; `last` tells whether the plan is used up.

    With `early_rows`, a load holding that many also ends once every window left is in flight
    and the next is not there yet: it commits while they arrive, so what the command still has
    to load after its last request is those windows, not a whole chunk (about 2 s of a year's
    sync at 100 ms a request).
    """

    def __init__(
        self,
        windows: list[Window],
        fetcher: WindowFetcher,
        *,
        fetched_at: pendulum.DateTime,
        organization_id: str,
        stats: ExtractStats | None = None,
        max_windows: int | None = None,
        max_seconds: float | None = None,
        max_rows: int | None = None,
        early_rows: int | None = None,
        source_state: dict[str, Any] | None = None,
    ) -> None:
        self.fetcher = fetcher
        self.fetched_at = fetched_at  # the "now" the windows were planned at
        self.organization_id = organization_id  # whose key fetches them
        self.stats = stats or ExtractStats()
        self.max_windows = max_windows or len(windows) or 1
        self.max_seconds = max_seconds
        self.max_rows = max_rows
        self.early_rows = early_rows
        self.source_state = source_state or {}  # committed into the source's state with the first load
        self.taken: list[Window] = []  # by the current load
        self._todo = deque(windows)

    @property
    def last(self) -> bool:
        return not self._todo

    def next_load(self) -> Iterator[tuple[Window, int, pa.Table]]:
        """The windows of one load, each with its page count and table, as they are fetched."""
        self.taken = []
        started, rows = time.monotonic(), 0
        while self._todo and len(self.taken) < self.max_windows:
            # dlt holds a Ctrl-C during its run until someone asks; a sync spends its time here
            signals.raise_if_signalled()
            if self.taken and self.max_seconds is not None and time.monotonic() - started >= self.max_seconds:
                return
            if self.max_rows is not None and rows >= self.max_rows:
                return
            if self.early_rows is not None and rows >= self.early_rows and self.fetcher.only_in_flight():
                return
            window, pages, table = self.fetcher.next()
            self._todo.popleft()
            self.taken.append(window)
            rows += table.num_rows
            self.stats.window_done(window, pages, table.num_rows)
            yield window, pages, table


def usage_records(
    config: Settings, backfill: tuple[pendulum.DateTime, pendulum.DateTime] | None = None, feed: Feed | None = None
) -> DltResource:
    """The usage resource; without a `feed` it plans and fetches its whole range itself."""
    first_start = backfill[0] if backfill else config.first_start()
    progress_key = backfill_key(*backfill, config.project_id) if backfill else None

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
            initial_value=first_start,
            end_value=backfill[1] if backfill else None,
            lag=config.lookback.total_seconds() or None,
            range_start="closed",
            range_end="open",
            # Rows are merged on `id`, so dlt's boundary de-duplication is redundant work.
            primary_key=(),
        ),
    ) -> Iterator[pa.Table]:
        state = dlt.current.resource_state()
        with contextlib.ExitStack() as stack:
            own = feed or stack.enter_context(_own_feed(config, SyncState.from_resource_state(state), backfill))
            check_organization(state.get("organization_id"), own.organization_id, dlt.current.pipeline().pipeline_name)
            yield from _batches(own)
        state["organization_id"] = own.organization_id
        if own.source_state:
            dlt.current.source_state().update(own.source_state)
            own.source_state = {}
        # Reached only when every window of the load was fetched; committed with the rows, or not at all.
        state["last_run"] = {"started_at": own.fetched_at, "backfill": progress_key is not None}
        if not own.taken:
            return
        through = own.taken[-1].end
        if progress_key:
            state.setdefault("backfills", {})[progress_key] = {
                "through": through,
                "done": own.last,
                "updated_at": pendulum.now("UTC"),
            }
        else:
            state["fetched_through"], state["fetched_at"] = through, own.fetched_at

    return environment_usage_records


def _batches(feed: Feed) -> Iterator[pa.Table]:
    """One load's windows as Arrow tables of about `BATCH_ROWS` rows, each `id` once per load."""
    batch: list[pa.Table] = []
    rows = 0
    seen: set[str] = set()
    for _, _, table in feed.next_load():
        table = first_of_each_id(table, seen)
        if table.num_rows:
            batch.append(with_organization(table, feed.organization_id))
            rows += table.num_rows
        if rows >= BATCH_ROWS:
            yield pa.concat_tables(batch)
            batch, rows = [], 0
    if batch:
        yield pa.concat_tables(batch)


@contextlib.contextmanager
def _own_feed(
    config: Settings, state: SyncState, backfill: tuple[pendulum.DateTime, pendulum.DateTime] | None
) -> Iterator[Feed]:
    """A standalone run's whole range as one load, with a client and fetcher of its own."""
    now = pendulum.now("UTC")
    windows = plan_windows(config, state, now, backfill)
    with make_client(config) as client:
        organization_id = client.organization_id()
        with WindowFetcher(client, windows, config.project_id, config.workers, max_rows=config.chunk_rows) as fetcher:
            yield Feed(windows, fetcher, fetched_at=now, organization_id=organization_id)


class OrganizationMismatch(settings.ConfigError):
    """The key belongs to another organization than the one this pipeline syncs."""


def check_organization(synced: str | None, key_of: str, pipeline_name: str) -> None:
    """One pipeline, one cursor, one organization: a key of another one must not move it."""
    if synced and synced != key_of:
        raise OrganizationMismatch(
            f"pipeline {pipeline_name!r} syncs organization {synced}, but the API key belongs to organization "
            f"{key_of}; sync it with its own --pipeline-name (and --add-organization to share the dataset)"
        )


def plan_windows(
    config: Settings,
    state: SyncState,
    now: pendulum.DateTime,
    backfill: tuple[pendulum.DateTime, pendulum.DateTime] | None = None,
    *,
    force: bool = False,
) -> list[Window]:
    """`windows.plan` with this configuration: the source, the runner and `status` all call this."""
    return plan(
        state,
        size=config.window,
        lookback=config.lookback,
        first_start=config.first_start(),
        now=now,
        backfill=backfill,
        project_id=config.project_id,
        force=force,
    )


def _text(value: Any) -> Any:
    """Dates and datetimes as ISO text, the form dlt's config and `settings` take."""
    return value.isoformat() if isinstance(value, (date, datetime)) else value


class WindowFetcher:
    """Fetches planned windows concurrently and hands them out in order.

    It keeps up to `lookahead` windows (at least `2 * workers`) in flight or ready, also while
    dlt normalizes and loads the previous chunk, so the API is not idle while the warehouse
    works; a chunk's worth of lookahead keeps both busy. Of those, it runs at most as many at
    once as the client's adaptive limit allows (see `concurrency.py`), up to `workers`.

    Memory stays bounded however busy the organization: a window's pages are decoded every
    `DECODE_PAGES`, and once the windows running and ready hold `max_rows` records, no window
    starts and none but the one `next()` waits for reads on; taking a window makes room.
    """

    DECODE_PAGES = 25  # pages decoded at once: most of the speed of a window at once, little of its memory

    def __init__(
        self,
        client: UsageClient,
        windows: list[Window],
        project_id: str | None,
        workers: int,
        lookahead: int = 0,
        max_rows: int | None = None,
    ) -> None:
        self._client = client
        self._project_id = project_id
        self._todo = iter(windows)
        self._unstarted = len(windows)
        self._workers = max(workers, 1)
        self._lookahead = max(2 * self._workers, lookahead)
        self._max_rows = max_rows
        self._pool = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="ona-window")
        self._pending: deque[tuple[Window, Future[tuple[Window, int, pa.Table]]]] = deque()
        self._running = 0
        self._held_rows = 0  # decoded, in windows running or ready and not yet taken
        self._closed = False
        self._wanted: Window | None = None  # the window `next()` waits for
        # `_fill` runs on the consumer thread and on the workers; workers wait on it for room
        self._room = threading.Condition()
        self._fill()

    def __enter__(self) -> WindowFetcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def next(self) -> tuple[Window, int, pa.Table]:
        """The next window's page count and table; raises what fetching it raised."""
        with self._room:
            self._wanted, future = self._pending.popleft()
            self._room.notify_all()  # the window waited for never waits for room
        self._fill()
        result = future.result()
        with self._room:
            self._held_rows -= result[2].num_rows
            self._room.notify_all()
        self._fill()
        return result

    def only_in_flight(self) -> bool:
        """Every window has started, and the next is still being fetched."""
        with self._room:
            return not self._unstarted and bool(self._pending) and not self._pending[0][1].done()

    def close(self) -> None:
        with self._room:
            self._closed = True
            self._todo = iter(())
            for _, future in self._pending:
                future.cancel()
            self._room.notify_all()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _fill(self) -> None:
        with self._room:
            self._fill_locked()

    def _fill_locked(self) -> None:
        while (
            len(self._pending) < self._lookahead
            and self._running < min(self._client.limit.limit, self._workers)
            and not self._full()
        ):
            window = next(self._todo, None)
            if window is None:
                return
            self._running += 1
            self._unstarted -= 1
            self._pending.append((window, self._pool.submit(self._fetch, window)))

    def _full(self) -> bool:
        return self._max_rows is not None and self._held_rows >= self._max_rows

    def _fetch(self, window: Window) -> tuple[Window, int, pa.Table]:
        tables: list[pa.Table] = []
        pages: list[bytes] = []
        count = 0
        try:
            for page in self._client.raw_pages(window, self._project_id):
                pages.append(page)
                count += 1
                self._fill()  # the client's limit may have grown with this page's timing
                if len(pages) == self.DECODE_PAGES:
                    tables.append(self._decode(pages, window))
                    pages = []
            tables.append(self._decode(pages, window, last=True))
            return window, count, pa.concat_tables(tables)
        except BaseException:
            with self._room:
                self._held_rows -= sum(t.num_rows for t in tables)
            raise
        finally:
            # Before the result is set, not in a done callback: `next()` may be waiting on this
            # window, and must find the following one already submitted when it returns.
            with self._room:
                self._running -= 1
            self._fill()

    def _decode(self, pages: list[bytes], window: Window, last: bool = False) -> pa.Table:
        """Pages as a table, counted against `max_rows`; unless they were the window's `last`,
        waits for room before the window reads on."""
        table = from_pages(pages, window)
        with self._room:
            self._held_rows += table.num_rows
            while not last and self._full() and not self._closed and window != self._wanted:
                self._room.wait()
            if self._closed:
                raise CancelledFetch(window)
        return table


class CancelledFetch(Exception):
    """The fetcher closed while this window waited for room."""
