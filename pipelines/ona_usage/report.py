"""A usage report from the daily model: one self-contained HTML file, or a PNG chart.

Every figure comes from SQL sums over `environment_usage_daily` through the pipeline's own SQL
client, so the report agrees with whatever an analyst gets from the same table. The HTML has no
network dependencies: inline CSS and an inline SVG chart drawn here, no scripts, no web fonts.
Its totals sit in elements with stable ids and a full-precision `data-value` (`#total-hours`,
`#total-runs`, `#active-users`, `#total-projects`), and the tables (`#top-users`,
`#top-projects`) carry `data-value` on every number, so checks and scrapers need not parse the
rounded text.

The view may carry name columns (`project_name`, `environment_class_name`, `runner_name`);
where one exists and holds a name it labels the id, otherwise the id itself is shown, and a
null project is `(no project)`.
"""

from __future__ import annotations

import html
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import dlt
from dlt.destinations.exceptions import DatabaseUndefinedRelation

from ona_usage.models import DAILY_MODEL
from ona_usage.state import RESOURCE_NAME
from ona_usage.settings import ConfigError

DEFAULT_DAYS = 30
TOP_SERIES = 8  # stacks in the chart; the rest is summed into "other"
TOP_ROWS = 10  # rows in the users and projects tables
OTHER = "other"
FORMATS = ("html", "png")
# What `by` stacks on: (id column, optional name column, label of a null id, noun for titles).
DIMENSIONS = {
    "project": ("project_id", "project_name", "(no project)", "project"),
    "environment_class": ("environment_class_id", "environment_class_name", "(no environment class)", "environment class"),
}
USER = ("user_id", "user_name", "(no user)", "user")
RUNNER = ("runner_id", "runner_name", "(no runner)", "runner")
# The breakdown tables: (element id, title, column heading, dimension).
BREAKDOWNS = (
    ("top-users", "Top users", "User", USER),
    ("top-projects", "Top projects", "Project", DIMENSIONS["project"]),
    ("top-environment-classes", "Environment classes", "Environment class", DIMENSIONS["environment_class"]),
    ("top-runners", "Runners", "Runner", RUNNER),
)
WEEKLY_AFTER_DAYS = 92  # a longer period is drawn a bar a week
MONTHLY_AFTER_DAYS = 400  # and a longer one still a bar a month
# Tableau 10 (matplotlib's tab10) for the top series; grey for "other".
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")
OTHER_COLOUR = "#9e9e9e"


class ReportError(ConfigError):
    """The report cannot be built as asked: no view yet, no data, or a bad option."""


@dataclass(frozen=True)
class ReportSummary:
    """What `build_report` wrote, with the figures shown in it."""

    path: Path
    fmt: str
    by: str
    start: date
    end: date  # exclusive
    days: int  # calendar days in [start, end)
    total_hours: float
    total_runs: int
    active_users: int
    projects: int  # distinct non-null project ids
    series: list[str] = field(default_factory=list)  # legend labels, bottom of the stack first


@dataclass(frozen=True)
class Group:
    """One id's figures for the period."""

    key: Any
    label: str
    hours: float
    runs: int
    cost: float | None = None  # None where some of its hours have no rate


@dataclass(frozen=True)
class Totals:
    """A period's totals; cost only where a rate card prices the hours."""

    hours: float
    runs: int
    users: int
    projects: int
    cost: float | None
    unpriced_hours: float


@dataclass
class ReportData:
    view: str
    by: str
    start: date
    end: date
    total_hours: float
    total_runs: int
    active_users: int
    projects: int
    days: list[date]
    series: list[str]  # stack order: biggest first, "other" last
    stacks: dict[str, list[float]]  # series label -> hours per day, aligned with `days`
    series_hours: dict[str, float]
    breakdowns: dict[str, list[Group]]  # by BREAKDOWNS id
    totals: Totals
    previous: Totals  # the period of the same length just before
    bucket: str  # "day", "week" or "month": what a bar is
    currency: str | None
    data_through: datetime | None  # the newest stoppedAt loaded
    last_sync: datetime | None  # when the newest load finished
    partial: date | None  # the bar whose bucket the data does not cover whole yet

    @property
    def top_users(self) -> list[Group]:
        return self.breakdowns["top-users"]

    @property
    def top_projects(self) -> list[Group]:
        return self.breakdowns["top-projects"]


