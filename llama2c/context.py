"""A context: one sequence's KV cache over a model's weights.

A `Llama` holds the weights once; each context holds what one sequence
needs (its KV cache and working buffers), so a chat session, a generate()
call and your own forward() calls never overwrite each other's cache.
Memory is committed as positions are reached, so an idle or short context
costs little whatever its n_ctx. One context serves one thread at a time
(calls from other threads wait; the thread that holds it, in an unfinished
stream, gets a StateError); contexts of one model run in parallel.
"""
from __future__ import annotations

import threading

import numpy as np

from ._ffi import ffi, lib
from .errors import StateError, new_error, raise_for
from .validate import INT_MAX, check_int


class Context:
    """Positions 0..n_ctx-1 of one sequence. `model` is the engine's
    llama2_transformer pointer (kept alive through `owner`)."""

    def __init__(self, model, n_ctx: int | None, vocab_size: int, owner=None):
        n = 0 if n_ctx is None else check_int("n_ctx", n_ctx, 1)
        err = new_error()
        out = ffi.new("llama2_context **")
        raise_for(lib.llama2_context_new(out, model, n, err), err)
        self._ptr = ffi.gc(out[0], lib.llama2_context_free)
        self._owner = owner  # the model must outlive its contexts
        self.n_ctx: int = lib.llama2_context_n_ctx(self._ptr)
        self.vocab_size = vocab_size
        self._lock = threading.Lock()
        self._active: int | None = None  # the thread using the context now

    # ---- one call (or one stream) at a time ----
    def _enter(self) -> None:
        """Waits for the context; in the thread that holds it (a stream not
        finished yet) that would never end, so it is a StateError."""
        me = threading.get_ident()
        if self._active == me:
            raise StateError("this context is busy in this thread (an unfinished stream?): finish or close it first")
        self._lock.acquire()
        self._active = me

    def _exit(self) -> None:
        self._active = None
        self._lock.release()

    def _logits(self, ptr) -> np.ndarray:
        return np.frombuffer(ffi.buffer(ptr, 4 * self.vocab_size), dtype=np.float32).copy()

    def forward(self, token: int, pos: int) -> np.ndarray:
        """Logits for token at position pos; positions 0..pos-1 are whatever
        this context's earlier calls put there."""
        token = check_int("token", token)
        pos = check_int("pos", pos)
        err = new_error()
        logits = ffi.new("float **")
        self._enter()
        try:
            raise_for(lib.llama2_context_forward(self._ptr, token, pos, logits, err), err)
            return self._logits(logits[0])
        finally:
            self._exit()

    def forward_batch(self, tokens, pos: int) -> np.ndarray:
        """tokens at positions pos, pos+1, ... in one pass over the weights;
        the last token's logits, bit-identical to forward() token by token."""
        ids = [check_int("token", t) for t in tokens]
        pos = check_int("pos", pos)
        check_int("number of tokens", len(ids), 0, INT_MAX)
        err = new_error()
        logits = ffi.new("float **")
        self._enter()
        try:
            raise_for(lib.llama2_context_forward_batch(self._ptr, ffi.new("int[]", ids), len(ids), pos,
                                                       logits, err), err)
            return self._logits(logits[0])
        finally:
            self._exit()
