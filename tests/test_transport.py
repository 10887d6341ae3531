"""StdlibTransport and proxy_for: what goes over the wire, keep-alive, reconnects and errors,
against real servers on 127.0.0.1 whose every byte the test scripts (and the emulator)."""

from __future__ import annotations

import gzip
import json
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pendulum
import pytest

from ona_emulator import EmulatorServer, UsageStore, generate_records
from ona_usage import client as client_module
from ona_usage.client import LIST_USAGE_PATH, OnaApiError, TransientApiError, UsageClient
from ona_usage.transport import StdlibTransport, proxy_for
from ona_usage.windows import Window

KEY = "sk-transport-test-7d1c"
START_TEXT, END_TEXT = "2025-03-01T00:00:00Z", "2025-03-02T00:00:00Z"
WINDOW = Window(pendulum.datetime(2025, 3, 1, tz="UTC"), pendulum.datetime(2025, 3, 2, tz="UTC"))
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "REQUEST_METHOD")


# -- a server scripted byte by byte ------------------------------------------------------------


@dataclass
class Received:
    """One request as the server read it off the socket."""

    connection: int  # 1 for the first connection the server accepted, 2 for the next, ...
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]


class Conn:
    """The server's side of one accepted connection."""

    def __init__(self, server: RawServer, sock: socket.socket, number: int) -> None:
        self.server, self.sock, self.number = server, sock, number
        self._buffer = b""

    def _read_until(self, marker: bytes) -> bytes | None:
        while marker not in self._buffer:
            data = self.sock.recv(65536)
            if not data:
                return None
            self._buffer += data
        head, self._buffer = self._buffer.split(marker, 1)
        return head

    def _read_exactly(self, size: int) -> bytes | None:
        while len(self._buffer) < size:
            data = self.sock.recv(65536)
            if not data:
                return None
            self._buffer += data
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def read_request(self) -> Received | None:
        """The next request, or None when the client closed the connection (or sent nonsense)."""
        head = self._read_until(b"\r\n\r\n")
        if head is None:
            return None
        lines = head.decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ")
        headers = [(name, value.strip()) for name, value in (line.split(":", 1) for line in lines[1:])]
        fields = {name.lower(): value for name, value in headers}
        body = b""
        if fields.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size_line = self._read_until(b"\r\n")
                if size_line is None:
                    return None
                try:
                    size = int(size_line, 16)
                except ValueError:
                    return None
                chunk = self._read_exactly(size + 2)
                if chunk is None:
                    return None
                if size == 0:
                    break
                body += chunk[:-2]
        elif "content-length" in fields:
            data = self._read_exactly(int(fields["content-length"]))
            if data is None:
                return None
            body = data
        received = Received(self.number, method, target, version, headers, body)
        with self.server.lock:
            self.server.received.append(received)
        return received

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def client_closed(self, timeout: float = 3.0) -> bool:
        """Wait for the client to close its end: True if it did within `timeout`."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
                self._buffer += data
        except TimeoutError:
            return False
        finally:
            self.sock.settimeout(None)

    def close(self) -> None:
        self.sock.close()

    def reset(self) -> None:
        """Close with a TCP RST instead of a FIN."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


class RawServer:
    """A TCP server on 127.0.0.1 that runs `handler(conn)` on a thread for each connection."""

    def __init__(self, handler: Callable[[Conn], None], backlog: int = 16) -> None:
        self.handler = handler
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=backlog)
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.accepted = 0
        self.received: list[Received] = []
        self.errors: list[BaseException] = []
        self.stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _accept_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(None)
            with self.lock:
                self.accepted += 1
                conn = Conn(self, sock, self.accepted)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: Conn) -> None:
        try:
            self.handler(conn)
        except Exception as exc:  # noqa: BLE001 - reported by the fixture
            self.errors.append(exc)
        finally:
            conn.sock.close()

    def close(self) -> None:
        self.stopping.set()
        self._acceptor.join(2)
        self.listener.close()
        for thread in self._threads:
            thread.join(5)


