"""Fault injection: the ways a real API, or the proxies in front of it, misbehave.

A `FaultConfig` says which faults to inject; a `FaultInjector` (one per configuration) decides,
request by request, which fault hits it, from counters and a seeded `random.Random`, so a run
with the same seed and the same order of requests sees the same faults. The server
(`server.py`) acts the decision out. Set faults on a running server in any of three ways:

* in Python: `EmulatorServer(store, faults=FaultConfig(...))`, `server.faults = {...}`, or
  `server.set_faults(rate_limit_rate=0.2)` (replaces) / `server.update_faults(...)` (merges);
* on the command line: `python -m ona_emulator --rate-limit-rate 0.2 --retry-after 1 ...`
  (the same flags under `ona-usage emulator`; see `cli.py`);
* over HTTP: `POST /_control/faults` with the configuration as JSON (see `control.py`).

The faults, each off by default:

=====================  ==================================================================
request faults         (counted only among API requests after the first `start_after`)
---------------------  ------------------------------------------------------------------
latency, jitter        seconds added before every answer (plus uniform 0..jitter)
fail_first             the first N requests fail with `fail_first_with`: an HTTP status
                       (503, 429, 500, ...) or a fault kind (truncate, html, drop, hang)
burst_every/length     every Nth request starts a burst of K failures, cycling through
                       `burst_statuses` (500, 502, 503, 504)
rate_limit_rate        that share of requests answered 429 with `Retry-After: retry_after`
error_rate             that share answered with one of `error_statuses`, at random
truncate_rate          200 with the JSON body cut in half (Content-Length of the cut body)
html_rate              an HTML error page from a "proxy", status `html_status` (502 or 200)
drop_rate              headers with the full Content-Length, half the body, then the
                       connection closes
hang_rate              the answer waits `hang_seconds` (longer than the client's timeout)
max_faults             stop injecting request faults after this many (0: no limit)
---------------------  ------------------------------------------------------------------
paging faults          (every page after the first of a window)
---------------------  ------------------------------------------------------------------
repeat_token           `nextToken` is the token the request sent: paging never ends
repeat_record          page k+1 starts with the last record of page k
---------------------  ------------------------------------------------------------------
data                   (the store's, see `UsageStore.ingestion_lag`)
---------------------  ------------------------------------------------------------------
ingestion_lag          records added from now on become visible only that many seconds
                       after their `stoppedAt`
=====================  ==================================================================

The random faults share one draw per request, so their rates add up (at most 1) and a
request gets at most one of them; `fail_first` and bursts come before the draw.
"""

from __future__ import annotations

import dataclasses
import random
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import orjson

from .protocol import ListRequest, page_body

#: Fault kinds that are not an HTTP status.
KINDS = ("truncate", "html", "drop", "hang")
#: The random faults, in the order their rates are stacked on the one draw.
RANDOM_FAULTS = (
    ("rate_limit_rate", 429),
    ("error_rate", "error"),
    ("truncate_rate", "truncate"),
    ("html_rate", "html"),
    ("drop_rate", "drop"),
    ("hang_rate", "hang"),
)
DEFAULT_ERROR_STATUSES = (500, 502, 503, 504)

Kind = int | str


