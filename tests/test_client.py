"""UsageClient: request shape, paging, retries, errors, redirects, URL checks, key hygiene,
and the request it sends compared with the official SDK's, against the emulator."""

from __future__ import annotations

import email.utils
import logging
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import orjson
import pendulum
import pytest

from ona_emulator import EmulatorServer, UsageStore, generate_records
from ona_usage.client import (
    LIST_USAGE_PATH,
    MAX_RETRY_AFTER,
    OnaApiError,
    TransientApiError,
    UsageClient,
    check_base_url,
)
from ona_usage.windows import Window

KEY = "sk-SECRET-123"
BASE = "https://ona.test/api"
ENDPOINT_URL = BASE + LIST_USAGE_PATH
WINDOW = Window(pendulum.datetime(2025, 3, 1, tz="UTC"), pendulum.datetime(2025, 3, 2, tz="UTC"))
START_TEXT, END_TEXT = "2025-03-01T00:00:00Z", "2025-03-02T00:00:00Z"

Handler = Callable[[httpx.Request], httpx.Response]


# -- helpers -----------------------------------------------------------------------------------


def rec(n: int) -> dict[str, Any]:
    return {"id": f"r{n}", "stoppedAt": "2025-03-01T10:00:00Z"}


class FakeApi:
    """A MockTransport handler that answers from a script and logs every request it sees."""

    def __init__(self, *answers: httpx.Response | BaseException | Handler) -> None:
        self.answers = list(answers)
        self.seen: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        answer = self.answers[min(len(self.seen), len(self.answers)) - 1]  # the last one repeats
        if isinstance(answer, BaseException):
            raise answer
        if callable(answer) and not isinstance(answer, httpx.Response):
            return answer(request)
        return answer

    @property
    def bodies(self) -> list[dict[str, Any]]:
        return [orjson.loads(r.content) for r in self.seen]

    @property
    def queries(self) -> list[dict[str, str]]:
        return [dict(r.url.params) for r in self.seen]


def ok(records: list[dict[str, Any]] | None = None, token: str | None = None) -> httpx.Response:
    page: dict[str, Any] = {}
    if records:
        page["records"] = records
    if token:
        page["pagination"] = {"nextToken": token}
    return httpx.Response(200, content=orjson.dumps(page), headers={"Content-Type": "application/json"})


def connect_error(status: int, code: str, message: str, **headers: str) -> httpx.Response:
    body = orjson.dumps({"code": code, "message": message})
    return httpx.Response(status, content=body, headers={"Content-Type": "application/json", **headers})


def make_client(api: FakeApi, key: str = KEY, **kwargs: Any) -> UsageClient:
    kwargs.setdefault("backoff", 0.01)
    return UsageClient(key, BASE, transport=httpx.MockTransport(api), **kwargs)


def fetch(client: UsageClient, project_id: str | None = None) -> list[list[dict[str, Any]]]:
    return list(client.pages(WINDOW, project_id))


def assert_key_hidden(exc: BaseException, key: str = KEY) -> None:
    """Not in str(), repr(), nor anywhere in the printed traceback with its chained exceptions."""
    assert key not in str(exc)
    assert key not in repr(exc)
    assert key not in "".join(traceback.format_exception(exc))
    inner = exc.__cause__ or exc.__context__
    while inner is not None:
        assert key not in str(inner) and key not in repr(inner)
        inner = inner.__cause__ or inner.__context__


# -- 1. request shape and paging ---------------------------------------------------------------


