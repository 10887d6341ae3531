"""HTTP client for `UsageService/ListEnvironmentUsageRecords`: requests, pages, retries, errors.

The request is shaped the way Ona's official httpx-based SDK (`gitpod-sdk` 0.11) shapes it:
POST to `{base_url}/gitpod.v1.UsageService/ListEnvironmentUsageRecords` with the page token and
size in the query string and `{"filter": {...}, "pagination": {"pageSize": N}}` as JSON body.
This module is the one place that knows the endpoint, decides what is retried, and holds the
API key; the key is only ever placed in the `Authorization` header.
"""

from __future__ import annotations

import email.utils
import logging
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pendulum
from tenacity import RetryCallState, Retrying, retry_if_exception_type

from ona_usage import __version__
from ona_usage.concurrency import AdaptiveLimit
from ona_usage.hedge import Hedger
from ona_usage.settings import (
    CONNECT_TIMEOUT,
    DEFAULT_BACKOFF,
    DEFAULT_BASE_URL,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_TIMEOUT,
    DEFAULT_WORKERS,
    MAX_PAGE_SIZE,
    Settings,
    check_base_url,
)
from ona_usage.transport import CertificateError, StdlibTransport, proxy_for
from ona_usage.windows import Window, format_rfc3339

logger = logging.getLogger(__name__)

LIST_USAGE_PATH = "/gitpod.v1.UsageService/ListEnvironmentUsageRecords"
IDENTITY_PATH = "/gitpod.v1.IdentityService/GetAuthenticatedIdentity"
# A server that asks us to wait longer than this is treated as down, not as busy.
MAX_RETRY_AFTER = 300.0
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# Redirects followed with the key: 307/308 (the method and body stay) to the same origin or to an
# HTTPS host of Ona, at most this many in a row. Anything else is refused before the key goes out.
FOLLOWED_REDIRECTS = frozenset({307, 308})
MAX_REDIRECTS = 3
ONA_DOMAINS = ("ona.com", "gitpod.io")
# A host that does not resolve or refuses connections is retried for about this long, not for
# every attempt: it is down or misspelt, and the person on call wants to know in seconds.
CONNECT_BUDGET = 4.0
# The longest wait between two attempts, whatever the attempt number: a dead API must fail the
# run in minutes, not hold it for days.
MAX_BACKOFF = 30.0


class OnaApiError(Exception):
    """The API refused the request or answered outside its contract; retrying will not help."""

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None):
        super().__init__(message)
        self.code = code
        self.status = status


