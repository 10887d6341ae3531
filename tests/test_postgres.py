"""The sync end to end into a real PostgreSQL server (a throwaway cluster, see pg_server.py).

Same contract as test_sync.py, with `destination = "postgres"`: the table equals the emulator's
truth, later runs load only what is new or inside the lookback, the cursor survives the loss
of the local pipeline folder (dlt keeps it in the destination), and the columns have the types
a warehouse user expects. The server runs in a non-UTC time zone, so a timestamp written or
read as local time shows up as a wrong value.

Without PostgreSQL binaries these tests skip, unless the environment variable CI is set: then
they fail, so CI cannot go green without running them.
"""

from __future__ import annotations

import shutil
from datetime import datetime, timezone
from typing import Any

import pendulum
import psycopg2
import pytest

from ona_emulator import EmulatorServer
from ona_usage import settings
from ona_usage.pipeline import SyncResult, make_pipeline, read_cursor, read_state, run_backfill, run_sync
from ona_usage.windows import format_rfc3339

from conftest import (API_KEY, COLUMNS, PG_SERVER_TIMEZONE, assert_rows_equal, cli_here, make_records, recent_records,
                      first_start, request_ranges)
from test_crashes import CUT_OFF, run_killed_after_a_job_commits

TABLE = "ona.environment_usage_records"
SERVER_TIMEZONE = PG_SERVER_TIMEZONE  # the session's server (conftest's `postgres`); each test has its own database (`pg_url`)


def sync(emulator: EmulatorServer, **options: Any) -> SyncResult:
    config = settings.resolve({"destination": "postgres", "base_url": emulator.url, **options})
    config.api_key = API_KEY
    return run_sync(config)


def cursor_now() -> pendulum.DateTime:
    """The cursor in the local pipeline state (dlt restores it from Postgres when the folder is gone)."""
    return pendulum.instance(read_cursor(make_pipeline(settings.resolve({"destination": "postgres"}))))


def query(url: str, statement: str, params: tuple = ()) -> list[tuple]:
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(statement, params)
            return cur.fetchall()
    finally:
        conn.close()


def pg_table_rows(url: str) -> list[tuple]:
    """The table's rows, timestamps as aware datetimes in UTC (the session runs in SERVER_TIMEZONE)."""
    rows = query(url, f"SELECT {', '.join(COLUMNS)} FROM {TABLE} ORDER BY id")
    for row in rows:
        for value in row:
            assert not isinstance(value, datetime) or value.tzinfo is not None, f"naive timestamp {value!r}"
    return [tuple(v.astimezone(timezone.utc) if isinstance(v, datetime) else v for v in row) for row in rows]


def assert_pg_table_equals(url: str, records: list[dict[str, Any]]) -> None:
    assert_rows_equal(pg_table_rows(url), records)

def test_first_sync_over_several_days_and_pages_loads_exactly_the_api_records(pg_url, store, emulator):
    store.add(recent_records(1_200, days=5))

    result = sync(emulator, start_date=pendulum.now("UTC").subtract(days=6).to_date_string(), page_size=25, workers=3)

    truth = store.records()
    assert_pg_table_equals(pg_url, truth)
    assert result.rows_loaded == len(truth) == 1_200
    assert result.windows == 7  # 6 full days back to midnight, plus today so far
    assert result.pages >= 1_200 // 25
    newest = max(pendulum.parse(r["stoppedAt"]) for r in truth)
    assert pendulum.instance(result.cursor) == newest


def test_second_run_loads_only_new_and_late_records_inside_the_lookback(pg_url, store, emulator):
    # one record a minute ago, so the cursor is recent and "late" below means before the cursor
    store.add(recent_records(400, days=3) + make_records(pendulum.now("UTC").subtract(minutes=1), 1, "recent"))
    sync(emulator, start_date=pendulum.now("UTC").subtract(days=4).to_date_string(), lookback="2h")
    cursor, first_run_done = cursor_now(), pendulum.now("UTC")

    new = make_records(first_run_done.subtract(seconds=5), 5, "new")  # after the cursor, before the next run
    late_inside = make_records(cursor.subtract(minutes=90), 2, "late-inside")  # inside the 2h lookback
    late_outside = make_records(cursor.subtract(hours=5), 1, "late-outside")  # only a backfill sees it
    store.add(new + late_inside + late_outside)
    emulator.reset_requests()

    result = sync(emulator, lookback="2h")

    assert_pg_table_equals(pg_url, [r for r in store.records() if not r["id"].startswith("late-outside")])
    # it asked only for [cursor - lookback or later, now): one day window or two
    ranges = request_ranges(emulator)
    assert all(pendulum.parse(start) >= cursor.subtract(hours=2) for start, _ in ranges)
    assert result.windows == len(set(ranges)) <= 2
    assert result.rows_loaded == len(store.records(start=first_start(ranges))) >= 8
    assert cursor_now() > cursor