def build_report(
    pipeline: dlt.Pipeline,
    out: Path,
    *,
    start: date | None = None,
    end: date | None = None,
    by: str = "project",
    fmt: str = "html",
) -> ReportSummary:
    """Write the report for `[start, end)` (UTC days) to `out`; by default the data's last 30 days.

    `by` is what the daily runtime bars are stacked by: "project" or "environment_class".
    `fmt` is "html" (a self-contained page) or "png" (the chart alone, via matplotlib).
    """
    if by not in DIMENSIONS:
        raise ReportError(f"cannot group the report by {by!r}; use one of: {', '.join(DIMENSIONS)}")
    if fmt not in FORMATS:
        raise ReportError(f"unknown report format {fmt!r}; use one of: {', '.join(FORMATS)}")
    start, end = _as_date(start), _as_date(end)
    if start is not None and end is not None and end <= start:
        raise ReportError(f"the report's end {end} must be after its start {start} (end is exclusive)")

    data = collect(pipeline, start=start, end=end, by=by)
    out = Path(out)
    if fmt == "html":
        _write_atomically(out, render_html(data).encode("utf-8"))
    else:
        _write_atomically(out, render_png(data))
    return ReportSummary(
        path=out,
        fmt=fmt,
        by=by,
        start=data.start,
        end=data.end,
        days=(data.end - data.start).days,
        total_hours=data.total_hours,
        total_runs=data.total_runs,
        active_users=data.active_users,
        projects=data.projects,
        series=list(data.series),
    )


# ---------------------------------------------------------------------------------------------
# Reading the view


def collect(pipeline: dlt.Pipeline, *, start: date | None, end: date | None, by: str) -> ReportData:
    """Everything the report shows, from SQL over the daily model."""
    _check_duckdb_file(pipeline)
    with pipeline.sql_client() as client:
        view = client.make_qualified_table_name(DAILY_MODEL)
        try:
            columns = _columns(client, view)
        except DatabaseUndefinedRelation:
            raise ReportError(
                f"the table {view} does not exist yet; run `ona-usage sync` first (it is refreshed after every load)"
            ) from None
        start, end = _period(client, view, start, end)
        span = end - start
        where = "usage_date >= %s AND usage_date < %s"
        bounds = (start, end)
        priced = "cost" in columns
        totals = _totals(client, view, where, bounds, priced)
        previous = _totals(client, view, where, (start - span, start), priced)
        id_column = DIMENSIONS[by][0]
        per_day = _rows(
            client,
            f"SELECT usage_date, {id_column}, SUM(runtime_hours) FROM {view} WHERE {where} GROUP BY usage_date, {id_column}",
            *bounds,
        )
        breakdowns = {ident: _groups(client, view, where, bounds, dimension, columns) for ident, _, _, dimension in BREAKDOWNS}
        groups = breakdowns["top-projects"] if by == "project" else breakdowns["top-environment-classes"]
        currency = _rows(client, f"SELECT MAX(currency) FROM {view} WHERE {where}", *bounds)[0][0] if priced else None
        data_through, last_sync = _freshness(client)

    bucket = "month" if span.days > MONTHLY_AFTER_DAYS else "week" if span.days > WEEKLY_AFTER_DAYS else "day"
    buckets = _buckets(start, end, bucket)
    # an "other" of a single series would say less than that series' own name
    shown = groups if len(groups) <= TOP_SERIES + 1 else groups[:TOP_SERIES]
    labels = _unique_labels(shown, reserved={OTHER} if len(shown) < len(groups) else set())
    series_of = {g.key: labels[i] for i, g in enumerate(shown)}
    series = list(labels)
    if len(shown) < len(groups):
        series.append(OTHER)
    index = {first: i for i, first in enumerate(buckets)}
    stacks = {name: [0.0] * len(buckets) for name in series}
    for usage_date, key, day_hours in per_day:
        i = index.get(_bucket_of(_as_date(usage_date), bucket))
        if i is not None and day_hours:
            stacks[series_of.get(key, OTHER)][i] += float(day_hours)
    series_hours = {name: math.fsum(values) for name, values in stacks.items()}
    return ReportData(
        view=view,
        by=by,
        start=start,
        end=end,
        total_hours=totals.hours,
        total_runs=totals.runs,
        active_users=totals.users,
        projects=totals.projects,
        days=buckets,
        series=series,
        stacks=stacks,
        series_hours=series_hours,
        breakdowns={ident: rows[:TOP_ROWS] for ident, rows in breakdowns.items()},
        totals=totals,
        previous=previous,
        bucket=bucket,
        currency=currency,
        data_through=data_through,
        last_sync=last_sync,
        partial=_partial_bucket(buckets, bucket, end, data_through),
    )


