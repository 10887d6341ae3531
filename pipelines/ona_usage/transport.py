"""An httpx transport over the standard library's `http.client`, for the hot path of a sync.

Against a fast API the client's own CPU per page bounds a sync: measured on the local emulator,
a page costs about 0.66 ms of CPU through `httpx.Client.post`, 0.4 ms through httpx's default
transport (httpcore and h11) and 0.19 ms through `http.client`. Over the 10,000 pages of a year
of a busy organisation that is several seconds, and it is time the GIL is held, so threads
that should be waiting on the network wait on each other instead.

The transport speaks plain HTTP/1.1 with keep-alive, one connection at a time, so each thread
has its own (as `UsageClient` does). It maps failures to httpx's exceptions, so callers see the
same errors as with httpx's own transport, and reconnects once when a kept-alive connection
turns out to have been closed by the server while idle (as httpcore and urllib3 do). It knows
nothing of proxies: `UsageClient` keeps httpx's transport when the environment sets one.
"""

from __future__ import annotations

import http.client
import select
import socket
import ssl
import urllib.request
from typing import Any

import httpx


class CertificateError(httpx.ConnectError):
    """The server's TLS certificate could not be verified: trying again will not change that."""


class StdlibTransport(httpx.BaseTransport):
    """Send httpx requests with `http.client`; not thread-safe: one per thread."""

    def __init__(self, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self._ssl_context = ssl_context
        self._connection: http.client.HTTPConnection | None = None
        self._origin: tuple[str, str, int] | None = None
        self._aborted = False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        timeout = request.extensions.get("timeout", {})
        body = request.read()
        target = request.url.raw_path.decode("ascii")
        headers = _framed_headers(request, body)
        for attempt in (1, 2):
            connection, reused = self._connect(request.url, timeout)
            try:
                connection.sock.settimeout(timeout.get("read"))
                connection.putrequest(request.method, target, skip_host=True, skip_accept_encoding=True)
                for name, value in headers:
                    connection.putheader(name, value)
                connection.endheaders(body)
                response = connection.getresponse()
                content = response.read()  # raises IncompleteRead on a cut-off body
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ssl.SSLEOFError) as exc:
                self.close()
                if reused and attempt == 1 and not self._aborted:
                    continue  # the server closed an idle keep-alive connection: one fresh try
                raise httpx.RemoteProtocolError(f"server closed the connection: {exc}", request=request) from None
            except TimeoutError:
                self.close()
                raise httpx.ReadTimeout("timed out waiting for the response", request=request) from None
            except http.client.HTTPException as exc:
                self.close()
                raise httpx.RemoteProtocolError(f"{type(exc).__name__}: {exc}", request=request) from None
            except OSError as exc:
                self.close()
                raise httpx.ReadError(f"{type(exc).__name__}: {exc}", request=request) from None
            if response.will_close:
                self.close()
            return httpx.Response(
                response.status,
                headers=response.getheaders(),
                content=content,
                request=request,
                extensions={"http_version": b"HTTP/1.1"},
            )
        raise AssertionError("unreachable")

    def _connect(self, url: httpx.URL, timeout: dict[str, Any]) -> tuple[http.client.HTTPConnection, bool]:
        if self._aborted:
            raise httpx.ConnectError("the connection was abandoned for a faster one")
        origin = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        if self._connection is not None and self._origin == origin:
            if not _dropped(self._connection):
                return self._connection, True
        self.close()
        scheme, host, port = origin
        connection: http.client.HTTPConnection
        if scheme == "https":
            if self._ssl_context is None:  # as httpx's: certifi's CAs, or SSL_CERT_FILE / SSL_CERT_DIR
                self._ssl_context = httpx.create_ssl_context()
            connection = http.client.HTTPSConnection(
                host, port, timeout=timeout.get("connect"), context=self._ssl_context
            )
        else:
            connection = http.client.HTTPConnection(host, port, timeout=timeout.get("connect"))
        try:
            connection.connect()
        except TimeoutError:
            raise httpx.ConnectTimeout(f"timed out connecting to {host}:{port}") from None
        except ssl.SSLCertVerificationError as exc:
            raise CertificateError(f"{type(exc).__name__}: {exc}") from None
        except OSError as exc:
            raise httpx.ConnectError(f"{type(exc).__name__}: {exc}") from None
        connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._connection, self._origin = connection, origin
        return connection, False

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
        self._connection = self._origin = None

    def abort(self) -> None:
        """Wake a thread waiting on this connection (another thread's call): shut the socket down.

        The transport is done for: it does not reconnect, since its request was answered elsewhere.
        """
        self._aborted = True
        connection = self._connection
        sock = connection.sock if connection is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _dropped(connection: http.client.HTTPConnection) -> bool:
    """Whether the server closed a kept-alive connection while it was idle.

    An idle connection has nothing to read; if the socket is readable, what is there is the
    server's goodbye (EOF or a TLS close). Checked before each reuse, as httpcore does, so a
    request is not first written into a dead socket.
    """
    sock = connection.sock
    if sock is None:
        return True
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def _framed_headers(request: httpx.Request, body: bytes) -> list[tuple[str, str]]:
    """The request's headers, with a streamed body's chunked framing replaced by its length.

    The body is read whole before sending (it is a small JSON document), so it goes out with a
    `Content-Length`, which every server understands.
    """
    headers = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in request.headers.raw]
    if not any(name.lower() == "transfer-encoding" for name, _ in headers):
        return headers
    framed = [(name, value) for name, value in headers if name.lower() not in ("transfer-encoding", "content-length")]
    return [*framed, ("Content-Length", str(len(body)))]


def proxy_for(url: httpx.URL) -> str | None:
    """The proxy the environment routes `url` through (`HTTPS_PROXY`, `ALL_PROXY`, ...), if any."""
    proxies = urllib.request.getproxies()
    proxy = proxies.get(url.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(url.host):
        return None
    return proxy
