"""Generation requests on the event loop, fed by the engine thread.

The engine makes every request's steps in its own thread. After each of
its turns it wakes a `Hub` (one per event loop), which schedules one call
into the loop for all requests at once (one call_soon_threadsafe per
engine turn, not per token or per stream); that call `pump`s each
registered `Generation`: its new steps become chunks (the builder's
ChunkStream, so the Python API and the server shape them the same way),
serialized as server-sent events, and its response task is woken to send
them in one write. No thread per request, no thread hop per token, and the
engine never waits for the loop.

Each request is watched: when its client disconnects, the engine request
is cancelled at once (its slot freed at the engine's next turn), and it is
cancelled in any case when the response ends. The builder's own work
(tokenizing, checks) runs in a worker thread once per request, before the
request is queued.

Pure ASGI plus anyio and asyncio (what uvicorn runs); no starlette import.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

import anyio

from .bodies import dumps
from .engine import ENDED
from .errors import from_exception

log = logging.getLogger("llama2c.server")


class Hub:
    """The engine's waker for the requests of one event loop: wake() (the
    engine thread, once per turn with news) schedules one call on the loop
    that pumps every registered generation."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.pumps: set[Callable[[], None]] = set()
        self._scheduled = False

    def wake(self) -> None:
        if self._scheduled:  # a call is on its way: it will see these steps too
            return
        self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._pump_all)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def _pump_all(self) -> None:
        self._scheduled = False
        for pump in list(self.pumps):
            pump()


class Runner:
    """The builder's runner for one request: queues it in the engine with
    the hub as its waker and keeps its steps and prompt length."""

    def __init__(self, engine, hub: Hub):
        self.engine, self.hub = engine, hub
        self.steps = None
        self.prompt_tokens = 0

    def __call__(self, ids, **settings):
        self.prompt_tokens = len(ids)
        self.steps = self.engine.run(ids, waker=self.hub, **settings)  # QueueFull here: before anything waits
        return self.steps

    def cancel(self) -> None:
        if self.steps is not None:
            self.steps.close()


def sse(data) -> bytes:
    """One server-sent event: `data: {json}` and a blank line (json.dumps
    escapes newlines, so the event is one line)."""
    text = data if isinstance(data, str) else dumps(data)
    return b"data: " + text.encode("utf-8") + b"\n\n"


SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]
_CANCELLED = object()


