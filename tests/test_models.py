"""The analyst views equal figures computed independently in Python from the emulator's records."""

from __future__ import annotations

import uuid
from collections import defaultdict
from datetime import date, datetime, timedelta, timezone
from typing import Any

import duckdb
import pendulum
import psycopg2
import pytest

from conftest import make_records, recent_records, to_datetime
from test_operations import config
from ona_usage import settings
from ona_usage.pipeline import make_pipeline, run_sync

import pg_server

Key = tuple[date, Any, Any, Any, Any]


def expected_daily(records: list[dict[str, Any]]) -> dict[Key, tuple[int, float]]:
    """Runtime split across UTC days; a run counts on the day it stopped."""
    totals: dict[Key, list] = defaultdict(lambda: [0, 0.0])
    for r in records:
        stop = to_datetime(r["stoppedAt"])
        start = min(to_datetime(r.get("createdAt")) or stop, stop)
        ids = (r.get("userId"), r.get("projectId"), r.get("environmentClassId"), r.get("runnerId"))
        day = datetime(start.year, start.month, start.day, tzinfo=timezone.utc)
        while day <= stop:
            overlap = (min(stop, day + timedelta(days=1)) - max(start, day)).total_seconds() / 3600
            totals[(day.date(), *ids)][1] += overlap
            day += timedelta(days=1)
        totals[(stop.date(), *ids)][0] += 1
    return {k: (runs, hours) for k, (runs, hours) in totals.items()}


def expected_monthly(daily: dict[Key, tuple[int, float]]) -> dict[Key, tuple[int, float]]:
    totals: dict[Key, list] = defaultdict(lambda: [0, 0.0])
    for (day, *ids), (runs, hours) in daily.items():
        totals[(day.replace(day=1), *ids)][0] += runs
        totals[(day.replace(day=1), *ids)][1] += hours
    return {k: (runs, hours) for k, (runs, hours) in totals.items()}


def assert_view_equals(rows: list[tuple], expected: dict[Key, tuple[int, float]]) -> None:
    actual = {tuple(row[:5]): (int(row[5]), float(row[6])) for row in rows}
    assert actual.keys() == expected.keys()
    for key, (runs, hours) in expected.items():
        assert actual[key][0] == runs, key
        assert actual[key][1] == pytest.approx(hours, abs=1e-6), key


def organisation() -> list[dict[str, Any]]:
    """Synthetic usage plus the awkward cases: several days long, no project, no createdAt."""
    day = pendulum.now("UTC").start_of("day").subtract(days=3)
    long_run = make_records(day.add(hours=5), 1, "long")[0] | {"createdAt": day.subtract(days=2, hours=3).to_iso8601_string()}
    no_project = {k: v for k, v in make_records(day.add(hours=1), 1, "noproj")[0].items() if k != "projectId"}
    no_created = {k: v for k, v in make_records(day.add(hours=2), 1, "nocreated")[0].items() if k != "createdAt"}
    midnight = make_records(day.add(minutes=30), 1, "midnight")[0] | {"createdAt": day.subtract(minutes=90).to_iso8601_string()}
    return recent_records(600, days=40) + [long_run, no_project, no_created, midnight]


SELECT_DAILY = "SELECT usage_date, user_id, project_id, environment_class_id, runner_id, runs, runtime_hours FROM ona.environment_usage_daily"
SELECT_MONTHLY = "SELECT usage_month, user_id, project_id, environment_class_id, runner_id, runs, runtime_hours FROM ona.environment_usage_monthly"