class TransientApiError(OnaApiError):
    """A failure worth retrying: rate limits, 5xx, timeouts, dropped connections, bad bodies."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any):
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class ConnectFailure(TransientApiError):
    """No connection at all (the name does not resolve, the port refuses): retried briefly."""


def make_client(settings: Settings) -> UsageClient:
    """The one way the sync builds its client, so every command retries and times out alike."""
    return UsageClient(
        settings.require_api_key(),
        settings.base_url,
        page_size=settings.page_size,
        timeout=settings.timeout,
        max_attempts=settings.max_attempts,
        backoff=settings.backoff,
        allow_insecure_http=settings.allow_insecure_http,
        concurrency=settings.workers,
    )


class UsageClient:
    """Pages through usage records window by window; safe to share between threads."""

    def __init__(
        self,
        api_key: str,
        base_url: str = DEFAULT_BASE_URL,
        *,
        page_size: int = MAX_PAGE_SIZE,
        timeout: float = DEFAULT_TIMEOUT,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        backoff: float = DEFAULT_BACKOFF,
        allow_insecure_http: bool = False,
        concurrency: int = DEFAULT_WORKERS,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not api_key:
            raise ValueError("no API key given")
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"page size {page_size} must be between 1 and {MAX_PAGE_SIZE}")
        url = check_base_url(base_url, allow_insecure_http=allow_insecure_http)
        self._secret = api_key
        self.page_size = page_size
        self.max_attempts = max_attempts
        self.backoff = backoff
        self._base = str(url).rstrip("/")
        self._usage_url = self._base + LIST_USAGE_PATH
        self._host = url.host
        self._url = url
        self._headers = httpx.Headers(
            {
                "Authorization": f"Bearer {api_key}",
                "Accept": "application/json",
                "Accept-Encoding": "gzip, deflate",  # as httpx.Client asks: a page gzips to a fifth
                "Content-Type": "application/json",
                "User-Agent": f"ona-usage/{__version__}",
            }
        )
        self._timeout = httpx.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT)).as_dict()
        self._shared_transport = transport
        self.limit = AdaptiveLimit(concurrency)
        self._hedger = Hedger(concurrency, timeout)
        self._redirect_noted = False
        self._local = threading.local()
        self._transports: list[httpx.BaseTransport] = []
        self._pause_until = 0.0  # monotonic time before which no thread sends (after a 429)
        self._lock = threading.Lock()
        self.requests = 0
        self.retries = 0
        self._organization_id: str | None = None

    def __enter__(self) -> UsageClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def hedged(self) -> int:
        """Requests that straggled and were sent again (see `hedge.py`)."""
        return self._hedger.hedged

    def close(self) -> None:
        self._hedger.close()
        with self._lock:
            transports, self._transports = self._transports, []
        for transport in transports:
            transport.close()

    def _transport(self) -> httpx.BaseTransport:
        """This thread's connection: one pool shared by many threads spends its time on locks."""
        if self._shared_transport is not None:  # given by the caller (tests): theirs to close
            return self._shared_transport
        transport = getattr(self._local, "transport", None)
        if transport is None:
            transport = self._local.transport = _new_transport(self._url)
            with self._lock:
                self._transports.append(transport)
        return transport

    def pages(self, window: Window, project_id: str | None = None) -> Iterator[list[dict[str, Any]]]:
        """Yield each page's records for one window, following `nextToken` until it ends."""
        for records, _ in self._window_pages(window, project_id):
            yield records

    def raw_pages(self, window: Window, project_id: str | None = None) -> Iterator[bytes]:
        """Yield each page of one window as the JSON body the API sent, checked like `pages`.

        A window's bodies decode into columns in one go (`records.from_pages`), a fraction
        of the CPU and memory of keeping each record as a dict.
        """
        for _, content in self._window_pages(window, project_id):
            yield content

    def _window_pages(self, window: Window, project_id: str | None) -> Iterator[tuple[list[dict[str, Any]], bytes]]:
        body = _request_body(window, project_id, self.page_size)
        yield from self._paginate(self._usage_url, body, "records", f"window {window}")

    def organization_id(self) -> str:
        """The organization the key belongs to (`IdentityService/GetAuthenticatedIdentity`)."""
        with self._lock:
            known = self._organization_id
        if known is None:
            identity, _ = self._call(self._base + IDENTITY_PATH, {}, b"{}", "the identity check")
            known = identity.get("organizationId")
            if not isinstance(known, str) or not known:
                raise OnaApiError("the API answered the identity check without an organizationId")
            with self._lock:
                self._organization_id = known
        return known

    def list_all(self, path: str, items_key: str, **body_fields: Any) -> list[dict[str, Any]]:
        """Every item of a token-paged list endpoint, e.g. ProjectService/ListProjects."""
        body = orjson.dumps({**body_fields, "pagination": {"pageSize": self.page_size}})
        url = self._base + path
        pages = self._paginate(url, body, items_key, path.rsplit("/", 1)[-1])
        return [item for items, _ in pages for item in items]

    def check_access(self) -> None:
        """One cheap request, so a bad key or URL fails before anything touches the warehouse."""
        now = pendulum.now("UTC").start_of("second")
        window = Window(now.subtract(minutes=1), now)
        self._call(self._usage_url, {"pageSize": "1"}, _request_body(window, None, 1), "the access check")

    def _paginate(
        self, url: str, body: bytes, items_key: str, what: str
    ) -> Iterator[tuple[list[dict[str, Any]], bytes]]:
        """Each page's items and raw body, following `nextToken` until it ends."""
        token: str | None = None
        seen: set[str] = set()
        while True:
            params = {"pageSize": str(self.page_size)}
            if token:
                params["token"] = token
            page, content = self._call(url, params, body, what)
            items = page.get(items_key) or []
            if not isinstance(items, list):
                raise OnaApiError(f"the API answered {what} with `{items_key}` that is not a list")
            yield items, content
            pagination = page.get("pagination") or {}
            token = pagination.get("nextToken") if isinstance(pagination, dict) else None
            if not token:
                return
            if token in seen:
                raise OnaApiError(
                    f"the API returned the same page token twice for {what}; stopping instead of paging forever"
                )
            seen.add(token)

    def _call(self, url: str, params: dict[str, str], content: bytes, what: str) -> tuple[dict[str, Any], bytes]:
        retrying = Retrying(
            stop=self._stop,
            wait=self._wait,
            retry=retry_if_exception_type(TransientApiError),
            before_sleep=lambda state: self._log_retry(state, what),
            reraise=True,
        )
        try:
            return retrying(self._post_once, url, params, content)
        except TransientApiError as exc:
            raise TransientApiError(
                f"{exc} (gave up after {retrying.statistics.get('attempt_number', self.max_attempts)} attempts for {what})",
                code=exc.code,
                status=exc.status,
            ) from None

    def _post_once(self, url: str, params: dict[str, str], content: bytes) -> tuple[dict[str, Any], bytes]:
        # A 429 slows every worker down, not only the one that got it.
        if (pause := self._pause_until - time.monotonic()) > 0:
            time.sleep(pause)
        with self._lock:
            self.requests += 1
        try:
            with self.limit.measure():
                response = self._exchange(url, params, content)
        except httpx.TimeoutException as exc:
            raise TransientApiError(f"the API did not answer in time ({type(exc).__name__})") from None
        except CertificateError as exc:
            raise OnaApiError(
                f"the TLS certificate of {self._host} could not be verified ({exc}); if a proxy re-signs "
                "traffic, point SSL_CERT_FILE at its CA bundle"
            ) from None
        except httpx.ConnectError as exc:
            raise ConnectFailure(f"could not connect to {self._host}: {exc}") from None
        except httpx.TransportError as exc:
            raise TransientApiError(f"connection to {self._host} failed: {type(exc).__name__}: {exc}") from None
        if response.status_code != 200:
            error = _error_from(response, self._secret)
            if response.status_code == 429 and isinstance(error, TransientApiError):
                self.limit.throttled()
                with self._lock:
                    wait = error.retry_after if error.retry_after is not None else self.backoff
                    self._pause_until = max(self._pause_until, time.monotonic() + wait)
            raise error
        try:
            page = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            raise TransientApiError(
                f"the API answered with a body that is not JSON "
                f"({response.headers.get('content-type', 'no content type')}, {len(response.content)} bytes)"
            ) from None
        if not isinstance(page, dict):
            raise TransientApiError("the API answered with JSON that is not an object")
        return page, response.content

    def _exchange(self, url: str, params: dict[str, str], content: bytes) -> httpx.Response:
        """One answer that is not a redirect: 307/308 to the same origin or an Ona host are followed."""
        target = httpx.URL(url, params=params)
        for _ in range(MAX_REDIRECTS + 1):
            response = self._send(target, content)
            if not response.is_redirect:
                return response
            location = _redirect_target(target, response)
            if response.status_code not in FOLLOWED_REDIRECTS or location is None or not _may_follow(target, location):
                raise OnaApiError(
                    f"the API redirected (HTTP {response.status_code}) to "
                    f"{location.host if location else 'an unnamed location'}; not following it with the API key "
                    "(only 307/308 to https://*.ona.com or *.gitpod.io are followed; if that host is right, set --base-url to it)",
                    status=response.status_code,
                )
            if not self._redirect_noted:
                self._redirect_noted = True
                logger.warning("the API redirected (HTTP %d) to %s; following it", response.status_code, location.copy_with(query=None))
            target = location if location.query else location.copy_with(params=params)
        raise OnaApiError(f"the API redirected more than {MAX_REDIRECTS} times in a row; set --base-url to where it ends")

    def _send(self, url: httpx.URL, content: bytes) -> httpx.Response:
        """Send on this thread's connection; a straggler is hedged on a fresh one (see `hedge.py`)."""

        def send(transport: httpx.BaseTransport) -> httpx.Response:
            request = httpx.Request("POST", url, headers=self._headers, content=content, extensions={"timeout": self._timeout})
            response = transport.handle_request(request)
            response.read()
            return response

        response, transport = self._hedger.run(send, self._transport(), self._spare_transport, self._log_hedge)
        self._local.transport = transport  # the winner's connection serves this thread from now on
        return response

    def _spare_transport(self) -> httpx.BaseTransport:
        if self._shared_transport is not None:  # given by the caller (tests): theirs to close
            return self._shared_transport
        transport = _new_transport(self._url)
        with self._lock:
            self._transports.append(transport)
        return transport

    def _log_hedge(self, delay: float) -> None:
        logger.info("a request had no answer after %.1fs; sent it again (hedged request %d)", delay, self._hedger.hedged)

    def _stop(self, state: RetryCallState) -> bool:
        """Give up after `max_attempts`, or sooner when the host cannot be reached at all."""
        if state.attempt_number >= self.max_attempts:
            return True
        failure = state.outcome.exception() if state.outcome else None
        return isinstance(failure, ConnectFailure) and state.seconds_since_start >= CONNECT_BUDGET

    def _wait(self, state: RetryCallState) -> float:
        """Jittered exponential backoff, but never less than the server's `Retry-After`."""
        exc = state.outcome.exception() if state.outcome else None
        backoff = self.backoff * 2 ** min(state.attempt_number - 1, 30)
        delay = min(random.uniform(backoff / 2, backoff * 1.5), MAX_BACKOFF)
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            delay = max(delay, retry_after)
        if isinstance(exc, ConnectFailure):  # the last try of an unreachable host within its budget
            delay = min(delay, max(CONNECT_BUDGET - (state.seconds_since_start or 0.0), 0.0))
        return delay

    def _log_retry(self, state: RetryCallState, what: str) -> None:
        with self._lock:
            self.retries += 1
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0
        # An unreachable host fails within seconds with one line; its few retries are not news.
        level = logging.DEBUG if isinstance(exc, ConnectFailure) else logging.WARNING
        logger.log(
            level,
            "retrying %s after: %s (attempt %d of %d, waiting %.1fs)",
            what,
            exc,
            state.attempt_number + 1,
            self.max_attempts,
            wait,
        )


