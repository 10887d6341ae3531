"""The emulator's records, its clock, and the one query both the API and tests use.

Records are kept as pre-encoded wire JSON sorted by (stoppedAt ns, id), so a
page is a bisect plus a slice and a bytes join. Private keys (`_visibleAt`) and
empty values never reach the wire, as in proto3 JSON.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from bisect import bisect_left, bisect_right
from collections.abc import Iterable
from typing import Any, NamedTuple

import orjson
import pendulum

from .generator import generate_records
from .rfc3339 import NS_PER_SECOND, format_rfc3339, parse_rfc3339_ns, to_ns

__all__ = ["UsageStore", "generate_records", "parse_rfc3339_ns", "format_rfc3339"]

VISIBLE_AT = "_visibleAt"


class _Entry(NamedTuple):
    stopped_ns: int
    visible_ns: int | None
    project_id: str
    body: bytes
    environment_class_id: str = ""
    runner_id: str = ""
    user_id: str = ""


class _Index(NamedTuple):
    """Parallel lists sorted by (stopped_ns, id)."""

    stopped: list[int]
    ids: list[str]
    bodies: list[bytes]


def _entry(record: dict[str, Any], lag_ns: int = 0) -> tuple[str, _Entry]:
    """Validate one record and pre-encode its wire form; without `_visibleAt`, it becomes
    visible `lag_ns` after it stopped."""
    record_id = record.get("id")
    if not isinstance(record_id, str) or not record_id:
        raise ValueError(f"record without a string id: {record!r}")
    stopped = record.get("stoppedAt")
    if not stopped:
        raise ValueError(f"record {record_id} has no stoppedAt")
    visible = record.get(VISIBLE_AT)
    body = orjson.dumps(record)
    # A cheap test (false positives only) that keeps the usual record, with no
    # private keys and no empty values, off the filtering path.
    values = record.values()
    if b'"_' in body or "" in values or None in values:
        body = orjson.dumps(
            {k: v for k, v in record.items() if not k.startswith("_") and v not in (None, "")}
        )
    stopped_ns = parse_rfc3339_ns(stopped)
    # orjson's result keeps its oversized scratch allocation (~4 KB); an
    # exact-size copy keeps a million records near 300 MB instead of 4 GB.
    return record_id, _Entry(
        stopped_ns,
        parse_rfc3339_ns(visible) if visible else (stopped_ns + lag_ns if lag_ns > 0 else None),
        record.get("projectId") or "",
        bytes(memoryview(body)),
        record.get("environmentClassId") or "",
        record.get("runnerId") or "",
        record.get("userId") or "",
    )


def _bound_ns(value: dt.datetime | str | None, default: int) -> int:
    return default if value is None else to_ns(value)


class UsageStore:
    """Thread-safe usage records plus the emulator's clock.

    A record is visible when it has stopped (`stoppedAt <= now`) and, if it
    carries `_visibleAt`, once that instant has passed: that is how tests model
    ingestion lag and late-arriving records. `ingestion_lag` (seconds) does that for every
    record added or upserted while it is set: one without `_visibleAt` becomes visible that
    long after its `stoppedAt`.
    """

    def __init__(self, records: Iterable[dict[str, Any]] = (), ingestion_lag: float = 0.0) -> None:
        self._lock = threading.RLock()
        self._entries: dict[str, _Entry] = {}
        self.names: dict[str, str] = {}  # project, environment class, runner and user names by id
        self.organization_id = "0c0ffee0-0000-4000-8000-00000000000a"  # whose key this store answers
        # members by userId as ListMembers returns them; None: every user of a record, named from `names`
        self.members: dict[str, dict[str, Any]] | None = None
        self.left: set[str] = set()  # userIds that left the organization: their usage stays, ListMembers omits them
        self.version = 0
        self._index: _Index | None = None
        self._project_indexes: dict[str, _Index] = {}
        self._lagged: tuple[list[int], list[str]] | None = None
        self._frozen_ns: int | None = None
        self._offset_ns = 0
        self.ingestion_lag = ingestion_lag
        self.add(records)

    # -- mutation -------------------------------------------------------------

    def add(self, records: Iterable[dict[str, Any]]) -> None:
        """Insert new records; raises ValueError (and adds nothing) on a known id."""
        prepared = self._prepare(records)
        with self._lock:
            clash = next((i for i in prepared if i in self._entries), None)
            if clash is not None:
                raise ValueError(f"record {clash} already exists; use upsert()")
            self._commit(prepared)

    def upsert(self, records: Iterable[dict[str, Any]]) -> None:
        """Insert or replace records by id (stoppedAt and any field may change)."""
        prepared = self._prepare(records)
        with self._lock:
            self._commit(prepared)

    def delete(self, ids: Iterable[str]) -> int:
        """Remove records by id; unknown ids are ignored. Returns how many went."""
        with self._lock:
            removed = sum(self._entries.pop(i, None) is not None for i in ids)
            if removed:
                self._invalidate()
            return removed

    def _prepare(self, records: Iterable[dict[str, Any]]) -> dict[str, _Entry]:
        lag_ns = round(self.ingestion_lag * NS_PER_SECOND) if self.ingestion_lag else 0
        return dict(_entry(r, lag_ns) for r in records)

    def _commit(self, prepared: dict[str, _Entry]) -> None:
        if prepared:
            self._entries.update(prepared)
            self._invalidate()

    def _invalidate(self) -> None:
        self.version += 1  # lets derived data (the catalog lists) know when to rebuild
        self._index = None
        self._project_indexes = {}
        self._lagged = None

    def referenced_ids(self) -> list[tuple[str, str, str]]:
        """(projectId, environmentClassId, runnerId) of every record, "" where absent; no decoding."""
        with self._lock:
            return [(e.project_id, e.environment_class_id, e.runner_id) for e in self._entries.values()]

    def referenced_users(self) -> list[str]:
        """The userId of every record, "" where absent; kept beside the body, as the ids
        above: decoding millions of bodies kept the first list of members waiting for seconds."""
        with self._lock:
            return [e.user_id for e in self._entries.values()]

    def __len__(self) -> int:
        return len(self._entries)

    # -- clock ----------------------------------------------------------------

    def now_ns(self) -> int:
        frozen = self._frozen_ns
        return frozen if frozen is not None else time.time_ns() + self._offset_ns

    def now(self) -> pendulum.DateTime:
        """The emulator's now: real time unless frozen or moved."""
        seconds, nanos = divmod(self.now_ns(), NS_PER_SECOND)
        return pendulum.from_timestamp(seconds, tz="UTC").add(microseconds=nanos // 1000)

    def set_now(self, when: dt.datetime | str | None) -> None:
        """Freeze the clock at `when`; None returns to real time."""
        with self._lock:
            self._frozen_ns = None if when is None else to_ns(when)
            self._offset_ns = 0

    def advance(self, seconds: float) -> None:
        """Move the clock forward (or back); a real-time clock keeps ticking."""
        delta = round(seconds * NS_PER_SECOND)
        with self._lock:
            if self._frozen_ns is not None:
                self._frozen_ns += delta
            else:
                self._offset_ns += delta

    # -- queries --------------------------------------------------------------

    def page(
        self,
        start_ns: int,
        end_ns: int,
        project_id: str,
        offset: int,
        limit: int,
        visible_only: bool = True,
    ) -> tuple[list[bytes], bool]:
        """Wire bodies of records `offset..offset+limit` of the query, and whether more follow.

        The query is `start_ns <= stoppedAt < end_ns`, optionally one project,
        ordered by (stoppedAt, id).
        """
        with self._lock:
            index = self._index_for(project_id)
            if visible_only:
                now = self.now_ns()
                end_ns = min(end_ns, now + 1)
                hidden = self._hidden_positions(index, start_ns, end_ns, project_id, now)
            else:
                hidden = []
        lo = bisect_left(index.stopped, start_ns)
        hi = max(lo, bisect_left(index.stopped, end_ns))
        if not hidden:
            first = lo + offset
            last = min(first + limit, hi)
            return index.bodies[first:last], last < hi
        position = lo + offset
        skipped = 0
        while skipped < len(hidden) and hidden[skipped] <= position:
            position += 1
            skipped += 1
        bodies: list[bytes] = []
        while position < hi and len(bodies) < limit:
            if skipped < len(hidden) and hidden[skipped] == position:
                skipped += 1
            else:
                bodies.append(index.bodies[position])
            position += 1
        return bodies, (hi - position) > (len(hidden) - skipped)

    def records(
        self,
        start: dt.datetime | str | None = None,
        end: dt.datetime | str | None = None,
        project_id: str | None = None,
        visible_only: bool = True,
    ) -> list[dict[str, Any]]:
        """The truth for a query: exactly what paging the API would return, in order.

        Records come back in wire form (no `_visibleAt`, no empty fields).
        """
        start_ns = _bound_ns(start, -(2**63))
        end_ns = _bound_ns(end, 2**63)
        bodies, _ = self.page(start_ns, end_ns, project_id or "", 0, len(self._entries), visible_only)
        return orjson.loads(b"[" + b",".join(bodies) + b"]")

    # -- indexes (call with the lock held) ------------------------------------

    def _index_for(self, project_id: str) -> _Index:
        if self._index is None:
            self._index = self._build_index(self._entries.items())
        if not project_id:
            return self._index
        index = self._project_indexes.get(project_id)
        if index is None:
            index = self._build_index(
                (i, e) for i, e in self._entries.items() if e.project_id == project_id
            )
            self._project_indexes[project_id] = index
        return index

    @staticmethod
    def _build_index(items: Iterable[tuple[str, _Entry]]) -> _Index:
        rows = sorted((e.stopped_ns, i, e.body) for i, e in items)
        if not rows:
            return _Index([], [], [])
        stopped, ids, bodies = map(list, zip(*rows))
        return _Index(stopped, ids, bodies)

    def _hidden_positions(
        self, index: _Index, start_ns: int, end_ns: int, project_id: str, now: int
    ) -> list[int]:
        """Sorted index positions of stopped records whose `_visibleAt` is still ahead."""
        if self._lagged is None:
            lagged = sorted(
                (e.visible_ns, i)
                for i, e in self._entries.items()
                if e.visible_ns is not None and e.visible_ns > e.stopped_ns
            )
            self._lagged = ([v for v, _ in lagged], [i for _, i in lagged])
        visible_at, ids = self._lagged
        positions = []
        for record_id in ids[bisect_right(visible_at, now):]:
            entry = self._entries[record_id]
            if start_ns <= entry.stopped_ns < end_ns and (
                not project_id or entry.project_id == project_id
            ):
                position = bisect_left(index.stopped, entry.stopped_ns)
                while index.ids[position] != record_id:  # ties on stoppedAt are rare
                    position += 1
                positions.append(position)
        positions.sort()
        return positions