@pytest.fixture
def serve() -> Iterator[Callable[..., RawServer]]:
    servers: list[RawServer] = []

    def start(handler: Callable[[Conn], None], **kwargs: int) -> RawServer:
        servers.append(RawServer(handler, **kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.close()
    for server in servers:
        assert server.errors == [], f"server handler failed: {server.errors!r}"


@pytest.fixture
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No proxy settings from the machine running the tests, in either case."""
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    return monkeypatch


def http_response(
    status: int = 200,
    body: bytes = b"",
    *,
    reason: str = "OK",
    headers: tuple[tuple[str, str], ...] | list[tuple[str, str]] = (),
    length: bool = True,
) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}", *(f"{name}: {value}" for name, value in headers)]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def answer_all(conn: Conn, answer: Callable[[Received], bytes] | None = None) -> None:
    """Keep-alive: answer each request on the connection until the client closes it."""
    while (request := conn.read_request()) is not None:
        conn.send(answer(request) if answer else http_response(200, f"{request.method} {request.target}".encode()))


def send(
    transport: httpx.BaseTransport,
    method: str,
    url: str,
    *,
    timeout: httpx.Timeout = httpx.Timeout(3.0),
    **kwargs: object,
) -> httpx.Response:
    request = httpx.Request(method, url, extensions={"timeout": timeout.as_dict()}, **kwargs)  # type: ignore[arg-type]
    return transport.handle_request(request)


def free_port() -> int:
    """A port on 127.0.0.1 nothing listens on (it was free a moment ago)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# -- what goes over the wire -------------------------------------------------------------------


def test_post_reaches_the_server_as_httpx_built_it_and_the_answer_comes_back_whole(
    serve: Callable[..., RawServer],
) -> None:
    answer = http_response(
        201,
        b'{"ok":true}',
        reason="Created",
        headers=[("Content-Type", "application/json"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("X-Trace", "t-1")],
    )
    server = serve(lambda conn: answer_all(conn, lambda request: answer))
    body = b'{"filter":{"x":1}}'
    with StdlibTransport() as transport:
        response = send(
            transport,
            "POST",
            server.url("/api" + LIST_USAGE_PATH),
            params={"pageSize": "5", "token": "a b/c+d"},
            headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
            content=body,
        )

    assert response.status_code == 201
    assert response.http_version == "HTTP/1.1"
    assert response.headers.raw == [
        (b"Content-Type", b"application/json"),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
        (b"X-Trace", b"t-1"),
        (b"Content-Length", b"11"),
    ]
    assert response.content == b'{"ok":true}'
    assert response.json() == {"ok": True}

    [received] = server.received
    assert (received.method, received.version) == ("POST", "HTTP/1.1")
    assert received.target == "/api/gitpod.v1.UsageService/ListEnvironmentUsageRecords?pageSize=5&token=a+b%2Fc%2Bd"
    # Exactly httpx's headers, in order: nothing of http.client's own (no second Host, no
    # `Accept-Encoding: identity`).
    assert received.headers == [
        ("Host", f"127.0.0.1:{server.port}"),
        ("Authorization", f"Bearer {KEY}"),
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
    ]
    assert received.body == body


def test_get_without_body_sends_no_content_length_and_no_body(serve: Callable[..., RawServer]) -> None:
    server = serve(answer_all)
    with StdlibTransport() as transport:
        response = send(transport, "GET", server.url("/path/x?q=1"))
        follow_up = send(transport, "POST", server.url("/next"), content=b"z")
    assert response.status_code == 200 and response.content == b"GET /path/x?q=1"
    assert follow_up.content == b"POST /next"
    first, second = server.received
    assert first.headers == [("Host", f"127.0.0.1:{server.port}")] and first.body == b""
    # Had the GET sent a stray body, the POST would have been read from the wrong place.
    assert (second.method, second.target, second.body) == ("POST", "/next", b"z")
    assert server.accepted == 1


def test_post_with_empty_body_sends_content_length_zero(serve: Callable[..., RawServer]) -> None:
    server = serve(answer_all)
    with StdlibTransport() as transport:
        assert send(transport, "POST", server.url("/empty")).status_code == 200
    [received] = server.received
    assert received.header("Content-Length") == ["0"] and received.body == b""


def test_chunked_response_is_decoded(serve: Callable[..., RawServer]) -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\n\r\n"
    )
    server = serve(lambda conn: answer_all(conn, lambda request: chunked))
    with StdlibTransport() as transport:
        first = send(transport, "GET", server.url("/a"))
        second = send(transport, "GET", server.url("/b"))
    assert first.content == second.content == b"hello world"
    assert server.accepted == 1  # the chunked body was read to its end: the connection stayed usable


def test_gzip_body_is_decoded_like_httpx_does(serve: Callable[..., RawServer]) -> None:
    payload = b'{"records":[]}' * 20
    compressed = gzip.compress(payload)
    server = serve(
        lambda conn: answer_all(conn, lambda request: http_response(200, compressed, headers=[("Content-Encoding", "gzip")]))
    )
    with StdlibTransport() as transport:
        response = send(transport, "GET", server.url())
    assert response.content == payload
    assert response.headers["content-length"] == str(len(compressed))


# -- keep-alive --------------------------------------------------------------------------------


def test_keep_alive_sends_every_request_over_one_connection(serve: Callable[..., RawServer]) -> None:
    server = serve(answer_all)
    with StdlibTransport() as transport:
        bodies = [send(transport, "POST", server.url(f"/r{i}"), content=b"x" * i).content for i in range(5)]
    assert bodies == [f"POST /r{i}".encode() for i in range(5)]
    assert server.accepted == 1
    assert [(r.connection, r.target, r.body) for r in server.received] == [(1, f"/r{i}", b"x" * i) for i in range(5)]


def test_connection_close_in_the_response_closes_the_connection_and_the_next_request_opens_one(
    serve: Callable[..., RawServer],
) -> None:
    closed_by_client: dict[int, bool] = {}
    done = threading.Event()

    def handler(conn: Conn) -> None:
        if conn.number == 1:
            conn.read_request()
            # The server says it will close but leaves the socket open: the client must close.
            conn.send(http_response(200, b"bye", headers=[("Connection", "close")]))
            closed_by_client[1] = conn.client_closed()
            done.set()
        else:
            answer_all(conn)

    server = serve(handler)
    with StdlibTransport() as transport:
        first = send(transport, "GET", server.url("/first"))
        assert first.content == b"bye" and first.headers["connection"] == "close"
        assert done.wait(5) and closed_by_client == {1: True}
        second = send(transport, "GET", server.url("/second"))
        third = send(transport, "GET", server.url("/third"))
    assert second.content == b"GET /second" and third.content == b"GET /third"
    assert server.accepted == 2
    assert [(r.connection, r.target) for r in server.received] == [(1, "/first"), (2, "/second"), (2, "/third")]


def test_the_connection_opened_after_connection_close_gets_the_requests_read_timeout(
    serve: Callable[..., RawServer],
) -> None:
    def handler(conn: Conn) -> None:
        conn.read_request()
        if conn.number == 1:
            conn.send(http_response(200, b"bye", headers=[("Connection", "close")]))
        conn.client_closed(timeout=5)  # the second connection never answers

    server = serve(handler)
    timeout = httpx.Timeout(5.0, connect=3.0, read=0.2)
    with StdlibTransport() as transport:
        assert send(transport, "GET", server.url("/1"), timeout=timeout).content == b"bye"
        started = time.perf_counter()
        with pytest.raises(httpx.ReadTimeout):
            send(transport, "GET", server.url("/2"), timeout=timeout)
        assert time.perf_counter() - started < 2.0  # the read timeout, not the connect one
    assert server.accepted == 2


def test_body_delimited_by_close_is_read_whole_and_the_next_request_opens_a_connection(
    serve: Callable[..., RawServer],
) -> None:
    def handler(conn: Conn) -> None:
        conn.read_request()
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it, up to the close")
        conn.close()

    server = serve(handler)
    with StdlibTransport() as transport:
        first = send(transport, "GET", server.url("/1"))
        second = send(transport, "GET", server.url("/2"))
    assert first.content == second.content == b"all of it, up to the close"
    assert server.accepted == 2
    assert [(r.connection, r.target) for r in server.received] == [(1, "/1"), (2, "/2")]


@pytest.mark.parametrize("how", ["fin", "rst"])
def test_connection_closed_by_the_server_while_idle_is_reopened_once_transparently(
    how: str, serve: Callable[..., RawServer]
) -> None:
    idle_closed = threading.Event()

    def handler(conn: Conn) -> None:
        if conn.number == 1:
            conn.read_request()
            conn.send(http_response(200, b"first", headers=[("Connection", "keep-alive")]))
            time.sleep(0.05)  # let the answer reach the client before a RST could overtake it
            conn.reset() if how == "rst" else conn.close()
            idle_closed.set()
        else:
            answer_all(conn)

    server = serve(handler)
    with StdlibTransport() as transport:
        assert send(transport, "GET", server.url("/one")).content == b"first"
        assert idle_closed.wait(5)
        time.sleep(0.05)  # the FIN or RST has reached the client's socket
        response = send(transport, "POST", server.url("/two"), content=b"payload")
        assert response.status_code == 200 and response.content == b"POST /two"
        assert send(transport, "GET", server.url("/three")).content == b"GET /three"
    assert server.accepted == 2
    # The request that met the dead connection reached the server once, on the new connection.
    assert [(r.connection, r.target, r.body) for r in server.received] == [
        (1, "/one", b""),
        (2, "/two", b"payload"),
        (2, "/three", b""),
    ]


def test_reconnect_after_an_idle_close_is_tried_only_once(serve: Callable[..., RawServer]) -> None:
    idle_closed = threading.Event()

    def handler(conn: Conn) -> None:
        conn.read_request()
        if conn.number == 1:
            conn.send(http_response(200, b"first"))
            conn.close()
            idle_closed.set()
        # every later connection: read the request, then hang up without an answer

    server = serve(handler)
    with StdlibTransport() as transport:
        assert send(transport, "GET", server.url("/one")).content == b"first"
        assert idle_closed.wait(5)
        time.sleep(0.05)
        with pytest.raises(httpx.RemoteProtocolError):
            send(transport, "GET", server.url("/two"))
        assert server.accepted == 2  # the dead connection, then one fresh try: not a third
        assert [(r.connection, r.target) for r in server.received] == [(1, "/one"), (2, "/two")]


def test_fresh_connection_closed_without_an_answer_is_not_retried(serve: Callable[..., RawServer]) -> None:
    server = serve(lambda conn: conn.read_request())  # then the connection closes
    with StdlibTransport() as transport, pytest.raises(httpx.RemoteProtocolError):
        send(transport, "POST", server.url("/once"), content=b"x")
    assert server.accepted == 1
    assert [(r.connection, r.target) for r in server.received] == [(1, "/once")]


def test_close_hangs_up_and_the_next_request_opens_a_new_connection(serve: Callable[..., RawServer]) -> None:
    closed_by_client: list[bool] = []
    done = threading.Event()

    def handler(conn: Conn) -> None:
        if conn.number == 1:
            conn.read_request()
            conn.send(http_response(200, b"one"))
            closed_by_client.append(conn.client_closed())
            done.set()
        else:
            answer_all(conn)

    server = serve(handler)
    transport = StdlibTransport()
    assert send(transport, "GET", server.url("/a")).content == b"one"
    transport.close()
    assert done.wait(5) and closed_by_client == [True]
    transport.close()  # closing twice is harmless
    assert send(transport, "GET", server.url("/b")).content == b"GET /b"
    transport.close()
    assert server.accepted == 2


def test_a_request_to_another_origin_closes_the_old_connection(serve: Callable[..., RawServer]) -> None:
    closed_by_client: list[bool] = []
    done = threading.Event()

    def handler_a(conn: Conn) -> None:
        if conn.number == 1:
            conn.read_request()
            conn.send(http_response(200, b"A"))
            closed_by_client.append(conn.client_closed())
            done.set()
        else:
            answer_all(conn, lambda request: http_response(200, b"A again"))

    server_a = serve(handler_a)
    server_b = serve(lambda conn: answer_all(conn, lambda request: http_response(200, b"B")))
    with StdlibTransport() as transport:
        assert send(transport, "GET", server_a.url()).content == b"A"
        assert send(transport, "GET", server_b.url()).content == b"B"
        assert done.wait(5) and closed_by_client == [True]
        assert send(transport, "GET", server_a.url()).content == b"A again"
    assert (server_a.accepted, server_b.accepted) == (2, 1)
    assert [r.header("Host") for r in server_b.received] == [[f"127.0.0.1:{server_b.port}"]]


# -- failures mapped to httpx's exceptions -----------------------------------------------------


def test_refused_port_raises_connect_error() -> None:
    with StdlibTransport() as transport, pytest.raises(httpx.ConnectError, match="ConnectionRefusedError"):
        send(transport, "GET", f"http://127.0.0.1:{free_port()}/")


def test_connect_that_is_never_accepted_raises_connect_timeout(serve: Callable[..., RawServer]) -> None:
    # A listener with a full accept queue drops new SYNs, so the connect hangs until its timeout.
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    port = listener.getsockname()[1]
    fillers: list[socket.socket] = []
    try:
        for _ in range(16):
            filler = socket.socket()
            filler.settimeout(0.2)
            fillers.append(filler)
            try:
                filler.connect(("127.0.0.1", port))
            except TimeoutError:
                break
        else:
            pytest.skip("this kernel accepts connections beyond the listen backlog")
        started = time.perf_counter()
        with StdlibTransport() as transport, pytest.raises(httpx.ConnectTimeout):
            send(transport, "GET", f"http://127.0.0.1:{port}/", timeout=httpx.Timeout(5.0, connect=0.3))
        assert time.perf_counter() - started < 3.0  # the connect timeout, not the read one
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def test_server_that_never_answers_raises_read_timeout_and_the_connection_is_dropped(
    serve: Callable[..., RawServer],
) -> None:
    closed_by_client: list[bool] = []
    done = threading.Event()

    def handler(conn: Conn) -> None:
        if conn.number == 1:
            conn.read_request()
            closed_by_client.append(conn.client_closed(timeout=5))  # no answer, ever
            done.set()
        else:
            answer_all(conn)

    server = serve(handler)
    with StdlibTransport() as transport:
        started = time.perf_counter()
        with pytest.raises(httpx.ReadTimeout):
            send(transport, "GET", server.url("/slow"), timeout=httpx.Timeout(0.3))
        assert time.perf_counter() - started < 3.0
        assert done.wait(5) and closed_by_client == [True]
        assert send(transport, "GET", server.url("/next")).content == b"GET /next"
    assert server.accepted == 2


def test_body_that_stalls_midway_raises_read_timeout(serve: Callable[..., RawServer]) -> None:
    def handler(conn: Conn) -> None:
        conn.read_request()
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        conn.client_closed(timeout=5)

    server = serve(handler)
    with StdlibTransport() as transport, pytest.raises(httpx.ReadTimeout):
        send(transport, "GET", server.url(), timeout=httpx.Timeout(0.3))


@pytest.mark.parametrize("reused", [False, True], ids=["fresh-connection", "kept-alive-connection"])
def test_body_cut_short_raises_remote_protocol_error_without_retrying(
    reused: bool, serve: Callable[..., RawServer]
) -> None:
    def handler(conn: Conn) -> None:
        if reused:
            conn.read_request()
            conn.send(http_response(200, b"whole"))
        conn.read_request()
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        conn.close()

    server = serve(handler)
    with StdlibTransport() as transport:
        if reused:
            assert send(transport, "GET", server.url("/whole")).content == b"whole"
        with pytest.raises(httpx.RemoteProtocolError, match="IncompleteRead"):
            send(transport, "GET", server.url("/cut"))
    assert server.accepted == 1  # an answer that started is not sent again
    assert [r.target for r in server.received] == (["/whole", "/cut"] if reused else ["/cut"])


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"garbage\r\n\r\n", id="no-status-line"),
        pytest.param(b"HTTP/1.1 2OO OK\r\n\r\n", id="status-not-a-number"),
        pytest.param(b"HTTP/9.9 200 OK\r\nContent-Length: 0\r\n\r\n", id="unknown-version"),
        pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", id="bad-chunk-size"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(150)) + b"\r\n",
            id="too-many-headers",
        ),
    ],
)
def test_garbage_answer_raises_remote_protocol_error_and_drops_the_connection(
    garbage: bytes, serve: Callable[..., RawServer]
) -> None:
    closed_by_client: list[bool] = []
    done = threading.Event()

    def handler(conn: Conn) -> None:
        if conn.number == 1:
            conn.read_request()
            conn.send(garbage)
            closed_by_client.append(conn.client_closed())
            done.set()
        else:
            answer_all(conn)

    server = serve(handler)
    with StdlibTransport() as transport:
        with pytest.raises(httpx.RemoteProtocolError):
            send(transport, "GET", server.url("/bad"))
        assert done.wait(5) and closed_by_client == [True]  # a stream out of sync is not reused
        assert send(transport, "GET", server.url("/good")).content == b"GET /good"
    assert server.accepted == 2


