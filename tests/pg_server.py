"""A throwaway PostgreSQL cluster for tests: its own data directory, port and socket, gone afterwards.

    with postgres_server() as url:            # postgresql://postgres:unused@127.0.0.1:PORT/ona_test
        other = create_database(url, "t1")    # postgresql://postgres:unused@127.0.0.1:PORT/t1

The server binaries come from `/usr/lib/postgresql/<highest version>/bin` (Debian's layout),
else from `PG_BINDIR`, else from `initdb`/`pg_ctl` on PATH; when there are none,
`find_binaries()` raises `PostgresNotFound` (the tests decide whether that fails or skips).
initdb refuses to run as root, so under root the cluster is created and run as the `postgres`
system user (`runuser -u postgres`), which Debian's `postgresql` package creates.

The server listens on 127.0.0.1 only, on a free port, with trust authentication and without
fsync: it is for tests, not data. The URL carries a password although trust authentication
never checks it, because dlt's `PostgresCredentials` refuses credentials without one.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg2
from psycopg2 import sql

SERVER_USER = "postgres"  # the OS user that runs the server when we are root
SUPERUSER = "postgres"  # the database superuser initdb creates
DEFAULT_DATABASE = "ona_test"
DUMMY_PASSWORD = "unused"  # trust auth ignores it; dlt insists on a password being present
INSTALL_HINT = (
    "install the PostgreSQL server (Debian/Ubuntu: `apt-get install postgresql`), "
    "or set PG_BINDIR to the directory holding initdb and pg_ctl"
)


class PostgresNotFound(RuntimeError):
    """No PostgreSQL server binaries on this machine."""


class PostgresStartError(RuntimeError):
    """The cluster could not be created or started; the message carries the server's log."""


def find_binaries() -> Path:
    """The directory holding `initdb`, `pg_ctl` and `postgres`, preferring the highest version."""
    candidates: list[Path] = []
    versioned = []
    for bindir in Path("/usr/lib/postgresql").glob("*/bin"):
        match = re.fullmatch(r"(\d+)(?:\.(\d+))?", bindir.parent.name)
        if match:
            versioned.append(((int(match[1]), int(match[2] or 0)), bindir))
    candidates += [bindir for _, bindir in sorted(versioned, reverse=True)]
    if os.environ.get("PG_BINDIR"):
        candidates.append(Path(os.environ["PG_BINDIR"]))
    if initdb := shutil.which("initdb"):
        candidates.append(Path(initdb).resolve().parent)
    for bindir in candidates:
        if all(os.access(bindir / name, os.X_OK) for name in ("initdb", "pg_ctl", "postgres")):
            return bindir
    raise PostgresNotFound(f"no PostgreSQL server binaries (initdb, pg_ctl) found; {INSTALL_HINT}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def create_database(url: str, name: str) -> str:
    """Create database `name` on the server behind `url`; return its URL."""
    conn = psycopg2.connect(url)
    try:
        conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
        with conn.cursor() as cur:
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    finally:
        conn.close()
    return url.rsplit("/", 1)[0] + "/" + name


@contextmanager
def postgres_server(
    database: str = DEFAULT_DATABASE,
    *,
    timezone: str | None = None,
    password: str | None = DUMMY_PASSWORD,
    start_timeout: float = 60,
) -> Iterator[str]:
    """Start a cluster, create `database`, yield its URL; stop the server and delete everything after.

    `timezone` sets the server's TimeZone (the session default of every connection), so tests
    can check that nothing depends on the server running in UTC.
    """
    bindir = find_binaries()
    as_root = os.geteuid() == 0
    if as_root:
        try:
            account = pwd.getpwnam(SERVER_USER)
        except KeyError:
            raise PostgresStartError(
                f"running as root, and initdb refuses root, but there is no {SERVER_USER!r} system user "
                f"to run the server as; install Debian's `postgresql` package (it creates the user) "
                f"or run the tests as a non-root user"
            ) from None
    if not shutil.which("runuser") and as_root:
        raise PostgresStartError("running as root, but `runuser` (util-linux) is missing")

    # Under /tmp (world-traversable) so the postgres user can reach it, whoever runs the tests.
    base = Path(tempfile.mkdtemp(prefix="pg-test-", dir="/tmp"))
    data, log = base / "data", base / "server.log"
    if as_root:
        os.chown(base, account.pw_uid, account.pw_gid)

    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(LC_ALL="C", LANG="C")

    def run(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess:
        command = [str(a) for a in args]
        if as_root:
            command = ["runuser", "-u", SERVER_USER, "--", *command]
        # cwd: the server user may not be allowed into the caller's working directory.
        return subprocess.run(command, cwd=base, env=env, capture_output=True, text=True, check=check, timeout=120)

    started = False
    try:
        try:
            run(bindir / "initdb", "-D", data, "-U", SUPERUSER, "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync")
        except subprocess.CalledProcessError as exc:
            raise PostgresStartError(f"initdb failed ({exc.returncode}):\n{exc.stdout}\n{exc.stderr}") from None

        for attempt in range(3):  # the free port can be taken between choosing and binding it
            port = free_port()
            options = (
                f"-p {port} -k {base} -c listen_addresses=127.0.0.1 "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            )
            if timezone:
                options += f" -c TimeZone={timezone}"
            result = run(
                bindir / "pg_ctl", "-D", data, "-l", log, "-w", "-t", str(int(start_timeout)), "-o", options, "start",
                check=False,
            )
            if result.returncode == 0:
                started = True
                break
            run(bindir / "pg_ctl", "-D", data, "stop", "-m", "immediate", check=False)
        if not started:
            raise PostgresStartError(
                f"pg_ctl start failed 3 times:\n{result.stdout}\n{result.stderr}\nserver log:\n{_read(log)}"
            )

        login = f"{SUPERUSER}:{password}" if password else SUPERUSER
        admin_url = f"postgresql://{login}@127.0.0.1:{port}/postgres"
        _wait_for_connections(admin_url, start_timeout, log)
        yield create_database(admin_url, database)
    finally:
        if started or (data / "postmaster.pid").exists():  # also when interrupted mid-start
            run(bindir / "pg_ctl", "-D", data, "stop", "-m", "immediate", "-w", check=False)
        shutil.rmtree(base, ignore_errors=True)


def _wait_for_connections(url: str, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            psycopg2.connect(url, connect_timeout=5).close()
            return
        except psycopg2.OperationalError as exc:
            if time.monotonic() > deadline:
                raise PostgresStartError(f"server not accepting connections on {url}: {exc}\n{_read(log)}") from None
            time.sleep(0.1)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return "(no log)"
