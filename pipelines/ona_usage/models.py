"""The analyst models: usage per UTC day and per month, with names, as tables dlt loads.

They are tables, not views, because dlt's dataset API reads only tables its schema knows:
`pipeline.dataset()["environment_usage_daily"]` and SQL through the dataset work on every
destination, and `dlt pipeline ... info` lists them. `ona_usage_models(pipeline)` computes them
in the destination from the usage and name tables (one query each, Arrow batches out) and is
run like any source, so a dlt user gets them with one call after loading the usage:

    pipeline.run(ona_usage(...))
    pipeline.run(ona_usage_models(pipeline))

The SQL is written once, in PostgreSQL's dialect, and sqlglot (which dlt already uses)
translates it for the destination at hand. Runtime is `stopped_at - created_at`, split across
the UTC days a run spans: a run from 22:00 to 02:00 counts two hours on each day. A run counts
as one run on the day it stopped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import dlt
import pyarrow as pa
import sqlglot
from dlt.common.schema.typing import TTableSchemaColumns
from dlt.extract.resource import DltResource
from dlt.extract.source import DltSource

from ona_usage.state import RESOURCE_NAME

logger = logging.getLogger(__name__)

DAILY_MODEL = "environment_usage_daily"
MONTHLY_MODEL = "environment_usage_monthly"
MODELS = (DAILY_MODEL, MONTHLY_MODEL)
BATCH_ROWS = 100_000

# {records} is the qualified raw table. Times are taken as UTC whatever the session's zone.
DAILY_SQL = """
SELECT
  CAST(s.day AS DATE) AS usage_date,
  r.user_id,
  r.project_id,
  r.environment_class_id,
  r.runner_id,
  CAST(SUM(CASE WHEN s.day = DATE_TRUNC('day', r.stop_utc) THEN 1 ELSE 0 END) AS BIGINT) AS runs,
  CAST(SUM(EXTRACT(EPOCH FROM (LEAST(r.stop_utc, s.day + INTERVAL '1 day') - GREATEST(r.start_utc, s.day)))) / 3600.0
    AS DOUBLE PRECISION) AS runtime_hours
FROM (
  SELECT
    user_id,
    project_id,
    environment_class_id,
    runner_id,
    CAST(LEAST(COALESCE(created_at, stopped_at), stopped_at) AT TIME ZONE 'UTC' AS TIMESTAMP) AS start_utc,
    CAST(stopped_at AT TIME ZONE 'UTC' AS TIMESTAMP) AS stop_utc
  FROM {records}
) AS r
CROSS JOIN LATERAL (
  SELECT GENERATE_SERIES(DATE_TRUNC('day', r.start_utc), DATE_TRUNC('day', r.stop_utc), INTERVAL '1 day') AS day
) AS s
GROUP BY 1, 2, 3, 4, 5
"""

MONTHLY_SQL = """
SELECT
  CAST(DATE_TRUNC('month', usage_date) AS DATE) AS usage_month,
  user_id,
  project_id,
  environment_class_id,
  runner_id,
  CAST(SUM(runs) AS BIGINT) AS runs,
  CAST(SUM(runtime_hours) AS DOUBLE PRECISION) AS runtime_hours,
  project_name,
  environment_class_name,
  runner_name
FROM ({daily}) AS d
GROUP BY 1, 2, 3, 4, 5, 8, 9, 10
"""

# (names table, the id column it names, the model's name column)
NAMED = (
    ("projects", "project_id", "project_name"),
    ("environment_classes", "environment_class_id", "environment_class_name"),
    ("runners", "runner_id", "runner_name"),
)


def _columns(first: tuple[str, str]) -> TTableSchemaColumns:
    texts = ("user_id", "project_id", "environment_class_id", "runner_id")
    names = tuple(name for _, _, name in NAMED)
    # nullable throughout, as the Arrow batches the destination returns say
    columns: TTableSchemaColumns = {first[0]: {"name": first[0], "data_type": first[1], "nullable": True}}
    columns.update({c: {"name": c, "data_type": "text", "nullable": True} for c in texts})
    columns["runs"] = {"name": "runs", "data_type": "bigint", "nullable": True}
    columns["runtime_hours"] = {"name": "runtime_hours", "data_type": "double", "nullable": True}
    columns.update({c: {"name": c, "data_type": "text", "nullable": True} for c in names})
    return columns


COLUMNS = {DAILY_MODEL: _columns(("usage_date", "date")), MONTHLY_MODEL: _columns(("usage_month", "date"))}


def ona_usage_models(pipeline: dlt.Pipeline) -> DltSource:
    """The daily and monthly models of `pipeline`'s usage, replaced on every run of this source.

    Run it with the same pipeline after the usage is loaded. It reads the destination through
    `pipeline.sql_client()`, so it needs a SQL destination (not the filesystem).
    """
    from ona_usage.source import source_of

    return source_of([_model(pipeline, name) for name in MODELS])


def refresh_models(pipeline: dlt.Pipeline) -> bool:
    """Load the models after the usage; False where there is nothing to model or no SQL."""
    if not has_sql(pipeline):
        logger.info("no models on the %s destination", pipeline.destination.destination_name)
        return False
    if RESOURCE_NAME not in pipeline.default_schema.data_table_names(seen_data_only=True):
        return False  # no usage loaded yet
    pipeline.run(ona_usage_models(pipeline))
    return True


def has_sql(pipeline: dlt.Pipeline) -> bool:
    return pipeline.destination.destination_name != "filesystem" and bool(
        pipeline.destination.capabilities().sqlglot_dialect
    )


def _model(pipeline: dlt.Pipeline, name: str) -> DltResource:
    @dlt.resource(name=name, write_disposition="replace", columns=COLUMNS[name])
    def model() -> Iterator[pa.Table]:
        with pipeline.sql_client() as client:
            loaded = set(pipeline.default_schema.data_table_names(seen_data_only=True))
            name_tables = {t: client.make_qualified_table_name(t) for t, _, _ in NAMED if t in loaded}
            daily = _with_names(DAILY_SQL.format(records=client.make_qualified_table_name(RESOURCE_NAME)), name_tables)
            sql = daily if name == DAILY_MODEL else MONTHLY_SQL.format(daily=daily)
            dialect = pipeline.destination.capabilities().sqlglot_dialect
            with client.execute_query(sqlglot.transpile(sql, read="postgres", write=dialect)[0]) as cursor:
                yield from cursor.iter_arrow(chunk_size=BATCH_ROWS)

    return model


def _with_names(usage_sql: str, name_tables: dict[str, str]) -> str:
    """The usage rows with a name column per id: joined where the names were loaded, else null."""
    columns, joins = [], []
    for table, id_column, name_column in NAMED:
        qualified = name_tables.get(table)
        if qualified:
            alias = f"n_{table}"
            columns.append(f"{alias}.name AS {name_column}")
            joins.append(f"LEFT JOIN {qualified} AS {alias} ON {alias}.id = u.{id_column}")
        else:
            columns.append(f"CAST(NULL AS TEXT) AS {name_column}")
    return f"SELECT u.*, {', '.join(columns)} FROM ({usage_sql}) AS u {' '.join(joins)}"
