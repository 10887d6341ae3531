"""The dlt pipeline around the source: destination and dataset, runs in chunks, and the state.

A command takes the pipeline's lock, finishes any load a killed or failed run left pending,
then runs the source one chunk at a time; each chunk is one dlt load that commits its rows and
its progress together, so a crash loses at most the chunk in flight.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import dlt
import httpx
import pendulum
from dlt.common.destination.reference import Destination
from dlt.common.pipeline import LoadInfo, get_dlt_pipelines_dir

from ona_usage.client import UsageClient
from ona_usage.models import create_views, drop_views
from ona_usage.names import name_resources
from ona_usage.settings import ConfigError, SyncSettings, default_start_date, parse_date
from ona_usage.source import (
    CURSOR_COLUMN,
    RESOURCE_NAME,
    Chunk,
    ExtractStats,
    WindowFetcher,
    backfill_key,
    ona_usage,
    resume_point,
)
from ona_usage.windows import Window, format_rfc3339, parse_duration, parse_window_size, tile, to_utc

logger = logging.getLogger(__name__)

DEFAULT_DUCKDB_FILE = "ona-usage.duckdb"


class PipelineBusyError(RuntimeError):
    """Another run of the same pipeline holds the lock."""


@dataclass
class SyncResult:
    """What one command did, over all its chunks."""

    rows_loaded: int = 0
    windows: int = 0
    pages: int = 0
    requests: int = 0
    retries: int = 0
    chunks: int = 0
    cursor: datetime | None = None
    seconds: float = 0.0
    load_infos: list[LoadInfo] = field(default_factory=list)


@dataclass
class SyncState:
    """The resource's state as the scheduled sync and backfills see it."""

    cursor: datetime | None
    fetched_through: datetime | None
    fetched_at: datetime | None
    initial_value: datetime | None
    backfills: dict[str, Any]


def make_pipeline(settings: SyncSettings, destination: Destination | None = None) -> dlt.Pipeline:
    """A pipeline whose state and data live in the configured destination and dataset."""
    # Arrow tables skip dlt's row normalizer, which would add `_dlt_load_id`; ask for it, so
    # every row says which load wrote it (and `status` can count the last load's rows).
    dlt.config["normalize.parquet_normalizer.add_dlt_load_id"] = True
    return dlt.pipeline(
        pipeline_name=settings.pipeline_name,
        destination=destination or make_destination(settings),
        dataset_name=settings.dataset_name,
    )


def make_destination(settings: SyncSettings) -> Destination:
    """The named dlt destination; DuckDB defaults to `ona-usage.duckdb` in the working directory.

    Not `ona_usage.duckdb`: DuckDB names the catalog after the file, and a catalog named like
    the `ona_usage` dataset makes every `ona_usage.<table>` reference ambiguous.
    """
    if settings.destination == "duckdb":
        path = duckdb_path()
        if Path(path).stem == settings.dataset_name:
            raise ConfigError(
                f"the DuckDB file {path!r} is named like the dataset {settings.dataset_name!r}, which makes "
                "DuckDB's table names ambiguous; rename the file or set --dataset-name"
            )
        return dlt.destinations.duckdb(credentials=path)
    try:
        return Destination.from_reference(settings.destination)
    except Exception as exc:  # dlt raises several types for names it cannot resolve
        raise ConfigError(
            f"unknown destination {settings.destination!r} ({type(exc).__name__}); "
            "use a dlt destination name such as duckdb, postgres, bigquery, snowflake, motherduck or filesystem"
        ) from None


@contextmanager
def open_destination(settings: SyncSettings, destination: Destination) -> Iterator[Destination]:
    """For DuckDB, one connection for all of a command's loads, closed (and checkpointed) once.

    dlt opens and closes a connection per load job otherwise, and each close checkpoints the
    file: with a load per chunk that was a third of a year's sync.
    """
    if settings.destination != "duckdb":
        yield destination
        return
    import duckdb

    connection = duckdb.connect(duckdb_path())
    # DuckDB would take up to 80% of RAM as cache; a chunk's merge needs a small part of it.
    connection.execute("SET memory_limit = ?", [settings.duckdb_memory_limit])
    try:
        yield dlt.destinations.duckdb(credentials=connection)
    finally:
        connection.close()


def duckdb_path() -> str:
    """dlt's `destination.duckdb.credentials` if set (env or .dlt/), else the default file."""
    for accessor in (dlt.secrets, dlt.config):
        configured = accessor.get("destination.duckdb.credentials")
        if isinstance(configured, str) and configured.strip():
            return configured
    return DEFAULT_DUCKDB_FILE