class Generation:
    """One request on the loop: its ChunkStream (the builder's result), its
    engine steps and the hub. As a stream, each pump turns the new steps
    into events (`out`); as a whole result, it collects them. `end` is None
    while the engine works on it, then ENDED (finished), an exception, or
    _CANCELLED (the client went away)."""

    def __init__(self, stream, runner: Runner, stream_events: bool):
        self.stream, self.runner, self.hub = stream, runner, runner.hub
        self.steps = runner.steps
        self.stream_events = stream_events
        self.out: list[bytes] = []      # events not sent yet
        self.collected: list = []       # steps (a whole result)
        self.last: dict | None = None   # the last chunk (for the usage chunk's head)
        self.completion_tokens = 0
        self.end = None
        self.ready = asyncio.Event()

    def start(self) -> None:
        if self.stream_events:
            try:
                self._add(self.stream.first())
            except Exception as e:  # noqa: BLE001 -- reported to the client, as a failure in pump
                self.end = e
                return
        self.hub.pumps.add(self.pump)
        self.pump()  # steps made before it was registered

    def release(self) -> None:
        """Stops listening and cancels the engine request (idempotent: the
        slot of a finished request is free already)."""
        self.hub.pumps.discard(self.pump)
        self.runner.cancel()

    def abort(self) -> None:
        """The client went away."""
        if self.end is None:
            self.end = _CANCELLED
            self.ready.set()
        self.release()

    def _add(self, chunks: list) -> None:
        for chunk in chunks:
            self.out.append(sse(chunk))
            self.last = chunk

    def pump(self) -> None:
        """The steps the engine made since the last pump (on the loop)."""
        if self.end is not None:
            return
        try:
            steps, end = self.steps.take()
            for step in steps:
                if step.token is not None:
                    self.completion_tokens += 1
                if self.stream_events:
                    self._add(self.stream.chunks_of(step))
            if not self.stream_events:
                self.collected.extend(steps)
        except Exception as e:  # noqa: BLE001 -- ends the request; reported to its client
            steps, end = (), e
        if end is not None:
            self.end = end
            self.hub.pumps.discard(self.pump)
        if steps or end is not None:
            self.ready.set()

    async def next_events(self) -> bytes | None:
        """The events made since the last call, waiting for some; None when
        the request has ended and everything was handed out."""
        while not self.out:
            if self.end is not None:
                return None
            self.ready.clear()
            await self.ready.wait()
        body = b"".join(self.out)
        self.out.clear()
        return body

    def usage(self) -> dict:
        prompt, completion = self.runner.prompt_tokens, self.completion_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _watch_disconnect(receive, on_disconnect: Callable[[], None]) -> None:
    """Waits for the client to go away (the body has been read already)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            on_disconnect()
            return


async def whole(gen: Generation, receive) -> dict | None:
    """The non-streamed result of a generation, or None when the client went
    away first (the request is then cancelled); an engine failure raises."""
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_watch_disconnect, receive, gen.abort)
            gen.start()
            while gen.end is None:
                gen.ready.clear()
                await gen.ready.wait()
            tg.cancel_scope.cancel()
    finally:
        gen.release()
    if gen.end is _CANCELLED:
        return None
    if gen.end is not ENDED:
        raise gen.end
    return gen.stream.whole(gen.collected)


class EventStream:
    """An ASGI response streaming a generation's chunks as server-sent
    events, ending with `data: [DONE]`; with include_usage, a last chunk
    with empty choices and the usage first (OpenAI's stream_options). An
    error after the headers went out is sent as a `data: {"error": ...}`
    event. A client disconnect cancels the request."""

    def __init__(self, gen: Generation, include_usage: bool = False):
        self.gen, self.include_usage = gen, include_usage
        self.finished = False  # the last event is being sent: a disconnect now is the response's end

    def _usage_chunk(self) -> dict:
        last = self.gen.last
        head = {k: last[k] for k in ("id", "object", "created", "model")} if last else {}
        return {**head, "choices": [], "usage": self.gen.usage()}

    async def __call__(self, scope, receive, send) -> None:
        gone = False

        def disconnected() -> None:
            nonlocal gone
            if self.finished:  # (uvicorn reports a complete response as a disconnect too)
                return
            gone = True
            self.gen.abort()
            tg.cancel_scope.cancel()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_watch_disconnect, receive, disconnected)
                if not await self._pump(send):
                    gone = True
                tg.cancel_scope.cancel()
        finally:
            self.gen.release()
        if gone:
            log.info("client disconnected: generation cancelled")

    async def _pump(self, send) -> bool:
        """Sends the stream; False when the client went away meanwhile."""
        gen = self.gen
        try:
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            gen.start()
            while (body := await gen.next_events()) is not None:
                await send({"type": "http.response.body", "body": body, "more_body": True})
        except OSError:  # the client went away while we wrote to it
            return False
        if gen.end is _CANCELLED:
            return False
        if gen.end is not ENDED:
            err = from_exception(gen.end)
            if err.status >= 500:
                log.error("error while streaming", exc_info=gen.end)
            return await self._send_last(send, sse(err.body()))
        try:
            if self.include_usage:
                await send({"type": "http.response.body", "body": sse(self._usage_chunk()), "more_body": True})
        except OSError:
            return False
        return await self._send_last(send, sse("[DONE]"))

    async def _send_last(self, send, body: bytes) -> bool:
        self.finished = True
        try:
            await send({"type": "http.response.body", "body": body, "more_body": False})
            return True
        except OSError:
            return False
