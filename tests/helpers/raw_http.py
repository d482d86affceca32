"""Raw-socket clients that send or read slowly, for the slow-client tests and the soak."""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def connect(url: str, rcvbuf: int | None = None, timeout: float = 10.0) -> socket.socket:
    """A TCP connection to the server of `url`; a small receive buffer is set before
    connecting, so the window the server sees stays small too."""
    parts = urlsplit(url)
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(timeout)
    sock.connect((parts.hostname, parts.port))
    return sock


def request_head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [
        f"{method} {path} HTTP/1.1",
        "Host: gateway",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def start_slow_body(
    url: str, method: str, path: str, length: int, headers: dict[str, str] | None = None
) -> socket.socket:
    """Send a request's headers announcing `length` body bytes, and the first byte only."""
    sock = connect(url)
    head = {"Content-Length": str(length), **(headers or {})}
    sock.sendall(request_head(method, path, head) + b"{")
    return sock


def trickle(*socks: socket.socket, seconds: float, every: float = 0.2) -> None:
    """Send one body byte to each socket every `every` seconds for `seconds` (or until the
    server closes it)."""
    open_socks = list(socks)
    end = time.monotonic() + seconds
    while open_socks and time.monotonic() < end:
        time.sleep(every)
        for sock in list(open_socks):
            try:
                sock.sendall(b" ")
            except OSError:
                open_socks.remove(sock)


def read_response(sock: socket.socket, timeout: float = 10.0) -> RawResponse:
    """One HTTP response with a Content-Length (or up to the connection's end)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        if not piece:
            raise ConnectionError(f"closed before a response: {data!r}")
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines)}
    length = int(headers.get("content-length", "-1"))
    while length < 0 or len(body) < length:
        piece = sock.recv(65536)
        if not piece:
            break
        body += piece
    return RawResponse(int(status_line.split()[1]), headers, body)


def closed_by_server(sock: socket.socket, timeout: float = 5.0) -> bool:
    """Whether the server closes the connection within `timeout` (EOF or reset)."""
    sock.settimeout(timeout)
    end = time.monotonic() + timeout
    try:
        while time.monotonic() < end:
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return False


def open_stream(
    url: str, key: str, body: dict[str, Any], rcvbuf: int = 4096, request_id: str = ""
) -> socket.socket:
    """A streamed chat request from a client that then reads nothing at all."""
    data = json.dumps(body).encode()
    sock = connect(url, rcvbuf=rcvbuf)
    head = {
        "Authorization": f"Bearer {key}",
        "Content-Type": "application/json",
        "Content-Length": str(len(data)),
        **({"X-Request-Id": request_id} if request_id else {}),
    }
    sock.sendall(request_head("POST", "/v1/chat/completions", head) + data)
    return sock
