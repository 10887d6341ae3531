"""The emulator's HTTP server: stdlib ThreadingHTTPServer, keep-alive, one write per response."""

from __future__ import annotations

import hmac
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .data import UsageStore
from .protocol import ENDPOINT, ConnectError, decode_body, page_body, parse_list_request

Response = tuple[int, bytes, dict[str, str]]
Fault = Callable[[dict[str, Any]], "Response | None"]

_JSON = {"Content-Type": "application/json"}


class EmulatorServer:
    """Serves ListEnvironmentUsageRecords from a UsageStore on a background thread.

    `requests` records what clients sent (authorization redacted); `fault`, if
    set, sees each parsed request first and may return (status, body, headers)
    to answer instead (Content-Type defaults to JSON), which is how tests
    inject 429s, 500s and garbage.
    """

    def __init__(
        self,
        store: UsageStore,
        api_key: str = "emulator-key",
        host: str = "127.0.0.1",
        port: int = 0,
        latency: float = 0.0,
        max_logged_requests: int = 100_000,
    ) -> None:
        self.store = store
        self.api_key = api_key
        self.host = host
        self.latency = latency
        self.fault: Fault | None = None
        self._requested_port = port
        self._log: deque[dict[str, Any]] = deque(maxlen=max_logged_requests)
        self._log_lock = threading.Lock()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> EmulatorServer:
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
    def requests(self) -> list[dict[str, Any]]:
        with self._log_lock:
            return list(self._log)

    def reset_requests(self) -> None:
        with self._log_lock:
            self._log.clear()

    def _record(self, request: dict[str, Any], status: int) -> None:
        request["status"] = status
        with self._log_lock:
            self._log.append(request)

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
        request = {"method": method, "path": split.path, "query": query, "body": body, "headers": headers}
        response = self.fault(request) if self.fault is not None else None
        if response is not None:
            status, payload, extra = response
            if not any(name.lower() == "content-type" for name in extra):
                extra = {**_JSON, **extra}
            response = (status, payload, extra)
        else:
            try:
                response = self._answer(method, split.path, query, body, body_error, authorization)
            except ConnectError as error:
                response = (error.status, error.body(), _JSON)
        if self.latency > 0:
            time.sleep(self.latency)
        self._record(request, response[0])
        return response

    def _answer(
        self,
        method: str,
        path: str,
        query: dict[str, str],
        body: Any,
        body_error: ConnectError | None,
        authorization: str,
    ) -> Response:
        if not path.endswith(ENDPOINT):
            raise ConnectError("unimplemented", f"no such procedure: {path}")
        if method != "POST":
            raise ConnectError("unimplemented", f"method {method} not allowed; use POST", status=405)
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.encode(), self.api_key.encode()):
            raise ConnectError("unauthenticated", "invalid or missing API key")
        if body_error is not None:
            raise body_error
        request = parse_list_request(body, query)
        records, more = self.store.page(
            request.start_ns, request.end_ns, request.project_id, request.offset, request.page_size
        )
        token = request.next_token(len(records)) if more else None
        return 200, page_body(records, token), _JSON


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
        status, body, extra = self.server.emulator._respond(
            self.command, self.path, headers, raw, authorization
        )
        self._send(status, body, extra)

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
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = ""
        lines = [f"HTTP/1.1 {status} {reason}", f"Content-Length: {len(body)}"]
        lines += [f"{name}: {value}" for name, value in headers.items() if name.lower() != "content-length"]
        if status == 405:
            lines.append("Allow: POST")
        if self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.wfile.write(head if self.command == "HEAD" else head + body)

    do_POST = do_GET = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _handle
