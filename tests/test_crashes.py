"""`kill -9` at random moments: during extraction and during loading, again and again.

`ona-usage sync` and `ona-usage backfill` run as subprocesses against the emulator (small
latency, small pages, `--chunk 2d`, so a run is many loads), and each is SIGKILLed (its whole
process group) at a moment drawn from a seeded `random.Random`: either a random delay after the
start, or a random delay after the k-th committed chunk (while the next chunk is extracted,
normalized or loaded). Runs go on until ITERATIONS of them have been killed (a run that ends
before its moment counts as a run, not a kill). After every kill the DuckDB file is opened
read-only and checked:

- every row is a record of the API, each id once;
- the state committed in the destination (dlt's `_dlt_pipeline_state` joined with completed
  loads, exactly as dlt restores it) never runs ahead of the data: every record with
  `stoppedAt` before `fetched_through` (and, for the backfill, in `[start, through)`) is in the
  table, and the cursor is a `stopped_at` that is in the table;
- the local state (what the next run starts from when the local folder survives), when no load
  package is pending that would be finished first, obeys the same rule.

Some iterations delete the local pipeline folder (a fresh runner). At the end both commands run
to completion (in this process: the kills are done) and the table equals the API. The seed is
`ONA_CRASH_SEED` (a fixed default).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb
import pendulum
import pytest

from dlt.common.versioned_state import decompress_state, json_decode_state

from conftest import API_KEY, assert_table_equals, cli_here, recent_records, to_datetime
from test_models import SELECT_DAILY, assert_view_equals, expected_daily

SEED = int(os.environ.get("ONA_CRASH_SEED", "20261126"))
ITERATIONS = 14  # SIGKILLs, always this many; each is followed by a rerun (the next run or the final one)
MAX_RUNS = 3 * ITERATIONS  # runs that end before their kill moment do not count; this many runs at most
DB = "ona_usage.duckdb"
RESOURCE = "environment_usage_records"


def resource_state(state: dict[str, Any] | None) -> dict[str, Any]:
    if not state:
        return {}
    return state.get("sources", {}).get("ona_usage", {}).get("resources", {}).get(RESOURCE, {})


def committed_state(db: Path) -> tuple[dict[str, Any] | None, list[tuple[str, datetime]]]:
    """The state dlt would restore from the destination, and the table's (id, stopped_at) rows."""
    if not db.exists():
        return None, []
    with duckdb.connect(str(db), read_only=True) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        tables = {
            name
            for (name,) in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'ona'"
            ).fetchall()
        }
        rows = []
        if RESOURCE in tables:
            rows = conn.execute(f"SELECT id, stopped_at FROM ona.{RESOURCE}").fetchall()
        state = None
        if {"_dlt_pipeline_state", "_dlt_loads"} <= tables:
            found = conn.execute(
                "SELECT s.state FROM ona._dlt_pipeline_state AS s JOIN ona._dlt_loads AS l"
                " ON l.load_id = s._dlt_load_id WHERE s.pipeline_name = 'ona_usage' AND l.status = 0"
                " ORDER BY l.load_id DESC LIMIT 1"
            ).fetchone()
            if found:
                state = decompress_state(found[0])
    return state, [(i, s.astimezone(timezone.utc)) for i, s in rows]


