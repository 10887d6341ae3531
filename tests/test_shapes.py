"""Organizations of other shapes: many users and projects, runs crossing several midnights.

The models' refresh is computed in slices of days bounded by DuckDB's memory limit, so a shape
whose days × users × projects product is large still fits; the models stay exact.
"""

from __future__ import annotations

from datetime import date

import duckdb
import pendulum
import pytest

from ona_emulator import Shape, organisation_records
from ona_emulator.cli import cli_main
from ona_emulator.generator import generate_records
from ona_usage import models
from ona_usage.models import ALL_USERS, ona_usage_models
from ona_usage.pipeline import make_pipeline, run_sync
from ona_usage.settings import resolve

from test_models import SELECT_DAILY, SELECT_MONTHLY, assert_view_equals, expected_daily, expected_monthly
from test_operations import config

BUSY = Shape(users=3_000, projects=500, classes=6, runners=3, run_minutes=(1, 4320))


def test_a_busy_organization_refreshes_its_models_within_a_low_memory_limit(workdir, store, emulator):
    # 100,000 runs over ten days by 3,000 users in 500 projects, up to three days long: at this
    # limit (48 MB for the models' queries) one query over all days ran out of memory.
    end = pendulum.now("UTC").start_of("day")
    start = end.subtract(days=10)
    store.add(list(organisation_records(7, start.to_iso8601_string(), end.to_iso8601_string(), 100_000, BUSY)))
    run_sync(config(emulator, start_date=start.subtract(days=1).to_date_string(), duckdb_memory_limit="24MB"))

    daily = expected_daily(store.records())
    assert len({key[0] for key in daily}) >= 13  # runs from three days before the first stop
    with duckdb.connect(str(workdir / "ona_usage.duckdb"), read_only=True) as conn:
        assert_view_equals(conn.execute(SELECT_DAILY).fetchall(), daily)
        assert_view_equals(conn.execute(SELECT_MONTHLY).fetchall(), expected_monthly(daily))


def test_days_and_months_above_the_bound_are_cut_by_users_and_stay_exact(workdir, store, emulator, monkeypatch):
    # At a bound of 400 run-days every day and month of 4,000 runs holds more: each is cut into
    # user ranges, the rows without a user in the first. Scheduled, hourly and self-contained.
    monkeypatch.setattr(models, "slice_bound", lambda pipeline, client: 400)
    cuts: list = []
    for name in ("day_slices", "month_slices"):
        monkeypatch.setattr(models, name, _recording(getattr(models, name), cuts))
    end = pendulum.now("UTC").start_of("day")
    records = list(organisation_records(5, end.subtract(days=5).to_iso8601_string(), end.to_iso8601_string(), 4_000, BUSY))
    records[7] = {k: v for k, v in records[7].items() if k != "userId"}
    store.add(records)
    # without the lists, whose new names would have the models computed whole again
    run_sync(config(emulator, start_date=end.subtract(days=6).to_date_string(), names=False))
    assert_models_exact(workdir, store.records())
    assert len(cuts) == 2 and all(len({s.users for s in slices}) > 3 for slices in cuts)

    now = pendulum.now("UTC")  # runs that stopped within the lookback, some started days ago
    store.add(generate_records(
        5, now.subtract(minutes=90).to_iso8601_string(), now.to_iso8601_string(), 900, stream="later",
        users=BUSY.users, projects=BUSY.projects, classes=BUSY.classes, runners=BUSY.runners, run_minutes=BUSY.run_minutes,
    ))
    run_sync(config(emulator, names=False))  # the touched days only, merged over the others
    assert_models_exact(workdir, store.records())
    assert min(s.first for s in cuts[2]) > end.subtract(days=5).date()

    pipeline = make_pipeline(resolve({}))
    pipeline.run(ona_usage_models(pipeline))  # the monthly model computed from the usage, month by month
    assert_models_exact(workdir, store.records())
    assert any(s.users != ALL_USERS for s in cuts[-1])


def _recording(slicer, calls: list):
    def recorded(*args, **kwargs):
        calls.append(slicer(*args, **kwargs))
        return calls[-1]
    return recorded


