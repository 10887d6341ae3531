"""People, organizations and cost: the models against an independent computation over the emulator's truth.

Members give names (someone who left keeps the id and no name); every row carries the
organization of the key; a rate card prices hours per UTC day with the rate valid that day
(a run crossing midnight on the day a rate changes is priced at both rates; a class with no
rate has no cost, never a guess). On DuckDB and on PostgreSQL. A key of another organization
never writes into a pipeline that syncs the first.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from datetime import date, datetime, timedelta, timezone
from typing import Any

import duckdb
import pendulum
import psycopg2
import pytest

from ona_emulator import EmulatorServer, UsageStore
from ona_usage import settings
from ona_usage.cli import main as cli_main
from ona_usage.pipeline import make_pipeline, read_state, run_sync
from ona_usage.status import collect_status

import pg_server
from conftest import API_KEY, isolate, make_records, recent_records, table_rows, to_datetime

DB = "ona_usage.duckdb"
CLASS_SMALL, CLASS_LARGE, CLASS_GPU = "class-small", "class-large", "class-gpu"
CHANGE = pendulum.now("UTC").start_of("day").subtract(days=2)  # the day the large class's rate changes
RATE_CARD = [
    {"environment_class": "Small (2 vCPU)", "credits_per_hour": 1.0},  # by display name
    {"environment_class": CLASS_LARGE, "credits_per_hour": 2.0},  # by id
    {"environment_class": CLASS_LARGE, "credits_per_hour": 3.0, "valid_from": CHANGE.to_date_string()},
    # CLASS_GPU has no rate
]
CREDIT_PRICE = 0.25
LEFT = "user-who-left"


def organisation() -> UsageStore:
    """Usage on three classes over a week, with the awkward cases spelled out."""
    store = UsageStore()
    records = recent_records(400, days=7, seed=21)
    for i, record in enumerate(records):
        record["environmentClassId"] = (CLASS_SMALL, CLASS_LARGE, CLASS_GPU)[i % 3]
        record["userId"] = (f"user-{i % 5}", LEFT)[i % 11 == 0]
    # a run on the large class across midnight into the day its rate changes
    crossing = make_records(CHANGE.add(hours=2), 1, "crossing")[0]
    crossing |= {"createdAt": CHANGE.subtract(hours=3).to_iso8601_string(), "environmentClassId": CLASS_LARGE, "userId": "user-1"}
    store.add(records + [crossing])
    store.names = {CLASS_SMALL: "Small (2 vCPU)", CLASS_LARGE: "Large (8 vCPU)", CLASS_GPU: "GPU",
                   "user-1": "Zoë Ångström", "user-2": '<script>alert("x")</script> & Co'}
    store.left = {LEFT}
    return store


Key = tuple[Any, ...]


def rate(class_id: str, day: date) -> float | None:
    name = {CLASS_SMALL: "Small (2 vCPU)"}.get(class_id)
    valid = [r for r in RATE_CARD if r["environment_class"] in (class_id, name)
             and (not r.get("valid_from") or date.fromisoformat(r["valid_from"]) <= day)]
    return max(valid, key=lambda r: r.get("valid_from", ""))["credits_per_hour"] if valid else None


def expected_daily(store: UsageStore, organization: str) -> dict[Key, tuple[int, float, float | None]]:
    """(day, org, user, project, class, runner) -> (runs, hours, credits), hours split per UTC day."""
    totals: dict[Key, list] = defaultdict(lambda: [0, 0.0, 0.0])
    for r in store.records():
        stop = to_datetime(r["stoppedAt"])
        start = min(to_datetime(r.get("createdAt")) or stop, stop)
        ids = (organization, r.get("userId"), r.get("projectId"), r.get("environmentClassId"), r.get("runnerId"))
        day = datetime(start.year, start.month, start.day, tzinfo=timezone.utc)
        while day <= stop:
            hours = (min(stop, day + timedelta(days=1)) - max(start, day)).total_seconds() / 3600
            entry = totals[(day.date(), *ids)]
            entry[1] += hours
            price = rate(r["environmentClassId"], day.date())
            entry[2] = None if price is None or entry[2] is None else entry[2] + hours * price
            day += timedelta(days=1)
        totals[(stop.date(), *ids)][0] += 1
    return {k: (runs, hours, credits) for k, (runs, hours, credits) in totals.items()}


SELECT = ("SELECT usage_date, organization_id, user_id, project_id, environment_class_id, runner_id, runs, runtime_hours, "
          "credits, cost, currency, user_name, user_email FROM {dataset}.environment_usage_daily")


def assert_daily(rows: list[tuple], expected: dict[Key, tuple[int, float, float | None]], names: dict[str, str]) -> None:
    actual = {tuple(row[:6]): row[6:] for row in rows}
    assert actual.keys() == expected.keys()
    for key, (runs, hours, credits) in expected.items():
        got_runs, got_hours, got_credits, got_cost, currency, user_name, user_email = actual[key]
        assert (got_runs, got_hours) == (runs, pytest.approx(hours, abs=1e-6)), key
        if credits is None:
            assert (got_credits, got_cost) == (None, None), key  # no rate: no cost, never a guess
        else:
            assert got_credits == pytest.approx(credits, abs=1e-6) and got_cost == pytest.approx(credits * CREDIT_PRICE, abs=1e-6), key
            assert currency == "EUR"
        user = key[2]
        assert user_name == (None if user == LEFT else names.get(user, f"User {user[:8]}")), key
        assert (user_email is None) == (user == LEFT), key


def configure(monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    monkeypatch.setenv("SOURCES__ONA_USAGE__RATE_CARD", json.dumps(RATE_CARD))
    monkeypatch.setenv("SOURCES__ONA_USAGE__CREDIT_PRICE", str(CREDIT_PRICE))
    monkeypatch.setenv("SOURCES__ONA_USAGE__CURRENCY", "EUR")


def sync(emulator: EmulatorServer, **options: Any) -> None:
    config = settings.resolve({"base_url": emulator.url, "start_date": pendulum.now("UTC").subtract(days=9).to_date_string(), **options})
    config.api_key = API_KEY
    run_sync(config)


def test_names_organization_and_cost_on_duckdb_match_the_truth(workdir, monkeypatch):
    configure(monkeypatch)
    store = organisation()
    with EmulatorServer(store, api_key=API_KEY) as emulator:
        sync(emulator)
    with duckdb.connect(str(workdir / DB), read_only=True) as conn:
        conn.execute("SET TimeZone = 'Asia/Tokyo'")  # an analyst's zone changes nothing
        rows = conn.execute(SELECT.format(dataset="ona")).fetchall()
        members = dict(conn.execute("SELECT user_id, name FROM ona.members").fetchall())
        organizations = conn.execute("SELECT DISTINCT organization_id FROM ona.environment_usage_records").fetchall()
    assert organizations == [(store.organization_id,)]
    assert LEFT not in members and members["user-2"] == '<script>alert("x")</script> & Co'
    expected = expected_daily(store, store.organization_id)
    assert_daily(rows, expected, store.names)
    # the crossing run: 2 hours before midnight at 2 credits, 2 after at 3
    crossing = {k[0]: v for k, v in expected.items() if k[2] == "user-1" and k[4] == CLASS_LARGE and k[0] in (CHANGE.date() - timedelta(days=1), CHANGE.date())}
    assert crossing  # the scenario is in the data


def load_ids(db: str) -> dict[str, set[str]]:
    """The loads that wrote each list, the rate card and the daily model's rows."""
    with duckdb.connect(db, read_only=True) as conn:
        return {
            table: {row[0] for row in conn.execute(f"SELECT DISTINCT _dlt_load_id FROM ona.{table}").fetchall()}
            for table in ("projects", "environment_classes", "runners", "members", "rate_card", "environment_usage_daily")
        }


