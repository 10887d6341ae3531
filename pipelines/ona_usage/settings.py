"""Every option's default, and how CLI flags, environment and dlt config combine.

Precedence, highest first: a CLI flag; dlt's providers for `[sources.ona_usage]` (environment
variables `SOURCES__ONA_USAGE__<NAME>`, then `.dlt/secrets.toml` and `.dlt/config.toml` in the
working directory); for the key only, `ONA_API_KEY` then `GITPOD_API_KEY`; the defaults below.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import pendulum
from dlt.common.configuration import configspec, resolve_configuration
from dlt.common.configuration.specs import BaseConfiguration
from dlt.common.typing import TSecretStrValue

from ona_usage.client import DEFAULT_BASE_URL, DEFAULT_MAX_ATTEMPTS, MAX_PAGE_SIZE, check_base_url
from ona_usage.windows import parse_duration, parse_window_size, to_utc

SECTIONS = ("sources", "ona_usage")
DEFAULT_WINDOW = "1d"
DEFAULT_LOOKBACK = "2h"
DEFAULT_PAGE_SIZE = MAX_PAGE_SIZE
DEFAULT_WORKERS = 16
DEFAULT_CHUNK = "60d"
DEFAULT_DUCKDB_MEMORY_LIMIT = "128MB"
DEFAULT_TIMEOUT = 60.0
DEFAULT_START_DAYS = 30
DEFAULT_DESTINATION = "duckdb"
DEFAULT_DATASET_NAME = "ona_usage"
DEFAULT_PIPELINE_NAME = "ona_usage"
API_KEY_ENV_VARS = ("ONA_API_KEY", "GITPOD_API_KEY")
MISSING_KEY_MESSAGE = (
    "no API key: set ONA_API_KEY (or GITPOD_API_KEY, SOURCES__ONA_USAGE__API_KEY, "
    "or api_key under [sources.ona_usage] in .dlt/secrets.toml)"
)


class ConfigError(ValueError):
    """An option has a value the sync cannot use; the message names the option and the fix."""


@configspec
class SyncSettings(BaseConfiguration):
    """The options of `ona-usage sync`, resolved like any dlt source's config."""

    api_key: Optional[TSecretStrValue] = None
    base_url: str = DEFAULT_BASE_URL
    start_date: Optional[str] = None
    project_id: Optional[str] = None
    window: str = DEFAULT_WINDOW
    lookback: str = DEFAULT_LOOKBACK
    page_size: int = DEFAULT_PAGE_SIZE
    workers: int = DEFAULT_WORKERS
    chunk: str = DEFAULT_CHUNK
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    timeout: float = DEFAULT_TIMEOUT
    names: bool = True
    duckdb_memory_limit: str = DEFAULT_DUCKDB_MEMORY_LIMIT
    destination: str = DEFAULT_DESTINATION
    dataset_name: str = DEFAULT_DATASET_NAME
    pipeline_name: str = DEFAULT_PIPELINE_NAME
    allow_insecure_http: bool = False

    def validate(self, *, require_key: bool = True) -> None:
        """Check every option up front, so a bad one fails before any request or write."""
        if require_key and not self.api_key:
            raise ConfigError(MISSING_KEY_MESSAGE)
        if self.api_key and any(ch.isspace() or not ch.isprintable() for ch in self.api_key):
            raise ConfigError("the API key contains spaces or control characters; check how it was set")
        _check(lambda: check_base_url(self.base_url, allow_insecure_http=self.allow_insecure_http))
        if self.start_date is not None:
            parse_date(self.start_date, "start date")
        _check(lambda: parse_window_size(self.window))
        if _check(lambda: parse_duration(self.lookback, name="lookback")).total_seconds() < 0:
            raise ConfigError(f"lookback {self.lookback!r} must not be negative")
        if _check(lambda: parse_duration(self.chunk, name="chunk")).total_seconds() <= 0:
            raise ConfigError(f"chunk {self.chunk!r} must be positive, e.g. 7d")
        if not 1 <= int(self.page_size) <= MAX_PAGE_SIZE:
            raise ConfigError(f"page size {self.page_size} must be between 1 and {MAX_PAGE_SIZE}")
        if not 0 < float(self.timeout) <= 600:
            raise ConfigError(f"timeout {self.timeout} must be more than 0 and at most 600 seconds")
        if not 1 <= int(self.max_attempts) <= 20:
            raise ConfigError(f"max_attempts {self.max_attempts} must be between 1 and 20")
        if not 1 <= int(self.workers) <= 32:
            raise ConfigError(f"workers {self.workers} must be between 1 and 32")
        for name in ("dataset_name", "pipeline_name", "destination"):
            if not str(getattr(self, name)).strip():
                raise ConfigError(f"{name} must not be empty")


def resolve(overrides: dict[str, Any] | None = None) -> SyncSettings:
    """Resolve the settings; `overrides` are CLI flags (None means "not given")."""
    explicit = {k: v for k, v in (overrides or {}).items() if v is not None}
    try:
        settings = resolve_configuration(SyncSettings(), sections=SECTIONS, explicit_value=explicit)
    except Exception as exc:  # dlt reports bad config values with its own exception types
        raise ConfigError(f"bad configuration: {exc}") from None
    # A key pasted with a newline would break the Authorization header (and land in its error).
    settings.api_key = (settings.api_key or "").strip() or api_key_from_env()
    return settings


def api_key_from_env() -> Optional[str]:
    for name in API_KEY_ENV_VARS:
        if value := os.environ.get(name, "").strip():
            return value
    return None


def default_start_date() -> pendulum.DateTime:
    return pendulum.today("UTC").subtract(days=DEFAULT_START_DAYS)


def parse_date(text: str, what: str) -> pendulum.DateTime:
    """An ISO date or datetime (UTC unless it says otherwise), or a clear error."""
    try:
        return to_utc(text)
    except (ValueError, TypeError, pendulum.parsing.exceptions.ParserError) as exc:
        raise ConfigError(f"{what} {text!r} is not a date; use YYYY-MM-DD or an ISO 8601 datetime ({exc})") from None


def _check(step: Any) -> Any:
    try:
        return step()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
