"""Fault injection: the emulator's fault switches, and the real sync riding them out (or failing well).

Three parts: the faults themselves over plain HTTP (fast, no dlt); the sync in-process against an
emulator with faults on, each run checked row for row against the emulator's truth; and the
emulator as a user starts it, `python -m ona_emulator` with fault flags, driven through its
control endpoint.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import duckdb
import httpx
import orjson
import pendulum
import pytest

from ona_emulator import EmulatorServer, UsageStore
from ona_emulator.control import handle as control_handle
from ona_emulator.control import is_loopback
from ona_emulator.faults import FaultConfig
from ona_usage import settings
from ona_usage.pipeline import SyncResult, make_pipeline, read_cursor, run_sync

from conftest import API_KEY, assert_table_equals, make_records, recent_records, run_clis_together, table_rows

DB = "ona_usage.duckdb"
ENDPOINT = "/gitpod.v1.UsageService/ListEnvironmentUsageRecords"
WINDOW = {"filter": {"dateRange": {"startTime": "2026-03-01T00:00:00Z", "endTime": "2026-03-02T00:00:00Z"}}}


# The client's exponential backoff base: a hundredth of a second, so a retry costs no real wait
# here. A server's Retry-After is still honoured in full (see test_retry_after_is_honoured), and
# the default's bound on a dead API is checked with the default itself.
FAST_BACKOFF = 0.01


def sync(emulator: EmulatorServer | str, **options: Any) -> SyncResult:
    url = emulator if isinstance(emulator, str) else emulator.url
    options.setdefault("backoff", FAST_BACKOFF)
    options.setdefault("start_date", pendulum.now("UTC").subtract(days=3).to_date_string())
    options.setdefault("page_size", 10)
    options.setdefault("workers", 2)
    config = settings.resolve({"base_url": url, **options})
    config.api_key = API_KEY
    return run_sync(config)


def cursor_now() -> Any:
    return read_cursor(make_pipeline(settings.resolve({})))


def table_exists(path: Any) -> bool:
    if not path.exists():
        return False
    with duckdb.connect(str(path), read_only=True) as conn:
        return bool(conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'environment_usage_records'"
        ).fetchone()[0])


def day_records(count: int = 40) -> list[dict[str, Any]]:
    """`count` records on 2026-03-01, a second apart: one window's worth for plain HTTP tests."""
    return make_records(pendulum.datetime(2026, 3, 1, 9), count, "r")


@pytest.fixture
def http(emulator: EmulatorServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=emulator.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5) as client:
        yield client


def statuses(client: httpx.Client, n: int) -> list[int]:
    return [client.post(ENDPOINT, json=WINDOW).status_code for _ in range(n)]


def fetch_all(client: httpx.Client, page_size: int, limit: int = 50) -> tuple[list[dict[str, Any]], list[str | None]]:
    records, tokens, token = [], [], None
    for _ in range(limit):
        params = {"pageSize": str(page_size), **({"token": token} if token else {})}
        page = client.post(ENDPOINT, json=WINDOW, params=params).json()
        records += page.get("records", [])
        token = page.get("pagination", {}).get("nextToken")
        tokens.append(token)
        if not token:
            break
    return records, tokens


# -- the faults over plain HTTP ---------------------------------------------------------------


def test_no_faults_means_no_slow_path(store: UsageStore) -> None:
    server = EmulatorServer(store)
    assert server.faults == FaultConfig() and server._injector is None
    server.set_faults(ingestion_lag=30)  # a store setting, not a request fault
    assert server._injector is None and store.ingestion_lag == 30
    server.set_faults(rate_limit_rate=0.1)
    assert server._injector is not None
    server.faults = None
    assert server._injector is None and store.ingestion_lag == 0
    assert EmulatorServer(store, faults={"drop_rate": 0.5})._injector is not None


