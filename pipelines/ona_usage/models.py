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

import json
import logging
import re
from collections import defaultdict
from collections.abc import Iterator
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, NamedTuple

import dlt
import pyarrow as pa
import sqlglot
from dlt.common.schema.typing import TTableSchemaColumns
from dlt.extract.resource import DltResource
from dlt.extract.source import DltSource
from dlt.pipeline.trace import PipelineTrace

from ona_usage.state import CURSOR_COLUMN, RESOURCE_NAME, SOURCE_NAME

logger = logging.getLogger(__name__)

DAILY_MODEL = "environment_usage_daily"
MONTHLY_MODEL = "environment_usage_monthly"
MODELS = (DAILY_MODEL, MONTHLY_MODEL)
BATCH_ROWS = 100_000
# A query of the models reads at most one run-day (a run counts once on each UTC day it spans)
# per this many bytes of DuckDB's memory limit, and at most SLICE_RUN_DAYS where the destination
# sets none: its groups, and so its memory, are bounded by what it reads, not by the table.
# Measured: one group of the daily model with its names takes about 650 bytes in DuckDB.
BYTES_PER_RUN_DAY = 2048
SLICE_RUN_DAYS = 100_000
UserRange = tuple[str | None, str | None]  # a slice's user_id in [low, high); None: that end is open
ALL_USERS: UserRange = (None, None)
_UNITS = {"B": 1, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40,
          "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}

# {records} is the qualified raw table. Times are taken as UTC whatever the session's zone.
# The days a run spans come from a set-returning function in the select list, not a LATERAL
# join: DuckDB runs that as a projection, about 3x faster over a year of a million runs.
DAILY_SQL = """
SELECT
  CAST(r.day AS DATE) AS usage_date,
  r.organization_id,
  r.user_id,
  r.project_id,
  r.environment_class_id,
  r.runner_id,
  CAST(SUM(CASE WHEN r.day = DATE_TRUNC('day', r.stop_utc) THEN 1 ELSE 0 END) AS BIGINT) AS runs,
  CAST(SUM(EXTRACT(EPOCH FROM (LEAST(r.stop_utc, r.day + INTERVAL '1 day') - GREATEST(r.start_utc, r.day)))) / 3600.0
    AS DOUBLE PRECISION) AS runtime_hours
FROM (
  SELECT
    t.*,
    GENERATE_SERIES({first_day}, {last_day}, INTERVAL '1 day') AS day
  FROM (
    SELECT
      {organization} AS organization_id,
      user_id,
      project_id,
      environment_class_id,
      runner_id,
      CAST(LEAST(COALESCE(created_at, stopped_at), stopped_at) AT TIME ZONE 'UTC' AS TIMESTAMP) AS start_utc,
      CAST(stopped_at AT TIME ZONE 'UTC' AS TIMESTAMP) AS stop_utc
    FROM {records} {runs_from}
  ) AS t
) AS r
GROUP BY 1, 2, 3, 4, 5, 6
"""

# How many runs start on one UTC day and stop on another: the days each run adds a row to, from
# which the refresh cuts its slices. A few rows per day, whatever the number of records.
SPANS_SQL = """
SELECT CAST(start_utc AS DATE), CAST(stop_utc AS DATE), COUNT(*)
FROM (
  SELECT
    CAST(LEAST(COALESCE(created_at, stopped_at), stopped_at) AT TIME ZONE 'UTC' AS TIMESTAMP) AS start_utc,
    CAST(stopped_at AT TIME ZONE 'UTC' AS TIMESTAMP) AS stop_utc
  FROM {records} {runs_from}
) AS t
GROUP BY 1, 2
"""

# The first UTC day a run among those that stopped at or after {since} was running on.
FIRST_DAY_SQL = """
SELECT MIN(CAST(CAST(LEAST(COALESCE(created_at, stopped_at), stopped_at) AT TIME ZONE 'UTC' AS TIMESTAMP) AS DATE))
FROM {records}
WHERE stopped_at >= CAST('{since}' AS TIMESTAMP WITH TIME ZONE)
"""

# A month's credits and cost are known only if every day of it is priced: never a partial sum.
MONTHLY_SQL = """
SELECT
  CAST(DATE_TRUNC('month', usage_date) AS DATE) AS usage_month,
  organization_id,
  user_id,
  project_id,
  environment_class_id,
  runner_id,
  CAST(SUM(runs) AS BIGINT) AS runs,
  CAST(SUM(runtime_hours) AS DOUBLE PRECISION) AS runtime_hours,
  project_name,
  environment_class_name,
  runner_name,
  user_name,
  user_email,
  CASE WHEN COUNT(credits) = COUNT(*) THEN CAST(SUM(credits) AS DOUBLE PRECISION) END AS credits,
  CASE WHEN COUNT(cost) = COUNT(*) THEN CAST(SUM(cost) AS DOUBLE PRECISION) END AS cost,
  MAX(currency) AS currency
FROM ({daily}) AS d
GROUP BY 1, 2, 3, 4, 5, 6, 9, 10, 11, 12, 13
"""

# The rate valid on a day: the latest `valid_from` on or before it. A rate names its class by
# id or by display name (as ListEnvironmentClasses gives it).
PRICED_SQL = """
SELECT
  n.*,
  n.runtime_hours * p.credits_per_hour AS credits,
  n.runtime_hours * p.credits_per_hour * p.credit_price AS cost,
  p.currency
FROM ({named}) AS n
LEFT JOIN (
  SELECT
    q.*,
    LEAD(q.valid_from) OVER (PARTITION BY q.environment_class_id ORDER BY q.valid_from) AS valid_until
  FROM (
    SELECT
      {class_id} AS environment_class_id,
      CAST(r.credits_per_hour AS DOUBLE PRECISION) AS credits_per_hour,
      CAST(r.credit_price AS DOUBLE PRECISION) AS credit_price,
      r.currency,
      COALESCE(r.valid_from, CAST('1970-01-01' AS DATE)) AS valid_from
    FROM {rate_card} AS r {class_join}
  ) AS q
) AS p
  ON p.environment_class_id = n.environment_class_id
  AND n.usage_date >= p.valid_from
  AND (p.valid_until IS NULL OR n.usage_date < p.valid_until)
"""

UNPRICED_SQL = """
SELECT n.*, CAST(NULL AS DOUBLE PRECISION) AS credits, CAST(NULL AS DOUBLE PRECISION) AS cost, CAST(NULL AS TEXT) AS currency
FROM ({named}) AS n
"""

PENDING_REFRESH = "models_pending_refresh"  # in the source state: see `models_current`

# the tables besides the usage records the models read
INPUTS = ("projects", "environment_classes", "runners", "members", "rate_card")

# (names table, the id column it names, the model's name column, the table's own id column)
NAMED = (
    ("projects", "project_id", "project_name", "id"),
    ("environment_classes", "environment_class_id", "environment_class_name", "id"),
    ("runners", "runner_id", "runner_name", "id"),
    ("members", "user_id", "user_name", "user_id"),
)


def _columns(first: tuple[str, str]) -> TTableSchemaColumns:
    texts = ("organization_id", "user_id", "project_id", "environment_class_id", "runner_id")
    names = (*(name for _, _, name, _ in NAMED), "user_email")
    # nullable throughout, as the Arrow batches the destination returns say
    columns: TTableSchemaColumns = {first[0]: {"name": first[0], "data_type": first[1], "nullable": True}}
    columns.update({c: {"name": c, "data_type": "text", "nullable": True} for c in texts})
    columns["runs"] = {"name": "runs", "data_type": "bigint", "nullable": True}
    columns["runtime_hours"] = {"name": "runtime_hours", "data_type": "double", "nullable": True}
    columns.update({c: {"name": c, "data_type": "text", "nullable": True} for c in names})
    columns["credits"] = {"name": "credits", "data_type": "double", "nullable": True}
    columns["cost"] = {"name": "cost", "data_type": "double", "nullable": True}
    columns["currency"] = {"name": "currency", "data_type": "text", "nullable": True}
    return columns


COLUMNS = {DAILY_MODEL: _columns(("usage_date", "date")), MONTHLY_MODEL: _columns(("usage_month", "date"))}


def ona_usage_models(pipeline: dlt.Pipeline) -> DltSource:
    """The daily and monthly models of `pipeline`'s usage, replaced on every run of this source.

    Run it with the same pipeline after the usage is loaded. It reads the destination through
    `pipeline.sql_client()`, so it needs a SQL destination (not the filesystem).
    """
    from ona_usage.source import source_of

    return source_of([_model(pipeline, name) for name in MODELS])


def refresh_models(
    pipeline: dlt.Pipeline,
    unchanged_since: str | None = None,
    touched_from: datetime | None = None,
    *,
    only_touched: bool = False,
    ran_from_before: date | None = None,
) -> list[PipelineTrace]:
    """Load the models after the usage, and return the runs' traces: none where there is nothing
    to model, no SQL, or no change.

    `unchanged_since` is `inputs_fingerprint(pipeline, touched_from)` from before the command's
    loads: when the inputs still have it (a scheduled run that only read its lookback again),
    the models stand. With `only_touched` (the models were current before the command, and it
    wrote no list and no rate card), only the days from the first one a run that stopped at or
    after `touched_from` was running on are computed again, and merged over the old ones: an
    hourly run costs what it loaded, not the size of the table. `ran_from_before` is that day
    from before the loads, when a record read again may have said it started earlier.
    """
    if not has_sql(pipeline):
        logger.info("no models on the %s destination", pipeline.destination.destination_name)
        return []
    loaded = loaded_tables(pipeline)
    if RESOURCE_NAME not in loaded:
        return []  # no usage loaded yet
    if unchanged_since is not None and set(MODELS) <= loaded and inputs_fingerprint(pipeline, touched_from) == unchanged_since:
        return []
    from_day = None
    if only_touched and touched_from is not None:
        days = [day for day in (first_touched_day(pipeline, touched_from), ran_from_before) if day is not None]
        if not days:
            return []  # the command's windows hold no usage: no day changed
        from_day = min(days)
    # One model per run: dlt extracts a source's resources round-robin, which would keep both
    # queries open at once, and DuckDB would need twice the memory (the sync caps it). Run after
    # the daily model, the monthly one sums its table instead of computing every day again.
    from ona_usage.source import source_of

    traces = []
    for model in MODELS:
        pipeline.run(source_of([_model(pipeline, model, from_daily_table=True, from_day=from_day)]))
        traces.append(pipeline.last_trace)
    return traces


def first_touched_day(pipeline: dlt.Pipeline, touched_from: datetime) -> date | None:
    """The first UTC day that usage rows a command could have written ran on; None if it wrote none.

    Its loads wrote only rows that stopped at or after `touched_from` (the start of its first
    window). A run counts on every day from its start to its stop, so those days, and no
    other, can have changed: a row stopped earlier adds nothing from that day on.
    """
    with pipeline.sql_client() as client:
        sql = FIRST_DAY_SQL.format(records=client.make_qualified_table_name(RESOURCE_NAME), since=_utc_text(touched_from))
        value = client.execute_sql(_for_destination(pipeline, sql))[0][0]
    if value is None:
        return None
    return value if not isinstance(value, datetime) else value.date()


def _for_destination(pipeline: dlt.Pipeline, sql: str) -> str:
    """The models' SQL, written in PostgreSQL's dialect, in the destination's."""
    return sqlglot.transpile(sql, read="postgres", write=pipeline.destination.capabilities().sqlglot_dialect)[0]


def _utc_text(moment: datetime) -> str:
    """An aware moment as ISO text in UTC, for a literal in a query (it holds nothing but digits)."""
    return moment.astimezone(timezone.utc).isoformat()


def inputs_fingerprint(pipeline: dlt.Pipeline, touched_from: datetime | None = None) -> str | None:
    """A hash of the rows the models are computed from, where the destination computes one cheaply (DuckDB).

    A command's loads write only usage rows that stopped at or after `touched_from` (the start
    of its first window): merged on `id`, a row they replace leaves the count changed or a new
    row in that range. So the usage rows before it are counted, not hashed, and the hash costs
    what the command fetched, not the size of the table. The lists are small: hashed whole.
    """
    if pipeline.destination.destination_name != "duckdb" or not pipeline.default_schema_name:
        return None
    schema = pipeline.default_schema  # dlt reads the schema again on every access
    loaded = set(schema.data_table_names(seen_data_only=True))
    tables = [t for t in (RESOURCE_NAME, *INPUTS) if t in loaded]
    if RESOURCE_NAME not in tables:
        return None
    with pipeline.sql_client() as client:
        parts = []
        for table in tables:
            columns = [c for c in schema.get_table_columns(table) if not c.startswith("_dlt_")]
            touched = f"WHERE {CURSOR_COLUMN} >= ?" if table == RESOURCE_NAME and touched_from else ""
            row = client.execute_sql(
                f"SELECT (SELECT count(*) FROM {client.make_qualified_table_name(table)}), "
                f"sum(hash({', '.join(client.escape_column_name(c) for c in columns)})) "
                f"FROM {client.make_qualified_table_name(table)} {touched}",
                *([touched_from] if touched else []),
            )[0]
            parts.append(f"{table}:{row[0]}:{row[1]}")
    return "|".join(parts)


def models_current(pipeline: dlt.Pipeline) -> bool:
    """Whether the models were refreshed after every change to their inputs.

    A command's first load commits, in the source state, where its windows start and the
    inputs' fingerprint from before its loads (`pending_refresh`); the load of the monthly
    model, the last, clears it. Left behind, it tells a refresh that failed or was cut short
    (the inputs changed since: the models are stale) from one skipped because nothing changed.
    Without a fingerprint (destinations other than DuckDB), it counts as stale.
    """
    if not set(MODELS) <= loaded_tables(pipeline):
        return False
    pending = pipeline.state.get("sources", {}).get(SOURCE_NAME, {}).get(PENDING_REFRESH)
    if not pending:
        return True
    return pending["fingerprint"] is not None and inputs_fingerprint(pipeline, pending["touched_from"]) == pending["fingerprint"]


REFRESH_ERROR_FILE = "models_refresh_error.json"  # in the pipeline's local folder


def record_refresh_error(pipeline: dlt.Pipeline, error: BaseException) -> None:
    """Keep the failed refresh's error beside the pipeline, for `status`: the loads stay committed
    and the next run refreshes the models again, but until then they are stale, and say why."""
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    path = Path(pipeline.working_dir) / REFRESH_ERROR_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"at": datetime.now(timezone.utc).isoformat(), "error": f"{type(error).__name__}: {first_line}"}))


