"""The server's generation engine: continuous batching over `parallel`
slots (a context each) of one model.

One engine thread does all the model work. Each turn of its loop it runs
one chunk (at most `prefill_chunk` tokens) of one waiting prompt, then one
decoding step for every slot that is generating, all of them in a single
pass over the weights (llama2_decode_batch). Short chunks (a short prompt,
or the end of a long one: `fuse_chunk` tokens in all, the prompts taking
turns) go into that same pass, as rows of their contexts at consecutive
positions, instead of passes of their own; so a burst of new requests with
short prompts starts within a few steps. A new request starts within a chunk's time,
running streams are never stalled for a whole long prompt, and a finished,
cancelled or disconnected request frees its slot at once.
Each row's arithmetic is that of a single-sequence pass, so a request's
output does not depend on what else runs beside it.

run(ids, **settings) has Completer.run's signature and yields the same
Steps (the per-request state is completion.TokenLoop, as in the Python
API), so the OpenAI-shaped builders (openai_api, openai_chat) take it as
their `runner`: one code path for the Python API and the server.

A request's steps go into its own deque; after each turn the engine wakes
each waker that has news once (`waker.wake()`), whatever the number of
requests and steps. A reader thread iterates its Steps (a semaphore per
request); the server passes one waker for all its requests
(server/driver.py's Hub: one call into the event loop per turn), whose
loop then take()s each request's new steps without blocking. The engine
thread never waits for a reader.
"""
from __future__ import annotations

import collections
import os
import queue
import threading
import weakref

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


class ThreadWaker:
    """The waker of one request read by a thread: wake() (the engine, once
    per turn with news) lets wait() return (at once if woken meanwhile)."""

    def __init__(self):
        self._sem = threading.Semaphore(0)

    def wake(self) -> None:
        self._sem.release()

    def wait(self) -> None:
        self._sem.acquire()


class _Request:
    def __init__(self, ids: list[int], loop: TokenLoop, waker):
        self.ids = ids
        self.loop = loop
        self.waker = waker
        # what the engine made for it, in order: lists of Steps (the last step of the
        # last list has a finish_reason), None (cancelled) or an exception (a failure)
        self.items: collections.deque = collections.deque()
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
        self.reserved = 0  # positions whose KV cache memory is committed (never given back)


# positions past the prompt reserved for a new request: its token budget up
# to this many (an open-ended request does not commit a whole context at once);
# also what every slot reserves when the engine starts
RESERVE_AHEAD = 512


class _Reserver:
    """Commits a slot's KV cache memory for a new request's positions (its
    prompt and token budget) in a thread of its own, while the engine runs:
    otherwise the first passes through fresh positions of a slot fault in
    its cache pages (the kernel zeroing each) inside the decoding pass,
    where they hold up every row of the step (Context.reserve leaves the
    contents alone, so it may run beside the engine). The engine also has
    every slot's first positions reserved when it starts: the first burst
    of requests writes the first positions of every slot at once, and
    faulting them in there made its first steps 10-30 times slower."""

    def __init__(self):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="llama2c-reserve", daemon=True)
        self._thread.start()

    def reserve(self, slot: _Slot, positions: int) -> None:
        if positions > slot.reserved:
            slot.reserved = positions
            self._jobs.put((slot.context, positions))

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job[0].reserve(job[1])
            except Exception:  # pragma: no cover - a speed-up only: the pages still come when written
                pass

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=10)


ENDED = True  # take()'s `end` when the request finished or was cancelled