def _totals(client: Any, view: str, where: str, bounds: tuple[date, date], priced: bool) -> Totals:
    cost = "SUM(cost), SUM(CASE WHEN cost IS NULL THEN runtime_hours ELSE 0 END)" if priced else "NULL, NULL"
    hours, runs, users, projects, total_cost, unpriced = _rows(
        client,
        f"SELECT SUM(runtime_hours), SUM(runs), COUNT(DISTINCT user_id), COUNT(DISTINCT project_id), {cost} "
        f"FROM {view} WHERE {where}",
        *bounds,
    )[0]
    return Totals(
        hours=float(hours or 0.0),
        runs=int(runs or 0),
        users=int(users or 0),
        projects=int(projects or 0),
        cost=None if total_cost is None else float(total_cost),
        unpriced_hours=float(unpriced or 0.0),
    )


def _freshness(client: Any) -> tuple[datetime | None, datetime | None]:
    """The newest `stoppedAt` in the table, and when the newest load finished."""
    records = client.make_qualified_table_name(RESOURCE_NAME)
    loads = client.make_qualified_table_name("_dlt_loads")
    through = _rows(client, f"SELECT MAX(stopped_at) FROM {records}")[0][0]
    synced = _rows(client, f"SELECT MAX(inserted_at) FROM {loads} WHERE status = 0")[0][0]
    return _utc(through), _utc(synced)


def _utc(value: Any) -> datetime | None:
    if not isinstance(value, datetime):
        return None
    return value.astimezone(timezone.utc) if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _bucket_of(day: date, bucket: str) -> date:
    if bucket == "week":
        return day - timedelta(days=day.weekday())  # weeks start on Monday
    if bucket == "month":
        return day.replace(day=1)
    return day


def _buckets(start: date, end: date, bucket: str) -> list[date]:
    firsts: list[date] = []
    day = start
    while day < end:
        first = _bucket_of(day, bucket)
        if not firsts or firsts[-1] != first:
            firsts.append(first)
        day += timedelta(days=1)
    return firsts


def _partial_bucket(buckets: list[date], bucket: str, end: date, through: datetime | None) -> date | None:
    """The bar that holds the newest data, when its days are not all over yet (today, say).

    Drawn as partial, not as a collapse: its hours are what is known so far.
    """
    if through is None or not buckets:
        return None
    first = _bucket_of(through.date(), bucket)
    if first not in buckets:
        return None
    following = buckets[buckets.index(first) + 1] if first != buckets[-1] else end
    bucket_end = datetime(following.year, following.month, following.day, tzinfo=timezone.utc)
    return first if through < bucket_end - timedelta(microseconds=1) and through.date() >= buckets[-1] else None


def _check_duckdb_file(pipeline: dlt.Pipeline) -> None:
    """Refuse, rather than leave an empty database behind, when the DuckDB file is not there."""
    if pipeline.destination.destination_name != "duckdb":
        return
    params = pipeline.destination.config_params
    credentials = params.get("credentials")
    if not isinstance(credentials, (str, os.PathLike)) or "://" in str(credentials) or str(credentials).startswith((":", "md:")):
        return  # a connection, a URL or an in-memory database: nothing to look for
    path = Path(credentials)
    if not path.is_absolute():
        path = Path(params.get("local_dir") or ".") / path
    if not path.exists():
        raise ReportError(f"no DuckDB file at {path}; run `ona-usage sync` first")


def _rows(client: Any, sql: str, *args: Any) -> list[tuple]:
    return [tuple(row) for row in (client.execute_sql(sql, *args) or [])]


def _columns(client: Any, view: str) -> set[str]:
    with client.execute_query(f"SELECT * FROM {view} WHERE 1 = 0") as cursor:
        return {str(column[0]).lower() for column in cursor.description or ()}


def _period(client: Any, view: str, start: date | None, end: date | None) -> tuple[date, date]:
    """`[start, end)`; a missing end is the day after the data's last, a missing start 30 days earlier."""
    if end is None:
        last = _as_date(_rows(client, f"SELECT MAX(usage_date) FROM {view}")[0][0])
        if last is None:
            raise ReportError(f"the view {view} has no usage yet; run `ona-usage sync` first")
        end = last + timedelta(days=1)
        if start is not None and end <= start:
            raise ReportError(f"no usage on or after {start}: the data ends on {last}")
    if start is None:
        start = end - timedelta(days=DEFAULT_DAYS)
    return start, end