def test_fault_config_is_validated() -> None:
    for bad in (
        {"rate_limit_rate": 1.5},
        {"rate_limit_rate": 0.6, "error_rate": 0.6},
        {"fail_first_with": "explode"},
        {"fail_first_with": 200},
        {"burst_statuses": []},
        {"retry_after": -1},
        {"fail_first": 1.5},
        {"repeat_token": "yes"},
        {"no_such_fault": 1},
    ):
        with pytest.raises(ValueError):
            FaultConfig.from_mapping(bad)
    config = FaultConfig.from_mapping({"fail_first_with": "429", "burst_statuses": [502]})
    assert config.fail_first_with == 429 and config.burst_statuses == (502,)
    assert FaultConfig.from_mapping({"fail_first_with": "HANG"}).fail_first_with == "hang"
    assert FaultConfig.from_mapping(config.to_dict()) == config  # JSON round trip


def test_first_n_fail_then_bursts_every_nth(store: UsageStore, emulator: EmulatorServer, http: httpx.Client) -> None:
    store.add(day_records(3))
    emulator.set_faults(fail_first=2, fail_first_with=500)
    assert statuses(http, 4) == [500, 500, 200, 200]
    emulator.set_faults(burst_every=4, burst_length=2, burst_statuses=[502, 504])
    assert statuses(http, 10) == [200, 200, 200, 502, 504, 200, 200, 502, 504, 200]
    emulator.set_faults(start_after=1, fail_first=1, fail_first_with=503, max_faults=1)
    assert statuses(http, 3) == [200, 503, 200]
    logged = emulator.requests[-3:]
    assert [r.get("fault") for r in logged] == [None, "503", None]
    assert logged[0]["at"] <= logged[1]["at"] <= logged[2]["at"]


def test_rate_limit_answers_carry_retry_after(store: UsageStore, emulator: EmulatorServer, http: httpx.Client) -> None:
    emulator.set_faults(rate_limit_rate=1.0, retry_after=2.5)
    response = http.post(ENDPOINT, json=WINDOW)
    assert response.status_code == 429 and response.headers["retry-after"] == "2.5"
    assert response.json()["code"] == "resource_exhausted"


def test_added_latency(store: UsageStore, emulator: EmulatorServer, http: httpx.Client) -> None:
    emulator.set_faults(latency=0.15, jitter=0.05)
    started = time.monotonic()
    assert statuses(http, 2) == [200, 200]
    assert 0.3 <= time.monotonic() - started < 2
    assert emulator.stats()["faults"] == {}  # slow is not a fault


def test_random_faults_are_reproducible_with_a_seed(store: UsageStore, http: httpx.Client) -> None:
    def run(seed: int) -> list[str | None]:
        with EmulatorServer(store, api_key=API_KEY, faults={"seed": seed, "error_rate": 0.3, "rate_limit_rate": 0.2}) as server:
            http.base_url = httpx.URL(server.url)
            statuses(http, 30)
            return [r.get("fault") for r in server.requests]

    first = run(11)
    assert first == run(11)
    assert first != run(12)
    assert {"429"} < set(first) and 0 < first.count(None) < 30


