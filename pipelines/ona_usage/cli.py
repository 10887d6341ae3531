"""`ona-usage`: the command line. It parses flags, hands them to settings, and reports.

Everything a user sees lives here: the summary, log lines, and the one-line errors. A traceback
is shown only with `--debug`; the API key is scrubbed from anything printed or logged.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from ona_usage import __version__, settings
from ona_usage.client import OnaApiError
from ona_usage.records import InvalidRecordError
from ona_usage.settings import ConfigError, SyncSettings
from ona_usage.windows import format_rfc3339

logger = logging.getLogger("ona_usage")

SYNC_OPTIONS = (
    "start_date",
    "project_id",
    "base_url",
    "destination",
    "dataset_name",
    "pipeline_name",
    "window",
    "lookback",
    "page_size",
    "workers",
    "allow_insecure_http",
)

EXAMPLE_SQL = """\
SELECT coalesce(project_id, '(no project)') AS project_id,
       count(*) AS runs,
       round(sum(date_diff('second', created_at, stopped_at)) / 3600.0, 1) AS hours
FROM {table}
GROUP BY 1
ORDER BY hours DESC
LIMIT 5"""


def main(argv: Sequence[str] | None = None) -> int:
    # dlt reports anonymous usage to its vendor unless told otherwise; a sync tool should not.
    os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("ona-usage: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # every failure ends as one line unless --debug asks for more
        if args.debug:
            raise
        print(f"ona-usage: error: {_scrub(describe_error(exc))}", file=sys.stderr)
        return 2 if isinstance(root_cause(exc), ConfigError) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ona-usage",
        description="Sync Ona (formerly Gitpod) environment usage records into DuckDB or any dlt destination.",
        epilog="Run `ona-usage COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"ona-usage {__version__}")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    sync = commands.add_parser(
        "sync",
        help="load new usage records (the scheduled job)",
        description=(
            "Load usage records completed since the last run (minus the lookback) into the destination, "
            "merged on id. The first run starts at --start-date. Every option can also be set under "
            "[sources.ona_usage] in .dlt/config.toml or as SOURCES__ONA_USAGE__<OPTION> (e.g. "
            "SOURCES__ONA_USAGE__PAGE_SIZE). The API key comes from ONA_API_KEY, GITPOD_API_KEY, "
            "SOURCES__ONA_USAGE__API_KEY or .dlt/secrets.toml, never from a flag."
        ),
    )
    add_sync_arguments(sync)
    sync.set_defaults(run=cmd_sync)

    demo = commands.add_parser(
        "demo",
        help="sync a synthetic organisation from the bundled emulator into DuckDB and query it",
        description=(
            "Without an API key: start the bundled API emulator with 90 days of synthetic usage, sync it "
            "into ona_usage.duckdb, print a summary and an example query. With an API key: sync the real "
            "API the same way."
        ),
    )
    add_sync_arguments(demo)
    demo.add_argument("--records", type=int, default=30_000, help="synthetic records (default 30000)")
    demo.add_argument("--days", type=int, default=90, help="days of synthetic usage (default 90)")
    demo.set_defaults(run=cmd_demo)

    emulator = commands.add_parser(
        "emulator",
        help="serve the local API emulator (for tests and demos)",
        description="Serve a local emulator of Ona's ListEnvironmentUsageRecords on 127.0.0.1.",
    )
    from ona_emulator.cli import add_arguments

    add_arguments(emulator)
    emulator.set_defaults(run=cmd_emulator)

    for sub in (sync, demo, emulator):
        sub.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
        sub.add_argument("--quiet", action="store_true", help="print only errors")
    return parser


def add_sync_arguments(parser: argparse.ArgumentParser) -> None:
    d = settings
    parser.add_argument("--start-date", metavar="DATE", help="first run only: where to start (YYYY-MM-DD or ISO datetime, UTC; default: 30 days ago)")
    parser.add_argument("--project-id", metavar="ID", help="only records of this project")
    parser.add_argument("--base-url", metavar="URL", help=f"API base URL (default {d.DEFAULT_BASE_URL}; also https://app.ona.com/api)")
    parser.add_argument("--destination", metavar="NAME", help=f"dlt destination (default {d.DEFAULT_DESTINATION})")
    parser.add_argument("--dataset-name", metavar="NAME", help=f"dataset (schema) to load into (default {d.DEFAULT_DATASET_NAME})")
    parser.add_argument("--pipeline-name", metavar="NAME", help=f"dlt pipeline name; keys the cursor state (default {d.DEFAULT_PIPELINE_NAME})")
    parser.add_argument("--window", metavar="SIZE", help=f"date range per request, at most 1d (default {d.DEFAULT_WINDOW})")
    parser.add_argument("--lookback", metavar="DURATION", help=f"re-read this much before the cursor to catch late records (default {d.DEFAULT_LOOKBACK})")
    parser.add_argument("--page-size", metavar="N", type=int, help=f"records per page, 1-100 (default {d.DEFAULT_PAGE_SIZE})")
    parser.add_argument("--workers", metavar="N", type=int, help=f"windows fetched at once (default {d.DEFAULT_WORKERS})")
    parser.add_argument(
        "--allow-insecure-http",
        action="store_true",
        default=None,
        help="allow a plain http:// base URL that is not 127.0.0.1/localhost (sends the key unencrypted)",
    )


def sync_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name, None) for name in SYNC_OPTIONS}


def cmd_sync(args: argparse.Namespace) -> int:
    from ona_usage.pipeline import run_sync

    config = settings.resolve(sync_overrides(args))
    _remember_secret(config.api_key)
    result = run_sync(config)
    if not args.quiet:
        print_summary(config, result)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ona_usage.pipeline import run_sync

    config = settings.resolve(sync_overrides(args))
    if config.api_key:
        _remember_secret(config.api_key)
        result = run_sync(config)
    else:
        import pendulum
        from ona_emulator import EmulatorServer, UsageStore, generate_organisation

        end = pendulum.now("UTC")
        start = end.subtract(days=args.days)
        store = UsageStore(generate_organisation(42, start, end, args.records))
        with EmulatorServer(store) as server:
            print(f"No API key given: syncing {args.records:,} synthetic records from the local emulator at {server.url}")
            config.base_url = server.url
            config.api_key = server.api_key
            config.start_date = config.start_date or start.to_date_string()
            result = run_sync(config)
    print_summary(config, result)
    print_example_query(config)
    return 0


def cmd_emulator(args: argparse.Namespace) -> int:
    from ona_emulator.cli import serve_from_args

    serve_from_args(args)
    return 0


def print_summary(config: SyncSettings, result: Any) -> None:
    cursor = format_rfc3339(result.cursor) if result.cursor else "none yet"
    where = f"{config.destination} dataset {config.dataset_name!r}, table environment_usage_records"
    print(f"Loaded {result.rows_loaded:,} rows into {where}")
    print(
        f"Fetched {result.windows:,} windows, {result.pages:,} pages in {result.requests:,} requests "
        f"({result.retries} retries)"
    )
    print(f"Cursor (newest stopped_at): {cursor}; the next run re-reads from {config.lookback} before it")
    print(f"Took {result.seconds:.1f} s")


def print_example_query(config: SyncSettings) -> None:
    from ona_usage.pipeline import make_pipeline

    pipeline = make_pipeline(config)
    with pipeline.sql_client() as client:
        table = client.make_qualified_table_name("environment_usage_records")
        sql = EXAMPLE_SQL.format(table=table)
        rows = client.execute_sql(sql)
    print("\nExample query, runtime hours by project:\n")
    print(sql + ";\n")
    print(_format_table(["project_id", "runs", "hours"], rows))


def _format_table(header: list[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [header] + [[str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [" | ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def describe_error(exc: BaseException) -> str:
    """The message of the error that explains the failure, not of dlt's wrappers around it."""
    cause = root_cause(exc)
    if isinstance(cause, (OnaApiError, ConfigError, InvalidRecordError)):
        return str(cause)
    return f"{type(cause).__name__}: {cause}".splitlines()[0]


def root_cause(exc: BaseException) -> BaseException:
    """Unwrap dlt's PipelineStepFailed / ResourceExtractionError chain to our own error."""
    seen: set[int] = set()
    current: BaseException | None = exc
    found = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        found = current
        if isinstance(current, (OnaApiError, ConfigError, InvalidRecordError)):
            return current
        inner = getattr(current, "exception", None)
        current = inner if isinstance(inner, BaseException) else (current.__cause__ or current.__context__)
    return found


_SECRETS: list[str] = []


def _remember_secret(secret: str | None) -> None:
    if secret and secret not in _SECRETS:
        _SECRETS.append(secret)


def _scrub(text: str) -> str:
    for secret in _SECRETS:
        text = text.replace(secret, "***")
    return text


class _ScrubSecrets(logging.Filter):
    """Last line of defence: no log record leaves with the API key in it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(secret in message for secret in _SECRETS):
            record.msg, record.args = _scrub(message), ()
        return True


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.debug else logging.ERROR if args.quiet else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_ScrubSecrets())
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


if __name__ == "__main__":
    sys.exit(main())