def local_state(data_dir: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """The local state.json and the load packages a next run would finish before anything else."""
    folder = data_dir / "pipelines" / "ona_usage"
    state_file = folder / "state.json"
    state = json_decode_state(state_file.read_text()) if state_file.exists() else None
    pending = []
    for stage in ("normalize/extracted", "load/normalized", "load/new"):
        where = folder / stage
        if where.is_dir():
            pending += [f"{stage}/{p.name}" for p in where.iterdir() if p.is_dir()]
    return state, pending


def check_consistent(
    resource: dict[str, Any], rows: dict[str, datetime], store: Any,
    start_date: pendulum.DateTime, backfill: tuple[pendulum.DateTime, pendulum.DateTime], where: str,
) -> None:
    """The state in `resource` claims nothing the table does not hold."""
    fetched_through = resource.get("fetched_through")
    if fetched_through is not None:
        needed = {r["id"] for r in store.records(start=start_date, end=fetched_through)}
        missing = needed - rows.keys()
        assert not missing, f"{where}: fetched_through {fetched_through} runs ahead of the data: {len(missing)} missing"
    cursor = resource.get("incremental", {}).get("stopped_at", {}).get("last_value")
    if cursor is not None:
        cursor = pendulum.instance(cursor).in_tz("UTC")
        assert fetched_through is not None and cursor <= fetched_through, f"{where}: cursor {cursor} past fetched_through"
        assert any(s == cursor for s in rows.values()), f"{where}: cursor {cursor} is no stopped_at in the table"
    for key, progress in resource.get("backfills", {}).items():
        assert key.endswith("/*")
        needed = {r["id"] for r in store.records(start=backfill[0], end=progress["through"])}
        missing = needed - rows.keys()
        assert not missing, f"{where}: backfill through {progress['through']} runs ahead of the data: {len(missing)} missing"
        if progress.get("done"):
            assert pendulum.instance(progress["through"]) == backfill[1]


def check_after_kill(workdir: Path, store: Any, start_date: pendulum.DateTime,
                     backfill: tuple[pendulum.DateTime, pendulum.DateTime]) -> str:
    """Every invariant that must hold whenever the process is dead; returns where the kill landed."""
    truth = {r["id"]: to_datetime(r["stoppedAt"]) for r in store.records()}
    state, row_list = committed_state(workdir / DB)
    ids = [i for i, _ in row_list]
    assert len(ids) == len(set(ids)), "duplicate ids in the table"
    rows = dict(row_list)
    extra = rows.keys() - truth.keys()
    assert not extra, f"rows that the API does not have: {sorted(extra)[:5]}"
    assert all(rows[i] == truth[i] for i in rows)
    check_consistent(resource_state(state), rows, store, start_date, backfill, "destination state")

    local, pending = local_state(workdir / "dlt-data")
    if local is not None and not pending:
        check_consistent(resource_state(local), rows, store, start_date, backfill, "local state")
    if any(p.startswith("load/") for p in pending):
        return "loading"
    if pending:
        return "extracted, not loaded"
    return "extracting or between loads"


def wait_for_commits(log: Path, proc: subprocess.Popen, began: float, count: int, timeout: float = 20.0) -> float:
    """Seconds from `began` until the log shows `count` committed chunks (or the run ended)."""
    while time.monotonic() - began < timeout and proc.poll() is None:
        if log.read_text().count("committed chunk") >= count:
            break
        time.sleep(0.01)
    return time.monotonic() - began


def test_sigkill_at_random_moments_never_loses_or_invents_data(workdir, store, emulator, capsys):
    rng = random.Random(SEED)
    store.add(recent_records(1_200, days=20, seed=SEED % 1000))
    today = pendulum.now("UTC").start_of("day")
    start_date = today.subtract(days=20)
    backfill = (today.subtract(days=16), today.subtract(days=3))
    exe = str(Path(sys.executable).with_name("ona-usage"))
    env = {**os.environ, "ONA_API_KEY": API_KEY}
    commands = {
        "sync": ["sync", "--start-date", start_date.to_date_string()],
        "backfill": ["backfill", "--start", backfill[0].to_date_string(), "--end", backfill[1].to_date_string()],
    }
    completed: set[str] = set()
    landed: Counter[str] = Counter()
    runs = kills = fresh_runners = restarts = 0
    began = time.monotonic()

    iteration = -1
    while kills < ITERATIONS and runs < MAX_RUNS:
        iteration += 1
        choices = [c for c in commands if c not in completed]
        if not choices:  # both ran to the end: start over on an empty destination
            (workdir / DB).unlink(missing_ok=True)
            (workdir / f"{DB}.wal").unlink(missing_ok=True)
            shutil.rmtree(workdir / "dlt-data", ignore_errors=True)
            completed.clear()
            restarts += 1
            choices = list(commands)
        command = rng.choice(choices)
        emulator.latency = rng.uniform(0.005, 0.02)
        args = [*commands[command], "--base-url", emulator.url, "--chunk", "2d",
                "--page-size", str(rng.choice([10, 20, 25])), "--workers", str(rng.choice([1, 2]))]
        log_path = workdir / f"run-{iteration}.log"
        out = log_path.open("w")
        proc = subprocess.Popen([exe, *args], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        launched = time.monotonic()
        runs += 1
        if rng.random() < 0.5:
            # a random moment from the start: start-up, the first fetches, or any load after (a whole
            # run from an empty destination takes about 3 s here)
            delay = rng.uniform(0.8, 3.0)
        else:
            # a random moment shortly after the k-th committed chunk: the next chunk is being
            # extracted from the fetcher, normalized or loaded
            delay = wait_for_commits(log_path, proc, launched, rng.randint(1, 3)) + rng.uniform(0.0, 0.35)
        try:
            proc.wait(timeout=max(0.0, delay - (time.monotonic() - launched)))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        out.close()
        if proc.returncode == -signal.SIGKILL:
            kills += 1
            landed[check_after_kill(workdir, store, start_date, backfill)] += 1
        else:
            assert proc.returncode == 0, log_path.read_text()
            completed.add(command)
            check_after_kill(workdir, store, start_date, backfill)
        if rng.random() < 0.3:  # the next run happens on a fresh runner: only the destination is left
            shutil.rmtree(workdir / "dlt-data" / "pipelines" / "ona_usage", ignore_errors=True)
            fresh_runners += 1

    # the last runs go to the end; the table then holds exactly the API's records
    emulator.latency = 0
    for command in ("sync", "backfill"):
        result = cli_here(capsys, *commands[command], "--base-url", emulator.url, "--chunk", "2d", env={"ONA_API_KEY": API_KEY})
        assert result.returncode == 0, result.stderr
    check_after_kill(workdir, store, start_date, backfill)
    assert_table_equals(workdir / DB, store.records())
    state, _ = committed_state(workdir / DB)
    resource = resource_state(state)
    assert resource["fetched_through"] is not None
    assert all(p["done"] for p in resource["backfills"].values()) and resource["backfills"]

    print(
        f"\ncrash loop (seed {SEED}): {kills} SIGKILLs in {runs} runs, {len(completed)} ran to the end "
        f"in the last round, {restarts} restart(s) on an empty destination, {fresh_runners} fresh runner(s); "
        f"kills landed: {dict(landed)}; {time.monotonic() - began:.1f} s"
    )
    assert kills == ITERATIONS, f"only {kills} of {runs} runs were killed: the delays are too long"


# A run killed once a load job into `table` has committed, before dlt records the job as done
# (its pending-transition marker): the narrowest of the moments the random kills above land in
# only now and then. Any destination: the job's own `run` has committed when it returns.
KILLED_AFTER_A_JOB_COMMITS = textwrap.dedent("""
    import os, signal, sys
    from dlt.common.destination.client import RunnableLoadJob
    from ona_usage.cli import main

    release = RunnableLoadJob._release
    def release_or_die(job, next_state):
        if next_state == "completed" and os.path.basename(job._file_path).startswith(sys.argv[1] + "."):
            os.kill(os.getpid(), signal.SIGKILL)
        release(job, next_state)
    RunnableLoadJob._release = release_or_die
    sys.exit(main(sys.argv[2:]))
""")


def run_killed_after_a_job_commits(table: str, args: list[str], workdir: Path) -> None:
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_AFTER_A_JOB_COMMITS, table, *args],
        env={**os.environ, "ONA_API_KEY": API_KEY}, capture_output=True, text=True, timeout=120,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    _, pending = local_state(workdir / "dlt-data")
    assert any(p.startswith("load/normalized/") for p in pending), pending


CUT_OFF = "whether they committed cannot be known); discarding the local pipeline folder"


@pytest.mark.parametrize("table", [RESOURCE, "environment_usage_daily"])
def test_a_kill_right_after_a_load_job_commits_doubles_nothing(table, workdir, store, emulator, capsys):
    """dlt would run the job again, into a staging table that already holds its rows.

    The usage merge, declared deduplicated, then inserted both copies. The daily model's package
    is discarded the same way; its refresh after the loads would have mended it in this case.
    """
    store.add(recent_records(300, days=5))
    args = ["sync", "--start-date", pendulum.now("UTC").subtract(days=6).to_date_string(), "--base-url", emulator.url]
    run_killed_after_a_job_commits(table, args, workdir)

    result = cli_here(capsys, *args, env={"ONA_API_KEY": API_KEY})
    assert result.returncode == 0, result.stderr
    assert CUT_OFF in result.stderr
    assert_table_equals(workdir / DB, store.records())
    with duckdb.connect(str(workdir / DB), read_only=True) as conn:
        assert_view_equals(conn.execute(SELECT_DAILY).fetchall(), expected_daily(store.records()))
