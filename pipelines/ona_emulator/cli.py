"""Command line: `python -m ona_emulator`, or mounted as `ona-usage emulator`.

The fault flags set the emulator's starting `FaultConfig` (see `faults.py`); the control
endpoint (`/_control/faults`, `/_control/clock`, `/_control/stats`, `/_control/records`, see
`control.py`) changes faults and clock while it runs, from 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence

import pendulum

from .faults import KINDS, FaultConfig, parse_kind
from .generator import Shape


def _instant(text: str) -> pendulum.DateTime:
    try:
        parsed = pendulum.parse(text, tz="UTC")
    except ValueError as error:  # pendulum's ParserError included
        raise argparse.ArgumentTypeError(f"not a date or RFC 3339 time: {text!r}") from error
    if not isinstance(parsed, pendulum.DateTime):
        raise argparse.ArgumentTypeError(f"not a date or time: {text!r}")
    return parsed.in_timezone("UTC")


def _rate(text: str) -> float:
    value = _seconds(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"a rate is between 0 and 1, got {text}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text}")
    return value


def _kind(text: str) -> int | str:
    try:
        return parse_kind(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _statuses(text: str) -> tuple[int, ...]:
    try:
        return FaultConfig(burst_statuses=tuple(s for s in text.split(",") if s.strip())).burst_statuses
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


# (flag, FaultConfig field, type, metavar, help); absent flags keep the FaultConfig default.
FAULT_FLAGS: tuple[tuple[str, str, object, str, str], ...] = (
    ("--fault-seed", "seed", int, "N", "seed of the random faults (default 0)"),
    ("--fault-latency-ms", "latency", _seconds, "MS", "extra delay before each answer, changeable at run time"),
    ("--jitter-ms", "jitter", _seconds, "MS", "plus a random 0..MS on each answer"),
    ("--faults-after", "start_after", _count, "N", "let the first N API requests through untouched"),
    ("--max-faults", "max_faults", _count, "N", "stop injecting after N faults (default: no limit)"),
    ("--fail-first", "fail_first", _count, "N", "fail the first N requests (with --fail-first-with)"),
    ("--fail-first-with", "fail_first_with", _kind, "STATUS|KIND",
     f"HTTP status or fault kind ({', '.join(KINDS)}) of --fail-first (default 503)"),
    ("--burst-every", "burst_every", _count, "N", "every Nth request starts a burst of 5xx failures"),
    ("--burst-length", "burst_length", _count, "K", "failures per burst (default 3)"),
    ("--burst-statuses", "burst_statuses", _statuses, "LIST", "statuses a burst cycles through (default 500,502,503,504)"),
    ("--rate-limit-rate", "rate_limit_rate", _rate, "R", "share of requests answered 429 with Retry-After"),
    ("--retry-after", "retry_after", _seconds, "SECONDS", "Retry-After of the 429s (default 1)"),
    ("--error-rate", "error_rate", _rate, "R", "share of requests answered with a random 5xx"),
    ("--error-statuses", "error_statuses", _statuses, "LIST", "statuses of --error-rate (default 500,502,503,504)"),
    ("--truncate-rate", "truncate_rate", _rate, "R", "share answered 200 with the JSON body cut in half"),
    ("--html-rate", "html_rate", _rate, "R", "share answered with a proxy's HTML error page"),
    ("--html-status", "html_status", _count, "STATUS", "status of the HTML pages, e.g. 200 or 502 (default 502)"),
    ("--drop-rate", "drop_rate", _rate, "R", "share whose connection drops after half the body"),
    ("--hang-rate", "hang_rate", _rate, "R", "share that hang for --hang-seconds before answering"),
    ("--hang-seconds", "hang_seconds", _seconds, "SECONDS", "how long a hang lasts (default 30)"),
    ("--ingestion-lag", "ingestion_lag", _seconds, "SECONDS", "records become visible only SECONDS after they stop"),
)
MILLISECOND_FIELDS = frozenset({"latency", "jitter"})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the emulator's options on `parser` (its own or a subcommand's)."""
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8181, help="port; 0 picks a free one (default: %(default)s)")
    parser.add_argument("--api-key", default="emulator-key", help="bearer token clients must send (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the synthetic organisation (default: %(default)s)")
    parser.add_argument("--days", type=int, default=90, help="days of history before --end (default: %(default)s)")
    parser.add_argument("--records", type=int, default=30_000, help="about this many records over --days whole days (default: %(default)s)")
    shape = parser.add_argument_group("the organisation's shape (defaults: the demo's small team)")
    shape.add_argument("--users", type=_positive, default=25, help="members who run environments (default: %(default)s)")
    shape.add_argument("--projects", type=_positive, default=6, help="projects (default: %(default)s)")
    shape.add_argument("--classes", type=_positive, default=4, help="environment classes (default: %(default)s)")
    shape.add_argument("--runners", type=_positive, default=3, help="runners (default: %(default)s)")
    shape.add_argument("--run-minutes", type=_minutes_range, default=None, metavar="LOW-HIGH",
                       help="draw run lengths log-uniformly from LOW to HIGH minutes, e.g. 1-4320 for a minute to "
                            "three days (default: 60%% from 3 to 60 minutes, the rest up to 10 hours)")
    parser.add_argument("--end", type=_instant, default=None, help="end of the history, date or RFC 3339 (default: now)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay before each response (default: %(default)s)")
    parser.add_argument("--redirect", metavar="PREFIX=LOCATION", action="append", default=[],
                        help="answer requests under PREFIX with 308 to LOCATION + the rest of the path, "
                        "e.g. /old=/api or /api=https://app.ona.com/api (repeatable)")
    parser.add_argument("--no-control", dest="control", action="store_false",
                        help="turn off the /_control/ endpoint (faults, clock, stats, records)")
    group = parser.add_argument_group(
        "fault injection", "Off by default; the control endpoint (POST /_control/faults) changes them at run time."
    )
    for flag, name, kind, metavar, help_text in FAULT_FLAGS:
        group.add_argument(flag, dest=f"fault_{name}", type=kind, metavar=metavar, default=None, help=help_text)
    group.add_argument("--repeat-token", dest="fault_repeat_token", action="store_true", default=None,
                       help="every page after the first sends back the token it was asked with: paging never ends")
    group.add_argument("--repeat-record", dest="fault_repeat_record", action="store_true", default=None,
                       help="each page after the first starts with the previous page's last record")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _minutes_range(text: str) -> tuple[float, float]:
    low, sep, high = text.partition("-")
    try:
        bounds = (float(low), float(high))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW-HIGH in minutes, such as 1-4320, not {text!r}") from None
    if not sep or not 0 < bounds[0] <= bounds[1]:
        raise argparse.ArgumentTypeError(f"expected LOW-HIGH in minutes with 0 < LOW <= HIGH, not {text!r}")
    return bounds


