"""Records to columns: the API's camelCase JSON records as one typed Arrow table per window.

dlt passes Arrow tables straight to Parquet, which skips its row-by-row normalizer (about 25 s
per million rows). A window's pages are decoded by pyarrow's JSON reader straight into columns
(`from_pages`), in C and outside the GIL, which holds a window in a fifth of the memory of its
records as dicts and leaves the GIL to the threads that wait on the network. The checks below
are the contract a record must meet to be loaded: an `id`, a `stoppedAt` that parses and falls
in the window that was asked for, and strings where strings are due. When a window breaks them,
it is decoded again record by record (`to_table`), to say which record is wrong and why.
"""

from __future__ import annotations

from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json
from dlt.common.schema.typing import TTableSchemaColumns

from ona_usage.windows import Window, format_rfc3339

# (API field, column) in table order; the columns are dlt's snake_case names of the fields.
FIELDS: tuple[tuple[str, str], ...] = (
    ("id", "id"),
    ("createdAt", "created_at"),
    ("stoppedAt", "stopped_at"),
    ("environmentClassId", "environment_class_id"),
    ("environmentId", "environment_id"),
    ("projectId", "project_id"),
    ("runnerId", "runner_id"),
    ("userId", "user_id"),
)
TIMESTAMP_FIELDS = frozenset({"createdAt", "stoppedAt"})
_UTC_NS = pa.timestamp("ns", tz="UTC")
UTC_US = pa.timestamp("us", tz="UTC")

ARROW_SCHEMA = pa.schema(
    [
        pa.field(column, UTC_US if api in TIMESTAMP_FIELDS else pa.string(), nullable=api not in ("id", "stoppedAt"))
        for api, column in FIELDS
    ]
)

COLUMNS: TTableSchemaColumns = {
    column: {
        "name": column,
        "data_type": "timestamp" if api in TIMESTAMP_FIELDS else "text",
        "nullable": api not in ("id", "stoppedAt"),
        **({"timezone": True, "precision": 6} if api in TIMESTAMP_FIELDS else {}),
    }
    for api, column in FIELDS
}
# Not from the record: the organization whose key listed it (IdentityService), so that several
# organizations can share a dataset. Null in rows loaded before ona-usage 0.2.
ORGANIZATION_COLUMN = "organization_id"
COLUMNS[ORGANIZATION_COLUMN] = {"name": ORGANIZATION_COLUMN, "data_type": "text", "nullable": True}


def with_organization(table: pa.Table, organization_id: str) -> pa.Table:
    return table.append_column(ORGANIZATION_COLUMN, pa.repeat(pa.scalar(organization_id, pa.string()), table.num_rows))


# A page as the JSON reader sees it: only `records` is read, every other field is skipped.
_PAGE_SCHEMA = pa.schema(
    [pa.field("records", pa.list_(pa.struct([pa.field(api, pa.string()) for api, _ in FIELDS])))]
)
_PARSE_OPTIONS = pa_json.ParseOptions(explicit_schema=_PAGE_SCHEMA, unexpected_field_behavior="ignore")


class InvalidRecordError(ValueError):
    """A record breaks the API's contract; the run stops so the cursor cannot skip past it."""


def from_pages(pages: list[bytes], window: Window) -> pa.Table:
    """Build the typed table for one window from its pages' JSON bodies (see `raw_pages`)."""
    try:
        return _decode(pages, window)
    except (pa.ArrowInvalid, pa.ArrowTypeError, _BrokenContract):
        # Something in the window breaks the contract: find which record, and say so.
        records = [record for page in pages for record in orjson.loads(page).get("records") or []]
        return to_table(records, window)


class _BrokenContract(Exception):
    pass


def _decode(pages: list[bytes], window: Window) -> pa.Table:
    if not pages:
        return ARROW_SCHEMA.empty_table()
    # One page per line: a raw line break can only be whitespace between JSON tokens.
    lines = b"\n".join(page.replace(b"\n", b" ").replace(b"\r", b" ") for page in pages)
    read_options = pa_json.ReadOptions(use_threads=False, block_size=len(lines) + 1)
    parsed = pa_json.read_json(pa.py_buffer(lines), read_options=read_options, parse_options=_PARSE_OPTIONS)
    records = parsed.column("records").combine_chunks().flatten()
    arrays = []
    for api, _ in FIELDS:
        values = records.field(api)
        if api in TIMESTAMP_FIELDS:
            values = pc.cast(pc.cast(values, _UTC_NS), UTC_US, safe=False)
        arrays.append(values)
    table = pa.Table.from_arrays(arrays, schema=ARROW_SCHEMA)
    if table.column("id").null_count or table.column("stopped_at").null_count or _first_outside(table, window) is not None:
        raise _BrokenContract
    return table


