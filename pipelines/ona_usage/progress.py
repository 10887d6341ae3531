"""Progress for sync and backfill: a live bar in a terminal, periodic log lines elsewhere.

Cron and CI logs get plain lines without control characters; `--quiet` gets neither.
"""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType
from typing import Literal

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ona_usage.source import ExtractStats
from ona_usage.windows import Window

logger = logging.getLogger("ona_usage.progress")

Mode = Literal["live", "log", "off"]


def choose_mode(quiet: bool) -> Mode:
    if quiet:
        return "off"
    return "live" if sys.stderr.isatty() else "log"


class ProgressReporter:
    """Feeds on `ExtractStats.on_window`; reads the client's retry count through the stats."""

    def __init__(self, mode: Mode, label: str, interval: float = 10.0) -> None:
        self.mode = mode
        self.label = label
        self.interval = interval
        self._started = time.monotonic()
        self._last_log = self._started
        self._bar: Progress | None = None
        self._task = None

    def __enter__(self) -> ProgressReporter:
        if self.mode == "live":
            self._bar = Progress(
                TextColumn(f"[bold]{self.label}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("windows · {task.fields[records]:,} records · {task.fields[rate]:,.0f}/s · {task.fields[retries]} retries"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=None, records=0, rate=0.0, retries=0)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.stop()

    def on_window(self, stats: ExtractStats, window: Window, records: int) -> None:
        elapsed = max(time.monotonic() - self._started, 1e-6)
        rate = stats.records / elapsed
        retries = stats.retries()
        if self._bar is not None and self._task is not None:
            self._bar.update(
                self._task,
                completed=stats.windows_done,
                total=stats.windows_total or None,
                records=stats.records,
                rate=rate,
                retries=retries,
            )
        elif self.mode == "log" and (time.monotonic() - self._last_log >= self.interval or stats.windows_done == stats.windows_total):
            self._last_log = time.monotonic()
            remaining = stats.windows_total - stats.windows_done
            eta = remaining * elapsed / stats.windows_done if stats.windows_done else 0
            logger.info(
                "%s: %d/%d windows, %d records (%.0f/s), %d retries, ETA %.0fs; last window %s",
                self.label,
                stats.windows_done,
                stats.windows_total,
                stats.records,
                rate,
                retries,
                eta,
                window,
            )