def test_each_request_gets_its_own_read_timeout_on_a_kept_alive_connection(serve: Callable[..., RawServer]) -> None:
    # The socket's read timeout is set per request: the second request, on the connection the
    # first one opened (with 0.2 s), waits for its own 5 s.
    def handler(conn: Conn) -> None:
        conn.read_request()
        conn.send(http_response(200, b"fast"))
        conn.read_request()
        time.sleep(0.6)  # longer than the first request's 0.2 s, well within the second's 5 s
        conn.send(http_response(200, b"slow"))

    server = serve(handler)
    with StdlibTransport() as transport:
        assert send(transport, "GET", server.url("/fast"), timeout=httpx.Timeout(0.2)).content == b"fast"
        assert send(transport, "GET", server.url("/slow"), timeout=httpx.Timeout(5.0)).content == b"slow"
    assert [(r.connection, r.target) for r in server.received] == [(1, "/fast"), (1, "/slow")]
    assert server.accepted == 1


def test_streamed_request_body_is_sent_whole_with_a_content_length(serve: Callable[..., RawServer]) -> None:
    # httpx marks a streamed body `Transfer-Encoding: chunked`; the transport reads it whole and
    # sends it with a `Content-Length` instead, and no `Transfer-Encoding` at all.
    server = serve(answer_all)
    with StdlibTransport() as transport:
        response = send(
            transport, "POST", server.url("/stream"), content=iter([b"he", b"llo"]), timeout=httpx.Timeout(3.0)
        )
    assert response.status_code == 200
    assert response.content == b"POST /stream"
    [received] = server.received
    assert received.body == b"hello"
    assert received.header("Content-Length") == ["5"]
    assert received.header("Transfer-Encoding") == []