def daily_load_ids(db: str) -> dict[date, set[str]]:
    with duckdb.connect(db, read_only=True) as conn:
        rows = conn.execute("SELECT usage_date, _dlt_load_id FROM ona.environment_usage_daily").fetchall()
    days: dict[date, set[str]] = defaultdict(set)
    for day, load_id in rows:
        days[day].add(load_id)
    return days


NOW = pendulum.now("UTC")
SHRUNK = make_records(NOW.subtract(minutes=20), 1, "shrunk")[0] | {"createdAt": NOW.subtract(days=5).to_iso8601_string()}


def test_a_run_rewrites_the_lists_and_the_models_only_when_they_changed(workdir, monkeypatch):
    configure(monkeypatch)
    store = organisation()
    store.add([SHRUNK])
    db = str(workdir / DB)
    with EmulatorServer(store, api_key=API_KEY) as emulator:
        sync(emulator)
        first = load_ids(db)
        for _ in range(2):  # nothing changed: no list, no rate card and no model is written again ...
            sync(emulator)
            assert load_ids(db) == first
        with duckdb.connect(db, read_only=True) as conn:  # ... though each run read rows of its lookback again
            usage, = conn.execute("SELECT max(_dlt_load_id) FROM ona.environment_usage_records").fetchone()
        assert usage > max(first["environment_usage_daily"])

        # New usage, no new names: only the days its runs ran on are computed again. One run started
        # three days ago; another, inside the lookback, the API said started five days ago and now
        # says an hour ago: the days it no longer ran on are computed again too.
        before = daily_load_ids(db)
        long_run = make_records(NOW.subtract(minutes=30), 1, "long")[0] | {
            "createdAt": NOW.subtract(days=3).to_iso8601_string(), "environmentClassId": CLASS_LARGE, "userId": "user-3"}
        store.add([long_run])
        store.upsert([SHRUNK | {"createdAt": NOW.subtract(hours=1, minutes=20).to_iso8601_string()}])
        sync(emulator)
        after = daily_load_ids(db)
        first_day = NOW.subtract(days=5).date()
        assert {day: ids for day, ids in after.items() if day < first_day} == {day: ids for day, ids in before.items() if day < first_day}
        new_load = after[NOW.date()]
        assert len(new_load) == 1 and new_load != before.get(NOW.date())
        assert all(after[day] == new_load for day in after if day >= first_day)
        assert_daily(duckdb_rows(db), expected_daily(store, store.organization_id), store.names)
        assert load_ids(db)["rate_card"] == first["rate_card"]

        # A new rate: the rate card is written again, and every day priced again.
        monkeypatch.setattr(__import__(__name__), "RATE_CARD", [*RATE_CARD, {"environment_class": CLASS_GPU, "credits_per_hour": 5.0}])
        configure(monkeypatch)
        sync(emulator)
        priced = load_ids(db)
        assert priced["rate_card"] != first["rate_card"] and len(priced["environment_usage_daily"]) == 1
        assert_daily(duckdb_rows(db), expected_daily(store, store.organization_id), store.names)

        # a class renamed: its list is written again, and every day named again
        store.names[CLASS_LARGE] = "Large (16 vCPU)"
        sync(emulator)
        renamed = load_ids(db)
    assert renamed["environment_classes"] != first["environment_classes"]
    assert len(renamed["environment_usage_daily"]) == 1 and renamed["environment_usage_daily"] != priced["environment_usage_daily"]
    assert {t: renamed[t] for t in ("projects", "runners", "members", "rate_card")} == {t: priced[t] for t in ("projects", "runners", "members", "rate_card")}
    with duckdb.connect(db, read_only=True) as conn:
        assert conn.execute("SELECT name FROM ona.environment_classes WHERE id = ?", [CLASS_LARGE]).fetchall() == [("Large (16 vCPU)",)]
        assert {r[0] for r in conn.execute("SELECT environment_class_name FROM ona.environment_usage_daily WHERE environment_class_id = ?", [CLASS_LARGE]).fetchall()} == {"Large (16 vCPU)"}
    assert_daily(duckdb_rows(db), expected_daily(store, store.organization_id), store.names)


