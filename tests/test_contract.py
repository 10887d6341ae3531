"""Answers that break the API's contract stop the run clearly; missing name lists do not."""

from __future__ import annotations

import logging
from typing import Any

import duckdb
import orjson
import pendulum
import pytest

from ona_usage.pipeline import make_pipeline, read_state
from ona_usage import settings

from conftest import API_KEY, assert_table_equals, cli_here, make_records, recent_records, table_rows
from test_sync import DB, sync


def answer_with(records: list[dict[str, Any]]):
    """A fault hook answering every usage page with `records` (the access check passes)."""

    def fault(request: dict) -> Any:
        body = request.get("body") or {}
        if body.get("pagination", {}).get("pageSize") == 1 or "filter" not in body:
            return None
        return 200, orjson.dumps({"records": records}), {}

    return fault


def good(**changes: Any) -> dict[str, Any]:
    record = make_records(pendulum.now("UTC").subtract(minutes=20), 1, "rec")[0]
    return {k: v for k, v in {**record, **changes}.items() if v is not None}


@pytest.mark.parametrize(
    "record, message",
    [
        (good(id=None), "without id"),
        (good(stoppedAt="yesterday at noon"), "not an RFC 3339 timestamp"),
        (good(stoppedAt=None), "without stoppedAt"),
        (good(stoppedAt="2020-01-01T00:00:00Z"), "outside the requested range"),
        (good(userId=12345), "expected a string"),
    ],
    ids=["no-id", "bad-stopped-at", "no-stopped-at", "outside-window", "wrong-type"],
)
def test_a_record_that_breaks_the_contract_stops_the_run_and_writes_nothing(record, message, workdir, store, emulator, capsys):
    store.add(recent_records(50, days=2))
    sync(emulator, start_date=pendulum.now("UTC").subtract(days=3).to_date_string())
    before_rows, before_state = table_rows(workdir / DB), read_state(make_pipeline(settings.resolve({})))

    emulator.fault = answer_with([good(id="fine-1"), record])
    result = cli_here(capsys, "sync", "--base-url", emulator.url, "--lookback", "1d", env={"ONA_API_KEY": API_KEY})

    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert message in lines[-1] and "window [" in lines[-1], result.stderr
    assert table_rows(workdir / DB) == before_rows
    after = read_state(make_pipeline(settings.resolve({})))
    assert (after.cursor, after.fetched_through) == (before_state.cursor, before_state.fetched_through)


def test_a_name_list_the_key_may_not_read_is_left_out_once_and_usage_loads(workdir, store, emulator, caplog):
    store.add(recent_records(200, days=3))
    store.names = {r["runnerId"]: "eu-runner" for r in store.records()}
    emulator.denied = {"projects"}

    with caplog.at_level(logging.WARNING, logger="ona_usage"):
        sync(emulator, start_date=pendulum.now("UTC").subtract(days=4).to_date_string())

    assert_table_equals(workdir / DB, store.records())
    warnings = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("projects are left out")
    with duckdb.connect(str(workdir / DB), read_only=True) as conn:
        tables = {t for (t,) in conn.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'ona'").fetchall()}
        assert {"runners", "environment_classes"} <= tables and "projects" not in tables
        names = conn.execute(
            "SELECT count(*), count(project_name), count(DISTINCT runner_name) FROM ona.environment_usage_daily"
        ).fetchone()
    assert names[0] > 0 and names[1] == 0 and names[2] == 1  # projects unnamed, runners named


def test_a_backfill_that_ends_before_it_starts_is_refused(workdir, emulator, capsys):
    result = cli_here(capsys, "backfill", "--base-url", emulator.url, "--start", "2026-03-01", "--end", "2026-02-01",
                      env={"ONA_API_KEY": API_KEY})
    assert result.returncode == 2
    assert "must be after" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert emulator.requests == [] and not (workdir / DB).exists()
