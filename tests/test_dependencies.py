"""The pinned versions are the ones installed, and they work together where they are known to break."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import pendulum
import pyarrow as pa

from ona_usage import settings
from ona_usage.pipeline import make_pipeline

from conftest import recent_records
from test_sync import sync

LOCK = Path(__file__).parent.parent / "requirements.lock"


def test_installed_versions_match_the_lock_file():
    pins = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", LOCK.read_text(), flags=re.M))
    assert {"dlt", "duckdb", "sqlglot", "httpx", "pendulum", "pyarrow"} <= pins.keys()
    wrong = {name: (pin, metadata.version(name)) for name, pin in pins.items() if metadata.version(name) != pin}
    assert wrong == {}


def test_known_incompatible_versions_are_excluded():
    # dlt 1.31 with duckdb 2.x breaks dataset().arrow(); sqlglot 30 breaks dataset()
    assert metadata.version("duckdb").startswith("1.")
    assert int(metadata.version("sqlglot").split(".")[0]) < 30


def test_the_result_opens_with_pipeline_dataset(workdir, store, emulator):
    store.add(recent_records(120, days=2))
    sync(emulator, start_date=pendulum.now("UTC").subtract(days=3).to_date_string())

    dataset = make_pipeline(settings.resolve({})).dataset()
    table = dataset["environment_usage_records"].arrow()

    assert isinstance(table, pa.Table)
    assert table.num_rows == 120
    assert sorted(table.column("id").to_pylist()) == sorted(r["id"] for r in store.records())
    assert table.schema.field("stopped_at").type == pa.timestamp("us", tz="UTC")
    count = dataset("SELECT count(DISTINCT id) AS n FROM environment_usage_records").fetchall()
    assert count == [(120,)]
