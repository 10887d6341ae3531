"""`make bench`: ona-usage against the baseline a dlt user would write, on the local emulator.

For each case the emulator runs in this process, on a background thread, serving a
deterministic organisation (fixed seed, fixed `--end`). Each tool runs as its own child
process with a fresh DuckDB file and a fresh DLT_DATA_DIR; the two tools alternate round by
round. Per run we measure:

* wall time of the child, from spawn to exit;
* peak RSS of the child, from `os.wait4` (Linux reports the largest of the child and the
  descendants it waited for), taken by a small launcher process so that this process's own
  memory (the emulator's data) does not leak into the figure;
* HTTP requests, counted by the emulator (`EmulatorServer.requests`, reset before each run);
* the emulator's own CPU time (this process's CPU while it only waits for the child), hence
  the pages per second it served and the pages per CPU-second it could serve.

After each run the table is checked against the emulator's truth (`UsageStore.records()`):
same row count, no duplicate ids, no id missing, no id extra; plus, for information, how many
`stopped_at` / `created_at` values are more than 1 µs off. Right after each fresh run the same
command runs again: the incremental no-op, timed and checked the same way (for the baseline
too, unless `--no-baseline-noop`).

The history ends at a fixed `--end` (default 2026-11-01), while ona-usage always syncs up to
the real now: the days between cost it one (empty) request each, a handful next to the
thousands of pages of a case. The baseline sends `--end` as its `endTime`.

Results: a table on stdout, `benchmarks/results/latest.json`, a bar chart of rows/s against the
baseline in `benchmarks/results/latest.png`, and time and memory against records in
`benchmarks/results/latest-scale.png` (charts need matplotlib; skipped with a note without it).

    .venv/bin/python benchmarks/run.py                # every case (about an hour)
    .venv/bin/python benchmarks/run.py --cases a,b    # the two headline cases, 3 ona-usage rounds, 1 baseline round
    .venv/bin/python benchmarks/run.py --quick        # case b only, one round of each

Cases `a`, `b` and `c` run the baseline beside ona-usage (3 ona-usage rounds); the scale series
(`s100k`, `s3m`, `s10m`, `s1m50`, with `a`, `b` and `c`), the dense organization (`dense`: three
million records in 120 days) and the long latency (`l100`: 100 ms a request, compared with
what the latency alone costs at 16 requests in flight) run ona-usage once, as do the shapes of
organization (`dense60`, `bigorg`, `densebig`, `huge`: thousands of users and projects, runs
that cross several midnights), whose daily model is checked day by day as well.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from ona_emulator import EmulatorServer, Shape, UsageStore, catalog, organisation_records

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
BASELINE_SCRIPT = BENCH_DIR / "baseline_rest_api.py"
API_KEY = "emulator-key"
TABLE = "ona.environment_usage_records"
DEFAULT_END = "2026-11-01T00:00:00Z"  # fixed, so every run serves the same records
DEFAULT_SEED = 42
WORKERS = 16  # ona-usage's default --workers: windows in flight at most
KINDS = ("full", "no-op", "no-op again", "hourly")  # the runs of one ona-usage round, in order


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    records: int
    days: int
    latency_ms: float
    baseline: bool = True  # whether the baseline runs too (it takes minutes per million records)
    rounds: int | None = None  # ona-usage rounds; None: --rounds
    series: str = ""  # the chart line it belongs to: "0 ms", "50 ms"; "" for none
    shape: Shape = Shape()  # the organization: users, projects, classes, runners, run lengths


# Issue 20's shapes of organization: runs of a minute to three days cross several midnights.
MIDNIGHTS = (1, 4320)


# The headline cases (a, b, c) run the baseline beside ona-usage; the scale series adds sizes the
# baseline would take too long for, a dense organization (the year's records in 120 days), and a
# long latency, where the question is how close the sync stays to what the concurrency allows.
CASES = {
    "a": Case("a", "1M records, 365 d, 0 ms", 1_000_000, 365, 0.0, series="0 ms"),
    "b": Case("b", "100k records, 365 d, 50 ms", 100_000, 365, 50.0, series="50 ms"),
    "c": Case("c", "200k records, 365 d, 0 ms", 200_000, 365, 0.0, series="0 ms"),
    "s100k": Case("s100k", "100k records, 365 d, 0 ms", 100_000, 365, 0.0, baseline=False, rounds=1, series="0 ms"),
    "s3m": Case("s3m", "3M records, 365 d, 0 ms", 3_000_000, 365, 0.0, baseline=False, rounds=1, series="0 ms"),
    "s10m": Case("s10m", "10M records, 365 d, 0 ms", 10_000_000, 365, 0.0, baseline=False, rounds=1, series="0 ms"),
    "s1m50": Case("s1m50", "1M records, 365 d, 50 ms", 1_000_000, 365, 50.0, baseline=False, rounds=1, series="50 ms"),
    "dense": Case("dense", "3M records, 120 d, 0 ms", 3_000_000, 120, 0.0, baseline=False, rounds=1),
    "l100": Case("l100", "1M records, 365 d, 100 ms", 1_000_000, 365, 100.0, baseline=False, rounds=1),
    "dense60": Case("dense60", "1M records, 60 d, 50 users, 20 projects, runs 1 min-3 d", 1_000_000, 60, 0.0,
                    baseline=False, rounds=1, shape=Shape(users=50, projects=20, classes=6, run_minutes=MIDNIGHTS)),
    "bigorg": Case("bigorg", "1M records, 365 d, 5,000 users, 800 projects, runs 1 min-3 d", 1_000_000, 365, 0.0,
                   baseline=False, rounds=1, shape=Shape(users=5_000, projects=800, classes=6, run_minutes=MIDNIGHTS)),
    "densebig": Case("densebig", "3M records, 120 d, 10,000 users, 2,000 projects, runs 1 min-3 d", 3_000_000, 120, 0.0,
                     baseline=False, rounds=1, shape=Shape(users=10_000, projects=2_000, classes=6, run_minutes=MIDNIGHTS)),
    "huge": Case("huge", "10M records, 365 d, 10,000 users, 2,000 projects, runs 1 min-3 d", 10_000_000, 365, 0.0,
                 baseline=False, rounds=1, shape=Shape(users=10_000, projects=2_000, classes=6, run_minutes=MIDNIGHTS)),
}
DEFAULT_CASES = "a,b,c,s100k,s3m,s10m,s1m50,dense,l100,dense60,bigorg,densebig,huge"


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the emulator's truth -------------------------------------------------------------------


def build_truth(store: UsageStore, start: datetime, end: datetime) -> pa.Table:
    """id, stopped_ns, created_ns of every record a full sync must load, a month at a time
    (`UsageStore.records()` on the whole range would hold a million dicts at once)."""
    ids: list[str] = []
    stopped: list[str] = []
    created: list[str | None] = []
    chunk_start = start
    while chunk_start < end:
        chunk_end = min(chunk_start + timedelta(days=31), end)
        for record in store.records(chunk_start, chunk_end):
            ids.append(record["id"])
            stopped.append(record["stoppedAt"])
            created.append(record.get("createdAt"))
        chunk_start = chunk_end
    return _truth_table(ids, stopped, created)


def with_records(truth: pa.Table, records: list[dict[str, Any]]) -> pa.Table:
    """The truth and these records (added to the emulator after it was built)."""
    if not records:
        return truth
    added = _truth_table([r["id"] for r in records], [r["stoppedAt"] for r in records], [r.get("createdAt") for r in records])
    return pa.concat_tables([truth, added])


def hourly_records(store: UsageStore, end: datetime, tag: str, count: int = 100) -> list[dict[str, Any]]:
    """What an hourly run finds: runs that stopped in the last hour, one of them started three
    days ago. Shaped like the organisation's own records (ids, classes, runners, users)."""
    template = next(iter(store.records(end - timedelta(days=1), end)))
    now = datetime.now(timezone.utc)
    records = []
    for i in range(count):
        stopped = now - timedelta(minutes=55) + timedelta(seconds=30 * i)
        started = now - timedelta(days=3) if i == 0 else stopped - timedelta(minutes=20)
        records.append(template | {
            "id": f"hourly-{tag}-{i:04d}",
            "environmentId": f"env-hourly-{tag}-{i:04d}",
            "createdAt": started.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "stoppedAt": stopped.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        })
    return records