def test_pages_follow_next_token_and_send_token_and_page_size_in_query() -> None:
    api = FakeApi(ok([rec(1), rec(2)], "tok-1"), ok([rec(3)], "tok-2"), ok([rec(4)]))
    with make_client(api, page_size=2) as client:
        pages = fetch(client)
    assert pages == [[rec(1), rec(2)], [rec(3)], [rec(4)]]
    assert api.queries == [{"pageSize": "2"}, {"pageSize": "2", "token": "tok-1"}, {"pageSize": "2", "token": "tok-2"}]
    expected_body = {
        "filter": {"dateRange": {"startTime": START_TEXT, "endTime": END_TEXT}},
        "pagination": {"pageSize": 2},
    }
    assert api.bodies == [expected_body] * 3
    assert all(r.method == "POST" and str(r.url.copy_with(query=None)) == ENDPOINT_URL for r in api.seen)
    assert client.requests == 3 and client.retries == 0


@pytest.mark.parametrize(
    "last_page",
    [
        b"{}",
        b'{"records":[{"id":"r9","stoppedAt":"2025-03-01T10:00:00Z"}]}',
        b'{"records":[{"id":"r9","stoppedAt":"2025-03-01T10:00:00Z"}],"pagination":{}}',
        b'{"records":[{"id":"r9","stoppedAt":"2025-03-01T10:00:00Z"}],"pagination":{"nextToken":""}}',
        b'{"records":[],"pagination":{"nextToken":null}}',
        b'{"records":null,"pagination":null}',
    ],
    ids=["empty-object", "no-pagination", "empty-pagination", "empty-token", "null-token", "nulls"],
)
def test_paging_stops_when_next_token_is_empty_or_missing(last_page: bytes) -> None:
    api = FakeApi(ok([rec(1)], "tok-1"), httpx.Response(200, content=last_page))
    with make_client(api) as client:
        pages = fetch(client)
    expected_last = orjson.loads(last_page).get("records") or []
    assert pages == [[rec(1)], expected_last]
    assert len(api.seen) == 2 and client.requests == 2


def test_single_empty_page() -> None:
    api = FakeApi(httpx.Response(200, content=b"{}"))
    with make_client(api) as client:
        assert fetch(client) == [[]]
    assert len(api.seen) == 1 and api.queries == [{"pageSize": "100"}]


def test_request_body_and_headers() -> None:
    window = Window(
        pendulum.datetime(2025, 3, 1, 6, 30, tz="Europe/Berlin"),
        pendulum.datetime(2025, 3, 1, 12, 0, 0, 250_000, tz="UTC"),
    )
    api = FakeApi(ok())
    with make_client(api, page_size=50) as client:
        assert list(client.pages(window, "project-7")) == [[]]
        assert list(client.pages(window)) == [[]]
    with_project, without_project = api.bodies
    assert with_project == {
        "filter": {
            "dateRange": {"startTime": "2025-03-01T05:30:00Z", "endTime": "2025-03-01T12:00:00.250000Z"},
            "projectId": "project-7",
        },
        "pagination": {"pageSize": 50},
    }
    assert without_project == {
        "filter": {"dateRange": {"startTime": "2025-03-01T05:30:00Z", "endTime": "2025-03-01T12:00:00.250000Z"}},
        "pagination": {"pageSize": 50},
    }
    for request in api.seen:
        assert request.headers["Authorization"] == f"Bearer {KEY}"
        assert request.headers["Content-Type"] == "application/json"
        assert request.headers["Accept"] == "application/json"
        assert request.url.params["pageSize"] == "50"


def test_repeated_token_raises_instead_of_looping() -> None:
    api = FakeApi(ok([rec(1)], "same"))  # every page says: next is "same"
    with make_client(api) as client:
        with pytest.raises(OnaApiError, match="same page token twice") as caught:
            fetch(client)
    assert not isinstance(caught.value, TransientApiError)
    assert len(api.seen) == 2 and api.queries[1] == {"pageSize": "100", "token": "same"}
    assert_key_hidden(caught.value)


def test_token_cycle_raises_with_bounded_requests() -> None:
    api = FakeApi(ok([rec(1)], "a"), ok([rec(2)], "b"), ok([rec(3)], "a"), ok([rec(4)]))
    with make_client(api) as client:
        with pytest.raises(OnaApiError, match="same page token twice"):
            fetch(client)
    assert len(api.seen) == 3