# -- proxies -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "url", "expected"),
    [
        ({}, "https://app.gitpod.io/api", None),
        ({"HTTPS_PROXY": "http://proxy.corp:3128"}, "https://app.gitpod.io/api", "http://proxy.corp:3128"),
        ({"https_proxy": "http://lower.corp:3128"}, "https://app.gitpod.io/api", "http://lower.corp:3128"),
        ({"HTTPS_PROXY": "http://proxy.corp:3128"}, "http://127.0.0.1:8080/api", None),
        ({"HTTP_PROXY": "http://plain.corp:8080"}, "http://127.0.0.1:8080/api", "http://plain.corp:8080"),
        ({"HTTP_PROXY": "http://plain.corp:8080"}, "https://app.gitpod.io/api", None),
        ({"ALL_PROXY": "http://all.corp:1080"}, "https://app.gitpod.io/api", "http://all.corp:1080"),
        (
            {"HTTPS_PROXY": "http://proxy.corp:3128", "ALL_PROXY": "http://all.corp:1080"},
            "https://app.gitpod.io/api",
            "http://proxy.corp:3128",
        ),
        ({"HTTPS_PROXY": "http://proxy.corp:3128", "NO_PROXY": "app.gitpod.io"}, "https://app.gitpod.io/api", None),
        ({"HTTPS_PROXY": "http://proxy.corp:3128", "NO_PROXY": ".gitpod.io"}, "https://app.gitpod.io/api", None),
        ({"HTTPS_PROXY": "http://proxy.corp:3128", "NO_PROXY": "localhost, gitpod.io"}, "https://app.gitpod.io/api", None),
        ({"HTTPS_PROXY": "http://proxy.corp:3128", "NO_PROXY": "*"}, "https://app.gitpod.io/api", None),
        ({"ALL_PROXY": "http://all.corp:1080", "no_proxy": "app.gitpod.io"}, "https://app.gitpod.io/api", None),
        (
            {"HTTPS_PROXY": "http://proxy.corp:3128", "NO_PROXY": "example.com,other.io"},
            "https://app.gitpod.io/api",
            "http://proxy.corp:3128",
        ),
    ],
)
def test_proxy_for(env: dict[str, str], url: str, expected: str | None, no_proxy_env: pytest.MonkeyPatch) -> None:
    for name, value in env.items():
        no_proxy_env.setenv(name, value)
    assert proxy_for(httpx.URL(url)) == expected


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, StdlibTransport),
        ({"HTTPS_PROXY": "http://proxy.corp:3128"}, httpx.HTTPTransport),
        ({"ALL_PROXY": "http://all.corp:1080"}, httpx.HTTPTransport),
        ({"HTTPS_PROXY": "http://proxy.corp:3128", "NO_PROXY": "app.gitpod.io"}, StdlibTransport),
        ({"HTTP_PROXY": "http://plain.corp:8080"}, StdlibTransport),  # only for http URLs
    ],
)
def test_usage_client_uses_the_stdlib_transport_unless_a_proxy_is_set(
    env: dict[str, str], expected: type, no_proxy_env: pytest.MonkeyPatch
) -> None:
    for name, value in env.items():
        no_proxy_env.setenv(name, value)
    assert type(client_module._new_transport(httpx.URL("https://app.gitpod.io/api"))) is expected
    with UsageClient(KEY, "https://app.gitpod.io/api") as client:
        transport = client._transport()
        assert type(transport) is expected
        assert client._transport() is transport  # one per thread, kept
        other: list[httpx.BaseTransport] = []
        thread = threading.Thread(target=lambda: other.append(client._transport()))
        thread.start()
        thread.join(5)
        assert type(other[0]) is expected and other[0] is not transport  # another thread, its own


