"""The scheduling recipes are valid and run the commands the README documents."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pendulum
import yaml

from conftest import API_KEY, assert_table_equals, recent_records

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def test_github_actions_workflow_is_valid_and_runs_the_documented_commands():
    workflow = yaml.safe_load((ROOT / "deploy" / "github-actions.yml").read_text())
    triggers = workflow.get("on") or workflow[True]  # YAML 1.1 reads a bare `on` as true
    assert triggers["schedule"][0]["cron"] == "17 * * * *"
    steps = workflow["jobs"]["sync"]["steps"]
    commands = [step["run"] for step in steps if "run" in step]
    sync = next(c for c in commands if c.startswith("ona-usage sync"))
    assert sync in README
    assert any(c.startswith("ona-usage verify") for c in commands)
    assert workflow["concurrency"]["cancel-in-progress"] is False
    python = next(s for s in steps if s.get("uses", "").startswith("actions/setup-python"))
    assert python["with"]["python-version"] == "3.11"


def test_airflow_dag_parses_and_runs_the_documented_command():
    source = (ROOT / "deploy" / "airflow_dag.py").read_text()
    tree = ast.parse(source)
    commands = [
        kw.value.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        for kw in node.keywords
        if kw.arg == "bash_command" and isinstance(kw.value, ast.Constant)
    ]
    assert any(c in README for c in commands if c.startswith("ona-usage sync"))
    assert any(c.startswith("ona-usage verify") for c in commands)


def test_the_dlt_deploy_script_loads_the_api_records(workdir, store, emulator):
    store.add(recent_records(250, days=3))
    env = {
        **os.environ,
        "ONA_API_KEY": API_KEY,
        "SOURCES__ONA_USAGE__BASE_URL": emulator.url,
        "SOURCES__ONA_USAGE__START_DATE": pendulum.now("UTC").subtract(days=4).to_date_string(),
    }
    result = subprocess.run(
        [sys.executable, str(ROOT / "pipelines" / "ona_usage_pipeline.py")],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert_table_equals(workdir / "ona_usage.duckdb", store.records())