def assert_models_exact(workdir, records) -> None:
    daily = expected_daily(records)
    with duckdb.connect(str(workdir / "ona_usage.duckdb"), read_only=True) as conn:
        assert_view_equals(conn.execute(SELECT_DAILY).fetchall(), daily)
        assert_view_equals(conn.execute(SELECT_MONTHLY).fetchall(), expected_monthly(daily))


def test_the_models_refresh_gets_twice_the_commands_memory(workdir, store, emulator, monkeypatch):
    # The slices are bounded by the limit the queries run at: twice the command's, which the
    # models' loads (a whole table in one job) need as well.
    seen: list[str] = []
    bound = models.slice_bound

    def spying(pipeline, client):
        seen.append(client.execute_sql("SELECT current_setting('memory_limit')")[0][0])
        return bound(pipeline, client)

    monkeypatch.setattr(models, "slice_bound", spying)
    end = pendulum.now("UTC").start_of("day")
    store.add(list(organisation_records(3, end.subtract(days=4).to_iso8601_string(), end.to_iso8601_string(), 2_000, BUSY)))
    run_sync(config(emulator, start_date=end.subtract(days=5).to_date_string(), duckdb_memory_limit="40MB"))
    assert seen and set(seen) == {_shown("80MB")}
    assert_models_exact(workdir, store.records())


def _shown(limit: str) -> str:
    """How DuckDB shows a memory limit once set."""
    with duckdb.connect() as conn:
        conn.execute(f"SET memory_limit = '{limit}'")
        return conn.execute("SELECT current_setting('memory_limit')").fetchone()[0]


def test_user_ranges_cover_every_user_once_in_about_equal_parts():
    users = [(f"u{i:03d}", 1 + i % 7) for i in range(200)]
    ranges = models._user_ranges(users, 5)
    assert len(ranges) == 5 and ranges[0][0] is None and ranges[-1][1] is None
    assert all(high == low for (_, high), (low, _) in zip(ranges, ranges[1:]))  # each ends where the next begins
    parts = [sum(n for u, n in users if (low is None or u >= low) and (high is None or u < high)) for low, high in ranges]
    assert sum(parts) == sum(n for _, n in users) and max(parts) - min(parts) <= 2 * 7
    assert models._user_ranges([("only", 900)], 4) == [(None, None)]  # one user is never cut
    assert models._user_ranges(users, 1) == [ALL_USERS]


def test_slices_hold_every_key_once_within_the_bound():
    days = [(date(2026, 1, d), w) for d, w in zip(range(1, 8), (5, 5, 20, 1, 1, 1, 9))]
    slices = models._cut(days, 10, lambda d: d.replace(day=d.day + 1))
    assert slices == [
        (date(2026, 1, 1), date(2026, 1, 3), 10),  # 5 + 5
        (date(2026, 1, 3), date(2026, 1, 4), 20),  # 20 alone: a day is never cut in days (but by users)
        (date(2026, 1, 4), date(2026, 1, 7), 3),  # 1 + 1 + 1
        (date(2026, 1, 7), date(2026, 1, 8), 9),
    ]
    assert models._cut([], 10, lambda d: d) == []


def test_the_emulator_takes_an_organizations_shape():
    records = list(organisation_records(3, "2026-01-01T00:00:00Z", "2026-01-08T00:00:00Z", 7_000, BUSY))
    assert len({r["userId"] for r in records}) > 1_500
    assert len({r.get("projectId") for r in records} - {None}) > 300
    assert len({r["environmentClassId"] for r in records}) == 6
    lengths = [
        (pendulum.parse(r["stoppedAt"]) - pendulum.parse(r["createdAt"])).total_minutes() for r in records
    ]
    assert 1 <= min(lengths) < 10 and 2_000 < max(lengths) <= 4320
    assert sum(length > 2 * 1440 for length in lengths) > 300  # many runs cross at least two midnights


@pytest.mark.parametrize("argv", [["--users", "0"], ["--run-minutes", "10-5"], ["--run-minutes", "abc"]])
def test_the_emulator_refuses_a_shape_that_cannot_be(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        cli_main(argv)
    assert exited.value.code == 2
    assert "error" in capsys.readouterr().err