def test_views_on_duckdb_match_python(workdir, store, emulator):
    store.add(organisation())
    run_sync(config(emulator, start_date=pendulum.now("UTC").subtract(days=45).to_date_string()))

    daily = expected_daily(store.records())
    with duckdb.connect(str(workdir / "ona_usage.duckdb"), read_only=True) as conn:
        conn.execute("SET TimeZone = 'America/Los_Angeles'")  # an analyst's own zone changes nothing
        assert_view_equals(conn.execute(SELECT_DAILY).fetchall(), daily)
        assert_view_equals(conn.execute(SELECT_MONTHLY).fetchall(), expected_monthly(daily))
    assert_models_through_the_dataset(make_pipeline(settings.resolve({})), daily)
    store.add(later_runs())
    run_sync(config(emulator))
    daily = expected_daily(store.records())
    with duckdb.connect(str(workdir / "ona_usage.duckdb"), read_only=True) as conn:
        assert_view_equals(conn.execute(SELECT_DAILY).fetchall(), daily)
        assert_view_equals(conn.execute(SELECT_MONTHLY).fetchall(), expected_monthly(daily))
        assert conn.execute("SELECT count(DISTINCT _dlt_load_id) FROM ona.environment_usage_daily").fetchone()[0] == 2
    # the multi-day run is spread over four days; the run without createdAt has no runtime
    long_days = [k for k in daily if any(r["id"] == "long-0" for r in store.records())]
    assert len(long_days) > 4
    assert sum(h for (d, *_), (_, h) in daily.items()) == pytest.approx(
        sum((to_datetime(r["stoppedAt"]) - min(to_datetime(r.get("createdAt")) or to_datetime(r["stoppedAt"]), to_datetime(r["stoppedAt"]))).total_seconds() / 3600 for r in store.records())
    )


def test_views_on_postgres_match_python(postgres, workdir, store, emulator, monkeypatch):  # noqa: F811
    url = pg_server.create_database(postgres, f"t_{uuid.uuid4().hex[:12]}")
    monkeypatch.setenv("DESTINATION__POSTGRES__CREDENTIALS", url)
    store.add(organisation())
    run_sync(config(emulator, destination="postgres", start_date=pendulum.now("UTC").subtract(days=45).to_date_string()))

    daily = expected_daily(store.records())
    assert postgres_models(url, daily) == 1
    assert_models_through_the_dataset(make_pipeline(settings.resolve({"destination": "postgres"})), daily)

    # A later run computes again only the days its new runs ran on, merged over the others.
    store.add(later_runs())
    run_sync(config(emulator, destination="postgres"))
    assert postgres_models(url, expected_daily(store.records())) == 2  # the days before the new runs kept their rows


def postgres_models(url: str, daily: dict[Key, tuple[int, float]]) -> int:
    """Both models checked against `daily`; the number of loads the daily model's rows come from."""
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(SELECT_DAILY)
            assert_view_equals(cur.fetchall(), daily)
            cur.execute(SELECT_MONTHLY)
            assert_view_equals(cur.fetchall(), expected_monthly(daily))
            cur.execute("SELECT count(DISTINCT _dlt_load_id) FROM ona.environment_usage_daily")
            return cur.fetchone()[0]
    finally:
        conn.close()


def later_runs() -> list[dict[str, Any]]:
    """A run that started four days ago and just stopped, and a short one: what an hourly run finds."""
    now = pendulum.now("UTC")
    long_run = make_records(now.subtract(minutes=20), 1, "later-long")[0] | {"createdAt": now.subtract(days=4).to_iso8601_string()}
    return [long_run, *make_records(now.subtract(minutes=10), 1, "later-short")]


def assert_models_through_the_dataset(pipeline: Any, daily: dict[Key, tuple[int, float]]) -> None:
    """The dlt way: the daily model as a table of the dataset, the monthly one through SQL on it."""
    dataset = pipeline.dataset()
    table = dataset["environment_usage_daily"].arrow()
    names = ["usage_date", "user_id", "project_id", "environment_class_id", "runner_id", "runs", "runtime_hours"]
    assert_view_equals(list(zip(*(table.column(n).to_pylist() for n in names))), daily)
    monthly = dataset(SELECT_MONTHLY.replace("ona.environment_usage_monthly", "environment_usage_monthly")).fetchall()
    assert_view_equals(monthly, expected_monthly(daily))
