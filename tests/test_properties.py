"""Property-based: random histories of an API and of runs against it keep the table right.

Hypothesis draws a sequence of steps: new records, late records (stopped in the past, inside or
outside the lookback, some visible only later), changed records (other values, a later
`stoppedAt`), the clock moving on, transient faults (the next N requests answer 429/5xx), and
runs (`sync`, a `backfill` of some days, sometimes on a fresh runner without the local pipeline
folder). The sync's clock is the emulator's: `pendulum.now` answers the emulator's frozen clock,
so "time passes" between runs exactly as the steps say.

After every run: each id is in the table once, and every row holds values the API has given for
that id (its current values or an earlier version: nothing invented). A sync also keeps its
promise: every record visible now with `stoppedAt` in `[previous run - lookback, now)` (from the
start date on the first run) is in the table with its current values; a backfill likewise for
its range. At the end, after a backfill over the whole range (what `verify --repair` does), the
table equals the API exactly.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import duckdb
import pendulum
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from ona_emulator import EmulatorServer, UsageStore
from ona_usage import settings
from ona_usage.cli import main as cli_main
from ona_usage.client import UsageClient
from ona_usage.pipeline import run_backfill, run_sync
from ona_usage.source import backfill_key
from ona_usage.windows import format_rfc3339

from conftest import API_KEY, assert_table_equals, expected_rows, make_records, table_rows

DB = "ona_usage.duckdb"
LOOKBACK = pendulum.duration(hours=2)
MAX_FAULTS = 6  # pending faulty answers at most; max_attempts is 8, so every run still succeeds

new_step = st.tuples(st.just("new"), st.integers(1, 12), st.integers(0, 90 * 60))
late_step = st.tuples(
    st.just("late"),
    st.integers(1, 4),
    st.sampled_from([5 * 60, 60 * 60, 110 * 60, 3 * 3600, 20 * 3600, 3 * 86400]) | st.integers(60, 3 * 86400),
    st.sampled_from([0, 0, 30 * 60, 3 * 3600]),  # becomes visible that much later
)
change_step = st.tuples(
    st.just("change"), st.integers(0, 10**6), st.sampled_from(["class", "user", "no-project", "later"]), st.integers(1, 6 * 3600)
)
advance_step = st.tuples(st.just("advance"), st.sampled_from([60, 30 * 60, 3 * 3600, 26 * 3600]) | st.integers(60, 36 * 3600))
fault_step = st.tuples(st.just("fault"), st.integers(1, 4), st.sampled_from([429, 500, 502, 503, 504]))
sync_step = st.tuples(st.just("sync"), st.integers(1, 3), st.booleans())
backfill_step = st.tuples(st.just("backfill"), st.integers(-1, 4), st.integers(1, 3), st.booleans())
steps_strategy = st.lists(
    st.one_of(new_step, late_step, change_step, advance_step, fault_step, sync_step, sync_step, backfill_step),
    min_size=3,
    max_size=6,
)


def _wire(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if not k.startswith("_") and v not in (None, "")}


def _normalized(row: tuple) -> tuple:
    return tuple(v.astimezone(timezone.utc) if isinstance(v, datetime) else v for v in row)


class Model:
    """The emulator, its records and every version each record has had, and the run history."""

    def __init__(self, store: UsageStore, emulator: EmulatorServer, rng: random.Random, start_date: pendulum.DateTime):
        self.store, self.emulator, self.rng, self.start_date = store, emulator, rng, start_date
        self.records: dict[str, dict[str, Any]] = {}  # id -> current record (with _visibleAt)
        self.versions: dict[str, set[tuple]] = {}
        self.next_id = 0
        self.faults = {"left": 0, "status": 503}
        self.last_sync: pendulum.DateTime | None = None
        self.done_backfills: set[str] = set()
        emulator.fault = self._fault

    def _fault(self, request: dict) -> Any:
        if self.faults["left"] <= 0 or not request["path"].endswith("ListEnvironmentUsageRecords"):
            return None
        self.faults["left"] -= 1
        status = self.faults["status"]
        headers = {"Retry-After": "0"} if status == 429 else {}
        return status, b'{"code":"unavailable","message":"try again"}', headers

    def now(self) -> pendulum.DateTime:
        return self.store.now()

    def record(self, stopped: pendulum.DateTime, visible: pendulum.DateTime | None = None) -> dict[str, Any]:
        self.next_id += 1
        rng = self.rng
        record = {
            "id": f"rec-{self.next_id:05d}",
            "createdAt": format_rfc3339(stopped.subtract(seconds=rng.randint(1, 10 * 3600))),
            "stoppedAt": format_rfc3339(stopped),
            "environmentClassId": f"class-{rng.randint(1, 3)}",
            "environmentId": f"env-{rng.randint(1, 50)}",
            "projectId": None if rng.random() < 0.1 else f"project-{rng.randint(1, 4)}",
            "runnerId": f"runner-{rng.randint(1, 2)}",
            "userId": f"user-{rng.randint(1, 9)}",
        }
        if visible is not None:
            record["_visibleAt"] = format_rfc3339(visible)
        return record

    def put(self, records: list[dict[str, Any]], upsert: bool = False) -> None:
        (self.store.upsert if upsert else self.store.add)(records)
        for record in records:
            self.records[record["id"]] = record
            self.versions.setdefault(record["id"], set()).add(expected_rows([_wire(record)])[record["id"]])

    # -- steps ----------------------------------------------------------------

    def new(self, count: int, spread: int) -> None:
        now = self.now()
        self.put([self.record(now.subtract(seconds=self.rng.randint(0, spread))) for _ in range(count)])

    def late(self, count: int, age: int, delay: int) -> None:
        now = self.now()
        visible = now.add(seconds=delay) if delay else None
        self.put([self.record(now.subtract(seconds=age + self.rng.randint(0, 59)), visible) for _ in range(count)])

    def change(self, pick: int, kind: str, seconds: int) -> None:
        ids = sorted(self.records)
        record = dict(self.records[ids[pick % len(ids)]])
        if kind == "class":
            record["environmentClassId"] = f"class-resized-{seconds % 7}"
        elif kind == "user":
            record["userId"] = f"user-{seconds % 13}"
        elif kind == "no-project":
            record["projectId"] = None
        else:  # stopped later than first reported, never in the future
            stopped = min(pendulum.parse(record["stoppedAt"]).add(seconds=seconds), self.now())
            record["stoppedAt"] = format_rfc3339(stopped)
        self.put([record], upsert=True)

    def advance(self, seconds: int) -> None:
        self.store.advance(seconds)

    def fault(self, count: int, status: int) -> None:
        self.faults["left"] = min(MAX_FAULTS, self.faults["left"] + count)
        self.faults["status"] = status


def rows_now(path: Path) -> list[tuple]:
    if not path.exists():
        return []
    try:
        return table_rows(path)
    except duckdb.CatalogException:
        return []


def check_table(model: Model, path: Path) -> dict[str, tuple]:
    """No duplicates; every row is a version of a record the API has (or had) under that id."""
    rows = rows_now(path)
    ids = [row[0] for row in rows]
    assert len(ids) == len(set(ids)), "duplicate ids in the table"
    table = {row[0]: _normalized(row) for row in rows}
    unknown = table.keys() - model.records.keys()
    assert not unknown, f"rows the API does not have: {sorted(unknown)}"
    for record_id, row in table.items():
        assert row in model.versions[record_id], f"{record_id} holds values the API never gave: {row}"
    return table


def check_covered(model: Model, table: dict[str, tuple], start: pendulum.DateTime, end: pendulum.DateTime, what: str) -> None:
    """Every record the API shows now in `[start, end)` is in the table with its current values."""
    expected = expected_rows(model.store.records(start=start, end=end))
    missing = sorted(expected.keys() - table.keys())
    assert not missing, f"{what}: missing {missing} from [{start}, {end})"
    stale = sorted(i for i in expected if table[i] != expected[i])
    assert not stale, f"{what}: stale values for {stale} in [{start}, {end})"


@contextmanager
def isolated(base: Path) -> Iterator[Path]:
    """A fresh working directory and dlt data dir for one example."""
    base.mkdir(parents=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(base)
        mp.setenv("DLT_DATA_DIR", str(base / "dlt-data"))
        yield base


@contextmanager
def emulated_clock(store: UsageStore) -> Iterator[None]:
    """`pendulum.now` (the sync's "now", and dlt's) follows the emulator's frozen clock; retries don't wait."""
    original = pendulum.now

    def now(tz: Any = None) -> pendulum.DateTime:
        current = store.now()
        return current.in_tz(tz) if tz is not None else current.in_tz(pendulum.local_timezone())

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pendulum, "now", now)
        mp.setattr(UsageClient, "_wait", lambda self, state: 0.0)
        yield
    assert pendulum.now is original


EXAMPLES = {"n": 0}


@hsettings(
    max_examples=int(os.environ.get("ONA_PROPERTY_EXAMPLES", "15")),  # more, to search harder
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(seed=st.integers(0, 2**16), initial=st.integers(20, 120), steps=steps_strategy)
def test_random_histories_keep_the_table_right(workdir, seed, initial, steps):
    EXAMPLES["n"] += 1
    rng = random.Random(seed)
    t0 = pendulum.now("UTC").start_of("hour")
    store = UsageStore()
    store.set_now(t0)
    start_date = t0.subtract(days=3).start_of("day")
    with isolated(workdir / f"example-{EXAMPLES['n']}") as base, EmulatorServer(store, api_key=API_KEY) as emulator, emulated_clock(store):
        model = Model(store, emulator, rng, start_date)
        model.put([model.record(start_date.add(seconds=rng.randint(0, int((t0 - start_date).total_seconds()) - 1)))
                   for _ in range(initial)])

        def config(workers: int = 2, chunk: str = "2d") -> settings.SyncSettings:
            resolved = settings.resolve({"base_url": emulator.url, "start_date": start_date.to_date_string(), "chunk": chunk,
                                         "lookback": "2h", "page_size": 10, "workers": workers, "max_attempts": 8})
            resolved.api_key = API_KEY
            return resolved

        def fresh_runner(yes: bool) -> None:
            if yes:
                shutil.rmtree(base / "dlt-data" / "pipelines" / "ona_usage", ignore_errors=True)

        # the schedule's first run comes first
        for step in [("sync", 2, False), *steps]:
            kind, *args = step
            if kind == "sync":
                workers, fresh = args
                fresh_runner(fresh)
                now = model.now()
                run_sync(config(workers))
                table = check_table(model, base / DB)
                lower = start_date if model.last_sync is None else model.last_sync - LOOKBACK
                check_covered(model, table, lower, now, "sync")
                model.last_sync = now
            elif kind == "backfill":
                offset, days, fresh = args
                fresh_runner(fresh)
                begin = start_date.add(days=offset)
                end = begin.add(days=days)
                key = backfill_key(begin, end, None)
                now = model.now()
                run_backfill(config(), settings.parse_range(begin.isoformat(), end.isoformat()))
                table = check_table(model, base / DB)
                if key not in model.done_backfills:  # a finished backfill is not run again (see below)
                    check_covered(model, table, begin, min(end, now), "backfill")
                model.done_backfills.add(key)
            else:
                getattr(model, kind)(*args)

        # what `verify --repair` does, over everything, once all late records are visible
        store.advance(7 * 3600)
        end = model.now().add(days=1).start_of("day")
        run_backfill(config(chunk="30d"), settings.parse_range(start_date.subtract(days=2).isoformat(), end.isoformat()))
        check_table(model, base / DB)
        assert_table_equals(base / DB, store.records())
        assert len(store.records()) == len(model.records)


def test_repairing_the_same_day_twice_repairs_it_twice(workdir, store, emulator, monkeypatch, capsys):
    monkeypatch.setenv("ONA_API_KEY", API_KEY)
    cli_logger = logging.getLogger("ona_usage")  # the CLI configures it; leave it as other tests expect
    monkeypatch.setattr(cli_logger, "handlers", list(cli_logger.handlers))  # main() edits the list in place
    monkeypatch.setattr(cli_logger, "level", cli_logger.level)
    monkeypatch.setattr(cli_logger, "propagate", cli_logger.propagate)
    day = pendulum.now("UTC").start_of("day").subtract(days=3)
    store.add(make_records(day.add(hours=1), 3, "first"))
    verify = ["verify", "--base-url", emulator.url, "--start", day.to_date_string(), "--end", day.add(days=1).to_date_string()]

    # day 1: the table is empty; verify --repair loads the day
    assert cli_main([*verify, "--repair"]) == 0
    assert_table_equals(workdir / DB, store.records())

    # later, a record of that day shows up late (or one changes); verify finds it, --repair should fix it
    store.add(make_records(day.add(hours=2), 2, "late"))
    store.upsert([dict(store.records()[0], environmentClassId="resized")])
    assert cli_main(verify) == 1
    capsys.readouterr()

    repaired = cli_main([*verify, "--repair"])

    out = capsys.readouterr().out
    assert repaired == 0, out
    assert_table_equals(workdir / DB, store.records())


@pytest.mark.parametrize("command", ["sync", "backfill"])
def test_a_first_run_over_a_range_without_records_succeeds(workdir, store, emulator, command):
    day = pendulum.now("UTC").start_of("day")
    store.add(make_records(day.subtract(days=10), 2, "old"))  # outside the range
    config = settings.resolve({"base_url": emulator.url, "start_date": day.subtract(days=2).to_date_string()})
    config.api_key = API_KEY
    if command == "sync":
        result = run_sync(config)
    else:
        result = run_backfill(config, settings.parse_range(day.subtract(days=3).to_date_string(), day.subtract(days=1).to_date_string()))
    assert result.rows_loaded == 0
