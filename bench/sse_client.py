"""A lean HTTP/1.1 client for server-sent event streams, for the serving
benchmarks: it reads the socket directly and hands back each event's bytes
with the time its last byte arrived.

Why not httpx: on the benchmark's 2-core machine the clients share the CPUs
with the server they measure. Each token of a real stream arrives on its own,
and httpx (h11 framing, its stream layers) spent about 320 us of CPU per
event here, the standard library's http.client about 150; at 8 streams that
took 15% of the machine from the server. This reads the chunked body itself:
one recv per arrival, events split on the blank line that ends them.

Two ways to drive it:

    with SSEConnection("127.0.0.1", port) as conn:        # one stream, blocking
        status, events = conn.post_stream("/v1/completions", body_dict)
        for t, data in events:            # data: the bytes after "data: "
            ...

    results = run_streams("127.0.0.1", port, "/v1/completions", bodies)

run_streams runs many clients in one thread (a selector over one kept-alive
connection per client, each sending its requests one after another), and
keeps each event's raw bytes for the caller to parse afterwards. Eight client
threads woke once per token event each, every wake-up taking a core from the
server mid-step; one thread wakes once for whatever has arrived (bench/serve.py
measured 5-6% more server throughput at 8 streams this way).
"""
from __future__ import annotations

import json
import selectors
import socket
import time


class HTTPError(RuntimeError):
    pass


def request_bytes(host: str, port: int, path: str, body: dict) -> bytes:
    payload = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nAccept: text/event-stream\r\n\r\n").encode()
    return head + payload


class ResponseParser:
    """One HTTP/1.1 response, fed the bytes as they arrive: the status and
    headers, then for a chunked body its `data:` events as (arrival time,
    data bytes) in `events`, else the whole body in `body`. `done` once the
    response is complete; bytes past its end stay in `rest` (the next
    response on the connection)."""

    def __init__(self):
        self.buf = b""
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.chunked = False
        self.closing = False   # the server said Connection: close
        self.events: list[tuple[float, bytes]] = []
        self.body = b""
        self.done = False
        self._length = 0        # content-length, or the current chunk's size
        self._part = "size"     # of a chunked body, what comes next: "size" line, chunk "data", "trailer" lines
        self._pending = b""     # event text not yet ended by a blank line

    @property
    def rest(self) -> bytes:
        return self.buf if self.done else b""

    def feed(self, data: bytes, now: float) -> None:
        self.buf += data
        if self.status is None and not self._head():
            return
        if self.chunked:
            self._chunks(now)
        elif len(self.buf) >= self._length:
            self.body, self.buf = self.buf[:self._length], self.buf[self._length:]
            self.done = True

    def _head(self) -> bool:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return False
        lines = self.buf[:end].decode("latin-1").split("\r\n")
        self.buf = self.buf[end + 4:]
        self.status = int(lines[0].split()[1])
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        self.closing = self.headers.get("connection", "").lower() == "close"
        self.chunked = "chunked" in self.headers.get("transfer-encoding", "")
        self._length = int(self.headers.get("content-length", "0"))
        return True

    def _chunks(self, now: float) -> None:
        while not self.done:
            if self._part == "data":
                if len(self.buf) < self._length + 2:
                    return
                text, self.buf = self.buf[:self._length], self.buf[self._length + 2:]
                self._part = "size"
                self._event_text(text, now)
                continue
            end = self.buf.find(b"\r\n")
            if end < 0:
                return
            line, self.buf = self.buf[:end], self.buf[end + 2:]
            if self._part == "trailer":  # after the last chunk, until an empty line
                self.done = not line
                continue
            self._length = int(line.split(b";")[0], 16)
            self._part = "data" if self._length else "trailer"

    def _event_text(self, text: bytes, now: float) -> None:
        pending = (self._pending + text).replace(b"\r\n", b"\n")  # sse-starlette ends lines with CRLF
        while b"\n\n" in pending:
            event, pending = pending.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                if line.startswith(b"data: "):
                    self.events.append((now, line[6:]))
        self._pending = pending


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

    def _read(self, parser: ResponseParser) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise HTTPError("the server closed the connection")
        parser.feed(data, time.perf_counter())

    def post_stream(self, path: str, body: dict):
        """Sends the request; returns (status, events). For status 200 with a
        chunked body, events yields (arrival time, data bytes) for every
        `data:` event until the body ends; otherwise events is the body."""
        self._connect().sendall(request_bytes(self.host, self.port, path, body))
        parser = ResponseParser()
        parser.feed(self.buf, time.perf_counter())
        while parser.status is None:
            self._read(parser)
        self.closing = parser.closing
        if not parser.chunked:
            while not parser.done:
                self._read(parser)
            self._finish(parser)
            return parser.status, parser.body
        return parser.status, self._events(parser)

    def _events(self, parser: ResponseParser):
        sent = 0
        while True:
            while sent < len(parser.events):
                sent += 1
                yield parser.events[sent - 1]
            if parser.done:
                self._finish(parser)
                return
            self._read(parser)

    def _finish(self, parser: ResponseParser) -> None:
        self.buf = parser.rest
        if self.closing:
            self.close()


def run_streams(host: str, port: int, path: str, bodies: list[list[dict]], timeout: float = 600.0) -> list[dict]:
    """Client i sends bodies[i] one after another on a kept-alive connection
    of its own, all clients at once, in this one thread. Returns one record
    per request, in the order they finished: client, index, start (request
    sent), status, events ((arrival time, data bytes); the body, for a
    response that is not an event stream, in `body`). Raises HTTPError when
    the server closes a connection mid-response or nothing arrives for
    `timeout` seconds."""
    sel = selectors.DefaultSelector()
    out: list[dict] = []
    state = {}
    try:
        for i, todo in enumerate(bodies):
            if not todo:
                continue
            sock = socket.create_connection((host, port), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            state[i] = {"sock": sock, "next": 0, "parser": None, "start": 0.0}
            sel.register(sock, selectors.EVENT_READ, i)

        def send_next(i: int, leftover: bytes = b"") -> None:
            s = state[i]
            s["start"] = time.perf_counter()
            s["parser"] = ResponseParser()
            s["sock"].sendall(request_bytes(host, port, path, bodies[i][s["next"]]))
            s["next"] += 1
            if leftover:
                s["parser"].feed(leftover, s["start"])

        for i in state:
            send_next(i)
        active = len(state)
        while active:
            ready = sel.select(timeout)
            if not ready:
                raise HTTPError(f"nothing arrived for {timeout} s")
            now = time.perf_counter()
            for key, _ in ready:
                i = key.data
                s = state[i]
                data = s["sock"].recv(65536)
                if not data:
                    raise HTTPError("the server closed the connection")
                p = s["parser"]
                p.feed(data, now)
                if not p.done:
                    continue
                out.append({"client": i, "index": s["next"] - 1, "start": s["start"], "status": p.status,
                            "events": p.events, "body": p.body})
                if s["next"] < len(bodies[i]) and not p.closing:
                    send_next(i, p.rest)
                else:
                    if s["next"] < len(bodies[i]):
                        raise HTTPError("the server closed a kept-alive connection")
                    sel.unregister(s["sock"])
                    s["sock"].close()
                    active -= 1
    finally:
        for s in state.values():
            s["sock"].close()
        sel.close()
    return out
