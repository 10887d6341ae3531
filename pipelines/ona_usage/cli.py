"""`ona-usage`: the command line. It parses flags, hands them to settings, and reports.

Everything a user sees lives here: the summary, log lines, and the one-line errors. A traceback
is shown only with `--debug`; the API key is scrubbed from anything printed or logged.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ona_usage import __version__, settings
from ona_usage.client import OnaApiError
from ona_usage.pipeline import PipelineBusyError, WarehouseBusy
from ona_usage.records import InvalidRecordError
from ona_usage.settings import ConfigError, Settings
from ona_usage.status import StatusError
from ona_usage.windows import format_rfc3339

logger = logging.getLogger("ona_usage")
OUR_ERRORS = (OnaApiError, ConfigError, InvalidRecordError, PipelineBusyError, StatusError, WarehouseBusy)


class _Running:
    """The running command's stats, so that a Ctrl-C which surfaces outside the command's own
    handler still says what was committed (seen once under load; the cause is not pinned down)."""

    stats: Any = None


class Interrupted(Exception):
    """Ctrl-C during a sync or backfill; says what its committed loads hold."""

    def __init__(self, chunks: int, through: Any) -> None:
        if chunks:
            text = f"{chunks} load(s) were committed, through {format_rfc3339(through)}; run the same command again to go on from there"
        else:
            text = "nothing was committed; run the same command again"
        super().__init__(text)

SYNC_OPTIONS = (
    "start_date",
    "add_organization",
    "chunk_seconds",
    "duckdb_file",
    "project_id",
    "base_url",
    "destination",
    "dataset_name",
    "pipeline_name",
    "window",
    "lookback",
    "page_size",
    "workers",
    "chunk",
    "allow_insecure_http",
)

EXAMPLE_SQL = """\
SELECT coalesce(project_name, project_id, '(no project)') AS project,
       sum(runs) AS runs,
       round(sum(runtime_hours), 1) AS hours
