"""Every option's default and validation, and how flags, environment and dlt config combine.

Options are resolved once, the way dlt resolves any source's config, and parsed once into typed
values (`Settings`): durations as `pendulum.Duration`, dates as UTC datetimes, numbers as
numbers, the DuckDB file as an absolute path. Nothing downstream parses an option again.

Precedence, highest first: an explicit value (a CLI flag, or an argument of the `ona_usage`
source); dlt's providers for `[sources.ona_usage]` (environment variables
`SOURCES__ONA_USAGE__<NAME>`, then `.dlt/secrets.toml` and `.dlt/config.toml` in the working
directory); for the key only, `ONA_API_KEY` then `GITPOD_API_KEY`; for the base URL only,
`ONA_BASE_URL`; the defaults below.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional

import httpx
import pendulum
from dlt.common.configuration import configspec, resolve_configuration
from dlt.common.configuration.specs import BaseConfiguration
from dlt.common.typing import TSecretStrValue

from ona_usage.windows import format_duration, parse_duration, parse_window_size, to_utc

logger = logging.getLogger(__name__)

SECTIONS = ("sources", "ona_usage")
MAX_PAGE_SIZE = 100  # the API's own limit
DEFAULT_BASE_URL = "https://app.ona.com/api"  # where the newest official SDKs point
DEFAULT_WINDOW = "1d"
DEFAULT_LOOKBACK = "2h"
DEFAULT_PAGE_SIZE = MAX_PAGE_SIZE
DEFAULT_WORKERS = 16
DEFAULT_CHUNK = "365d"  # a load commits after a year of windows at most; the time and row bounds come first
DEFAULT_CHUNK_SECONDS = 30.0  # a load also commits after this much fetching: what a kill may lose
DEFAULT_CHUNK_ROWS = 250_000  # ... and once it holds this many records: a load's memory stays bounded
DEFAULT_MAX_ATTEMPTS = 6
DEFAULT_BACKOFF = 0.5
DEFAULT_TIMEOUT = 60.0
CONNECT_TIMEOUT = 10.0
DEFAULT_DUCKDB_MEMORY_LIMIT = "64MB"
DEFAULT_START_DAYS = 30
DEFAULT_DESTINATION = "duckdb"
# Not `ona_usage`: DuckDB names the catalog after the file, dlt names the file after the
# pipeline, and a catalog named like the dataset makes every `<dataset>.<table>` ambiguous.
DEFAULT_DATASET_NAME = "ona"
DEFAULT_PIPELINE_NAME = "ona_usage"
LEGACY_DUCKDB_FILE = "ona-usage.duckdb"  # with dataset `ona_usage`, the defaults before 0.2
DUCKDB_SUFFIX = ".duckdb"  # as dlt's own default: `<pipeline_name>.duckdb` in the working directory
API_KEY_ENV_VARS = ("ONA_API_KEY", "GITPOD_API_KEY")
BASE_URL_ENV_VAR = "ONA_BASE_URL"
MISSING_KEY_MESSAGE = (
    "no API key: set ONA_API_KEY (or GITPOD_API_KEY, SOURCES__ONA_USAGE__API_KEY, "
    "or api_key under [sources.ona_usage] in .dlt/secrets.toml)"
)


class ConfigError(ValueError):
    """An option has a value the sync cannot use; the message names the option and the fix."""


class Rate(NamedTuple):
    """One line of a rate card: what an hour on an environment class costs, from a date on."""

    environment_class: str  # an id, or a display name as ListEnvironmentClasses gives it
    credits_per_hour: float
    valid_from: Optional[pendulum.Date]  # None: since always
    credit_price: Optional[float]  # what a credit costs, in `currency`
    currency: Optional[str]


@configspec
class SyncConfig(BaseConfiguration):
    """The options as dlt resolves them from `[sources.ona_usage]`, before they are parsed."""

    api_key: Optional[TSecretStrValue] = None
    base_url: Optional[str] = None
    start_date: Optional[str] = None
    project_id: Optional[str] = None
    window: str = DEFAULT_WINDOW
    lookback: str = DEFAULT_LOOKBACK
    page_size: int = DEFAULT_PAGE_SIZE
    workers: int = DEFAULT_WORKERS
    chunk: str = DEFAULT_CHUNK
    chunk_seconds: float = DEFAULT_CHUNK_SECONDS
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    backoff: float = DEFAULT_BACKOFF
    timeout: float = DEFAULT_TIMEOUT
    names: bool = True
    duckdb_memory_limit: str = DEFAULT_DUCKDB_MEMORY_LIMIT
    duckdb_file: Optional[str] = None
    rate_card: Optional[List[Dict[str, Any]]] = None
    rate_card_file: Optional[str] = None
    credit_price: Optional[float] = None
    currency: Optional[str] = None
    add_organization: bool = False
    destination: str = DEFAULT_DESTINATION
    dataset_name: str = DEFAULT_DATASET_NAME
    pipeline_name: str = DEFAULT_PIPELINE_NAME
    allow_insecure_http: bool = False


@dataclass
class Settings:
    """The options, parsed and checked: what every part of the sync reads."""

    api_key: Optional[str] = field(repr=False)
    base_url: str
    start_date: Optional[pendulum.DateTime]
    project_id: Optional[str]
    window: pendulum.Duration
    lookback: pendulum.Duration
    page_size: int
    workers: int
    chunk: pendulum.Duration
    chunk_seconds: float
    chunk_rows: int
    max_attempts: int
    backoff: float
    timeout: float
    names: bool
    duckdb_memory_limit: str
    duckdb_file: str  # absolute, or a non-file DuckDB target such as ":memory:"
    rate_card: list[Rate]
    add_organization: bool
    destination: str
    dataset_name: str
    pipeline_name: str
    allow_insecure_http: bool

    def require_api_key(self) -> str:
        if not self.api_key:
            raise ConfigError(MISSING_KEY_MESSAGE)
        return self.api_key

    @property
    def windows_per_chunk(self) -> int:
        return max(1, math.ceil(self.chunk.total_seconds() / self.window.total_seconds()))

    def first_start(self) -> pendulum.DateTime:
        """Where a pipeline's first run starts: `start_date`, or 30 days before today (UTC)."""
        return self.start_date or pendulum.today("UTC").subtract(days=DEFAULT_START_DAYS)

    def describe(self, option: str) -> str:
        """An option as a person would write it (durations as `2h`, dates in RFC 3339)."""
        value = getattr(self, option)
        return format_duration(value) if isinstance(value, pendulum.Duration) else str(value)


