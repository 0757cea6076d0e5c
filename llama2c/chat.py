"""Chat with the Llama 2 template: `ChatSession` (turns that keep their KV
cache) and `render_chat` (a list of messages split into turns).

The engine is the C session's conversation mode (csrc/session.c,
LLAMA2_MODE_CONVERSATION), the same code that runs the `run` program's
loops: each user turn, `[INST] ... [/INST]` after BOS (the system prompt
inside the first), goes through the model in one batched pass without
drawing samples; the reply is sampled until EOS, which goes in front of the
next turn. Each session owns a context, so nothing else writes its cache.
"""
from __future__ import annotations

from typing import Iterator

from . import _ffi
from ._ffi import ffi, lib
from .errors import InvalidArgumentError, new_error, raise_for
from .sampler import SamplingParams
from .session import _bytes, step_texts
from .validate import check_int


def render_chat(messages: list[dict]) -> list[tuple[str, str | None]]:
    """Splits a conversation into (user text, assistant reply or None) turns,
    the system message folded into the first user text with the Llama 2
    <<SYS>> markup. The last turn must be the user's."""
    system = None
    turns: list[list] = []
    for m in messages:
        role, content = m["role"], m["content"]
        if role == "system":
            if turns or system is not None:
                raise InvalidArgumentError("a system message may only come first")
            system = content
        elif role == "user":
            if turns and turns[-1][1] is None:
                raise InvalidArgumentError("two user messages in a row")
            turns.append([content, None])
        elif role == "assistant":
            if not turns or turns[-1][1] is not None:
                raise InvalidArgumentError("an assistant message must follow a user message")
            turns[-1][1] = content
        else:
            raise InvalidArgumentError(f"unknown role {role!r} (system, user or assistant)")
    if not turns or turns[-1][1] is not None:
        raise InvalidArgumentError("the conversation must end with a user message")
    if system:
        turns[0][0] = f"<<SYS>>\n{system}\n<</SYS>>\n\n{turns[0][0]}"
    return [(u, a) for u, a in turns]


class ChatSession:
    """Turns of a Llama 2 chat over `llama` (a Llama), in a context of its own."""

    def __init__(self, llama, system: str | None):
        self.llama = llama
        self.system = system
        self.context = llama.create_context()
        self.n_ctx = self.context.n_ctx
        self.turns = 0
        self._sampler = SamplingParams().sampler(llama.config.vocab_size)  # until the first turn sets one
        out, err = ffi.new("llama2_session **"), new_error()
        raise_for(lib.llama2_session_new_ctx(out, self.context._ptr, llama.tokenizer._ptr, self._sampler._ptr,
                                             _ffi.MODE_CONVERSATION, ffi.NULL, 0, 0, err), err)
        self._ptr = ffi.gc(out[0], lib.llama2_session_free)

    @property
    def pos(self) -> int:
        """Positions of the context filled so far."""
        return lib.llama2_session_pos(self._ptr)

    def _feed_history(self, user: str, reply: str) -> None:
        """An earlier turn and the assistant's reply to it, fed without sampling."""
        system, u, r = _bytes(self.system or ""), _bytes(user), _bytes(reply.strip())
        err = new_error()
        self.context._enter()
        try:
            raise_for(lib.llama2_session_chat_history(self._ptr, system, len(system), u, len(u), r, len(r), err), err)
            self.turns += 1
            for _ in step_texts(self._ptr):
                pass
        finally:
            self.context._exit()

    def stream(self, user: str, *, steps: int | None = None, sampling: SamplingParams | None = None,
               **settings) -> Iterator[str]:
        """The reply to one user turn, piece by piece; it ends at EOS, after
        `steps` tokens (None: when the context is full) or when the context is
        full. Sampling as in Session.generate; a fresh sampler per turn sees
        the conversation's last tokens for its repetition penalty."""
        params = SamplingParams.of(sampling, **settings)
        limit = -1 if steps is None else check_int("steps", steps, 0)
        sampler = params.sampler(self.llama.config.vocab_size)
        system, u = _bytes(self.system or ""), _bytes(user)
        err = new_error()
        self.context._enter()
        try:
            raise_for(lib.llama2_session_set_sampler(self._ptr, sampler._ptr, err), err)
            self._sampler = sampler  # the session borrows it
            raise_for(lib.llama2_session_set_reply_limit(self._ptr, limit, err), err)
            raise_for(lib.llama2_session_chat_input(self._ptr, system, len(system), u, len(u), err), err)
            self.turns += 1
            yield from step_texts(self._ptr)
        finally:
            self.context._exit()

    def send(self, user: str, **kwargs) -> str:
        return "".join(self.stream(user, **kwargs))