# -- 2. retries --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "at_least"),
    [({"Retry-After": "0.2"}, 0.2), ({"retry-after-ms": "250"}, 0.25)],
    ids=["retry-after", "retry-after-ms"],
)
def test_429_waits_at_least_retry_after(headers: dict[str, str], at_least: float) -> None:
    api = FakeApi(connect_error(429, "resource_exhausted", "slow down", **headers), ok([rec(1)]))
    with make_client(api) as client:
        started = time.monotonic()
        pages = fetch(client)
        waited = time.monotonic() - started
    assert pages == [[rec(1)]]
    assert waited >= at_least
    assert len(api.seen) == 2 and client.requests == 2 and client.retries == 1
    assert api.bodies[0] == api.bodies[1] and api.queries[0] == api.queries[1]


def test_429_halves_how_many_windows_run_at_once_and_5xx_does_not() -> None:
    api = FakeApi(
        connect_error(429, "resource_exhausted", "slow down", **{"Retry-After": "0"}),
        httpx.Response(503),
        connect_error(429, "resource_exhausted", "slow down", **{"Retry-After": "0"}),
        ok([rec(1)]),
    )
    with make_client(api, concurrency=16) as client:
        assert (client.limit.limit, client.limit.ceiling) == (4, 16)  # it starts at 4
        assert fetch(client) == [[rec(1)]]
        # 4 -> 2 -> 1: each 429 halves what runs at once; the 503 is only retried.
        assert (client.limit.limit, client.limit.ceiling) == (1, 1)
        assert client.retries == 3


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_retryable_statuses_are_retried(status: int) -> None:
    api = FakeApi(httpx.Response(status, content=b"busy"), ok([rec(1)], "t"), httpx.Response(status), ok([rec(2)]))
    with make_client(api) as client:
        assert fetch(client) == [[rec(1)], [rec(2)]]
    assert len(api.seen) == 4 and client.retries == 2
    assert [q.get("token") for q in api.queries] == [None, None, "t", "t"]


@pytest.mark.parametrize(
    "error",
    [httpx.ConnectError("connection refused"), httpx.ReadTimeout("read timed out"), httpx.RemoteProtocolError("eof")],
    ids=["connect-error", "read-timeout", "remote-protocol-error"],
)
def test_transport_errors_are_retried(error: Exception) -> None:
    api = FakeApi(error, error, ok([rec(1)]))
    with make_client(api) as client:
        assert fetch(client) == [[rec(1)]]
    assert len(api.seen) == 3 and client.retries == 2


@pytest.mark.parametrize(
    "body",
    [b"<html><body>Bad gateway</body></html>", b'{"records":[{"id":"r1"', b"", b"[1, 2]", b'"text"'],
    ids=["html", "truncated-json", "empty", "json-array", "json-string"],
)
def test_200_with_a_body_that_is_not_a_json_object_is_retried(body: bytes) -> None:
    api = FakeApi(httpx.Response(200, content=body, headers={"Content-Type": "text/html"}), ok([rec(1)]))
    with make_client(api) as client:
        assert fetch(client) == [[rec(1)]]
    assert len(api.seen) == 2 and client.retries == 1


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(503, content=b'{"code":"unavailable","message":"down"}'),
        httpx.Response(200, content=b"<html>maintenance</html>"),
        httpx.ConnectError("connection refused"),
        httpx.ReadTimeout("read timed out"),
    ],
    ids=["503", "html-200", "connect-error", "read-timeout"],
)
@pytest.mark.parametrize("max_attempts", [1, 3])
def test_gives_up_after_max_attempts(answer: httpx.Response | Exception, max_attempts: int) -> None:
    api = FakeApi(answer)
    with make_client(api, max_attempts=max_attempts) as client:
        with pytest.raises(TransientApiError) as caught:
            fetch(client)
    message = str(caught.value)
    assert f"gave up after {max_attempts} attempts" in message
    assert str(WINDOW) in message
    assert len(api.seen) == max_attempts == client.requests
    assert client.retries == max_attempts - 1
    if isinstance(answer, httpx.Response) and answer.status_code == 503:
        assert caught.value.status == 503 and caught.value.code == "unavailable"
    assert_key_hidden(caught.value)