def clear_refresh_error(pipeline: dlt.Pipeline) -> None:
    (Path(pipeline.working_dir) / REFRESH_ERROR_FILE).unlink(missing_ok=True)


def last_refresh_error(pipeline: dlt.Pipeline) -> dict[str, str] | None:
    try:
        return json.loads((Path(pipeline.working_dir) / REFRESH_ERROR_FILE).read_text())
    except (OSError, ValueError):
        return None


def pending_refresh(touched_from: datetime | None, fingerprint: str | None) -> dict[str, Any]:
    """The source-state entry a command commits with its first load (see `models_current`)."""
    return {PENDING_REFRESH: {"touched_from": touched_from, "fingerprint": fingerprint}}


def loaded_tables(pipeline: dlt.Pipeline) -> set[str]:
    """The tables this pipeline has loaded data into; none before its first load."""
    if not pipeline.default_schema_name:
        return set()
    return set(pipeline.default_schema.data_table_names(seen_data_only=True))


def has_sql(pipeline: dlt.Pipeline) -> bool:
    return pipeline.destination.destination_name != "filesystem" and bool(
        pipeline.destination.capabilities().sqlglot_dialect
    )


def _model(
    pipeline: dlt.Pipeline, name: str, *, from_daily_table: bool = False, from_day: date | None = None
) -> DltResource:
    """A model as a resource, replaced whole; or, `from_day`, its days (months) from that one's
    computed again and merged over the old. `from_daily_table` where the daily model was just loaded."""
    key = next(iter(COLUMNS[name]))  # usage_date, usage_month
    merged = from_day is not None

    @dlt.resource(
        name=name,
        write_disposition={"disposition": "merge", "strategy": "delete-insert"} if merged else "replace",
        merge_key=key if merged else None,
        columns=COLUMNS[name],
    )
    def model() -> Iterator[pa.Table]:
        with pipeline.sql_client() as client:
            for sql in _slice_queries(pipeline, client, name, from_daily_table, from_day):
                with client.execute_query(_for_destination(pipeline, sql)) as cursor:
                    yield from cursor.iter_arrow(chunk_size=BATCH_ROWS)
        if name == MONTHLY_MODEL:  # the last model: the refresh is complete, with this load
            dlt.current.source_state().pop(PENDING_REFRESH, None)

    return model