def _groups(
    client: Any,
    view: str,
    where: str,
    bounds: tuple[date, date],
    dimension: tuple[str, str | None, str, str],
    columns: set[str],
) -> list[Group]:
    """Hours and runs per id over the period, biggest first, labelled by name where there is one."""
    id_column, name_column, null_label, _ = dimension
    name = f"MAX({name_column})" if name_column and name_column in columns else "NULL"
    # a group's cost only if every one of its rows is priced: never a partial sum
    cost = "CASE WHEN COUNT(cost) = COUNT(*) THEN SUM(cost) END" if "cost" in columns else "NULL"
    rows = _rows(
        client,
        f"SELECT {id_column}, {name}, SUM(runtime_hours), SUM(runs), {cost} FROM {view} WHERE {where} GROUP BY {id_column}",
        *bounds,
    )
    groups = [
        Group(
            key=key,
            label=_label(key, label, null_label),
            hours=float(hours or 0.0),
            runs=int(runs or 0),
            cost=None if group_cost is None else float(group_cost),
        )
        for key, label, hours, runs, group_cost in rows
    ]
    return sorted(groups, key=group_order)


def group_order(group: Group) -> tuple:
    """Most hours first; ties by runs, then by id (a null id last)."""
    return (-group.hours, -group.runs, group.key is None, str(group.key))


def _label(key: Any, name: Any, null_label: str) -> str:
    if name is not None and str(name).strip():
        return str(name)
    return null_label if key is None else str(key)


def _unique_labels(groups: Sequence[Group], reserved: set[str]) -> list[str]:
    """The groups' labels, with the id appended where two would read the same."""
    counts: dict[str, int] = defaultdict(int)
    for g in groups:
        counts[g.label] += 1
    return [
        f"{g.label} ({g.key})" if (counts[g.label] > 1 or g.label in reserved) and g.key is not None else g.label
        for g in groups
    ]


def _as_date(value: Any) -> date | None:
    if value is None or type(value) is date:
        return value
    if isinstance(value, datetime):
        return (value.astimezone(timezone.utc) if value.tzinfo else value).date()
    if isinstance(value, date):
        return date(value.year, value.month, value.day)
    return date.fromisoformat(str(value)[:10])


