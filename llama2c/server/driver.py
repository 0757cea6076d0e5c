"""Runs the builders' blocking calls and iterators off the event loop, and
stops them when the client goes away.

create_completion / create_chat_completion block (they wait for a slot and
then for every token), so each request's work runs in worker threads, one
call at a time: `call` for a whole result, `EventStream` for a stream (one
thread hop per chunk, so the engine's steps are pulled only as fast as the
client reads them). Both watch the connection: when the client disconnects
the request's `Tracked` runner is cancelled, which closes the engine's
iterator at once (the engine frees the slot); a stream is closed by the
thread that iterated it, never while it runs.

Pure ASGI plus anyio (starlette's own dependency); no starlette import.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable, Iterator

import anyio
import anyio.to_thread

from .bodies import dumps
from .errors import from_exception

log = logging.getLogger("llama2c.server")

_END = object()


class Cancelled(Exception):
    """The client went away: the request stops at its next step."""


class Tracked:
    """An engine's `run`, wrapped for one request: the builder calls it like
    Completer.run. It counts the prompt's and the completion's tokens (a
    stream's usage) and stops the steps when `cancel` is set; `close()`
    closes the engine's iterator (idempotent), so the slot is freed even when
    the request ends before its first step."""

    def __init__(self, run: Callable[..., Iterator]):
        self._run = run
        self.cancel = threading.Event()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self._steps = None
        self._watched = None

    def __call__(self, ids, **settings):
        self.prompt_tokens = len(ids)
        self._steps = self._run(ids, **settings)  # QueueFull here: before any thread waits
        self._watched = self._watch(self._steps)
        return self._watched

    def _watch(self, steps):
        try:
            for step in steps:
                if self.cancel.is_set():
                    raise Cancelled("the client disconnected")
                if step.token is not None:
                    self.completion_tokens += 1
                yield step
        finally:
            _close(steps)

    def abort(self) -> None:
        """The client went away: stop at the next step, and at once if the
        request still waits for a slot (the engine's cancel is thread-safe)."""
        self.cancel.set()
        cancel = getattr(self._steps, "cancel", None)
        if cancel is not None:
            cancel()

    def close(self) -> None:
        _close(self._watched)
        _close(self._steps)


def _close(it) -> None:
    close = getattr(it, "close", None)
    if close is not None:
        close()


def _next(it):
    try:
        return next(it)
    except StopIteration:
        return _END


async def _watch_disconnect(receive, on_disconnect: Callable[[], None]) -> None:
    """Waits for the client to go away (the body has been read already)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            on_disconnect()
            return


async def call(fn: Callable, receive, tracked: Tracked, limiter) -> object:
    """fn() in a worker thread; if the client disconnects meanwhile, the
    tracked request is cancelled (fn then ends at its next step with
    Cancelled) and the engine's iterator is closed in any case."""
    result = error = None
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_watch_disconnect, receive, tracked.abort)
            try:
                result = await anyio.to_thread.run_sync(fn, limiter=limiter)
            except Exception as e:  # noqa: BLE001 -- raised below, outside the task group
                error = e
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(tracked.close, limiter=limiter)
    if error is not None:
        raise error
    return result


def sse(data) -> bytes:
    """One server-sent event: `data: {json}` and a blank line (json.dumps
    escapes newlines, so the event is one line)."""
    text = data if isinstance(data, str) else dumps(data)
    return b"data: " + text.encode("utf-8") + b"\n\n"


SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]


class EventStream:
    """An ASGI response streaming `chunks` (dicts) as server-sent events,
    ending with `data: [DONE]`; with include_usage, a last chunk with empty
    choices and the usage first (OpenAI's stream_options). An error after
    the headers went out is sent as a `data: {"error": ...}` event. The
    chunks are pulled in worker threads; a client disconnect cancels the
    request and closes the iterators."""

    def __init__(self, chunks: Iterator[dict], tracked: Tracked, limiter, include_usage: bool = False):
        self.chunks, self.tracked, self.limiter, self.include_usage = chunks, tracked, limiter, include_usage
        self.finished = False  # the last event is being sent: a disconnect now is the response's end

    def _cleanup(self) -> None:
        try:
            _close(self.chunks)
        finally:
            self.tracked.close()

    def _usage_chunk(self, last: dict | None) -> dict:
        head = {k: last[k] for k in ("id", "object", "created", "model")} if last else {}
        prompt, completion = self.tracked.prompt_tokens, self.tracked.completion_tokens
        return {**head, "choices": [],
                "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                          "total_tokens": prompt + completion}}

    async def __call__(self, scope, receive, send) -> None:
        gone = False

        def disconnected() -> None:
            nonlocal gone
            if self.finished:  # (uvicorn reports a complete response as a disconnect too)
                return
            gone = True
            self.tracked.abort()
            tg.cancel_scope.cancel()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_watch_disconnect, receive, disconnected)
                if not await self._pump(send):
                    gone = True
                    self.tracked.abort()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._cleanup, limiter=self.limiter)
        if gone:
            log.info("client disconnected: generation cancelled")

    async def _pump(self, send) -> bool:
        """Sends the stream; False when the client went away meanwhile."""
        last = None
        try:
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            while True:
                chunk = await anyio.to_thread.run_sync(_next, self.chunks, limiter=self.limiter)
                if chunk is _END:
                    break
                last = chunk
                await send({"type": "http.response.body", "body": sse(chunk), "more_body": True})
        except (Cancelled, OSError):  # cancelled, or the client went away while we wrote to it
            return False
        except Exception as e:  # noqa: BLE001 -- reported to the client as an error event
            err = from_exception(e)
            if err.status >= 500:
                log.exception("error while streaming")
            return await self._send_last(send, sse(err.body()))
        try:
            if self.include_usage:
                await send({"type": "http.response.body", "body": sse(self._usage_chunk(last)), "more_body": True})
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
