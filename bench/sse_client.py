"""A lean HTTP/1.1 client for server-sent event streams, for the serving
benchmarks: it reads the socket directly and hands back each event's bytes
with the time its last byte arrived.

Why not httpx: on the benchmark's 2-core machine the clients share the CPUs
with the server they measure. Each token of a real stream arrives on its own,
and httpx (h11 framing, its stream layers) spent about 320 us of CPU per
event here, the standard library's http.client about 150; at 8 streams that
took 15% of the machine from the server. This reads the chunked body itself:
one recv per arrival, events split on the blank line that ends them.

    with SSEConnection("127.0.0.1", port) as conn:
        status, events = conn.post_stream("/v1/completions", body_dict)
        for t, data in events:            # data: the bytes after "data: "
            ...
"""
from __future__ import annotations

import json
import socket
import time


class HTTPError(RuntimeError):
    pass


class SSEConnection:
    def __init__(self, host: str, port: int, timeout: float = 120.0):
        self.host, self.port, self.timeout = host, port, timeout
        self.sock: socket.socket | None = None
        self.buf = b""
        self.closing = False  # the server said Connection: close

    def __enter__(self) -> "SSEConnection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _connect(self) -> socket.socket:
        if self.sock is None:
            self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.buf = b""
        return self.sock

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise HTTPError("the server closed the connection")
        self.buf += data

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def post_stream(self, path: str, body: dict):
        """Sends the request; returns (status, events). For status 200 with a
        chunked body, events yields (arrival time, data bytes) for every
        `data:` event until the body ends; otherwise events is the body."""
        payload = json.dumps(body).encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\nAccept: text/event-stream\r\n\r\n").encode()
        self._connect().sendall(head + payload)
        status = int(self._line().split()[1])
        headers = {}
        while True:
            line = self._line()
            if not line:
                break
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        self.closing = headers.get("connection", "").lower() == "close"
        if "chunked" not in headers.get("transfer-encoding", ""):
            n = int(headers.get("content-length", "0"))
            while len(self.buf) < n:
                self._fill()
            data, self.buf = self.buf[:n], self.buf[n:]
            if self.closing:
                self.close()
            return status, data
        return status, self._events()

    def _events(self):
        pending = b""  # event text not yet ended by a blank line
        while True:
            size = int(self._line().split(b";")[0], 16)
            if size == 0:  # the last chunk, then the (empty) trailer
                while self._line():
                    pass
                if self.closing:
                    self.close()
                return
            while len(self.buf) < size + 2:
                self._fill()
            now = time.perf_counter()
            pending = (pending + self.buf[:size]).replace(b"\r\n", b"\n")  # sse-starlette ends lines with CRLF
            self.buf = self.buf[size + 2:]
            while b"\n\n" in pending:
                event, pending = pending.split(b"\n\n", 1)
                for line in event.split(b"\n"):
                    if line.startswith(b"data: "):
                        yield now, line[6:]