def _write_atomically(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_bytes(content)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# HTML


def colours(series: Sequence[str]) -> dict[str, str]:
    return {name: OTHER_COLOUR if name == OTHER else PALETTE[i % len(PALETTE)] for i, name in enumerate(series)}


def render_html(data: ReportData) -> str:
    e = _escape
    last_day = data.end - timedelta(days=1)
    noun = DIMENSIONS[data.by][3]
    period = f"{_long_date(data.start)} – {_long_date(last_day)}"
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    palette = colours(data.series)
    legend = "\n".join(
        f'<li data-series="{e(name)}" data-hours="{data.series_hours[name]!r}">'
        f'<span class="swatch" style="background:{palette[name]}"></span>'
        f'<span class="series-name">{e(name)}</span> <span class="muted">{_hours(data.series_hours[name])} h</span></li>'
        for name in data.series
    )
    now, before = data.totals, data.previous
    cards = [
        ("Runtime hours", "total-hours", now.hours, before.hours, _hours(now.hours)),
        ("Runs", "total-runs", now.runs, before.runs, f"{now.runs:,}"),
        ("Active users", "active-users", now.users, before.users, f"{now.users:,}"),
        ("Projects", "total-projects", now.projects, before.projects, f"{now.projects:,}"),
    ]
    if now.cost is not None:
        cards.append(("Cost", "total-cost", now.cost, before.cost, _money(now.cost, data.currency)))
    span = (data.end - data.start).days
    totals = "\n".join(
        f'<div class="card"><div class="card-label">{label}</div>'
        f'<div class="card-value"><span id="{ident}" data-value="{value!r}">{text}</span></div>'
        f'{_change(ident, value, previous, span)}</div>'
        for label, ident, value, previous, text in cards
    )
    freshness = (
        f'<p class="freshness muted" id="data-through" data-through="{e(_iso(data.data_through))}" '
        f'data-last-sync="{e(_iso(data.last_sync))}">Data through {e(_when(data.data_through))} '
        f"(the newest run that stopped) · last sync {e(_when(data.last_sync))}"
        + (f' · <span class="partial-note">the {e(data.bucket)} of {e(data.partial.isoformat())} is partial: it shows what is known so far</span>' if data.partial else "")
        + "</p>"
    )
    unpriced = (
        f" {_hours(now.unpriced_hours)} of the hours have no rate in the rate card, so no cost."
        if now.cost is not None and now.unpriced_hours > 0
        else ""
    )
    tables = "\n".join(_table(ident, title, what, data.breakdowns[ident], priced=now.cost is not None) for ident, title, what, _ in BREAKDOWNS)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Ona usage report: {e(data.start.isoformat())} to {e(last_day.isoformat())}</title>
<style>
{CSS}
</style>
</head>
<body>
<main>
<header>
<h1>Ona environment usage</h1>
<p class="period" id="period" data-start="{e(data.start.isoformat())}" data-end="{e(data.end.isoformat())}">
{e(period)} <span class="muted">({(data.end - data.start).days} days, UTC)</span></p>
</header>
{freshness}
<section class="totals" aria-label="Totals">
{totals}
</section>
<section class="chart-section">
<h2>Runtime hours per {e(data.bucket)}, by {e(noun)}</h2>
{render_svg(data, palette)}
<ul class="legend" id="legend">
{legend}
</ul>
</section>
<div class="tables">
{tables}
</div>
<footer class="muted">
Generated {e(generated)} from <code>{e(data.view)}</code>, days {e(data.start.isoformat())} up to
but not including {e(data.end.isoformat())}; changes are against the {span} days before. Runtime is split
across the UTC days a run spans; a run counts on the day it stopped. Cost is hours times the rate valid
that day.{e(unpriced)}
</footer>
</main>
</body>
</html>
"""


CSS = """\
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; background: #f5f6f8; color: #1d2330;
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1140px; margin: 0 auto; padding: 24px 20px 32px; }
h1 { font-size: 24px; margin: 0 0 2px; }
h2 { font-size: 16px; margin: 0 0 12px; }
.period { margin: 0 0 18px; font-size: 15px; }
.muted { color: #69707d; }
.totals { display: grid; grid-template-columns: repeat(auto-fit, minmax(170px, 1fr)); gap: 12px; margin-bottom: 18px; }
.freshness { margin: -10px 0 14px; font-size: 12px; }
.change { font-size: 12px; color: #69707d; }
.change.up { color: #1a7f37; } .change.down { color: #b42318; }
.chart .partial { opacity: .45; }
.chart .partial-mark { font-size: 11px; fill: #69707d; }
.card, .chart-section, .table-card { background: #fff; border: 1px solid #e1e4ea; border-radius: 8px; }
.card { padding: 12px 16px; }
.card-label { color: #69707d; font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card-value { font-size: 26px; font-weight: 600; font-variant-numeric: tabular-nums; }
.chart-section { padding: 16px; margin-bottom: 18px; }
.chart { display: block; width: 100%; height: auto; }
.chart .axis text { font-size: 11px; fill: #69707d; }
.chart .grid { stroke: #e8eaef; }
.chart .baseline { stroke: #9aa1ad; }
.chart .empty { font-size: 16px; fill: #69707d; }
.legend { list-style: none; display: flex; flex-wrap: wrap; gap: 6px 18px; margin: 10px 0 0; padding: 0; }
.legend li { display: flex; align-items: center; gap: 6px; }
.swatch { display: inline-block; width: 12px; height: 12px; border-radius: 2px; }
.tables { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; }
.table-card { padding: 16px; overflow-x: auto; }
table { width: 100%; border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid #eef0f3; }
th { font-size: 12px; color: #69707d; font-weight: 600; }
td.num, th.num { text-align: right; }
td.name { word-break: break-all; }
.id { display: block; font-size: 11px; color: #8a909b; }
footer { margin-top: 18px; font-size: 12px; }
@media (max-width: 760px) { .totals { grid-template-columns: 1fr 1fr; } .tables { grid-template-columns: 1fr; } }
"""


def render_svg(data: ReportData, palette: dict[str, str]) -> str:
    """A stacked bar per day; every bar segment is a `rect.bar` with its day, series and hours."""
    e = _escape
    width, height = 1100, 380
    left, right, top, bottom = 64, 16, 14, 46
    plot_w, plot_h = width - left - right, height - top - bottom
    count = max(len(data.days), 1)
    day_totals = [math.fsum(data.stacks[s][i] for s in data.series) for i in range(len(data.days))]
    peak = max(day_totals, default=0.0)
    ticks = nice_ticks(peak)
    y_top = ticks[-1]
    slot = plot_w / count
    bar_w = max(slot * 0.78, 1.0)
    parts = [
        f'<svg id="usage-chart" class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="Runtime hours per day, by {e(DIMENSIONS[data.by][3])}">'
    ]
    parts.append('<g class="axis y-axis">')
    for tick in ticks:
        y = top + plot_h - tick / y_top * plot_h
        parts.append(f'<line class="grid" x1="{left}" x2="{width - right}" y1="{y:.2f}" y2="{y:.2f}"/>')
        parts.append(f'<text x="{left - 8}" y="{y + 4:.2f}" text-anchor="end">{_tick(tick)}</text>')
    parts.append(
        f'<text transform="translate(14 {top + plot_h / 2:.1f}) rotate(-90)" text-anchor="middle">runtime hours</text>'
    )
    parts.append("</g>")
    parts.append('<g class="bars">')
    for i, day in enumerate(data.days):
        x = left + i * slot + (slot - bar_w) / 2
        base = 0.0
        partial = day == data.partial
        for name in data.series:
            hours = data.stacks[name][i]
            if hours <= 0:
                continue
            y0 = top + plot_h - (base + hours) / y_top * plot_h
            h = hours / y_top * plot_h
            base += hours
            parts.append(
                f'<rect class="bar{" partial" if partial else ""}" x="{x:.2f}" y="{y0:.2f}" width="{bar_w:.2f}" '
                f'height="{h:.2f}" fill="{palette[name]}" data-day="{day.isoformat()}" data-series="{e(name)}" '
                f'data-hours="{hours!r}"><title>{day.isoformat()} · {e(name)}: {_hours(hours)} h'
                f'{" (partial)" if partial else ""}</title></rect>'
            )
        if partial:
            y = top + plot_h - base / y_top * plot_h - 4
            parts.append(f'<text class="partial-mark" id="partial-mark" x="{x + bar_w / 2:.2f}" y="{y:.2f}" text-anchor="middle">partial</text>')
    parts.append("</g>")
    parts.append('<g class="axis x-axis">')
    parts.append(
        f'<line class="baseline" x1="{left}" x2="{width - right}" y1="{top + plot_h}" y2="{top + plot_h}"/>'
    )
    step = max(1, math.ceil(count / 15))
    for i in range(0, len(data.days), step):
        x = left + (i + 0.5) * slot
        parts.append(f'<text x="{x:.2f}" y="{top + plot_h + 18}" text-anchor="middle">{_short_date(data.days[i])}</text>')
    parts.append("</g>")
    if peak <= 0:
        parts.append(
            f'<text class="empty" x="{left + plot_w / 2}" y="{top + plot_h / 2}" text-anchor="middle">No usage in this period</text>'
        )
    parts.append("</svg>")
    return "\n".join(parts)


def nice_ticks(peak: float, target: int = 5) -> list[float]:
    """0 and round steps up to at least `peak` (0..1 for an empty chart)."""
    if peak <= 0:
        return [0.0, 1.0]
    raw = peak / target
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    n = math.ceil(peak / step - 1e-9)
    return [i * step for i in range(n + 1)]


def _table(ident: str, title: str, what: str, groups: Sequence[Group], *, priced: bool = False) -> str:
    e = _escape
    rows = []
    for rank, g in enumerate(groups, start=1):
        key = "" if g.key is None else str(g.key)
        shown_id = f'<span class="id">{e(key)}</span>' if key and key != g.label else ""
        cost = ""
        if priced:
            shown = "—" if g.cost is None else f"{g.cost:,.2f}"
            cost = f'<td class="num cost" data-value="{"" if g.cost is None else repr(g.cost)}">{shown}</td>'
        rows.append(
            f'<tr data-key="{e(key)}" title="{e(key)}"><td class="num">{rank}</td>'
            f'<td class="name"><span class="label">{e(g.label)}</span>{shown_id}</td>'
            f'<td class="num hours" data-value="{g.hours!r}">{_hours(g.hours)}</td>'
            f'<td class="num runs" data-value="{g.runs}">{g.runs:,}</td>{cost}</tr>'
        )
    if not rows:
        rows.append(f'<tr><td colspan="{5 if priced else 4}" class="muted">No usage in this period</td></tr>')
    cost_heading = '<th class="num">Cost</th>' if priced else ""
    return (
        f'<section class="table-card"><h2>{e(title)}</h2>\n<table id="{ident}">\n'
        f'<thead><tr><th class="num">#</th><th>{e(what)}</th><th class="num">Hours</th><th class="num">Runs</th>{cost_heading}</tr></thead>\n'
        f"<tbody>\n" + "\n".join(rows) + "\n</tbody>\n</table></section>"
    )


def _change(ident: str, value: float, previous: float | None, days: int) -> str:
    """The change against the period before, e.g. "+12.5% vs the 30 days before"."""
    if previous is None:
        return ""
    if previous == 0:
        text, direction = ("new" if value else "no change"), "up" if value else ""
    else:
        ratio = (value - previous) / previous
        text, direction = f"{ratio:+.1%}", "up" if ratio > 0 else "down" if ratio < 0 else ""
    return (
        f'<div class="change {direction}" id="{ident}-change" data-previous="{previous!r}">'
        f"{_escape(text)} vs the {days} days before</div>"
    )


def _money(value: float, currency: str | None) -> str:
    return f"{value:,.2f}" + (f" {currency}" if currency else "")


def _iso(value: datetime | None) -> str:
    return value.isoformat() if value else ""


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC") if value else "unknown"


def _escape(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _hours(value: float) -> str:
    return f"{value:,.1f}"


def _tick(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"


def _long_date(day: date) -> str:
    return f"{day.day} {day:%b %Y}"


def _short_date(day: date) -> str:
    return f"{day:%b} {day.day}"


# ---------------------------------------------------------------------------------------------
# PNG


def render_png(data: ReportData) -> bytes:
    """The same stacked chart via matplotlib's Agg canvas (no pyplot, no global backend)."""
    try:
        import matplotlib.dates as mdates
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ReportError("PNG reports need matplotlib: pip install matplotlib") from None
    import io

    figure = Figure(figsize=(12, 6), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    palette = colours(data.series)
    x = mdates.date2num(data.days)  # numbers, not dates: a date drops a fraction of a day
    base = [0.0] * len(data.days)
    width = {"day": 0.8, "week": 5.6, "month": 24.0}[data.bucket]
    alphas = [0.45 if day == data.partial else 1.0 for day in data.days]  # a partial bar reads as such
    for name in data.series:
        values = data.stacks[name]
        bars = axes.bar(x, values, bottom=base, width=width, color=palette[name], label=_plain(name), linewidth=0)
        for bar, alpha in zip(bars, alphas):
            bar.set_alpha(alpha)
        base = [b + v for b, v in zip(base, values)]
    last_day = data.end - timedelta(days=1)
    noun = DIMENSIONS[data.by][3]
    figure.suptitle(f"Ona environment usage, {_long_date(data.start)} – {_long_date(last_day)} (UTC)", fontsize=14)
    axes.set_title(
        f"{_hours(data.total_hours)} runtime hours · {data.total_runs:,} runs · "
        f"{data.active_users:,} active users · {data.projects:,} projects — stacked by {noun}",
        fontsize=10,
        color="#555555",
    )
    axes.set_ylabel("runtime hours")
    axes.set_xlim(x[0] - 0.6, x[-1] + 0.6)
    axes.xaxis_date()
    axes.xaxis.set_major_locator(mdates.AutoDateLocator(minticks=4, maxticks=15))
    axes.xaxis.set_major_formatter(mdates.DateFormatter("%b %d"))
    axes.grid(axis="y", color="#e6e6e6")
    axes.set_axisbelow(True)
    for side in ("top", "right"):
        axes.spines[side].set_visible(False)
    if data.series:
        # below the chart, where the constrained layout makes room for it
        figure.legend(loc="outside lower center", ncols=min(3, len(data.series)), frameon=False, fontsize=9)
    else:
        axes.set_ylim(0, 1)
        axes.text(0.5, 0.5, "No usage in this period", transform=axes.transAxes, ha="center", color="#777777")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _plain(text: str) -> str:
    """Text matplotlib draws as it is: a `$` would otherwise start mathtext (and can fail to parse),
    and a legend leaves out labels that start with `_`."""
    text = text.replace("$", r"\$")
    return f" {text}" if text.startswith("_") else text