def warm_up(server: EmulatorServer, store: UsageStore) -> None:
    """Have the emulator rebuild what new records made it drop (its sorted index, its lists), so
    that an hourly run's time is ona-usage's own: at a million records that is seconds."""
    store.page(0, 0, "", 0, 0)
    for path in catalog.ENDPOINTS:
        body = {"organizationId": store.organization_id} if path.endswith("ListMembers") else {}
        request = urllib.request.Request(
            server.url + path,
            data=json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request) as answer:
            answer.read()


def _truth_table(ids: list[str], stopped: list[str], created: list[str | None]) -> pa.Table:
    ns = pa.timestamp("ns", tz="UTC")
    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "stopped_ns": pc.cast(pc.cast(pa.array(stopped, pa.string()), ns), pa.int64()),
            "created_ns": pc.cast(pc.cast(pa.array(created, pa.string()), ns), pa.int64()),
        }
    )


def check_table(db_path: Path, truth: pa.Table) -> dict[str, Any]:
    """Compare the loaded table with the truth; `ok` covers ids only (count, dups, set)."""
    con = duckdb.connect(str(db_path), read_only=True)
    try:
        con.register("truth", truth)
        rows, distinct = con.execute(f"SELECT count(*), count(DISTINCT id) FROM {TABLE}").fetchone()
        missing = con.execute(
            f"SELECT count(*) FROM truth t ANTI JOIN {TABLE} r ON r.id = t.id"
        ).fetchone()[0]
        extra = con.execute(
            f"SELECT count(*) FROM {TABLE} r ANTI JOIN truth t ON r.id = t.id"
        ).fetchone()[0]
        # Timestamps: the API sends up to 9 fraction digits, DuckDB keeps microseconds,
        # so anything within 1 µs of the truth is right.
        try:
            off = con.execute(
                f"""
            SELECT
              count(*) FILTER (WHERE r.stopped_at IS NULL
                               OR abs(epoch_us(r.stopped_at) * 1000 - t.stopped_ns) >= 1000),
              count(*) FILTER (WHERE (r.created_at IS NULL) <> (t.created_ns IS NULL)
                               OR abs(epoch_us(r.created_at) * 1000 - t.created_ns) >= 1000)
                FROM {TABLE} r JOIN truth t ON r.id = t.id
                """
            ).fetchone()
        except duckdb.Error as error:  # e.g. a tool that stored timestamps as text
            off = (f"not compared: {error}".splitlines()[0],) * 2
        daily_off = _daily_off(con)
    finally:
        con.close()
    expected = truth.num_rows
    return {
        "rows": rows,
        "expected_rows": expected,
        "duplicates": rows - distinct,
        "missing_ids": missing,
        "extra_ids": extra,
        "stopped_at_off": off[0],
        "created_at_off": off[1],
        "daily_days_off": daily_off,
        "ok": rows == expected and distinct == rows and missing == 0 and extra == 0 and daily_off in (0, None),
    }