def duckdb_rows(db: str) -> list[tuple]:
    with duckdb.connect(db, read_only=True) as conn:
        return conn.execute(SELECT.format(dataset="ona")).fetchall()


def test_two_organizations_share_a_dataset_on_purpose_and_models_keep_them_apart(postgres, workdir, monkeypatch):  # noqa: F811
    url = pg_server.create_database(postgres, f"t_{uuid.uuid4().hex[:12]}")
    monkeypatch.setenv("DESTINATION__POSTGRES__CREDENTIALS", url)
    configure(monkeypatch)
    first, second = organisation(), UsageStore()
    second.organization_id = "0c0ffee0-0000-4000-8000-00000000000b"
    second.add(recent_records(150, days=5, seed=33))
    with EmulatorServer(first, api_key=API_KEY) as a, EmulatorServer(second, api_key=API_KEY) as b:
        sync(a, destination="postgres")
        # organization B in its own pipeline, into the same dataset: refused until asked for
        with pytest.raises(settings.ConfigError, match="add --add-organization"):
            sync(b, destination="postgres", pipeline_name="usage_b")
        sync(b, destination="postgres", pipeline_name="usage_b", add_organization=True)

    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SET TIME ZONE 'America/Los_Angeles'")
            cur.execute(SELECT.format(dataset="ona"))
            rows = cur.fetchall()
    finally:
        conn.close()
    assert {row[1] for row in rows} == {first.organization_id, second.organization_id}
    assert_daily([r for r in rows if r[1] == first.organization_id], expected_daily(first, first.organization_id), first.names)
    assert_daily([r for r in rows if r[1] == second.organization_id], expected_daily(second, second.organization_id), second.names)