def resolve(overrides: dict[str, Any] | None = None) -> Settings:
    """Resolve and parse the options; `overrides` are explicit values (None means "not given")."""
    explicit = {k: v for k, v in (overrides or {}).items() if v is not None}
    try:
        raw = resolve_configuration(SyncConfig(), sections=SECTIONS, explicit_value=explicit)
    except Exception as exc:  # dlt reports bad config values with its own exception types
        raise ConfigError(f"bad configuration: {exc}") from None
    return parse(raw)


def parse(raw: SyncConfig) -> Settings:
    """Check every option up front, so a bad one fails before any request or write."""
    # A key pasted with a newline would break the Authorization header (and land in its error).
    api_key = str(raw.api_key or "").strip() or api_key_from_env()
    if api_key and any(ch.isspace() or not ch.isprintable() for ch in api_key):
        raise ConfigError("the API key contains spaces or control characters; check how it was set")
    base_url = raw.base_url or os.environ.get(BASE_URL_ENV_VAR, "").strip() or DEFAULT_BASE_URL
    allow_insecure_http = bool(raw.allow_insecure_http)
    _check(lambda: check_base_url(base_url, allow_insecure_http=allow_insecure_http))
    lookback = _check(lambda: parse_duration(raw.lookback, name="lookback"))
    if lookback.total_seconds() < 0:
        raise ConfigError(f"lookback {raw.lookback!r} must not be negative")
    chunk = _check(lambda: parse_duration(raw.chunk, name="chunk"))
    if chunk.total_seconds() <= 0:
        raise ConfigError(f"chunk {raw.chunk!r} must be positive, e.g. 7d")
    page_size = _number(raw.page_size, "page size", int, 1, MAX_PAGE_SIZE)
    timeout = _number(raw.timeout, "timeout", float, 0, 600)
    if timeout <= 0:
        raise ConfigError(f"timeout {raw.timeout} must be more than 0 and at most 600 seconds")
    for name in ("dataset_name", "pipeline_name", "destination"):
        if not str(getattr(raw, name)).strip():
            raise ConfigError(f"{name} must not be empty")
    return Settings(
        api_key=api_key,
        base_url=base_url,
        start_date=_past(parse_date(raw.start_date, "start date"), "start date") if raw.start_date else None,
        project_id=raw.project_id or None,
        window=_check(lambda: parse_window_size(raw.window)),
        lookback=lookback,
        page_size=page_size,
        workers=_number(raw.workers, "workers", int, 1, 32),
        chunk=chunk,
        chunk_seconds=_number(raw.chunk_seconds, "chunk_seconds", float, 0.1, 86_400),
        chunk_rows=_number(raw.chunk_rows, "chunk_rows", int, 1, 100_000_000),
        max_attempts=_number(raw.max_attempts, "max_attempts", int, 1, 20),
        backoff=_number(raw.backoff, "backoff", float, 0, 60),
        timeout=timeout,
        names=bool(raw.names),
        duckdb_memory_limit=str(raw.duckdb_memory_limit),
        duckdb_file=duckdb_file(raw.duckdb_file, raw.pipeline_name.strip()),
        rate_card=rate_card(raw.rate_card, raw.rate_card_file, raw.credit_price, raw.currency),
        add_organization=bool(raw.add_organization),
        destination=raw.destination.strip(),
        dataset_name=raw.dataset_name.strip(),
        pipeline_name=raw.pipeline_name.strip(),
        allow_insecure_http=allow_insecure_http,
    )