def _daily_off(con: duckdb.DuckDBPyConnection) -> int | None:
    """Days whose runs or runtime hours in the daily model differ from the truth's, computed here
    another way (a join of each run with a calendar of days, in microseconds); None without a model
    (the baseline has none). A slice that doubled or dropped a day shows here."""
    if not con.execute("SELECT count(*) FROM duckdb_tables() WHERE schema_name = 'ona' AND table_name = 'environment_usage_daily'").fetchone()[0]:
        return None
    return con.execute(
        """
        WITH runs AS (
          SELECT least(coalesce(created_ns, stopped_ns), stopped_ns) // 1000 AS start_us, stopped_ns // 1000 AS stop_us FROM truth
        ), days AS (
          SELECT range AS day_us FROM range(
            (SELECT min(start_us) FROM runs) // 86400000000 * 86400000000,
            (SELECT max(stop_us) FROM runs) + 1, 86400000000)
        ), expected AS (
          SELECT day_us,
                 count(*) FILTER (WHERE stop_us >= day_us AND stop_us < day_us + 86400000000) AS runs,
                 sum(least(stop_us, day_us + 86400000000) - greatest(start_us, day_us)) / 3.6e9 AS hours
          FROM days JOIN runs ON start_us < day_us + 86400000000 AND stop_us >= day_us
          GROUP BY day_us
        ), model AS (
          SELECT epoch_us(usage_date::TIMESTAMP) AS day_us, sum(runs) AS runs, sum(runtime_hours) AS hours
          FROM ona.environment_usage_daily GROUP BY 1
        )
        SELECT count(*) FROM expected e FULL JOIN model m USING (day_us)
        WHERE e.runs IS DISTINCT FROM m.runs OR abs(coalesce(e.hours, -1) - coalesce(m.hours, -2)) > 1e-6 * greatest(1, abs(e.hours))
        """
    ).fetchone()[0]


# -- running one child ----------------------------------------------------------------------


def cpu_seconds(usage: resource.struct_rusage) -> float:
    return usage.ru_utime + usage.ru_stime