FROM {table}
GROUP BY 1
ORDER BY hours DESC
LIMIT 5"""


def main(argv: Sequence[str] | None = None) -> int:
    # dlt reports anonymous usage to its vendor unless told otherwise; a sync tool should not.
    os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")
    _bound_the_allocators()
    args = build_parser().parse_args(argv)
    secrets = Secrets()
    _Running.stats = None
    with logging_to_stderr(args, secrets):
        try:
            return int(args.run(args, secrets) or 0)
        except Interrupted as stop:
            print(f"ona-usage: interrupted; {stop}", file=sys.stderr)
            return 130
        except KeyboardInterrupt:
            stats = _Running.stats
            stop = Interrupted(stats.chunks_committed, stats.committed_through) if stats else "nothing was committed"
            print(f"ona-usage: interrupted; {stop}", file=sys.stderr)
            return 130
        except BrokenPipeError:  # `ona-usage ... | head`: the reader has all it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
            return 0
        except Exception as exc:  # every failure ends as one line unless --debug asks for more
            if args.debug:
                raise
            print(f"ona-usage: error: {secrets.scrub(describe_error(exc))}", file=sys.stderr)
            return 2 if isinstance(root_cause(exc), ConfigError) else 1


def _bound_the_allocators() -> None:
    """Keep freed memory from piling up in the allocators over a long sync.

    A sync allocates on a dozen threads (fetching, decoding, DuckDB). glibc gives each thread
    its own arena, up to eight per core, and Arrow's jemalloc and mimalloc keep what they free
    for reuse: over a year of ten million records the peak crept up by about 70 MB that was
    free but never returned. So Arrow allocates through glibc (`system`, unless
    `ARROW_DEFAULT_MEMORY_POOL` says otherwise) and glibc keeps two arenas (unless
    `MALLOC_ARENA_MAX` is set). Process-wide choices, so made here and not in the source.
    """
    if not os.environ.get("ARROW_DEFAULT_MEMORY_POOL"):
        import pyarrow as pa

        pa.set_memory_pool(pa.system_memory_pool())
    if not os.environ.get("MALLOC_ARENA_MAX") and sys.platform == "linux":
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").mallopt(-8, 2)  # M_ARENA_MAX: before the sync starts its threads
        except (OSError, AttributeError):
            pass  # not glibc


CONFIG_HELP = (
    "Every option can also be set under [sources.ona_usage] in .dlt/config.toml or as "
    "SOURCES__ONA_USAGE__<OPTION> (e.g. SOURCES__ONA_USAGE__PAGE_SIZE). The API key comes from "
    "ONA_API_KEY, GITPOD_API_KEY, SOURCES__ONA_USAGE__API_KEY or .dlt/secrets.toml, never from a flag."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ona-usage",
        description="Sync Ona (formerly Gitpod) environment usage records into DuckDB or any dlt destination.",
        epilog="Run `ona-usage COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"ona-usage {__version__}")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    def command(name: str, run: Any, help: str, description: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=description)
        sub.set_defaults(run=run)
        sub.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
        sub.add_argument("--quiet", action="store_true", help="print only errors")
        return sub

    sync = command(
        "sync",
        cmd_sync,
        "load new usage records (the scheduled job)",
        "Load usage records completed since the last run (less the lookback) into the destination, merged "
        "on id, committing a chunk at a time. The first run starts at --start. " + CONFIG_HELP,
    )
    add_start_argument(sync)
    add_api_arguments(sync)
    add_load_arguments(sync, lookback=True)
    add_target_arguments(sync)
    sync.add_argument("--dry-run", action="store_true", help="print the windows a sync would fetch, load nothing")

    backfill = command(
        "backfill",
        cmd_backfill,
        "load a date range once, without moving the scheduled cursor",
        "Load every record with stoppedAt in [--start, --end), merged on id. Progress is committed a chunk "
        "at a time: run the same command again after a crash and it continues after the last committed "
        "chunk. The scheduled sync's cursor does not move. " + CONFIG_HELP,
    )
    add_range_arguments(backfill)
    add_api_arguments(backfill)
    add_load_arguments(backfill, lookback=False)
    add_target_arguments(backfill)
    backfill.add_argument("--force", action="store_true", help="fetch a backfill that already finished once more, whole")

    status = command(
        "status",
        cmd_status,
        "show the cursor, the last load, the table and pending work",
        "Where things stand: cursor and lookback, the next windows a sync would fetch, the last load, rows in "
        "the table, backfills and pending load packages. --json prints a stable shape for monitoring.",
    )
    add_target_arguments(status)
    status.add_argument("--json", action="store_true", help="print JSON (stable shape, see the README)")

    verify = command(
        "verify",
        cmd_verify,
        "compare the table with the API day by day (exit 1 on any difference)",
        "Reconcile [--start, --end) day by day: records on each side, and the ids missing from the table, "
        "extra in it, or stored with other values. Exit status 0 when they match, 1 when not. --repair "
        "reloads the days that differ (a backfill) and checks again.",
    )
    add_range_arguments(verify)
    add_api_arguments(verify)
    add_target_arguments(verify)
    verify.add_argument("--chunk", metavar="DURATION", help=f"with --repair: commit a load after this much of the range (default {settings.DEFAULT_CHUNK})")
    add_organization_argument(verify)
    verify.add_argument("--repair", action="store_true", help="reload the days that differ, then verify again")
    verify.add_argument("--json", action="store_true", help="print the report as JSON")

    report = command(
        "report",
        cmd_report,
        "write a usage report: a self-contained HTML page or a PNG chart",
        "Runtime hours per day stacked by project (or environment class), top users and projects, and "
        "totals, from the environment_usage_daily view, so the numbers agree with SQL. Opens without network.",
    )
    add_target_arguments(report)
    report.add_argument("--start", metavar="DATE", help="first day (default: 30 days before the last day with data)")
    report.add_argument("--end", metavar="DATE", help="end day, exclusive (default: the day after the last data)")
    report.add_argument("--by", choices=("project", "environment_class"), default="project", help="stack the chart by (default project)")
    report.add_argument("--format", dest="fmt", choices=("html", "png"), help="html page or png chart (default: from --out's extension, else html)")
    report.add_argument("--out", metavar="FILE", help="where to write it; .png implies --format png (default ona-usage-report.html or .png)")

    reset = command(
        "reset",
        cmd_reset,
        "drop the table and the sync state (asks for --yes)",
        "Drop the environment_usage_records table and the sync's state (cursor, backfill progress) in the "
        "destination and locally; the next sync starts from --start-date again.",
    )
    add_target_arguments(reset)
    reset.add_argument("--yes", action="store_true", help="really drop them")

    demo = command(
        "demo",
        cmd_demo,
        "sync a synthetic organisation from the bundled emulator into DuckDB and query it",
        "Without an API key: start the bundled API emulator with 90 days of synthetic usage, sync it into "
        "its own pipeline and file, ona_usage_demo.duckdb, print a summary and an example query. With an API key: "
        "sync the real API the same way, into the usual pipeline and file.",
    )
    add_start_argument(demo)
    add_target_arguments(demo)
    demo.add_argument("--records", type=int, default=30_000, help="synthetic records (default 30000)")
    demo.add_argument("--days", type=int, default=90, help="days of synthetic usage (default 90)")

    # Its options belong to the emulator, parsed there: a sync never imports the server.
    emulator = commands.add_parser(
        "emulator",
        help="serve the local API emulator (for tests and demos); `ona-usage emulator --help` lists its options",
        add_help=False,
        prefix_chars="\0",
    )
    emulator.add_argument("emulator_args", nargs=argparse.REMAINDER)
    emulator.set_defaults(run=cmd_emulator, debug=False, quiet=False)
    return parser


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    """Which pipeline, destination and dataset: enough to find the state and the table."""
    d = settings
    parser.add_argument("--destination", metavar="NAME", help=f"dlt destination (default {d.DEFAULT_DESTINATION})")
    parser.add_argument("--dataset-name", metavar="NAME", help=f"dataset (schema) to load into (default {d.DEFAULT_DATASET_NAME})")
    parser.add_argument("--pipeline-name", metavar="NAME", help=f"dlt pipeline name; keys the cursor state (default {d.DEFAULT_PIPELINE_NAME})")
    parser.add_argument(
        "--duckdb-file",
        metavar="PATH",
        help="the DuckDB file (default: DESTINATION__DUCKDB__CREDENTIALS, else PIPELINE_NAME.duckdb in this directory)",
    )


def add_range_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--start", metavar="DATE", required=True, help="first day (inclusive), YYYY-MM-DD or ISO datetime, UTC")
    parser.add_argument("--end", metavar="DATE", required=True, help="end (exclusive), YYYY-MM-DD or ISO datetime, UTC")


def add_start_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--start",
        "--start-date",
        dest="start_date",
        metavar="DATE",
        help="first run only: where to start (YYYY-MM-DD or ISO datetime, UTC; default: 30 days ago)",
    )


def add_api_arguments(parser: argparse.ArgumentParser) -> None:
    """Where and how to ask the API."""
    d = settings
    parser.add_argument("--project-id", metavar="ID", help="only records of this project")
    parser.add_argument("--base-url", metavar="URL", help=f"API base URL (default ONA_BASE_URL, else {d.DEFAULT_BASE_URL})")
    parser.add_argument("--page-size", metavar="N", type=int, help=f"records per page, 1-100 (default {d.DEFAULT_PAGE_SIZE})")
    parser.add_argument("--workers", metavar="N", type=int, help=f"at most N windows fetched at once, fewer while the API answers fast (default {d.DEFAULT_WORKERS})")
    parser.add_argument(
        "--allow-insecure-http",
        action="store_true",
        default=None,
        help="allow a plain http:// base URL that is not 127.0.0.1/localhost (sends the key unencrypted)",
    )


def add_load_arguments(parser: argparse.ArgumentParser, *, lookback: bool) -> None:
    """How a range is cut into requests and loads."""
    d = settings
    parser.add_argument("--window", metavar="SIZE", help=f"date range per request, dividing a day evenly: 1h, 2h, 3h, 4h, 6h, 8h, 12h or 1d (default {d.DEFAULT_WINDOW})")
    if lookback:
        parser.add_argument("--lookback", metavar="DURATION", help=f"re-read this much of the last run's range to catch late records (default {d.DEFAULT_LOOKBACK})")
    parser.add_argument("--chunk", metavar="DURATION", help=f"commit a load after this much of the range (default {d.DEFAULT_CHUNK})")
    parser.add_argument("--chunk-seconds", metavar="S", type=float, help=f"... or after this many seconds of fetching, whichever comes first (default {d.DEFAULT_CHUNK_SECONDS:.0f})")
    add_organization_argument(parser)


def add_organization_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--add-organization",
        action="store_true",
        default=None,
        help="load into a dataset that holds another organization's usage (give each organization its own --pipeline-name)",
    )


def sync_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name, None) for name in SYNC_OPTIONS}


def resolve(args: argparse.Namespace, secrets: Secrets) -> Settings:
    config = settings.resolve(sync_overrides(args))
    secrets.add(config.api_key)
    return config


def cmd_sync(args: argparse.Namespace, secrets: Secrets) -> int:
    import pendulum

    from ona_usage.pipeline import read_state, reading, run_sync
    from ona_usage.source import plan_windows

    config = resolve(args, secrets)
    if args.dry_run:
        with reading(config) as pipeline:
            windows = plan_windows(config, read_state(pipeline), pendulum.now("UTC"))
        print(f"A sync now would fetch {len(windows)} window(s); nothing is loaded:")
        for window in windows:
            print(f"  {window}")
        return 0
    result = _with_progress(args, "sync", lambda stats: run_sync(config, stats))
    if not args.quiet:
        print_summary(config, result)
    return 0


def cmd_backfill(args: argparse.Namespace, secrets: Secrets) -> int:
    from ona_usage.pipeline import run_backfill

    config = resolve(args, secrets)
    backfill = settings.parse_range(args.start, args.end)
    result = _with_progress(args, "backfill", lambda stats: run_backfill(config, backfill, stats, force=args.force))
    if result.already_done:
        print(f"Backfill [{args.start}, {args.end}) was done before; nothing was fetched. Add --force to fetch it again.")
    elif not args.quiet:
        print(f"Backfill [{args.start}, {args.end}) done in {result.chunks} load(s); the scheduled cursor did not move.")
        print_summary(config, result)
    return 0


def cmd_status(args: argparse.Namespace, secrets: Secrets) -> int:
    import json

    from ona_usage.status import collect_status

    report = collect_status(resolve(args, secrets))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_status(report))
    return 0


def cmd_verify(args: argparse.Namespace, secrets: Secrets) -> int:
    import json

    from ona_usage.pipeline import run_repair
    from ona_usage.verify import verify

    config = resolve(args, secrets)
    config.require_api_key()
    start, end = settings.parse_range(args.start, args.end)
    reports = verify(config, start, end)
    bad = [r for r in reports if not r.ok]
    if bad and args.repair:
        run_repair(config, [r.window for r in bad])
        print(f"Repaired {len(bad)} day(s) with one backfill; verifying again.", file=sys.stderr)
        reports = verify(config, start, end)
        bad = [r for r in reports if not r.ok]
    if args.json:
        print(json.dumps({"ok": not bad, "days": [r.as_dict() for r in reports]}, indent=2))
    else:
        print(format_verify(reports))
    return 1 if bad else 0


def cmd_report(args: argparse.Namespace, secrets: Secrets) -> int:
    from pathlib import Path

    from ona_usage.pipeline import reading
    from ona_usage.report import build_report

    config = resolve(args, secrets)
    start = settings.parse_date(args.start, "--start").date() if args.start else None
    end = settings.parse_date(args.end, "--end").date() if args.end else None
    fmt = report_format(args.fmt, args.out)
    out = Path(args.out or f"ona-usage-report.{fmt}")
    with reading(config) as pipeline:
        summary = build_report(pipeline, out, start=start, end=end, by=args.by, fmt=fmt)
    if not args.quiet:
        print(
            f"Wrote {summary.path}: {summary.start} to {summary.end} (exclusive), {summary.total_hours:,.1f} runtime "
            f"hours in {summary.total_runs:,} runs by {summary.active_users} users"
        )
    return 0


def cmd_reset(args: argparse.Namespace, secrets: Secrets) -> int:
    from ona_usage.pipeline import reset

    config = resolve(args, secrets)
    if not args.yes:
        print(
            f"This drops table environment_usage_records (and its models) in dataset {config.dataset_name!r} of "
            f"{config.destination} and the sync state of pipeline {config.pipeline_name!r}; the next sync "
            "starts again from --start. Run `ona-usage reset --yes` to do it. Nothing was changed.",
            file=sys.stderr,
        )
        return 2
    dropped = reset(config)
    print("Dropped the table and the sync state." if dropped else "Nothing to reset: this pipeline never loaded.")
    return 0


def report_format(fmt: str | None, out: str | None) -> str:
    """`--format`, or what `--out`'s extension says; the two must not disagree."""
    from pathlib import Path

    implied = {".png": "png", ".html": "html", ".htm": "html"}.get(Path(out).suffix.lower()) if out else None
    if fmt and implied and fmt != implied:
        raise ConfigError(f"--format {fmt} and --out {out} disagree; drop one, or give the file a .{fmt} name")
    return fmt or implied or "html"


