"""The server's generation engine: continuous batching over `parallel`
slots (a context each) of one model.

One engine thread does all the model work. Each turn of its loop it runs
one chunk (at most `prefill_chunk` tokens) of one waiting prompt, then one
decoding step for every slot that is generating, all of them in a single
pass over the weights (llama2_decode_batch). So a new request starts within
a chunk's time, running streams are never stalled for a whole long prompt,
and a finished, cancelled or disconnected request frees its slot at once.
Each row's arithmetic is that of a single-sequence pass, so a request's
output does not depend on what else runs beside it.

run(ids, **settings) has Completer.run's signature and yields the same
Steps (the per-request state is completion.TokenLoop, as in the Python
API), so the OpenAI-shaped builders (openai_api, openai_chat) take it as
their `runner`: one code path for the Python API and the server.
"""
from __future__ import annotations

import collections
import os
import queue
import threading
import weakref
from typing import Iterator

import numpy as np

from .._ffi import ffi, lib
from ..completion import Step, TokenLoop, matching_prefix
from ..errors import Llama2Error, new_error, raise_for


class QueueFull(Llama2Error):
    """Every slot is busy and the waiting line is full: try again later."""


def default_parallel() -> int:
    """Streams decoded together by default: a few per core (decoding is
    memory-bound, so a batch costs little more than one row)."""
    return max(4, min(16, 4 * (os.cpu_count() or 1)))


class _Request:
    def __init__(self, ids: list[int], loop: TokenLoop):
        self.ids = ids
        self.loop = loop
        self.out: queue.Queue = queue.Queue()
        self.cancelled = False
        self.pending: list[int] = []  # prompt tokens not run yet
        self.next_token: int | None = None  # decoding: the token to run next

    def cancel(self) -> None:
        self.cancelled = True


class _Slot:
    def __init__(self, context):
        self.context = context
        self.cached: list[int] = []  # the tokens at positions 0.. of its KV cache
        self.request: _Request | None = None


class Steps:
    """A request's steps (an iterator of completion.Step). close() from the
    reading thread, or cancel() from any thread (also while the reader waits
    for a slot), ends the request and frees its slot."""

    def __init__(self, engine: "BatchEngine", request: _Request):
        self._engine = engine
        self._request = request
        self._gen = engine._steps(request)

    def __iter__(self) -> "Steps":
        return self

    def __next__(self) -> Step:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()

    def cancel(self) -> None:
        self._engine.cancel(self._request)