def _new_transport(url: httpx.URL) -> httpx.BaseTransport:
    """The standard library's HTTP client, unless a proxy is set: only httpx's transport knows those."""
    proxy = proxy_for(url)
    return httpx.HTTPTransport(proxy=proxy, trust_env=True) if proxy else StdlibTransport()


def _redirect_target(url: httpx.URL, response: httpx.Response) -> httpx.URL | None:
    try:
        location = response.headers.get("location")
        return url.join(location) if location else None
    except httpx.InvalidURL:
        return None


def _may_follow(source: httpx.URL, target: httpx.URL) -> bool:
    """The same origin, or HTTPS to Ona's own domains: the only places the key may follow a redirect."""
    if (target.scheme, target.host, target.port) == (source.scheme, source.host, source.port):
        return True
    host = target.host.lower()
    return target.scheme == "https" and any(host == d or host.endswith("." + d) for d in ONA_DOMAINS)


def _error_from(response: httpx.Response, secret: str) -> OnaApiError:
    """Map a non-200 answer to an error; Connect-RPC bodies carry `{"code", "message"}`."""
    status = response.status_code
    code, message = _connect_error(response)
    # The server's words go into one line of ours, and never with the key, should it echo it.
    message = " ".join(message.replace(secret, "***").split())
    detail = f"{code}: {message}" if code else f"HTTP {status}"
    if status in RETRY_STATUSES:
        retry_after = _retry_after(response.headers)
        if retry_after is not None and retry_after > MAX_RETRY_AFTER:
            return OnaApiError(
                f"the API is rate limiting ({detail}) and asks to wait {retry_after:.0f}s; try again later",
                code=code,
                status=status,
            )
        return TransientApiError(f"the API answered HTTP {status} ({detail})", retry_after=retry_after, code=code, status=status)
    if status == 401 or code == "unauthenticated":
        return OnaApiError(
            f"the API rejected the API key ({detail}); check ONA_API_KEY or sources.ona_usage.api_key",
            code=code,
            status=status,
        )
    if status == 403 or code == "permission_denied":
        return OnaApiError(
            f"the API key may not list usage records ({detail}); it needs access to the organization's usage",
            code=code,
            status=status,
        )
    return OnaApiError(f"the API refused the request: {detail} (HTTP {status})", code=code, status=status)


def _connect_error(response: httpx.Response) -> tuple[str | None, str]:
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return None, ""
    if isinstance(body, dict) and isinstance(body.get("code"), str):
        return body["code"], str(body.get("message", ""))[:500]
    return None, ""


def _retry_after(headers: httpx.Headers) -> float | None:
    """Seconds to wait from `retry-after-ms`, or `Retry-After` as seconds or an HTTP date."""
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return max(float(ms) / 1000, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None  # unreadable: fall back to our own backoff
    return max(parsed.timestamp() - time.time(), 0.0)


def _request_body(window: Window, project_id: str | None, page_size: int) -> bytes:
    filter_: dict[str, Any] = {
        "dateRange": {"startTime": format_rfc3339(window.start), "endTime": format_rfc3339(window.end)}
    }
    if project_id:
        filter_["projectId"] = project_id
    return orjson.dumps({"filter": filter_, "pagination": {"pageSize": page_size}})
