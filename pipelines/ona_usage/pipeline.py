"""The runner: the `ona_usage` source run as a command, in chunks, under a lock.

A command takes the pipeline's lock, follows the destination's state (finishing a load that a
killed run left pending), then runs the source one chunk of windows at a time: each chunk is
one dlt load that commits its rows and its progress together, so a crash loses at most the
chunk in flight. The names ride with the first chunk; the models are refreshed after the last.
"""

from __future__ import annotations

import copy
import fcntl
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import dlt
import pendulum
from dlt.common.configuration.exceptions import ConfigFieldMissingException
from dlt.common.destination.reference import Destination
from dlt.common.pipeline import LoadInfo, get_dlt_pipelines_dir
from dlt.destinations.exceptions import DatabaseTerminalException, DatabaseUndefinedRelation
from dlt.pipeline.trace import PipelineTrace, save_trace

from ona_usage.client import UsageClient, make_client
from ona_usage.models import INPUTS as MODEL_INPUTS
from ona_usage.models import (
    MODELS,
    first_touched_day,
    has_sql,
    inputs_fingerprint,
    loaded_tables,
    models_current,
    clear_refresh_error,
    pending_refresh,
    record_refresh_error,
    refresh_models,
)
from ona_usage.names import name_resources, rate_card_changed, rate_card_resource
from ona_usage.settings import ConfigError, Settings
from ona_usage.source import (
    BATCH_ROWS,
    ExtractStats,
    Feed,
    OrganizationMismatch,
    WindowFetcher,
    check_organization,
    plan_windows,
    source_of,
    usage_records,
)
from ona_usage.state import RESOURCE_NAME, SyncState, backfill_key
from ona_usage.windows import Window

logger = logging.getLogger(__name__)

Range = tuple[pendulum.DateTime, pendulum.DateTime]
WRITE_LOCK_PATIENCE = 15.0  # seconds a writer waits for a DuckDB file another process holds
PIPELINE_FIELDS = frozenset({"dataset_name", "local_dir", "pipeline_name", "default_schema_name", "destination_name", "environment"})
TARGET_FILE = "ona_usage_target"  # in the pipeline's working folder: what its local state is of


class PipelineBusyError(RuntimeError):
    """Another run of the same pipeline holds the lock."""


@dataclass
class SyncResult:
    """What one command did, over all its chunks."""

    rows_loaded: int = 0  # rows written, new or read again
    rows_new: int | None = None  # of those, rows the table did not hold before (None: not known)
    windows: int = 0
    pages: int = 0
    requests: int = 0
    retries: int = 0
    hedged: int = 0
    chunks: int = 0
    already_done: bool = False  # a finished backfill, not fetched again
    cursor: datetime | None = None
    seconds: float = 0.0
    load_infos: list[LoadInfo] = field(default_factory=list)
    tables_written: set[str] = field(default_factory=set)  # by the command's loads


def run_sync(config: Settings, stats: ExtractStats | None = None) -> SyncResult:
    """The scheduled run: from the state (or `start_date`) to now, a chunk per load."""
    return _run(config, stats or ExtractStats(), backfill=None)


def run_backfill(config: Settings, backfill: Range, stats: ExtractStats | None = None, *, force: bool = False) -> SyncResult:
    """Load `[start, end)` merged on `id`, resuming after its last committed chunk.

    The scheduled cursor does not move: dlt's `end_value` runs keep no cursor state. A finished
    backfill is not fetched again unless `force`.
    """
    return _run(config, stats or ExtractStats(), backfill=backfill, force=force)


def run_repair(config: Settings, windows: list[Window], stats: ExtractStats | None = None) -> SyncResult:
    """Reload just these windows (the days `verify` found different), as one backfill of their span."""
    span = (windows[0].start, windows[-1].end)
    return _run(config, stats or ExtractStats(), backfill=span, windows=windows)


