"""One pipeline name, two working directories: every command uses the current directory's warehouse.

dlt keeps a pipeline's local state machine-wide (here one `DLT_DATA_DIR` for both directories),
and that state remembers where the pipeline first ran. The first directory is deleted, or kept
with its own warehouse; either way, in the second directory `sync`, `status`, `report`, `verify`
and `demo` read and write only the second directory's file, and every table ends exact.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import duckdb
import pendulum
import pytest


from conftest import API_KEY, assert_table_equals, isolate, recent_records, run_here

DB = "ona_usage.duckdb"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("first_directory", ["deleted", "kept"])
def test_every_command_uses_the_current_directorys_warehouse(first_directory, tmp_path, monkeypatch, capsys, store, emulator):
    shared_state = tmp_path / "dlt-data"  # dlt's machine-wide folder, the same for both directories
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    isolate(monkeypatch, first)
    monkeypatch.setenv("DLT_DATA_DIR", str(shared_state))
    monkeypatch.setenv("ONA_API_KEY", API_KEY)
    start = pendulum.now("UTC").subtract(days=6).to_date_string()
    store.add(recent_records(400, days=5, seed=1))

    code, _, err = run_here(capsys, "sync", "--quiet", "--base-url", emulator.url, "--start-date", start)
    assert code == 0, err
    assert_table_equals(first / DB, store.records(), dataset="ona")
    before = digest(first / DB)
    if first_directory == "deleted":
        shutil.rmtree(first)

    # more usage, then the same pipeline name from another directory
    store.add(recent_records(300, days=5, seed=2))
    monkeypatch.chdir(second)
    code, out, err = run_here(capsys, "sync", "--base-url", emulator.url, "--start-date", start)
    assert code == 0, err
    assert "following the state stored in " + str(second / DB) in err  # said once, in one line
    assert_table_equals(second / DB, store.records(), dataset="ona")  # all of it, not only what is new since the first

    code, out, err = run_here(capsys, "status", "--json")
    assert code == 0, err
    status = json.loads(out)
    assert status["table_stats"]["rows"] == len(store.records()) == 700
    assert status["last_load"]["rows"] == 700

    code, out, err = run_here(capsys, "report", "--out", str(second / "report.html"))
    assert code == 0, err
    assert "in 700 runs" in out

    day = pendulum.now("UTC").start_of("day")
    code, out, err = run_here(capsys, "verify", "--base-url", emulator.url, "--start", day.subtract(days=6).to_date_string(), "--end", day.add(days=1).to_date_string())
    assert code == 0, out + err
    assert "API 700 records, warehouse 700 rows: match" in out

    # the demo from a third directory: its own emulator's records, in its own directory's file
    third = tmp_path / "third"
    third.mkdir()
    monkeypatch.chdir(third)
    monkeypatch.delenv("ONA_API_KEY")
    code, out, err = run_here(capsys, "demo", "--records", "500", "--days", "4")
    assert code == 0, err
    with duckdb.connect(str(third / "ona_usage_demo.duckdb"), read_only=True) as conn:
        assert conn.execute("SELECT count(*) FROM ona.environment_usage_records").fetchone()[0] == int(out.split("syncing ")[1].split(" ")[0].replace(",", ""))
    assert_table_equals(second / DB, store.records(), dataset="ona")  # untouched by the demo

    if first_directory == "deleted":
        assert not first.exists()  # nothing recreated it
    else:
        assert digest(first / DB) == before  # nothing wrote to it


def test_status_and_report_fail_where_there_is_no_warehouse(workdir, capsys, store, emulator, monkeypatch):
    monkeypatch.setenv("ONA_API_KEY", API_KEY)
    store.add(recent_records(50, days=2))
    code, _, err = run_here(capsys, "sync", "--quiet", "--base-url", emulator.url, "--start-date", pendulum.now("UTC").subtract(days=3).to_date_string())
    assert code == 0, err
    elsewhere = workdir / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    code, out, err = run_here(capsys, "status")
    assert code == 1 and out == ""
    assert err.strip() == f"ona-usage: error: no DuckDB file at {elsewhere / DB}; run `ona-usage sync` first, or point --duckdb-file at one"

    code, out, err = run_here(capsys, "report")
    assert code != 0 and len(err.strip().splitlines()) == 1 and "no DuckDB file at" in err

    code, out, err = run_here(capsys, "status", "--duckdb-file", str(workdir / DB))
    assert code == 0, err
    assert "50 rows" in out
    assert not (elsewhere / DB).exists()