def test_a_key_of_another_organization_fails_before_writing(workdir, store, emulator, capsys, monkeypatch):
    monkeypatch.setenv("ONA_API_KEY", API_KEY)
    store.add(recent_records(200, days=3))
    start = pendulum.now("UTC").subtract(days=4).to_date_string()
    assert cli_main(["sync", "--quiet", "--base-url", emulator.url, "--start", start]) == 0
    before_rows, before_state = table_rows(workdir / DB), read_state(make_pipeline(settings.resolve({})))
    stamp = (workdir / DB).stat().st_mtime_ns

    store.organization_id = "0c0ffee0-0000-4000-8000-00000000000b"  # the key now belongs to organization B
    store.add(recent_records(50, days=1, seed=3))
    capsys.readouterr()
    code = cli_main(["sync", "--base-url", emulator.url])

    err = capsys.readouterr().err
    assert code == 2
    assert err == ("ona-usage: error: pipeline 'ona_usage' syncs organization 0c0ffee0-0000-4000-8000-00000000000a, but the API key "
                   "belongs to organization 0c0ffee0-0000-4000-8000-00000000000b; sync it with its own --pipeline-name "
                   "(and --add-organization to share the dataset)\n")
    assert table_rows(workdir / DB) == before_rows
    assert read_state(make_pipeline(settings.resolve({}))) == before_state
    assert (workdir / DB).stat().st_mtime_ns == stamp


def test_the_demo_keeps_its_synthetic_organization_apart(tmp_path, monkeypatch, capsys):
    isolate(monkeypatch, tmp_path)
    assert cli_main(["demo", "--records", "300", "--days", "3"]) == 0
    assert (tmp_path / "ona_usage_demo.duckdb").exists() and not (tmp_path / DB).exists()
    assert not (tmp_path / "dlt-data" / "pipelines" / "ona_usage").exists()


def test_the_report_shows_names_cost_the_previous_period_and_a_partial_day(workdir, monkeypatch, tmp_path):
    from test_report import chromium, parse, run_chromium, table_rows as shown_rows

    configure(monkeypatch)
    store = organisation()
    with EmulatorServer(store, api_key=API_KEY) as emulator:
        sync(emulator)
    out = tmp_path / "report.html"
    monkeypatch.setenv("ONA_API_KEY", API_KEY)
    assert cli_main(["report", "--quiet", "--start", pendulum.now("UTC").subtract(days=3).to_date_string(), "--out", str(out)]) == 0

    browser = chromium()
    dom = parse(run_chromium(browser, tmp_path / "profile", "--dump-dom", out.as_uri()).stdout)
    start, end = date.fromisoformat(dom.by_id("period").attrs["data-start"]), date.fromisoformat(dom.by_id("period").attrs["data-end"])
    conn = duckdb.connect(str(workdir / DB), read_only=True)

    def total(column: str, since: date, until: date) -> float:
        return conn.execute(f"SELECT SUM({column}) FROM ona.environment_usage_daily WHERE usage_date >= ? AND usage_date < ?",
                            [since, until]).fetchone()[0]

    users = dict(conn.execute("SELECT user_id, MAX(user_name) FROM ona.environment_usage_daily GROUP BY 1").fetchall())
    newest = conn.execute("SELECT MAX(stopped_at) FROM ona.environment_usage_records").fetchone()[0]
    before = start - (end - start)
    assert float(dom.by_id("total-hours").attrs["data-value"]) == pytest.approx(total("runtime_hours", start, end))
    assert float(dom.by_id("total-cost").attrs["data-value"]) == pytest.approx(total("cost", start, end))
    assert "EUR" in dom.by_id("total-cost").text
    assert float(dom.by_id("total-hours-change").attrs["data-previous"]) == pytest.approx(total("runtime_hours", before, start))
    assert float(dom.by_id("total-cost-change").attrs["data-previous"]) == pytest.approx(total("cost", before, start))
    # names, not ids: the hostile one as text, someone who left by the id
    labels = {label for label, _, _ in shown_rows(dom, "top-users")}
    assert '<script>alert("x")</script> & Co' in labels and "Zoë Ångström" in labels
    assert LEFT in labels and users[LEFT] is None  # someone who left: by id, with no name
    assert not dom.find_all("script")
    # the last day is partial (data through this morning), and says so
    assert dom.by_id("data-through").attrs["data-through"].startswith(newest.astimezone(timezone.utc).date().isoformat())
    assert dom.find_all("text", "partial-mark") and all(b.attrs["data-day"] == str(end - timedelta(days=1)) for b in dom.find_all("rect", "partial"))
    for ident in ("top-projects", "top-environment-classes", "top-runners"):
        assert shown_rows(dom, ident)
    conn.close()