@pytest.mark.parametrize(
    "headers",
    [
        {"Retry-After": str(int(MAX_RETRY_AFTER) + 1)},
        {"Retry-After": "86400"},
        {"retry-after-ms": str(int(MAX_RETRY_AFTER * 1000) + 1000)},
        {"Retry-After": email.utils.format_datetime(datetime.now(timezone.utc) + timedelta(hours=2), usegmt=True)},
    ],
    ids=["seconds-just-over", "a-day", "milliseconds", "http-date"],
)
@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_over_the_cap_fails_at_once(headers: dict[str, str], status: int) -> None:
    api = FakeApi(httpx.Response(status, headers=headers), ok([rec(1)]))
    with make_client(api) as client:
        with pytest.raises(OnaApiError) as caught:
            fetch(client)
    assert not isinstance(caught.value, TransientApiError)
    assert caught.value.status == status
    assert "try again later" in str(caught.value)
    assert len(api.seen) == 1 and client.retries == 0


def test_retry_after_at_the_cap_is_still_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    """Exactly MAX_RETRY_AFTER is allowed; the sleep is intercepted so the test does not wait."""
    slept: list[float] = []
    monkeypatch.setattr("tenacity.nap.time.sleep", slept.append)
    api = FakeApi(httpx.Response(429, headers={"Retry-After": str(int(MAX_RETRY_AFTER))}), ok([rec(1)]))
    with make_client(api) as client:
        assert fetch(client) == [[rec(1)]]
    # tenacity's wait; a second, shorter entry is the client's shared 429 pause, which in real
    # time has already passed when the retry goes out (the sleeps here return at once)
    assert slept[0] == MAX_RETRY_AFTER and all(s <= MAX_RETRY_AFTER for s in slept) and len(api.seen) == 2


@pytest.mark.parametrize(
    ("status", "code"),
    [(400, "invalid_argument"), (404, "not_found"), (404, "unimplemented"), (501, None), (403, "permission_denied"), (409, None)],
)
def test_client_errors_are_not_retried(status: int, code: str | None) -> None:
    body = orjson.dumps({"code": code, "message": "no"}) if code else b"nope"
    api = FakeApi(httpx.Response(status, content=body), ok([rec(1)]))
    with make_client(api) as client:
        with pytest.raises(OnaApiError) as caught:
            fetch(client)
    assert not isinstance(caught.value, TransientApiError)
    assert caught.value.status == status and caught.value.code == code
    assert len(api.seen) == 1 and client.requests == 1 and client.retries == 0
    assert_key_hidden(caught.value)


def test_401_says_the_key_was_rejected_in_one_line_without_the_key() -> None:
    api = FakeApi(connect_error(401, "unauthenticated", "invalid or missing API key"))
    with make_client(api) as client:
        with pytest.raises(OnaApiError) as caught:
            fetch(client)
    error = caught.value
    assert type(error) is OnaApiError
    assert error.status == 401 and error.code == "unauthenticated"
    message = str(error)
    assert "rejected the API key" in message
    assert "invalid or missing API key" in message
    assert "\n" not in message and "\r" not in message
    assert len(api.seen) == 1
    assert_key_hidden(error)


def test_401_message_stays_one_line_when_the_server_message_has_newlines() -> None:
    """Regression: the server's Connect message used to be copied in verbatim, newlines and all."""
    api = FakeApi(connect_error(401, "unauthenticated", "invalid API key\nsee https://ona.test/docs"))
    with make_client(api) as client:
        with pytest.raises(OnaApiError) as caught:
            fetch(client)
    assert "rejected the API key" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_401_message_never_contains_the_key_even_if_the_server_echoes_it() -> None:
    """Regression: a server that echoed the key in its message used to leak it into the error."""
    api = FakeApi(connect_error(401, "unauthenticated", f"invalid API key {KEY}"))
    with make_client(api) as client:
        with pytest.raises(OnaApiError) as caught:
            fetch(client)
    assert_key_hidden(caught.value)


