"""RFC 3339 timestamps as integer nanoseconds.

The API's timestamps carry 0 to 9 fractional digits, so comparing them as
strings or as microsecond datetimes is wrong; everything here works on exact
integer nanoseconds since the Unix epoch.
"""

from __future__ import annotations

import calendar
import datetime as dt
import re
from functools import lru_cache

NS_PER_SECOND = 1_000_000_000
_SECONDS_PER_DAY = 86_400
_EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()

_RFC3339 = re.compile(
    r"(\d{4}-\d{2}-\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
    r"(?:[Zz]|([+-])(\d{2}):(\d{2}))"
)


@lru_cache(maxsize=8192)
def _day_seconds(date_text: str) -> int:
    """Seconds from the epoch to midnight UTC of `YYYY-MM-DD` (validated)."""
    day = dt.date.fromisoformat(date_text)
    return (day.toordinal() - _EPOCH_ORDINAL) * _SECONDS_PER_DAY


@lru_cache(maxsize=8192)
def _date_text(epoch_day: int) -> str:
    return dt.date.fromordinal(epoch_day + _EPOCH_ORDINAL).isoformat()


# "THH:MM:SS" for every second of a day, and "%"-formats per fraction width:
# table lookups keep formatting a million records' timestamps under a second.
_CLOCK: list[str] = []  # filled on first use: 86,400 strings are 50 ms an import should not cost


def _clock() -> list[str]:
    global _CLOCK
    if not _CLOCK:  # built whole, then bound: threads that race here build equal tables
        _CLOCK = [f"T{h:02d}:{m:02d}:{s:02d}" for h in range(24) for m in range(60) for s in range(60)]
    return _CLOCK


_FRACTIONS = [(10 ** (9 - d), f"%s%s.%0{d}dZ") for d in range(10)]


def parse_rfc3339_ns(text: str) -> int:
    """Parse an RFC 3339 timestamp (`Z` or offset, 0-9 fraction digits) to ns.

    Raises ValueError for anything else, including leap seconds, which
    protobuf Timestamps cannot represent.
    """
    match = _RFC3339.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"not an RFC 3339 timestamp: {text!r}")
    date_text, hh, mm, ss, fraction, sign, off_h, off_m = match.groups()
    hour, minute, second = int(hh), int(mm), int(ss)
    if hour > 23 or minute > 59 or second > 59:
        raise ValueError(f"time of day out of range: {text!r}")
    seconds = _day_seconds(date_text) + hour * 3600 + minute * 60 + second
    if sign:
        if int(off_h) > 23 or int(off_m) > 59:
            raise ValueError(f"UTC offset out of range: {text!r}")
        offset = int(off_h) * 3600 + int(off_m) * 60
        seconds -= offset if sign == "+" else -offset
    nanos = int(fraction.ljust(9, "0")) if fraction else 0
    return seconds * NS_PER_SECOND + nanos


def format_rfc3339(ns: int, digits: int) -> str:
    """Format ns as UTC `...Z` with exactly `digits` (0-9) fraction digits, truncating."""
    if not 0 <= digits <= 9:
        raise ValueError(f"digits must be 0..9, got {digits}")
    seconds, nanos = divmod(ns, NS_PER_SECOND)
    day, second_of_day = divmod(seconds, _SECONDS_PER_DAY)
    clock = _CLOCK or _clock()
    if not digits:
        return f"{_date_text(day)}{clock[second_of_day]}Z"
    divisor, template = _FRACTIONS[digits]
    return template % (_date_text(day), clock[second_of_day], nanos // divisor)


def to_ns(value: dt.datetime | str) -> int:
    """Nanoseconds for a datetime (naive means UTC) or an RFC 3339 string."""
    if isinstance(value, str):
        return parse_rfc3339_ns(value)
    if isinstance(value, dt.datetime):
        return calendar.timegm(value.utctimetuple()) * NS_PER_SECOND + value.microsecond * 1000
    raise TypeError(f"expected datetime or RFC 3339 string, got {type(value).__name__}")
