"""Reconcile the warehouse with the API, day by day: counts, missing, extra and changed ids.

The scheduled sync cannot see a record that arrives later than the lookback or changes long
after it stopped; this is how a user proves the table right, and finds the days to reload.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import dlt
import pendulum
from dlt.destinations.exceptions import DatabaseUndefinedRelation

from ona_usage.client import UsageClient, make_client
from ona_usage.pipeline import reading
from ona_usage.records import FIELDS, from_pages
from ona_usage.settings import Settings
from ona_usage.state import RESOURCE_NAME, SyncState
from ona_usage.windows import Window, format_rfc3339, plan

DAY = pendulum.duration(days=1)

COLUMNS = [column for _, column in FIELDS]


@dataclass
class DayReport:
    """One day: what each side holds, and the ids that differ."""

    window: Window
    api: int
    warehouse: int
    missing: list[str] = field(default_factory=list)  # in the API, not in the warehouse
    extra: list[str] = field(default_factory=list)  # in the warehouse, not in the API
    changed: list[str] = field(default_factory=list)  # in both, with other values

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.changed)

    def as_dict(self) -> dict[str, Any]:
        return {
            "start": format_rfc3339(self.window.start),
            "end": format_rfc3339(self.window.end),
            "api": self.api,
            "warehouse": self.warehouse,
            "missing": self.missing,
            "extra": self.extra,
            "changed": self.changed,
        }


def verify(config: Settings, start: pendulum.DateTime, end: pendulum.DateTime) -> list[DayReport]:
    """Compare `[start, end)` one UTC day at a time, reading the warehouse the config names."""
    days = plan(SyncState(), size=DAY, lookback=config.lookback, first_start=start, now=end, backfill=(start, end))
    with make_client(config) as client, reading(config) as pipeline:
        return reconcile(client, pipeline, days, config.project_id)


def reconcile(
    client: UsageClient, pipeline: dlt.Pipeline, windows: list[Window], project_id: str | None = None
) -> list[DayReport]:
    """Each window's records on both sides, and the ids that differ."""
    reports = []
    for window in windows:
        table = from_pages(list(client.raw_pages(window, project_id)), window)
        api_rows = {row["id"]: _normalise(row) for row in table.to_pylist()}
        stored = _warehouse_rows(pipeline, window, project_id)
        reports.append(
            DayReport(
                window=window,
                api=len(api_rows),
                warehouse=len(stored),
                missing=sorted(api_rows.keys() - stored.keys()),
                extra=sorted(stored.keys() - api_rows.keys()),
                changed=sorted(i for i in api_rows.keys() & stored.keys() if api_rows[i] != stored[i]),
            )
        )
    return reports


def _warehouse_rows(pipeline: dlt.Pipeline, window: Window, project_id: str | None) -> dict[str, dict[str, Any]]:
    with pipeline.sql_client() as sql:
        table = sql.make_qualified_table_name(RESOURCE_NAME)
        query = f"SELECT {', '.join(COLUMNS)} FROM {table} WHERE stopped_at >= %s AND stopped_at < %s"
        args: list[Any] = [window.start, window.end]
        if project_id:
            query += " AND project_id = %s"
            args.append(project_id)
        try:
            rows = sql.execute_sql(query, *args) or []
        except DatabaseUndefinedRelation:
            rows = []  # nothing loaded yet
    return {row[0]: _normalise(dict(zip(COLUMNS, row))) for row in rows}


def _normalise(row: dict[str, Any]) -> dict[str, Any]:
    """Values as comparable Python: aware UTC datetimes, everything else as is."""
    return {
        key: value.astimezone(timezone.utc) if isinstance(value, datetime) else value
        for key, value in row.items()
    }
