"""The Ona API emulator over real HTTP: paging, boundaries, errors, visibility, and the official SDK."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from ona_emulator import EmulatorServer, UsageStore, format_rfc3339, generate_records, parse_rfc3339_ns

KEY = "test-key"
ENDPOINT = "/gitpod.v1.UsageService/ListEnvironmentUsageRecords"
START, END = "2026-03-01T00:00:00Z", "2026-03-11T00:00:00Z"


def record(record_id: str, stopped_at: str, **fields: Any) -> dict[str, Any]:
    base = {
        "id": record_id,
        "createdAt": "2026-03-01T09:00:00Z",
        "stoppedAt": stopped_at,
        "environmentClassId": "class-1",
        "environmentId": f"env-{record_id}",
        "projectId": "project-a",
        "runnerId": "runner-1",
        "userId": "user-1",
    }
    return base | fields


def window(start: str = START, end: str = END, **filter_: Any) -> dict[str, Any]:
    return {"filter": {"dateRange": {"startTime": start, "endTime": end}, **filter_}}


@pytest.fixture
def store() -> UsageStore:
    return UsageStore(generate_records(7, START, END, 1_500))


@pytest.fixture
def server(store: UsageStore) -> Iterator[EmulatorServer]:
    with EmulatorServer(store, api_key=KEY) as running:
        yield running


@pytest.fixture
def client(server: EmulatorServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}) as http:
        yield http


def fetch_all(client: httpx.Client, body: dict[str, Any], token_in: str = "query") -> list[dict[str, Any]]:
    """Page through a query the way a client would, passing the token in the query or the body."""
    records, token = [], None
    for _ in range(1_000):
        request = {**body, "pagination": {**body.get("pagination", {})}}
        params = {}
        if token and token_in == "query":
            params["token"] = token
        elif token:
            request["pagination"]["token"] = token
        response = client.post(ENDPOINT, json=request, params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        records += page.get("records", [])
        token = page.get("pagination", {}).get("nextToken")
        if not token:
            return records
    raise AssertionError("paging did not end")


def test_paging_returns_exactly_the_store_truth(store: UsageStore, client: httpx.Client) -> None:
    start, end = "2026-03-02T00:00:00Z", "2026-03-05T12:00:00Z"
    got = fetch_all(client, window(start, end) | {"pagination": {"pageSize": 100}})
    truth = store.records(start, end)
    assert got == truth
    assert len({r["id"] for r in got}) == len(got) > 300
    stops = [parse_rfc3339_ns(r["stoppedAt"]) for r in got]
    assert stops == sorted(stops)
    assert parse_rfc3339_ns(start) <= stops[0] and stops[-1] < parse_rfc3339_ns(end)


@pytest.mark.parametrize("token_in", ["query", "body"])
def test_token_in_query_or_body(store: UsageStore, client: httpx.Client, token_in: str) -> None:
    got = fetch_all(client, window() | {"pagination": {"pageSize": 99}}, token_in=token_in)
    assert got == store.records(START, END)


def test_page_size_in_query_wins_and_defaults_to_25(client: httpx.Client) -> None:
    assert len(client.post(ENDPOINT, json=window()).json()["records"]) == 25
    body = window() | {"pagination": {"pageSize": 0}}
    assert len(client.post(ENDPOINT, json=body).json()["records"]) == 25
    body = window() | {"pagination": {"pageSize": 50}}
    assert len(client.post(ENDPOINT, json=body, params={"pageSize": 7}).json()["records"]) == 7


def test_window_is_half_open_on_real_instants(client: httpx.Client) -> None:
    store = UsageStore(
        [
            record("a", "2026-03-01T10:00:07Z"),
            record("b", "2026-03-01T10:00:07.5Z"),
            record("c", "2026-03-01T10:00:07.500000001Z"),
            record("d", "2026-03-01T10:00:08Z"),
        ]
    )
    with EmulatorServer(store, api_key=KEY) as server:
        def ids(start: str, end: str) -> list[str]:
            response = client.post(f"{server.url}{ENDPOINT}", json=window(start, end))
            assert response.status_code == 200, response.text
            assert [r["id"] for r in store.records(start, end)] == [r["id"] for r in response.json().get("records", [])]
            return [r["id"] for r in response.json().get("records", [])]

        assert ids("2026-03-01T10:00:07Z", "2026-03-01T10:00:07.5Z") == ["a"]
        assert ids("2026-03-01T10:00:07.5Z", "2026-03-01T10:00:08Z") == ["b", "c"]
        assert ids("2026-03-01T10:00:07.500000001Z", "2026-03-01T10:00:08.000Z") == ["c"]
        assert ids("2026-03-01T11:00:07.000+01:00", "2026-03-01T11:00:08.000000001+01:00") == ["a", "b", "c", "d"]
        assert ids("2026-03-01T10:00:08Z", "2026-03-01T10:00:08Z") == []


def test_ties_on_stopped_at_are_ordered_by_id_across_pages(client: httpx.Client) -> None:
    store = UsageStore([record(f"r{i:02d}", "2026-03-01T10:00:00Z") for i in reversed(range(10))])
    with EmulatorServer(store, api_key=KEY) as server:
        client.base_url = httpx.URL(server.url)
        got = fetch_all(client, window() | {"pagination": {"pageSize": 3}})
    assert [r["id"] for r in got] == [f"r{i:02d}" for i in range(10)]


def test_project_filter(store: UsageStore, client: httpx.Client) -> None:
    project = store.records()[0].get("projectId") or store.records()[1]["projectId"]
    got = fetch_all(client, window(projectId=project) | {"pagination": {"pageSize": 100}})
    assert got == store.records(START, END, project_id=project)
    assert got and all(r["projectId"] == project for r in got)
    assert len(got) < len(store.records(START, END))


def test_empty_and_private_fields_are_omitted(client: httpx.Client) -> None:
    store = UsageStore(
        [
            record("no-project", "2026-03-01T10:00:00Z", projectId=None),
            record("blank-runner", "2026-03-01T11:00:00Z", runnerId="", _visibleAt="2026-03-01T11:00:00Z"),
        ]
    )
    with EmulatorServer(store, api_key=KEY) as server:
        response = client.post(f"{server.url}{ENDPOINT}", json=window())
    first, second = response.json()["records"]
    assert "projectId" not in first and first["runnerId"] == "runner-1"
    assert "runnerId" not in second and "_visibleAt" not in second
    assert "pagination" not in response.json()


def test_no_records_is_an_empty_object(client: httpx.Client) -> None:
    response = client.post(ENDPOINT, json=window("2020-01-01T00:00:00Z", "2020-01-02T00:00:00Z"))
    assert response.status_code == 200
    assert response.content == b"{}"
    assert response.headers["content-type"] == "application/json"


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key", f"Basic {KEY}", KEY])
def test_bad_or_missing_key_is_401(server: EmulatorServer, authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    response = httpx.post(f"{server.url}{ENDPOINT}", json=window(), headers=headers)
    assert response.status_code == 401
    assert response.json() == {"code": "unauthenticated", "message": "invalid or missing API key"}
    assert "wrong-key" not in response.text and KEY not in response.text
    assert all(r["headers"].get("authorization") in (None, "<redacted>") for r in server.requests)


@pytest.mark.parametrize(
    "body",
    [
        window() | {"pagination": {"pageSize": 101}},
        window() | {"pagination": {"pageSize": -1}},
        window() | {"pagination": {"pageSize": "ten"}},
        window() | {"pagination": {"token": "not-a-token"}},
        {},
        {"filter": {"projectId": "p"}},
        {"filter": {"dateRange": {"startTime": START}}},
        window("2026-03-01", END),
        window("2026-03-01T25:00:00Z", END),
        window(END, START),
        [1, 2],
    ],
)
def test_invalid_requests_are_400(client: httpx.Client, body: Any) -> None:
    response = client.post(ENDPOINT, json=body)
    assert response.status_code == 400, response.text
    assert response.json()["code"] == "invalid_argument"


def test_unparsable_or_absent_body_and_foreign_tokens_are_400(client: httpx.Client) -> None:
    assert client.post(ENDPOINT, content=b"{nope").status_code == 400
    assert client.post(ENDPOINT).json()["code"] == "invalid_argument"
    token = client.post(ENDPOINT, json=window()).json()["pagination"]["nextToken"]
    other = window("2026-03-02T00:00:00Z", END)
    response = client.post(ENDPOINT, json=other, params={"token": token})
    assert response.status_code == 400 and response.json()["code"] == "invalid_argument"
    assert client.post(ENDPOINT, json=window(), params={"pageSize": "101"}).status_code == 400


def test_unknown_paths_and_methods(client: httpx.Client, server: EmulatorServer) -> None:
    response = client.post("/gitpod.v1.UsageService/Nope", json={})
    assert response.status_code == 404 and response.json()["code"] == "unimplemented"
    response = client.get(ENDPOINT)
    assert response.status_code == 405 and "code" in response.json()
    root = httpx.post(
        f"http://127.0.0.1:{server.port}{ENDPOINT}", json=window(), headers={"Authorization": f"Bearer {KEY}"}
    )
    assert root.status_code == 200


def test_records_not_yet_visible_are_hidden(client: httpx.Client) -> None:
    store = UsageStore(
        [record(f"r{i}", f"2026-03-01T10:00:0{i}Z") for i in range(8)]
        + [record("lagged", "2026-03-01T10:00:03.5Z", _visibleAt="2026-03-01T12:00:00Z")]
        + [record("future", "2026-03-01T11:30:00Z")]
    )
    store.set_now("2026-03-01T11:00:00Z")
    with EmulatorServer(store, api_key=KEY) as server:
        client.base_url = httpx.URL(server.url)
        got = fetch_all(client, window() | {"pagination": {"pageSize": 3}})
        assert [r["id"] for r in got] == [f"r{i}" for i in range(8)] == [r["id"] for r in store.records()]
        store.advance(45 * 60)
        assert [r["id"] for r in fetch_all(client, window())][-1] == "future"
        assert "lagged" not in {r["id"] for r in fetch_all(client, window())}
        store.set_now("2026-03-01T12:00:00Z")
        got = fetch_all(client, window() | {"pagination": {"pageSize": 2}})
    assert [r["id"] for r in got] == ["r0", "r1", "r2", "r3", "lagged", "r4", "r5", "r6", "r7", "future"]
    assert len(store.records(visible_only=False)) == len(store) == 10


def test_upsert_and_delete_change_what_is_served(client: httpx.Client) -> None:
    store = UsageStore([record("a", "2026-03-01T10:00:00Z"), record("b", "2026-03-02T10:00:00Z")])
    with EmulatorServer(store, api_key=KEY) as server:
        client.base_url = httpx.URL(server.url)
        store.upsert([record("a", "2026-03-03T10:00:00.123Z", userId="user-2")])
        store.delete(["b"])
        assert fetch_all(client, window()) == [record("a", "2026-03-03T10:00:00.123Z", userId="user-2")]
    with pytest.raises(ValueError):
        store.add([record("a", "2026-03-01T10:00:00Z")])


def test_fault_hook_and_request_log(client: httpx.Client, server: EmulatorServer) -> None:
    server.fault = lambda request: (429, b'{"code":"resource_exhausted"}', {}) if request["query"].get("token") else None
    token = client.post(ENDPOINT, json=window()).json()["pagination"]["nextToken"]
    assert client.post(ENDPOINT, json=window(), params={"token": token}).status_code == 429
    first, second = server.requests
    assert first["status"] == 200 and second["status"] == 429
    assert first["body"] == window() and second["query"] == {"token": token}
    assert first["headers"]["authorization"] == "<redacted>"
    server.reset_requests()
    assert server.requests == []


def test_official_sdk_pages_through_everything(store: UsageStore, server: EmulatorServer) -> None:
    from gitpod import Gitpod

    with Gitpod(bearer_token=KEY, base_url=server.url, max_retries=0) as sdk:
        pager = sdk.usage.list_environment_runtime_records(
            filter={"date_range": {"start_time": START, "end_time": END}},
            pagination={"page_size": 100},
        )
        got = [item.to_dict() for item in pager]
    truth = store.records(START, END)
    assert got == truth and len(got) == 1_500
    assert [r["query"].get("token") is not None for r in server.requests].count(False) == 1
    assert len(server.requests) == 15


def test_generate_records_is_deterministic_and_plausible() -> None:
    assert generate_records(3, START, END, 500) == generate_records(3, START, END, 500)
    assert generate_records(3, START, END, 500) != generate_records(4, START, END, 500)
    started = time.perf_counter()
    records = generate_records(11, "2026-01-01T00:00:00Z", "2026-04-01T00:00:00Z", 100_000)
    assert time.perf_counter() - started < 3
    start, end = parse_rfc3339_ns("2026-01-01T00:00:00Z"), parse_rfc3339_ns("2026-04-01T00:00:00Z")
    stops = [parse_rfc3339_ns(r["stoppedAt"]) for r in records]
    creates = [parse_rfc3339_ns(r["createdAt"]) for r in records]
    assert all(start <= s < end for s in stops) and all(c < s for c, s in zip(creates, stops))
    assert len({r["id"] for r in records}) == len(records)
    assert 0.03 < sum("projectId" not in r for r in records) / len(records) < 0.07
    assert len({r["projectId"] for r in records if "projectId" in r}) == 6
    assert len({r["userId"] for r in records}) == 25
    day = 86_400 * 10**9
    crossing = sum(c // day != s // day for c, s in zip(creates, stops))
    assert crossing > len(records) * 0.05
    fraction_digits = {len(r["stoppedAt"].partition(".")[2]) - 1 if "." in r["stoppedAt"] else 0 for r in records}
    assert fraction_digits == {0, 3, 6, 9}
    runtimes = [s - c for c, s in zip(creates, stops)]
    assert min(runtimes) >= 2 * 60 * 10**9 and max(runtimes) <= 10 * 3600 * 10**9 + 10**9


def test_rfc3339_helpers() -> None:
    ns = parse_rfc3339_ns("2026-03-01T10:00:07.5Z")
    assert ns == parse_rfc3339_ns("2026-03-01T11:00:07.500000000+01:00") == 1772359207500000000
    assert parse_rfc3339_ns("1970-01-01T00:00:00Z") == 0
    assert format_rfc3339(ns, 0) == "2026-03-01T10:00:07Z"
    assert format_rfc3339(ns, 3) == "2026-03-01T10:00:07.500Z"
    assert format_rfc3339(ns + 123456, 9) == "2026-03-01T10:00:07.500123456Z"
    for bad in ["2026-03-01", "2026-03-01T10:00:07", "2026-02-30T00:00:00Z", "2026-03-01T10:00:60Z", "x"]:
        with pytest.raises(ValueError):
            parse_rfc3339_ns(bad)
