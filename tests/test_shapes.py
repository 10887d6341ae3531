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
from ona_usage import models
from ona_usage.pipeline import run_sync

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


def test_slices_hold_every_key_once_within_the_bound():
    days = [(date(2026, 1, d), w) for d, w in zip(range(1, 8), (5, 5, 20, 1, 1, 1, 9))]
    slices = models._cut(days, 10, lambda d: d.replace(day=d.day + 1))
    assert slices == [
        (date(2026, 1, 1), date(2026, 1, 3)),  # 5 + 5
        (date(2026, 1, 3), date(2026, 1, 4)),  # 20 alone: a day is never cut
        (date(2026, 1, 4), date(2026, 1, 7)),  # 1 + 1 + 1
        (date(2026, 1, 7), date(2026, 1, 8)),  # 9
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
