"""The sync end to end: the real client against the emulator on 127.0.0.1 into a real DuckDB file."""

from __future__ import annotations

import shutil
from typing import Any

import duckdb
import pendulum
import pytest

from ona_emulator import EmulatorServer
from ona_usage import settings
from ona_usage.pipeline import SyncResult, make_pipeline, read_cursor, read_state, run_sync
from ona_usage.windows import format_rfc3339

from conftest import API_KEY, assert_table_equals, make_records, recent_records, first_start, request_ranges, table_rows

DB = "ona_usage.duckdb"


def sync(emulator: EmulatorServer, **options: Any) -> SyncResult:
    config = settings.resolve({"base_url": emulator.url, **options})
    config.api_key = API_KEY
    return run_sync(config)


def test_sync_over_many_windows_and_pages_loads_exactly_the_api_records(workdir, store, emulator):
    store.add(recent_records(3_000, days=12))
    start = pendulum.now("UTC").subtract(days=13).to_date_string()

    result = sync(emulator, start_date=start, page_size=20, workers=3)

    truth = store.records()
    assert_table_equals(workdir / DB, truth)
    assert result.rows_loaded == len(truth) == 3_000
    assert result.windows == 14  # 13 full days back to midnight, plus today so far
    # every page of every window, the identity and access checks, and the pages of the lists of names
    lists = [r for r in emulator.requests if not r["path"].endswith(("ListEnvironmentUsageRecords", "GetAuthenticatedIdentity"))]
    assert len(lists) >= 4
    assert result.requests == result.pages + 2 + len(lists) == len(emulator.requests)
    assert result.pages >= 3_000 // 20
    newest = max(pendulum.parse(r["stoppedAt"]) for r in truth)
    assert result.cursor == newest.replace(microsecond=newest.microsecond)


def test_second_run_loads_only_new_and_late_records_inside_the_lookback(workdir, store, emulator):
    store.add(recent_records(600, days=5))
    sync(emulator, start_date=pendulum.now("UTC").subtract(days=6).to_date_string(), lookback="2h")
    state = read_state(make_pipeline(settings.resolve({})))
    cursor, fetched_at = pendulum.instance(state.cursor), pendulum.instance(state.fetched_at)
    assert state.fetched_through == state.fetched_at  # a scheduled run fetches up to "now"

    new = make_records(cursor.add(seconds=1), 5, "new")
    # became visible only after the first run, with a stoppedAt inside the 2h lookback
    late_inside = make_records(min(cursor, fetched_at.subtract(minutes=90)), 2, "late-inside")
    late_outside = make_records(fetched_at.subtract(hours=5), 1, "late-outside")  # only a backfill sees it
    store.add(new + late_inside + late_outside)
    emulator.reset_requests()

    result = sync(emulator, lookback="2h")

    assert result.rows_loaded == len(store.records(start=fetched_at.subtract(hours=2)))
    assert result.rows_loaded >= 7
    expected = [r for r in store.records() if not r["id"].startswith("late-outside")]
    assert_table_equals(workdir / DB, expected)
    # it asked only for [end of the last run - lookback, now): one day window or two
    ranges = request_ranges(emulator)
    assert first_start(ranges) == format_rfc3339(fetched_at.subtract(hours=2))
    assert all(pendulum.parse(start) >= fetched_at.subtract(hours=2) for start, _ in ranges)
    assert result.windows == len(set(ranges)) <= 2


def test_a_fresh_runner_resumes_from_the_state_in_the_destination(workdir, store, emulator):
    store.add(recent_records(400, days=4))
    sync(emulator, start_date=pendulum.now("UTC").subtract(days=5).to_date_string())
    state = read_state(make_pipeline(settings.resolve({})))
    cursor, fetched_at = pendulum.instance(state.cursor), pendulum.instance(state.fetched_at)
    shutil.rmtree(workdir / "dlt-data")  # the runner's disk is gone; the DuckDB file is not

    store.add(make_records(cursor.add(seconds=1), 3, "after"))
    emulator.reset_requests()
    result = sync(emulator)

    assert_table_equals(workdir / DB, store.records())
    assert result.rows_loaded == len(store.records(start=fetched_at.subtract(hours=2)))
    assert first_start(request_ranges(emulator)) == format_rfc3339(fetched_at.subtract(hours=2))
    assert read_cursor(make_pipeline(settings.resolve({}))) > cursor


def test_project_filter_loads_only_that_project(workdir, store, emulator):
    store.add(recent_records(800, days=3))
    project = store.records()[0].get("projectId") or store.records()[1]["projectId"]

    sync(emulator, start_date=pendulum.now("UTC").subtract(days=4).to_date_string(), project_id=project)

    expected = store.records(project_id=project)
    assert 0 < len(expected) < 800
    assert_table_equals(workdir / DB, expected)
    usage = [r for r in emulator.requests[2:] if "filter" in (r["body"] or {})]  # not the lists of names
    assert usage and all(r["body"]["filter"].get("projectId") == project for r in usage)