def shape_from_args(ns: argparse.Namespace) -> Shape:
    return Shape(users=ns.users, projects=ns.projects, classes=ns.classes, runners=ns.runners, run_minutes=ns.run_minutes)


def faults_from_args(ns: argparse.Namespace) -> FaultConfig:
    """The FaultConfig the fault flags ask for; raises ValueError if they do not fit together."""
    values = {}
    for name, value in vars(ns).items():
        if name.startswith("fault_") and value is not None:
            field = name.removeprefix("fault_")
            values[field] = value / 1000 if field in MILLISECOND_FIELDS else value
    return FaultConfig.from_mapping(values)


def serve_from_args(ns: argparse.Namespace) -> int:
    """Generate the data, serve it, and block until SIGINT/SIGTERM."""
    from .data import UsageStore
    from .generator import organisation_names, organisation_records
    from .server import EmulatorServer

    try:
        faults = faults_from_args(ns)
    except ValueError as error:
        print(f"ona-emulator: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None  # also under `ona-usage emulator`, which ignores our return
    end = ns.end or pendulum.now("UTC")
    start = end.subtract(days=ns.days)
    shape = shape_from_args(ns)
    store = UsageStore(organisation_records(ns.seed, start, end, ns.records, shape), ingestion_lag=faults.ingestion_lag)
    store.names = organisation_names(ns.seed, shape=shape)
    store.page(0, 0, "", 0, 0)  # build the sorted index now, not on the first request
    server = EmulatorServer(
        store,
        api_key=ns.api_key,
        host=ns.host,
        port=ns.port,
        latency=ns.latency_ms / 1000,
        faults=faults,
        control=getattr(ns, "control", True),
        redirects=dict(rule.split("=", 1) for rule in getattr(ns, "redirect", []) if "=" in rule),
    ).start()
    print(
        f"Ona API emulator on {server.url} ({len(store)} records from {start.to_date_string()} "
        f'to {end.to_date_string()}, API key "{ns.api_key}")',
        flush=True,
    )
    if faults.changed():
        settings = ", ".join(f"{k}={v}" for k, v in faults.changed().items())
        print(f"Injecting faults: {settings}", flush=True)
    if server.control:
        print(f"Control endpoint (127.0.0.1 only): {server.control_url}/{{faults,clock,stats,records}}", flush=True)
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


def cli_main(argv: Sequence[str] | None = None, prog: str = "ona-emulator") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Serve a local emulator of Ona's API on 127.0.0.1.")
    add_arguments(parser)
    return serve_from_args(parser.parse_args(argv))