def _with_progress(args: argparse.Namespace, label: str, run: Any) -> Any:
    from ona_usage.progress import ProgressReporter, choose_mode
    from ona_usage.source import ExtractStats

    mode = choose_mode(args.quiet)
    with ProgressReporter(mode, label) as progress:
        stats = _Running.stats = ExtractStats(on_window=progress.on_window)
        try:
            return run(stats)
        except BaseException as exc:  # dlt wraps a Ctrl-C inside its step in its own error
            if isinstance(root_cause(exc), KeyboardInterrupt):
                raise Interrupted(stats.chunks_committed, stats.committed_through) from None
            raise


def cmd_demo(args: argparse.Namespace, secrets: Secrets) -> int:
    import dataclasses
    from pathlib import Path

    from ona_usage.pipeline import run_sync

    config = resolve(args, secrets)
    if config.api_key:
        result = _with_progress(args, "sync", lambda stats: run_sync(config, stats))
    else:
        import pendulum
        from ona_emulator import EmulatorServer, UsageStore, organisation_names, organisation_records

        end = pendulum.now("UTC")
        start = end.subtract(days=args.days)
        store = UsageStore(organisation_records(42, start, end, args.records))
        store.names = organisation_names(42)
        with EmulatorServer(store) as server:
            print(f"No API key given: syncing {len(store.records()):,} synthetic records from the local emulator at {server.url}")
            # its own pipeline and file: synthetic rows never reach a real warehouse
            demo = config.pipeline_name + "_demo"
            config = dataclasses.replace(
                config,
                base_url=server.url,
                api_key=server.api_key,
                start_date=config.start_date or start.start_of("day"),
                pipeline_name=demo,
                duckdb_file=config.duckdb_file if args.duckdb_file else str(Path(demo + settings.DUCKDB_SUFFIX).absolute()),
            )
            result = _with_progress(args, "sync", lambda stats: run_sync(config, stats))
    print_summary(config, result)
    print_example_query(config)
    return 0


