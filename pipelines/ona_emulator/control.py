"""The emulator's control endpoint: faults, clock, counters and records, over local HTTP.

Served by the same server as the API, at the root (not under `/api`):

    GET    /_control/faults    the fault configuration in force (every field, see faults.py)
    POST   /_control/faults    replace it: {"rate_limit_rate": 0.2, "retry_after": 1, "seed": 7};
                               fields left out are off, `{}` turns every fault off
    PATCH  /_control/faults    change only the fields given, keep the others
    DELETE /_control/faults    every fault off
    GET    /_control/clock     {"now": RFC 3339, "frozen": bool}
    POST   /_control/clock     {"now": "2026-05-01T00:00:00Z"} freezes the clock there, {"now": null}
                               returns to real time; {"advance": seconds} moves it (both: set, then move)
    GET    /_control/stats     {"requests": n, "statuses": {"200": n, ...}, "faults": {"429": n, ...},
                               "records": records in the store, "now": ...}; API requests only
    DELETE /_control/stats     zero the counters and clear the request log (answers the old stats)
    GET    /_control/records   the truth: what paging the API would return now, in order;
                               optional query `start`, `end` (RFC 3339) and `projectId`
    POST   /_control/records   upsert records: a JSON list of them, or {"records": [...]}

No API key is needed: the endpoint answers only requests from the loopback interface
(127.0.0.0/8 or ::1), 403 to any other address (should the server listen on 0.0.0.0), and
404 everywhere when the server was started with `control=False` (`--no-control`). Answers are
JSON; a bad request gets 400 with {"error": message}.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import orjson

from .faults import FaultConfig
from .rfc3339 import format_rfc3339

if TYPE_CHECKING:
    from .server import EmulatorServer, Response

_JSON = {"Content-Type": "application/json"}
PREFIX = "/_control"


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def is_loopback(host: str) -> bool:
    """Whether a client address is this machine's loopback (IPv4-mapped IPv6 included)."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def handle(server: EmulatorServer, method: str, target: str, raw: bytes, client_host: str) -> Response:
    """Answer one control request."""
    try:
        if not server.control:
            raise _Refused(404, "the control endpoint is off (started with --no-control)")
        if not is_loopback(client_host):
            raise _Refused(403, "the control endpoint answers only on the loopback interface")
        split = urlsplit(target)
        route = split.path[len(PREFIX) :].rstrip("/")
        query = {k: v[0] for k, v in parse_qs(split.query).items()}
        try:
            body = orjson.loads(raw) if raw.strip() else None
        except orjson.JSONDecodeError as error:
            raise _Refused(400, f"request body is not JSON: {error}") from None
        routes = {"/faults": _faults, "/clock": _clock, "/stats": _stats, "/records": _records}
        if route not in routes:
            raise _Refused(404, f"no such control resource {split.path!r}; try {', '.join(PREFIX + r for r in routes)}")
        try:
            answer = routes[route](server, method, body, query)
        except ValueError as error:
            raise _Refused(400, str(error)) from None
        return 200, orjson.dumps(answer, option=orjson.OPT_NON_STR_KEYS), _JSON
    except _Refused as refused:
        return refused.status, orjson.dumps({"error": str(refused)}), _JSON


def _object(body: Any) -> dict[str, Any]:
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise ValueError("expected a JSON object")
    return body


def _not_allowed(method: str, allowed: str) -> _Refused:
    return _Refused(405, f"method {method} not allowed here; use {allowed}")


def _faults(server: EmulatorServer, method: str, body: Any, query: dict[str, str]) -> Any:
    if method == "POST":
        server.faults = FaultConfig.from_mapping(_object(body))
    elif method == "PATCH":
        server.update_faults(**_object(body))
    elif method == "DELETE":
        server.faults = None
    elif method != "GET":
        raise _not_allowed(method, "GET, POST, PATCH or DELETE")
    return server.faults.to_dict()


def _clock(server: EmulatorServer, method: str, body: Any, query: dict[str, str]) -> Any:
    store = server.store
    if method == "POST":
        changes = _object(body)
        unknown = set(changes) - {"now", "advance"}
        if unknown or not changes:
            raise ValueError('expected {"now": RFC 3339 or null} and/or {"advance": seconds}')
        advance = changes.get("advance", 0)
        if not isinstance(advance, (int, float)) or isinstance(advance, bool):
            raise ValueError(f"advance: expected a number of seconds, got {advance!r}")
        if "now" in changes:
            now = changes["now"]
            if now is not None and not isinstance(now, str):
                raise ValueError(f"now: expected an RFC 3339 string or null, got {now!r}")
            store.set_now(now)  # ValueError on a bad timestamp
        if advance:
            store.advance(advance)
    elif method != "GET":
        raise _not_allowed(method, "GET or POST")
    return _clock_state(server)


def _clock_state(server: EmulatorServer) -> dict[str, Any]:
    return {"now": format_rfc3339(server.store.now_ns(), 6), "frozen": server.store._frozen_ns is not None}


def _stats(server: EmulatorServer, method: str, body: Any, query: dict[str, str]) -> Any:
    if method == "GET":
        stats = server.stats()
    elif method == "DELETE":
        stats = server.reset_stats()
    else:
        raise _not_allowed(method, "GET or DELETE")
    return {**stats, "records": len(server.store), **_clock_state(server)}


def _records(server: EmulatorServer, method: str, body: Any, query: dict[str, str]) -> Any:
    store = server.store
    if method == "GET":
        return store.records(query.get("start"), query.get("end"), query.get("projectId"))
    if method == "POST":
        records = body.get("records") if isinstance(body, dict) else body
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise ValueError('expected a JSON list of records, or {"records": [...]}')
        store.upsert(records)
        return {"records": len(store), "upserted": len(records)}
    raise _not_allowed(method, "GET or POST")
