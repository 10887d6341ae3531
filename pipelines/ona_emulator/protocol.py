"""Connect-RPC JSON for ListEnvironmentUsageRecords: request parsing, page tokens, bodies.

Kept apart from the HTTP plumbing so the validation rules read in one place.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from .rfc3339 import parse_rfc3339_ns

ENDPOINT = "/gitpod.v1.UsageService/ListEnvironmentUsageRecords"
DEFAULT_PAGE_SIZE = 25
MAX_PAGE_SIZE = 100
_INTEGER = re.compile(r"-?[0-9]+")

_HTTP_STATUS = {
    "invalid_argument": 400,
    "unauthenticated": 401,
    "permission_denied": 403,
    "not_found": 404,
    "unimplemented": 404,
    "resource_exhausted": 429,
    "internal": 500,
    "unavailable": 503,
}


class ConnectError(Exception):
    """A Connect error: its code decides the HTTP status, its JSON is the body."""

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status if status is not None else _HTTP_STATUS[code]

    def body(self) -> bytes:
        return orjson.dumps({"code": self.code, "message": self.message})


@dataclass(frozen=True, slots=True)
class ListRequest:
    """A validated request: the window is `start_ns <= stoppedAt < end_ns`."""

    start_ns: int
    end_ns: int
    project_id: str
    offset: int
    page_size: int

    def next_token(self, returned: int) -> str:
        """The opaque token for the page after one that returned `returned` records."""
        fingerprint = _fingerprint(self.start_ns, self.end_ns, self.project_id)
        payload = orjson.dumps({"o": self.offset + returned, "f": fingerprint})
        return base64.urlsafe_b64encode(payload).rstrip(b"=").decode()


def _fingerprint(start_ns: int, end_ns: int, project_id: str) -> str:
    """Ties a page token to its filter, so it cannot be replayed on another."""
    key = f"{start_ns}|{end_ns}|{project_id}".encode()
    return hashlib.blake2b(key, digest_size=6).hexdigest()


def _invalid(message: str) -> ConnectError:
    return ConnectError("invalid_argument", message)


def _field(message: Mapping[str, Any], camel: str, snake: str) -> Any:
    """A proto3 JSON field by either spelling; null means unset."""
    value = message.get(camel)
    return message.get(snake) if value is None else value


def _object(value: Any, name: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _invalid(f"{name}: expected a JSON object")
    return value


def _timestamp(value: Any, name: str) -> int:
    if value is None:
        raise _invalid(f"{name} is required")
    try:
        return parse_rfc3339_ns(value)
    except ValueError:
        raise _invalid(f"{name}: invalid RFC 3339 timestamp {value!r}") from None


def _page_size(value: Any) -> int:
    """proto3 int32: a JSON number or a decimal string; 0 means the default."""
    if value is None:
        return DEFAULT_PAGE_SIZE
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    elif isinstance(value, str) and _INTEGER.fullmatch(value):
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _invalid(f"pagination.pageSize: not an integer: {value!r}")
    if value < 0 or value > MAX_PAGE_SIZE:
        raise _invalid(f"pagination.pageSize must be between 0 and {MAX_PAGE_SIZE}, got {value}")
    return value or DEFAULT_PAGE_SIZE


def _offset(token: Any, fingerprint: str) -> int:
    if token is None or token == "":
        return 0
    try:
        data = orjson.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        offset = data["o"]
        valid = type(offset) is int and offset >= 0 and data["f"] == fingerprint
    except (TypeError, ValueError, KeyError, binascii.Error, orjson.JSONDecodeError):
        valid = False
    if not valid:
        raise _invalid("pagination.token is invalid or belongs to another filter")
    return offset


def decode_body(raw: bytes) -> Any:
    """The request JSON, or None for an empty body; raises ConnectError if unparsable."""
    if not raw.strip():
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise _invalid(f"request body is not valid JSON: {error}") from None


def parse_list_request(body: Any, query: Mapping[str, str]) -> ListRequest:
    """Validate a request; query `token`/`pageSize` win over the body's pagination."""
    message = _object(body, "request body")
    filter_ = _object(_field(message, "filter", "filter"), "filter")
    date_range = _field(filter_, "dateRange", "date_range")
    if date_range is None:
        raise _invalid("filter.dateRange is required")
    date_range = _object(date_range, "filter.dateRange")
    start_ns = _timestamp(_field(date_range, "startTime", "start_time"), "filter.dateRange.startTime")
    end_ns = _timestamp(_field(date_range, "endTime", "end_time"), "filter.dateRange.endTime")
    if end_ns < start_ns:
        raise _invalid("filter.dateRange.endTime is before startTime")
    project_id = _field(filter_, "projectId", "project_id") or ""
    if not isinstance(project_id, str):
        raise _invalid("filter.projectId: expected a string")
    pagination = _object(_field(message, "pagination", "pagination"), "pagination")
    token = query["token"] if "token" in query else _field(pagination, "token", "token")
    size = query["pageSize"] if "pageSize" in query else _field(pagination, "pageSize", "page_size")
    if token is not None and not isinstance(token, str):
        raise _invalid("pagination.token: expected a string")
    page_size = _page_size(size)
    offset = _offset(token, _fingerprint(start_ns, end_ns, project_id))
    return ListRequest(start_ns, end_ns, project_id, offset, page_size)


def page_body(records: list[bytes], next_token: str | None) -> bytes:
    """Join pre-encoded records into a response; proto3 omits empty fields, so the
    last page has no `pagination` and an empty result is exactly `{}`."""
    tail = b'"pagination":{"nextToken":"' + next_token.encode() + b'"}}' if next_token else b"}"
    if not records:
        return b"{" + tail if next_token else b"{}"
    return b'{"records":[' + b",".join(records) + (b"]," + tail if next_token else b"]}")