def test_empty_windows_missing_fields_midnight_crossings_and_fractions(workdir, store, emulator):
    day = pendulum.now("UTC").start_of("day").subtract(days=3)
    store.add(
        [
            # crosses midnight: counted once, in the window where it stopped
            {"id": "a", "createdAt": format_rfc3339(day.subtract(hours=2)), "stoppedAt": format_rfc3339(day.add(hours=2)),
             "environmentClassId": "c1", "environmentId": "e1", "projectId": "p1", "runnerId": "r1", "userId": "u1"},
            # proto3 leaves out empty fields: no projectId, runnerId or createdAt
            {"id": "b", "stoppedAt": day.add(hours=3).strftime("%Y-%m-%dT%H:%M:%S.123456789Z"),
             "environmentClassId": "c1", "environmentId": "e2", "userId": "u2"},
            # sub-second order: 07.5Z is later than 07Z, although it sorts lower as a string
            {"id": "c", "createdAt": "2020-01-01T00:00:00Z", "stoppedAt": day.add(hours=4, seconds=7).strftime("%Y-%m-%dT%H:%M:%SZ"),
             "environmentId": "e3", "userId": "u1"},
            {"id": "d", "createdAt": "2020-01-01T00:00:00.5Z", "stoppedAt": day.add(hours=4, seconds=7).strftime("%Y-%m-%dT%H:%M:%S.5Z"),
             "environmentId": "e4", "userId": "u1"},
            # exactly on midnight: belongs to the day that starts there
            {"id": "e", "stoppedAt": format_rfc3339(day.add(days=1)), "environmentId": "e5", "userId": "u3"},
        ]
    )

    result = sync(emulator, start_date=day.subtract(days=5).to_date_string())

    assert_table_equals(workdir / DB, store.records())
    rows = {row[0]: row for row in table_rows(workdir / DB)}
    assert rows["b"][1] is None and rows["b"][5] is None and rows["b"][6] is None
    assert result.windows >= 8  # most of them empty
    assert pendulum.instance(result.cursor) == day.add(days=1)


def test_a_failed_run_leaves_table_and_cursor_as_they_were(workdir, store, emulator):
    store.add(recent_records(500, days=6))
    sync(emulator, start_date=pendulum.now("UTC").subtract(days=7).to_date_string())
    before_rows = table_rows(workdir / DB)
    before_cursor = read_cursor(make_pipeline(settings.resolve({})))

    # new data in many windows, and the API breaks after the first few requests
    store.add(make_records(pendulum.now("UTC").subtract(minutes=30), 3, "new"))
    calls = {"n": 0}

    def fail_later(request: Any) -> Any:
        calls["n"] += 1
        if calls["n"] > 2:
            return 400, b'{"code":"invalid_argument","message":"boom"}', {}
        return None

    emulator.fault = fail_later
    with pytest.raises(Exception, match="boom"):
        sync(emulator, lookback="3d", workers=1)

    assert table_rows(workdir / DB) == before_rows
    assert read_cursor(make_pipeline(settings.resolve({}))) == before_cursor

    emulator.fault = None
    sync(emulator, lookback="3d")
    assert_table_equals(workdir / DB, store.records())


def test_a_wrong_key_writes_nothing(workdir, store, emulator):
    store.add(recent_records(50, days=1))
    config = settings.resolve({"base_url": emulator.url, "start_date": "2026-01-01"})
    config.api_key = "wrong-key-0000"
    with pytest.raises(Exception, match="rejected the API key") as raised:
        run_sync(config)
    assert "wrong-key-0000" not in str(raised.value)
    assert not (workdir / DB).exists()
    assert not (workdir / "dlt-data").exists()


def test_rows_repeated_across_runs_end_up_once_with_the_latest_values(workdir, store, emulator):
    records = recent_records(300, days=2)
    store.add(records)
    start = pendulum.now("UTC").subtract(days=3).to_date_string()
    sync(emulator, start_date=start)
    changed = dict(store.records()[-1], environmentClassId="bigger-class")
    store.upsert([changed])

    sync(emulator, lookback="3d")  # re-reads everything: every row again

    assert_table_equals(workdir / DB, store.records())
    with duckdb.connect(str(workdir / DB), read_only=True) as conn:
        assert conn.execute(
            "SELECT environment_class_id FROM ona.environment_usage_records WHERE id = ?", [changed["id"]]
        ).fetchone() == ("bigger-class",)
