"""Names for the ids in usage records: projects, environment classes and runners.

Each is a small list endpoint of Ona's API (as the official SDK calls them), loaded as its own
table of the same source and replaced on every run. A key that may not list one of them (or
an API that does not offer it) costs that table, with one warning, and never the usage load.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import dlt
from dlt.common.schema.typing import TTableSchemaColumns
from dlt.extract.resource import DltResource

from ona_usage.client import OnaApiError, UsageClient, make_client
from ona_usage.settings import Settings

logger = logging.getLogger(__name__)


def _text_columns(*names: str) -> TTableSchemaColumns:
    return {name: {"name": name, "data_type": "text", "nullable": name != "id"} for name in names}


# table: (endpoint, list key in the answer, record -> row, columns)
CATALOG: dict[str, tuple[str, str, Callable[[dict[str, Any]], dict[str, Any]], TTableSchemaColumns]] = {
    "projects": (
        "/gitpod.v1.ProjectService/ListProjects",
        "projects",
        lambda p: {"id": p.get("id"), "name": (p.get("metadata") or {}).get("name")},
        _text_columns("id", "name"),
    ),
    "environment_classes": (
        "/gitpod.v1.EnvironmentService/ListEnvironmentClasses",
        "environmentClasses",
        lambda c: {
            "id": c.get("id"),
            "name": c.get("displayName"),
            "description": c.get("description"),
            "runner_id": c.get("runnerId"),
        },
        _text_columns("id", "name", "description", "runner_id"),
    ),
    "runners": (
        "/gitpod.v1.RunnerService/ListRunners",
        "runners",
        lambda r: {"id": r.get("runnerId"), "name": r.get("name")},
        _text_columns("id", "name"),
    ),
}


def name_resources(config: Settings, client: UsageClient | None = None) -> list[DltResource]:
    """A `replace` resource per list; each uses `client`, or a client of its own that it closes."""
    return [_name_resource(table, config, client) for table in CATALOG]


def _name_resource(table: str, config: Settings, client: UsageClient | None) -> DltResource:
    path, key, to_row, columns = CATALOG[table]

    @dlt.resource(name=table, write_disposition="replace", primary_key="id", columns=columns)
    def names() -> Iterator[list[dict[str, Any]]]:
        with contextlib.ExitStack() as stack:
            api = client or stack.enter_context(make_client(config))
            try:
                items = api.list_all(path, key)
            except OnaApiError as exc:
                logger.warning("%s are left out (their names stay unknown): %s", table.replace("_", " "), exc)
                return
        yield [row for row in map(to_row, items) if row["id"]]

    return names
