"""Where a year's sync spends its memory: the floor under `make bench`'s peak RSS, without HTTP.

`make bench` measures ona-usage's peak RSS for a year's sync at 1 to 10 million records. This
script measures, each in its own process and for the same records as the benchmark's first
case (seed 42, 365 days to 2026-11-01), what the pieces that stay cost on their own:

1. `imports`: importing the command line (dlt, pyarrow, DuckDB, httpx, ...), nothing else;
2. `duckdb`: DuckDB alone running the SQL of the sync's loads (copy a chunk's Parquet file
   into a staging table, delete the ids it replaces, insert it) for the year in 60-day chunks;
3. `dlt`: the same chunks, as the Arrow tables the source yields, through a dlt pipeline with
   the sync's merge hints into DuckDB: dlt's extract, normalize and load, no HTTP.

Each runs at the DuckDB `memory_limit`s given (default 64MB, the sync's default, and 128MB).

    .venv/bin/python benchmarks/memory_floor.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

CHUNK_DAYS = 60
END = "2026-11-01T00:00:00Z"


def peak_mb() -> int:
    """This process's peak RSS (VmHWM: unlike `ru_maxrss`, not inherited across fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) >> 10
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def write_chunks(folder: Path, records: int, seed: int) -> list[Path]:
    """The benchmark's organisation as one Parquet file per 60-day chunk, typed like the sync's."""
    import pendulum
    import pyarrow.parquet as pq

    from ona_emulator import generate_organisation, parse_rfc3339_ns
    from ona_usage.records import to_table
    from ona_usage.windows import Window

    end = pendulum.parse(END)
    start = end.subtract(days=365)
    rows = generate_organisation(seed, start, end, records)
    stopped = [parse_rfc3339_ns(r["stoppedAt"]) for r in rows]
    paths = []
    chunk_start = start
    while chunk_start < end:
        chunk_end = min(chunk_start.add(days=CHUNK_DAYS), end)
        window = Window(chunk_start, chunk_end)
        low, high = chunk_start.int_timestamp * 10**9, chunk_end.int_timestamp * 10**9
        chunk = [r for r, ns in zip(rows, stopped) if low <= ns < high]
        path = folder / f"chunk-{len(paths):02d}.parquet"
        pq.write_table(to_table(chunk, window), path)
        paths.append(path)
        chunk_start = chunk_end
    return paths


def run_imports() -> dict:
    import ona_usage.cli  # noqa: F401

    return {}


def run_duckdb(chunks: list[Path], limit: str, folder: Path) -> dict:
    import duckdb

    connection = duckdb.connect(str(folder / "duckdb-only.duckdb"))
    connection.execute("SET memory_limit = ?", [limit])
    connection.execute("CREATE SCHEMA data; CREATE SCHEMA staging")
    connection.execute(f"CREATE TABLE data.t AS SELECT * FROM read_parquet('{chunks[0]}') LIMIT 0")
    for chunk in chunks:
        connection.execute(f"CREATE OR REPLACE TABLE staging.t AS SELECT * FROM read_parquet('{chunk}')")
        connection.execute("BEGIN")
        connection.execute("DELETE FROM data.t AS d WHERE EXISTS (SELECT 1 FROM staging.t AS s WHERE d.id = s.id)")
        connection.execute("INSERT INTO data.t SELECT * FROM staging.t")
        connection.execute("COMMIT")
    rows = connection.execute("SELECT count(*) FROM data.t").fetchone()[0]
    connection.close()
    return {"rows": rows}


def run_dlt(chunks: list[Path], limit: str, folder: Path) -> dict:
    os.environ["DLT_DATA_DIR"] = str(folder / "dlt")
    os.environ["RUNTIME__DLTHUB_TELEMETRY"] = "false"
    import dlt
    import duckdb
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ona_usage.records import COLUMNS

    pa.set_memory_pool(pa.jemalloc_memory_pool())  # as the command line does
    connection = duckdb.connect(str(folder / "dlt.duckdb"))
    connection.execute("SET memory_limit = ?", [limit])
    pipeline = dlt.pipeline("floor", destination=dlt.destinations.duckdb(credentials=connection), dataset_name="data")
    def batches(chunk: str) -> Iterator[pa.Table]:
        """A chunk's rows as the source yields them; read here, so no load holds an earlier one."""
        table = pq.read_table(chunk)
        for start in range(0, table.num_rows, 50_000):
            yield table.slice(start, 50_000)

    for chunk in chunks:
        resource = dlt.resource(
            batches(str(chunk)),
            name="environment_usage_records",
            write_disposition={"disposition": "merge", "deduplicated": True},
            primary_key="id",
            columns=COLUMNS,
        )
        pipeline.run(resource)
    rows = connection.execute("SELECT count(*) FROM data.environment_usage_records").fetchone()[0]
    connection.close()
    return {"rows": rows}


def child(args: argparse.Namespace) -> None:
    folder = Path(args.folder)
    chunks = sorted(folder.glob("chunk-*.parquet"))
    started = time.perf_counter()
    result = {"imports": run_imports, "duckdb": run_duckdb, "dlt": run_dlt}[args.part](
        *([] if args.part == "imports" else [chunks, args.limit, Path(tempfile.mkdtemp(dir=folder))])
    )
    result.update(part=args.part, limit=args.limit, seconds=round(time.perf_counter() - started, 2), peak_mb=peak_mb())
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--limits", default="64MB,128MB", help="DuckDB memory limits to try (default %(default)s)")
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--limit", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        child(args)
        return
    with tempfile.TemporaryDirectory(prefix="ona-floor-") as folder:
        print(f"writing {args.records:,} records as {CHUNK_DAYS}-day chunks ...", flush=True)
        chunks = write_chunks(Path(folder), args.records, args.seed)
        print(f"{len(chunks)} chunks; each part below runs in a fresh process")
        runs = [("imports", "-")] + [(part, limit) for part in ("duckdb", "dlt") for limit in args.limits.split(",")]
        print(f"{'part':8s} {'memory_limit':>12s} {'peak RSS':>9s} {'seconds':>8s}  rows")
        for part, limit in runs:
            out = subprocess.run(
                [sys.executable, __file__, "--part", part, "--folder", folder, "--limit", limit],
                capture_output=True, text=True, check=True,
            )
            result = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{part:8s} {limit:>12s} {result['peak_mb']:>6d} MB {result['seconds']:>8.2f}  {result.get('rows', '')}")


if __name__ == "__main__":
    main()
