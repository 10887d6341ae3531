"""`ona-usage` as a user runs it: the installed console script in a subprocess."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pendulum
import pytest

from conftest import API_KEY, assert_table_equals, recent_records, run_cli


def test_help_names_every_sync_option():
    result = run_cli("sync", "--help")
    assert result.returncode == 0
    for option in ("--start-date", "--project-id", "--base-url", "--destination", "--dataset-name",
                   "--pipeline-name", "--window", "--lookback", "--page-size", "--workers"):
        assert option in result.stdout


def test_sync_from_another_directory_with_config_from_env_and_dot_dlt(workdir, store, emulator, tmp_path):
    store.add(recent_records(700, days=3))
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / ".dlt").mkdir(parents=True)
    # .dlt/config.toml in the working directory overrides the defaults, as dlt does
    (elsewhere / ".dlt" / "config.toml").write_text('[sources.ona_usage]\nwindow = "6h"\ndataset_name = "usage_raw"\n')
    env = {
        "ONA_API_KEY": API_KEY,
        "SOURCES__ONA_USAGE__PAGE_SIZE": "50",
        "DESTINATION__DUCKDB__CREDENTIALS": str(tmp_path / "warehouse.duckdb"),
    }
    start = pendulum.now("UTC").subtract(days=4).start_of("day")

    result = run_cli("sync", "--base-url", emulator.url, "--start-date", start.to_date_string(), env=env, cwd=elsewhere)

    assert result.returncode == 0, result.stderr
    assert "Loaded 700 new rows" in result.stdout
    windows = (pendulum.now("UTC") - start).total_seconds() // (6 * 3600) + 1
    assert f"Fetched {int(windows)} windows" in result.stdout
    assert {r["query"].get("pageSize") for r in emulator.requests[2:]} == {"50"}
    assert_table_equals(tmp_path / "warehouse.duckdb", store.records(), dataset="usage_raw")
    assert API_KEY not in result.stdout + result.stderr
    # state went to DLT_DATA_DIR, not to the home directory
    assert (workdir / "dlt-data" / "pipelines" / "ona_usage" / "state.json").exists()


def test_gitpod_api_key_is_accepted_and_a_second_run_loads_nothing_new(workdir, store, emulator):
    store.add(recent_records(200, days=2))
    env = {"GITPOD_API_KEY": API_KEY}
    first = run_cli("sync", "--base-url", emulator.url, "--start-date", pendulum.now("UTC").subtract(days=3).to_date_string(), env=env)
    assert first.returncode == 0, first.stderr
    assert "Loaded 200 new rows" in first.stdout

    second = run_cli("sync", "--base-url", emulator.url, env=env)

    assert second.returncode == 0, second.stderr
    assert_table_equals(workdir / "ona_usage.duckdb", store.records())


def test_a_wrong_key_exits_non_zero_with_one_line_and_writes_nothing(workdir, store, emulator):
    store.add(recent_records(20, days=1))
    result = run_cli("sync", "--base-url", emulator.url, env={"ONA_API_KEY": "sk-wrong-7d1f2c"})

    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "rejected the API key" in lines[0]
    assert "sk-wrong-7d1f2c" not in result.stderr
    assert list(workdir.iterdir()) == []


@pytest.mark.parametrize(
    "args,env,message",
    [
        (["--start-date", "yesterday-ish"], {}, "start date"),
        (["--window", "0"], {}, "window"),
        (["--window", "2d"], {}, "window"),
        (["--page-size", "101"], {}, "page size"),
        (["--page-size", "0"], {}, "page size"),
        (["--lookback", "soon"], {}, "lookback"),
        (["--destination", "nosuchdb"], {}, "unknown destination"),
        (["--base-url", "not a url"], {}, "base URL"),
        (["--base-url", "http://example.com/api"], {}, "plain http"),
        ([], {"ONA_API_KEY": ""}, "no API key"),
        ([], {"SOURCES__ONA_USAGE__PAGE_SIZE": "lots"}, "page_size"),
    ],
)
def test_bad_input_is_one_clear_line_and_writes_nothing(workdir, emulator, args, env, message):
    full_env = {"ONA_API_KEY": API_KEY, **env}
    base = [] if "--base-url" in args else ["--base-url", emulator.url]
    result = run_cli("sync", *base, *args, env=full_env)

    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert API_KEY not in result.stderr
    assert emulator.requests == []
    assert list(Path(workdir).iterdir()) == []


def test_demo_without_a_key_syncs_the_bundled_emulator_and_queries_it(workdir):
    result = run_cli("demo", "--records", "3000", "--days", "10", cwd=workdir)

    assert result.returncode == 0, result.stderr
    assert "No API key given" in result.stdout
    loaded = int(result.stdout.split("Loaded ")[1].split(" new rows")[0].replace(",", ""))
    with duckdb.connect(str(workdir / "ona_usage_demo.duckdb"), read_only=True) as conn:
        assert conn.execute("SELECT count(*) FROM ona.environment_usage_records").fetchone() == (loaded,)
    assert not (workdir / "ona_usage.duckdb").exists()  # the demo's rows live apart
    assert "backend" in result.stdout  # the example query names projects
