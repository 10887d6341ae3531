"""The README's commands and code blocks, run from the README's own text against a real sync.

One synced warehouse (the emulator's synthetic organisation, with names) serves every block:
each SQL question runs as an analyst would run it and answers with rows; the "Opening it"
one-liners run verbatim; the `status --json` example has the shape `status --json` prints; and
every `ona-usage` command line the README shows is one the command line accepts. The dlt source
snippet runs in tests/test_source.py.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import duckdb
import pendulum
import pytest

from ona_emulator import EmulatorServer, UsageStore, generate_organisation, organisation_names
from ona_usage.cli import build_parser, main as cli_main

from conftest import API_KEY, isolate, run_cli

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
DB = "ona_usage.duckdb"


def blocks(language: str, text: str = README) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def section(heading: str) -> str:
    start = README.index(heading)
    following = README.find("\n## ", start + len(heading))
    nested = README.find("\n### ", start + len(heading))
    ends = [i for i in (following, nested) if i != -1]
    return README[start : min(ends) if ends else len(README)]


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with a synced `ona_usage.duckdb`: 45 days of a synthetic organisation, with names."""
    root = tmp_path_factory.mktemp("readme")
    end = pendulum.now("UTC")
    start = end.subtract(days=45)
    store = UsageStore(generate_organisation(42, start, end, 3_000))
    store.names = organisation_names(42)
    (root / ".dlt").mkdir()
    (root / ".dlt" / "config.toml").write_text(rate_card_example())  # the README's own rate card
    with EmulatorServer(store, api_key=API_KEY) as server:
        # a process of its own: dlt reads `.dlt/` in the directory a process starts in
        done = run_cli("sync", "--quiet", "--base-url", server.url, "--start-date", start.to_date_string(),
                       env=readme_env(root), cwd=root)
    assert done.returncode == 0, done.stderr
    return root


def readme_env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SOURCES__", "DESTINATION__"))}
    env.update(ONA_API_KEY=API_KEY, DLT_DATA_DIR=str(root / "dlt-data"), RUNTIME__DLTHUB_TELEMETRY="false")
    return env


def rate_card_example() -> str:
    (toml,) = blocks("toml", section("### Cost: a rate card"))
    return toml


def test_the_rate_card_example_is_read_as_three_rates(warehouse):
    show = ("import json; from ona_usage import settings; print(json.dumps([[r.environment_class, r.credits_per_hour, "
            "r.valid_from and r.valid_from.isoformat(), r.credit_price, r.currency] for r in settings.resolve({}).rate_card]))")
    done = subprocess.run([sys.executable, "-c", show], cwd=warehouse, env=readme_env(warehouse), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [
        ["Small (2 vCPU, 8 GiB)", 1.0, None, 0.10, "USD"],
        ["Regular (4 vCPU, 16 GiB)", 2.0, None, 0.10, "USD"],
        ["Regular (4 vCPU, 16 GiB)", 2.5, "2026-10-01", 0.10, "USD"],
    ]
    with duckdb.connect(str(warehouse / DB), read_only=True) as conn:
        priced = conn.execute("SELECT count(*) FILTER (WHERE cost IS NOT NULL), count(*) FROM ona.environment_usage_daily").fetchone()
    assert 0 < priced[0] < priced[1]  # the example's classes are priced, the demo's others are not


def test_every_question_runs_and_answers(warehouse):
    questions = blocks("sql", README[README.index("### Questions people ask") : README.index("### A report to look at")])
    assert len(questions) == 9
    with duckdb.connect(str(warehouse / DB), read_only=True) as conn:
        for sql in questions:
            rows = conn.execute(sql).fetchall()
            assert rows, sql
            assert all(value is not None for value in rows[0][-2:]), sql  # figures, not nulls


def test_the_opening_one_liners_run_verbatim(warehouse):
    opening = section("### Opening it")
    commands = re.findall(r"`(python -c .*?)`\.?$", opening, re.M)
    calls = re.findall(r"`(dlt\.attach\(.*?)`", opening)
    assert len(commands) == 1 and len(calls) == 2
    env = {**os.environ, "DLT_DATA_DIR": str(warehouse / "dlt-data"), "RUNTIME__DLTHUB_TELEMETRY": "false"}
    python = [sys.executable if part == "python" else part for part in shlex.split(commands[0])]
    done = subprocess.run(python, cwd=warehouse, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "usage_date" in done.stdout and "5 rows" in done.stdout
    for call in calls:
        done = subprocess.run([sys.executable, "-c", f"import dlt; print(repr({call}))"], cwd=warehouse, env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "pyarrow.Table" in done.stdout or re.fullmatch(r"\[\(\d+,\)\]\n", done.stdout), done.stdout


def test_the_status_example_has_the_shape_status_prints(warehouse, monkeypatch, capsys):
    isolate(monkeypatch, warehouse)
    (example,) = blocks("json", section("### Knowing where things stand"))
    documented = json.loads(example)
    capsys.readouterr()
    assert cli_main(["status", "--json"]) == 0
    actual = json.loads(capsys.readouterr().out)
    assert actual.keys() == documented.keys()
    for key in ("next_sync", "last_load", "table_stats"):
        assert actual[key].keys() == documented[key].keys(), key
    assert actual["dataset"] == documented["dataset"] == "ona"
    assert actual["table_stats"]["rows"] > 0


def test_every_command_line_the_readme_shows_is_accepted():
    parser = build_parser()
    lines = [
        line.split("#")[0].strip()
        for block in blocks("sh")
        for line in block.splitlines()
        if re.match(r"\s*(\S+=\S+\s+)*(\.venv/bin/)?ona-usage ", line.split("&&")[-1])
    ]
    assert len(lines) >= 6
    for line in lines:
        command = line.split("&&")[-1].strip()
        words = [w for w in shlex.split(re.sub(r"\[[^\]]*\]", "", command)) if "=" not in w or w.startswith("--")]
        words = words[words.index(next(w for w in words if w.endswith("ona-usage"))) + 1 :]
        parser.parse_args(words)  # exits (fails the test) on an option the command does not take
