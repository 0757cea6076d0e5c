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
        self.dim: int = lib.llama2_transformer_config(model).dim
        self._lock = threading.Lock()
        self._active: int | None = None  # the thread using the context now

    def reserve(self, n_positions: int) -> None:
        """Commits the KV cache memory of positions 0..n_positions-1 now
        (capped at n_ctx) rather than as passes first reach them; the cache's
        contents stay as they are, so any thread may call it, even while the
        context runs. Does nothing where the OS cannot (llama2.h)."""
        err = new_error()
        raise_for(lib.llama2_context_reserve(self._ptr, check_int("n_positions", n_positions, 0), err), err)

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

    def held(self):
        """`with context.held():` holds the context for a sequence of the
        unlocked calls below (_forward, _forward_batch, _eval)."""
        return _Held(self)

    # ---- the calls, unlocked: the caller holds the context ----
    def _forward(self, token: int, pos: int) -> np.ndarray:
        err = new_error()
        logits = ffi.new("float **")
        raise_for(lib.llama2_context_forward(self._ptr, check_int("token", token), check_int("pos", pos), logits,
                                             err), err)
        return self._logits(logits[0])

    def _forward_batch(self, tokens, pos: int) -> np.ndarray:
        ids = [check_int("token", t) for t in tokens]
        check_int("number of tokens", len(ids), 0, INT_MAX)
        err = new_error()
        logits = ffi.new("float **")
        raise_for(lib.llama2_context_forward_batch(self._ptr, ffi.new("int[]", ids), len(ids), check_int("pos", pos),
                                                   logits, err), err)
        return self._logits(logits[0])

    def _eval(self, tokens, pos: int, logits: bool = True, hidden: bool = False):
        ids = [check_int("token", t) for t in tokens]
        n = check_int("number of tokens", len(ids), 0, INT_MAX)
        out_logits = np.empty((n, self.vocab_size), np.float32) if logits else None
        out_hidden = np.empty((n, self.dim), np.float32) if hidden else None
        err = new_error()
        raise_for(lib.llama2_context_eval(
            self._ptr, ffi.new("int[]", ids), n, check_int("pos", pos),
            ffi.from_buffer("float[]", out_logits) if logits else ffi.NULL,
            ffi.from_buffer("float[]", out_hidden) if hidden else ffi.NULL, err), err)
        return out_logits, out_hidden

    # ---- the calls ----
    def forward(self, token: int, pos: int) -> np.ndarray:
        """Logits for token at position pos; positions 0..pos-1 are whatever
        this context's earlier calls put there."""
        with self.held():
            return self._forward(token, pos)

    def forward_batch(self, tokens, pos: int, all_logits: bool = False) -> np.ndarray:
        """tokens at positions pos, pos+1, ... in one pass over the weights;
        the last token's logits, bit-identical to forward() token by token
        (all_logits=True: every token's, an (n, vocab_size) array)."""
        if all_logits:
            return self.eval(tokens, pos)[0]
        with self.held():
            return self._forward_batch(tokens, pos)

    def eval(self, tokens, pos: int, *, logits: bool = True, hidden: bool = False):
        """tokens at positions pos, pos+1, ... in one pass over the weights:
        (logits, hidden), every token's logits (n, vocab_size) and hidden
        state after the final RMSNorm (n, dim), each None unless asked for.
        Row i is bit-identical to forward() of token i."""
        with self.held():
            return self._eval(tokens, pos, logits, hidden)


class _Held:
    def __init__(self, context: Context):
        self.context = context

    def __enter__(self):
        self.context._enter()
        return self.context

    def __exit__(self, *exc):
        self.context._exit()
        return False
