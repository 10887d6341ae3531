"""Analyst views beside the raw table, (re)created after every load.

The SQL is written once, in PostgreSQL's dialect, and sqlglot (which dlt already uses)
translates it for the destination at hand, DuckDB included. Runtime is `stopped_at -
created_at`, split across the UTC days a run spans: a run from 22:00 to 02:00 counts two hours
on each day. A run counts as one run on the day it stopped. Each view carries the names of
projects, environment classes and runners where they were loaded (null where not).
"""

from __future__ import annotations

import logging

import dlt
import sqlglot

from ona_usage.source import RESOURCE_NAME

logger = logging.getLogger(__name__)

DAILY_VIEW = "environment_usage_daily"
MONTHLY_VIEW = "environment_usage_monthly"

# {records} is the qualified raw table. Times are taken as UTC whatever the session's zone.
DAILY_SQL = """
SELECT
  CAST(s.day AS DATE) AS usage_date,
  r.user_id,
  r.project_id,
  r.environment_class_id,
  r.runner_id,
  SUM(CASE WHEN s.day = DATE_TRUNC('day', r.stop_utc) THEN 1 ELSE 0 END) AS runs,
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
  SUM(runs) AS runs,
  SUM(runtime_hours) AS runtime_hours,
  project_name,
  environment_class_name,
  runner_name
FROM {daily}
GROUP BY 1, 2, 3, 4, 5, 8, 9, 10
"""

# (names table, the id column it names, the view's name column)
NAMED = (
    ("projects", "project_id", "project_name"),
    ("environment_classes", "environment_class_id", "environment_class_name"),
    ("runners", "runner_id", "runner_name"),
)


def _with_names(usage_sql: str, name_tables: dict[str, str | None]) -> str:
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


def view_statements(
    dialect: str, records: str, daily: str, monthly: str, name_tables: dict[str, str | None] | None = None
) -> list[str]:
    """`CREATE OR REPLACE VIEW` statements for the destination's SQL dialect."""
    statements = []
    daily_sql = _with_names(DAILY_SQL.format(records=records), name_tables or {})
    for name, sql in ((daily, daily_sql), (monthly, MONTHLY_SQL.format(daily=daily))):
        body = sqlglot.transpile(sql, read="postgres", write=dialect)[0]
        statements.append(f"CREATE OR REPLACE VIEW {name} AS {body}")
    return statements


def create_views(pipeline: dlt.Pipeline) -> bool:
    """(Re)create the views in the pipeline's dataset; False where the destination has no SQL."""
    dialect = pipeline.destination.capabilities().sqlglot_dialect
    if pipeline.destination.destination_name == "filesystem" or not dialect:
        logger.info("no SQL views on the %s destination", pipeline.destination.destination_name)
        return False
    loaded = set(pipeline.default_schema.data_table_names(seen_data_only=True))
    if RESOURCE_NAME not in loaded:
        return False  # no usage loaded yet, so no table for the views to read
    with pipeline.sql_client() as client:
        names = [client.make_qualified_table_name(n) for n in (RESOURCE_NAME, DAILY_VIEW, MONTHLY_VIEW)]
        name_tables = {t: client.make_qualified_table_name(t) for t, _, _ in NAMED if t in loaded}
        # a view must go before its shape changes (names appear): CREATE OR REPLACE will not widen it
        for view in (MONTHLY_VIEW, DAILY_VIEW):
            client.execute_sql(f"DROP VIEW IF EXISTS {client.make_qualified_table_name(view)}")
        for statement in view_statements(dialect, *names, name_tables):
            client.execute_sql(statement)
    return True


def drop_views(pipeline: dlt.Pipeline) -> None:
    if pipeline.destination.destination_name == "filesystem":
        return
    with pipeline.sql_client() as client:
        for name in (MONTHLY_VIEW, DAILY_VIEW):
            client.execute_sql(f"DROP VIEW IF EXISTS {client.make_qualified_table_name(name)}")
