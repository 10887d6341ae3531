"""Shared fixtures: a real emulator on 127.0.0.1, an isolated working directory, and the truth."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import _pytest.main
import duckdb
import pendulum
import pytest

from ona_emulator import EmulatorServer, UsageStore, generate_records, parse_rfc3339_ns
from ona_usage.windows import format_rfc3339

API_KEY = "test-key-5f3e9a1c-do-not-print"
COLUMNS = (
    "id",
    "created_at",
    "stopped_at",
    "environment_class_id",
    "environment_id",
    "project_id",
    "runner_id",
    "user_id",
)
API_FIELDS = ("id", "createdAt", "stoppedAt", "environmentClassId", "environmentId", "projectId", "runnerId", "userId")
KEY_ENV_VARS = ("ONA_API_KEY", "GITPOD_API_KEY", "SOURCES__ONA_USAGE__API_KEY")


def _call(function: Callable[..., Any], *args: Any) -> Any:
    return function(*args)


# CPython 3.11 keeps a thread's Python frames in 16 KiB chunks, and frees a chunk (munmap) as
# soon as the frame at its start returns. A call that crosses a chunk boundary in a hot loop
# maps and unmaps 16 KiB every time: with pytest, hypothesis and dlt stacked up, that was a
# third of the suite's time, spent in the kernel. A frame just over 512 KiB (its unused value
# stack) gets a 1 MiB chunk of its own, so everything called from it has 512 KiB of frames to
# grow into without crossing a boundary. It changes nothing but where the frames are kept.
_call_with_headroom = types.FunctionType(
    _call.__code__.replace(co_stacksize=(512 * 1024) // 8 + 64), _call.__globals__, "_call_with_headroom"
)


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session: pytest.Session) -> object:
    """pytest's own test loop (setup, call, teardown of every test), run with frame headroom."""
    return _call_with_headroom(_pytest.main.pytest_runtestloop, session)


@pytest.fixture
def store() -> UsageStore:
    return UsageStore()


@pytest.fixture
def emulator(store: UsageStore) -> Iterator[EmulatorServer]:
    with EmulatorServer(store, api_key=API_KEY) as server:
        yield server


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with its own DuckDB file and dlt data dir, and no stray config."""
    isolate(monkeypatch, tmp_path)
    return tmp_path


def isolate(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Work in `root`, with its own dlt data dir, no telemetry and no config from outside."""
    monkeypatch.chdir(root)
    monkeypatch.setenv("DLT_DATA_DIR", str(root / "dlt-data"))
    monkeypatch.setenv("DLT_TELEMETRY_DISABLED", "1")
    monkeypatch.setenv("RUNTIME__DLTHUB_TELEMETRY", "false")
    for name in list(os.environ):
        if name.startswith(("SOURCES__", "DESTINATION__")) or name in KEY_ENV_VARS:
            monkeypatch.delenv(name)


def recent_records(count: int, days: int, seed: int = 7, **kwargs: Any) -> list[dict[str, Any]]:
    """Records over the `days` days before the last full hour, so a sync "now" covers them all."""
    end = pendulum.now("UTC").start_of("hour")
    return generate_records(seed, end.subtract(days=days), end, count, **kwargs)


def to_datetime(text: str | None) -> datetime | None:
    """The value a timestamp column must hold: the instant, truncated to microseconds."""
    if text is None:
        return None
    micros = parse_rfc3339_ns(text) // 1000
    return datetime.fromtimestamp(0, timezone.utc) + pendulum.duration(microseconds=micros)


def expected_rows(records: list[dict[str, Any]]) -> dict[str, tuple]:
    rows = {}
    for record in records:
        values = [record.get(field) for field in API_FIELDS]
        values[1], values[2] = to_datetime(values[1]), to_datetime(values[2])
        rows[record["id"]] = tuple(values)
    return rows


def table_rows(path: Path | str, dataset: str = "ona") -> list[tuple]:
    with duckdb.connect(str(path), read_only=True) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        return conn.execute(
            f"SELECT {', '.join(COLUMNS)} FROM {dataset}.environment_usage_records ORDER BY id"
        ).fetchall()


def assert_table_equals(path: Path | str, records: list[dict[str, Any]], dataset: str = "ona") -> None:
    """Same ids, same values, each id once."""
    assert_rows_equal(table_rows(path, dataset), records)


def assert_rows_equal(rows: list[tuple], records: list[dict[str, Any]]) -> None:
    """Rows (in COLUMNS order) hold each record once, with its values; timestamps in any zone."""
    ids = [row[0] for row in rows]
    assert len(ids) == len(set(ids)), "duplicate ids in the table"
    actual = {row[0]: tuple(v.astimezone(timezone.utc) if isinstance(v, datetime) else v for v in row) for row in rows}
    expected = expected_rows(records)
    assert actual.keys() == expected.keys()
    assert actual == expected


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it."""
    full_env = {k: v for k, v in os.environ.items()}
    full_env.update(env or {})
    exe = Path(sys.executable).with_name("ona-usage")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=300)


def make_records(stopped: pendulum.DateTime, count: int, prefix: str) -> list[dict[str, Any]]:
    """`count` records with ids `prefix-N` stopping a second apart from `stopped`."""
    return [
        {
            "id": f"{prefix}-{i}",
            "createdAt": format_rfc3339(stopped.subtract(hours=1)),
            "stoppedAt": format_rfc3339(stopped.add(seconds=i)),
            "environmentClassId": "class-1",
            "environmentId": f"env-{prefix}-{i}",
            "projectId": "project-1",
            "runnerId": "runner-1",
            "userId": "user-1",
        }
        for i in range(count)
    ]


def request_ranges(emulator: EmulatorServer) -> list[tuple[str, str]]:
    """The dateRange of every list request after the access check (which asks for pageSize 1)."""
    ranges = []
    for request in emulator.requests:
        body = request["body"] or {}
        if body.get("pagination", {}).get("pageSize") == 1 or "filter" not in body:
            continue  # the access check, or a list of names
        date_range = body["filter"]["dateRange"]
        ranges.append((date_range["startTime"], date_range["endTime"]))
    return ranges


def run_here(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """The command line in this process (without a subprocess's second of imports): exit code, stdout, stderr."""
    from ona_usage.cli import main as cli_main

    capsys.readouterr()
    code = cli_main(list(args))
    out, err = capsys.readouterr()
    return code, out, err