def to_table(records: list[dict[str, Any]], window: Window) -> pa.Table:
    """Build the typed table for one window's records, or say which record is wrong and why."""
    if not all(isinstance(record, dict) for record in records):
        raise InvalidRecordError(f"window {window}: the API sent a record that is not a JSON object")
    arrays = [_column(records, api, window) for api, _ in FIELDS]
    table = pa.Table.from_arrays(arrays, schema=ARROW_SCHEMA)
    _check_required(table, records, window)
    _check_in_window(table, records, window)
    return table


def _column(records: list[dict[str, Any]], api: str, window: Window) -> pa.Array:
    values = [record.get(api) for record in records]
    try:
        strings = pa.array(values, type=pa.string())
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        bad = next(r for r in records if r.get(api) is not None and not isinstance(r.get(api), str))
        raise InvalidRecordError(
            f"window {window}: record {bad.get('id')!r} has {api}={bad.get(api)!r}, expected a string"
        ) from None
    if api not in TIMESTAMP_FIELDS:
        return strings
    try:
        # Via nanoseconds: a direct cast to microseconds rejects 9-digit fractions.
        return pc.cast(pc.cast(strings, _UTC_NS), UTC_US, safe=False)
    except pa.ArrowInvalid:
        bad = next(r for r in records if not _parses(r.get(api)))
        raise InvalidRecordError(
            f"window {window}: record {bad.get('id')!r} has {api}={bad.get(api)!r}, "
            "which is not an RFC 3339 timestamp"
        ) from None


def _parses(value: str | None) -> bool:
    try:
        pc.cast(pa.array([value], pa.string()), _UTC_NS)
    except pa.ArrowInvalid:
        return False
    return True


def first_of_each_id(table: pa.Table, seen: set[str]) -> pa.Table:
    """The rows whose `id` is not in `seen` nor earlier in `table`; adds their ids to `seen`.

    A load tells dlt its rows are unique by `id`. Within one load a record can still come
    twice: a page the API repeats, or a record whose `stoppedAt` moved from one window to
    another between two requests. The first one read is kept, as dlt's own deduplication would
    keep an arbitrary one.
    """
    ids = table.column("id").to_pylist()
    unique = set(ids)
    if len(unique) == len(ids) and seen.isdisjoint(unique):
        seen |= unique
        return table
    keep = []
    for id_ in ids:
        keep.append(id_ not in seen)
        seen.add(id_)
    return table.filter(pa.array(keep, pa.bool_()))


def _check_required(table: pa.Table, records: list[dict[str, Any]], window: Window) -> None:
    for column, api in (("id", "id"), ("stopped_at", "stoppedAt")):
        missing = table.column(column).null_count
        if missing:
            bad = next(r for r in records if not r.get(api))
            raise InvalidRecordError(
                f"window {window}: {missing} record(s) without {api}, e.g. {_describe(bad)}"
            )


def _check_in_window(table: pa.Table, records: list[dict[str, Any]], window: Window) -> None:
    """The API promises `start <= stoppedAt < end`; a record outside would corrupt the cursor."""
    index = _first_outside(table, window)
    if index is not None:
        bad = records[index]
        raise InvalidRecordError(
            f"window {window}: record {bad.get('id')!r} has stoppedAt={bad.get('stoppedAt')!r}, "
            f"outside the requested range [{format_rfc3339(window.start)}, {format_rfc3339(window.end)})"
        )


def _first_outside(table: pa.Table, window: Window) -> int | None:
    """The index of the first row whose `stopped_at` is outside the window, if any."""
    if table.num_rows == 0:
        return None
    stopped = table.column("stopped_at")
    start = pa.scalar(window.start, UTC_US)
    end = pa.scalar(window.end, UTC_US)
    mask = pc.or_(pc.less(stopped, start), pc.greater_equal(stopped, end))
    return pc.index(mask, True).as_py() if pc.any(mask).as_py() else None


def _describe(record: dict[str, Any]) -> str:
    keys = ", ".join(f"{k}={v!r}" for k, v in list(record.items())[:3])
    return "{" + keys + "}"
