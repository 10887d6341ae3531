"""`--destination filesystem`: Parquet files in a Delta table on local disk, merged on `id`."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pendulum
from deltalake import DeltaTable

from ona_usage import settings
from ona_usage.pipeline import make_pipeline, read_state, run_backfill, run_sync

from conftest import API_KEY, assert_rows_equal, recent_records


def lake_rows(lake: Path) -> list[tuple]:
    table = DeltaTable(str(lake / "ona" / "environment_usage_records")).to_pyarrow_table()
    columns = ["id", "created_at", "stopped_at", "environment_class_id", "environment_id", "project_id", "runner_id", "user_id"]
    return list(zip(*(table.column(c).to_pylist() for c in columns)))


def list_rows(lake: Path, table: str) -> list[tuple]:
    """A list's (id, name) rows, from the files dlt wrote for it (gzipped JSON lines)."""
    lines = [line for path in (lake / "ona" / table).glob("*.jsonl.gz") for line in gzip.decompress(path.read_bytes()).splitlines()]
    return sorted((row["id"], row["name"]) for row in map(json.loads, lines))


def test_filesystem_delta_table_equals_the_api_after_syncs_a_fresh_runner_and_a_backfill(workdir, store, emulator, monkeypatch):
    lake = workdir / "lake"
    monkeypatch.setenv("DESTINATION__FILESYSTEM__BUCKET_URL", str(lake))
    store.add(recent_records(1_200, days=20))
    today = pendulum.now("UTC").start_of("day")
    config = settings.resolve({"destination": "filesystem", "base_url": emulator.url, "start_date": today.subtract(days=5).to_date_string()})
    config.api_key = API_KEY

    run_sync(config)
    assert_rows_equal(lake_rows(lake), store.records(start=today.subtract(days=5)))
    assert list((lake / "ona" / "environment_usage_records").glob("*.parquet"))
    projects = list_rows(lake, "projects")
    assert projects and len(projects) == len({r["projectId"] for r in store.records() if r.get("projectId")})

    # a fresh runner re-reads a wide lookback: rows are merged, not appended
    shutil.rmtree(workdir / "dlt-data")
    config.lookback = pendulum.duration(days=3)
    run_sync(config)
    assert_rows_equal(lake_rows(lake), store.records(start=today.subtract(days=5)))
    cursor = read_state(make_pipeline(config)).cursor

    run_backfill(config, settings.parse_range(today.subtract(days=20).to_date_string(), today.subtract(days=5).to_date_string()))
    assert_rows_equal(lake_rows(lake), store.records(start=today.subtract(days=20)))
    assert read_state(make_pipeline(config)).cursor == cursor
    assert list_rows(lake, "projects") == projects  # replaced on every run, never emptied
