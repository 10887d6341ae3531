"""Pages to columns: pyarrow's JSON reader gives exactly the table the record-by-record path gives."""

from __future__ import annotations

from typing import Any

import orjson
import pendulum
import pyarrow as pa
import pytest

from ona_usage import records as records_module
from ona_usage.records import InvalidRecordError, first_of_each_id, from_pages, to_table
from ona_usage.windows import Window, format_rfc3339

from conftest import make_records

START = pendulum.datetime(2026, 3, 1, tz="UTC")
WINDOW = Window(START, START.add(days=1))


def page(records: list[dict[str, Any]], token: str = "", **extra: Any) -> bytes:
    return orjson.dumps({"records": records, "pagination": {"nextToken": token}, **extra})


def no_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if `from_pages` falls back to the record-by-record path."""

    def refuse(*_: Any) -> pa.Table:
        raise AssertionError("from_pages fell back to to_table")

    monkeypatch.setattr(records_module, "to_table", refuse)


def test_pages_decode_to_the_same_table_as_the_records(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = make_records(START.add(hours=3), 250, "rec")
    rows[7]["stoppedAt"] = "2026-03-01T05:00:00.123456789Z"  # nanoseconds are truncated to µs
    rows[8]["createdAt"] = "2026-02-28T23:00:00+02:00"  # an offset is converted to UTC
    del rows[9]["projectId"]  # a missing optional field is null
    rows[10]["runnerId"] = None
    pages = [page(rows[:100], "t1"), page(rows[100:200], "t2", extra={"ignored": [1, 2]}), page(rows[200:])]
    expected = to_table(rows, WINDOW)
    no_fallback(monkeypatch)
    table = from_pages(pages, WINDOW)
    assert table.schema == records_module.ARROW_SCHEMA
    assert table.equals(expected)
    assert table.column("stopped_at")[7].value == pendulum.parse("2026-03-01T05:00:00.123456Z").int_timestamp * 10**6 + 123456
    assert table.column("created_at")[8].as_py() == pendulum.datetime(2026, 2, 28, 21, tz="UTC")
    assert table.column("project_id")[9].as_py() is None and table.column("runner_id")[10].as_py() is None


def test_pretty_printed_and_empty_pages_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = make_records(START.add(hours=1), 3, "pretty")
    pretty = orjson.dumps({"records": rows}, option=orjson.OPT_INDENT_2).replace(b"\n", b"\r\n")
    no_fallback(monkeypatch)
    table = from_pages([pretty, page([]), orjson.dumps({"pagination": {}})], WINDOW)
    assert table.column("id").to_pylist() == ["pretty-0", "pretty-1", "pretty-2"]
    assert from_pages([], WINDOW).num_rows == 0


@pytest.mark.parametrize(
    "change, message",
    [
        ({"id": None}, "without id"),
        ({"stoppedAt": None}, "without stoppedAt"),
        ({"stoppedAt": "yesterday"}, "not an RFC 3339 timestamp"),
        ({"stoppedAt": format_rfc3339(START.add(days=1))}, "outside the requested range"),
        ({"userId": 42}, "expected a string"),
    ],
)
def test_a_broken_record_is_named_whichever_page_it_is_on(change: dict[str, Any], message: str) -> None:
    rows = make_records(START.add(hours=2), 120, "rec")
    rows[110] = {k: v for k, v in {**rows[110], **change}.items() if v is not None}
    with pytest.raises(InvalidRecordError, match=message) as raised:
        from_pages([page(rows[:100]), page(rows[100:])], WINDOW)
    if "id" not in change:
        assert "rec-110" in str(raised.value)


def test_a_record_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(InvalidRecordError, match="not a JSON object"):
        from_pages([page(make_records(START, 2, "a")), orjson.dumps({"records": ["oops"]})], WINDOW)


def test_first_of_each_id_keeps_the_first_copy_within_and_across_windows() -> None:
    seen: set[str] = set()
    first = to_table(make_records(START.add(hours=1), 3, "a"), WINDOW)
    assert first_of_each_id(first, seen) is first  # nothing repeated: the same table back
    assert seen == {"a-0", "a-1", "a-2"}
    later = make_records(START.add(hours=5), 3, "b")
    later.insert(1, {**make_records(START.add(hours=6), 2, "a")[1], "userId": "someone else"})  # a-1 again
    later.append(dict(later[0]))  # b-0 twice in one window
    kept = first_of_each_id(to_table(later, WINDOW), seen)
    assert kept.column("id").to_pylist() == ["b-0", "b-1", "b-2"]
    assert seen == {"a-0", "a-1", "a-2", "b-0", "b-1", "b-2"}