@pytest.mark.parametrize("value", ["soon", "Thu, 99 Foo 2025 99:99:99 GMT"])
def test_unparsable_retry_after_is_retried(value: str) -> None:
    """Regression: an unreadable Retry-After used to escape as a bare ValueError after one request."""
    api = FakeApi(httpx.Response(503, headers={"Retry-After": value}), ok([rec(1)]))
    with make_client(api) as client:
        assert fetch(client) == [[rec(1)]]
    assert len(api.seen) == 2


# -- 3. redirects ------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirect_to_another_host_is_not_followed(status: int) -> None:
    target = "https://elsewhere.example/api" + LIST_USAGE_PATH
    api = FakeApi(
        lambda request: (
            httpx.Response(status, headers={"Location": target}) if request.url.host == "ona.test" else ok([rec(1)])
        )
    )
    with make_client(api) as client:
        with pytest.raises(OnaApiError) as caught:
            fetch(client)
    assert not isinstance(caught.value, TransientApiError)
    assert caught.value.status == status
    assert "to elsewhere.example" in str(caught.value)
    assert [r.url.host for r in api.seen] == ["ona.test"]
    assert client.requests == 1
    assert_key_hidden(caught.value)


# -- 4. check_base_url -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://app.gitpod.io/api",
        "https://ona.example.com:8443/api/",
        "http://127.0.0.1:8181/api",
        "http://127.0.0.2/api",
        "http://localhost:8181/api",
        "http://LOCALHOST/api",
        "http://[::1]:8181/api",
    ],
)
def test_check_base_url_accepts(url: str) -> None:
    assert check_base_url(url) == httpx.URL(url)


@pytest.mark.parametrize(
    "url",
    ["http://app.gitpod.io/api", "http://10.0.0.5:8181/api", "http://localhost.evil.example/api", "http://127.0.0.1@evil.example/api"],
)
def test_check_base_url_refuses_plain_http_to_other_hosts(url: str) -> None:
    with pytest.raises(ValueError, match="plain http"):
        check_base_url(url)
    assert check_base_url(url, allow_insecure_http=True) == httpx.URL(url)
    with pytest.raises(ValueError, match="plain http"):
        UsageClient(KEY, url)
    UsageClient(KEY, url, allow_insecure_http=True).close()


@pytest.mark.parametrize(
    "url",
    ["not a url", "ftp://x", "ftp://x/api", "https://", "https:///api", "app.gitpod.io/api", "//app.gitpod.io/api", "", "http://[::1"],
)
def test_check_base_url_refuses_non_urls(url: str) -> None:
    with pytest.raises(ValueError):
        check_base_url(url)
    with pytest.raises(ValueError):
        check_base_url(url, allow_insecure_http=True)


def test_client_refuses_empty_key_and_bad_page_size() -> None:
    with pytest.raises(ValueError, match="no API key"):
        UsageClient("", BASE)
    for size in (0, 101, -1):
        with pytest.raises(ValueError, match="page size"):
            UsageClient(KEY, BASE, page_size=size)


# -- 5. the key never shows up in errors or logs -----------------------------------------------