def _slice_queries(
    pipeline: dlt.Pipeline, client: Any, name: str, from_daily_table: bool, from_day: date | None
) -> Iterator[str]:
    """The model's queries, one per slice of days (months) and users: together they hold every
    day (month) from `from_day` on, and every user, once; each only what `slice_bound` bounds."""
    if name == DAILY_MODEL:
        for first, until, stopped_before, users in day_slices(pipeline, client, from_day):
            yield daily_sql(pipeline, client, first, until, stopped_before, users)
        return
    from_month = from_day.replace(day=1) if from_day else None
    if not from_daily_table:  # self-contained: each month's days computed from the usage
        for first, until, users in month_slices(pipeline, client, from_month, from_usage=True):
            yield MONTHLY_SQL.format(daily=daily_sql(pipeline, client, first, until, users=users))
        return
    daily = client.make_qualified_table_name(DAILY_MODEL)
    for first, until, users in month_slices(pipeline, client, from_month):
        days = f"usage_date >= CAST('{first.isoformat()}' AS DATE) AND usage_date < CAST('{until.isoformat()}' AS DATE)"
        yield MONTHLY_SQL.format(daily=f"SELECT * FROM {daily} WHERE {' AND '.join([days, *_users_in(users)])}")


def daily_sql(
    pipeline: dlt.Pipeline,
    client: Any,
    from_day: date | None = None,
    until_day: date | None = None,
    stopped_before: date | None = None,
    users: UserRange = ALL_USERS,
) -> str:
    """The daily model's query (PostgreSQL dialect) over the tables this pipeline has loaded;
    with `from_day` and `until_day`, its days in [from_day, until_day) alone, which only the runs
    that were running on one of them add to; with `users`, those users' rows alone. `stopped_before`,
    a day no such run stopped on or after, lets the destination skip the rest of the table (DuckDB's
    zone maps on stopped_at)."""
    schema = pipeline.default_schema
    loaded = set(schema.data_table_names(seen_data_only=True))
    columns = schema.get_table_columns(RESOURCE_NAME)
    table = {t: client.make_qualified_table_name(t) for t in (RESOURCE_NAME, *INPUTS) if t in loaded}
    first_day, last_day = "DATE_TRUNC('day', t.start_utc)", "DATE_TRUNC('day', t.stop_utc)"
    if from_day:
        first_day = f"GREATEST({first_day}, {_day_literal(from_day)})"
    if until_day:
        last_day = f"LEAST({last_day}, {_day_literal(until_day - timedelta(days=1))})"
    usage = DAILY_SQL.format(
        records=table[RESOURCE_NAME],
        organization="organization_id" if "organization_id" in columns else "CAST(NULL AS TEXT)",
        runs_from=_runs_in(from_day, until_day, stopped_before, users),
        first_day=first_day,
        last_day=last_day,
    )
    named = _with_names(usage, table)
    if "rate_card" not in table:
        return UNPRICED_SQL.format(named=named)
    classes = table.get("environment_classes")
    return PRICED_SQL.format(
        named=named,
        rate_card=table["rate_card"],
        class_id="COALESCE(c.id, r.environment_class)" if classes else "r.environment_class",
        class_join=f"LEFT JOIN (SELECT MAX(id) AS id, name FROM {classes} GROUP BY name) AS c ON c.name = r.environment_class"
        if classes
        else "",
    )


