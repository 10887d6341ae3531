"""A deterministic synthetic organisation's usage records.

Built on integer nanoseconds and lookup tables rather than pendulum or
`random.choices`, so a million records take a few seconds.
"""

from __future__ import annotations

import datetime as dt
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .rfc3339 import format_rfc3339, to_ns

_NS_PER_MINUTE = 60 * 1_000_000_000
_NS_PER_DAY = 1440 * _NS_PER_MINUTE
_SHORT_RUN_MINUTES = (3.0, 60.0)
_LONG_RUN_MINUTES = (60.0, 600.0)
_SHORT_RUN_SHARE = 0.6
_HOME_PROJECT_SHARE = 0.7
_DIGITS = (0, 3, 6, 9)
# Nanoseconds a timestamp with 0, 3, 6 or 9 fraction digits cannot show.
_STEPS = tuple(10 ** (9 - d) for d in _DIGITS)
_TABLE_BITS = 10


@dataclass(frozen=True)
class Shape:
    """An organisation's shape: how many of each entity, and how long its runs last.

    The default is the demo's small team (runs of 3 minutes to 10 hours). `run_minutes` draws
    every run log-uniformly from that range instead: (1, 4320) gives runs of a minute to three
    days, many crossing several UTC midnights, as a busy organisation's do.
    """

    users: int = 25
    projects: int = 6
    classes: int = 4
    runners: int = 3
    run_minutes: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if min(self.projects, self.users, self.runners, self.classes) < 1:
            raise ValueError("projects, users, runners and classes must be at least 1")
        if self.run_minutes is not None and not 0 < self.run_minutes[0] <= self.run_minutes[1]:
            raise ValueError("run minutes must be a range LOW-HIGH with 0 < LOW <= HIGH")


DEFAULT_SHAPE = Shape()


def _uuid_text(h: str) -> str:
    """A UUID-shaped string from 32 random hex digits."""
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _entity_ids(seed: int, kind: str, count: int) -> list[str]:
    """Ids that depend only on (seed, kind, position), so they stay put when counts change."""
    return [_uuid_text(random.Random(f"{seed}/{kind}/{i}").randbytes(16).hex()) for i in range(count)]


def _skewed_table(rng: random.Random, items: list[str], exponent: float) -> list[str]:
    """A 2**_TABLE_BITS lookup table drawing `items` with Zipf-like weights."""
    weights = [1.0 / (rank + 1) ** exponent for rank in range(len(items))]
    return rng.choices(items, weights=weights, k=1 << _TABLE_BITS)


def _log_band(minutes: tuple[float, float]) -> tuple[float, float]:
    """(log of the low end in ns, log-width) for drawing log-uniform runtimes."""
    low, high = (math.log(m * _NS_PER_MINUTE) for m in minutes)
    return low, high - low


