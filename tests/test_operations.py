"""Running it in production: backfills, chunked commits, crashes, status, verify, reset, locks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import duckdb
import pendulum
import pytest
from dlt.pipeline.pipeline import Pipeline

from ona_usage import settings
from ona_usage.pipeline import make_pipeline, pipeline_lock, read_state, run_backfill, run_sync
from ona_usage.windows import format_rfc3339

from conftest import API_KEY, assert_table_equals, cli_here, make_records, recent_records, request_ranges, run_cli, table_rows, utc_days
from test_sync import DB, sync


def config(emulator: Any, **options: Any) -> settings.SyncSettings:
    # retries back off from 0.01 s, not 0.5 s: the same retries, without real waits
    resolved = settings.resolve({"base_url": emulator.url, "backoff": 0.01, **options})
    resolved.api_key = API_KEY
    return resolved


def test_backfill_loads_exactly_its_range_and_leaves_the_schedule_alone(workdir, store, emulator):
    store.add(recent_records(900, days=30))
    today = pendulum.now("UTC").start_of("day")
    sync(emulator, start_date=today.subtract(days=3).to_date_string())
    before = read_state(make_pipeline(settings.resolve({})))
    emulator.reset_requests()

    start, end = today.subtract(days=20), today.subtract(days=10)
    result = run_backfill(config(emulator, chunk="3d"), settings.parse_range(start.to_date_string(), end.to_date_string()))

    in_range = store.records(start=start, end=end)
    recent = store.records(start=today.subtract(days=3))
    assert_table_equals(workdir / DB, in_range + recent)
    assert result.rows_loaded == len(in_range)
    assert result.chunks == 4 and result.windows == 10  # 3 + 3 + 3 + 1 days
    after = read_state(make_pipeline(settings.resolve({})))
    assert (after.cursor, after.fetched_through, after.fetched_at) == (before.cursor, before.fetched_through, before.fetched_at)
    assert after.backfills[f"{format_rfc3339(start)}/{format_rfc3339(end)}/*"]["done"] is True

    # the next sync fetches what it would have fetched without the backfill
    emulator.reset_requests()
    sync(emulator)
    assert request_ranges(emulator)[0][0] == format_rfc3339(pendulum.instance(before.fetched_at).subtract(hours=2))


def test_a_failed_backfill_continues_after_its_last_committed_chunk(workdir, store, emulator):
    store.add(recent_records(600, days=12))
    start, end = pendulum.now("UTC").start_of("day").subtract(days=12), pendulum.now("UTC").start_of("day")
    calls = {"n": 0}

    def break_in_chunk_three(request: dict) -> Any:
        calls["n"] += 1
        begins = (request.get("body") or {}).get("filter", {}).get("dateRange", {}).get("startTime", "")
        if format_rfc3339(start.add(days=8)) <= begins < format_rfc3339(end):
            return 503, b'{"code":"unavailable","message":"down"}', {}
        return None

    emulator.fault = break_in_chunk_three
    with pytest.raises(Exception, match="gave up"):
        run_backfill(config(emulator, chunk="4d", workers=1, max_attempts=2), settings.parse_range(start.to_date_string(), end.to_date_string()))
    progress = read_state(make_pipeline(settings.resolve({}))).backfills
    (key,) = progress
    assert progress[key]["through"] == start.add(days=8) and progress[key]["done"] is False
    assert_table_equals(workdir / DB, store.records(start=start, end=start.add(days=8)))

    emulator.fault = None
    emulator.reset_requests()
    result = run_backfill(config(emulator, chunk="4d"), settings.parse_range(start.to_date_string(), end.to_date_string()))

    assert min(s for s, _ in request_ranges(emulator)) == format_rfc3339(start.add(days=8))
    assert result.windows == 4
    assert_table_equals(workdir / DB, store.records(start=start, end=end))


def test_a_backfill_killed_with_sigkill_resumes_and_ends_exact(workdir, store, emulator, capsys):
    store.add(recent_records(1_500, days=20))
    emulator.latency = 0.02
    start, end = pendulum.now("UTC").start_of("day").subtract(days=20), pendulum.now("UTC").start_of("day")
    args = ["backfill", "--base-url", emulator.url, "--start", start.to_date_string(), "--end", end.to_date_string(),
            "--chunk", "2d", "--workers", "1", "--page-size", "50"]
    env = {**os.environ, "ONA_API_KEY": API_KEY}
    exe = str(Path(sys.executable).with_name("ona-usage"))
    proc = subprocess.Popen([exe, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    for line in proc.stderr:  # logs, one line each: wait for two committed chunks
        if "committed chunk 2" in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    committed = read_state(make_pipeline(settings.resolve({}))).backfills
    (progress,) = committed.values()
    assert progress["done"] is False and progress["through"] >= start.add(days=4)

    emulator.latency = 0
    emulator.reset_requests()
    result = cli_here(capsys, *args, env={"ONA_API_KEY": API_KEY})  # the rerun: the same command, in this process

    assert result.returncode == 0, result.stderr
    assert min(s for s, _ in request_ranges(emulator)) >= format_rfc3339(start.add(days=4))
    assert_table_equals(workdir / DB, store.records(start=start, end=end))


def test_a_long_first_sync_commits_in_chunks(workdir, store, emulator):
    store.add(recent_records(800, days=25))
    start = pendulum.now("UTC").start_of("day").subtract(days=25)

    def fail_late(request: dict) -> Any:  # every window from day 10 on fails (not the access check)
        body = request.get("body") or {}
        begins = body.get("filter", {}).get("dateRange", {}).get("startTime", "")
        late = begins >= format_rfc3339(start.add(days=10)) and body.get("pagination", {}).get("pageSize") != 1
        return (500, b"{}", {}) if late else None

    emulator.fault = fail_late
    with pytest.raises(Exception):
        run_sync(config(emulator, start_date=start.to_date_string(), chunk="5d", workers=1, max_attempts=1))
    state = read_state(make_pipeline(settings.resolve({})))
    assert state.fetched_through == start.add(days=10)  # two chunks of five days survived
    assert_table_equals(workdir / DB, store.records(end=start.add(days=10)))

    emulator.fault = None
    run_sync(config(emulator, chunk="5d"))
    assert_table_equals(workdir / DB, store.records())


def test_a_failed_load_is_finished_by_the_next_run(workdir, store, emulator, monkeypatch):
    store.add(recent_records(300, days=3))
    original = Pipeline.load
    failures = {"left": 1}

    def load_that_fails_once(self: Pipeline, *args: Any, **kwargs: Any) -> Any:
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("the warehouse went away")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "load", load_that_fails_once)
    with pytest.raises(Exception, match="warehouse went away"):
        sync(emulator, start_date=pendulum.now("UTC").subtract(days=4).to_date_string())
    assert make_pipeline(settings.resolve({})).has_pending_data

    store.add(make_records(pendulum.now("UTC").subtract(minutes=5), 4, "newer"))
    sync(emulator)

    assert_table_equals(workdir / DB, store.records())
    assert not make_pipeline(settings.resolve({})).has_pending_data


def test_a_second_sync_of_the_same_pipeline_is_refused(workdir, store, emulator):
    store.add(recent_records(20, days=1))
    with pipeline_lock(settings.resolve({})):
        result = run_cli("sync", "--base-url", emulator.url, env={"ONA_API_KEY": API_KEY, "DLT_DATA_DIR": str(workdir / "dlt-data")})
    assert result.returncode == 1
    assert "in progress" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (workdir / DB).exists()


def test_verify_finds_missing_extra_and_changed_ids_and_repair_fixes_them(workdir, store, emulator, capsys):
    store.add(recent_records(400, days=6))
    start = pendulum.now("UTC").start_of("day").subtract(days=6)
    sync(emulator, start_date=start.to_date_string())
    env = {"ONA_API_KEY": API_KEY}
    window = ["--base-url", emulator.url, "--start", start.to_date_string(), "--end", pendulum.now("UTC").add(days=1).to_date_string()]

    clean = cli_here(capsys, "verify", *window, env=env)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "match" in clean.stdout.splitlines()[-1]

    old = store.records(end=start.add(days=2))
    late = make_records(start.add(days=1, hours=3), 2, "late")  # far behind the lookback
    changed = dict(old[0], environmentClassId="resized")
    store.add(late)
    store.upsert([changed])
    with duckdb.connect(str(workdir / DB)) as conn:
        conn.execute("INSERT INTO ona.environment_usage_records (id, stopped_at, _dlt_load_id) VALUES ('ghost', ?, 'x')", [start.add(hours=5)])

    report = cli_here(capsys, "verify", *window, "--json", env=env)

    assert report.returncode == 1
    days = json.loads(report.stdout)["days"]
    assert sorted(i for d in days for i in d["missing"]) == ["late-0", "late-1"]
    assert [i for d in days for i in d["extra"]] == ["ghost"]
    assert [i for d in days for i in d["changed"]] == [changed["id"]]

    repaired = cli_here(capsys, "verify", *window, "--repair", env=env)
    assert repaired.returncode == 1  # the ghost row is not in the API: reported, never deleted
    assert "extra 1" in repaired.stdout
    rows = {row[0]: row for row in table_rows(workdir / DB)}
    assert {"late-0", "late-1"} <= rows.keys() and rows[changed["id"]][3] == "resized"


def test_status_json_dry_run_and_reset(workdir, store, emulator, capsys):
    store.add(recent_records(200, days=2))
    env = {"ONA_API_KEY": API_KEY}
    dry = cli_here(capsys, "sync", "--dry-run", "--base-url", emulator.url, "--start-date", pendulum.now("UTC").subtract(days=3).to_date_string(), env=env)
    assert dry.returncode == 0, dry.stderr
    assert "would fetch 4 window(s)" in dry.stdout
    assert not (workdir / DB).exists() and emulator.requests == []

    sync(emulator, start_date=pendulum.now("UTC").subtract(days=3).to_date_string())
    status = json.loads(cli_here(capsys, "status", "--json", env=env).stdout)
    assert set(status) == {"version", "warehouse", "pipeline", "destination", "dataset", "table", "cursor", "fetched_through",
                           "lookback", "next_sync", "last_load", "table_stats", "models", "backfills", "pending_load_packages"}
    assert status["models"]["current"] is True and status["models"]["last_refresh_error"] is None
    assert status["table_stats"]["rows"] == 200
    assert status["last_load"]["rows"] > 0 and status["pending_load_packages"] == []
    assert status["cursor"] == format_rfc3339(read_state(make_pipeline(settings.resolve({}))).cursor)
    # the lookback's two hours: one day window, two in the first hours after a UTC midnight
    next_sync = status["next_sync"]
    assert pendulum.parse(next_sync["start"]) >= pendulum.parse(status["fetched_through"]).subtract(hours=2)
    assert next_sync["windows"] == utc_days(pendulum.parse(next_sync["start"]), pendulum.parse(next_sync["end"]))
    assert status["backfills"] == []

    refused = cli_here(capsys, "reset", env=env)
    assert refused.returncode == 2 and "--yes" in refused.stderr and refused.stdout == ""
    assert len(table_rows(workdir / DB)) == 200

    done = cli_here(capsys, "reset", "--yes", env=env)
    assert done.returncode == 0, done.stderr
    with duckdb.connect(str(workdir / DB), read_only=True) as conn:
        tables = {r[0] for r in conn.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'ona'").fetchall()}
    assert "environment_usage_records" not in tables
    assert read_state(make_pipeline(settings.resolve({}))).cursor is None

    again = cli_here(capsys, "sync", "--base-url", emulator.url, "--start-date", pendulum.now("UTC").subtract(days=1).to_date_string(), env=env)
    assert again.returncode == 0, again.stderr
    assert_table_equals(workdir / DB, store.records(start=pendulum.now("UTC").subtract(days=1).start_of("day")))


def test_logs_without_a_terminal_are_plain_lines(workdir, store, emulator, capfd):
    store.add(recent_records(300, days=10))
    result = cli_here(capfd, "sync", "--base-url", emulator.url, "--start-date", pendulum.now("UTC").subtract(days=10).to_date_string(),
                     "--chunk", "3d", env={"ONA_API_KEY": API_KEY})
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stderr + result.stdout
    assert "committed chunk 1" in result.stderr
    assert API_KEY not in result.stderr + result.stdout


def test_a_pending_load_that_cannot_be_finished_is_discarded_and_the_sync_resumes(workdir, store, emulator, monkeypatch):
    store.add(recent_records(300, days=3))
    sync(emulator, start_date=pendulum.now("UTC").subtract(days=4).to_date_string())
    store.add(make_records(pendulum.now("UTC").subtract(minutes=30), 4, "second"))
    original_load, original_normalize = Pipeline.load, Pipeline.normalize
    monkeypatch.setattr(Pipeline, "load", lambda self, *a, **k: (_ for _ in ()).throw(RuntimeError("killed while loading")))
    with pytest.raises(Exception, match="killed while loading"):
        sync(emulator)
    assert make_pipeline(settings.resolve({})).has_pending_data
    monkeypatch.setattr(Pipeline, "load", original_load)

    # what a SIGKILL in the middle of normalize leaves behind: a package dlt cannot move on
    broken = {"left": 1}

    def broken_normalize(self: Pipeline, *args: Any, **kwargs: Any) -> Any:
        if broken["left"]:
            broken["left"] -= 1
            raise OSError(39, "Directory not empty")
        return original_normalize(self, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "normalize", broken_normalize)
    store.add(make_records(pendulum.now("UTC").subtract(minutes=10), 3, "third"))
    sync(emulator)

    assert_table_equals(workdir / DB, store.records())
    assert not make_pipeline(settings.resolve({})).has_pending_data
