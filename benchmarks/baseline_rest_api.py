"""The baseline for `make bench`: what a dlt user would write instead of ona-usage.

dlt's declarative `rest_api` source pointed at `ListEnvironmentUsageRecords`:

* POST with a JSON body; the incremental cursor's start goes into
  `filter.dateRange.startTime` through the `{incremental.start_value}` placeholder, which
  `rest_api` expands in `json` bodies as it does in `params` (dlt 1.31,
  `dlt/sources/rest_api/config_setup.py::paginate_resource`);
* a cursor paginator reading `pagination.nextToken` and sending it as the query param
  `token` (what the official SDK does);
* `data_selector: records`, `primary_key: id`, `write_disposition: merge`;
* incremental on `stoppedAt`, starting at `--start-date` on the first run;
* dlt's defaults otherwise (for DuckDB: the insert-values file format, row-by-row normalize).

The emulator requires `dateRange.endTime`, so the body carries `--end-date` (default: now), the
way a scheduled user script would compute "now" before each run. It is not passed as the
incremental `end_value`, which would turn the pipeline into a stateless backfill.

Run as its own process:

    ONA_API_KEY=emulator-key DESTINATION__DUCKDB__CREDENTIALS=/tmp/b.duckdb DLT_DATA_DIR=/tmp/b \\
        python benchmarks/baseline_rest_api.py --base-url http://127.0.0.1:8181/api \\
        --start-date 2025-11-01 --end-date 2026-11-01
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime, timezone

import dlt
from dlt.sources.rest_api import rest_api_source

ENDPOINT = "gitpod.v1.UsageService/ListEnvironmentUsageRecords"


def rfc3339(text: str | None) -> str:
    """`YYYY-MM-DD` or an ISO datetime as RFC 3339 UTC with `Z`; None means now."""
    if text is None:
        when = datetime.now(timezone.utc)
    else:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def usage_source(base_url: str, api_key: str, start_time: str, end_time: str):
    return rest_api_source(
        {
            "client": {
                "base_url": base_url.rstrip("/") + "/",
                "auth": {"type": "bearer", "token": api_key},
                "paginator": {
                    "type": "cursor",
                    "cursor_path": "pagination.nextToken",
                    "cursor_param": "token",
                },
            },
            "resource_defaults": {
                "primary_key": "id",
                "write_disposition": "merge",
            },
            "resources": [
                {
                    "name": "environment_usage_records",
                    "endpoint": {
                        "path": ENDPOINT,
                        "method": "POST",
                        "json": {
                            "filter": {
                                "dateRange": {
                                    "startTime": "{incremental.start_value}",
                                    "endTime": end_time,
                                }
                            },
                            "pagination": {"pageSize": 100},
                        },
                        "data_selector": "records",
                        "incremental": {
                            "cursor_path": "stoppedAt",
                            "initial_value": start_time,
                        },
                    },
                }
            ],
        },
        name="ona_usage_rest_api",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Baseline: Ona usage records through dlt's rest_api source.")
    parser.add_argument("--base-url", required=True, help="API base URL, e.g. http://127.0.0.1:8181/api")
    parser.add_argument("--start-date", required=True, help="first run: where to start (YYYY-MM-DD or ISO datetime, UTC)")
    parser.add_argument("--end-date", default=None, help="dateRange.endTime of every request (default: now)")
    parser.add_argument("--pipeline-name", default="ona_usage_rest_api")
    parser.add_argument("--dataset-name", default="ona")
    args = parser.parse_args(argv)

    api_key = os.environ.get("ONA_API_KEY") or os.environ.get("GITPOD_API_KEY")
    if not api_key:
        print("baseline: set ONA_API_KEY", file=sys.stderr)
        return 2

    started = time.monotonic()
    pipeline = dlt.pipeline(
        pipeline_name=args.pipeline_name,
        destination="duckdb",  # file from DESTINATION__DUCKDB__CREDENTIALS
        dataset_name=args.dataset_name,
    )
    source = usage_source(args.base_url, api_key, rfc3339(args.start_date), rfc3339(args.end_date))
    pipeline.run(source)
    trace = pipeline.last_trace
    rows = trace.last_normalize_info.row_counts.get("environment_usage_records", 0) if trace and trace.last_normalize_info else 0
    print(f"baseline: loaded {rows} rows in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