def cmd_emulator(args: argparse.Namespace, secrets: Secrets) -> int:
    from ona_emulator.cli import cli_main

    return cli_main(args.emulator_args, prog="ona-usage emulator")


def format_status(report: dict[str, Any]) -> str:
    last = report["last_load"] or {}
    table = report["table_stats"]
    lines = [
        f"pipeline     {report['pipeline']} -> {report['destination']} dataset {report['dataset']!r}, table {report['table']}",
        f"cursor       {report['cursor'] or 'none yet'} (newest stopped_at loaded); lookback {report['lookback']}",
        f"fetched      through {report['fetched_through'] or 'nothing yet'}",
        f"next sync    {report['next_sync']['windows']} window(s) from {report['next_sync']['start']}",
        f"last load    {last.get('finished_at') or 'none'}"
        + (f", {last['rows']:,} rows" if last else "")
        + (f", {last['seconds']} s" if last.get("seconds") is not None else ""),
        f"table        {table['rows']:,} rows, stopped_at {table['first_stopped_at']} .. {table['last_stopped_at']}",
    ]
    models = report.get("models")
    if models:
        held = ", ".join(f"{name} load {info['load_id'] or 'none'}" for name, info in models["tables"].items())
        line = f"models       {'current' if models['current'] else 'STALE (the next sync refreshes them)'}: {held}"
        if models["last_refresh_error"]:
            error = models["last_refresh_error"]
            line += f"\n             last refresh failed at {error['at']}: {error['error']}"
        lines.append(line)
    for backfill in report["backfills"]:
        state = "done" if backfill["done"] else f"unfinished, committed through {backfill['through']}"
        lines.append(f"backfill     [{backfill['start']}, {backfill['end']}) project {backfill['project_id'] or 'all'}: {state}")
    pending = report["pending_load_packages"]
    lines.append(f"pending      {', '.join(pending) if pending else 'no pending load packages'}")
    return "\n".join(lines)