def _runs_in(
    from_day: date | None, until_day: date | None, stopped_before: date | None = None, users: UserRange = ALL_USERS
) -> str:
    """A WHERE clause for the usage rows that were running on a day in [from_day, until_day)."""
    started = "LEAST(COALESCE(created_at, stopped_at), stopped_at)"
    conditions = []
    if stopped_before:
        conditions.append(f"stopped_at < CAST('{stopped_before.isoformat()}T00:00:00+00:00' AS TIMESTAMP WITH TIME ZONE)")
    if from_day:
        conditions.append(f"stopped_at >= CAST('{from_day.isoformat()}T00:00:00+00:00' AS TIMESTAMP WITH TIME ZONE)")
    if until_day:
        conditions.append(f"{started} < CAST('{until_day.isoformat()}T00:00:00+00:00' AS TIMESTAMP WITH TIME ZONE)")
    conditions += _users_in(users)
    return f"WHERE {' AND '.join(conditions)}" if conditions else ""


def _users_in(users: UserRange) -> list[str]:
    """The condition for `user_id` in [low, high), in the destination's own order; an open low end
    takes the rows without a user too, so the ranges of one cut hold every row exactly once."""
    low, high = users
    conditions = [f"user_id >= {_text_literal(low)}"] if low is not None else []
    if high is not None:
        below = f"user_id < {_text_literal(high)}"
        conditions.append(below if low is not None else f"(user_id IS NULL OR {below})")
    return conditions