class Steps:
    """A request's steps (completion.Step): iterate them in a thread (each
    next() waits for the engine), or, when the request was queued with a
    waker of one's own, take() the new ones each time the waker is woken.
    close() or cancel(), from any thread (also while the request waits for
    a slot), ends the request and frees its slot."""

    def __init__(self, engine: "BatchEngine", request: _Request):
        self._engine = engine
        self._request = request
        self._end = None
        self._buffered: collections.deque = collections.deque()  # taken, not yet handed out by next()

    def take(self) -> tuple[list[Step], object]:
        """Without waiting: the steps made since the last call, and the end:
        None (more to come), ENDED (finished, or cancelled) or the exception
        that ended the request (after the steps returned with it)."""
        steps, end, items = [], self._end, self._request.items
        while end is None and items:
            item = items.popleft()
            if item is None:
                end = ENDED
            elif isinstance(item, BaseException):
                end = item
            else:
                steps.extend(item)
                if item and item[-1].finish_reason is not None:
                    end = ENDED
        self._end = end
        return steps, end

    def __iter__(self) -> "Steps":
        return self

    def __next__(self) -> Step:
        wait = getattr(self._request.waker, "wait", None)
        if wait is None:  # whether or not steps are ready yet: the contract does not depend on timing
            raise TypeError("these steps go to their own waker: take() them")
        buffered = self._buffered
        while not buffered:
            end = self._end
            if end is not None:
                self._end = ENDED  # an error is raised once, then the steps are over
                self.cancel()
                if end is ENDED:
                    raise StopIteration
                raise end
            steps, _ = self.take()
            buffered.extend(steps)
            if not steps and self._end is None:
                wait()
        return buffered.popleft()

    def close(self) -> None:
        self.cancel()

    def cancel(self) -> None:
        self._engine.cancel(self._request)


