"""The sync's state as dlt keeps it: where it lives in the pipeline state, and what it holds.

dlt commits a resource's state with its rows, in the destination, so the table and the state
never disagree. The usage resource keeps dlt's incremental cursor on `stopped_at` and, beside
it, `fetched_through` (the end of the last window a committed run fetched) with `fetched_at`
(when), and the progress of each backfill under `backfills`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

SOURCE_NAME = "ona_usage"
RESOURCE_NAME = "environment_usage_records"
CURSOR_COLUMN = "stopped_at"


@dataclass
class SyncState:
    """The usage resource's state as the scheduled sync and backfills see it."""

    cursor: datetime | None = None
    fetched_through: datetime | None = None
    fetched_at: datetime | None = None
    initial_value: datetime | None = None
    backfills: dict[str, Any] = field(default_factory=dict)
    last_run: dict[str, Any] = field(default_factory=dict)  # when the newest committed run started
    organization_id: str | None = None  # whose usage this pipeline syncs

    @classmethod
    def from_resource_state(cls, resource: dict[str, Any]) -> SyncState:
        incremental = resource.get("incremental", {}).get(CURSOR_COLUMN, {})
        return cls(
            cursor=incremental.get("last_value"),
            fetched_through=resource.get("fetched_through"),
            fetched_at=resource.get("fetched_at"),
            initial_value=incremental.get("initial_value"),
            backfills=dict(resource.get("backfills", {})),
            last_run=dict(resource.get("last_run", {})),
            organization_id=resource.get("organization_id"),
        )

    @classmethod
    def from_pipeline_state(cls, state: dict[str, Any]) -> SyncState:
        resources = state.get("sources", {}).get(SOURCE_NAME, {}).get("resources", {})
        return cls.from_resource_state(resources.get(RESOURCE_NAME, {}))


def backfill_key(start: datetime, end: datetime, project_id: str | None) -> str:
    """Where a backfill of `[start, end)` keeps its progress; `parse_backfill_key` reads it back."""
    from ona_usage.windows import format_rfc3339

    return f"{format_rfc3339(start)}/{format_rfc3339(end)}/{project_id or '*'}"


def parse_backfill_key(key: str) -> tuple[str, str, str | None]:
    start, end, project = key.split("/", 2)
    return start, end, None if project == "*" else project
