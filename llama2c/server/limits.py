"""How much runs at once and how much may wait, so that load never turns
into an unbounded backlog.

- Generation: the engine holds `parallel` slots and a waiting line of
  `max_waiting` (QueueFull past it: 429). Each accepted request holds at
  most one worker thread at a time, so a thread limiter of
  parallel + max_waiting + SPARE never makes an accepted request wait for a
  thread, and new requests get their QueueFull at once.
- Embeddings run one at a time in the model's side context; a `Line` bounds
  how many may wait for it (429 past it).
- Tokenize/detokenize and other small jobs share a few threads.
"""
from __future__ import annotations

from contextlib import asynccontextmanager

import anyio

from .errors import queue_full

SPARE = 16
SMALL_JOBS = 4


def generation_limiter(parallel: int, max_waiting: int) -> anyio.CapacityLimiter:
    return anyio.CapacityLimiter(parallel + max_waiting + SPARE)


class Line:
    """At most `width` holders at once and at most `depth` waiting for a
    turn; one more is refused with a 429 instead of waiting."""

    def __init__(self, width: int, depth: int, what: str):
        self.limiter = anyio.CapacityLimiter(width)
        self.depth, self.what = depth, what
        self.waiting = 0

    @asynccontextmanager
    async def turn(self):
        if self.limiter.available_tokens < 1 and self.waiting >= self.depth:
            raise queue_full(f"{self.waiting} {self.what} requests are waiting already: try again later")
        self.waiting += 1
        try:
            await self.limiter.acquire()
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self.limiter.release()