class BatchEngine:
    def __init__(self, llama, parallel: int | None = None, max_waiting: int = 64, prefill_chunk: int = 64,
                 fuse_chunk: int = 16, reserve_at_start: int = RESERVE_AHEAD):
        self.llama = llama
        self.parallel = parallel or default_parallel()
        if self.parallel < 1:
            raise ValueError(f"parallel must be >= 1 (got {self.parallel})")
        self.max_waiting = max_waiting
        self.prefill_chunk = max(1, prefill_chunk)
        self.fuse_chunk = max(0, min(fuse_chunk, self.prefill_chunk))
        self.n_ctx = int(llama.n_ctx)
        self._slots = [_Slot(llama.create_context()) for _ in range(self.parallel)]
        self._reserver = _Reserver()
        for slot in self._slots:  # in the background: requests are served meanwhile
            self._reserver.reserve(slot, min(self.n_ctx, max(0, reserve_at_start)))
        self._waiting: collections.deque[_Request] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._turn = 0  # which prefilling slot runs its chunk next
        self._woken: dict = {}  # the wakers of the requests that got news this turn (id -> waker)
        vocab = llama.config.vocab_size
        rows = self.parallel + self.fuse_chunk  # the most rows of a decoding step
        self._logits = np.empty((rows, vocab), np.float32)
        self._batch = (ffi.new("llama2_context *[]", rows), ffi.new("int[]", rows), ffi.new("int[]", rows),
                       ffi.from_buffer("float[]", self._logits))
        self._thread = threading.Thread(target=self._serve, name="llama2c-engine", daemon=True)
        self._thread.start()

    # ---- the callers' side ----
    def stats(self) -> dict:
        with self._cond:
            active = sum(s.request is not None for s in self._slots)
            return {"parallel": self.parallel, "active": active, "waiting": len(self._waiting)}

    def run(self, ids: list[int], *, waker=None, **settings) -> Steps:
        """Queues a request and returns its steps. Bad settings raise here;
        so does QueueFull when every slot is busy and the line is full.
        Closing (or dropping) the steps cancels the request. waker: an
        object whose wake() the engine thread calls after each turn that
        made steps for the request (shared by many requests, it is called
        once per turn); the caller then take()s them. Without one, the
        steps are for iterating."""
        waker = waker if waker is not None else ThreadWaker()
        request = _Request(list(ids), TokenLoop(self.llama, ids, self.n_ctx, **settings), waker)
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

    def cancel(self, request: _Request) -> None:
        request.cancel()
        with self._cond:
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=10)
        self._reserver.close()

    # ---- the engine thread ----
    def _serve(self) -> None:
        while True:
            with self._cond:
                self._release_cancelled()
                self._admit()
                while not self._closed and not any(s.request is not None for s in self._slots):
                    self._wake()
                    self._cond.wait()
                    self._release_cancelled()
                    self._admit()
                if self._closed:
                    self._fail_all(QueueFull("the server is shutting down"))
                    self._wake()
                    return
                active = [s for s in self._slots if s.request is not None]
            try:
                chunks = self._next_chunks([s for s in active if s.request is not None and s.request.pending])
                if len(chunks) == 1 and len(chunks[0][1]) > self.fuse_chunk:
                    self._prefill(*chunks[0])
                    chunks = []
                self._decode([s for s in active if s.request is not None and s.request.next_token is not None
                              and not s.request.cancelled], chunks)
            except Exception as e:  # an engine failure ends the requests it touched, not the server
                with self._cond:
                    for s in active:
                        if s.request is not None:
                            self._put(s.request, e)
                            s.request = None
                            s.cached = []
            self._wake()

    def _put(self, request: _Request, item) -> None:
        request.items.append(item)
        self._woken[id(request.waker)] = request.waker

    def _wake(self) -> None:
        """Wakes, once each, the wakers of the requests that got news."""
        if self._woken:
            woken, self._woken = self._woken, {}
            for waker in woken.values():
                waker.wake()

    def _release_cancelled(self) -> None:
        """Frees the slots and places of cancelled requests; their readers,
        if still waiting, get the end of their steps."""
        for s in self._slots:
            if s.request is not None and s.request.cancelled:
                self._put(s.request, None)
                s.request = None
        if any(r.cancelled for r in self._waiting):
            for r in self._waiting:
                if r.cancelled:
                    self._put(r, None)
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
            self._reserver.reserve(slot, len(request.ids) + min(request.loop.budget, RESERVE_AHEAD))

    def _next_chunks(self, slots: list[_Slot]) -> list[tuple[_Slot, list[int]]]:
        """The prompt chunks to run this turn: the prefilling slots take
        turns; the first in turn runs a chunk of up to prefill_chunk tokens
        (in a pass of its own when longer than fuse_chunk); while chunks fit
        in fuse_chunk tokens in all, the next slots' prompts (whole, or what
        fits of one) ride along in the decoding pass."""
        if not slots:
            return []
        self._turn = (self._turn + 1) % len(slots)
        first = slots[self._turn]
        chunks = [(first, first.request.pending[:self.prefill_chunk])]
        room = self.fuse_chunk - len(chunks[0][1])
        for i in range(1, len(slots)):
            if room <= 0:
                break
            slot = slots[(self._turn + i) % len(slots)]
            chunk = slot.request.pending[:room]
            chunks.append((slot, chunk))
            room -= len(chunk)
        return chunks

    def _prefilled(self, slot: _Slot, chunk: list[int], logits) -> None:
        """chunk is in slot's cache; logits: its last token's (delivered at the prompt's end)."""
        slot.cached.extend(chunk)
        request = slot.request
        request.pending = request.pending[len(chunk):]
        if not request.pending:
            self._deliver(slot, logits)

    def _prefill(self, slot: _Slot, chunk: list[int]) -> None:
        """A long chunk in a pass of its own (only the last token's logits)."""
        cx, pos = slot.context, len(slot.cached)
        logits = cx._forward_batch(chunk, pos) if len(chunk) > 1 else cx._forward(chunk[0], pos)
        self._prefilled(slot, chunk, logits)

    def _decode(self, slots: list[_Slot], chunks: list[tuple[_Slot, list[int]]] = ()) -> None:
        """One new token for every generating slot and short prompt chunks
        (chunks: (slot, tokens) at consecutive positions of the slot's
        context, fuse_chunk tokens in all), in one pass."""
        n = len(slots) + sum(len(chunk) for _, chunk in chunks)
        if not n:
            return
        contexts, tokens, positions, logits = self._batch
        for i, s in enumerate(slots):
            contexts[i], tokens[i], positions[i] = s.context._ptr, s.request.next_token, len(s.cached)
        row, ends = len(slots), []
        for slot, chunk in chunks:
            pos = len(slot.cached)
            for j, token in enumerate(chunk):
                contexts[row], tokens[row], positions[row] = slot.context._ptr, token, pos + j
                row += 1
            ends.append(row - 1)
        err = new_error()
        raise_for(lib.llama2_decode_batch(contexts, tokens, positions, n, logits, err), err)
        for i, slot in enumerate(slots):
            slot.cached.append(tokens[i])
            self._deliver(slot, self._logits[i])
        for (slot, chunk), end in zip(chunks, ends):
            self._prefilled(slot, chunk, self._logits[end])

    def _deliver(self, slot: _Slot, logits: np.ndarray) -> None:
        request = slot.request
        steps, token = request.loop.feed(logits)
        request.next_token = token
        self._put(request, steps)
        if token is None:
            with self._cond:
                slot.request = None
                self._cond.notify()

    def _fail_all(self, error: Exception) -> None:
        for s in self._slots:
            if s.request is not None:
                self._put(s.request, error)
                s.request = None
        while self._waiting:
            self._put(self._waiting.popleft(), error)
