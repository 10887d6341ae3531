"""Where things stand: the state, the table and pending work, as one JSON-ready dict.

The shape is stable (documented in the README) so monitoring can read `ona-usage status --json`.
Times are RFC 3339 UTC strings or null.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import dlt
import pendulum
from dlt.destinations.exceptions import DatabaseUndefinedRelation

from ona_usage.models import MODELS, has_sql, last_refresh_error, loaded_tables, models_current
from ona_usage.pipeline import WarehouseBusy, local_pipeline, read_state, reading, warehouse_exists
from ona_usage.settings import Settings
from ona_usage.source import plan_windows
from ona_usage.state import RESOURCE_NAME, parse_backfill_key
from ona_usage.windows import format_rfc3339

STATUS_VERSION = 2


class StatusError(RuntimeError):
    """The warehouse cannot be read, so there is no status to report."""


def collect_status(settings: Settings) -> dict[str, Any]:
    """Where things stand, from the warehouse; while a sync writes DuckDB, from this machine's state."""
    if not warehouse_exists(settings):
        raise StatusError(f"no DuckDB file at {settings.duckdb_file}; run `ona-usage sync` first, or point --duckdb-file at one")
    local = local_pipeline(settings)
    try:
        with reading(settings) as pipeline:
            return _status(settings, pipeline, local, busy=False)
    except WarehouseBusy:
        if local is None:
            raise
        return _status(settings, local, local, busy=True)


def _status(settings: Settings, pipeline: dlt.Pipeline, local: dlt.Pipeline | None, *, busy: bool) -> dict[str, Any]:
    state = read_state(pipeline)
    windows = plan_windows(settings, state, pendulum.now("UTC"))
    trace = local.last_trace if local else None
    return {
        "version": STATUS_VERSION,
        "warehouse": "busy" if busy else "ok",
        "pipeline": settings.pipeline_name,
        "destination": settings.destination,
        "dataset": settings.dataset_name,
        "table": RESOURCE_NAME,
        "cursor": _time(state.cursor),
        "fetched_through": _time(state.fetched_through),
        "lookback": settings.describe("lookback"),
        "next_sync": {
            "windows": len(windows),
            "start": _time(windows[0].start) if windows else None,
            "end": _time(windows[-1].end) if windows else None,
        },
        "last_load": None if busy else _last_load(pipeline, trace, state.last_run),
        "table_stats": None if busy else _table_stats(pipeline),
        "models": None if busy else _models(pipeline, local),
        "backfills": [
            {
                **dict(zip(("start", "end", "project_id"), parse_backfill_key(key))),
                "through": _time(progress.get("through")),
                "done": bool(progress.get("done")),
            }
            for key, progress in sorted(state.backfills.items())
        ],
        "pending_load_packages": sorted(
            [*local.list_extracted_load_packages(), *local.list_normalized_load_packages()] if local else []
        ),
    }


def _last_load(pipeline: dlt.Pipeline, trace: Any, last_run: dict[str, Any]) -> dict[str, Any] | None:
    """The newest completed load that wrote usage rows, and how long its command took.

    The duration comes from the local trace when this machine ran it, else from the state:
    every run, sync or backfill, records when it started (`last_run`), and the load says when
    it ended.
    """
    row = _query(
        pipeline,
        "SELECT l.load_id, l.inserted_at, count(*) FROM {table} AS t JOIN {loads} AS l ON l.load_id = t._dlt_load_id "
        "WHERE l.status = 0 GROUP BY l.load_id, l.inserted_at ORDER BY l.inserted_at DESC LIMIT 1",
    )
    if not row:
        return None
    load_id, inserted_at, rows = row[0]
    seconds = None
    if trace is not None and trace.finished_at and load_id in {str(i) for i in _trace_load_ids(trace)}:
        seconds = round((trace.finished_at - trace.started_at).total_seconds(), 3)
    elif isinstance(started := last_run.get("started_at"), datetime) and isinstance(inserted_at, datetime):
        elapsed = (inserted_at - started).total_seconds()
        seconds = round(elapsed, 3) if 0 <= elapsed < 86_400 else None
    return {"load_id": load_id, "finished_at": _time(inserted_at), "rows": rows, "seconds": seconds}


def _trace_load_ids(trace: Any) -> list[str]:
    """Every load of the traced command (its trace holds each chunk's steps)."""
    return [i for step in trace.steps if step.step == "load" and step.step_info for i in step.step_info.loads_ids]


def _models(pipeline: dlt.Pipeline, local: dlt.Pipeline | None) -> dict[str, Any]:
    """Whether the models hold every load of their inputs, the newest load each holds, and why
    the last refresh failed if it did: "usage loaded, models stale" is `current: false`."""
    loads = {}
    for name in MODELS:
        row = _query(pipeline, "SELECT max(_dlt_load_id) FROM {%s}" % name) if name in loaded_tables(pipeline) else None
        loads[name] = row[0][0] if row else None
    current = has_sql(pipeline) and models_current(pipeline) if pipeline.default_schema_name else False
    return {
        "current": bool(current),
        "tables": {name: {"load_id": load_id} for name, load_id in loads.items()},
        "last_refresh_error": last_refresh_error(local or pipeline),
    }


def _table_stats(pipeline: dlt.Pipeline) -> dict[str, Any]:
    row = _query(pipeline, "SELECT count(*), min(stopped_at), max(stopped_at) FROM {table}")
    count, first, last = row[0] if row else (0, None, None)
    return {"rows": count, "first_stopped_at": _time(first), "last_stopped_at": _time(last)}


def _query(pipeline: dlt.Pipeline, sql: str, *args: Any) -> list[tuple] | None:
    if not pipeline.default_schema_name:
        return None  # never ran here or in the destination
    try:
        with pipeline.sql_client() as client:
            text = sql.format(
                table=client.make_qualified_table_name(RESOURCE_NAME),
                loads=client.make_qualified_table_name("_dlt_loads"),
                **{name: client.make_qualified_table_name(name) for name in MODELS},
            )
            return list(client.execute_sql(text, *args) or [])
    except DatabaseUndefinedRelation:
        return None
    except Exception as exc:
        raise StatusError(f"could not read the destination: {str(exc).splitlines()[0]}") from None


def _time(value: Any) -> str | None:
    return format_rfc3339(value) if isinstance(value, datetime) else None