def _run(
    config: Settings,
    stats: ExtractStats,
    backfill: Range | None,
    windows: list[Window] | None = None,
    force: bool = False,
) -> SyncResult:
    destination = make_destination(config)  # an unknown one fails before any request
    result = SyncResult()
    started = time.monotonic()
    with make_client(config) as client:
        stats.retries = lambda: client.retries
        # A bad key or URL fails here, before anything touches the destination or the state;
        # whose key it is (written with every row) is asked at the same time.
        organization_id = _checked_identity(client)
        with pipeline_lock(config), open_destination(config, destination) as opened:
            pipeline = make_pipeline(config, opened)
            follow_destination(pipeline, config)
            now = pendulum.now("UTC")
            state = read_state(pipeline)
            _check_organization(pipeline, config, state, organization_id)
            if windows is None:
                windows, result.already_done = _plan(config, state, now, backfill, force)
            touched_from = min((w.start for w in windows), default=None)
            rows_before = _table_rows(pipeline)
            # Models a refresh left stale (it failed, or never ran) are rebuilt whatever the command loads.
            current = models_current(pipeline)
            fingerprint = inputs_fingerprint(pipeline, touched_from) if current else None
            # where the rows the loads may replace ran from, before they do (a record read again can say it started later)
            ran_from = first_touched_day(pipeline, touched_from) if current and touched_from else None
            traces = _load_chunks(
                pipeline, config, client, windows, now, backfill, stats, result, organization_id,
                pending_refresh(touched_from, fingerprint),
            )
            if result.chunks:
                names_changed = bool(result.tables_written & set(MODEL_INPUTS))
                try:
                    with _room_for_models(config, pipeline):
                        models = refresh_models(
                            pipeline, unchanged_since=fingerprint, touched_from=touched_from,
                            only_touched=current and not names_changed, ran_from_before=ran_from,
                        )
                except Exception as error:  # the loads stay committed; the next run refreshes again
                    record_refresh_error(pipeline, error)
                    raise
                clear_refresh_error(pipeline)
                traces += models
                result.load_infos += [t.last_load_info for t in models if t and t.last_load_info]
            _save_trace(pipeline, traces)
            _prune_loaded_packages(pipeline, result)
            result.cursor = read_state(pipeline).cursor
            result.rows_new = _rows_new(pipeline, rows_before) if result.chunks else None
    result.windows, result.pages = stats.windows_done, stats.pages
    result.requests, result.retries, result.hedged = client.requests, client.retries, client.hedged
    result.seconds = time.monotonic() - started
    return result


def _checked_identity(client: UsageClient) -> str:
    """The key's organization, once the key has been seen to read usage: two requests at once."""
    with ThreadPoolExecutor(1, thread_name_prefix="ona-identity") as pool:
        identity = pool.submit(client.organization_id)
        client.check_access()  # its error, if any, is the one to report
        return identity.result()


def _plan(
    config: Settings, state: SyncState, now: pendulum.DateTime, backfill: Range | None, force: bool
) -> tuple[list[Window], bool]:
    """The windows to fetch, and whether this is a finished backfill that is not fetched again."""
    progress = state.backfills.get(backfill_key(*backfill, config.project_id), {}) if backfill else {}
    return plan_windows(config, state, now, backfill, force=force), bool(progress.get("done")) and not force


def _rows_new(pipeline: dlt.Pipeline, before: int | None) -> int | None:
    after = _table_rows(pipeline) if before is not None else None
    return None if after is None or before is None else after - before


