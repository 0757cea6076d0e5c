"""bench/sse_client.py, the serving benchmark's lean event-stream client,
against a local HTTP/1.1 server that sends chunked bodies the way real
servers do: events split across chunks, several events in one chunk, LF
or CRLF line ends (sse-starlette's), comments, a plain JSON error body,
and several requests on one kept-alive connection."""
from __future__ import annotations

import contextlib
import json
import socket
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from sse_client import HTTPError, ResponseParser, SSEConnection, run_streams  # noqa: E402


def chunked(pieces: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


RESPONSES = {
    "/lf": (200, chunked([b"data: {\"a\": 1}\n\n", b"data: {\"a\"", b": 2}\n\ndata: {\"a\": 3}\n\n", b": ping\n\n",
                          b"data: [DONE]\n\n"])),
    "/crlf": (200, chunked([b"data: {\"a\": 1}\r\n\r\ndata: {\"a\": 2}\r", b"\n\r\n", b"data: [DONE]\r\n\r\n"])),
}


def serve(sock: socket.socket, requests: int) -> None:
    conn, _ = sock.accept()
    answer(conn, requests)


def answer(conn: socket.socket, requests: int) -> None:
    buf = b""
    with conn:
        for _ in range(requests):
            while b"\r\n\r\n" not in buf:
                buf += conn.recv(4096)
            head, buf = buf.split(b"\r\n\r\n", 1)
            length = int([h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")][0].split(b":")[1])
            while len(buf) < length:
                buf += conn.recv(4096)
            body, buf = buf[:length], buf[length:]
            path = head.split(b" ")[1].decode()
            assert json.loads(body)["prompt"] == "hi"
            if path in RESPONSES:
                status, payload = RESPONSES[path]
                conn.sendall(b"HTTP/1.1 %d OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n"
                             % status + payload)
            else:
                err = b'{"error": {"message": "no such thing"}}'
                conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n%s" % (len(err), err))


@contextlib.contextmanager
def listening(run, backlog: int = 1):
    """A loopback socket whose connections run(sock) takes in a thread; yields its port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(backlog)
    t = threading.Thread(target=run, args=(sock,), daemon=True)
    t.start()
    try:
        yield sock.getsockname()[1]
    finally:
        t.join(timeout=5)
        sock.close()


@pytest.fixture
def server():
    with listening(lambda sock: serve(sock, 3)) as port:
        yield port


def test_events_across_chunks_and_line_ends_on_one_connection(server):
    with SSEConnection("127.0.0.1", server, timeout=5) as conn:
        status, events = conn.post_stream("/lf", {"prompt": "hi"})
        got = [data for _, data in events]
        assert status == 200 and got == [b'{"a": 1}', b'{"a": 2}', b'{"a": 3}', b"[DONE]"]
        status, events = conn.post_stream("/crlf", {"prompt": "hi"})
        times = list(events)
        assert [d for _, d in times] == [b'{"a": 1}', b'{"a": 2}', b"[DONE]"]
        assert all(a <= b for (a, _), (b, _) in zip(times, times[1:]))
        status, body = conn.post_stream("/missing", {"prompt": "hi"})
        assert status == 404 and json.loads(body)["error"]["message"] == "no such thing"


def hang_up(sock: socket.socket) -> None:
    conn, _ = sock.accept()
    conn.recv(4096)
    conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\ndata:")  # then gone
    conn.close()


@pytest.fixture
def hanging_up():
    """A server that starts a chunked response, then closes the connection."""
    with listening(hang_up) as port:
        yield port


def test_a_server_that_hangs_up_is_an_error(hanging_up):
    with SSEConnection("127.0.0.1", hanging_up, timeout=5) as conn:
        status, events = conn.post_stream("/lf", {"prompt": "hi"})
        with pytest.raises(HTTPError, match="closed"):
            list(events)


def test_many_streams_in_one_thread():
    """run_streams: three clients at once, each sending its requests one after
    another on its own kept-alive connection; every response complete, events
    in order, a non-stream response's body kept."""
    plan = [["/lf", "/crlf"], ["/crlf", "/missing", "/lf"], ["/lf"]]

    def accept_all(sock: socket.socket) -> None:
        for _ in plan:
            conn, _ = sock.accept()
            threading.Thread(target=answer, args=(conn, 3), daemon=True).start()

    with listening(accept_all, backlog=3) as port:
        records = run_streams_routed(port, plan)
    by = {(r["client"], r["index"]): r for r in records}
    assert sorted(by) == [(c, j) for c, paths in enumerate(plan) for j in range(len(paths))]
    want = {"/lf": [b'{"a": 1}', b'{"a": 2}', b'{"a": 3}', b"[DONE]"], "/crlf": [b'{"a": 1}', b'{"a": 2}', b"[DONE]"]}
    for (c, j), r in by.items():
        path = plan[c][j]
        if path == "/missing":
            assert r["status"] == 404 and json.loads(r["body"])["error"]["message"] == "no such thing"
        else:
            assert r["status"] == 200 and [d for _, d in r["events"]] == want[path]
            assert all(r["start"] <= t for t, _ in r["events"])
    for c in range(len(plan)):  # a client's requests went one after another
        starts = [by[(c, j)]["start"] for j in range(len(plan[c]))]
        assert starts == sorted(starts)


def run_streams_routed(port: int, plan: list[list[str]]) -> list[dict]:
    """run_streams with each request's path taken from the plan (the test
    server routes by path; run_streams sends one path, so each body names its
    own and a tiny wrapper puts it in the request line)."""
    import sse_client

    real = sse_client.request_bytes

    def routed(host, port_, path, body):
        return real(host, port_, body.pop("path"), body)

    sse_client.request_bytes = routed
    try:
        return run_streams("127.0.0.1", port, "/unused", [[{"prompt": "hi", "path": p} for p in paths]
                                                          for paths in plan], timeout=5)
    finally:
        sse_client.request_bytes = real


def test_run_streams_reports_a_hang_up(hanging_up):
    with pytest.raises(HTTPError, match="closed"):
        run_streams("127.0.0.1", hanging_up, "/lf", [[{"prompt": "hi"}]], timeout=5)


def test_the_parser_takes_a_response_byte_by_byte():
    """Every split of the bytes gives the same events and leaves the next
    response's bytes alone."""
    raw = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + RESPONSES["/lf"][1] + b"HTTP/1.1 404")
    p = ResponseParser()
    for i in range(len(raw)):
        p.feed(raw[i:i + 1], float(i))
    assert p.done and p.status == 200 and p.rest == b"HTTP/1.1 404"
    assert [d for _, d in p.events] == [b'{"a": 1}', b'{"a": 2}', b'{"a": 3}', b"[DONE]"]
    assert [t for t, _ in p.events] == sorted(t for t, _ in p.events)
