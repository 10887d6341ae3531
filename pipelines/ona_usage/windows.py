"""Date windows: how a date range is cut into the half-open `[start, end)` requests the API gets.

The API's `dateRange` is inclusive at `startTime` and exclusive at `endTime`, so windows that
share their edges tile a range with no gap and no overlap. Nothing here ever subtracts a
"granularity" from an exclusive end.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Iterator

import pendulum

MAX_WINDOW = pendulum.duration(days=1)
_EPOCH = pendulum.datetime(1970, 1, 1, tz="UTC")
_DURATION_PART = re.compile(r"(\d+)\s*(d|h|m|s)", re.IGNORECASE)
_UNITS = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds"}


@dataclass(frozen=True, order=True)
class Window:
    """One request's `dateRange`: records with `start <= stoppedAt < end`."""

    start: pendulum.DateTime
    end: pendulum.DateTime

    def __str__(self) -> str:
        return f"[{format_rfc3339(self.start)}, {format_rfc3339(self.end)})"


def parse_duration(text: str, *, name: str = "duration") -> pendulum.Duration:
    """Read `1d`, `6h`, `90m`, `1h30m` or `0` (a bare number is seconds)."""
    raw = str(text).strip()
    if re.fullmatch(r"\d+", raw):
        return pendulum.duration(seconds=int(raw))
    parts = _DURATION_PART.findall(raw)
    if not parts or _DURATION_PART.sub("", raw).strip():
        raise ValueError(f"{name} {text!r} is not a duration; use e.g. 1d, 6h, 30m or 90s")
    kwargs: dict[str, int] = {}
    for number, unit in parts:
        key = _UNITS[unit.lower()]
        kwargs[key] = kwargs.get(key, 0) + int(number)
    return pendulum.duration(**kwargs)


def parse_window_size(text: str) -> pendulum.Duration:
    """A window size is positive and at most one day (the API is asked day by day at most)."""
    size = parse_duration(text, name="window")
    if size.total_seconds() <= 0 or size > MAX_WINDOW:
        raise ValueError(f"window {text!r} must be more than 0 and at most 1d (e.g. 1d, 6h)")
    return size


def to_utc(value: datetime | str) -> pendulum.DateTime:
    """Any datetime or ISO 8601 string as a UTC pendulum DateTime; naive values are UTC."""
    parsed = pendulum.parse(value) if isinstance(value, str) else pendulum.instance(value)
    if not isinstance(parsed, pendulum.DateTime):  # a bare date parses to Date
        parsed = pendulum.datetime(parsed.year, parsed.month, parsed.day)
    return parsed.in_timezone("UTC")


def format_rfc3339(value: datetime) -> str:
    """RFC 3339 in UTC with `Z`, as the SDK sends it; microseconds only when there are some."""
    utc = pendulum.instance(value).in_timezone("UTC")
    text = utc.strftime("%Y-%m-%dT%H:%M:%S")
    if utc.microsecond:
        text += f".{utc.microsecond:06d}"
    return text + "Z"


def tile(start: datetime, end: datetime, size: pendulum.Duration) -> Iterator[Window]:
    """Cut `[start, end)` into windows aligned to multiples of `size` since the epoch (UTC).

    With `size=1d` the inner edges fall on UTC midnight, so a window is a calendar day and the
    first and last may be partial. An empty or inverted range yields nothing.
    """
    start, end = to_utc(start), to_utc(end)
    step = int(size.total_seconds() * 1_000_000)
    if step <= 0:
        raise ValueError("window size must be positive")
    cursor = start
    while cursor < end:
        since_epoch = cursor - _EPOCH
        micros = (since_epoch.days * 86_400 + since_epoch.seconds) * 1_000_000
        micros += since_epoch.microseconds
        window_end = min(_EPOCH + timedelta(microseconds=(micros // step + 1) * step), end)
        yield Window(cursor, window_end)
        cursor = window_end