def _load_chunks(
    pipeline: dlt.Pipeline,
    config: Settings,
    client: UsageClient,
    windows: list[Window],
    now: pendulum.DateTime,
    backfill: Range | None,
    stats: ExtractStats,
    result: SyncResult,
    organization_id: str,
    source_state: dict[str, Any],
) -> list[PipelineTrace]:
    """One dlt load per chunk of windows, fetched ahead by one fetcher; the names ride the first.

    A chunk ends at `--chunk` worth of windows or after `chunk_seconds` of fetching, whichever
    comes first: each load commits its rows and its progress, so a kill loses at most that.
    The first also commits `source_state` into the source's state.
    """
    stats.windows_total = len(windows)
    size = config.windows_per_chunk
    traces = []
    # While a load is committed, half a load's rows wait fetched ahead: the API stays busy for
    # the second or so a commit takes, and the peak is a load and a half, not two (30 MB less at 3M).
    ahead = max(config.chunk_rows // 2, 1)
    with WindowFetcher(client, windows, config.project_id, config.workers, lookahead=size, max_rows=ahead) as fetcher:
        feed = Feed(
            windows, fetcher, fetched_at=now, organization_id=organization_id, stats=stats,
            max_windows=size, max_seconds=config.chunk_seconds, max_rows=config.chunk_rows,
            early_rows=min(BATCH_ROWS, config.chunk_rows), source_state=source_state,
        )
        while not feed.last:
            usage = usage_records(config, backfill, feed)
            # With the usage: a list the key may not read is left out (one warning), never the usage.
            resources = [usage, *([] if result.chunks else _extras(config, client, pipeline))]
            if config.destination == "filesystem":
                # Plain Parquet files cannot be merged into: the usage goes to a Delta table, merged
                # on `id` as elsewhere; the lists are replaced whole (Delta has no delete-insert).
                usage.apply_hints(table_format="delta")
                for resource in resources[1:]:
                    resource.apply_hints(write_disposition="replace")
            result.load_infos.append(pipeline.run(source_of(resources)))
            result.chunks += 1
            normalized = _normalized(pipeline)
            result.rows_loaded += normalized.get(RESOURCE_NAME, 0)
            result.tables_written |= set(normalized)
            traces.append(pipeline.last_trace)
            stats.chunk_committed(feed.taken[-1].end if feed.taken else None)
            if not feed.last:
                logger.info("committed chunk %d (%d of %d windows)", result.chunks, stats.windows_done, stats.windows_total)
    return traces


@contextmanager
def _room_for_models(config: Settings, pipeline: dlt.Pipeline) -> Iterator[None]:
    """Twice the loads' DuckDB memory for the models' queries and their loads.

    They run after the loads, when the fetched windows are gone. The queries are sliced to fit
    (`slice_bound`), but a model's load copies its whole table in one job: with the loads'
    limit set to 40MB, the monthly model of 3M runs by 10,000 users ran out where the usage had not.
    """
    doubled = _doubled(config.duckdb_memory_limit)
    if config.destination != "duckdb" or doubled is None:
        yield
        return
    with pipeline.sql_client() as client:
        client.execute_sql("SET memory_limit = ?", doubled)
        try:
            yield
        finally:
            client.execute_sql("SET memory_limit = ?", config.duckdb_memory_limit)


def _doubled(limit: str) -> str | None:
    """`64MB` as `128MB`; None for what is not a size (DuckDB's own default, say)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)\s*", limit, flags=re.IGNORECASE)
    return f"{float(match.group(1)) * 2:g}{match.group(2)}" if match else None


def _extras(config: Settings, client: UsageClient, pipeline: dlt.Pipeline) -> list:
    """What rides with the first load: the lists of names, and the rate card where it changed."""
    every_run = config.destination == "filesystem"
    extras = name_resources(config, client, every_run=every_run) if config.names else []
    if config.rate_card and (every_run or rate_card_changed(config, pipeline.state)):
        extras.append(rate_card_resource(config))
    return extras


def _check_organization(pipeline: dlt.Pipeline, config: Settings, state: SyncState, organization_id: str) -> None:
    """Before anything is fetched or written: this pipeline's organization, and the dataset's others."""
    check_organization(state.organization_id, organization_id, config.pipeline_name)
    if state.organization_id or config.add_organization or not has_sql(pipeline):
        return
    others = [o for o in _organizations_in_table(pipeline) if o != organization_id]
    if others:
        raise OrganizationMismatch(
            f"dataset {config.dataset_name!r} holds usage of organization {', '.join(others)}, and this key belongs to "
            f"organization {organization_id}; add --add-organization to keep both in one dataset, or choose another --dataset-name"
        )


def _organizations_in_table(pipeline: dlt.Pipeline) -> list[str]:
    """The organizations whose usage the dataset holds, whichever pipeline loaded it."""
    try:
        with pipeline.sql_client() as client:
            table = client.make_qualified_table_name(RESOURCE_NAME)
            rows = client.execute_sql(f"SELECT DISTINCT organization_id FROM {table} WHERE organization_id IS NOT NULL")
    except (DatabaseUndefinedRelation, DatabaseTerminalException):
        return []  # no table yet, or one from before organizations were recorded
    return [row[0] for row in rows or []]


def _table_rows(pipeline: dlt.Pipeline) -> int | None:
    """Rows in the usage table now; None where that is not known (no table yet is 0)."""
    if not has_sql(pipeline):
        return None
    if RESOURCE_NAME not in loaded_tables(pipeline):
        return 0
    with pipeline.sql_client() as client:
        return int(client.execute_sql(f"SELECT count(*) FROM {client.make_qualified_table_name(RESOURCE_NAME)}")[0][0])


def _prune_loaded_packages(pipeline: dlt.Pipeline, result: SyncResult) -> None:
    """Keep only this command's completed load packages, and without their data files.

    dlt keeps every completed package, Parquet copies of the rows included: an hourly schedule
    would pile up thousands of folders of usage data outside the warehouse. The latest stay
    for `dlt pipeline <name> info` and `trace`; pending and failed packages are never touched.
    """
    keep = {load_id for info in result.load_infos for load_id in info.loads_ids}
    if pipeline.last_trace and pipeline.last_trace.last_load_info:
        keep |= set(pipeline.last_trace.last_load_info.loads_ids)
    loaded = Path(pipeline.working_dir) / "load" / "loaded"
    if not loaded.is_dir():
        return  # nothing was ever loaded from here
    storage = pipeline._get_load_storage()  # dlt has no public call to delete loaded packages
    for load_id in storage.list_loaded_packages():
        try:
            if load_id not in keep:
                storage.delete_loaded_package(load_id)
            elif (loaded / load_id / "completed_jobs").is_dir():
                storage.loaded_packages.remove_completed_jobs(load_id)  # a package with failed jobs keeps them
        except OSError as exc:  # housekeeping: a package a kill left half-written must not fail the run
            logger.info("could not tidy load package %s: %s", load_id, exc)


def _normalized(pipeline: dlt.Pipeline) -> dict[str, int]:
    """Rows per table of the last run's load package."""
    normalize = pipeline.last_trace.last_normalize_info if pipeline.last_trace else None
    return dict(normalize.row_counts) if normalize else {}


def _save_trace(pipeline: dlt.Pipeline, traces: list[PipelineTrace]) -> None:
    """One trace for the whole command, so `dlt pipeline <name> trace` shows the usage loads too."""
    traces = [t for t in traces if t is not None]
    if len(traces) < 2:
        return
    steps = [step for trace in traces for step in trace.steps]
    save_trace(pipeline.working_dir, traces[0]._replace(steps=steps, finished_at=traces[-1].finished_at))


def make_pipeline(config: Settings, destination: Destination | None = None) -> dlt.Pipeline:
    """A pipeline whose state and data live in the configured destination and dataset."""
    return dlt.pipeline(
        pipeline_name=config.pipeline_name,
        destination=destination or make_destination(config),
        dataset_name=config.dataset_name,
    )


def make_destination(config: Settings) -> Destination:
    """The named dlt destination; DuckDB always at `config.duckdb_file`, an absolute path."""
    if config.destination == "duckdb":
        if Path(config.duckdb_file).stem == config.dataset_name:
            raise ConfigError(
                f"the DuckDB file {config.duckdb_file!r} is named like the dataset {config.dataset_name!r}, which "
                "makes DuckDB's table names ambiguous; rename the file or set --dataset-name"
            )
        return dlt.destinations.duckdb(credentials=config.duckdb_file)
    try:
        destination = Destination.from_reference(config.destination)
    except Exception as exc:  # dlt raises several types for names it cannot resolve
        raise ConfigError(
            f"unknown destination {config.destination!r} ({type(exc).__name__}); "
            "use a dlt destination name such as duckdb, postgres, bigquery, snowflake, motherduck or filesystem"
        ) from None
    try:  # resolved now, so missing credentials fail before any request, in one line
        destination.configuration(destination.spec())
    except ConfigFieldMissingException as exc:
        fields = ["credentials"] if "Credentials" in exc.spec_name else [f for f in exc.fields if f not in PIPELINE_FIELDS]
        if not fields:
            return destination
        name = destination.destination_name
        raise ConfigError(
            f"the {name} destination is missing {' and '.join(fields)}: set "
            + " and ".join(f"DESTINATION__{name.upper()}__{field.upper()}" for field in fields)
            + f", or {' and '.join(fields)} under [destination.{name}] in .dlt/secrets.toml"
        ) from None
    return destination


@contextmanager
def open_destination(config: Settings, destination: Destination) -> Iterator[Destination]:
    """For DuckDB, one connection for all of a command's loads, closed (and checkpointed) once.

    dlt opens and closes a connection per load job otherwise, and each close checkpoints the
    file: with a load per chunk that was a third of a year's sync.
    """
    if config.destination != "duckdb":
        yield cache_capabilities(destination)
        return
    connection = _connect_for_writing(config.duckdb_file)
    # DuckDB would take up to 80% of RAM as cache; a chunk's merge needs a small part of it.
    connection.execute("SET memory_limit = ?", [config.duckdb_memory_limit])
    # And its allocator keeps what a load freed for the next: purged in the background and
    # flushed past 8 MB, 3M records of a big organization peaked 50 MB lower (545 to 495 MB).
    connection.execute("SET allocator_background_threads = true")
    connection.execute("SET allocator_flush_threshold = '8MB'")
    try:
        yield cache_capabilities(dlt.destinations.duckdb(credentials=connection))
    finally:
        connection.close()


def cache_capabilities(destination: Destination) -> Destination:
    """Compute the destination's capabilities once per command.

    dlt resolves the destination's whole configuration on every `capabilities()` call, and a
    load calls it about fifty times: a tenth of a second per load, for an answer that cannot
    change while the command runs. Callers get a copy, so none can change another's.
    """
    compute = destination.capabilities
    cached: list[Any] = []

    def capabilities(config: Any = None, naming: Any = None) -> Any:
        if config is not None or naming is not None:
            return compute(config, naming)
        if not cached:
            cached.append(compute())
        return copy.copy(cached[0])

    destination.capabilities = capabilities  # type: ignore[method-assign]
    return destination


def _connect_for_writing(path: str) -> Any:
    """A read-write connection; while another process holds the file (a reader opening it for a
    moment, say), try again for a few seconds, then say who holds it in one line."""
    import duckdb

    deadline = time.monotonic() + WRITE_LOCK_PATIENCE
    while True:
        try:
            return duckdb.connect(path)
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower():
                raise
            if time.monotonic() >= deadline:
                holder = str(exc).split("Conflicting lock is held in ", 1)[-1].split(".", 1)[0] if "Conflicting" in str(exc) else "another process"
                raise WarehouseBusy(
                    f"{path} is open in another process ({holder}); DuckDB lets a writer in only when no other "
                    "process holds the file: close it there (a notebook, a BI tool), or let the other run finish"
                ) from None
            time.sleep(0.2)


def warehouse_exists(config: Settings) -> bool:
    """False for a DuckDB file that is not there yet (reading must not create it)."""
    return config.destination != "duckdb" or config.duckdb_file.startswith(("md:", "motherduck:")) or Path(config.duckdb_file).exists()


def target(config: Settings, *, api: bool = True) -> str:
    """What a pipeline's local state belongs to: the warehouse and the dataset, and the API it read."""
    where = config.duckdb_file if config.destination == "duckdb" else config.destination
    return f"{where}|{config.dataset_name}" + (f"|{config.base_url}" if api else "")


def follow_destination(pipeline: dlt.Pipeline, config: Settings) -> None:
    """Make the destination's state the one this command runs from.

    dlt keeps a pipeline's local state machine-wide, under its name; it may be of another
    warehouse (a run from another directory), another dataset or another API. Such state is
    dropped, with one line, and the destination's restored instead. State of this very target
    is kept only to finish a load a killed run left pending, then brought up to the destination.
    """
    recorded = _recorded_target(pipeline)
    if recorded == target(config):
        finish_pending(pipeline)
    elif pipeline.default_schema_name or pipeline.has_pending_data:
        logger.warning(
            "the local state of pipeline %r was of %s; following the state stored in %s instead",
            config.pipeline_name,
            (recorded or "an unrecorded target").split("|")[0],
            target(config).split("|")[0],
        )
        pipeline.drop()
    if warehouse_exists(config):
        pipeline.sync_destination()
    elif pipeline.default_schema_name:  # the warehouse is gone: so is what the state described
        pipeline.drop()
    Path(pipeline.working_dir).mkdir(parents=True, exist_ok=True)
    (Path(pipeline.working_dir) / TARGET_FILE).write_text(target(config))


def _recorded_target(pipeline: dlt.Pipeline) -> str | None:
    """What the local state was last of (`target`), as the last writer recorded it."""
    marker = Path(pipeline.working_dir) / TARGET_FILE
    return marker.read_text() if marker.exists() else None


class WarehouseBusy(RuntimeError):
    """A sync is writing the DuckDB file, and DuckDB lets no other process open it meanwhile."""


@contextmanager
def reading(config: Settings) -> Iterator[dlt.Pipeline]:
    """A pipeline for reading the warehouse and the state stored in it, whatever the local folder holds.

    DuckDB is opened read-only, so readers work beside any other reader (a notebook, a BI tool).
    The state is restored into a throwaway folder: readers take no lock, and never touch the
    local folder a running sync may be writing.
    """
    with tempfile.TemporaryDirectory(prefix="ona-usage-") as folder, _read_only(config) as destination:
        pipeline = dlt.pipeline(
            pipeline_name=config.pipeline_name,
            pipelines_dir=folder,
            destination=destination,
            dataset_name=config.dataset_name,
        )
        if warehouse_exists(config):
            pipeline.sync_destination()
        yield pipeline


def local_pipeline(config: Settings) -> dlt.Pipeline | None:
    """This machine's pipeline folder, where it is of this warehouse: its last trace and pending loads."""
    pipeline = make_pipeline(config)
    ours = (_recorded_target(pipeline) or "").startswith(target(config, api=False) + "|")
    return pipeline if ours else None


@contextmanager
def _read_only(config: Settings) -> Iterator[Destination]:
    if config.destination != "duckdb" or not Path(config.duckdb_file).exists():
        yield make_destination(config)
        return
    import duckdb

    try:
        connection = duckdb.connect(config.duckdb_file, read_only=True)
    except duckdb.IOException as exc:
        if "lock" not in str(exc).lower():
            raise
        raise WarehouseBusy(
            f"{config.duckdb_file} is being written by another process (a sync, most likely); "
            "DuckDB lets nobody else open it until that finishes: try again then"
        ) from None
    try:
        yield dlt.destinations.duckdb(credentials=connection)
    finally:
        connection.close()


def reset(config: Settings) -> bool:
    """Drop the table, the models and the resource's state, in the destination and locally."""
    from dlt.pipeline.helpers import pipeline_drop

    with pipeline_lock(config):
        pipeline = make_pipeline(config)
        follow_destination(pipeline, config)
        if not pipeline.default_schema_name:
            return False
        loaded = set(pipeline.default_schema.tables)
        pipeline_drop(pipeline, resources=[RESOURCE_NAME, *(m for m in MODELS if m in loaded)])()
        return True


def finish_pending(pipeline: dlt.Pipeline) -> None:
    """Load what a failed or killed run extracted but did not load, before fetching anything new.

    Its rows and its state belong together, so loading them keeps the table and the cursor
    consistent. If the package is lost instead (a fresh machine, one a kill left half moved) or
    discarded (one whose load a kill cut off mid-write), the destination's older state rules,
    which is consistent too.
    """
    if not pipeline.has_pending_data:
        return
    logger.warning("finishing a load that an earlier run left pending")
    try:
        _refuse_cut_off_jobs(pipeline)
        pipeline.normalize()
        pipeline.load()
    except Exception as exc:  # a run killed mid-step can leave a package dlt cannot finish
        logger.warning(
            "could not finish it (%s); discarding the local pipeline folder and resuming from the "
            "state stored in the destination",
            str(exc).splitlines()[0],
        )
        # Only completed loads carry state in the destination, so this is the fresh-runner case.
        pipeline.drop()


class CutOffLoad(RuntimeError):
    """A killed run left load jobs running: whether their writes committed cannot be known."""


def _refuse_cut_off_jobs(pipeline: dlt.Pipeline) -> None:
    """dlt would run such a job again, and if it had committed just before the kill, its rows
    would be in a staging table twice, and the merge would insert both."""
    cut_off = sum(
        len(pipeline.get_load_package_info(load_id).jobs.get("started_jobs", []))
        for load_id in pipeline.list_normalized_load_packages()
    )
    if cut_off:
        raise CutOffLoad(
            f"the run was killed while {cut_off} load job(s) wrote to the destination, and whether "
            "they committed cannot be known"
        )


def read_state(pipeline: dlt.Pipeline) -> SyncState:
    """The usage resource's state: the cursor, how far the sync fetched, and backfills."""
    return SyncState.from_pipeline_state(pipeline.state)


def read_cursor(pipeline: dlt.Pipeline) -> datetime | None:
    """The newest `stopped_at` the scheduled sync has loaded."""
    return read_state(pipeline).cursor


@contextmanager
def pipeline_lock(config: Settings) -> Iterator[None]:
    """One run per pipeline at a time on this machine; a second one is refused, not queued."""
    folder = Path(get_dlt_pipelines_dir())  # where dlt keeps the pipeline's local state
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f".{config.pipeline_name}.lock"
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise PipelineBusyError(
                f"another ona-usage run of pipeline {config.pipeline_name!r} is in progress (pid {holder}); "
                "wait for it to finish"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
