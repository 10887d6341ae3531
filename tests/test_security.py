"""The API key stays secret, and goes only where it should.

After failing runs (a key the server rejects; a server that answers errors with the key echoed
back in the message) and after succeeding runs, the key is in none of: stdout and stderr (with
and without `--debug`), the messages and tracebacks of the exceptions an in-process run raises,
the output of `dlt pipeline ona_usage trace` and `info` (with -vv), any file under the
working directory and `DLT_DATA_DIR` (raw bytes, and decompressed: gzip'd load files, Parquet
columns, the pickled trace), or the destination (the DuckDB file's bytes and every value of
every table, the compressed state included). A plain `http://` base URL to a host other than
this machine is refused before any request, and `.dlt/secrets.toml` is git-ignored.
"""

from __future__ import annotations

import gzip
import os
import pickle
import socket
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

import duckdb
import pendulum
import pytest

from dlt.common.versioned_state import decompress_state
from ona_emulator import EmulatorServer
from ona_usage import settings
from ona_usage.pipeline import run_sync

from conftest import API_KEY, assert_table_equals, cli_here, recent_records, run_cli, run_clis_together

REPO = Path(__file__).resolve().parents[1]
DB = "ona_usage.duckdb"
WRONG_KEY = "sk-wrong-4b8e1f9a7c2d-secret"
DLT = Path(sys.executable).with_name("dlt")


# -- where a key could hide ------------------------------------------------------------------


def _blobs(path: Path) -> list[bytes]:
    """The file's bytes, and what they hold once decompressed or decoded."""
    data = path.read_bytes()
    blobs = [data]
    if data[:2] == b"\x1f\x8b":
        try:
            blobs.append(gzip.decompress(data))
        except (OSError, EOFError):
            pass
    if path.suffix == ".parquet" or data[:4] == b"PAR1":
        import pyarrow.parquet as pq

        blobs.append(repr(pq.read_table(path).to_pylist()).encode())
    if path.name.endswith(".pickle"):
        try:
            trace = pickle.loads(data)
            blobs.append(repr(trace).encode())
            if hasattr(trace, "asstr"):
                blobs.append(trace.asstr(verbosity=2).encode())
        except Exception as exc:  # an unpicklable trace is a finding of its own
            pytest.fail(f"{path} does not unpickle: {exc!r}")
    return blobs


def destination_dump(db: Path) -> str:
    """Every value of every table in the DuckDB file, the compressed pipeline state decompressed."""
    if not db.exists():
        return ""
    parts = []
    with duckdb.connect(str(db), read_only=True) as conn:
        tables = conn.execute(
            "SELECT table_schema, table_name FROM information_schema.tables WHERE table_type = 'BASE TABLE'"
        ).fetchall()
        assert tables or db.stat().st_size > 0
        for schema, table in tables:
            rows = conn.execute(f'SELECT * FROM "{schema}"."{table}"').fetchall()
            parts.append(f"{schema}.{table}: {rows!r}")
            if table == "_dlt_pipeline_state":
                for (state,) in conn.execute(f'SELECT state FROM "{schema}"."{table}"').fetchall():
                    parts.append(repr(decompress_state(state)))
    return "\n".join(parts)