def duckdb_file(explicit: str | None, pipeline_name: str) -> str:
    """The one DuckDB file every command uses, as an absolute path.

    An explicit `duckdb_file` (flag or config) wins, then dlt's own
    `destination.duckdb.credentials`, then dlt's default, `<pipeline_name>.duckdb` in the
    working directory. Made absolute here, so dlt never resolves it against the directory a
    pipeline first ran in.
    """
    import dlt

    path = explicit
    if not path:
        for accessor in (dlt.secrets, dlt.config):
            configured = accessor.get("destination.duckdb.credentials")
            if isinstance(configured, str) and configured.strip():
                path = configured.strip()
                break
    if not path:
        path = pipeline_name + DUCKDB_SUFFIX
        if Path(LEGACY_DUCKDB_FILE).exists() and not Path(path).exists():
            logger.warning(
                "found %s, the default of ona-usage before 0.2; the default is now %s with dataset %r: "
                "set --duckdb-file %s --dataset-name ona_usage to keep using it",
                LEGACY_DUCKDB_FILE, path, DEFAULT_DATASET_NAME, LEGACY_DUCKDB_FILE,
            )
    if path.startswith((":memory:", "md:", "motherduck:")):
        return path
    if path.startswith("duckdb:///"):
        path = path[len("duckdb:///") :]
    absolute = Path(path).expanduser().absolute()
    if not absolute.parent.is_dir():
        raise ConfigError(f"the folder {absolute.parent} for the DuckDB file does not exist; create it, or point --duckdb-file elsewhere")
    return str(absolute)