def restore_state(pipeline: dlt.Pipeline, settings: SyncSettings) -> None:
    """Bring the local state up to the destination's, without creating an empty DuckDB file."""
    if settings.destination == "duckdb" and not Path(duckdb_path()).exists():
        return
    pipeline.sync_destination()


def run_sync(settings: SyncSettings, stats: ExtractStats | None = None) -> SyncResult:
    """The scheduled run: from the state (or `start_date`) to now, a chunk per load."""
    return _run(settings, stats, backfill=None)


def run_backfill(
    settings: SyncSettings, start: str, end: str, stats: ExtractStats | None = None
) -> SyncResult:
    """Load `[start, end)` merged on `id`, resuming after its last committed chunk.

    The scheduled cursor does not move: dlt's `end_value` runs keep no cursor state.
    """
    begin, finish = parse_date(start, "--start"), parse_date(end, "--end")
    if finish <= begin:
        raise ConfigError(f"--end {end!r} must be after --start {start!r}")
    return _run(settings, stats, backfill=(begin, finish))


def _run(
    settings: SyncSettings,
    stats: ExtractStats | None,
    backfill: tuple[pendulum.DateTime, pendulum.DateTime] | None,
) -> SyncResult:
    settings.validate()
    destination = make_destination(settings)  # an unknown one fails before any request
    stats = stats if stats is not None else ExtractStats()
    result = SyncResult()
    started = time.monotonic()
    with UsageClient(
        settings.api_key,
        settings.base_url,
        page_size=int(settings.page_size),
        max_attempts=int(settings.max_attempts),
        timeout=httpx.Timeout(float(settings.timeout), connect=min(float(settings.timeout), 10.0)),
        allow_insecure_http=settings.allow_insecure_http,
        concurrency=int(settings.workers),
    ) as client:
        stats.retries = lambda: client.retries
        # A bad key or URL fails here, before anything touches the destination or the state.
        client.check_access()
        with pipeline_lock(settings), open_destination(settings, destination) as opened:
            _run_chunks(client, make_pipeline(settings, opened), settings, stats, backfill, result)
    result.windows, result.pages = stats.windows_done, stats.pages
    result.requests, result.retries = client.requests, client.retries
    result.seconds = time.monotonic() - started
    return result


def _run_chunks(
    client: UsageClient,
    pipeline: dlt.Pipeline,
    settings: SyncSettings,
    stats: ExtractStats,
    backfill: tuple[pendulum.DateTime, pendulum.DateTime] | None,
    result: SyncResult,
) -> None:
    """Plan the range once, then one dlt load per chunk; each commits its rows and progress."""
    finish_pending(pipeline)
    pipeline.sync_destination()
    key = backfill_key(*backfill, settings.project_id) if backfill else None
    now = pendulum.now("UTC")
    windows = planned_windows(pipeline, settings, backfill, now)
    stats.windows_total = len(windows)
    size = chunk_windows(settings)
    chunks = [windows[i : i + size] for i in range(0, len(windows), size)]
    with WindowFetcher(client, windows, settings.project_id, int(settings.workers), lookahead=size) as fetcher:
        for number, windows_of_chunk in enumerate(chunks, start=1):
            if backfill:
                bounds = {"start_date": format_rfc3339(windows_of_chunk[0].start), "end_date": format_rfc3339(backfill[1])}
            else:
                bounds = {"start_date": settings.start_date}
            source = ona_usage(
                client=client,
                stats=stats,
                project_id=settings.project_id,
                window=settings.window,
                lookback=settings.lookback,
                chunk=Chunk(windows_of_chunk, fetcher, last=number == len(chunks), fetched_at=now),
                backfill=key,
                **bounds,
            )
            if settings.destination == "filesystem":
                # Plain Parquet files cannot be merged into; Delta tables can, on `id` like elsewhere.
                source.resources[RESOURCE_NAME].apply_hints(table_format="delta")
            result.load_infos.append(pipeline.run(source))
            result.chunks += 1
            normalize = pipeline.last_trace.last_normalize_info if pipeline.last_trace else None
            result.rows_loaded += normalize.row_counts.get(RESOURCE_NAME, 0) if normalize else 0
            if number < len(chunks):
                logger.info("committed chunk %d of %d (%d of %d windows)", number, len(chunks), stats.windows_done, stats.windows_total)
    if result.chunks and settings.names:
        # After the usage is committed: names are a nicety, and their failure must not cost it.
        resources = name_resources(client)
        if resources:
            result.load_infos.append(pipeline.run(resources, schema=pipeline.default_schema))
    if result.chunks:
        create_views(pipeline)
    result.cursor = read_state(pipeline).cursor


