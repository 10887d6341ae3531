"""Names for the ids in usage records: projects, environment classes and runners.

Each is a small list endpoint of Ona's API (as the official SDK calls them), loaded as its own
table of the same source and replaced whenever it changed. A key that may not list one of them (or
an API that does not offer it) costs that table, with one warning, and never the usage load.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import dlt
from dlt.common.schema.typing import TTableSchemaColumns
from dlt.extract.resource import DltResource

from ona_usage.client import OnaApiError, UsageClient, make_client
from ona_usage.records import ORGANIZATION_COLUMN
from ona_usage.settings import Settings
from ona_usage.state import SOURCE_NAME

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
    # people who left are not listed: their usage keeps its user_id, with no name
    "members": (
        "/gitpod.v1.OrganizationService/ListMembers",
        "members",
        lambda m: {
            "user_id": m.get("userId"),
            "name": m.get("fullName"),
            "email": m.get("email"),
            "role": _enum(m.get("role"), "ORGANIZATION_ROLE_"),
            "status": _enum(m.get("status"), "USER_STATUS_"),
            "member_since": m.get("memberSince"),
        },
        {
            **_text_columns("user_id", "name", "email", "role", "status"),
            "member_since": {"name": "member_since", "data_type": "timestamp", "nullable": True},
        },
    ),
}


def _enum(value: str | None, prefix: str) -> str | None:
    """`ORGANIZATION_ROLE_ADMIN` as `admin`: the API's enums in the words people use."""
    return value[len(prefix) :].lower() if isinstance(value, str) and value.startswith(prefix) else value


RATE_CARD_COLUMNS: TTableSchemaColumns = {
    "environment_class": {"name": "environment_class", "data_type": "text", "nullable": False},
    "credits_per_hour": {"name": "credits_per_hour", "data_type": "double", "nullable": False},
    "valid_from": {"name": "valid_from", "data_type": "date", "nullable": True},
    "credit_price": {"name": "credit_price", "data_type": "double", "nullable": True},
    "currency": {"name": "currency", "data_type": "text", "nullable": True},
}


def rate_card_resource(config: Settings) -> DltResource:
    """The team's rate card (`rate_card` / `rate_card_file` in config) as a table the models price hours with.

    dlt empties a `replace` table its run includes, data or not: a runner that leaves the rate
    card alone leaves it out of the run (`rate_card_changed`), and this remembers what it wrote.
    """
    rows = [rate._asdict() for rate in config.rate_card]

    @dlt.resource(name="rate_card", write_disposition="replace", columns=RATE_CARD_COLUMNS)
    def rate_card() -> Iterator[list[dict[str, Any]]]:
        changed("rate_card", rows)
        yield rows

    return rate_card


def rate_card_changed(config: Settings, pipeline_state: dict[str, Any]) -> bool:
    """Whether the configured rate card differs from the one this pipeline last committed."""
    digests = pipeline_state.get("sources", {}).get(SOURCE_NAME, {}).get("list_digests", {})
    return digests.get("rate_card") != _digest([rate._asdict() for rate in config.rate_card])


def _digest(rows: list[dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()


def changed(table: str, rows: list[dict[str, Any]]) -> bool:
    """Whether `rows` differ from what was last loaded into `table`; remembers them if so.

    A list rarely changes between two scheduled runs: writing it again would cost every run a
    load job per table, and would make the models look changed when nothing is. The digests are
    kept in the source's state, so one is committed with the load that wrote its rows, or not
    at all.
    """
    digest = _digest(rows)
    digests = dlt.current.source_state().setdefault("list_digests", {})
    if digests.get(table) == digest:
        return False
    digests[table] = digest
    return True


# every list's rows carry the organization they are of (see `records.ORGANIZATION_COLUMN`)
ORGANIZATION: TTableSchemaColumns = {ORGANIZATION_COLUMN: {"name": ORGANIZATION_COLUMN, "data_type": "text", "nullable": False}}


def name_resources(config: Settings, client: UsageClient | None = None, *, every_run: bool = False) -> list[DltResource]:
    """A resource per list; each uses `client`, or a client of its own that it closes.

    With a `client`, the lists are requested at once, each on a thread of its own, while the
    caller goes on: a scheduled run that finds nothing new waits one round trip for them, not
    one per list. A list is written only when it changed (see `changed`), or on every run with
    `every_run`: loaded with `replace` (the filesystem destination), a table the run includes
    without rows would be emptied.

    Several organizations may share a dataset, so each list is replaced per organization: its
    rows carry `organization_id`, and a load deletes that organization's rows before it inserts
    (dlt's delete-insert merge on that key). A list the key may not read keeps what it had.
    """
    listings: dict[str, Future[tuple[str, list[dict[str, Any]]]]] = {}
    if client is not None:
        pool = ThreadPoolExecutor(len(CATALOG), thread_name_prefix="ona-list")
        listings = {table: pool.submit(_listing, table, client) for table in CATALOG}
        pool.shutdown(wait=False)  # its threads end with their one request each
    return [_name_resource(table, config, listings.get(table), every_run) for table in CATALOG]


def _listing(table: str, api: UsageClient) -> tuple[str, list[dict[str, Any]]]:
    """The organization, and every item of the list `table` holds."""
    path, key, _, _ = CATALOG[table]
    organization_id = api.organization_id()
    scope = {"organizationId": organization_id} if table == "members" else {}
    return organization_id, api.list_all(path, key, **scope)


def _name_resource(
    table: str, config: Settings, listing: Future[tuple[str, list[dict[str, Any]]]] | None, every_run: bool
) -> DltResource:
    _, _, to_row, columns = CATALOG[table]
    id_column = next(iter(columns))  # a list's rows are keyed by their first column

    @dlt.resource(
        name=table,
        write_disposition={"disposition": "merge", "strategy": "delete-insert"},
        primary_key=(id_column, ORGANIZATION_COLUMN),
        merge_key=ORGANIZATION_COLUMN,
        columns={**columns, **ORGANIZATION},
    )
    def names() -> Iterator[list[dict[str, Any]]]:
        try:
            if listing is not None:
                organization_id, items = listing.result()
            else:
                with make_client(config) as api:
                    organization_id, items = _listing(table, api)
        except OnaApiError as exc:
            logger.warning("%s are left out (their names stay unknown): %s", table.replace("_", " "), exc)
            return
        rows = [{**row, ORGANIZATION_COLUMN: organization_id} for row in map(to_row, items) if row[id_column]]
        if every_run or changed(table, rows):
            yield rows

    return names
