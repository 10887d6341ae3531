"""The usage report: its figures equal SQL over the daily view, and it renders in a real browser.

The browser checks need Chromium (`scripts/ensure-chromium` installs Debian's); without it they
skip, except under CI (the `CI` environment variable set), where they fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from datetime import date, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import duckdb
import pendulum
import pytest

from conftest import API_KEY, isolate, make_records, recent_records
from ona_emulator import EmulatorServer, UsageStore
from ona_usage import report, settings
from ona_usage.pipeline import make_pipeline, run_sync
from ona_usage.report import OTHER, ReportError, build_report
from test_operations import config

DB = "ona_usage.duckdb"
VIEW = "ona.environment_usage_daily"
HOSTILE_USER = "<img src=x onerror=alert(1)>&\"' user"
HOSTILE_PROJECT = "<script>alert('p')</script> & co"


# ---------------------------------------------------------------------------------------------
# Fixtures: one synced organisation for the read-only tests


def organisation() -> list[dict[str, Any]]:
    """Synthetic usage (some of it without a project) plus a user and a project named to break HTML."""
    day = pendulum.now("UTC").start_of("day").subtract(days=3)
    hostile = make_records(day.add(hours=6), 3, "hostile")
    for record in hostile:
        record |= {"userId": HOSTILE_USER, "projectId": HOSTILE_PROJECT, "createdAt": day.subtract(hours=30).to_iso8601_string()}
    return recent_records(1_200, days=40) + hostile


def sync_into(root: Path, records: list[dict[str, Any]]) -> None:
    store = UsageStore()
    store.add(records)
    # the API's names for them are just as hostile
    store.names = {HOSTILE_PROJECT: HOSTILE_PROJECT, HOSTILE_USER: HOSTILE_USER}
    with EmulatorServer(store, api_key=API_KEY) as server:
        run_sync(config(server, start_date=pendulum.now("UTC").subtract(days=45).to_date_string()))


@pytest.fixture(scope="module")
def synced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as monkeypatch:
        isolate(monkeypatch, root)
        sync_into(root, organisation())
    return root


@pytest.fixture
def pipeline(synced: Path, monkeypatch: pytest.MonkeyPatch):
    isolate(monkeypatch, synced)
    return make_pipeline(settings.resolve({}))


@pytest.fixture(scope="module")
def default_html(synced: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[report.ReportSummary, str]:
    """The default report (last 30 days of data, by project), built once for the module."""
    out = tmp_path_factory.mktemp("html") / "report.html"
    with pytest.MonkeyPatch.context() as monkeypatch:
        isolate(monkeypatch, synced)
        summary = build_report(make_pipeline(settings.resolve({})), out)
    return summary, out.read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# SQL, straight from the view


def sql(db: Path, query: str, *args: Any) -> list[tuple]:
    with duckdb.connect(str(db), read_only=True) as conn:
        return conn.execute(query, list(args)).fetchall()


def sql_totals(db: Path, start: date, end: date) -> tuple[float, int, int, int]:
    (row,) = sql(
        db,
        f"SELECT COALESCE(SUM(runtime_hours), 0), COALESCE(SUM(runs), 0), COUNT(DISTINCT user_id), COUNT(DISTINCT project_id) "
        f"FROM {VIEW} WHERE usage_date >= ? AND usage_date < ?",
        start,
        end,
    )
    return float(row[0]), int(row[1]), int(row[2]), int(row[3])


NAME_COLUMNS = {"project_id": "project_name", "environment_class_id": "environment_class_name", "user_id": "user_name"}


def view_columns(db: Path) -> set[str]:
    return {row[0] for row in sql(db, f"DESCRIBE {VIEW}")}


def sql_top(
    db: Path, column: str, null_label: str, start: date, end: date, limit: int = report.TOP_ROWS, *, ids: bool = False
) -> list[tuple]:
    """(label, hours, runs) per id, biggest first; the label is the name where the view has one."""
    label = f"COALESCE({column}, '{null_label}')"
    name = NAME_COLUMNS.get(column)
    if name in view_columns(db) and not ids:
        label = f"COALESCE(CASE WHEN TRIM(MAX({name})) <> '' THEN MAX({name}) END, {label})"
    rows = sql(
        db,
        f"SELECT {label}, SUM(runtime_hours) AS hours, SUM(runs) AS runs FROM {VIEW} "
        f"WHERE usage_date >= ? AND usage_date < ? GROUP BY {column} ORDER BY hours DESC, runs DESC, {column} NULLS LAST LIMIT {limit}",
        start,
        end,
    )
    return [(label, float(hours), int(runs)) for label, hours, runs in rows]


# ---------------------------------------------------------------------------------------------
# Reading the HTML (the file as written, or the DOM as Chromium built it)


class Node:
    def __init__(self, tag: str, attrs: list[tuple[str, str | None]], parent: Node | None) -> None:
        self.tag, self.attrs, self.parent = tag, {k: v or "" for k, v in attrs}, parent
        self.children: list[Node] = []
        self.parts: list[Node | str] = []

    @property
    def text(self) -> str:
        return "".join(p if isinstance(p, str) else p.text for p in self.parts)

    def iter(self) -> Iterator[Node]:
        yield self
        for child in self.children:
            yield from child.iter()

    def find_all(self, tag: str, cls: str | None = None) -> list[Node]:
        return [n for n in self.iter() if n.tag == tag and (cls is None or cls in n.attrs.get("class", "").split())]

    def by_id(self, ident: str) -> Node:
        (node,) = [n for n in self.iter() if n.attrs.get("id") == ident]
        return node


class Tree(HTMLParser):
    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.root = self.current = Node("#root", [], None)
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list) -> None:
        node = Node(tag, attrs, self.current)
        self.current.children.append(node)
        self.current.parts.append(node)
        if tag not in self.VOID:
            self.current = node

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        node = Node(tag, attrs, self.current)
        self.current.children.append(node)
        self.current.parts.append(node)

    def handle_endtag(self, tag: str) -> None:
        node = self.current
        while node.parent is not None and node.tag != tag:
            node = node.parent
        if node.parent is not None:
            self.current = node.parent

    def handle_data(self, data: str) -> None:
        self.current.parts.append(data)


def parse(text: str) -> Node:
    return Tree(text).root


def totals_shown(root: Node) -> dict[str, tuple[str, str]]:
    """`id -> (data-value, text)` of the four totals."""
    return {
        ident: (root.by_id(ident).attrs["data-value"], root.by_id(ident).text.strip())
        for ident in ("total-hours", "total-runs", "active-users", "total-projects")
    }


def table_rows(root: Node, ident: str) -> list[tuple[str, float, int]]:
    rows = []
    for tr in root.by_id(ident).find_all("tr"):
        if not tr.find_all("td", "hours"):
            continue
        (label,) = tr.find_all("span", "label")
        (hours,) = tr.find_all("td", "hours")
        (runs,) = tr.find_all("td", "runs")
        rows.append((label.text, float(hours.attrs["data-value"]), int(runs.attrs["data-value"])))
    return rows


def bars(root: Node) -> list[dict[str, str]]:
    (chart,) = [n for n in root.find_all("svg") if n.attrs.get("id") == "usage-chart"]
    return [rect.attrs for rect in chart.find_all("rect", "bar")]


def legend(root: Node) -> list[str]:
    return [li.attrs["data-series"] for li in root.by_id("legend").find_all("li")]


def assert_totals_equal_sql(root: Node, expected: tuple[float, int, int, int]) -> None:
    hours, runs, users, projects = expected
    shown = totals_shown(root)
    assert float(shown["total-hours"][0]) == pytest.approx(hours, rel=1e-6)
    assert shown["total-hours"][1] == f"{hours:,.1f}"
    assert (int(shown["total-runs"][0]), shown["total-runs"][1]) == (runs, f"{runs:,}")
    assert (int(shown["active-users"][0]), shown["active-users"][1]) == (users, f"{users:,}")
    assert (int(shown["total-projects"][0]), shown["total-projects"][1]) == (projects, f"{projects:,}")


def assert_rows_equal(actual: list[tuple[str, float, int]], expected: list[tuple[str, float, int]]) -> None:
    assert [(label, runs) for label, _, runs in actual] == [(label, runs) for label, _, runs in expected]
    for (_, hours, _), (_, want, _) in zip(actual, expected):
        assert hours == pytest.approx(want, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# (a) the HTML's figures are SQL's


def test_html_totals_and_tables_equal_sql_over_the_default_period(synced, default_html):
    summary, text = default_html
    (last,) = sql(synced / DB, f"SELECT MAX(usage_date) FROM {VIEW}")[0]
    assert (summary.start, summary.end, summary.days) == (last + timedelta(days=1) - timedelta(days=30), last + timedelta(days=1), 30)

    expected = sql_totals(synced / DB, summary.start, summary.end)
    root = parse(text)
    assert_totals_equal_sql(root, expected)
    assert summary.total_hours == pytest.approx(expected[0], rel=1e-6) and summary.total_runs == expected[1]
    period = root.by_id("period").attrs
    assert (period["data-start"], period["data-end"]) == (summary.start.isoformat(), summary.end.isoformat())

    assert_rows_equal(table_rows(root, "top-users"), sql_top(synced / DB, "user_id", "(no user)", summary.start, summary.end))
    assert_rows_equal(
        table_rows(root, "top-projects"), sql_top(synced / DB, "project_id", "(no project)", summary.start, summary.end)
    )

    # the chart: one segment per day and series with runtime, adding up to the total
    segments = bars(root)
    assert segments and {s["data-day"] for s in segments} <= {(summary.start + timedelta(days=i)).isoformat() for i in range(30)}
    assert sum(float(s["data-hours"]) for s in segments) == pytest.approx(expected[0], rel=1e-6)
    assert legend(root) == summary.series and {s["data-series"] for s in segments} <= set(summary.series)
    assert "(no project)" in summary.series


def test_names_and_ids_are_escaped_and_the_page_needs_no_network(default_html):
    summary, text = default_html
    root = parse(text)
    # the hostile strings are text in the tables and the legend, never markup
    assert HOSTILE_USER in [label for label, _, _ in table_rows(root, "top-users")]
    assert HOSTILE_PROJECT in [label for label, _, _ in table_rows(root, "top-projects")]
    assert HOSTILE_PROJECT in legend(root)
    assert not root.find_all("img") and not root.find_all("script")
    assert "<img src=x" not in text and "<script>alert" not in text
    # self-contained: no scripts, links, external resources or fonts; the only URL is SVG's namespace
    for node in root.iter():
        assert node.tag not in {"script", "link", "img", "iframe", "object", "embed", "audio", "video", "image"}, node.tag
        assert not {"src", "srcset", "href", "xlink:href"} & node.attrs.keys(), node.attrs
        assert "url(" not in node.attrs.get("style", "")
    (style,) = root.find_all("style")
    assert not any(needle in style.text.lower() for needle in ("url(", "@import", "@font-face"))
    assert text.lower().count("http") == 1 and 'xmlns="http://www.w3.org/2000/svg"' in text


def test_an_explicit_period_by_environment_class(pipeline, synced, tmp_path):
    (last,) = sql(synced / DB, f"SELECT MAX(usage_date) FROM {VIEW}")[0]
    start, end = last - timedelta(days=10), last - timedelta(days=3)
    summary = build_report(pipeline, tmp_path / "week.html", start=start, end=end, by="environment_class")

    assert (summary.start, summary.end, summary.days) == (start, end, 7)
    root = parse((tmp_path / "week.html").read_text(encoding="utf-8"))
    expected = sql_totals(synced / DB, start, end)
    assert_totals_equal_sql(root, expected)
    assert_rows_equal(table_rows(root, "top-users"), sql_top(synced / DB, "user_id", "(no user)", start, end))
    classes = sql_top(synced / DB, "environment_class_id", "(no environment class)", start, end, limit=1000)
    assert summary.series == [label for label, _, _ in classes]  # 5 classes: no "other"
    segments = bars(root)
    assert {s["data-day"] for s in segments} == {(start + timedelta(days=i)).isoformat() for i in range(7)}
    assert sum(float(s["data-hours"]) for s in segments) == pytest.approx(expected[0], rel=1e-6)


def test_series_beyond_the_top_n_are_summed_into_other(pipeline, synced, tmp_path, monkeypatch):
    monkeypatch.setattr(report, "TOP_SERIES", 3)
    summary = build_report(pipeline, tmp_path / "r.html")
    projects = sql_top(synced / DB, "project_id", "(no project)", summary.start, summary.end, limit=1000)
    assert len(projects) > 4
    assert summary.series == [label for label, _, _ in projects[:3]] + [OTHER]

    root = parse((tmp_path / "r.html").read_text(encoding="utf-8"))
    per_series: dict[str, float] = {}
    for segment in bars(root):
        per_series[segment["data-series"]] = per_series.get(segment["data-series"], 0.0) + float(segment["data-hours"])
    for label, hours, _ in projects[:3]:
        assert per_series[label] == pytest.approx(hours, rel=1e-6)
    assert per_series[OTHER] == pytest.approx(sum(h for _, h, _ in projects[3:]), rel=1e-6)


def test_a_period_without_usage_is_an_empty_report(pipeline, tmp_path):
    summary = build_report(pipeline, tmp_path / "empty.html", start=date(2001, 1, 1), end=date(2001, 1, 8))
    assert (summary.total_hours, summary.total_runs, summary.days, summary.series) == (0.0, 0, 7, [])
    root = parse((tmp_path / "empty.html").read_text(encoding="utf-8"))
    assert_totals_equal_sql(root, (0.0, 0, 0, 0))
    assert bars(root) == [] and "No usage in this period" in root.by_id("usage-chart").text


def test_bad_options_and_a_missing_view_are_report_errors(pipeline, tmp_path, monkeypatch):
    with pytest.raises(ReportError, match="group"):
        build_report(pipeline, tmp_path / "r.html", by="user")
    with pytest.raises(ReportError, match="format"):
        build_report(pipeline, tmp_path / "r.pdf", fmt="pdf")
    with pytest.raises(ReportError, match="after its start"):
        build_report(pipeline, tmp_path / "r.html", start=date(2024, 2, 1), end=date(2024, 2, 1))
    with pytest.raises(ReportError, match="no usage on or after"):
        build_report(pipeline, tmp_path / "r.html", start=date.today() + timedelta(days=30))

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    isolate(monkeypatch, fresh)
    with pytest.raises(ReportError, match="sync"):
        build_report(make_pipeline(settings.resolve({})), fresh / "r.html")
    assert not (fresh / DB).exists()  # and it did not leave an empty database behind
    assert not list(tmp_path.glob("r.*"))


def test_name_columns_label_the_ids_where_the_view_has_them(workdir, tmp_path):
    """Names where the view has them, the id where a name is null, `(no project)` for no project."""
    records = recent_records(300, days=10, seed=11)
    records.append({k: v for k, v in make_records(pendulum.now("UTC").subtract(days=1), 1, "noproj")[0].items() if k != "projectId"})
    sync_into(workdir, records)
    db = workdir / DB
    (last,) = sql(db, f"SELECT MAX(usage_date) FROM {VIEW}")[0]
    projects = [p for p, _, _ in sql_top(db, "project_id", "(no project)", last - timedelta(days=29), last + timedelta(days=1), 100, ids=True)]
    named, dollars, unnamed = [p for p in projects if p != "(no project)"][:3]
    label_of = {named: 'Frontend <web> & "apps"', dollars: "Cost $center$ \\oops{"}
    classes = [c for c, _, _ in sql_top(db, "environment_class_id", "-", date(2000, 1, 1), date(2100, 1, 1), 100, ids=True)]
    # the view's rows with name columns of the test's own (replacing any the view has already)
    names = [c for c in ("project_name", "environment_class_name", "runner_name") if c in view_columns(db)]
    rows = f"d.* EXCLUDE ({', '.join(names)})" if names else "d.*"
    with duckdb.connect(str(db)) as conn:
        conn.execute(f"CREATE TABLE ona.daily_rows AS SELECT * FROM {VIEW}")
        conn.execute("CREATE TABLE ona.project_names (project_id VARCHAR, project_name VARCHAR)")
        conn.executemany("INSERT INTO ona.project_names VALUES (?, ?)", list(label_of.items()))
        conn.execute("CREATE TABLE ona.class_names AS SELECT ? AS environment_class_id, 'Large' AS environment_class_name", [classes[0]])
        conn.execute(
            f"CREATE OR REPLACE TABLE {VIEW} AS SELECT {rows}, p.project_name, c.environment_class_name, "
            "CAST(NULL AS VARCHAR) AS runner_name FROM ona.daily_rows AS d "
            "LEFT JOIN ona.project_names AS p ON p.project_id = d.project_id "
            "LEFT JOIN ona.class_names AS c ON c.environment_class_id = d.environment_class_id"
        )
    pipeline = make_pipeline(settings.resolve({}))

    summary = build_report(pipeline, tmp_path / "named.html")
    root = parse((tmp_path / "named.html").read_text(encoding="utf-8"))
    assert summary.series == [label_of.get(p, p) for p in projects] and "(no project)" in summary.series
    labels = {label for label, _, _ in table_rows(root, "top-projects")}
    assert {'Frontend <web> & "apps"', "Cost $center$ \\oops{", unnamed, "(no project)"} <= labels
    shown_ids = {n.text for n in root.by_id("top-projects").find_all("span", "id")}
    assert {named, dollars} <= shown_ids and unnamed not in shown_ids  # the id under a name
    assert_totals_equal_sql(root, sql_totals(db, summary.start, summary.end))
    assert_rows_equal(table_rows(root, "top-projects"), sql_top(db, "project_id", "(no project)", summary.start, summary.end))

    by_class = build_report(pipeline, tmp_path / "named.png", by="environment_class", fmt="png")
    assert by_class.series[0] == "Large" and set(by_class.series[1:]) == set(classes[1:])
    by_project = build_report(pipeline, tmp_path / "dollars.png", fmt="png")  # `$` is no mathtext
    assert (tmp_path / "dollars.png").read_bytes().startswith(b"\x89PNG") and by_project.series == summary.series


# ---------------------------------------------------------------------------------------------
# (b) in a real headless Chromium


def chromium() -> str:
    path = "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else shutil.which("chromium")
    if path:
        return path
    reason = "no chromium binary (/usr/bin/chromium or on PATH); scripts/ensure-chromium installs Debian's"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def run_chromium(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
    ]
    env = {**os.environ, "HOME": str(profile)}
    result = subprocess.run([browser, *flags, *args], capture_output=True, text=True, timeout=90, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def test_the_report_renders_in_headless_chromium(synced, default_html, tmp_path):
    from PIL import Image

    browser = chromium()
    summary, text = default_html
    page = tmp_path / "report.html"
    page.write_text(text, encoding="utf-8")

    dom = parse(run_chromium(browser, tmp_path / "profile-dom", "--dump-dom", page.as_uri()).stdout)
    expected = sql_totals(synced / DB, summary.start, summary.end)
    assert_totals_equal_sql(dom, expected)
    segments = bars(dom)
    assert len(segments) == len(bars(parse(text))) > 0
    assert sum(float(s["data-hours"]) for s in segments) == pytest.approx(expected[0], rel=1e-6)
    assert legend(dom) == summary.series
    assert_rows_equal(table_rows(dom, "top-users"), sql_top(synced / DB, "user_id", "(no user)", summary.start, summary.end))
    assert not dom.find_all("img") and not dom.find_all("script")  # the hostile names stayed text

    shot = tmp_path / "shot.png"
    run_chromium(browser, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1200,900", "--hide-scrollbars", page.as_uri())
    assert shot.exists()
    with Image.open(shot) as image:
        assert image.size == (1200, 900)
        rgb = image.convert("RGB")
        colours = rgb.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 20, "the screenshot is (nearly) blank"
    # the first series' bars are painted in its colour
    first = tuple(int(report.PALETTE[0][i : i + 2], 16) for i in (1, 3, 5))
    painted = sum(count for count, colour in colours if max(abs(a - b) for a, b in zip(colour, first)) <= 8)
    assert painted > 500, f"no bars of {report.PALETTE[0]} in the screenshot"


# ---------------------------------------------------------------------------------------------
# (c) the PNG report


def test_the_png_report_is_the_same_figures_as_a_chart(pipeline, default_html, tmp_path):
    from PIL import Image

    html_summary, _ = default_html
    summary = build_report(pipeline, tmp_path / "charts" / "usage.png", fmt="png")
    data = (tmp_path / "charts" / "usage.png").read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(tmp_path / "charts" / "usage.png") as image:
        image.verify()
    with Image.open(tmp_path / "charts" / "usage.png") as image:
        assert image.size == (1200, 600)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 20
    assert (summary.start, summary.end, summary.series, summary.total_runs) == (
        html_summary.start,
        html_summary.end,
        html_summary.series,
        html_summary.total_runs,
    )
    assert summary.total_hours == pytest.approx(html_summary.total_hours, rel=1e-9)
