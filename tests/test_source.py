"""The dlt way in: `pipeline.run(ona_usage())` as a dlt user writes it, against the emulator.

The README's own code block runs verbatim in an empty directory; a dlt user's pipeline loads
the same rows, names and models as `ona-usage sync`; the source takes its options from dlt's
config like the command line, and cleans up after itself.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import dlt
import duckdb
import pendulum
import pytest

from ona_emulator import organisation_names
from ona_usage import ona_usage, ona_usage_models
from ona_usage.cli import main as cli_main
from ona_usage.pipeline import read_state

from conftest import API_KEY, assert_table_equals, isolate, recent_records, first_start, request_ranges

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
DB = "ona_usage.duckdb"
TABLES = ("environment_usage_records", "projects", "environment_classes", "runners", "environment_usage_daily", "environment_usage_monthly")


def readme_python_block(heading: str) -> str:
    """The first ```python block after `heading` in README.md."""
    section = README[README.index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_snippet_runs_verbatim_in_an_empty_directory(tmp_path, store, emulator):
    store.add(recent_records(500, days=5))
    store.names = organisation_names(7)
    code = readme_python_block("## Using it as a dlt source")
    assert 'dlt.pipeline("ona_usage", destination="duckdb", dataset_name="ona")' in code
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SOURCES__", "DESTINATION__"))}
    env.update(ONA_API_KEY=API_KEY, ONA_BASE_URL=emulator.url, DLT_DATA_DIR=str(tmp_path / "dlt-data"), RUNTIME__DLTHUB_TELEMETRY="false")
    code = code.replace('start_date="2026-01-01"', f'start_date="{pendulum.now("UTC").subtract(days=6).to_date_string()}"')

    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)

    assert done.returncode == 0, done.stderr
    assert_table_equals(tmp_path / DB, store.records(), dataset="ona")
    with duckdb.connect(str(tmp_path / DB), read_only=True) as conn:
        daily_rows = conn.execute("SELECT count(*) FROM ona.environment_usage_daily").fetchone()[0]
        monthly = dict(conn.execute("SELECT project_name, sum(runtime_hours) FROM ona.environment_usage_monthly GROUP BY 1").fetchall())
    assert done.stdout.splitlines()[0] == str(daily_rows) and daily_rows > 0
    for name, hours in monthly.items():  # the SQL through the dataset printed the same sums
        assert str(name) in done.stdout
    assert set(monthly) <= set(organisation_names(7).values()) | {None}
    assert not dlt.attach("ona_usage", pipelines_dir=str(tmp_path / "dlt-data" / "pipelines")).has_pending_data


def assert_same_rows(left: list[tuple], right: list[tuple], table: str) -> None:
    """Equal rows; sums of hours added in another order may differ in a double's last bits, nothing else."""
    def exact(rows: list[tuple]) -> list[tuple]:
        return [tuple(None if isinstance(v, float) else v for v in row) for row in rows]

    def floats(rows: list[tuple]) -> list[float]:
        return [v for row in rows for v in row if isinstance(v, float)]

    assert exact(left) == exact(right), table
    assert floats(left) == pytest.approx(floats(right), rel=1e-12), table


def sync_cli(workdir: Path, emulator, *args: str) -> None:
    env = {"ONA_API_KEY": API_KEY}
    os.environ.update(env)
    try:
        assert cli_main(["sync", "--quiet", "--base-url", emulator.url, *args]) == 0
    finally:
        os.environ.pop("ONA_API_KEY")


def test_a_dlt_pipeline_loads_what_the_cli_loads_table_for_table(tmp_path, monkeypatch, store, emulator):
    store.add(recent_records(1_500, days=9))
    store.names = organisation_names(7)
    start = pendulum.now("UTC").subtract(days=10).to_date_string()
    cli_dir, dlt_dir = tmp_path / "cli", tmp_path / "dlt"
    cli_dir.mkdir(), dlt_dir.mkdir()

    isolate(monkeypatch, cli_dir)
    sync_cli(cli_dir, emulator, "--start-date", start, "--chunk", "3d")

    isolate(monkeypatch, dlt_dir)
    monkeypatch.setenv("ONA_API_KEY", API_KEY)
    pipeline = dlt.pipeline("ona_usage", destination="duckdb", dataset_name="ona")
    pipeline.run(ona_usage(start_date=start, base_url=emulator.url))
    pipeline.run(ona_usage_models(pipeline))

    assert_table_equals(dlt_dir / DB, store.records(), dataset="ona")
    for table in TABLES:
        query = f"SELECT COLUMNS(c -> c NOT LIKE '_dlt_%') FROM ona.{table} ORDER BY ALL"
        with duckdb.connect(str(cli_dir / DB), read_only=True) as a, duckdb.connect(str(dlt_dir / DB), read_only=True) as b:
            assert_same_rows(a.execute(query).fetchall(), b.execute(query).fetchall(), table)
    # the same cursor, from the same first start
    cli_pipeline = dlt.attach("ona_usage", pipelines_dir=str(cli_dir / "dlt-data" / "pipelines"))
    cursors = [read_state(p) for p in (cli_pipeline, pipeline)]
    assert cursors[0].cursor == cursors[1].cursor and cursors[0].initial_value == cursors[1].initial_value


def test_the_models_read_through_the_dataset_and_dlt_attach_after_a_cli_sync(workdir, store, emulator):
    store.add(recent_records(400, days=3))
    store.names = organisation_names(7)
    sync_cli(workdir, emulator, "--start-date", pendulum.now("UTC").subtract(days=4).to_date_string())

    dataset = dlt.attach("ona_usage").dataset()
    daily = dataset["environment_usage_daily"].arrow()
    assert daily.num_rows > 0
    total = dataset("SELECT sum(runs) AS runs FROM environment_usage_daily").fetchall()
    assert total == [(len(store.records()),)]
    monthly = dataset["environment_usage_monthly"].arrow()
    assert sum(monthly.column("runs").to_pylist()) == len(store.records())
    assert set(daily.column("project_name").to_pylist()) <= set(organisation_names(7).values()) | {None}


def test_dlt_pipeline_trace_shows_the_usage_load(workdir, store, emulator):
    store.add(recent_records(300, days=2))
    sync_cli(workdir, emulator, "--start-date", pendulum.now("UTC").subtract(days=3).to_date_string())

    trace = dlt.attach("ona_usage").last_trace
    normalized = [step.step_info.row_counts for step in trace.steps if step.step == "normalize"]
    assert {"environment_usage_records": 300}.items() <= normalized[0].items()
    assert any("environment_usage_daily" in counts for counts in normalized)


def test_the_source_takes_timeout_and_attempts_from_dlt_config(workdir, monkeypatch, store, emulator):
    store.add(recent_records(20, days=1))
    emulator.set_faults(fail_first=100, fail_first_with="hang", hang_seconds=5)
    monkeypatch.setenv("ONA_API_KEY", API_KEY)
    monkeypatch.setenv("SOURCES__ONA_USAGE__TIMEOUT", "0.3")
    monkeypatch.setenv("SOURCES__ONA_USAGE__MAX_ATTEMPTS", "2")
    monkeypatch.setenv("SOURCES__ONA_USAGE__BACKOFF", "0.01")
    pipeline = dlt.pipeline("ona_usage", destination="duckdb", dataset_name="ona")

    started = time.monotonic()
    with pytest.raises(Exception) as failure:
        pipeline.run(ona_usage(base_url=emulator.url, window="1d").with_resources("environment_usage_records"))

    assert time.monotonic() - started < 4  # two attempts of 0.3 s, not 60 s each
    assert "gave up after 2 attempts" in str(failure.value)
    assert not any(t.name.startswith("ona-window") for t in threading.enumerate())  # its fetcher closed


def test_the_source_cleans_up_and_its_second_run_fetches_only_what_is_new(workdir, monkeypatch, store, emulator):
    store.add(recent_records(200, days=2))
    monkeypatch.setenv("ONA_API_KEY", API_KEY)
    pipeline = dlt.pipeline("ona_usage", destination="duckdb", dataset_name="ona")
    source = ona_usage(start_date=pendulum.now("UTC").subtract(days=3).to_date_string(), base_url=emulator.url)

    pipeline.run(source)
    assert not any(t.name.startswith("ona-window") for t in threading.enumerate())
    fetched_at = pendulum.instance(pipeline.state["sources"]["ona_usage"]["resources"]["environment_usage_records"]["fetched_at"])
    emulator.reset_requests()

    pipeline.run(ona_usage(base_url=emulator.url))

    ranges = request_ranges(emulator)
    assert ranges and pendulum.parse(first_start(ranges)) == fetched_at.subtract(hours=2)  # the lookback, as the CLI plans it
    assert_table_equals(workdir / DB, store.records(), dataset="ona")


def test_the_source_signature_is_what_a_user_means():
    import inspect

    assert list(inspect.signature(ona_usage.__wrapped__ if hasattr(ona_usage, "__wrapped__") else ona_usage).parameters) == [
        "api_key", "base_url", "start_date", "end_date", "project_id", "window", "lookback", "page_size", "workers",
    ]


def test_a_dlt_backfill_loads_its_range_and_leaves_the_cursor_alone(workdir, monkeypatch, store, emulator):
    store.add(recent_records(300, days=6))
    monkeypatch.setenv("ONA_API_KEY", API_KEY)
    pipeline = dlt.pipeline("ona_usage", destination="duckdb", dataset_name="ona")
    day = pendulum.now("UTC").start_of("day")
    start, end = day.subtract(days=4), day.subtract(days=2)

    pipeline.run(ona_usage(start_date=start.to_date_string(), end_date=end.to_date_string(), base_url=emulator.url))

    expected = [r for r in store.records() if start <= pendulum.parse(r["stoppedAt"]) < end]
    assert_table_equals(workdir / DB, expected, dataset="ona")
    resource = pipeline.state["sources"]["ona_usage"]["resources"]["environment_usage_records"]
    assert "fetched_through" not in resource and not resource.get("incremental", {}).get("stopped_at", {}).get("last_value")
    assert [v["done"] for v in resource["backfills"].values()] == [True]