SCENARIOS: dict[str, list[Any]] = {
    "401": [connect_error(401, "unauthenticated", "invalid or missing API key")],
    "403": [connect_error(403, "permission_denied", "no")],
    "400": [connect_error(400, "invalid_argument", "bad")],
    "404": [httpx.Response(404, content=b"<html>not found</html>")],
    "501": [httpx.Response(501)],
    "503-give-up": [httpx.Response(503, headers={"Retry-After": "0"})],
    "429-over-cap": [httpx.Response(429, headers={"Retry-After": "3600"})],
    "connect-error": [httpx.ConnectError("connection refused")],
    "read-timeout": [httpx.ReadTimeout("timed out")],
    "html-200": [httpx.Response(200, content=b"<html>login</html>")],
    "redirect": [httpx.Response(302, headers={"Location": "https://login.example/sso"})],
    "repeated-token": [ok([rec(1)], "again")],
    "records-not-a-list": [httpx.Response(200, content=b'{"records":{"id":"r1"}}')],
    # A careless server that quotes the Authorization header back in its Connect error message.
    "echoes-key-401": [lambda r: connect_error(401, "unauthenticated", f"bad {r.headers['Authorization']}")],
    "echoes-key-400": [lambda r: connect_error(400, "invalid_argument", f"got {r.headers['Authorization']}")],
    "echoes-key-503": [lambda r: connect_error(503, "unavailable", f"for {r.headers['Authorization']}")],
}


@pytest.mark.parametrize("key", ["sk-SECRET-123", "ona_pat_S3CR3T.k3y+/=="])
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_key_never_appears_in_errors_or_logs(key: str, scenario: str, caplog: pytest.LogCaptureFixture) -> None:
    api = FakeApi(*SCENARIOS[scenario])
    caplog.set_level(logging.DEBUG)
    with make_client(api, key=key, max_attempts=3) as client:
        with pytest.raises(OnaApiError) as caught:
            fetch(client)
    assert all(r.headers["Authorization"] == f"Bearer {key}" for r in api.seen)  # it was sent...
    assert_key_hidden(caught.value, key)  # ...but never echoed
    assert key not in caplog.text


# -- 6. against the emulator -------------------------------------------------------------------

EMULATOR_KEY = "emu-SECRET-456"


class RecordingTransport(httpx.BaseTransport):
    """Real HTTP, but keeps a copy of each request as it left the client (unredacted headers)."""

    def __init__(self) -> None:
        self._inner = httpx.HTTPTransport()
        self.sent: list[httpx.Request] = []
        self._lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.read()
        with self._lock:
            self.sent.append(request)
        return self._inner.handle_request(request)

    def close(self) -> None:
        self._inner.close()


@pytest.fixture
def org() -> tuple[UsageStore, str]:
    # One project, so ~95% of the records carry it and the project filter still spans three pages.
    records = generate_records(5, START_TEXT, END_TEXT, 300, projects=1)
    project_id = next(r["projectId"] for r in records if "projectId" in r)
    return UsageStore(records), project_id


@pytest.fixture
def server(org: tuple[UsageStore, str]) -> Iterator[EmulatorServer]:
    with EmulatorServer(org[0], api_key=EMULATOR_KEY) as running:
        yield running


def _wire(entry: dict[str, Any]) -> dict[str, Any]:
    headers = entry["headers"]
    return {
        "method": entry["method"],
        "path": entry["path"],
        "query": entry["query"],
        "body": entry["body"],
        "status": entry["status"],
        "headers": {name: headers.get(name) for name in ("authorization", "content-type", "accept")},
    }