@dataclass(frozen=True)
class FaultConfig:
    """Which faults the emulator injects; the default injects none. See the module docstring."""

    seed: int = 0
    latency: float = 0.0
    jitter: float = 0.0
    start_after: int = 0
    max_faults: int = 0
    fail_first: int = 0
    fail_first_with: Kind = 503
    burst_every: int = 0
    burst_length: int = 3
    burst_statuses: tuple[int, ...] = DEFAULT_ERROR_STATUSES
    rate_limit_rate: float = 0.0
    retry_after: float = 1.0
    error_rate: float = 0.0
    error_statuses: tuple[int, ...] = DEFAULT_ERROR_STATUSES
    truncate_rate: float = 0.0
    html_rate: float = 0.0
    html_status: int = 502
    drop_rate: float = 0.0
    hang_rate: float = 0.0
    hang_seconds: float = 30.0
    repeat_token: bool = False
    repeat_record: bool = False
    ingestion_lag: float = 0.0

    def __post_init__(self) -> None:
        for name in ("seed",):
            _integer(self, name, minimum=None)
        for name in ("start_after", "max_faults", "fail_first", "burst_every"):
            _integer(self, name)
        _integer(self, "burst_length", minimum=1)
        for name in ("latency", "jitter", "retry_after", "hang_seconds", "ingestion_lag"):
            _number(self, name)
        for name, _ in RANDOM_FAULTS:
            if not 0 <= _number(self, name) <= 1:
                raise ValueError(f"{name} must be between 0 and 1, got {getattr(self, name)}")
        total = sum(getattr(self, name) for name, _ in RANDOM_FAULTS)
        if total > 1 + 1e-9:
            raise ValueError(f"the random fault rates add up to {total:g}; at most 1 is possible")
        object.__setattr__(self, "fail_first_with", parse_kind(self.fail_first_with))
        for name in ("burst_statuses", "error_statuses"):
            value = getattr(self, name)
            statuses = tuple(_status(s, name) for s in ([value] if isinstance(value, (int, str)) else value))
            if not statuses:
                raise ValueError(f"{name} must name at least one status")
            object.__setattr__(self, name, statuses)
        object.__setattr__(self, "html_status", _status(self.html_status, "html_status", minimum=200))
        for name in ("repeat_token", "repeat_record"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], base: FaultConfig | None = None) -> FaultConfig:
        """A configuration from JSON-like values; with `base`, only the given keys change."""
        if not isinstance(values, Mapping):
            raise ValueError("fault configuration must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown fault setting(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return dataclasses.replace(base or cls(), **values)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}

    def changed(self) -> dict[str, Any]:
        """Only the settings that differ from the defaults."""
        default = FaultConfig()
        return {k: v for k, v in self.to_dict().items() if v != default.to_dict()[k]}

    @property
    def request_faults(self) -> bool:
        """Whether any fault acts on requests (the server's slow path)."""
        return bool(
            self.latency > 0
            or self.jitter > 0
            or self.fail_first
            or self.burst_every
            or any(getattr(self, name) > 0 for name, _ in RANDOM_FAULTS)
            or self.paging_faults
        )

    @property
    def paging_faults(self) -> bool:
        return self.repeat_token or self.repeat_record


def parse_kind(value: Any) -> Kind:
    """An HTTP status (int, or digits) or one of KINDS."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, str):
        kind = value.strip().lower()
        if kind not in KINDS:
            raise ValueError(f"not an HTTP status or a fault kind ({', '.join(KINDS)}): {value!r}")
        return kind
    return _status(value, "fail_first_with")


def _status(value: Any, name: str, minimum: int = 400) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= 599:
        raise ValueError(f"{name}: {value!r} is not an HTTP status from {minimum} to 599")
    return value


def _integer(config: FaultConfig, name: str, minimum: int | None = 0) -> int:
    value = getattr(config, name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return value


def _number(config: FaultConfig, name: str) -> float:
    value = getattr(config, name)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
        raise ValueError(f"{name} must be a number, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must not be negative, got {value}")
    return value


@dataclass
class FaultInjector:
    """Decides each request's fault for one configuration; thread-safe, seeded."""

    config: FaultConfig
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _requests: int = 0
    _injected: int = 0
    _burst_left: int = 0
    _burst_index: int = 0

    def __post_init__(self) -> None:
        self._rng = random.Random(self.config.seed)
        self._jitter_rng = random.Random(self.config.seed + 1)  # delays do not shift the faults
        stack, total = [], 0.0
        for name, kind in RANDOM_FAULTS:
            rate = getattr(self.config, name)
            if rate > 0:
                total += rate
                stack.append((total, kind))
        self._stack = stack

    def decide(self) -> Kind | None:
        """The fault for the next API request, or None; call once per request."""
        config = self.config
        with self._lock:
            self._requests += 1
            n = self._requests - config.start_after
            if n <= 0 or (config.max_faults and self._injected >= config.max_faults):
                return None
            kind: Kind | None = None
            if n <= config.fail_first:
                kind = config.fail_first_with
            elif config.burst_every:
                if n % config.burst_every == 0:
                    self._burst_left = config.burst_length
                if self._burst_left > 0:
                    self._burst_left -= 1
                    statuses = config.burst_statuses
                    kind = statuses[self._burst_index % len(statuses)]
                    self._burst_index += 1
            if kind is None and self._stack:
                draw = self._rng.random()
                kind = next((k for upper, k in self._stack if draw < upper), None)
                if kind == "error":
                    kind = self._rng.choice(config.error_statuses)
            if kind is not None:
                self._injected += 1
            return kind

    def delay(self) -> float:
        config = self.config
        if config.jitter <= 0:
            return config.latency
        with self._lock:
            return config.latency + self._jitter_rng.uniform(0, config.jitter)

    def page(self, store: Any, request: ListRequest) -> tuple[bytes, str | None]:
        """A page with the paging faults applied: its body, and the fault applied, if any."""
        config = self.config
        offset, limit = request.offset, request.page_size
        applied = None
        first = offset
        if config.repeat_record and offset > 0:
            first = offset - 1  # the previous page's last record again; at least one new record
            limit = max(limit, 2)
            applied = "repeat_record"
        records, more = store.page(request.start_ns, request.end_ns, request.project_id, first, limit)
        base = dataclasses.replace(request, offset=0)
        token = base.next_token(first + len(records)) if more else None
        if config.repeat_token and offset > 0:
            token = base.next_token(offset)  # exactly the token this request sent
            applied = "repeat_token"
        return page_body(records, token), applied


_CONNECT_CODES = {
    400: "invalid_argument",
    401: "unauthenticated",
    403: "permission_denied",
    404: "not_found",
    408: "deadline_exceeded",
    409: "aborted",
    429: "resource_exhausted",
    500: "internal",
    501: "unimplemented",
    502: "unavailable",
    503: "unavailable",
    504: "deadline_exceeded",
}


def error_response(status: int, config: FaultConfig) -> tuple[int, bytes, dict[str, str]]:
    """A Connect error answer for an injected status; 429s carry `Retry-After`."""
    code = _CONNECT_CODES.get(status, "unknown")
    headers = {"Content-Type": "application/json"}
    message = f"injected fault: HTTP {status}"
    if status == 429:
        headers["Retry-After"] = f"{config.retry_after:g}"
        message = "injected fault: rate limit exceeded, retry later"
    return status, orjson.dumps({"code": code, "message": message}), headers


def html_response(config: FaultConfig) -> tuple[int, bytes, dict[str, str]]:
    """What a reverse proxy or captive portal sends: an HTML page, not Connect JSON."""
    status = config.html_status
    title = "502 Bad Gateway" if status == 502 else f"{status} Service Temporarily Unavailable"
    body = (
        f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n"
        f"<center><h1>{title}</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
    ).encode()
    return status, body, {"Content-Type": "text/html; charset=utf-8"}