# Spawned by this process, which holds the emulator's data (over 1 GB for a million records),
# a child would report that as its own peak RSS: Linux carries the pre-exec address space's
# high-water mark into `ru_maxrss` at exec (fork or vfork alike). So a small Python process,
# started fresh, runs the tool and reports its `os.wait4` figures; the floor this leaves in
# `ru_maxrss` is that launcher's own ~13 MB.
_LAUNCHER = r"""
import json, os, subprocess, sys, time
argv, cwd, log = json.loads(sys.argv[1])
with open(log, "wb") as out:
    started = time.perf_counter()
    child = subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
print(json.dumps({"wall_s": wall, "exit_code": os.waitstatus_to_exitcode(status),
                  "maxrss_kb": usage.ru_maxrss, "cpu_s": usage.ru_utime + usage.ru_stime}))
"""


def run_child(
    argv: list[str], env: dict[str, str], cwd: Path, log_path: Path, server: EmulatorServer, timeout: float
) -> dict[str, Any]:
    """Run one tool to completion; wall time, peak RSS, CPU, and what the emulator saw."""
    code = code_version()["pipelines_sha256"]  # the package is being worked on: say which one ran
    server.reset_requests()
    before = resource.getrusage(resource.RUSAGE_SELF)
    launcher = subprocess.Popen(
        [sys.executable, "-c", _LAUNCHER, json.dumps([argv, str(cwd), str(log_path)])],
        env=env,
        stdout=subprocess.PIPE,
        start_new_session=True,  # a timeout kills the launcher and the tool together
    )
    killer = threading.Timer(timeout, lambda: os.killpg(launcher.pid, signal.SIGKILL))
    killer.start()
    try:
        report, _ = launcher.communicate()
    finally:
        killer.cancel()
    after = resource.getrusage(resource.RUSAGE_SELF)
    try:
        measured = json.loads(report)
    except ValueError:
        measured = {"wall_s": float("nan"), "exit_code": launcher.returncode or -1, "maxrss_kb": 0, "cpu_s": 0.0}
    wall = measured["wall_s"]
    requests = server.requests
    statuses: dict[str, int] = {}
    for request in requests:
        statuses[str(request.get("status"))] = statuses.get(str(request.get("status")), 0) + 1
    emulator_cpu = cpu_seconds(after) - cpu_seconds(before)
    output = log_path.read_text(errors="replace") if log_path.exists() else ""
    reported = re.search(r"in ([\d,]+) requests", output)
    return {
        "code": code,
        # Other work on the machine skews wall times; the 1-minute load average after the run,
        # next to the cpu count, says how busy it was (the benchmark alone keeps it near 1-2).
        "load_average_1m": os.getloadavg()[0],
        "exit_code": measured["exit_code"],
        "wall_s": wall,
        "peak_rss_mb": measured["maxrss_kb"] / 1024,  # Linux: kilobytes
        "child_cpu_s": measured["cpu_s"],
        "requests": len(requests),
        "request_statuses": statuses,
        "requests_reported_by_tool": int(reported.group(1).replace(",", "")) if reported else None,
        "seconds_reported_by_tool": float(took.group(1)) if (took := re.search(r"(?:Took|rows in) ([\d.]+) s", output)) else None,
        "emulator_cpu_s": emulator_cpu,
        "emulator_pages_per_s": len(requests) / wall if wall else None,
        "emulator_pages_per_cpu_s": len(requests) / emulator_cpu if emulator_cpu > 0 else None,
        "output_tail": output[-2000:] if measured["exit_code"] else output[-600:],
    }


def child_env(db_path: Path, data_dir: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SOURCES__", "DESTINATION__", "NORMALIZE__", "LOAD__", "EXTRACT__", "DATA_WRITER__"))
        and k not in ("ONA_API_KEY", "GITPOD_API_KEY", "DLT_DATA_DIR", "DLT_PROJECT_DIR")
    }
    env.update(
        {
            "ONA_API_KEY": API_KEY,
            "DESTINATION__DUCKDB__CREDENTIALS": str(db_path),
            "DLT_DATA_DIR": str(data_dir),
            # No anonymous usage pings from either tool: no network in the measurement.
            "RUNTIME__DLTHUB_TELEMETRY": "false",
        }
    )
    return env


def ona_usage_executable() -> str:
    candidate = Path(sys.executable).with_name("ona-usage")
    if candidate.exists():
        return str(candidate)
    found = shutil.which("ona-usage")
    if not found:
        sys.exit("bench: cannot find the ona-usage command; run `make install` first")
    return found


# -- one case -------------------------------------------------------------------------------