def format_verify(reports: list[Any]) -> str:
    lines = []
    for r in reports:
        mark = "ok " if r.ok else "DIFF"
        line = f"{mark} {r.window.start.to_date_string()}  api {r.api:>6}  warehouse {r.warehouse:>6}"
        if not r.ok:
            line += f"  missing {len(r.missing)}  extra {len(r.extra)}  changed {len(r.changed)}"
            for label, ids in (("missing", r.missing), ("extra", r.extra), ("changed", r.changed)):
                if ids:
                    line += f"\n      {label}: {', '.join(ids[:10])}" + (" ..." if len(ids) > 10 else "")
        lines.append(line)
    bad = sum(not r.ok for r in reports)
    verdict = "match" if not bad else f"differ on {bad} of {len(reports)} day(s)"
    lines.append(f"API {sum(r.api for r in reports):,} records, warehouse {sum(r.warehouse for r in reports):,} rows: {verdict}")
    return "\n".join(lines)


def print_summary(config: Settings, result: Any) -> None:
    cursor = format_rfc3339(result.cursor) if result.cursor else "none yet"
    where = f"{config.destination} dataset {config.dataset_name!r}, table environment_usage_records"
    if result.rows_new is None:
        print(f"Loaded {result.rows_loaded:,} rows into {where}")
    else:
        again = result.rows_loaded - result.rows_new
        print(f"Loaded {result.rows_new:,} new rows into {where}; {again:,} read again (kept once, with their latest values)")
    print(
        f"Fetched {result.windows:,} windows, {result.pages:,} pages in {result.requests:,} requests "
        f"({result.retries} retries, {result.hedged} hedged), committed in {result.chunks} load(s)"
    )
    print(f"Cursor (newest stopped_at): {cursor}; lookback {config.describe('lookback')}")
    print(f"Took {result.seconds:.1f} s")