def generate_records(
    seed: int,
    start: dt.datetime | str,
    end: dt.datetime | str,
    count: int,
    projects: int = 6,
    users: int = 25,
    runners: int = 3,
    classes: int = 4,
    missing_project_ratio: float = 0.05,
    stream: str = "",
    run_minutes: tuple[float, float] | None = None,
) -> list[dict[str, Any]]:
    """`count` records with `start <= stoppedAt < end`, identical for identical arguments.

    Each environment class lives on one runner; each user mostly works in a
    home project; ~`missing_project_ratio` of records have no projectId.
    Timestamps use 0, 3, 6 or 9 fraction digits, and runs of up to ~10 hours
    often cross UTC midnight. The organisation (projects, users, classes,
    runners) depends on `seed` alone; `stream` picks another draw of records.
    `run_minutes` draws every run's length log-uniformly from that range instead.
    """
    start_ns, end_ns = to_ns(start), to_ns(end)
    if end_ns <= start_ns:
        raise ValueError("end must be after start")
    Shape(users, projects, classes, runners, run_minutes)  # validates
    rng = random.Random(f"{seed}/{stream}" if stream else seed)
    project_ids = _entity_ids(seed, "project", projects)
    user_ids = _entity_ids(seed, "user", users)
    runner_ids = _entity_ids(seed, "runner", runners)
    class_ids = _entity_ids(seed, "environment-class", classes)
    runner_of_class = {c: runner_ids[i % runners] for i, c in enumerate(class_ids)}
    home_project = {u: project_ids[i % projects] for i, u in enumerate(user_ids)}
    user_table = _skewed_table(rng, user_ids, 0.8)
    project_table = _skewed_table(rng, project_ids, 1.0)
    class_table = _skewed_table(rng, class_ids, 1.2)

    span = end_ns - start_ns
    short_band, long_band = _log_band(_SHORT_RUN_MINUTES), _log_band(_LONG_RUN_MINUTES)
    short_share = _SHORT_RUN_SHARE
    if run_minutes is not None:
        short_band = long_band = _log_band(run_minutes)
    bits, chance, exp = rng.getrandbits, rng.random, math.exp
    id_hex = rng.randbytes(32 * count).hex()  # two ids per record, drawn in one go
    records: list[dict[str, Any]] = []
    for at in range(0, 64 * count, 64):
        stop_choice, create_choice = bits(2), bits(2)
        stopped = start_ns + bits(64) % span
        stopped -= stopped % _STEPS[stop_choice]
        if stopped < start_ns:
            stopped, stop_choice = start_ns, 3  # 9 digits: start itself, exactly
        low, width = short_band if chance() < short_share else long_band
        created = stopped - int(exp(low + chance() * width))
        created -= created % _STEPS[create_choice]
        user = user_table[bits(_TABLE_BITS)]
        environment_class = class_table[bits(_TABLE_BITS)]
        record = {
            "id": _uuid_text(id_hex[at : at + 32]),
            "createdAt": format_rfc3339(created, _DIGITS[create_choice]),
            "stoppedAt": format_rfc3339(stopped, _DIGITS[stop_choice]),
            "environmentClassId": environment_class,
            "environmentId": _uuid_text(id_hex[at + 32 : at + 64]),
            "projectId": home_project[user] if chance() < _HOME_PROJECT_SHARE else project_table[bits(_TABLE_BITS)],
            "runnerId": runner_of_class[environment_class],
            "userId": user,
        }
        if chance() < missing_project_ratio:
            del record["projectId"]
        records.append(record)
    return records


def generate_organisation(
    seed: int, start: dt.datetime | str, end: dt.datetime | str, count: int, shape: Shape = DEFAULT_SHAPE
) -> list[dict[str, Any]]:
    """About `count` records over whole UTC days from `start`'s day through `end`'s day.

    Each day's records depend only on the seed and the date, so two runs on different days
    agree on the days they share: a later emulator holds the earlier one's records and more.
    Records stopping after the store's "now" stay invisible until their time comes.
    """
    return list(organisation_records(seed, start, end, count, shape))


def organisation_records(
    seed: int, start: dt.datetime | str, end: dt.datetime | str, count: int, shape: Shape = DEFAULT_SHAPE
) -> Iterator[dict[str, Any]]:
    """`generate_organisation`'s records a day at a time: a store of ten million fills without
    holding them all as dicts at once."""
    first = to_ns(start) // _NS_PER_DAY
    last = (to_ns(end) - 1) // _NS_PER_DAY
    days = last - first + 1
    per_day = max(count // max(days, 1), 1)
    for day in range(first, last + 1):
        day_start = day * _NS_PER_DAY
        yield from generate_records(
            seed, _instant(day_start), _instant(day_start + _NS_PER_DAY), per_day, stream=str(day),
            projects=shape.projects, users=shape.users, runners=shape.runners, classes=shape.classes,
            run_minutes=shape.run_minutes,
        )


def _instant(ns: int) -> str:
    return format_rfc3339(ns, 0)


PROJECT_NAMES = ("backend", "web-frontend", "mobile-app", "data-platform", "infra", "docs", "ml-models", "billing")
CLASS_NAMES = ("Small (2 vCPU, 8 GiB)", "Regular (4 vCPU, 16 GiB)", "Large (8 vCPU, 32 GiB)", "GPU (8 vCPU, 1 GPU)")
RUNNER_NAMES = ("AWS eu-central-1", "AWS us-east-1", "GCP europe-west3", "On-prem rack 2")


def organisation_names(seed: int, projects: int = 6, runners: int = 3, classes: int = 4, shape: Shape | None = None) -> dict[str, str]:
    """Names for the ids `generate_records(seed, ...)` uses, as the list endpoints return them."""
    if shape is not None:
        projects, runners, classes = shape.projects, shape.runners, shape.classes
    names: dict[str, str] = {}
    for kind, count, labels in (("project", projects, PROJECT_NAMES), ("runner", runners, RUNNER_NAMES),
                                ("environment-class", classes, CLASS_NAMES)):
        for i, entity in enumerate(_entity_ids(seed, kind, count)):
            names[entity] = labels[i % len(labels)] + (f" {i // len(labels) + 1}" if i >= len(labels) else "")
    return names