def test_usage_client_sends_through_the_proxy_from_the_environment(
    serve: Callable[..., RawServer], no_proxy_env: pytest.MonkeyPatch
) -> None:
    proxy = serve(lambda conn: answer_all(conn, lambda request: http_response(200, b'{"records":[]}')))
    no_proxy_env.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
    api = f"http://127.0.0.1:{free_port()}/api"  # nothing listens there: only the proxy can answer
    with UsageClient(KEY, api, max_attempts=1) as client:
        client.check_access()
        assert type(client._transport()) is httpx.HTTPTransport
    [received] = proxy.received
    assert received.method == "POST"
    assert received.target == f"{api}{LIST_USAGE_PATH}?pageSize=1"  # absolute form: a proxy request
    assert received.header("Authorization") == [f"Bearer {KEY}"]


# -- with the emulator -------------------------------------------------------------------------


def test_usage_client_reconnects_without_a_retry_after_the_emulator_drops_its_connections(
    no_proxy_env: pytest.MonkeyPatch,
) -> None:
    store = UsageStore(generate_records(5, START_TEXT, END_TEXT, 250))
    truth = store.records(START_TEXT, END_TEXT)
    assert len(truth) == 250
    server = EmulatorServer(store, api_key=KEY).start()
    port = server.port
    try:
        with UsageClient(KEY, server.url, backoff=0.01) as client:
            assert type(client._transport()) is StdlibTransport
            client.check_access()
            # The emulator goes away and comes back on the same port: the kept-alive connection
            # is dead, and the next request must reconnect without a retry of the client's.
            server.stop()
            server = EmulatorServer(store, api_key=KEY, port=port).start()
            records = [record for page in client.pages(WINDOW) for record in page]
        assert records == truth
        assert client.requests == 1 + 3 and client.retries == 0
        assert [entry["status"] for entry in server.requests] == [200, 200, 200]
    finally:
        server.stop()