class BatchEngine:
    def __init__(self, llama, parallel: int | None = None, max_waiting: int = 64, prefill_chunk: int = 64):
        self.llama = llama
        self.parallel = parallel or default_parallel()
        if self.parallel < 1:
            raise ValueError(f"parallel must be >= 1 (got {self.parallel})")
        self.max_waiting = max_waiting
        self.prefill_chunk = max(1, prefill_chunk)
        self.n_ctx = int(llama.n_ctx)
        self._slots = [_Slot(llama.create_context()) for _ in range(self.parallel)]
        self._waiting: collections.deque[_Request] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._turn = 0  # which prefilling slot runs its chunk next
        self._thread = threading.Thread(target=self._serve, name="llama2c-engine", daemon=True)
        self._thread.start()

    # ---- the callers' side ----
    def stats(self) -> dict:
        with self._cond:
            active = sum(s.request is not None for s in self._slots)
            return {"parallel": self.parallel, "active": active, "waiting": len(self._waiting)}

    def run(self, ids: list[int], **settings) -> Iterator[Step]:
        """Queues a request and returns its steps. Bad settings raise here;
        so does QueueFull when every slot is busy and the line is full.
        Closing (or dropping) the iterator cancels the request."""
        request = _Request(list(ids), TokenLoop(self.llama, ids, self.n_ctx, **settings))
        with self._cond:
            if self._closed:
                raise QueueFull("the server is shutting down")
            busy = all(s.request is not None for s in self._slots)
            if busy and len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"all {self.parallel} slots are busy and {len(self._waiting)} requests wait")
            self._waiting.append(request)
            self._cond.notify()
        steps = Steps(self, request)
        weakref.finalize(steps, request.cancel)  # never started, then dropped: still cancelled
        return steps

    def _steps(self, request: _Request) -> Iterator[Step]:
        try:
            while True:
                item = request.out.get()
                if item is None:  # cancelled
                    return
                if isinstance(item, BaseException):
                    raise item
                yield from item
                if item and item[-1].finish_reason is not None:
                    return
        finally:
            self.cancel(request)

    def cancel(self, request: _Request) -> None:
        request.cancel()
        with self._cond:
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=10)

    # ---- the engine thread ----
    def _serve(self) -> None:
        while True:
            with self._cond:
                self._release_cancelled()
                self._admit()
                while not self._closed and not any(s.request is not None for s in self._slots):
                    self._cond.wait()
                    self._release_cancelled()
                    self._admit()
                if self._closed:
                    self._fail_all(QueueFull("the server is shutting down"))
                    return
                active = [s for s in self._slots if s.request is not None]
            try:
                self._prefill_one([s for s in active if s.request is not None and s.request.pending])
                self._decode([s for s in active if s.request is not None and s.request.next_token is not None
                              and not s.request.cancelled])
            except Exception as e:  # an engine failure ends the requests it touched, not the server
                with self._cond:
                    for s in active:
                        if s.request is not None:
                            s.request.out.put(e)
                            s.request = None
                            s.cached = []

    def _release_cancelled(self) -> None:
        """Frees the slots and places of cancelled requests; their readers,
        if still waiting, get the end of their steps."""
        for s in self._slots:
            if s.request is not None and s.request.cancelled:
                s.request.out.put(None)
                s.request = None
        if any(r.cancelled for r in self._waiting):
            for r in self._waiting:
                if r.cancelled:
                    r.out.put(None)
            self._waiting = collections.deque(r for r in self._waiting if not r.cancelled)

    def _admit(self) -> None:
        """Waiting requests into free slots, each to the free slot whose cache
        shares the longest prefix with its prompt."""
        while self._waiting:
            free = [s for s in self._slots if s.request is None]
            if not free:
                return
            request = self._waiting.popleft()
            slot = max(free, key=lambda s: matching_prefix(s.cached, request.ids))
            same = matching_prefix(slot.cached, request.ids)
            slot.cached = slot.cached[:same]
            request.pending = request.ids[same:]
            slot.request = request

    def _prefill_one(self, slots: list[_Slot]) -> None:
        """One chunk of one prompt (the slots take turns)."""
        if not slots:
            return
        self._turn = (self._turn + 1) % len(slots)
        slot = slots[self._turn]
        request = slot.request
        chunk = request.pending[:self.prefill_chunk]
        cx, pos = slot.context, len(slot.cached)
        logits = cx._forward_batch(chunk, pos) if len(chunk) > 1 else cx._forward(chunk[0], pos)
        slot.cached.extend(chunk)
        request.pending = request.pending[len(chunk):]
        if not request.pending:
            self._deliver(slot, logits)

    def _decode(self, slots: list[_Slot]) -> None:
        """One new token for every generating slot, in one pass."""
        if not slots:
            return
        n = len(slots)
        tokens = [s.request.next_token for s in slots]
        positions = [len(s.cached) for s in slots]
        logits = np.empty((n, self.llama.config.vocab_size), np.float32)
        err = new_error()
        raise_for(lib.llama2_decode_batch(ffi.new("llama2_context *[]", [s.context._ptr for s in slots]),
                                          ffi.new("int[]", tokens), ffi.new("int[]", positions), n,
                                          ffi.from_buffer("float[]", logits), err), err)
        for i, slot in enumerate(slots):
            slot.cached.append(tokens[i])
            self._deliver(slot, logits[i])

    def _deliver(self, slot: _Slot, logits: np.ndarray) -> None:
        request = slot.request
        steps, token = request.loop.feed(logits)
        request.next_token = token
        request.out.put(steps)
        if token is None:
            with self._cond:
                slot.request = None
                self._cond.notify()

    def _fail_all(self, error: Exception) -> None:
        for s in self._slots:
            if s.request is not None:
                s.request.out.put(error)
                s.request = None
        while self._waiting:
            self._waiting.popleft().out.put(error)
