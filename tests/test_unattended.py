"""A scheduled sync that never needs a human: stragglers, kills, disk, readers, errors, redirects.

Against the emulator on 127.0.0.1 and real DuckDB files. The command line runs in-process where
the process itself is not the point, and as a subprocess where it is (signals, locks, pipes).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import httpx
import pendulum
import pytest

from ona_emulator import EmulatorServer, UsageStore
from ona_usage import pipeline as pipeline_module
from ona_usage import settings
from ona_usage.client import OnaApiError, UsageClient, _may_follow
from ona_usage.pipeline import make_pipeline, read_state, run_backfill, run_sync
from ona_usage.windows import Window, format_rfc3339, tile

from conftest import (API_KEY, assert_table_equals, cli_here, make_records, recent_records, request_ranges, run_cli,
                      run_clis_together, run_here)
from test_crashes import committed_state, resource_state

DB = "ona_usage.duckdb"
EXE = str(Path(sys.executable).with_name("ona-usage"))


def config(emulator: EmulatorServer, **options) -> settings.Settings:
    resolved = settings.resolve({"base_url": emulator.url, "backoff": 0.01, **options})
    resolved.api_key = API_KEY
    return resolved


def days_ago(days: int) -> str:
    return pendulum.now("UTC").subtract(days=days).to_date_string()


# -- stragglers ----------------------------------------------------------------------------------


def test_hanging_requests_are_hedged_and_the_table_is_exact(workdir, store, emulator):
    store.add(recent_records(5_000, days=12))
    # one request in 25 hangs for 40 s, longer than anything here waits; the access check does not
    emulator.set_faults(seed=3, start_after=2, hang_rate=0.04, hang_seconds=40)

    started = time.monotonic()
    result = run_sync(config(emulator, start_date=days_ago(13), page_size=20))
    elapsed = time.monotonic() - started

    assert_table_equals(workdir / DB, store.records())
    assert result.hedged >= 5  # about one request in 25 of some 300 got a twin
    assert result.retries == 0  # none waited for its timeout
    assert elapsed < 40  # it did not wait for a single hang to end


def test_a_slow_api_everywhere_is_not_hedged(workdir, store, emulator):
    store.add(recent_records(300, days=3))
    emulator.set_faults(latency=0.05)  # slow, but every request alike
    result = run_sync(config(emulator, start_date=days_ago(4), page_size=20))
    assert_table_equals(workdir / DB, store.records())
    assert result.hedged == 0


# -- bounded loss --------------------------------------------------------------------------------


def test_a_killed_backfill_resumes_after_its_last_time_bounded_chunk(workdir, store, emulator):
    store.add(recent_records(2_000, days=20))
    emulator.set_faults(latency=0.03)
    start, end = pendulum.now("UTC").start_of("day").subtract(days=20), pendulum.now("UTC").start_of("day")
    # 60-day chunks would hold the whole backfill; the 1 s time bound commits every second instead
    args = [EXE, "backfill", "--base-url", emulator.url, "--start", start.to_date_string(), "--end", end.to_date_string(),
            "--page-size", "10", "--workers", "1", "--chunk-seconds", "1"]
    env = {**os.environ, "ONA_API_KEY": API_KEY}
    process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 60
    committed, throughs = {}, set()
    while time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
        if (workdir / DB).exists():
            try:
                with duckdb.connect(str(workdir / DB), read_only=True):
                    pass
            except duckdb.IOException:
                pass  # being written
        try:
            progress = read_state(make_pipeline(settings.resolve({}))).backfills if (workdir / "dlt-data").exists() else {}
        except OSError:
            continue  # the run is replacing the pipeline's local files right now
        committed = next(iter(progress.values()), {}) if progress else {}
        throughs.add(committed.get("through"))
        # the local state holds a chunk once it is extracted: a second one means the first loaded
        if len(throughs - {None}) >= 2 and pendulum.instance(committed["through"]) >= start.add(days=3):
            break
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    # what the destination holds (a kill during a load leaves that chunk to be fetched again)
    stored, _ = committed_state(workdir / DB)
    committed = next(iter(resource_state(stored).get("backfills", {}).values()), {})
    assert committed and not committed["done"], "no chunk was committed before the kill"
    through = pendulum.instance(committed["through"])
    emulator.reset_requests()
    emulator.set_faults()

    result = run_backfill(config(emulator, page_size=10), (start, end))

    assert all(pendulum.parse(begin) >= through for begin, _ in request_ranges(emulator))  # nothing committed refetched
    assert result.chunks >= 1
    assert_table_equals(workdir / DB, store.records(start=start, end=end))


# -- bounded disk --------------------------------------------------------------------------------


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_the_pipeline_folder_does_not_grow_with_scheduled_runs(workdir, store, emulator):
    store.add(recent_records(600, days=3))
    folder = workdir / "dlt-data" / "pipelines" / "ona_usage"
    run_sync(config(emulator, start_date=days_ago(4)))
    store.add(make_records(pendulum.now("UTC").subtract(minutes=40), 20, "run-first"))
    run_sync(config(emulator))  # a scheduled run with something new: a usage load and a load per model
    after_two = folder_size(folder)
    loaded_after_two = sorted(p.name for p in (folder / "load" / "loaded").iterdir())
    for n in range(12):
        store.add(make_records(pendulum.now("UTC").subtract(minutes=30), 20, f"run-{n}"))
        run_sync(config(emulator))

    loaded = list((folder / "load" / "loaded").iterdir())
    assert len(loaded) == len(loaded_after_two) == 3  # the last command's usage load and its two models' loads
    assert folder_size(folder) < after_two * 1.25
    assert not list(folder.rglob("*.parquet"))  # no copies of usage data outside the warehouse
    assert_table_equals(workdir / DB, store.records())


# -- readers -------------------------------------------------------------------------------------


def test_status_report_and_verify_work_beside_a_read_only_reader(workdir, store, emulator, capsys, monkeypatch):
    monkeypatch.setenv("ONA_API_KEY", API_KEY)
    store.add(recent_records(300, days=3))
    run_sync(config(emulator, start_date=days_ago(4)))
    before = (workdir / DB).stat().st_mtime_ns

    with duckdb.connect(str(workdir / DB), read_only=True) as notebook:  # an analyst's notebook holds the file
        assert run_cli("status", "--json").returncode == 0  # another process
        code, out, err = run_here(capsys, "report", "--out", str(workdir / "r.html"))
        assert code == 0, err
        day = pendulum.now("UTC").start_of("day")
        code, out, err = run_here(capsys, "verify", "--base-url", emulator.url, "--start", day.subtract(days=4).to_date_string(),
                             "--end", day.add(days=1).to_date_string())
        assert code == 0, out + err
        assert notebook.execute("SELECT count(*) FROM ona.environment_usage_records").fetchone() == (300,)
    assert (workdir / DB).stat().st_mtime_ns == before  # the readers wrote nothing


def test_status_answers_while_a_sync_writes_and_report_says_it_is_busy(workdir, store, emulator, capsys):
    store.add(recent_records(300, days=6))
    env = {"ONA_API_KEY": API_KEY}
    assert cli_here(capsys, "sync", "--base-url", emulator.url, "--start", days_ago(3), env=env).returncode == 0
    store.add(recent_records(2_000, days=6, seed=9))
    emulator.set_faults(latency=0.05)
    args = [EXE, "backfill", "--base-url", emulator.url, "--start", days_ago(7), "--end", days_ago(0),
            "--page-size", "10", "--workers", "1"]
    writer = subprocess.Popen(args, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and writer.poll() is None:  # until the backfill holds the file
            try:
                duckdb.connect(str(workdir / DB), read_only=True).close()
            except duckdb.IOException:
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"the backfill never held the DuckDB file: {writer.poll()=} {writer.stderr.read() if writer.poll() is not None else ''}")

        status, report = run_clis_together(["status", "--json"], ["report"], env=env)  # two other processes, side by side
    finally:
        if writer.poll() is None:
            os.killpg(writer.pid, signal.SIGKILL)
        writer.wait()

    assert status.returncode == 0, status.stderr
    answer = json.loads(status.stdout)
    assert answer["warehouse"] == "busy" and answer["table_stats"] is None
    assert answer["cursor"] is not None  # from this machine's state
    assert report.returncode == 1
    assert report.stderr.count("\n") == 1 and "is being written by another process" in report.stderr


# -- one clear line for every failure ------------------------------------------------------------


def test_ctrl_c_exits_130_and_says_what_was_committed(workdir, store, emulator):
    # About 20 s of paging after the first chunk: a busy machine reading the log late cannot see the run end first.
    store.add(recent_records(4_000, days=20))
    emulator.set_faults(latency=0.05)
    args = [EXE, "sync", "--base-url", emulator.url, "--start", days_ago(20), "--page-size", "10", "--workers", "1", "--chunk", "2d"]
    process = subprocess.Popen(args, env={**os.environ, "ONA_API_KEY": API_KEY}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    logged = []
    for line in process.stderr:  # without a terminal, each committed chunk is logged
        logged.append(line)
        if "committed chunk 1 " in line:
            break
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    err = "".join(logged) + err

    assert process.returncode == 130, err
    through = read_state(make_pipeline(settings.resolve({}))).fetched_through
    lines = [line for line in err.splitlines() if "ona-usage:" in line]
    assert lines == [lines[-1]] and lines[-1].startswith("ona-usage: interrupted; "), err
    assert f"through {format_rfc3339(through)}; run the same command again to go on from there" in lines[-1], err


def test_a_closed_pipe_exits_quietly(workdir, emulator):
    args = [EXE, "sync", "--dry-run", "--base-url", emulator.url, "--start", days_ago(300)]
    producer = subprocess.Popen(args, env={**os.environ, "ONA_API_KEY": API_KEY}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = producer.stdout.readline()
    producer.stdout.close()  # like `| head -1`
    err = producer.stderr.read()
    assert producer.wait(timeout=60) == 0
    assert first.startswith(b"A sync now would fetch") and err == b""


@pytest.mark.parametrize(
    "args,env,line",
    [
        (["--destination", "postgres"], {}, "the postgres destination is missing credentials: set DESTINATION__POSTGRES__CREDENTIALS, "
                                             "or credentials under [destination.postgres] in .dlt/secrets.toml"),
        (["--duckdb-file", "no/such/folder/usage.duckdb"], {}, "the folder {cwd}/no/such/folder for the DuckDB file does not exist; "
                                                               "create it, or point --duckdb-file elsewhere"),
        (["--start", "2999-01-01"], {}, "start date 2999-01-01T00:00:00Z is in the future; there is no usage to load from there yet"),
        (["--window", "7h"], {}, "window '7h' must divide a day evenly: 1h, 2h, 3h, 4h, 6h, 8h, 12h or 1d"),
    ],
)
def test_bad_settings_exit_2_with_one_line_before_any_request(args, env, line, workdir, emulator, capsys, monkeypatch):
    monkeypatch.setenv("ONA_API_KEY", API_KEY)
    code, out, err = run_here(capsys, "sync", "--base-url", emulator.url, *args)
    assert code == 2
    assert err == f"ona-usage: error: {line.format(cwd=workdir)}\n"
    assert emulator.requests == [] and not (workdir / DB).exists()


def test_a_refused_connection_fails_within_seconds_in_one_line(workdir, capsys, monkeypatch):
    monkeypatch.setenv("ONA_API_KEY", API_KEY)
    with EmulatorServer(UsageStore()) as gone:
        url = gone.url  # a port nothing listens on once it stops
    started = time.monotonic()
    code, out, err = run_here(capsys, "sync", "--base-url", url)
    assert time.monotonic() - started < 10
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("ona-usage: error: could not connect to 127.0.0.1: ")
    assert "gave up after" in err and not (workdir / DB).exists()


def test_summaries_tell_new_rows_from_rows_read_again(workdir, store, emulator, capsys, monkeypatch):
    monkeypatch.setenv("ONA_API_KEY", API_KEY)
    store.add(recent_records(200, days=2))
    code, out, _ = run_here(capsys, "sync", "--base-url", emulator.url, "--start", days_ago(3))
    assert "Loaded 200 new rows into duckdb dataset 'ona', table environment_usage_records; 0 read again" in out
    again = store.records(start=pendulum.instance(read_state(make_pipeline(settings.resolve({}))).fetched_at).subtract(hours=2))
    store.add(recent_records(3, days=0.01, seed=5))  # three new ones in the last minutes

    code, out, _ = run_here(capsys, "sync", "--base-url", emulator.url)

    assert code == 0
    assert f"Loaded 3 new rows into duckdb dataset 'ona', table environment_usage_records; {len(again)} read again" in out


def test_a_finished_backfill_asks_for_force_and_last_load_is_its_own(workdir, store, emulator, capsys, monkeypatch):
    monkeypatch.setenv("ONA_API_KEY", API_KEY)
    store.add(recent_records(300, days=6))
    assert run_here(capsys, "sync", "--base-url", emulator.url, "--start", days_ago(2))[0] == 0
    backfill = ["backfill", "--base-url", emulator.url, "--start", days_ago(6), "--end", days_ago(3)]
    started = time.monotonic()
    code, out, err = run_here(capsys, *backfill)
    took = time.monotonic() - started
    assert code == 0, err
    # on a machine that did not run it (no local trace): the duration comes from the state
    import shutil

    shutil.rmtree(workdir / "dlt-data")
    code, out, err = run_here(capsys, "status", "--json")
    assert code == 0, err
    assert 0 <= json.loads(out)["last_load"]["seconds"] <= took  # the backfill's own, not since the sync

    emulator.reset_requests()
    code, out, err = run_here(capsys, *backfill)
    assert code == 0, err
    assert out.startswith(f"Backfill [{days_ago(6)}, {days_ago(3)}) was done before; nothing was fetched. Add --force to fetch it again.")
    assert request_ranges(emulator) == []

    code, out, err = run_here(capsys, *backfill, "--force")
    assert code == 0 and len(request_ranges(emulator)) == 3


def test_start_and_end_are_the_same_flags_everywhere_and_no_flag_does_nothing(capsys):
    for command in ("backfill", "verify"):
        help_text = cli_here(capsys, command, "--help").stdout
        assert "--start" in help_text and "--end" in help_text and "--lookback" not in help_text
    assert "--window" not in cli_here(capsys, "verify", "--help").stdout
    sync_help = cli_here(capsys, "sync", "--help").stdout
    assert "--start DATE, --start-date DATE" in sync_help and "--lookback" in sync_help


# -- the API's new home --------------------------------------------------------------------------


def test_a_permanent_redirect_on_the_same_host_is_followed_with_a_warning(workdir, store, capsys, monkeypatch):
    monkeypatch.setenv("ONA_API_KEY", API_KEY)
    store.add(recent_records(300, days=2))
    with EmulatorServer(store, api_key=API_KEY, redirects={"/old/": "/api/"}) as server:
        old = server.url.replace("/api", "/old")
        code, out, err = run_here(capsys, "sync", "--base-url", old, "--start", days_ago(3))
        moved = [r for r in server.requests if r["status"] == 308]
    assert code == 0, err
    assert_table_equals(workdir / DB, store.records())
    assert err.count("following it") == 1 and "the API redirected (HTTP 308)" in err
    assert moved and all(r["path"].startswith("/old/") for r in moved)


def test_a_redirect_elsewhere_is_refused_and_the_key_never_goes_there(workdir, store, capsys, monkeypatch):
    monkeypatch.setenv("ONA_API_KEY", API_KEY)
    with EmulatorServer(store, api_key=API_KEY) as elsewhere, \
            EmulatorServer(store, api_key=API_KEY, redirects={"/api/": elsewhere.url + "/"}) as server:
        code, out, err = run_here(capsys, "sync", "--base-url", server.url, "--start", days_ago(3))
        assert elsewhere.requests == []
    assert code == 1
    assert err == ("ona-usage: error: the API redirected (HTTP 308) to 127.0.0.1; not following it with the API key "
                   "(only 307/308 to https://*.ona.com or *.gitpod.io are followed; if that host is right, set --base-url to it)\n")
    assert not (workdir / DB).exists()


@pytest.mark.parametrize(
    "target,followed",
    [
        ("https://app.ona.com/api/x", True),
        ("https://eu.app.ona.com/api/x", True),
        ("https://app.gitpod.io/api/x", True),
        ("http://app.ona.com/api/x", False),  # never in clear text
        ("https://ona.com.evil.example/api/x", False),
        ("https://evilona.com/api/x", False),
        ("https://127.0.0.1:9/api/x", False),
    ],
)
def test_which_redirects_the_key_may_follow(target, followed):
    assert _may_follow(httpx.URL("https://app.gitpod.io/api/y"), httpx.URL(target)) is followed


def test_a_redirect_to_ona_is_followed_with_the_key_and_a_loop_is_cut():
    seen = []

    def api(request: httpx.Request) -> httpx.Response:
        seen.append((str(request.url), request.headers.get("authorization")))
        if request.url.host == "app.gitpod.io":
            return httpx.Response(308, headers={"Location": "https://app.ona.com" + request.url.raw_path.decode()})
        return httpx.Response(200, json={"records": [], "pagination": {}})

    window = Window(pendulum.datetime(2026, 1, 1), pendulum.datetime(2026, 1, 2))
    with UsageClient("k-1", "https://app.gitpod.io/api", transport=httpx.MockTransport(api)) as client:
        assert list(client.pages(window)) == [[]]
    assert [host for host, _ in seen] == [
        "https://app.gitpod.io/api/gitpod.v1.UsageService/ListEnvironmentUsageRecords?pageSize=100",
        "https://app.ona.com/api/gitpod.v1.UsageService/ListEnvironmentUsageRecords?pageSize=100",
    ]
    assert {key for _, key in seen} == {"Bearer k-1"}

    def loop(request: httpx.Request) -> httpx.Response:
        return httpx.Response(307, headers={"Location": str(request.url)})

    with UsageClient("k-1", "https://app.ona.com/api", transport=httpx.MockTransport(loop), max_attempts=1) as client:
        with pytest.raises(OnaApiError, match="redirected more than 3 times in a row"):
            list(client.pages(window))


def test_a_chunk_also_closes_at_its_row_bound(workdir, store, emulator):
    store.add(recent_records(1_000, days=10))
    result = run_sync(config(emulator, start_date=days_ago(11), chunk_rows=250))

    assert_table_equals(workdir / DB, store.records())
    # a load closes on the window that takes it to 250 records or more; the last takes what is left
    start = pendulum.parse(days_ago(11))
    windows = list(tile(start, pendulum.now("UTC"), pendulum.duration(days=1)))
    assert result.windows == len(windows)
    loads, held, open_load = 0, 0, False
    for window in windows:
        held += len(store.records(start=window.start, end=window.end))
        open_load = True
        if held >= 250:
            loads, held, open_load = loads + 1, 0, False
    assert result.chunks == loads + open_load >= 4


def hold_read_only(path: Path, seconds: float) -> subprocess.Popen:
    """Another process (a notebook, say) holding the DuckDB file open read-only for a while."""
    code = f"import duckdb, time; c = duckdb.connect({str(path)!r}, read_only=True); print('open', flush=True); time.sleep({seconds})"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "open\n"
    return holder


def test_a_sync_waits_for_a_reader_and_says_who_holds_the_file_when_it_stays(workdir, store, emulator, capsys, monkeypatch):
    monkeypatch.setenv("ONA_API_KEY", API_KEY)
    store.add(recent_records(100, days=2))
    assert run_here(capsys, "sync", "--quiet", "--base-url", emulator.url, "--start", days_ago(3))[0] == 0
    store.add(make_records(pendulum.now("UTC").subtract(minutes=20), 5, "later"))

    holder = hold_read_only(workdir / DB, 1.0)  # lets go within the writer's patience
    code, _, err = run_here(capsys, "sync", "--quiet", "--base-url", emulator.url)
    holder.wait()
    assert code == 0, err
    assert_table_equals(workdir / DB, store.records())

    monkeypatch.setattr(pipeline_module, "WRITE_LOCK_PATIENCE", 0.5)
    holder = hold_read_only(workdir / DB, 20)
    try:
        code, _, err = run_here(capsys, "sync", "--base-url", emulator.url)
    finally:
        holder.kill()
        holder.wait()
    assert code == 1
    assert err.count("\n") == 1 and err.startswith(f"ona-usage: error: {workdir / DB} is open in another process (")
    assert "close it there (a notebook, a BI tool), or let the other run finish" in err


def test_duckdb_out_of_memory_names_the_setting_and_keeps_what_was_committed(workdir, store, emulator, capsys):
    store.add(recent_records(3_000, days=3))
    env = {"ONA_API_KEY": API_KEY, "SOURCES__ONA_USAGE__DUCKDB_MEMORY_LIMIT": "1MB"}
    done = cli_here(capsys, "sync", "--base-url", emulator.url, "--start", days_ago(4), env=env)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1, done.stderr
    assert lines[-1].startswith("ona-usage: error: ") and "Out of Memory" in lines[-1]
    assert "SOURCES__ONA_USAGE__DUCKDB_MEMORY_LIMIT" in lines[-1]
    # with room, the next run finishes the job: every record once
    assert cli_here(capsys, "sync", "--base-url", emulator.url, env={"ONA_API_KEY": API_KEY}).returncode == 0
    assert_table_equals(workdir / DB, store.records())