# -- over TLS ----------------------------------------------------------------------------------
# A throwaway CA and server certificates made with the `openssl` CLI, and the scripted server
# above with TLS on each accepted connection: the same http.client path as against the API, with
# certificate verification, hostname checks and SNI all real.

USAGE_BODY = b'{"records": [], "pagination": {}}'


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA certificate, PEM: what SSL_CERT_FILE points at
    ca_dir: Path  # a directory holding only the CA, under its subject hash: for SSL_CERT_DIR
    cert: Path  # for localhost and 127.0.0.1, signed by the CA
    key: Path
    other_cert: Path  # signed by the same CA, but for another name only
    other_key: Path


def _openssl(*args: str | Path, cwd: Path) -> str:
    done = subprocess.run(["openssl", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, f"openssl {' '.join(map(str, args))} failed: {done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl CLI to make test certificates with")
    root = tmp_path_factory.mktemp("pki")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")  # fast to generate
    _openssl(
        "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=ona-usage throwaway test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-addext", "subjectKeyIdentifier=hash",
        cwd=root,
    )  # fmt: skip

    def leaf(name: str, subject: str, alt_names: str) -> tuple[Path, Path]:
        (root / f"{name}.ext").write_text(
            f"subjectAltName={alt_names}\n"
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature\n"
            "extendedKeyUsage=serverAuth\n"
            "subjectKeyIdentifier=hash\n"
            "authorityKeyIdentifier=keyid\n"
        )
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=root)
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-set_serial", str(len(name)),
            "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem",
            cwd=root,
        )  # fmt: skip
        return root / f"{name}.pem", root / f"{name}.key"

    cert, key = leaf("server", "/CN=localhost", "DNS:localhost,IP:127.0.0.1")
    other_cert, other_key = leaf("other", "/CN=api.example.test", "DNS:api.example.test")
    ca_dir = root / "certs"
    ca_dir.mkdir()
    subject_hash = _openssl("x509", "-in", "ca.pem", "-noout", "-subject_hash", cwd=root).strip()
    shutil.copy(root / "ca.pem", ca_dir / f"{subject_hash}.0")
    return Pki(root / "ca.pem", ca_dir, cert, key, other_cert, other_key)