def test_a_fresh_runner_resumes_from_the_state_stored_in_postgres(pg_url, workdir, store, emulator):
    store.add(recent_records(300, days=3) + make_records(pendulum.now("UTC").subtract(minutes=1), 1, "recent"))
    sync(emulator, start_date=pendulum.now("UTC").subtract(days=4).to_date_string())
    cursor, first_run_done = cursor_now(), pendulum.now("UTC")
    # the runner's disk is gone; the database, with dlt's state table, is not
    shutil.rmtree(workdir / "dlt-data")
    assert query(pg_url, "SELECT count(*) FROM ona._dlt_pipeline_state WHERE pipeline_name = 'ona_usage'")[0][0]

    store.add(make_records(first_run_done.subtract(seconds=5), 3, "after"))
    emulator.reset_requests()
    result = sync(emulator)  # no start date: without the stored state it would start 30 days back

    assert_pg_table_equals(pg_url, store.records())
    ranges = request_ranges(emulator)
    assert ranges and all(pendulum.parse(start) >= cursor.subtract(hours=2) for start, _ in ranges)
    assert result.rows_loaded == len(store.records(start=first_start(ranges))) >= 3
    assert cursor_now() > cursor


def test_column_types_and_one_row_per_id_after_rereading_everything(pg_url, store, emulator):
    store.add(recent_records(300, days=2))
    sync(emulator, start_date=pendulum.now("UTC").subtract(days=3).to_date_string())
    sync(emulator, lookback="3d")  # re-reads every record: the merge must not duplicate any

    types = dict(
        query(
            pg_url,
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = 'ona' AND table_name = 'environment_usage_records'",
        )
    )
    assert types["created_at"] == types["stopped_at"] == "timestamp with time zone"
    for column in ("id", "environment_class_id", "environment_id", "project_id", "runner_id", "user_id"):
        assert types[column] in ("text", "character varying"), (column, types[column])
    total, distinct = query(pg_url, f"SELECT count(*), count(DISTINCT id) FROM {TABLE}")[0]
    assert total == distinct == 300
    assert_pg_table_equals(pg_url, store.records())


def test_backfill_into_postgres_leaves_the_schedule_alone_and_resumes_after_a_failure(pg_url, store, emulator):
    store.add(recent_records(900, days=24))
    today = pendulum.now("UTC").start_of("day")
    sync(emulator, start_date=today.subtract(days=2).to_date_string())
    before = read_state(make_pipeline(settings.resolve({"destination": "postgres"})))
    config = settings.resolve({"destination": "postgres", "base_url": emulator.url, "chunk": "4d", "max_attempts": 1, "workers": 1})
    config.api_key = API_KEY
    start, end = today.subtract(days=20), today.subtract(days=4)

    # the API breaks in the third chunk: two chunks stay committed
    emulator.fault = lambda request: (
        (500, b"{}", {}) if (request.get("body") or {}).get("filter", {}).get("dateRange", {}).get("startTime", "")
        >= format_rfc3339(start.add(days=8)) and request["body"]["pagination"]["pageSize"] != 1 else None
    )
    with pytest.raises(Exception):
        run_backfill(config, settings.parse_range(start.to_date_string(), end.to_date_string()))
    assert_pg_table_equals(pg_url, store.records(start=start, end=start.add(days=8)) + store.records(start=today.subtract(days=2)))

    emulator.fault = None
    emulator.reset_requests()
    run_backfill(config, settings.parse_range(start.to_date_string(), end.to_date_string()))

    assert min(s for s, _ in request_ranges(emulator)) == format_rfc3339(start.add(days=8))
    assert_pg_table_equals(pg_url, store.records(start=start, end=end) + store.records(start=today.subtract(days=2)))
    after = read_state(make_pipeline(settings.resolve({"destination": "postgres"})))
    assert (after.cursor, after.fetched_through) == (before.cursor, before.fetched_through)


def test_a_kill_right_after_a_load_job_commits_doubles_nothing_in_postgres(pg_url, workdir, store, emulator, capsys):
    """dlt would run the job again, into a staging table that already holds its rows."""
    store.add(recent_records(300, days=5))
    args = ["sync", "--destination", "postgres", "--base-url", emulator.url,
            "--start-date", pendulum.now("UTC").subtract(days=6).to_date_string()]
    run_killed_after_a_job_commits("environment_usage_records", args, workdir)

    result = cli_here(capsys, *args, env={"ONA_API_KEY": API_KEY})
    assert result.returncode == 0, result.stderr
    assert CUT_OFF in result.stderr
    assert_pg_table_equals(pg_url, store.records())
