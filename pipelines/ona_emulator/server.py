"""The emulator's HTTP server: stdlib ThreadingHTTPServer, keep-alive, one write per response.

Besides the API it serves a small control endpoint, `/_control/...` (see `control.py`): set
faults, move the clock, read request counts, add records. It needs no API key and answers only
requests from the loopback interface (127.0.0.0/8, ::1); from anywhere else it answers 403,
and with `control=False` (`--no-control`) 404. Faults are described in `faults.py`.
"""

from __future__ import annotations

import hmac
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson

from . import catalog
from . import control as control_endpoint
from .data import UsageStore
from .faults import FaultConfig, FaultInjector, error_response, html_response
from .protocol import ENDPOINT, ConnectError, ListRequest, decode_body, page_body, parse_list_request

Response = tuple[int, bytes, dict[str, str]]
Fault = Callable[[dict[str, Any]], "Response | None"]

_JSON = {"Content-Type": "application/json"}
CONTROL_PREFIX = "/_control"


class DropConnection(Exception):
    """Raised on the `drop` fault: the handler sends half of `response`, then hangs up."""

    def __init__(self, response: Response) -> None:
        super().__init__("connection dropped mid-body")
        self.response = response


class EmulatorServer:
    """Serves ListEnvironmentUsageRecords from a UsageStore on a background thread.

    `requests` records what clients sent (authorization redacted), each with the
    `time.monotonic()` it arrived at (`at`), the status answered and, if one was
    injected, the fault (`fault`). `fault`, if set, sees each parsed request first
    and may return (status, body, headers) to answer instead (Content-Type
    defaults to JSON). `faults` (a `FaultConfig`, or a dict of its fields) injects
    the usual misbehaviours by configuration; see `faults.py`. `control=False`
    turns the `/_control/` endpoint off.
    """

    def __init__(
        self,
        store: UsageStore,
        api_key: str = "emulator-key",
        host: str = "127.0.0.1",
        port: int = 0,
        latency: float = 0.0,
        max_logged_requests: int = 100_000,
        faults: FaultConfig | dict[str, Any] | None = None,
        control: bool = True,
        redirects: dict[str, str] | None = None,
    ) -> None:
        self.store = store
        self.api_key = api_key
        self.host = host
        self.latency = latency
        self.control = control
        # path prefix -> location prefix: a request under the prefix is answered `308 Permanent
        # Redirect` to the same path under the location (another path here, or another server)
        self.redirects: dict[str, str] = dict(redirects or {})
        self.redirect_status = 308
        self.fault: Fault | None = None
        self.denied: set[str] = set()  # catalog kinds ("projects", ...) answered with permission_denied
        self._catalog_cache: tuple[tuple[int, int], dict[str, list[dict[str, Any]]]] | None = None
        self._members_cache: tuple[tuple[int, int, int], list[dict[str, Any]]] | None = None
        self._injector: FaultInjector | None = None
        self._fault_config = FaultConfig()
        self._statuses: dict[int, int] = {}
        self._faults_injected: dict[str, int] = {}
        self._stopping = threading.Event()
        self._requested_port = port
        self._log: deque[dict[str, Any]] = deque(maxlen=max_logged_requests)
        self._log_lock = threading.Lock()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        if faults is not None:
            self.faults = faults

    def start(self) -> EmulatorServer:
        self._stopping.clear()
        self._httpd = _HTTPServer((self.host, self._requested_port), self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},  # how long stop() may wait
            name="ona-emulator",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and drop open keep-alive connections, like a server going away."""
        if self._httpd is None:
            return
        self._stopping.set()  # wakes handlers held by `hang` or `latency` faults
        self._httpd.shutdown()
        self._httpd.close_connections()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join()
        self._httpd = self._thread = None

    def __enter__(self) -> EmulatorServer:
        return self.start() if self._httpd is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("server is not running")
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        """Base URL for clients: the endpoint path is appended to it."""
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        return f"http://{host}:{self.port}/api"

    @property
    def control_url(self) -> str:
        """Base URL of the control endpoint (`/faults`, `/clock`, `/stats`, `/records`)."""
        return self.url.removesuffix("/api") + CONTROL_PREFIX

    @property
    def requests(self) -> list[dict[str, Any]]:
        with self._log_lock:
            return list(self._log)

    def reset_requests(self) -> None:
        with self._log_lock:
            self._log.clear()

    # -- faults -----------------------------------------------------------------

    @property
    def faults(self) -> FaultConfig:
        """The faults in force; assign a FaultConfig, a dict of its fields, or None (none)."""
        return self._fault_config

    @faults.setter
    def faults(self, config: FaultConfig | dict[str, Any] | None) -> None:
        if config is None:
            config = FaultConfig()
        elif not isinstance(config, FaultConfig):
            config = FaultConfig.from_mapping(config)
        self._fault_config = config
        self.store.ingestion_lag = config.ingestion_lag
        # None keeps the no-fault path to one branch per request.
        self._injector = FaultInjector(config) if config.request_faults else None

    def set_faults(self, **settings: Any) -> FaultConfig:
        """Replace the faults: the given settings, everything else off (and a fresh seed state)."""
        self.faults = FaultConfig.from_mapping(settings)
        return self._fault_config

    def update_faults(self, **settings: Any) -> FaultConfig:
        """Change some settings, keep the others (the random sequence restarts from the seed)."""
        self.faults = FaultConfig.from_mapping(settings, base=self._fault_config)
        return self._fault_config

    def stats(self) -> dict[str, Any]:
        """API requests answered (control requests not counted), by status and by injected fault."""
        with self._log_lock:
            statuses = dict(sorted(self._statuses.items()))
            faults = dict(sorted(self._faults_injected.items()))
        return {"requests": sum(statuses.values()), "statuses": statuses, "faults": faults}

    def reset_stats(self) -> dict[str, Any]:
        """Zero the counters and clear the request log; returns the stats before."""
        before = self.stats()
        with self._log_lock:
            self._statuses.clear()
            self._faults_injected.clear()
            self._log.clear()
        return before

    def _record(self, request: dict[str, Any], status: int) -> None:
        request["status"] = status
        fault = request.get("fault")
        with self._log_lock:
            self._log.append(request)
            self._statuses[status] = self._statuses.get(status, 0) + 1
            if fault is not None:
                self._faults_injected[fault] = self._faults_injected.get(fault, 0) + 1

    def _respond(
        self, method: str, target: str, headers: dict[str, str], raw: bytes, authorization: str
    ) -> Response:
        """Answer one HTTP request; `headers` arrive redacted, the key only as `authorization`."""
        split = urlsplit(target)
        query = {k: v[0] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        try:
            body, body_error = decode_body(raw), None
        except ConnectError as error:
            body, body_error = None, error
        request = {
            "method": method,
            "path": split.path,
            "query": query,
            "body": body,
            "headers": headers,
            "at": time.monotonic(),
        }
        if moved := self._redirect(split.path, split.query):
            self._record(request, moved[0])
            return moved
        if self.fault is None and self._injector is None:
            try:
                response = self._answer(method, split.path, query, body, body_error, authorization)
            except ConnectError as error:
                response = (error.status, error.body(), _JSON)
        else:
            response = self._respond_with_faults(request, method, split.path, query, body, body_error, authorization)
            if request.get("fault") == "drop":
                self._record(request, response[0])
                raise DropConnection(response)
        if self.latency > 0:
            time.sleep(self.latency)
        self._record(request, response[0])
        return response

    def _redirect(self, path: str, query: str) -> Response | None:
        for prefix, location in self.redirects.items():
            if path.startswith(prefix):
                target = location + path[len(prefix) :] + (f"?{query}" if query else "")
                return self.redirect_status, b"", {"Location": target, "Content-Type": "text/plain"}
        return None

    def _respond_with_faults(
        self,
        request: dict[str, Any],
        method: str,
        path: str,
        query: dict[str, str],
        body: Any,
        body_error: ConnectError | None,
        authorization: str,
    ) -> Response:
        """The slow path: the `fault` hook, then the configured faults."""
        if self.fault is not None:
            response = self.fault(request)
            if response is not None:
                status, payload, extra = response
                if not any(name.lower() == "content-type" for name in extra):
                    extra = {**_JSON, **extra}
                return status, payload, extra
        injector = self._injector
        if injector is None:
            try:
                return self._answer(method, path, query, body, body_error, authorization)
            except ConnectError as error:
                return error.status, error.body(), _JSON
        kind = injector.decide()
        delay = injector.delay()
        if delay > 0:
            self._stopping.wait(delay)
        if kind is None or kind in ("truncate", "drop", "hang"):
            if kind == "hang":
                self._stopping.wait(injector.config.hang_seconds)
            try:
                if catalog.match(path) or path.endswith(catalog.IDENTITY):  # no paging faults, the rest applies
                    response = self._answer(method, path, query, body, body_error, authorization)
                else:
                    list_request = self._list_request(method, path, query, body, body_error, authorization)
                    payload, applied = injector.page(self.store, list_request)
                    response = (200, payload, _JSON)
                    if applied is not None and kind is None:
                        request["fault"] = applied
            except ConnectError as error:
                response = (error.status, error.body(), _JSON)
            if kind == "truncate":
                response = (response[0], response[1][: len(response[1]) // 2], response[2])
        elif kind == "html":
            response = html_response(injector.config)
        else:
            response = error_response(kind, injector.config)  # type: ignore[arg-type]
        if kind is not None:
            request["fault"] = str(kind)
        return response

    def _members(self, body: Any) -> list[dict[str, Any]]:
        organization = (body or {}).get("organizationId") if isinstance(body, dict) else None
        if not organization:
            raise ConnectError("invalid_argument", "organization_id is required")
        if organization != self.store.organization_id:
            raise ConnectError("permission_denied", "the API key may not list members of that organization")
        if self.store.members is not None:
            return [m for user, m in sorted(self.store.members.items()) if user not in self.store.left]
        stamp = (self.store.version, hash(frozenset(self.store.names.items())), len(self.store.left))
        if self._members_cache is None or self._members_cache[0] != stamp:
            self._members_cache = (stamp, catalog.members(self.store.referenced_users(), self.store.names, self.store.left))
        return self._members_cache[1]

    def _control(self, method: str, target: str, raw: bytes, client_host: str) -> Response:
        return control_endpoint.handle(self, method, target, raw, client_host)

    def _answer(
        self,
        method: str,
        path: str,
        query: dict[str, str],
        body: Any,
        body_error: ConnectError | None,
        authorization: str,
    ) -> Response:
        if path.endswith(catalog.IDENTITY):
            self._authorize(method, authorization)
            identity = {"organizationId": self.store.organization_id, "subject": {"id": "0u5e4000-0000-4000-8000-000000000001", "principal": "PRINCIPAL_USER"}}
            return 200, orjson.dumps(identity), _JSON
        if kind := catalog.match(path):
            return self._catalog(kind, method, query, body, body_error, authorization)
        request = self._list_request(method, path, query, body, body_error, authorization)
        records, more = self.store.page(
            request.start_ns, request.end_ns, request.project_id, request.offset, request.page_size
        )
        token = request.next_token(len(records)) if more else None
        return 200, page_body(records, token), _JSON

    def _catalog(
        self,
        kind: tuple[str, str],
        method: str,
        query: dict[str, str],
        body: Any,
        body_error: ConnectError | None,
        authorization: str,
    ) -> Response:
        """Projects, environment classes or runners; `denied` names kinds the key may not list."""
        self._authorize(method, authorization)
        if body_error is not None:
            raise body_error
        name, key = kind
        if name in self.denied:
            raise ConnectError("permission_denied", f"the API key may not list {name.replace('_', ' ')}")
        if name == "members":
            return 200, catalog.page(self._members(body), key, query, body), _JSON
        stamp = (self.store.version, hash(frozenset(self.store.names.items())))  # a rename changes it too
        if self._catalog_cache is None or self._catalog_cache[0] != stamp:
            referenced = self.store.referenced_ids()  # one pass for all three lists
            lists = {kind: catalog.items(referenced, self.store.names, kind) for kind, _ in catalog.ENDPOINTS.values() if kind != "members"}
            self._catalog_cache = (stamp, lists)
        return 200, catalog.page(self._catalog_cache[1][name], key, query, body), _JSON

    def _authorize(self, method: str, authorization: str) -> None:
        if method != "POST":
            raise ConnectError("unimplemented", f"method {method} not allowed; use POST", status=405)
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.encode(), self.api_key.encode()):
            raise ConnectError("unauthenticated", "invalid or missing API key")

    def _list_request(
        self,
        method: str,
        path: str,
        query: dict[str, str],
        body: Any,
        body_error: ConnectError | None,
        authorization: str,
    ) -> ListRequest:
        """Route, authenticate and validate a request, or raise the ConnectError to answer."""
        if not path.endswith(ENDPOINT):
            raise ConnectError("unimplemented", f"no such procedure: {path}")
        self._authorize(method, authorization)
        if body_error is not None:
            raise body_error
        return parse_list_request(body, query)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], emulator: EmulatorServer) -> None:
        self.emulator = emulator
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def track(self, connection: socket.socket, active: bool) -> None:
        with self._connections_lock:
            if active:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up (after a timeout, say) is no error worth a traceback."""
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)

    def close_connections(self) -> None:
        with self._connections_lock:
            connections, self._connections = self._connections, set()
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, True)

    def finish(self) -> None:
        self.server.track(self.connection, False)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        """Silenced: a benchmark makes tens of thousands of requests."""

    def _handle(self) -> None:
        if self.path.startswith(CONTROL_PREFIX):
            self._control()
            return
        headers = {k.lower(): v for k, v in self.headers.items()}
        authorization = headers.get("authorization", "")
        if authorization:
            headers["authorization"] = "<redacted>"
        try:
            raw = self._read_body()
        except ValueError:
            self.close_connection = True  # the framing is lost; so is the connection
            error = ConnectError("invalid_argument", "malformed Content-Length or chunked body")
            self._send(error.status, error.body(), _JSON)
            return
        try:
            status, body, extra = self.server.emulator._respond(
                self.command, self.path, headers, raw, authorization
            )
        except DropConnection as drop:
            self._send_half_and_hang_up(*drop.response)
            return
        self._send(status, body, extra)

    def _control(self) -> None:
        try:
            raw = self._read_body()
        except ValueError:
            self.close_connection = True
            self._send(400, b'{"error":"malformed Content-Length or chunked body"}', _JSON)
            return
        status, body, extra = self.server.emulator._control(
            self.command, self.path, raw, self.client_address[0]
        )
        self._send(status, body, extra)

    def _send_half_and_hang_up(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        """The `drop` fault: promise the whole body, send half, close the connection."""
        head = self._head(status, len(body), headers)  # keep-alive, as if all were well
        self.close_connection = True
        self.wfile.write(head + body[: len(body) // 2])
        try:
            self.connection.shutdown(socket.SHUT_WR)  # FIN after the half already sent
        except OSError:
            pass

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        """Status line, headers and body in one write: no Nagle/delayed-ACK stalls."""
        head = self._head(status, len(body), headers)
        self.wfile.write(head if self.command == "HEAD" else head + body)

    def _head(self, status: int, length: int, headers: dict[str, str]) -> bytes:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = ""
        lines = [f"HTTP/1.1 {status} {reason}", f"Content-Length: {length}"]
        lines += [f"{name}: {value}" for name, value in headers.items() if name.lower() != "content-length"]
        if status == 405:
            lines.append("Allow: POST")
        if self.close_connection:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    do_POST = do_GET = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _handle
