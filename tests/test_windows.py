"""Windows tile any range exactly: no gap, no overlap, none longer than asked, aligned edges."""

from datetime import timedelta

import pendulum
import pytest
from hypothesis import given, settings, strategies as st

from ona_usage.windows import Window, format_rfc3339, parse_duration, parse_window_size, tile

UTC = pendulum.timezone("UTC")
instants = st.datetimes(
    min_value=pendulum.datetime(2020, 1, 1).naive(), max_value=pendulum.datetime(2030, 1, 1).naive()
).map(lambda d: pendulum.instance(d, tz=UTC))
sizes = st.sampled_from(["1d", "12h", "6h", "1h", "90m", "8m", "1s"])  # up to 300 windows each


@settings(max_examples=300, deadline=None)
@given(start=instants, fraction=st.floats(min_value=0, max_value=300), size=sizes)
def test_windows_tile_the_range_exactly(start, fraction, size):
    step = parse_window_size(size)
    end = start + timedelta(microseconds=int(fraction * step.total_seconds() * 1e6))
    windows = list(tile(start, end, step))
    if start >= end:
        assert windows == []
        return
    assert windows[0].start == start
    assert windows[-1].end == end
    for before, after in zip(windows, windows[1:]):
        assert before.end == after.start  # shared edge: [a, b) then [b, c)
    for window in windows:
        assert window.start < window.end
        assert window.end - window.start <= step
    # inner edges sit on multiples of the size since the epoch (midnight for 1d)
    epoch = pendulum.datetime(1970, 1, 1)
    for window in windows[:-1]:
        assert (window.end - epoch).total_seconds() % step.total_seconds() == 0


def test_day_windows_fall_on_utc_midnight():
    windows = list(tile(pendulum.datetime(2026, 3, 1, 22, 30), pendulum.datetime(2026, 3, 3, 1), parse_window_size("1d")))
    assert [(str(w)) for w in windows] == [
        "[2026-03-01T22:30:00Z, 2026-03-02T00:00:00Z)",
        "[2026-03-02T00:00:00Z, 2026-03-03T00:00:00Z)",
        "[2026-03-03T00:00:00Z, 2026-03-03T01:00:00Z)",
    ]


def test_tile_converts_other_time_zones_to_utc():
    start = pendulum.datetime(2026, 3, 1, 1, tz="Europe/Berlin")  # 00:00 UTC
    windows = list(tile(start, start.add(hours=2), parse_window_size("1d")))
    assert windows == [Window(pendulum.datetime(2026, 3, 1), pendulum.datetime(2026, 3, 1, 2))]


@pytest.mark.parametrize("text,seconds", [("1d", 86400), ("6h", 21600), ("90m", 5400), ("1h30m", 5400), ("45s", 45), ("0", 0), ("120", 120)])
def test_parse_duration(text, seconds):
    assert parse_duration(text).total_seconds() == seconds


@pytest.mark.parametrize("text", ["0", "0h", "2d", "25h", "7h", "5h", "7m", "1d1h"])
def test_window_size_divides_a_day_evenly(text):
    with pytest.raises(ValueError, match="must divide a day evenly: 1h, 2h, 3h, 4h, 6h, 8h, 12h or 1d"):
        parse_window_size(text)


@pytest.mark.parametrize("text", ["abc", "", "1x", "-1h"])
def test_window_size_must_be_a_duration(text):
    with pytest.raises(ValueError, match="is not a duration"):
        parse_window_size(text)


@pytest.mark.parametrize("text", ["1h", "2h", "3h", "4h", "6h", "8h", "12h", "1d", "24h", "30m"])
def test_windows_that_divide_a_day_never_cross_midnight(text):
    start = pendulum.datetime(2026, 3, 1, 21, 17)
    windows = list(tile(start, start.add(days=3), parse_window_size(text)))
    assert all(w.start.date() == w.end.subtract(microseconds=1).date() for w in windows)


def test_format_rfc3339_uses_z_and_keeps_microseconds():
    assert format_rfc3339(pendulum.datetime(2026, 1, 2, 3, 4, 5)) == "2026-01-02T03:04:05Z"
    assert format_rfc3339(pendulum.datetime(2026, 1, 2, 3, 4, 5, 500)) == "2026-01-02T03:04:05.000500Z"
    assert format_rfc3339(pendulum.datetime(2026, 1, 2, 4, tz="Europe/Berlin")) == "2026-01-02T03:00:00Z"
