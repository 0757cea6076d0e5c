"""How much runs at once and how much may wait, so that load never turns
into an unbounded backlog.

- Generation: the engine holds `parallel` slots and a waiting line of
  `max_waiting` (QueueFull past it: 429). A request holds a worker thread
  only while its builder checks and tokenizes it and queues it in the
  engine (then its steps come to the event loop: driver.py); BUILDERS
  threads do that for all requests (more would only contend for the GIL).
- Embeddings run one at a time in the model's side context; a `Line` bounds
  how many may wait for it (429 past it).
- Tokenize/detokenize and other small jobs share a few threads.
"""
from __future__ import annotations

from contextlib import asynccontextmanager

import anyio

from .errors import queue_full

BUILDERS = 4
SMALL_JOBS = 4


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
