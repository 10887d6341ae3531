"""Shared fixtures: a real emulator on 127.0.0.1, an isolated working directory, and the truth."""

from __future__ import annotations

import gc
import inspect
import os
import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

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


def _call(function: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    return function(**kwargs)


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
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> object:
    """Every test function runs with frame headroom (under pytest-xdist's workers too)."""
    if inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    names = pyfuncitem._fixtureinfo.argnames
    _call_with_headroom(pyfuncitem.obj, {name: pyfuncitem.funcargs[name] for name in names})
    return True


def pytest_collection_finish(session: pytest.Session) -> None:
    # What is alive now (modules, classes, collected tests) lives to the end: the collector
    # need not walk it again at every full collection, a tenth of an in-process sync's time.
    gc.collect()
    gc.freeze()


# The PostgreSQL server's TimeZone: +05:30 all year, so any local-time mix-up moves every value.
PG_SERVER_TIMEZONE = "Asia/Kolkata"


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """One throwaway PostgreSQL cluster for the whole session (see pg_server.py): the URL of its first database.

    Every test that uses it works in a database of its own (`pg_url`, or `pg_server.create_database`).
    Without PostgreSQL binaries the tests that need it skip, unless the environment variable CI
    is set: then they fail, so CI cannot go green without running them.
    """
    import pg_server

    try:
        pg_server.find_binaries()
    except pg_server.PostgresNotFound as exc:
        if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
            pytest.fail(f"CI is set but PostgreSQL is missing: {exc}", pytrace=False)
        pytest.skip(str(exc))
    with pg_server.postgres_server(timezone=PG_SERVER_TIMEZONE) as url:
        yield url


@pytest.fixture
def pg_url(postgres: str, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh database for this test, set as the postgres destination's credentials.

    Depends on `workdir`, which clears every DESTINATION__* variable, so this one comes after it.
    """
    import uuid

    import pg_server

    url = pg_server.create_database(postgres, f"t_{uuid.uuid4().hex[:12]}")
    monkeypatch.setenv("DESTINATION__POSTGRES__CREDENTIALS", url)
    return url


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


def run_clis_together(
    *commands: list[str], env: dict[str, str] | None = None, cwd: Path | None = None
) -> list[subprocess.CompletedProcess]:
    """`run_cli` for each command, all started at once: fresh processes side by side (readers, say)."""
    full_env = {k: v for k, v in os.environ.items()}
    full_env.update(env or {})
    exe = str(Path(sys.executable).with_name("ona-usage"))
    processes = [
        subprocess.Popen([exe, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env, cwd=cwd)
        for args in commands
    ]
    results = []
    try:
        for process in processes:
            stdout, stderr = process.communicate(timeout=300)
            results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    finally:
        for process in processes:  # as subprocess.run does on a timeout: none is left running
            if process.poll() is None:
                process.kill()
                process.wait()
    return results


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


def first_start(ranges: list[tuple[str, str]]) -> str:
    """The earliest startTime asked: windows go out at once, so in the first hours after a UTC
    midnight the lookback's two windows may be asked today's first."""
    return min((start for start, _ in ranges), key=pendulum.parse)


def utc_days(start: pendulum.DateTime, end: pendulum.DateTime) -> int:
    """How many day windows [start, end) is cut into: one per UTC day it touches."""
    return (end.subtract(microseconds=1).in_tz("UTC").date() - start.in_tz("UTC").date()).days + 1


def cli_here(
    capture: pytest.CaptureFixture, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """The command line in this process, answered like `run_cli`: returncode, stdout and stderr.

    For tests about what a command does, not about the process (signals, exit, a fresh
    environment): it saves the second of imports a subprocess costs. `env` is added to the
    environment and `cwd` entered for the call only; argparse's exits (--help, bad flags) are
    return codes, as they are for the process. `capture` is capsys or capfd.
    """
    from ona_usage.cli import main as cli_main

    environ = dict(os.environ)  # main() may set variables for its process (dlt's telemetry switch)
    with pytest.MonkeyPatch.context() as mp:
        for name, value in (env or {}).items():
            mp.setenv(name, value)
        if cwd is not None:
            mp.chdir(cwd)
        capture.readouterr()
        try:
            code = cli_main(list(args))
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 0 if exit.code is None else 1
        finally:
            for name in os.environ.keys() - environ.keys() - (env or {}).keys():
                del os.environ[name]
        out, err = capture.readouterr()
    return subprocess.CompletedProcess(["ona-usage", *args], code, out, err)


def run_here(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """The command line in this process (without a subprocess's second of imports): exit code, stdout, stderr."""
    from ona_usage.cli import main as cli_main

    capsys.readouterr()
    code = cli_main(list(args))
    out, err = capsys.readouterr()
    return code, out, err