def print_example_query(config: Settings) -> None:
    from ona_usage.pipeline import reading

    with reading(config) as pipeline, pipeline.sql_client() as client:
        table = client.make_qualified_table_name("environment_usage_daily")
        sql = EXAMPLE_SQL.format(table=table)
        rows = client.execute_sql(sql)
    print("\nExample query, runtime hours by project:\n")
    print(sql + ";\n")
    print(_format_table(["project", "runs", "hours"], rows))


def _format_table(header: list[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [header] + [[str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [" | ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def describe_error(exc: BaseException) -> str:
    """The message of the error that explains the failure, not of dlt's wrappers around it."""
    cause = root_cause(exc)
    if isinstance(cause, OUR_ERRORS):
        return str(cause)
    line = f"{type(cause).__name__}: {cause}".splitlines()[0]
    if "Out of Memory Error" in line:  # DuckDB's, under the limit the sync sets
        line += (
            "; raise DuckDB's memory_limit with SOURCES__ONA_USAGE__DUCKDB_MEMORY_LIMIT (or duckdb_memory_limit "
            f"under [sources.ona_usage]), now {settings.DEFAULT_DUCKDB_MEMORY_LIMIT} by default; what was loaded stays committed"
        )
    return line


def root_cause(exc: BaseException) -> BaseException:
    """Unwrap dlt's PipelineStepFailed / ResourceExtractionError chain to our own error."""
    seen: set[int] = set()
    current: BaseException | None = exc
    found = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        found = current
        if isinstance(current, OUR_ERRORS):
            return current
        inner = getattr(current, "exception", None)
        if isinstance(inner, BaseException):
            current = inner
        else:
            current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return found


class Secrets(logging.Filter):
    """The key of this command: scrubbed from its error line and, as a log filter, from every log record."""

    def __init__(self) -> None:
        super().__init__()
        self._values: list[str] = []

    def add(self, secret: str | None) -> None:
        if secret and secret not in self._values:
            self._values.append(secret)

    def scrub(self, text: str) -> str:
        for secret in self._values:
            text = text.replace(secret, "***")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(secret in message for secret in self._values):
            record.msg, record.args = self.scrub(message), ()
        return True


@contextmanager
def logging_to_stderr(args: argparse.Namespace, secrets: Secrets) -> Iterator[None]:
    """Our log lines on stderr for this command only, the key scrubbed from every one."""
    # In a terminal the live progress shows what INFO lines would; elsewhere they are the progress.
    level = logging.DEBUG if args.debug else logging.ERROR if args.quiet else logging.WARNING if sys.stderr.isatty() else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(secrets)
    saved = logger.handlers[:], logger.level, logger.propagate
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
    try:
        yield
    finally:
        logger.handlers[:], level, logger.propagate = saved
        logger.setLevel(level)


def run() -> None:
    """The `ona-usage` command.

    Everything is imported by now and lives until exit, so the collector is told to stop
    walking it (`gc.freeze`): that is about a sixth of a scheduled no-op's second, in its
    collections and at exit. Only here, for one process and one command; `main` stays free of
    it for callers that run many commands in one process.
    """
    gc.freeze()
    sys.exit(main())


if __name__ == "__main__":
    run()