def reset(settings: SyncSettings) -> bool:
    """Drop the table and the resource's state, in the destination and locally (dlt's drop)."""
    from dlt.pipeline.helpers import pipeline_drop

    with pipeline_lock(settings):
        pipeline = make_pipeline(settings)
        restore_state(pipeline, settings)
        if not pipeline.default_schema_name:
            return False
        drop_views(pipeline)
        pipeline_drop(pipeline, resources=[RESOURCE_NAME])()
        return True


def chunk_windows(settings: SyncSettings) -> int:
    """Windows per load: `--chunk` (60 days by default) in windows of `--window`."""
    window = parse_window_size(settings.window).total_seconds()
    return max(1, math.ceil(parse_duration(settings.chunk, name="chunk").total_seconds() / window))


def finish_pending(pipeline: dlt.Pipeline) -> None:
    """Load what a failed or killed run extracted but did not load, before fetching anything new.

    Its rows and its state belong together, so loading them keeps the table and the cursor
    consistent; if the package is lost instead (a fresh machine, or one a kill left half
    moved), the destination's older state rules, which is consistent too.
    """
    if not pipeline.has_pending_data:
        return
    logger.warning("finishing a load that an earlier run left pending")
    try:
        pipeline.normalize()
        pipeline.load()
    except Exception as exc:  # a run killed mid-step can leave a package dlt cannot finish
        logger.warning(
            "could not finish it (%s); discarding the local pipeline folder and resuming from the "
            "state stored in the destination",
            str(exc).splitlines()[0],
        )
        # Only completed loads carry state in the destination, so this is the fresh-runner case.
        pipeline.drop()


def read_state(pipeline: dlt.Pipeline) -> SyncState:
    """The resource state: the cursor, how far the sync fetched, and backfills."""
    resource: dict[str, Any] = (
        pipeline.state.get("sources", {}).get("ona_usage", {}).get("resources", {}).get(RESOURCE_NAME, {})
    )
    incremental = resource.get("incremental", {}).get(CURSOR_COLUMN, {})
    return SyncState(
        cursor=incremental.get("last_value"),
        fetched_through=resource.get("fetched_through"),
        fetched_at=resource.get("fetched_at"),
        initial_value=incremental.get("initial_value"),
        backfills=dict(resource.get("backfills", {})),
    )


def read_cursor(pipeline: dlt.Pipeline) -> datetime | None:
    """The newest `stopped_at` the scheduled sync has loaded."""
    return read_state(pipeline).cursor


def planned_windows(
    pipeline: dlt.Pipeline,
    settings: SyncSettings,
    backfill: tuple[pendulum.DateTime, pendulum.DateTime] | None = None,
    now: pendulum.DateTime | None = None,
) -> list[Window]:
    """The windows a run would fetch now, from the same rule the resource applies."""
    size = parse_window_size(settings.window)
    state = read_state(pipeline)
    if backfill:
        progress = state.backfills.get(backfill_key(*backfill, settings.project_id), {})
        # An unfinished backfill continues after its last chunk; a finished one runs again whole.
        start = backfill[0] if progress.get("done") else to_utc(progress.get("through") or backfill[0])
        return list(tile(start, backfill[1], size))
    lookback = parse_duration(settings.lookback, name="lookback")
    initial = to_utc(state.initial_value or settings.start_date or default_start_date())
    lagged = initial if state.cursor is None else max(to_utc(state.cursor) - lookback, initial)
    start = resume_point(lagged, state.fetched_through, state.fetched_at, lookback)
    return list(tile(start, now or pendulum.now("UTC"), size))


@contextmanager
def pipeline_lock(settings: SyncSettings) -> Iterator[None]:
    """One run per pipeline at a time on this machine; a second one is refused, not queued."""
    folder = Path(get_dlt_pipelines_dir())  # where dlt keeps the pipeline's local state
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f".{settings.pipeline_name}.lock"
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise PipelineBusyError(
                f"another ona-usage run of pipeline {settings.pipeline_name!r} is in progress (pid {holder}); "
                "wait for it to finish"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