def _past(value: pendulum.DateTime, what: str) -> pendulum.DateTime:
    if value > pendulum.now("UTC"):
        raise ConfigError(f"{what} {value.to_iso8601_string()} is in the future; there is no usage to load from there yet")
    return value


def rate_card(
    entries: Optional[List[Dict[str, Any]]], path: Optional[str], credit_price: Optional[float], currency: Optional[str]
) -> list[Rate]:
    """The rate card from `rate_card` (config) and `rate_card_file` (a CSV with the same columns)."""
    import csv

    rows = list(entries or [])
    if path:
        try:
            with open(Path(path).expanduser(), newline="", encoding="utf-8") as handle:
                rows += [{k: v for k, v in row.items() if v not in (None, "")} for row in csv.DictReader(handle)]
        except OSError as exc:
            raise ConfigError(f"rate_card_file {path!r} cannot be read: {exc.strerror}") from None
    price = None if credit_price is None else _number(credit_price, "credit_price", float, 0, 1e9)
    rates: list[Rate] = []
    for number, row in enumerate(rows, start=1):
        where = f"rate card line {number}"
        if not isinstance(row, dict) or not str(row.get("environment_class") or "").strip():
            raise ConfigError(f"{where} has no environment_class (an environment class id or display name)")
        if "credits_per_hour" not in row:
            raise ConfigError(f"{where} has no credits_per_hour")
        valid_from = row.get("valid_from")
        rates.append(
            Rate(
                environment_class=str(row["environment_class"]).strip(),
                credits_per_hour=_number(row["credits_per_hour"], f"{where}: credits_per_hour", float, 0, 1e9),
                valid_from=parse_date(str(valid_from), f"{where}: valid_from").date() if valid_from else None,
                credit_price=price,
                currency=(currency or "").strip() or None,
            )
        )
    seen = set()
    for rate in rates:
        key = (rate.environment_class, rate.valid_from)
        if key in seen:
            raise ConfigError(f"the rate card has {rate.environment_class!r} twice from {rate.valid_from or 'the start'}")
        seen.add(key)
    return rates


def api_key_from_env() -> Optional[str]:
    for name in API_KEY_ENV_VARS:
        if value := os.environ.get(name, "").strip():
            return value
    return None


def parse_date(text: Any, what: str) -> pendulum.DateTime:
    """An ISO date or datetime (UTC unless it says otherwise), or a clear error."""
    try:
        return to_utc(text)
    except (ValueError, TypeError, pendulum.parsing.exceptions.ParserError) as exc:
        raise ConfigError(f"{what} {text!r} is not a date; use YYYY-MM-DD or an ISO 8601 datetime ({exc})") from None


def parse_range(start: Any, end: Any) -> tuple[pendulum.DateTime, pendulum.DateTime]:
    """`--start` and `--end` of a backfill, verify or report, checked to make a range."""
    begin, finish = parse_date(start, "--start"), parse_date(end, "--end")
    if finish <= begin:
        raise ConfigError(f"--end {end!r} must be after --start {start!r}")
    return begin, finish


def check_base_url(base_url: str, *, allow_insecure_http: bool = False) -> httpx.URL:
    """Refuse URLs that would send the key in clear text to anything but this machine."""
    try:
        url = httpx.URL(base_url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise ValueError(f"base URL {base_url!r} is not a URL: {exc}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"base URL {base_url!r} is not an http(s) URL, e.g. {DEFAULT_BASE_URL}")
    if url.scheme == "http" and not allow_insecure_http and not is_loopback(url.host):
        raise ValueError(
            f"base URL {base_url!r} uses plain http, which would send the API key unencrypted; "
            "use https (plain http is allowed only to 127.0.0.1/localhost)"
        )
    return url


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _number(value: Any, what: str, kind: type, low: float, high: float) -> Any:
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} {value!r} is not a number") from None
    if not low <= number <= high:
        raise ConfigError(f"{what} {value} must be between {low} and {high}")
    return number


def _check(step: Any) -> Any:
    try:
        return step()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