class TlsServer(RawServer):
    """RawServer with a TLS handshake on each accepted connection, before the handler runs."""

    def __init__(self, handler: Callable[[Conn], None], cert: Path, key: Path) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.context.sni_callback = self._sni
        self.server_names: list[str | None] = []  # the SNI of each handshake, as the client sent it
        self.handshakes = 0  # completed
        self.handshake_errors: list[str] = []  # failed, e.g. the client rejected the certificate
        super().__init__(handler)

    def _sni(self, ssl_socket: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
        with self.lock:
            self.server_names.append(server_name)

    def url(self, path: str = "/", host: str = "127.0.0.1") -> str:
        return f"https://{host}:{self.port}{path}"

    def _serve(self, conn: Conn) -> None:
        conn.sock.settimeout(5)
        try:
            conn.sock = self.context.wrap_socket(conn.sock, server_side=True)
        except OSError as exc:  # ssl.SSLError included
            with self.lock:
                self.handshake_errors.append(f"{type(exc).__name__}: {exc}")
            conn.sock.close()
            return
        conn.sock.settimeout(None)
        with self.lock:
            self.handshakes += 1
        super()._serve(conn)


@pytest.fixture
def serve_tls(pki: Pki) -> Iterator[Callable[..., TlsServer]]:
    servers: list[TlsServer] = []

    def start(handler: Callable[[Conn], None], *, cert: Path | None = None, key: Path | None = None) -> TlsServer:
        servers.append(TlsServer(handler, cert or pki.cert, key or pki.key))
        return servers[-1]

    yield start
    for server in servers:
        server.close()
    for server in servers:
        assert server.errors == [], f"server handler failed: {server.errors!r}"


@pytest.fixture
def ca_env(pki: Pki, no_proxy_env: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Trust the throwaway CA the way a user behind a corporate CA would: SSL_CERT_FILE."""
    no_proxy_env.delenv("SSL_CERT_DIR", raising=False)
    no_proxy_env.setenv("SSL_CERT_FILE", str(pki.ca))
    return no_proxy_env


@pytest.fixture
def no_ca_env(no_proxy_env: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Trust only the default CAs (certifi's), which do not include the throwaway CA."""
    no_proxy_env.delenv("SSL_CERT_FILE", raising=False)
    no_proxy_env.delenv("SSL_CERT_DIR", raising=False)
    return no_proxy_env


def json_answer(request: Received) -> bytes:
    body = json.dumps({"method": request.method, "target": request.target, "body": request.body.decode()})
    return http_response(200, body.encode(), headers=[("Content-Type", "application/json")])


def settle(server: RawServer) -> None:
    """Stop the server and wait for its threads, so its counts are final."""
    server.close()


def test_https_request_succeeds_with_the_ca_from_ssl_cert_file_and_keeps_one_tls_connection(
    serve_tls: Callable[..., TlsServer], ca_env: pytest.MonkeyPatch
) -> None:
    server = serve_tls(lambda conn: answer_all(conn, json_answer))
    with StdlibTransport() as transport:
        first = send(transport, "POST", server.url("/api/x?pageSize=1"), content=b'{"n":1}')
        second = send(transport, "POST", server.url("/api/y"), content=b'{"n":2}')
    assert first.status_code == 200 and first.http_version == "HTTP/1.1"
    assert first.content == b'{"method": "POST", "target": "/api/x?pageSize=1", "body": "{\\"n\\":1}"}'
    assert first.json() == {"method": "POST", "target": "/api/x?pageSize=1", "body": '{"n":1}'}
    assert second.json() == {"method": "POST", "target": "/api/y", "body": '{"n":2}'}
    settle(server)
    assert (server.accepted, server.handshakes, server.handshake_errors) == (1, 1, [])
    assert [(r.connection, r.target) for r in server.received] == [(1, "/api/x?pageSize=1"), (1, "/api/y")]
    assert server.received[0].header("Host") == [f"127.0.0.1:{server.port}"]
    assert server.server_names == [None]  # no SNI for an IP address (RFC 6066)


def test_https_to_localhost_sends_sni_and_checks_the_name(
    serve_tls: Callable[..., TlsServer], ca_env: pytest.MonkeyPatch
) -> None:
    server = serve_tls(lambda conn: answer_all(conn, json_answer))
    with StdlibTransport() as transport:
        response = send(transport, "POST", server.url("/sni", host="localhost"), content=b"{}")
    assert response.json()["target"] == "/sni"
    settle(server)
    assert server.server_names == ["localhost"]
    assert server.received[0].header("Host") == [f"localhost:{server.port}"]


def test_https_trusts_a_ca_directory_from_ssl_cert_dir(
    pki: Pki, serve_tls: Callable[..., TlsServer], no_ca_env: pytest.MonkeyPatch
) -> None:
    no_ca_env.setenv("SSL_CERT_DIR", str(pki.ca_dir))
    server = serve_tls(lambda conn: answer_all(conn, json_answer))
    with StdlibTransport() as transport:
        assert send(transport, "POST", server.url("/dir"), content=b"{}").json()["target"] == "/dir"


def test_https_with_an_ssl_context_given_ignores_the_environment(
    pki: Pki, serve_tls: Callable[..., TlsServer], no_ca_env: pytest.MonkeyPatch
) -> None:
    server = serve_tls(lambda conn: answer_all(conn, json_answer))
    context = ssl.create_default_context(cafile=str(pki.ca))
    with StdlibTransport(ssl_context=context) as transport:
        assert send(transport, "POST", server.url("/given"), content=b"{}").json()["target"] == "/given"


def test_https_context_is_built_once_per_transport_and_kept_across_reconnects(
    serve_tls: Callable[..., TlsServer], ca_env: pytest.MonkeyPatch
) -> None:
    server = serve_tls(lambda conn: answer_all(conn, json_answer))
    with StdlibTransport() as transport:
        assert send(transport, "POST", server.url("/1"), content=b"{}").status_code == 200
        context = transport._ssl_context
        assert context is not None
        transport.close()
        ca_env.delenv("SSL_CERT_FILE")  # too late: the transport already has its context
        assert send(transport, "POST", server.url("/2"), content=b"{}").status_code == 200
        assert transport._ssl_context is context
    settle(server)
    assert (server.accepted, server.handshakes) == (2, 2)


def test_https_without_the_ca_fails_certificate_verification_once_without_retrying(
    serve_tls: Callable[..., TlsServer], no_ca_env: pytest.MonkeyPatch
) -> None:
    server = serve_tls(lambda conn: answer_all(conn, json_answer))
    with StdlibTransport() as transport:
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED") as caught:
            send(transport, "POST", server.url("/secret"), content=b'{"key":"not sent"}')
        # The server sends its certificate alone, and no CA the client trusts issued it.
        assert str(caught.value).startswith("SSLCertVerificationError: ")
        assert "unable to get local issuer certificate" in str(caught.value)
        assert transport._connection is None  # nothing half-open kept for the next request
    settle(server)
    # One TCP connection, one handshake that the client aborted, and not a byte of HTTP.
    assert (server.accepted, server.handshakes, len(server.handshake_errors)) == (1, 0, 1)
    assert "unknown ca" in server.handshake_errors[0].lower()
    assert server.received == []


def test_https_with_a_certificate_for_another_name_fails_the_hostname_check(
    pki: Pki, serve_tls: Callable[..., TlsServer], ca_env: pytest.MonkeyPatch
) -> None:
    server = serve_tls(lambda conn: answer_all(conn, json_answer), cert=pki.other_cert, key=pki.other_key)
    with StdlibTransport() as transport:
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED.*mismatch"):
            send(transport, "POST", server.url("/ip"), content=b"{}")
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED.*mismatch"):
            send(transport, "POST", server.url("/name", host="localhost"), content=b"{}")
    settle(server)
    assert (server.accepted, server.handshakes, server.received) == (2, 0, [])


def test_https_to_a_plain_http_server_raises_connect_error(
    serve: Callable[..., RawServer], ca_env: pytest.MonkeyPatch
) -> None:
    # A plain HTTP server reads the ClientHello as a bad request and answers in clear text.
    def handler(conn: Conn) -> None:
        conn.sock.recv(65536)
        conn.send(http_response(400, b"this is plain http", reason="Bad Request"))

    server = serve(handler)
    with StdlibTransport() as transport, pytest.raises(httpx.ConnectError, match="SSLError"):
        send(transport, "POST", f"https://127.0.0.1:{server.port}/", content=b"{}", timeout=httpx.Timeout(3.0))
    settle(server)
    assert (server.accepted, server.received) == (1, [])


def test_https_handshake_that_never_completes_raises_connect_timeout(
    serve: Callable[..., RawServer], ca_env: pytest.MonkeyPatch
) -> None:
    # The TCP connection is accepted, but the server never says a word of TLS.
    server = serve(lambda conn: conn.client_closed(timeout=5))
    started = time.perf_counter()
    with StdlibTransport() as transport, pytest.raises(httpx.ConnectTimeout):
        send(transport, "POST", f"https://127.0.0.1:{server.port}/", timeout=httpx.Timeout(5.0, connect=0.3))
    assert time.perf_counter() - started < 3.0
    settle(server)
    assert server.accepted == 1


def _close_idle_tls(conn: Conn, how: str) -> None:
    if how == "close_notify":  # a TLS close_notify, then the FIN; not waiting for the client's
        conn.sock.setblocking(False)
        try:
            conn.sock.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass
        conn.close()
    elif how == "fin":  # the FIN without a close_notify, as many servers and balancers do
        conn.close()
    else:
        conn.reset()


def close_after_first_answer(
    how: str, answer: Callable[[Received], bytes] | None = None
) -> tuple[Callable[[Conn], None], threading.Event]:
    """A handler whose first connection answers one request and is then closed while idle
    (`how`, see `_close_idle_tls`), and the event set once it is; later connections answer all."""
    idle_closed = threading.Event()

    def handler(conn: Conn) -> None:
        if conn.number == 1:
            request = conn.read_request()
            assert request is not None
            conn.send(answer(request) if answer else http_response(200, b"first"))
            time.sleep(0.05)
            _close_idle_tls(conn, how)
            idle_closed.set()
        else:
            answer_all(conn, answer)

    return handler, idle_closed


@pytest.mark.parametrize("how", ["close_notify", "fin", "rst"])
def test_tls_connection_closed_by_the_server_while_idle_is_reopened_once_transparently(
    how: str, serve_tls: Callable[..., TlsServer], ca_env: pytest.MonkeyPatch
) -> None:
    handler, idle_closed = close_after_first_answer(how)
    server = serve_tls(handler)
    with StdlibTransport() as transport:
        assert send(transport, "GET", server.url("/one")).content == b"first"
        assert idle_closed.wait(5)
        time.sleep(0.05)
        # A POST with a body, as UsageClient sends: http.client writes the head and the body in
        # two writes, and the second meets the server's RST.
        response = send(transport, "POST", server.url("/two"), content=b"payload")
        assert response.content == b"POST /two"
    settle(server)
    assert (server.accepted, server.handshakes) == (2, 2)
    assert [(r.connection, r.target, r.body) for r in server.received] == [(1, "/one", b""), (2, "/two", b"payload")]


@pytest.mark.parametrize("how", ["close_notify", "fin"])
def test_tls_connection_closed_while_idle_is_reopened_for_a_request_without_body(
    how: str, serve_tls: Callable[..., TlsServer], ca_env: pytest.MonkeyPatch
) -> None:
    # One write only: the closed connection shows as an empty read (RemoteDisconnected).
    handler, idle_closed = close_after_first_answer(how)
    server = serve_tls(handler)
    with StdlibTransport() as transport:
        assert send(transport, "GET", server.url("/one")).content == b"first"
        assert idle_closed.wait(5)
        time.sleep(0.05)
        assert send(transport, "GET", server.url("/two")).content == b"GET /two"
    settle(server)
    assert (server.accepted, server.handshakes) == (2, 2)
    assert [(r.connection, r.target) for r in server.received] == [(1, "/one"), (2, "/two")]


# -- UsageClient over TLS ----------------------------------------------------------------------


def usage_answer(request: Received) -> bytes:
    if request.method == "POST" and request.target.startswith("/api" + LIST_USAGE_PATH + "?"):
        return http_response(200, USAGE_BODY, headers=[("Content-Type", "application/json")])
    return http_response(404, b'{"code":"not_found","message":"no such path"}', reason="Not Found")


def test_usage_client_checks_access_over_https_with_the_ca_from_ssl_cert_file(
    serve_tls: Callable[..., TlsServer], ca_env: pytest.MonkeyPatch
) -> None:
    server = serve_tls(lambda conn: answer_all(conn, usage_answer))
    with UsageClient(KEY, server.url("/api"), max_attempts=1) as client:
        assert type(client._transport()) is StdlibTransport
        client.check_access()
        client.check_access()
        assert (client.requests, client.retries) == (2, 0)
    settle(server)
    assert (server.accepted, server.handshakes) == (1, 1)
    first, second = server.received
    assert first.target == f"/api{LIST_USAGE_PATH}?pageSize=1" and second.connection == 1
    assert first.header("Authorization") == [f"Bearer {KEY}"]
    assert json.loads(first.body)["pagination"] == {"pageSize": 1}


def test_usage_client_without_the_ca_fails_at_once_naming_the_certificate(
    serve_tls: Callable[..., TlsServer], no_ca_env: pytest.MonkeyPatch
) -> None:
    server = serve_tls(lambda conn: answer_all(conn, usage_answer))
    with UsageClient(KEY, server.url("/api"), max_attempts=3, backoff=0.01) as client:
        with pytest.raises(OnaApiError) as caught:
            client.check_access()
        assert (client.requests, client.retries) == (1, 0)  # not retried: it cannot get better
    message = str(caught.value)
    assert not isinstance(caught.value, TransientApiError)
    assert message.startswith("the TLS certificate of 127.0.0.1 could not be verified (SSLCertVerificationError:")
    assert "CERTIFICATE_VERIFY_FAILED" in message and "SSL_CERT_FILE" in message
    assert KEY not in message
    settle(server)
    assert (server.accepted, server.handshakes, len(server.handshake_errors), server.received) == (1, 0, 1, [])


def test_usage_client_reconnects_without_a_retry_after_the_server_drops_an_idle_tls_connection(
    serve_tls: Callable[..., TlsServer], ca_env: pytest.MonkeyPatch
) -> None:
    handler, idle_closed = close_after_first_answer("fin", usage_answer)
    server = serve_tls(handler)
    with UsageClient(KEY, server.url("/api"), max_attempts=3, backoff=0.01) as client:
        client.check_access()
        assert idle_closed.wait(5)
        time.sleep(0.05)
        client.check_access()
    settle(server)
    assert [r.connection for r in server.received] == [1, 2]
    assert (client.requests, client.retries) == (2, 0)
