"""The dlt source `ona_usage` and its resource `environment_usage_records`.

The resource keeps dlt's incremental cursor on `stopped_at` (the newest `stoppedAt` loaded).
Each run asks the API for `[cursor - lookback, now)` in windows of at most a day, fetches
several windows at once, and yields one Arrow table per window. Rows are merged on `id`, so a
record read twice (across pages, windows, the lookback or runs) ends up once with its latest
values. The cursor lives in dlt's pipeline state, which dlt stores in the destination with the
data: a run on a fresh machine resumes from there, and a failed run commits neither.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import dlt
import pendulum
import pyarrow as pa
from dlt.extract.resource import DltResource

from ona_usage import settings
from ona_usage.client import UsageClient
from ona_usage.records import COLUMNS, to_table
from ona_usage.windows import Window, parse_duration, parse_window_size, tile, to_utc

RESOURCE_NAME = "environment_usage_records"
CURSOR_COLUMN = "stopped_at"


class ExtractStats:
    """What a run fetched, for the summary and progress; windows are counted once planned."""

    def __init__(self, on_window: Callable[[ExtractStats, Window, int], None] | None = None) -> None:
        self.on_window = on_window
        self.windows_planned: list[Window] = []
        self.windows_done = 0
        self.pages = 0
        self.records = 0

    def window_done(self, window: Window, pages: int, records: int) -> None:
        self.windows_done += 1
        self.pages += pages
        self.records += records
        if self.on_window:
            self.on_window(self, window, records)


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
) -> DltResource:
    """Ona environment usage records, merged on `id`, with an incremental cursor on `stopped_at`.

    Args:
        api_key: Ona API key (personal access token). Falls back to `ONA_API_KEY`, then
            `GITPOD_API_KEY`.
        base_url: API base URL, `https://app.gitpod.io/api` or `https://app.ona.com/api`.
        start_date: Where the first run starts (ISO date or datetime, UTC); later runs resume
            from the cursor. Defaults to 30 days before the first run.
        end_date: Exclusive end for a one-off backfill; with it the run keeps no cursor.
        project_id: Only records of this project.
        window: Size of each request's date range: at most `1d`, e.g. `6h`.
        lookback: How far before the cursor each run starts again, to catch late records.
        page_size: Records per page, 1 to 100.
        workers: Windows fetched at once.
        allow_insecure_http: Allow a plain `http://` base URL that is not loopback.
        client: An existing client to use instead of `api_key`, `base_url` and `page_size`.
        stats: Counters the caller reads for progress and the run's summary.
    """
    if client is None:
        key = api_key or settings.api_key_from_env()
        if not key:
            raise ValueError(settings.MISSING_KEY_MESSAGE)
        client = UsageClient(key, base_url, page_size=page_size, allow_insecure_http=allow_insecure_http)
    return usage_records(
        client,
        start_date=to_utc(start_date) if start_date else settings.default_start_date(),
        end_date=to_utc(end_date) if end_date else None,
        project_id=project_id,
        window_size=parse_window_size(window),
        lookback=parse_duration(lookback, name="lookback"),
        workers=workers,
        stats=stats,
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
) -> DltResource:
    """The resource over an existing client, so the caller can read the client's counters."""
    stats = stats if stats is not None else ExtractStats()

    @dlt.resource(
        name=RESOURCE_NAME,
        write_disposition="merge",
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
        start = to_utc(stopped_at.start_value)
        end = to_utc(stopped_at.end_value) if stopped_at.end_value else pendulum.now("UTC")
        stats.windows_planned = list(tile(start, end, window_size))
        for table in fetch_windows(client, stats, project_id, workers):
            yield table

    return environment_usage_records


def fetch_windows(
    client: UsageClient, stats: ExtractStats, project_id: str | None, workers: int
) -> Iterator[pa.Table]:
    """Fetch windows concurrently but yield them in order, holding at most `2 * workers`."""

    def fetch(window: Window) -> tuple[Window, int, pa.Table]:
        records: list[dict] = []
        pages = 0
        for page in client.pages(window, project_id):
            records.extend(page)
            pages += 1
        return window, pages, to_table(records, window)

    with ThreadPoolExecutor(max_workers=max(workers, 1), thread_name_prefix="ona-window") as pool:
        pending: deque[Future[tuple[Window, int, pa.Table]]] = deque()
        planned = iter(stats.windows_planned)
        try:
            for window in planned:
                pending.append(pool.submit(fetch, window))
                if len(pending) >= 2 * max(workers, 1):
                    yield from _finish(pending.popleft(), stats)
            while pending:
                yield from _finish(pending.popleft(), stats)
        finally:
            for future in pending:
                future.cancel()


def _finish(future: Future[tuple[Window, int, pa.Table]], stats: ExtractStats) -> Iterator[pa.Table]:
    window, pages, table = future.result()
    stats.window_done(window, pages, table.num_rows)
    if table.num_rows:
        yield table
