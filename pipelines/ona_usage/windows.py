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

from ona_usage.state import SyncState, backfill_key

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


def format_duration(value: timedelta) -> str:
    """The shortest `1d2h30m` form of a duration, as `parse_duration` reads it; `0` for none."""
    seconds = int(value.total_seconds())
    if seconds <= 0:
        return "0"
    parts = []
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def parse_window_size(text: str) -> pendulum.Duration:
    """A window divides a day evenly, so windows tile whole days and never cross midnight."""
    size = parse_duration(text, name="window")
    seconds = int(size.total_seconds())
    if seconds <= 0 or size > MAX_WINDOW or seconds != size.total_seconds() or 86_400 % seconds:
        raise ValueError(f"window {text!r} must divide a day evenly: 1h, 2h, 3h, 4h, 6h, 8h, 12h or 1d")
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


def plan(
    state: SyncState,
    *,
    size: pendulum.Duration,
    lookback: pendulum.Duration,
    first_start: datetime,
    now: datetime,
    backfill: tuple[datetime, datetime] | None = None,
    project_id: str | None = None,
    force: bool = False,
) -> list[Window]:
    """The windows a run fetches: the one rule behind the source, `status`, `--dry-run` and verify.

    A scheduled run goes from `resume_point` to now. A backfill of `[start, end)` continues
    after its last committed chunk; a finished one is not fetched again, unless `force`, and
    then whole.
    """
    if backfill:
        start, end = backfill
        progress = state.backfills.get(backfill_key(start, end, project_id), {})
        if progress.get("done"):
            return list(tile(start, end, size)) if force else []
        if not force:
            start = to_utc(progress.get("through") or start)
        return list(tile(start, end, size))
    initial = to_utc(state.initial_value or first_start)
    lagged = initial if state.cursor is None else max(to_utc(state.cursor) - lookback, initial)
    return list(tile(resume_point(lagged, state.fetched_through, state.fetched_at, lookback), now, size))


def resume_point(
    lagged_start: datetime, fetched_through: datetime | None, fetched_at: datetime | None, lookback: timedelta
) -> pendulum.DateTime:
    """Where a scheduled run starts: the end of what was fetched, less what may have been late.

    A record can show up in the API a while after it stopped (ingestion lag), so a window is
    only final once it ended more than `lookback` before it was fetched. The next run starts
    at the end of the last committed run, or `lookback` before the moment that run fetched,
    whichever is earlier: right after the previous chunk during a long catch-up, and
    `lookback` before the end of the previous run on a schedule. `lagged_start`, the cursor
    less the lookback (never before the first run's start), is the floor.
    """
    lagged_start = to_utc(lagged_start)
    if fetched_through is None:
        return lagged_start
    settled = to_utc(fetched_at or fetched_through) - lookback
    return max(lagged_start, min(to_utc(fetched_through), settled))