def run_case(case: Case, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    end = datetime.fromisoformat(args.end.replace("Z", "+00:00")).astimezone(timezone.utc)
    start = end - timedelta(days=case.days)
    start_date = start.date().isoformat()

    log(f"case {case.key} ({case.label}): generating the organisation")
    t0 = time.perf_counter()
    store = UsageStore(organisation_records(args.seed, start, end, case.records, case.shape))
    store.page(0, 0, "", 0, 0)  # build the sorted index before any request
    generated_s = time.perf_counter() - t0
    truth = build_truth(store, start, end)
    log(f"case {case.key}: {truth.num_rows:,} records in {generated_s:.1f} s; truth built")
    if pc.count_distinct(truth.column("id")).as_py() != truth.num_rows:
        raise SystemExit("bench: the emulator's truth has duplicate ids")

    server = EmulatorServer(store, api_key=API_KEY, latency=case.latency_ms / 1000).start()
    added: list[dict[str, Any]] = []  # the hourly runs' records, after --end: ona-usage's truth only
    runs: list[dict[str, Any]] = []
    ona = ona_usage_executable()
    ona_rounds = case.rounds if case.rounds is not None and not args.quick else args.rounds
    baseline_rounds = args.baseline_rounds if case.baseline and not args.skip_baseline else 0
    try:
        for round_no in range(max(ona_rounds, baseline_rounds)):
            if round_no < ona_rounds:
                runs += run_ona_usage(case, args, scratch, server, ona, start_date, truth, round_no, store, end, added)
            if round_no < baseline_rounds:
                runs += run_baseline(case, args, scratch, server, start_date, end, truth, round_no)
    finally:
        server.stop()
    result = {
        "case": case.key,
        "label": case.label,
        "records": truth.num_rows,
        "records_asked": case.records,
        "days": case.days,
        "latency_ms": case.latency_ms,
        "start_date": start_date,
        "end": args.end,
        "seed": args.seed,
        "generate_s": generated_s,
        "series": case.series,
        "runs": runs,
        "summary": summarise(runs, truth.num_rows, case.latency_ms),
    }
    del store, truth, server
    gc.collect()
    return result


def fresh_dirs(scratch: Path, name: str) -> tuple[Path, Path, Path]:
    run_dir = scratch / name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    (run_dir / "dlt").mkdir(parents=True)
    # Not `ona_usage.duckdb`: a catalog named like the dataset makes names ambiguous.
    return run_dir, run_dir / "bench.duckdb", run_dir / "dlt"


def finish_run(
    run: dict[str, Any], tool: str, kind: str, case: Case, round_no: int, db_path: Path, truth: pa.Table
) -> dict[str, Any]:
    run.update({"tool": tool, "kind": kind, "case": case.key, "round": round_no + 1})
    if run["exit_code"] == 0:
        run["check"] = check_table(db_path, truth)
    else:
        run["check"] = {"ok": False, "error": f"exit code {run['exit_code']}"}
    check = run["check"]
    log(
        f"case {case.key} {tool} {kind} #{round_no + 1}: {run['wall_s']:.1f} s, "
        f"{run['peak_rss_mb']:.0f} MB, {run['requests']:,} requests, code {run['code']}, "
        f"load {run['load_average_1m']:.1f}, check "
        + ("passed" if check["ok"] else f"FAILED {check}")
    )
    if run["exit_code"]:
        log(f"output:\n{run['output_tail']}")
    return run


def run_ona_usage(
    case: Case,
    args: argparse.Namespace,
    scratch: Path,
    server: EmulatorServer,
    ona: str,
    start_date: str,
    truth: pa.Table,
    round_no: int,
    store: UsageStore,
    end: datetime,
    added: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    run_dir, db_path, data_dir = fresh_dirs(scratch, f"{case.key}-ona-usage-{round_no}")
    argv = [ona, "sync", "--base-url", server.url, "--start-date", start_date, *shlex.split(args.ona_usage_args)]
    env = child_env(db_path, data_dir)
    out = []
    # The first no-op after a large first sync pays DuckDB's first checkpoint of the file in a
    # new process (about 0.35 s at a million rows, whatever it writes); the second is the
    # hourly schedule's steady state when nothing happened; "hourly" finds 100 new runs.
    for kind in KINDS:
        if kind == "hourly":
            new = hourly_records(store, end, f"{case.key}-{round_no}")
            store.add(new)
            added += new
            warm_up(server, store)
        run = run_child(argv, env, run_dir, run_dir / f"{kind}.log", server, args.timeout)
        out.append(finish_run(run, "ona-usage", kind, case, round_no, db_path, with_records(truth, added)))
        if run["exit_code"]:
            break
    if not args.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return out


def run_baseline(
    case: Case,
    args: argparse.Namespace,
    scratch: Path,
    server: EmulatorServer,
    start_date: str,
    end: datetime,
    truth: pa.Table,
    round_no: int,
) -> list[dict[str, Any]]:
    run_dir, db_path, data_dir = fresh_dirs(scratch, f"{case.key}-baseline-{round_no}")
    argv = [
        sys.executable,
        str(BASELINE_SCRIPT),
        "--base-url",
        server.url,
        "--start-date",
        start_date,
        "--end-date",
        end.strftime("%Y-%m-%dT%H:%M:%SZ"),
    ]
    env = child_env(db_path, data_dir)
    out = []
    kinds = ("full", "no-op") if args.baseline_noop else ("full",)
    for kind in kinds:
        run = run_child(argv, env, run_dir, run_dir / f"{kind}.log", server, args.timeout)
        out.append(finish_run(run, "baseline", kind, case, round_no, db_path, truth))
        if run["exit_code"]:
            break
    if not args.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return out


# -- summary --------------------------------------------------------------------------------


def summarise(runs: list[dict[str, Any]], rows: int, latency_ms: float = 0.0) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for tool in ("ona-usage", "baseline"):
        for kind in KINDS:
            chosen = [r for r in runs if r["tool"] == tool and r["kind"] == kind and r["exit_code"] == 0]
            if not chosen:
                continue
            wall = statistics.median(r["wall_s"] for r in chosen)
            summary[f"{tool}/{kind}"] = {
                "runs": len(chosen),
                "wall_s_median": wall,
                "wall_s_all": [round(r["wall_s"], 3) for r in chosen],
                "peak_rss_mb_max": max(r["peak_rss_mb"] for r in chosen),
                "peak_rss_mb_median": statistics.median(r["peak_rss_mb"] for r in chosen),
                "child_cpu_s_median": statistics.median(r["child_cpu_s"] for r in chosen),
                "rows_per_s": rows / wall if kind == "full" and wall else None,
                "requests_median": statistics.median(r["requests"] for r in chosen),
                "emulator_cpu_s_median": statistics.median(r["emulator_cpu_s"] for r in chosen),
                "emulator_pages_per_s_median": statistics.median(r["emulator_pages_per_s"] for r in chosen),
                "emulator_pages_per_cpu_s_median": statistics.median(
                    r["emulator_pages_per_cpu_s"] for r in chosen if r["emulator_pages_per_cpu_s"]
                )
                if any(r["emulator_pages_per_cpu_s"] for r in chosen)
                else None,
                "checks_passed": all(r["check"]["ok"] for r in chosen),
                "code_versions": sorted({r["code"] for r in chosen}),
                "load_average_1m_max": max(r["load_average_1m"] for r in chosen),
            }
    ona, base = summary.get("ona-usage/full"), summary.get("baseline/full")
    if ona and latency_ms:
        # What the latency alone costs at the concurrency ona-usage uses (its --workers, 16 by
        # default): every request waits `latency_ms`, 16 at a time. No sync can beat it.
        floor = ona["requests_median"] * latency_ms / 1000 / WORKERS
        summary["latency_floor"] = {"seconds": floor, "workers": WORKERS, "over_floor": ona["wall_s_median"] / floor - 1}
    if ona and base:
        summary["ratio_ona_over_baseline"] = {
            "wall": ona["wall_s_median"] / base["wall_s_median"],
            "peak_rss": ona["peak_rss_mb_max"] / base["peak_rss_mb_max"],
            "rows_per_s": ona["rows_per_s"] / base["rows_per_s"],
        }
    failed = [r for r in runs if not r["check"]["ok"]]
    summary["all_checks_passed"] = not failed
    return summary


def print_table(cases: list[dict[str, Any]]) -> None:
    header = ["case", "tool", "run", "n", "wall s (median)", "peak RSS MB", "rows/s", "requests", "emu pages/s", "check", "ratio ona/base"]
    lines = [header]
    for case in cases:
        s = case["summary"]
        ratio = s.get("ratio_ona_over_baseline")
        for key, stats in s.items():
            if "/" not in key:
                continue
            tool, kind = key.split("/")
            ratio_text = ""
            if ratio and key == "ona-usage/full":
                ratio_text = f"wall {ratio['wall']:.3f}, RSS {ratio['peak_rss']:.2f}, speed-up {1 / ratio['wall']:.1f}x"
            lines.append(
                [
                    f"{case['case']}: {case['label']}",
                    tool,
                    kind,
                    str(stats["runs"]),
                    f"{stats['wall_s_median']:.2f}",
                    f"{stats['peak_rss_mb_max']:.0f}",
                    f"{stats['rows_per_s']:,.0f}" if stats["rows_per_s"] else "-",
                    f"{stats['requests_median']:,.0f}",
                    f"{stats['emulator_pages_per_s_median']:,.0f}",
                    "pass" if stats["checks_passed"] else "FAIL",
                    ratio_text,
                ]
            )
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    print()
    for n, row in enumerate(lines):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))
    print()
    for case in cases:
        floor = case["summary"].get("latency_floor")
        if floor:
            print(
                f"case {case['case']}: the latency alone ({case['latency_ms']:.0f} ms a request, {floor['workers']} at once) "
                f"takes {floor['seconds']:.1f} s; ona-usage took {floor['over_floor']:+.0%} over that"
            )
    for case in cases:
        for key, stats in case["summary"].items():
            if "/" in key and stats.get("emulator_pages_per_cpu_s_median"):
                print(
                    f"emulator, case {case['case']}, during {key}: {stats['emulator_pages_per_s_median']:,.0f} pages/s served, "
                    f"{stats['emulator_cpu_s_median']:.2f} CPU s, {stats['emulator_pages_per_cpu_s_median']:,.0f} pages per CPU-second"
                )


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot(cases: list[dict[str, Any]], path: Path) -> str | None:
    """Rows/s of both tools, side by side, for the cases the baseline ran."""
    plt = _pyplot()
    if plt is None:
        return "matplotlib is not installed: no PNG (pip install matplotlib)"
    cases = [c for c in cases if "baseline/full" in c["summary"] and "ona-usage/full" in c["summary"]]
    if not cases:
        return "no case ran both tools: no comparison chart"
    fig, axes = plt.subplots(1, len(cases), figsize=(max(7.0, 5.0 * len(cases)), 4.8), squeeze=False)
    colours = {"ona-usage": "#2a7ab9", "baseline": "#b0b0b0"}
    for ax, case in zip(axes[0], cases):
        tools = ["ona-usage", "baseline"]
        values = [case["summary"][f"{t}/full"]["rows_per_s"] for t in tools]
        bars = ax.bar(tools, values, color=[colours[t] for t in tools])
        for bar, value, tool in zip(bars, values, tools):
            wall = case["summary"][f"{tool}/full"]["wall_s_median"]
            ax.annotate(f"{value:,.0f} rows/s\n({wall:.1f} s)", (bar.get_x() + bar.get_width() / 2, value),
                        ha="center", va="bottom", fontsize=9)
        ratio = case["summary"]["ratio_ona_over_baseline"]["wall"]
        ax.set_title(f"case {case['case']}: {case['label']}\n{case['records']:,} rows, {1 / ratio:.1f}x", fontsize=10)
        ax.set_ylabel("rows/s (higher is better)")
        ax.set_ylim(0, max(values) * 1.25)
        ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle("Ona usage records into DuckDB\nona-usage vs dlt rest_api source (median wall time)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def plot_scale(cases: list[dict[str, Any]], path: Path) -> str | None:
    """Wall time and peak memory against records, per latency series, the baseline beside."""
    plt = _pyplot()
    if plt is None:
        return "matplotlib is not installed: no PNG (pip install matplotlib)"
    fig, (time_ax, memory_ax) = plt.subplots(1, 2, figsize=(12, 4.8))
    styles = {"0 ms": ("#2a7ab9", "o"), "50 ms": ("#e08a1e", "s")}
    plotted = False
    for series, (colour, marker) in styles.items():
        for tool, face in (("ona-usage", colour), ("baseline", "white")):
            points = sorted(
                (c["records"], c["summary"][f"{tool}/full"])
                for c in cases
                if c.get("series") == series and f"{tool}/full" in c["summary"]
            )
            if not points:
                continue
            plotted = True
            records = [n for n, _ in points]
            label = f"{tool}, {series}"
            style = {"color": colour, "marker": marker, "markerfacecolor": face, "linestyle": "-" if tool == "ona-usage" else ":"}
            time_ax.plot(records, [p["wall_s_median"] for _, p in points], label=label, **style)
            memory_ax.plot(records, [p["peak_rss_mb_max"] for _, p in points], label=label, **style)
            for n, p in points:
                time_ax.annotate(f"{p['wall_s_median']:.1f} s", (n, p["wall_s_median"]), textcoords="offset points",
                                 xytext=(4, -10 if tool == "ona-usage" else 4), fontsize=7)
    for case in cases:
        if case["case"] == "dense" and "ona-usage/full" in case["summary"]:
            point = case["summary"]["ona-usage/full"]
            time_ax.plot([case["records"]], [point["wall_s_median"]], "D", color="#6a3d9a", label=case["label"])
            memory_ax.plot([case["records"]], [point["peak_rss_mb_max"]], "D", color="#6a3d9a", label=case["label"])
    if not plotted:
        plt.close(fig)
        return "no scale series ran: no scale chart"
    memory_ax.axhline(500, color="#999999", linestyle="--", linewidth=0.8)
    memory_ax.annotate("500 MB", (memory_ax.get_xlim()[0], 500), textcoords="offset points", xytext=(4, 3), fontsize=7, color="#666666")
    for ax, ylabel in ((time_ax, "wall time, s (log)"), (memory_ax, "peak RSS, MB")):
        ax.set_xscale("log")
        ax.set_xlabel("records in the sync (log)")
        ax.set_ylabel(ylabel)
        ax.spines[["top", "right"]].set_visible(False)
        ax.grid(True, which="major", linewidth=0.3)
    time_ax.set_yscale("log")
    memory_ax.set_ylim(bottom=0)
    time_ax.legend(fontsize=8)
    memory_ax.legend(fontsize=8)
    fig.suptitle("ona-usage: a year's first sync into DuckDB, by size (the emulator on 127.0.0.1)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def code_version() -> dict[str, Any]:
    """Which ona-usage was measured: the commit, whether the package differs from it, and a
    hash of the package's source (to notice it changing while the benchmark ran)."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted((ROOT / "pipelines" / "ona_usage").rglob("*.py")):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    dirty = git("status", "--porcelain", "--", "pipelines/ona_usage")
    return {
        "commit": git("rev-parse", "HEAD"),
        "pipelines_modified": None if dirty is None else bool(dirty),
        "pipelines_sha256": digest.hexdigest()[:16],
    }


def environment() -> dict[str, Any]:
    import importlib.util

    import dlt

    # pyarrow imports numpy when it is installed (matplotlib brings it): about 60 ms and 15 MB
    # more in every child, both tools alike.
    has_numpy = importlib.util.find_spec("numpy") is not None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "dlt": dlt.__version__,
        "duckdb": duckdb.__version__,
        "pyarrow": pa.__version__,
        "numpy_installed": has_numpy,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark ona-usage against dlt's rest_api source on the emulator.")
    parser.add_argument("--rounds", type=int, default=3, help="fresh ona-usage runs per case (default %(default)s)")
    parser.add_argument("--baseline-rounds", type=int, default=1, help="baseline runs per case (default %(default)s; minutes each)")
    parser.add_argument("--quick", action="store_true", help="case b only, one round of each tool")
    parser.add_argument("--cases", default=DEFAULT_CASES, help=f"cases to run, of {','.join(CASES)} (default %(default)s)")
    parser.add_argument("--skip-baseline", action="store_true", help="run ona-usage only")
    parser.add_argument("--baseline-noop", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the baseline's incremental re-run (default: yes)")
    parser.add_argument("--ona-usage-args", default="", metavar="ARGS",
                        help='extra flags for `ona-usage sync`, e.g. "--chunk 400d --workers 8"')
    parser.add_argument("--end", default=DEFAULT_END, help="end of the emulator's history (default %(default)s)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--timeout", type=float, default=1800, help="kill a run after this many seconds")
    parser.add_argument("--keep", action="store_true", help="keep the DuckDB files and logs of each run")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "latest.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.cases, args.rounds, args.baseline_rounds = "b", 1, 1
    keys = [k.strip() for k in args.cases.split(",") if k.strip()]
    unknown = [k for k in keys if k not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {sorted(CASES)}")

    version_before = code_version()
    scratch = Path(tempfile.mkdtemp(prefix="ona-bench-"))
    log(f"scratch directory {scratch}")
    started = time.time()
    try:
        cases = [run_case(CASES[k], args, scratch) for k in keys]
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)

    print_table(cases)
    version_after = code_version()
    if version_after != version_before:
        print("bench: WARNING: pipelines/ona_usage changed while the benchmark ran; figures mix versions (see each run's `code`)")
    result = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": environment(),
        "code": version_before,
        "code_changed_during_run": version_after != version_before,
        "elapsed_s": time.time() - started,
        "cases": cases,
        "all_checks_passed": all(c["summary"]["all_checks_passed"] for c in cases),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    png, scale_png = args.output.with_suffix(".png"), args.output.with_name(args.output.stem + "-scale.png")
    for chart, problem in ((png, plot(cases, png)), (scale_png, plot_scale(cases, scale_png))):
        print(f"wrote {chart}" if problem is None else f"no {chart.name}: {problem}")
    print(f"wrote {args.output}")
    if not result["all_checks_passed"]:
        print("bench: some correctness checks FAILED (see the json)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
