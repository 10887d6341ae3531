"""Command line: `python -m ona_emulator`, or mounted as `ona-usage emulator`."""

from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Sequence

import pendulum

from .data import UsageStore
from .generator import generate_organisation
from .server import EmulatorServer


def _instant(text: str) -> pendulum.DateTime:
    try:
        parsed = pendulum.parse(text, tz="UTC")
    except ValueError as error:  # pendulum's ParserError included
        raise argparse.ArgumentTypeError(f"not a date or RFC 3339 time: {text!r}") from error
    if not isinstance(parsed, pendulum.DateTime):
        raise argparse.ArgumentTypeError(f"not a date or time: {text!r}")
    return parsed.in_timezone("UTC")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the emulator's options on `parser` (its own or a subcommand's)."""
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8181, help="port; 0 picks a free one (default: %(default)s)")
    parser.add_argument("--api-key", default="emulator-key", help="bearer token clients must send (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the synthetic organisation (default: %(default)s)")
    parser.add_argument("--days", type=int, default=90, help="days of history before --end (default: %(default)s)")
    parser.add_argument("--records", type=int, default=30_000, help="about this many records over --days whole days (default: %(default)s)")
    parser.add_argument("--end", type=_instant, default=None, help="end of the history, date or RFC 3339 (default: now)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay before each response (default: %(default)s)")


def serve_from_args(ns: argparse.Namespace) -> int:
    """Generate the data, serve it, and block until SIGINT/SIGTERM."""
    end = ns.end or pendulum.now("UTC")
    start = end.subtract(days=ns.days)
    store = UsageStore(generate_organisation(ns.seed, start, end, ns.records))
    store.page(0, 0, "", 0, 0)  # build the sorted index now, not on the first request
    server = EmulatorServer(
        store, api_key=ns.api_key, host=ns.host, port=ns.port, latency=ns.latency_ms / 1000
    ).start()
    print(
        f"Ona API emulator on {server.url} ({len(store)} records from {start.to_date_string()} "
        f'to {end.to_date_string()}, API key "{ns.api_key}")',
        flush=True,
    )
    stopping = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    try:
        stopping.wait()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.stop()
    return 0


def cli_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ona-emulator", description="Local emulator of Ona's usage records API.")
    add_arguments(parser)
    return serve_from_args(parser.parse_args(argv))