def test_same_requests_as_the_official_sdk(org: tuple[UsageStore, str], server: EmulatorServer) -> None:
    from gitpod import Gitpod

    store, project_id = org
    truth = store.records(START_TEXT, END_TEXT, project_id)
    assert 200 < len(truth) <= 300  # three pages of 100: two of them requested with a token

    sdk_transport = RecordingTransport()
    with Gitpod(
        bearer_token=EMULATOR_KEY,
        base_url=server.url,
        max_retries=0,
        http_client=httpx.Client(transport=sdk_transport),
    ) as sdk:
        pager = sdk.usage.list_environment_runtime_records(
            filter={"date_range": {"start_time": START_TEXT, "end_time": END_TEXT}, "project_id": project_id},
            pagination={"page_size": 100},
            page_size=100,
        )
        sdk_records = [item.to_dict() for item in pager]
    sdk_requests = [_wire(entry) for entry in server.requests]
    server.reset_requests()

    ours_transport = RecordingTransport()
    with UsageClient(EMULATOR_KEY, server.url, page_size=100, transport=ours_transport) as client:
        our_records = [r for page in client.pages(WINDOW, project_id) for r in page]
    our_requests = [_wire(entry) for entry in server.requests]

    assert sdk_records == truth
    assert our_records == truth
    assert len(sdk_requests) == len(our_requests) == 3
    assert our_requests == sdk_requests
    # What the server saw, spelled out.
    assert [r["query"] for r in our_requests][0] == {"pageSize": "100"}
    assert all(set(r["query"]) == {"pageSize", "token"} for r in our_requests[1:])
    assert all(r["status"] == 200 and r["method"] == "POST" for r in our_requests)
    assert our_requests[0]["path"] == "/api" + LIST_USAGE_PATH
    assert our_requests[0]["body"] == {
        "filter": {"dateRange": {"startTime": START_TEXT, "endTime": END_TEXT}, "projectId": project_id},
        "pagination": {"pageSize": 100},
    }
    assert our_requests[0]["headers"] == {
        "authorization": "<redacted>",
        "content-type": "application/json",
        "accept": "application/json",
    }
    # The emulator redacts Authorization in its log; compare the headers as they left each client.
    for sdk_sent, our_sent in zip(sdk_transport.sent, ours_transport.sent, strict=True):
        for name in ("Authorization", "Content-Type", "Accept"):
            assert our_sent.headers.get(name) == sdk_sent.headers.get(name), name
        assert our_sent.headers["Authorization"] == f"Bearer {EMULATOR_KEY}"
        assert our_sent.method == sdk_sent.method
        assert our_sent.url == sdk_sent.url
        assert orjson.loads(our_sent.content) == orjson.loads(sdk_sent.content)


@pytest.mark.parametrize("which", ["first-requests", "next-page-requests"])
def test_emulator_503s_are_retried_and_every_record_comes_back_once(
    which: str, org: tuple[UsageStore, str], server: EmulatorServer
) -> None:
    store, _ = org
    truth = store.records(START_TEXT, END_TEXT)
    assert len(truth) == 300
    failures = {"left": 2}
    lock = threading.Lock()

    def fault(request: dict[str, Any]) -> tuple[int, bytes, dict[str, str]] | None:
        if which == "next-page-requests" and not request["query"].get("token"):
            return None
        with lock:
            if failures["left"] > 0:
                failures["left"] -= 1
                return 503, b'{"code":"unavailable","message":"try again"}', {"Retry-After": "0"}
        return None

    server.fault = fault
    with UsageClient(EMULATOR_KEY, server.url, backoff=0.01) as client:
        records = [r for page in client.pages(WINDOW) for r in page]
    assert records == truth
    assert len({r["id"] for r in records}) == len(records) == 300
    statuses = [entry["status"] for entry in server.requests]
    assert statuses.count(503) == 2 and statuses.count(200) == 3
    assert client.requests == 5 and client.retries == 2
    if which == "first-requests":
        assert statuses == [503, 503, 200, 200, 200]
    else:
        assert statuses == [200, 503, 503, 200, 200]
        # The retried request is the same request, token and all.
        assert server.requests[1]["query"] == server.requests[2]["query"] == server.requests[3]["query"]


def test_emulator_rejects_a_wrong_key_without_retrying(server: EmulatorServer) -> None:
    with UsageClient("sk-WRONG-789", server.url, backoff=0.01) as client:
        with pytest.raises(OnaApiError, match="rejected the API key") as caught:
            fetch(client)
    assert caught.value.status == 401 and caught.value.code == "unauthenticated"
    assert len(server.requests) == 1
    assert_key_hidden(caught.value, "sk-WRONG-789")
    assert_key_hidden(caught.value, EMULATOR_KEY)