def test_the_out_extension_chooses_the_format_and_a_clash_is_an_error(workdir, store, emulator, capsys, monkeypatch):
    monkeypatch.setenv("ONA_API_KEY", API_KEY)
    store.add(recent_records(100, days=2))
    assert cli_main(["sync", "--quiet", "--base-url", emulator.url, "--start", pendulum.now("UTC").subtract(days=3).to_date_string()]) == 0
    assert cli_main(["report", "--quiet", "--out", str(workdir / "chart.png")]) == 0
    assert (workdir / "chart.png").read_bytes().startswith(b"\x89PNG")
    capsys.readouterr()
    assert cli_main(["report", "--format", "html", "--out", str(workdir / "chart2.png")]) == 2
    assert capsys.readouterr().err == (f"ona-usage: error: --format html and --out {workdir / 'chart2.png'} disagree; "
                                       "drop one, or give the file a .html name\n")


def test_models_a_failed_refresh_left_behind_are_rebuilt_by_the_next_run(workdir, monkeypatch):
    configure(monkeypatch)
    store = organisation()
    with EmulatorServer(store, api_key=API_KEY) as emulator:
        sync(emulator)
        built = load_ids(str(workdir / DB))["environment_usage_daily"]
        store.add(make_records(pendulum.now("UTC").subtract(minutes=30), 3, "late"))
        import ona_usage.models as models

        def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("the warehouse ran out of memory")

        with monkeypatch.context() as patch:
            patch.setattr(models, "_model", broken)
            with pytest.raises(RuntimeError):
                sync(emulator)  # the new rows are committed; the models are not rebuilt
        assert load_ids(str(workdir / DB))["environment_usage_daily"] == built
        stale = collect_status(settings.resolve({}))["models"]  # what a monitoring job reads
        assert stale["current"] is False
        assert {stale["tables"]["environment_usage_daily"]["load_id"]} == built
        assert stale["last_refresh_error"]["error"] == "RuntimeError: the warehouse ran out of memory"
        sync(emulator)  # loads nothing new, and still rebuilds the stale models
    assert load_ids(str(workdir / DB))["environment_usage_daily"] != built
    current = collect_status(settings.resolve({}))["models"]
    assert current["current"] is True and current["last_refresh_error"] is None
    assert current["tables"]["environment_usage_daily"]["load_id"] == max(load_ids(str(workdir / DB))["environment_usage_daily"])
    assert current["tables"]["environment_usage_monthly"]["load_id"] is not None
    with duckdb.connect(str(workdir / DB), read_only=True) as conn:
        rows = conn.execute(SELECT.format(dataset="ona")).fetchall()
    assert_daily(rows, expected_daily(store, store.organization_id), store.names)


def test_the_identity_and_the_lists_are_asked_at_once_not_one_round_trip_each(workdir):
    """With 0.3 s a request, a run waits one round trip for the access and identity checks and
    one for the four lists (beside the usage), not six."""
    store = organisation()
    latency = 0.3
    with EmulatorServer(store, api_key=API_KEY, latency=latency) as emulator:
        sync(emulator)
        arrivals: dict[str, list[float]] = defaultdict(list)
        for request in emulator.requests:
            arrivals[request["path"].rsplit("/", 1)[-1]].append(request["at"])
    lists = [arrivals[name][0] for name in ("ListProjects", "ListEnvironmentClasses", "ListRunners", "ListMembers")]
    checks = [arrivals["GetAuthenticatedIdentity"][0], arrivals["ListEnvironmentUsageRecords"][0]]
    assert max(lists) - min(lists) < latency  # all four were asked before the first answer came
    assert max(checks) - min(checks) < latency