def test_truncated_body_is_half_of_the_real_one(store: UsageStore, emulator: EmulatorServer, http: httpx.Client) -> None:
    store.add(day_records(5))
    whole = http.post(ENDPOINT, json=WINDOW).content
    emulator.set_faults(truncate_rate=1.0)
    cut = http.post(ENDPOINT, json=WINDOW)
    assert cut.status_code == 200 and cut.content == whole[: len(whole) // 2]
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(cut.content)


@pytest.mark.parametrize("status", [200, 502])
def test_proxy_html_pages(status: int, store: UsageStore, emulator: EmulatorServer, http: httpx.Client) -> None:
    emulator.set_faults(html_rate=1.0, html_status=status)
    response = http.post(ENDPOINT, json=WINDOW)
    assert response.status_code == status
    assert response.headers["content-type"].startswith("text/html")
    assert response.text.startswith("<html>")


def test_dropped_connection_sends_half_the_promised_body(store: UsageStore, emulator: EmulatorServer, http: httpx.Client) -> None:
    store.add(day_records(20))
    whole = http.post(ENDPOINT, json=WINDOW).content
    emulator.set_faults(drop_rate=1.0)
    with pytest.raises(httpx.RemoteProtocolError):
        http.post(ENDPOINT, json=WINDOW)
    # On the wire: the full Content-Length, half the body, then the end of the stream.
    body = orjson.dumps(WINDOW)
    request = (
        f"POST /api{ENDPOINT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    with socket.create_connection(("127.0.0.1", emulator.port), timeout=5) as conn:
        conn.sendall(request)
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
    head, _, got = received.partition(b"\r\n\r\n")
    assert f"Content-Length: {len(whole)}".encode() in head
    assert got == whole[: len(whole) // 2]
    assert emulator.stats()["faults"] == {"drop": 2}


def test_a_hang_outlasts_the_client_timeout_and_stop_cuts_it_short(store: UsageStore) -> None:
    server = EmulatorServer(store, api_key=API_KEY, faults={"fail_first": 1, "fail_first_with": "hang", "hang_seconds": 30}).start()
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=0.3) as client:
        with pytest.raises(httpx.ReadTimeout):
            client.post(ENDPOINT, json=WINDOW)
        assert client.post(ENDPOINT, json=WINDOW).status_code == 200  # the next one is fine
    started = time.monotonic()
    server.stop()  # wakes the handler still "hanging"
    assert time.monotonic() - started < 5


def test_repeated_token_and_repeated_record(store: UsageStore, emulator: EmulatorServer, http: httpx.Client) -> None:
    store.add(day_records(10))
    truth = store.records()
    emulator.set_faults(repeat_record=True)
    records, _ = fetch_all(http, page_size=4)
    ids = [r["id"] for r in records]
    # pages [0-3], [3-6], [6-9]: each page after the first starts with the last one's last record
    assert ids == ["r-0", "r-1", "r-2", "r-3", "r-3", "r-4", "r-5", "r-6", "r-6", "r-7", "r-8", "r-9"]
    assert {r["id"]: r for r in records} == {r["id"]: r for r in truth}
    emulator.set_faults(repeat_record=True)
    assert [r["id"] for r in fetch_all(http, page_size=1)[0]][:4] == ["r-0", "r-0", "r-1", "r-1"]  # still progresses

    emulator.set_faults(repeat_token=True)
    records, tokens = fetch_all(http, page_size=4, limit=6)
    assert len(tokens) == 6 and tokens[0] is not None and len(set(tokens)) == 1
    assert [r["id"] for r in records[4:]] == ["r-4", "r-5", "r-6", "r-7"] * 5


def test_ingestion_lag_hides_new_records_until_they_are_old_enough(store: UsageStore, emulator: EmulatorServer) -> None:
    store.set_now("2026-03-01T12:00:00Z")
    store.add(make_records(pendulum.datetime(2026, 3, 1, 11), 2, "before"))
    emulator.set_faults(ingestion_lag=600)
    store.add(make_records(pendulum.datetime(2026, 3, 1, 11, 55), 2, "lagged"))
    store.add([dict(make_records(pendulum.datetime(2026, 3, 1, 11, 56), 1, "explicit")[0], _visibleAt="2026-03-01T11:56:00Z")])
    assert [r["id"] for r in store.records()] == ["before-0", "before-1", "explicit-0"]
    store.advance(300)  # 12:05, the first lagged one stopped 11:55:00, visible at 12:05:00
    assert [r["id"] for r in store.records()] == ["before-0", "before-1", "lagged-0", "explicit-0"]
    store.advance(1)
    assert len(store.records()) == 5


def test_control_endpoint(store: UsageStore, emulator: EmulatorServer) -> None:
    store.add(day_records(3))
    with httpx.Client(base_url=emulator.control_url, timeout=5) as control:
        assert control.get("/faults").json() == FaultConfig().to_dict()
        answer = control.post("/faults", json={"fail_first": 1, "retry_after": 0.5, "seed": 4})
        assert answer.status_code == 200 and answer.json()["fail_first"] == 1
        assert control.patch("/faults", json={"burst_every": 9}).json()["fail_first"] == 1
        assert emulator.faults.burst_every == 9
        bad = control.post("/faults", json={"fail_first": -1})
        assert bad.status_code == 400 and "fail_first" in bad.json()["error"]
        assert control.post("/faults", json={"nope": 1}).status_code == 400
        assert control.delete("/faults").json() == FaultConfig().to_dict()
        assert emulator._injector is None

        frozen = control.post("/clock", json={"now": "2026-03-01T09:00:00.5Z"}).json()
        assert frozen == {"now": "2026-03-01T09:00:00.500000Z", "frozen": True}
        assert [r["id"] for r in control.get("/records").json()] == ["r-0"]  # r-1 stops at 09:00:01
        assert control.post("/clock", json={"advance": 60}).json()["now"] == "2026-03-01T09:01:00.500000Z"
        assert len(control.get("/records").json()) == 3
        assert control.post("/clock", json={"now": None}).json()["frozen"] is False
        assert control.post("/clock", json={"now": "yesterday"}).status_code == 400

        added = make_records(pendulum.datetime(2026, 3, 1, 10), 2, "added")
        assert control.post("/records", json={"records": added}).json() == {"records": 5, "upserted": 2}
        assert control.get("/records", params={"start": "2026-03-01T10:00:00Z"}).json() == store.records(start="2026-03-01T10:00:00Z")

        with httpx.Client(base_url=emulator.url, headers={"Authorization": f"Bearer {API_KEY}"}) as api:
            control.post("/faults", json={"fail_first": 1})
            statuses(api, 3)
        stats = control.get("/stats").json()
        assert stats["requests"] == 3 and stats["statuses"] == {"200": 2, "503": 1} and stats["faults"] == {"503": 1}
        assert stats["records"] == 5
        assert control.delete("/stats").json()["requests"] == 3
        assert control.get("/stats").json()["requests"] == 0 and emulator.requests == []

        assert control.get("/nothing").status_code == 404
        assert control.put("/clock", json={}).status_code == 405
        assert control.post("/clock", content=b"{not json").status_code == 400
    # control requests are not API requests: neither logged nor counted
    assert emulator.requests == [] and emulator.stats()["requests"] == 0


def test_control_endpoint_answers_only_on_loopback(store: UsageStore) -> None:
    server = EmulatorServer(store)
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.8.0.1", "::1", "::ffff:127.0.0.1"))
    assert not any(is_loopback(h) for h in ("10.0.0.5", "192.168.1.4", "::ffff:10.0.0.5", "fe80::1", "", "x"))
    status, body, _ = control_handle(server, "POST", "/_control/faults", b'{"drop_rate": 1}', "10.0.0.5")
    assert status == 403 and b"loopback" in body and server._injector is None
    assert control_handle(server, "GET", "/_control/stats", b"", "127.0.0.1")[0] == 200
    off = EmulatorServer(store, control=False)
    assert control_handle(off, "GET", "/_control/stats", b"", "127.0.0.1")[0] == 404


# -- the sync against a misbehaving API --------------------------------------------------------

TRANSIENT_FAULTS = {
    "429-with-retry-after": {"rate_limit_rate": 0.3, "retry_after": 0.2},
    "5xx-bursts": {"burst_every": 5, "burst_length": 2},
    "first-n-failing": {"start_after": 2, "fail_first": 3, "fail_first_with": 503},
    "truncated-json": {"truncate_rate": 0.3},
    "html-from-proxy-200": {"html_rate": 0.3, "html_status": 200},
    "html-from-proxy-502": {"html_rate": 0.3, "html_status": 502},
    "dropped-connection": {"drop_rate": 0.3},
}


@pytest.mark.parametrize("faults", TRANSIENT_FAULTS.values(), ids=TRANSIENT_FAULTS.keys())
def test_each_transient_fault_alone_is_retried_and_the_table_is_exact(faults, workdir, store, emulator):
    store.add(recent_records(60, days=2))
    emulator.set_faults(seed=5, **faults)

    result = sync(emulator, max_attempts=6)

    assert_table_equals(workdir / DB, store.records())
    injected = emulator.stats()["faults"]
    assert sum(injected.values()) > 0, "the fault never fired: pick another seed"
    assert result.retries == sum(injected.values())  # every fault cost exactly one retry
    assert result.requests == len(emulator.requests)


def test_retry_after_is_honoured(workdir, store, emulator):
    store.add(recent_records(30, days=1))
    # the first two requests after the access and identity checks are rate limited
    emulator.set_faults(start_after=2, fail_first=2, fail_first_with=429, retry_after=1.0)

    sync(emulator, max_attempts=4)

    assert_table_equals(workdir / DB, store.records())
    log = emulator.requests
    limited = [i for i, r in enumerate(log) if r["status"] == 429]
    assert len(limited) == 2
    for i in limited:
        retry = next(r for r in log[i + 1 :] if (r["path"], r["body"], r["query"]) == (log[i]["path"], log[i]["body"], log[i]["query"]))
        # the client's own first backoff is at most 1.5 x FAST_BACKOFF: a 1 s gap is the server's Retry-After
        assert retry["at"] - log[i]["at"] >= 1.0


def test_a_hang_longer_than_the_client_timeout_is_retried(workdir, store, emulator):
    store.add(recent_records(30, days=1))
    emulator.set_faults(start_after=2, fail_first=1, fail_first_with="hang", hang_seconds=8)

    started = time.monotonic()
    result = sync(emulator, max_attempts=3, timeout=1.0)

    assert time.monotonic() - started < 8  # it gave up on the hung request, it did not wait it out
    assert_table_equals(workdir / DB, store.records())
    assert result.retries == 1


def test_many_faults_at_a_high_rate_with_a_fixed_seed(workdir, store, emulator):
    store.add(recent_records(100, days=2))
    emulator.set_faults(  # 30% of requests, five kinds of fault
        seed=11,
        rate_limit_rate=0.06,
        retry_after=0.1,
        error_rate=0.06,
        truncate_rate=0.06,
        html_rate=0.06,
        drop_rate=0.06,
    )

    result = sync(emulator, page_size=4, workers=3, max_attempts=10)

    assert_table_equals(workdir / DB, store.records())
    stats = emulator.stats()
    injected = sum(stats["faults"].values())
    assert stats["requests"] > 30 and 0.2 <= injected / stats["requests"] <= 0.45
    assert len(stats["faults"]) >= 4  # most kinds fired
    assert result.retries == injected


@pytest.mark.parametrize(
    "faults, message",
    [
        ({"error_rate": 1.0, "error_statuses": [503]}, r"HTTP 503 .*gave up after 2 attempts"),
        ({"drop_rate": 1.0}, r"connection to 127\.0\.0\.1 failed.*gave up after 2 attempts"),
        ({"rate_limit_rate": 1.0, "retry_after": 1000}, r"rate limiting .*asks to wait 1000s; try again later"),
    ],
    ids=["503-forever", "drops-forever", "429-wait-1000s"],
)
def test_a_server_that_never_recovers_fails_in_bounded_time_and_writes_nothing(faults, message, workdir, store, emulator):
    store.add(recent_records(40, days=2))
    sync(emulator)
    before_rows, before_cursor = table_rows(workdir / DB), cursor_now()
    store.add(make_records(pendulum.now("UTC").subtract(minutes=30), 3, "new"))
    emulator.set_faults(start_after=2, **faults)  # the identity and access checks pass, then nothing does

    started = time.monotonic()
    with pytest.raises(Exception, match=message):
        sync(emulator, lookback="3d", max_attempts=2)

    assert time.monotonic() - started < 30
    assert table_rows(workdir / DB) == before_rows
    assert cursor_now() == before_cursor


def test_a_server_that_never_recovers_fails_in_bounded_time_even_with_the_most_attempts(workdir, store, emulator, monkeypatch):
    store.add(recent_records(20, days=1))
    emulator.set_faults(start_after=2, error_rate=1.0, error_statuses=[503])
    # The client's waits are recorded, not slept: the test takes a second, whatever they add up to.
    waits: list[float] = []
    real_sleep = time.sleep

    def sleep(seconds: float) -> None:
        if threading.current_thread().name.startswith("ona-window"):
            waits.append(seconds)
        else:
            real_sleep(seconds)

    monkeypatch.setattr(time, "sleep", sleep)
    with pytest.raises(Exception, match="gave up after 20 attempts"):
        sync(emulator, workers=1, max_attempts=20, backoff=settings.DEFAULT_BACKOFF)
    per_window = waits[:19]  # one window's 19 waits, then it gives up
    assert len(per_window) == 19
    assert sum(per_window) < 15 * 60, f"a dead API would hold the sync for {sum(per_window) / 3600:.0f} hours"


def test_a_page_token_that_repeats_forever_fails_clearly_and_writes_nothing(workdir, store, emulator):
    store.add(recent_records(40, days=2))
    sync(emulator)
    before_rows, before_cursor = table_rows(workdir / DB), cursor_now()
    store.add(make_records(pendulum.now("UTC").subtract(minutes=30), 12, "new"))  # more than a page
    emulator.set_faults(repeat_token=True)
    emulator.reset_requests()

    started = time.monotonic()
    with pytest.raises(Exception, match="same page token twice"):
        sync(emulator, lookback="3d", page_size=5)

    assert time.monotonic() - started < 30
    assert len(emulator.requests) < 50  # it stopped, rather than paging on
    assert table_rows(workdir / DB) == before_rows
    assert cursor_now() == before_cursor

    emulator.faults = None
    sync(emulator, lookback="3d", page_size=5)
    assert_table_equals(workdir / DB, store.records())


def test_a_record_repeated_on_the_next_page_ends_up_once(workdir, store, emulator):
    store.add(recent_records(60, days=2))
    emulator.set_faults(repeat_record=True)

    result = sync(emulator, page_size=7)

    assert_table_equals(workdir / DB, store.records())
    assert emulator.stats()["faults"]["repeat_record"] >= 5
    assert result.rows_loaded >= 60


def test_ingestion_lag_shorter_than_the_lookback_is_caught_by_the_next_run(workdir, store, emulator):
    store.add(recent_records(40, days=2))
    emulator.set_faults(ingestion_lag=30 * 60)  # records show up 30 min after they stop
    now = pendulum.now("UTC")
    late = make_records(now.subtract(minutes=20), 3, "late") + make_records(now.subtract(minutes=5), 2, "later")
    store.add(late)
    assert not {r["id"] for r in store.records()} & {r["id"] for r in late}

    sync(emulator, lookback="2h")
    assert_table_equals(workdir / DB, store.records())

    store.advance(30 * 60)  # half an hour on, at the emulator: all of them visible
    store.add(make_records(now.subtract(minutes=40), 1, "lagged-but-visible"))
    assert {r["id"] for r in late} <= {r["id"] for r in store.records()}
    sync(emulator, lookback="2h")

    assert_table_equals(workdir / DB, store.records())


def test_a_moving_now_and_records_that_change_between_runs(workdir, store, emulator):
    store.add(recent_records(40, days=2))
    now = pendulum.now("UTC")
    recent = make_records(now.subtract(minutes=50), 4, "recent")
    store.add(recent)
    store.set_now(now.subtract(hours=1))  # the API's clock is an hour behind: "recent" has not stopped yet

    sync(emulator, lookback="2h")
    assert_table_equals(workdir / DB, store.records())
    assert not any(row[0].startswith("recent") for row in table_rows(workdir / DB))

    store.set_now(None)
    changed = dict(recent[0], userId="user-2", environmentClassId="class-9")
    store.upsert([changed])
    sync(emulator, lookback="2h")

    assert_table_equals(workdir / DB, store.records())
    rows = {row[0]: row for row in table_rows(workdir / DB)}
    assert rows["recent-0"][7] == "user-2" and rows["recent-0"][3] == "class-9"


# -- the emulator from the command line ---------------------------------------------------------


class EmulatorProcess:
    def __init__(self, *flags: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ona_emulator", "--port", "0", "--api-key", API_KEY,
             "--records", "150", "--days", "3", *flags],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        timer = threading.Timer(30, self.proc.kill)  # should it never get to print its banner
        timer.start()
        lines: list[str] = []
        try:
            while (line := self.proc.stdout.readline()) and not lines[-1:] == ["Control"]:
                lines.append(line)
                if line.startswith("Control endpoint"):
                    break
        finally:
            timer.cancel()
        self.output = "".join(lines)
        match = re.search(r"on (http://127\.0\.0\.1:\d+/api) ", self.output)
        assert match, self.output + self.proc.stderr.read()
        self.url = match.group(1)
        self.control = httpx.Client(base_url=self.url.removesuffix("/api") + "/_control", timeout=10)

    def freeze_clock(self) -> str:
        """Stop the API's clock a minute ago, so records stopping meanwhile cannot race the truth."""
        now = pendulum.now("UTC").subtract(minutes=1).to_iso8601_string()
        return self.control.post("/clock", json={"now": now}).json()["now"]

    def stop(self) -> None:
        self.control.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def emulator_process(request) -> Iterator[EmulatorProcess]:
    process = EmulatorProcess(*getattr(request, "param", ()))
    yield process
    process.stop()


@pytest.mark.parametrize(
    "emulator_process",
    [("--fault-seed", "3", "--fail-first", "2", "--fail-first-with", "502", "--rate-limit-rate", "0.1",
      "--retry-after", "0.1", "--truncate-rate", "0.05", "--drop-rate", "0.05")],
    indirect=True,
)
def test_cli_fault_flags_are_ridden_out(workdir, emulator_process):
    assert "Injecting faults: seed=3, fail_first=2, fail_first_with=502" in emulator_process.output
    faults = emulator_process.control.get("/faults").json()
    assert faults["rate_limit_rate"] == 0.1 and faults["drop_rate"] == 0.05 and faults["retry_after"] == 0.1
    emulator_process.freeze_clock()

    result = sync(emulator_process.url, start_date=pendulum.now("UTC").subtract(days=4).to_date_string(), max_attempts=8)

    truth = emulator_process.control.get("/records").json()
    assert 100 < len(truth) < 200
    assert_table_equals(workdir / DB, truth)
    stats = emulator_process.control.get("/stats").json()
    assert stats["statuses"]["502"] >= 2 and stats["faults"]["502"] == 2
    assert result.retries == sum(stats["faults"].values()) and result.requests == stats["requests"]


def test_cli_emulator_driven_through_the_control_endpoint(workdir, emulator_process):
    control = emulator_process.control
    start = pendulum.now("UTC").subtract(days=4).to_date_string()

    # paging that never ends: a clear failure, nothing written
    control.post("/faults", json={"repeat_token": True})
    with pytest.raises(Exception, match="same page token twice"):
        sync(emulator_process.url, start_date=start, page_size=5)
    assert cursor_now() is None and not table_exists(workdir / DB)

    # the API's clock a day behind: only what had stopped by then
    control.delete("/faults")
    day_ago = pendulum.now("UTC").subtract(days=1)
    assert control.post("/clock", json={"now": day_ago.to_iso8601_string()}).json()["frozen"] is True
    sync(emulator_process.url, start_date=start)
    earlier = control.get("/records").json()
    assert_table_equals(workdir / DB, earlier)

    # a minute ago (not real time: records stopping meanwhile would race the truth), with 5xx
    # bursts; a lookback of two days catches up on the day the clock skipped
    emulator_process.freeze_clock()
    control.post("/faults", json={"burst_every": 5, "burst_length": 2})
    control.delete("/stats")
    sync(emulator_process.url, lookback="2d", max_attempts=6)  # 40% of requests fail: 4 in a row happened

    truth = control.get("/records").json()
    assert len(truth) > len(earlier)
    assert_table_equals(workdir / DB, truth)
    stats = control.get("/stats").json()
    assert sum(stats["faults"].values()) >= 2 and set(stats["faults"]) <= {"500", "502", "503", "504"}


def test_ona_usage_emulator_has_the_fault_flags_and_rejects_bad_ones():
    help_text, too_much, bad_rate = run_clis_together(  # three processes, side by side
        ["emulator", "--help"],
        ["emulator", "--port", "0", "--records", "5", "--error-rate", "0.7", "--drop-rate", "0.7"],
        ["emulator", "--rate-limit-rate", "2"],
    )
    assert help_text.returncode == 0
    for flag in ("--rate-limit-rate", "--retry-after", "--burst-every", "--fail-first", "--truncate-rate",
                 "--html-rate", "--drop-rate", "--hang-seconds", "--repeat-token", "--repeat-record",
                 "--ingestion-lag", "--no-control"):
        assert flag in help_text.stdout
    assert too_much.returncode == 2 and "add up to 1.4" in too_much.stderr
    assert bad_rate.returncode == 2 and "between 0 and 1" in bad_rate.stderr
