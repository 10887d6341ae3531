"""The dlt pipeline around the source: which destination and dataset, one run, what it did."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from datetime import datetime
from typing import Any

import dlt
from dlt.common.destination.reference import Destination
from dlt.common.pipeline import LoadInfo

from ona_usage.client import UsageClient
from ona_usage.settings import ConfigError, SyncSettings
from ona_usage.source import CURSOR_COLUMN, RESOURCE_NAME, ExtractStats, ona_usage

DEFAULT_DUCKDB_FILE = "ona-usage.duckdb"


@dataclass
class SyncResult:
    """What one run did, for the summary line and for callers that schedule runs."""

    rows_loaded: int
    windows: int
    pages: int
    requests: int
    retries: int
    cursor: datetime | None
    seconds: float
    load_info: LoadInfo


def make_pipeline(settings: SyncSettings, destination: Destination | None = None) -> dlt.Pipeline:
    """A pipeline whose state and data live in the configured destination and dataset."""
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


def duckdb_path() -> str:
    """dlt's `destination.duckdb.credentials` if set (env or .dlt/), else the default file."""
    for accessor in (dlt.secrets, dlt.config):
        configured = accessor.get("destination.duckdb.credentials")
        if isinstance(configured, str) and configured.strip():
            return configured
    return DEFAULT_DUCKDB_FILE


def run_sync(settings: SyncSettings, stats: ExtractStats | None = None) -> SyncResult:
    """Check the key, then extract, normalize and load one incremental run."""
    settings.validate()
    destination = make_destination(settings)
    stats = stats if stats is not None else ExtractStats()
    started = time.monotonic()
    with UsageClient(
        settings.api_key,
        settings.base_url,
        page_size=int(settings.page_size),
        allow_insecure_http=settings.allow_insecure_http,
    ) as client:
        # A bad key or URL fails here, before the pipeline touches the destination.
        client.check_access()
        pipeline = make_pipeline(settings, destination)
        source = ona_usage(
            client=client,
            stats=stats,
            start_date=settings.start_date,
            project_id=settings.project_id,
            window=settings.window,
            lookback=settings.lookback,
            workers=int(settings.workers),
        )
        load_info = pipeline.run(source)
    normalize = pipeline.last_trace.last_normalize_info if pipeline.last_trace else None
    return SyncResult(
        rows_loaded=(normalize.row_counts.get(RESOURCE_NAME, 0) if normalize else 0),
        windows=stats.windows_done,
        pages=stats.pages,
        requests=client.requests,
        retries=client.retries,
        cursor=read_cursor(pipeline),
        seconds=time.monotonic() - started,
        load_info=load_info,
    )


def read_cursor(pipeline: dlt.Pipeline) -> datetime | None:
    """The newest `stopped_at` the scheduled sync has loaded, from the pipeline's state."""
    state: dict[str, Any] = pipeline.state
    incremental = (
        state.get("sources", {})
        .get("ona_usage", {})
        .get("resources", {})
        .get(RESOURCE_NAME, {})
        .get("incremental", {})
        .get(CURSOR_COLUMN, {})
    )
    return incremental.get("last_value")