def dlt_cli(workdir: Path, env: dict[str, str]) -> str:
    """What dlt's own CLI shows about the pipeline: the trace of the last run, and info (state, packages)."""
    if not (Path(env["DLT_DATA_DIR"]) / "pipelines" / "ona_usage").exists():
        return ""
    out = []
    commands = (["-vv", "pipeline", "ona_usage", "trace"], ["-vv", "pipeline", "ona_usage", "info"])
    # Both readers at once, each a fresh process: a second of imports each, side by side.
    processes = [subprocess.Popen([str(DLT), "--non-interactive", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env, cwd=workdir) for args in commands]
    try:
        for process in processes:
            stdout, stderr = process.communicate(timeout=120)
            result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
            assert result.returncode == 0, result.stdout + result.stderr
            out.append(result.stdout + result.stderr)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert "Run started at" in out[0], out[0]
    return "\n".join(out)


def assert_nowhere(secret: str, workdir: Path, *texts: str, skip: tuple[Path, ...] = ()) -> int:
    """`secret` in no text, in no file under `workdir` (DLT_DATA_DIR is inside it), not in the destination."""
    for text in texts:
        assert secret not in text, f"the key leaked into output: ...{text[max(0, text.find(secret) - 200):text.find(secret) + 50]}"
    files = 0
    for path in sorted(workdir.rglob("*")):
        if not path.is_file() or path in skip:
            continue
        files += 1
        for blob in _blobs(path):
            assert secret.encode() not in blob, f"the key leaked into {path.relative_to(workdir)}"
    assert secret not in destination_dump(workdir / DB), "the key leaked into the destination's tables"
    return files


def cli_env(workdir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()}
    env["DLT_DATA_DIR"] = str(workdir / "dlt-data")
    env["SOURCES__ONA_USAGE__BACKOFF"] = "0.01"  # retries without real waits; what is printed is the same
    env.update(extra)
    return env


def sync_args(emulator: EmulatorServer, *more: str) -> list[str]:
    start = pendulum.now("UTC").subtract(days=4).to_date_string()
    return ["sync", "--base-url", emulator.url, "--start-date", start, "--chunk", "2d", *more]


def test_the_leak_detector_finds_a_key_in_compressed_files_and_in_the_destination(tmp_path):
    """The checks below would see a key hidden in gzip, Parquet, a pickle, or the DuckDB file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    secret = "sk-canary-0f9e8d7c"
    clean = tmp_path / "clean"
    clean.mkdir()
    (clean / "plain.txt").write_text("nothing here")
    assert assert_nowhere(secret, clean) == 1
    hidden = {
        "packed.gz": lambda p: p.write_bytes(gzip.compress(secret.encode())),
        "table.parquet": lambda p: pq.write_table(pa.table({"v": [secret * 3] * 1000}), p, compression="zstd"),
        "trace.pickle": lambda p: p.write_bytes(pickle.dumps({"message": secret})),
    }
    for name, write in hidden.items():
        where = tmp_path / name.replace(".", "-")
        where.mkdir()
        write(where / name)
        with pytest.raises(AssertionError, match="leaked"):
            assert_nowhere(secret, where)
    warehouse = tmp_path / "warehouse"
    warehouse.mkdir()
    with duckdb.connect(str(warehouse / DB)) as conn:
        conn.execute("CREATE SCHEMA s; CREATE TABLE s.t (v TEXT)")
        conn.execute("INSERT INTO s.t SELECT ? || i::TEXT FROM range(20000) r(i)", [secret])
    with pytest.raises(AssertionError, match="destination"):
        assert_nowhere(secret, warehouse)


# -- failing runs ------------------------------------------------------------------------------


def echo(secret: str, status: int, html: bool = False) -> Any:
    """A server that fails every usage list request and echoes the key back, as a broken proxy might."""

    def fault(request: dict) -> Any:
        check = request["path"].endswith("GetAuthenticatedIdentity") or (request.get("body") or {}).get("pagination", {}).get("pageSize") == 1
        if status == 401 or not check:
            if html:
                return status, f"<html><body>Bearer {secret} is not welcome here</body></html>".encode(), {"Content-Type": "text/html"}
            code = "unauthenticated" if status == 401 else "internal"
            body = f'{{"code":"{code}","message":"token {secret} rejected; Authorization: Bearer {secret}"}}'
            return status, body.encode(), {"X-Echo": secret}
        return None  # the identity and access checks pass: the run fails later, inside dlt's extract step

    return fault


FAILURES = {
    # the key the user configured is wrong and the server says so (its own message)
    "wrong key": (WRONG_KEY, None),
    # the server rejects the key and echoes it
    "wrong key, echoed": (WRONG_KEY, echo(WRONG_KEY, 401)),
    # the key is right, the access check passes, then every page answers 500 with the key in the message
    "500 forever, key echoed": (API_KEY, echo(API_KEY, 500)),
    # the same with a body that is not JSON
    "500 forever, key echoed in html": (API_KEY, echo(API_KEY, 500, html=True)),
}


@pytest.mark.parametrize(
    "failure,debug",
    [(name, False) for name in FAILURES] + [(name, True) for name in list(FAILURES)[:3]],
    ids=lambda value: ("debug" if value else "default") if isinstance(value, bool) else value,
)
def test_a_failing_run_never_shows_or_stores_the_key(workdir, store, emulator, failure, debug):
    secret, fault = FAILURES[failure]
    store.add(recent_records(120, days=3))
    emulator.fault = fault
    env = cli_env(workdir, ONA_API_KEY=secret, SOURCES__ONA_USAGE__MAX_ATTEMPTS="2")

    result = run_cli(*sync_args(emulator, *(["--debug"] if debug else [])), env=env)

    assert result.returncode != 0
    if debug:  # the traceback and debug logs, which must be as clean as the one line
        assert "Traceback (most recent call last)" in result.stderr
    else:
        assert len(result.stderr.strip().splitlines()) >= 1
        assert ("rejected the API key" in result.stderr) if "wrong" in failure else ("HTTP 500" in result.stderr)
    # the emulator records every request with its Authorization header redacted: the key was in no URL,
    # query, body or other header
    assert emulator.requests and secret not in repr(emulator.requests)
    trace = dlt_cli(workdir, env)
    if "500" in failure:
        assert trace, "the run failed inside dlt, which should have left a trace"
    assert_nowhere(secret, workdir, result.stdout, result.stderr, trace)


def test_exceptions_of_an_in_process_run_carry_no_key(workdir, store, emulator):
    store.add(recent_records(120, days=3))
    emulator.fault = echo(API_KEY, 500)
    config = settings.resolve({"base_url": emulator.url, "start_date": pendulum.now("UTC").subtract(days=4).to_date_string(),
                               "max_attempts": 2})
    config.api_key = API_KEY

    with pytest.raises(Exception) as raised:
        run_sync(config)

    text = "".join(traceback.format_exception(raised.value))
    assert "HTTP 500" in text
    chain, current = [], raised.value
    while current is not None and len(chain) < 20:
        chain.append(current)
        current = getattr(current, "exception", None) or current.__cause__ or current.__context__
    for exc in chain:
        assert API_KEY not in repr(exc) and API_KEY not in str(exc) and API_KEY not in repr(exc.args)
    assert_nowhere(API_KEY, workdir, text)


def test_a_key_with_a_trailing_newline_is_not_printed(workdir, store, emulator):
    store.add(recent_records(20, days=1))
    env = cli_env(workdir, SOURCES__ONA_USAGE__API_KEY=API_KEY + "\n", SOURCES__ONA_USAGE__MAX_ATTEMPTS="2")

    result = run_cli(*sync_args(emulator), env=env)

    assert API_KEY not in result.stdout + result.stderr, result.stderr
    assert_nowhere(API_KEY, workdir, dlt_cli(workdir, env))


# -- succeeding runs ---------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["ONA_API_KEY", "SOURCES__ONA_USAGE__API_KEY", ".dlt/secrets.toml"])
def test_a_succeeding_run_never_shows_or_stores_the_key(workdir, store, emulator, source):
    store.add(recent_records(300, days=3))
    env = cli_env(workdir)
    secrets_file = workdir / ".dlt" / "secrets.toml"
    if source == ".dlt/secrets.toml":
        secrets_file.parent.mkdir()
        secrets_file.write_text(f'[sources.ona_usage]\napi_key = "{API_KEY}"\n')
    else:
        env[source] = API_KEY
    debug = ["--debug"] if source == "SOURCES__ONA_USAGE__API_KEY" else []

    result = run_cli(*sync_args(emulator, *debug), env=env, cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert_table_equals(workdir / DB, store.records())
    outputs = [result.stdout, result.stderr, dlt_cli(workdir, env)]
    assert API_KEY not in repr(emulator.requests)  # sent in the (redacted) Authorization header only
    if source == "ONA_API_KEY":  # the other commands print and log too
        today = pendulum.now("UTC")
        commands = (["status", "--json"], ["verify", "--base-url", emulator.url, "--start", today.subtract(days=4).to_date_string(),
                                           "--end", today.add(days=1).to_date_string()])
        for other in run_clis_together(*commands, env=env, cwd=workdir):  # two readers, side by side
            assert other.returncode == 0, other.stdout + other.stderr
            outputs += [other.stdout, other.stderr]

    files = assert_nowhere(API_KEY, workdir, *outputs, skip=(secrets_file,))
    assert files >= 5  # the DuckDB file, state, schema, trace, load packages


# -- where the key may be sent ------------------------------------------------------------------


def _non_loopback_address() -> str | None:
    """An address of this machine that is not loopback, if it has one."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("198.51.100.1", 9))  # TEST-NET-2; a UDP connect sends no packet
            address = probe.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


@pytest.mark.parametrize(
    "url",
    ["http://example.com/api", "http://10.1.2.3:8080/api", "http://127.0.0.1.nip.io/api",
     "http://localhost.example.com/api", "http://0.0.0.0:9/api", "HTTP://app.ona.com/api"],
)
def test_plain_http_to_another_host_is_refused_before_any_request(workdir, url, capfd):
    result = cli_here(capfd, "sync", "--base-url", url, env={"ONA_API_KEY": API_KEY})

    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "plain http" in lines[0], result.stderr
    assert result.stdout == "" and API_KEY not in result.stderr
    assert not (workdir / DB).exists()


def test_plain_http_to_a_real_non_loopback_server_sends_nothing_unless_allowed(workdir, store, capfd):
    address = _non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback address")
    store.add(recent_records(50, days=2))
    with EmulatorServer(store, api_key=API_KEY, host=address) as server:
        assert server.url.startswith(f"http://{address}:")
        refused = cli_here(capfd, *sync_args(server), env={"ONA_API_KEY": API_KEY})
        assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert server.requests == []  # refused before any request
        assert not (workdir / DB).exists()

        allowed = cli_here(capfd, *sync_args(server, "--allow-insecure-http"), env={"ONA_API_KEY": API_KEY})
        assert allowed.returncode == 0, allowed.stderr
        assert server.requests  # the same URL works once the user says so


def test_a_redirect_is_not_followed_with_the_key(workdir, store, emulator, capfd):
    store.add(recent_records(50, days=2))
    with EmulatorServer(store, api_key=API_KEY) as elsewhere:
        emulator.fault = lambda request: (307, b"", {"Location": elsewhere.url + request["path"]})
        result = cli_here(capfd, *sync_args(emulator), env={"ONA_API_KEY": API_KEY})
        assert result.returncode == 1 and "redirected" in result.stderr
        assert elsewhere.requests == []
        assert API_KEY not in result.stderr + result.stdout


# -- the secrets file --------------------------------------------------------------------------


def test_dot_dlt_secrets_toml_is_git_ignored():
    result = subprocess.run(["git", "check-ignore", "-v", ".dlt/secrets.toml"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    tracked = subprocess.run(["git", "ls-files", "--", "*secrets.toml"], cwd=REPO, capture_output=True, text=True)
    assert tracked.stdout.strip() == ""


@pytest.mark.parametrize("folder", ["pipelines", "deploy"])
def test_dot_dlt_secrets_toml_is_git_ignored_in_any_directory(folder):
    path = f"{folder}/.dlt/secrets.toml"
    result = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, f"{path} is not ignored"