def _text_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _day_literal(day: date) -> str:
    return f"CAST('{day.isoformat()}' AS TIMESTAMP)"


class DaySlice(NamedTuple):
    first: date  # the slice's days are [first, until)
    until: date
    stopped_before: date  # no run on one of its days stopped on this day or later
    users: UserRange = ALL_USERS


class MonthSlice(NamedTuple):
    first: date  # the slice's months are [first, until), each from its first day
    until: date
    users: UserRange = ALL_USERS


def day_slices(pipeline: dlt.Pipeline, client: Any, from_day: date | None = None) -> list[DaySlice]:
    """Consecutive slices of days from `from_day` (or the first) to the last, each holding at most
    `slice_bound` run-days: a day that holds more is cut by users instead.

    The model's memory grows with the groups a query holds, and those with the run-days it reads:
    days × users × projects × classes × runners for a busy organization, more where runs cross
    many midnights. One query per slice keeps that bounded whatever the shape of the data.
    """
    run_days, longest = _run_days(pipeline, client, from_day)
    bound = slice_bound(pipeline, client)
    slices = _cut(run_days, bound, lambda day: day + timedelta(days=1))
    users = _user_cuts(pipeline, client, _usage_users_sql(client, from_day), slices, bound)
    return [
        DaySlice(first, until, until + timedelta(days=longest + 1), part)
        for (first, until, _), parts in zip(slices, users)
        for part in parts
    ]


