"""A generation session: a context (one KV cache) with generate() and
stream() on top of forward() and forward_batch().

`Llama.session()` makes one; `Llama.generate()` and `Llama.stream()` run in
one of their own. Each generate() or stream() starts at position 0 (prompt
included), exactly as the `run` program does, and drives the C session loop
(session.c) one token per call.
"""
from __future__ import annotations

import codecs
from typing import Iterator

from . import _ffi
from ._ffi import ffi, lib
from .context import Context
from .errors import ContextLengthError, InvalidArgumentError, new_error, raise_for
from .sampler import SamplingParams
from .validate import check_int


def _text(text: str) -> str:
    if not isinstance(text, str):
        raise TypeError(f"expected a str, got {type(text).__name__}")
    return text


def _bytes(text: str) -> bytes:
    return _text(text).encode("utf-8")


def step_texts(session) -> Iterator[str]:
    """Steps a C session (llama2_session *) until it stops producing tokens
    (done, or a chat waiting for the user) and yields its text as it comes,
    UTF-8 decoded across steps."""
    step, err = ffi.new("llama2_step *"), new_error()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while True:
        raise_for(lib.llama2_session_step(session, step, err), err)
        text = decoder.decode(ffi.unpack(step.text, step.text_len)) if step.text_len else ""
        if text:
            yield text
        if step.kind != _ffi.STEP_TOKEN:
            break
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail


class Session(Context):
    """A context of `llama` (a Llama) that generates text."""

    def __init__(self, llama, n_ctx: int | None = None):
        super().__init__(llama._ptr, llama.n_ctx if n_ctx is None else n_ctx, llama.config.vocab_size, owner=llama)
        self.llama = llama

    def _python_tokenizer(self) -> bool:
        """The model's tokenizer is a Python one (BPE): session.c cannot
        run it; generate / stream go through text_loop.py (docs/LLAMA3.md)."""
        return getattr(self.llama.tokenizer, "kind", "c") == "bpe"

    def _steps(self, prompt: str, steps: int, max_tokens: int | None) -> int:
        """run's step count for these settings: steps as given (positions,
        prompt included, 0 = n_ctx) or, with max_tokens, enough for that many
        new tokens. A prompt longer than the context is a ContextLengthError."""
        n = len(self.llama.tokenize(_text(prompt)))
        if n > self.n_ctx:
            raise ContextLengthError(
                f"the prompt is {n} tokens and the context holds {self.n_ctx} (create_completion(..., "
                f"truncate='left') keeps the end of a long prompt)")
        if max_tokens is None:
            return check_int("steps", steps, 0)
        max_tokens = check_int("max_tokens", max_tokens, 1)
        return min(n - 1 + max_tokens, self.n_ctx)  # run prints a new token at position n - 1 on

    def _session(self, prompt: str, steps: int, sampling: SamplingParams, stop, stop_at_eos: bool):
        steps = check_int("steps", steps, 0)
        tok = self.llama.tokenizer
        sampler = sampling.sampler(self.vocab_size)
        data = _bytes(prompt)
        out = ffi.new("llama2_session **")
        err = new_error()
        raise_for(lib.llama2_session_new_ctx(out, self._ptr, tok._ptr, sampler._ptr,
                                             _ffi.MODE_GENERATE, data, len(data), steps, err), err)
        session = ffi.gc(out[0], lib.llama2_session_free)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if stops or stop_at_eos:
            encoded = [_bytes(x) for x in stops]
            if any(not b for b in encoded):
                raise InvalidArgumentError("stop strings must not be empty")
            keep = [ffi.new("char[]", b) for b in encoded]
            raise_for(lib.llama2_session_set_stops(session, int(bool(stop_at_eos)), ffi.new("char *[]", keep),
                                                   ffi.new("size_t[]", [len(b) for b in encoded]),
                                                   len(encoded), err), err)
        # the C session borrows the sampler and this context: both outlive it
        return session, sampler

    def generate(self, prompt: str = "", *, steps: int = 256, max_tokens: int | None = None,
                 stop: str | list[str] | None = None, stop_at_eos: bool = False,
                 sampling: SamplingParams | None = None, **settings) -> str:
        """The text `run` prints for these settings (prompt included), without
        its final newline. steps: positions, prompt included, as run's -n
        (0 means n_ctx); or max_tokens: the number of new tokens (at most
        what fits the context). A prompt longer than the context is a
        ContextLengthError. Sampling: `sampling` and/or
        SamplingParams fields as keywords (temperature, topp, seed, top_k,
        min_p, repetition_penalty, repetition_window). top_k, min_p, the
        repetition penalty, stop strings and stop_at_eos are extensions, off
        by default so outputs stay comparable with llama2.c."""
        sampling = SamplingParams.of(sampling, **settings)
        if self._python_tokenizer():  # a BPE tokenizer: the completion loop (text_loop.py)
            return "".join(self.stream(prompt, steps=steps, max_tokens=max_tokens, stop=stop, sampling=sampling))
        steps = self._steps(prompt, steps, max_tokens)
        self._enter()
        try:
            session, _sampler = self._session(prompt, steps, sampling, stop, stop_at_eos)
            text = ffi.new("char **")
            length = ffi.new("size_t *")
            err = new_error()
            raise_for(lib.llama2_session_run(session, text, length, ffi.NULL, err), err)
            try:
                return ffi.unpack(text[0], length[0]).decode("utf-8", errors="replace")
            finally:
                lib.llama2_free(text[0])
        finally:
            self._exit()

    def stream(self, prompt: str = "", *, steps: int = 256, max_tokens: int | None = None,
               stop: str | list[str] | None = None, stop_at_eos: bool = False,
               sampling: SamplingParams | None = None, **settings) -> Iterator[str]:
        """Yields the same text as generate(), piece by piece as it is made."""
        sampling = SamplingParams.of(sampling, **settings)
        if self._python_tokenizer():
            from .text_loop import python_stream

            yield from python_stream(self, prompt, steps=steps, max_tokens=max_tokens, stop=stop, sampling=sampling)
            return
        steps = self._steps(prompt, steps, max_tokens)
        self._enter()
        try:
            session, _sampler = self._session(prompt, steps, sampling, stop, stop_at_eos)
            yield from step_texts(session)
        finally:
            self._exit()