def _run_days(pipeline: dlt.Pipeline, client: Any, from_day: date | None) -> tuple[list[tuple[date, int]], int]:
    """The run-days on each day from `from_day` on, in order, and how many days the longest run spans."""
    sql = SPANS_SQL.format(records=client.make_qualified_table_name(RESOURCE_NAME), runs_from=_runs_in(from_day, None))
    run_days: dict[date, int] = defaultdict(int)
    longest = 0  # days between the start and the stop of the longest run
    for first, last, runs in client.execute_sql(_for_destination(pipeline, sql)):
        first, last = _as_date(first), _as_date(last)
        longest = max(longest, (last - first).days)
        if from_day and first < from_day:
            first = from_day
        while first <= last:
            run_days[first] += runs
            first += timedelta(days=1)
    return sorted(run_days.items()), longest


def slice_bound(pipeline: dlt.Pipeline, client: Any) -> int:
    """The run-days (or daily rows) one query may read: in proportion to DuckDB's memory limit."""
    if pipeline.destination.destination_name != "duckdb":
        return SLICE_RUN_DAYS
    text = str(client.execute_sql("SELECT current_setting('memory_limit')")[0][0])
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)\s*", text, flags=re.IGNORECASE)
    if not match:
        return SLICE_RUN_DAYS
    limit = float(match.group(1)) * _UNITS[match.group(2).upper()]
    return max(int(limit // BYTES_PER_RUN_DAY), 1_000)


def month_slices(
    pipeline: dlt.Pipeline, client: Any, from_month: date | None = None, *, from_usage: bool = False
) -> list[MonthSlice]:
    """Consecutive slices of months from `from_month` on, each holding at most `slice_bound` rows
    of the daily model (run-days, `from_usage`) where months allow; a month that holds more is cut
    by users instead, as its groups are: a month of a 10,000-engineer organization holds millions."""
    bound = slice_bound(pipeline, client)
    if from_usage:
        run_days, _ = _run_days(pipeline, client, from_month)
        weights: dict[date, int] = defaultdict(int)
        for day, runs in run_days:
            weights[day.replace(day=1)] += runs
        rows = sorted(weights.items())
        # one month per query: a month's days are computed in the query, and its groups held at once
        slices = [(month, _next_month(month), runs) for month, runs in rows]
        users_sql = _usage_users_sql(client, from_month)
    else:
        daily = client.make_qualified_table_name(DAILY_MODEL)
        where = f"WHERE usage_date >= CAST('{from_month.isoformat()}' AS DATE)" if from_month else ""
        sql = f"SELECT CAST(DATE_TRUNC('month', usage_date) AS DATE), COUNT(*) FROM {daily} {where} GROUP BY 1"
        rows = sorted((_as_date(month), count) for month, count in client.execute_sql(_for_destination(pipeline, sql)))
        slices = _cut(rows, bound, _next_month)
        users_sql = f"SELECT user_id, COUNT(*) AS n FROM {daily} {where} GROUP BY user_id"
    users = _user_cuts(pipeline, client, users_sql, slices, bound)
    return [MonthSlice(first, until, part) for (first, until, _), parts in zip(slices, users) for part in parts]


def _cut(weights: list[tuple[date, int]], bound: int, after: Any) -> list[tuple[date, date, int]]:
    """Greedy consecutive slices of sorted (key, weight) pairs with at most `bound` weight each;
    a key heavier than `bound` alone is a slice of its own. Each slice is [first key, after(last
    key)) with its weight."""
    slices: list[tuple[date, date, int]] = []
    first, last, total = None, None, 0
    for key, weight in weights:
        if first is not None and total + weight > bound:
            slices.append((first, after(last), total))
            first, total = None, 0
        if first is None:
            first = key
        last, total = key, total + weight
    if first is not None:
        slices.append((first, after(last), total))
    return slices


def _usage_users_sql(client: Any, from_day: date | None) -> str:
    """Rows per user of the usage that ran on a day from `from_day` on."""
    records = client.make_qualified_table_name(RESOURCE_NAME)
    return f"SELECT user_id, COUNT(*) AS n FROM {records} {_runs_in(from_day, None)} GROUP BY user_id"


def _user_cuts(
    pipeline: dlt.Pipeline, client: Any, users_sql: str, slices: list[tuple[date, date, int]], bound: int
) -> list[list[UserRange]]:
    """For each slice, the user ranges it is cut into: one holding all users where the slice is
    within `bound`, else as many as bring each part within it, of about equal rows.

    A slice's rows are taken to spread over users as the whole refresh's do; the bound's margin
    (see BYTES_PER_RUN_DAY) covers the difference. The boundaries are users in the destination's
    own order (its ORDER BY), so its comparisons put every row in exactly one range.
    """
    if all(weight <= bound for _, _, weight in slices):
        return [[ALL_USERS] for _ in slices]
    ordered = f"SELECT user_id, n FROM ({users_sql}) AS w WHERE user_id IS NOT NULL ORDER BY user_id"
    users = [(user, int(n)) for user, n in client.execute_sql(_for_destination(pipeline, ordered))]
    return [_user_ranges(users, -(-weight // bound)) if weight > bound else [ALL_USERS] for _, _, weight in slices]


def _user_ranges(users: list[tuple[str, int]], parts: int) -> list[UserRange]:
    """`parts` consecutive ranges of the (user, rows) pairs, in their order, of about equal rows
    (fewer where one user holds more than a part); together they cover every user once."""
    total = sum(rows for _, rows in users)
    edges: list[str | None] = [None]
    seen = 0
    for user, rows in users:
        if len(edges) < parts and seen >= total * len(edges) / parts:
            edges.append(user)
        seen += rows
    edges.append(None)
    return list(zip(edges, edges[1:]))


def _next_month(month: date) -> date:
    return date(month.year + month.month // 12, month.month % 12 + 1, 1)


def _as_date(value: date | datetime) -> date:
    return value.date() if isinstance(value, datetime) else value


def _with_names(usage_sql: str, tables: dict[str, str]) -> str:
    """The usage rows with a name column per id: joined where the names were loaded, else null.

    Each list is read as one row per id, so no row of usage can ever be counted twice, whatever
    a names table holds (rows of several organizations, or rows from before they carried one).
    """
    columns, joins = [], []
    for table, id_column, name_column, key in NAMED:
        qualified = tables.get(table)
        if qualified:
            alias = f"n_{table}"
            extra = ", MAX(email) AS email" if table == "members" else ""
            columns.append(f"{alias}.name AS {name_column}")
            joins.append(
                f"LEFT JOIN (SELECT {key}, MAX(name) AS name{extra} FROM {qualified} GROUP BY {key}) AS {alias} "
                f"ON {alias}.{key} = u.{id_column}"
            )
        else:
            columns.append(f"CAST(NULL AS TEXT) AS {name_column}")
    columns.append("n_members.email AS user_email" if "members" in tables else "CAST(NULL AS TEXT) AS user_email")
    return f"SELECT u.*, {', '.join(columns)} FROM ({usage_sql}) AS u {' '.join(joins)}"
