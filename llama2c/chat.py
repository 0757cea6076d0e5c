"""Chat sessions: `ChatSession`, turns of a conversation that keep their KV
cache (a context of the session's own).

Each turn renders the whole conversation with the session's chat template
(llama2c/chat_template.py: Llama 2 by default, ChatML, Zephyr or any
Jinja2 template), tokenized exactly as transformers' apply_chat_template
does, and runs it through the completion loop (llama2c/completion.py),
which only runs the tokens after the part already in the cache. A reply
ends at EOS (or BOS), at one of the template's end-of-turn strings, at a
stop string of the caller's, after its token limit or when the context is
full. Reply text goes through the engine's printable filter, as `run`'s
chat prints it.
"""
from __future__ import annotations

from typing import Iterator

from .completion import Completer, fit_prompt
from .errors import InvalidArgumentError
from .sampler import SamplingParams
from .validate import check_int


class ChatSession:
    """Turns of a chat over `llama` (a Llama), in a context of its own.
    template: a ChatTemplate, a name or a Jinja string (None: llama's)."""

    def __init__(self, llama, system: str | None = None, template=None):
        from .chat_template import ChatTemplate

        if system is not None and not isinstance(system, str):
            raise InvalidArgumentError(f"system must be a str (got {type(system).__name__})")
        self.llama = llama
        self.system = system
        self.template = ChatTemplate.get(template) if template is not None else llama.chat_template
        self.context = llama.create_context()
        self.n_ctx = self.context.n_ctx
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self._completer = Completer(llama, self.context)

    @property
    def pos(self) -> int:
        """Positions of the context filled so far."""
        return len(self._completer.cached)

    @property
    def turns(self) -> int:
        """User turns so far."""
        return sum(m["role"] == "user" for m in self.messages)

    def add_history(self, messages: list[dict]) -> None:
        """Earlier messages of the conversation (user and assistant turns),
        run with the next turn."""
        self.messages.extend(dict(m) for m in messages)

    def stream(self, user: str, *, steps: int | None = None, max_tokens: int | None = None, stop=None,
               sampling: SamplingParams | None = None, **settings) -> Iterator[str]:
        """The reply to one user turn, piece by piece. It ends at EOS, at the
        template's end of turn or a stop string (cut there), after
        max_tokens (or steps, its older name) new tokens (None: when the
        context is full) or when the context is full. Sampling as in
        Session.generate; a fresh sampler per turn sees the conversation's
        last tokens for its repetition penalty. A turn that does not fit the
        context is a ContextLengthError and leaves the session as it was."""
        if not isinstance(user, str):
            raise InvalidArgumentError(f"a user turn is a str (got {type(user).__name__})")
        params = SamplingParams.of(sampling, **settings)
        limit = max_tokens if max_tokens is not None else steps
        limit = None if limit is None else check_int("max_tokens", limit, 0)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        messages = self.messages + [{"role": "user", "content": user}]
        ids = fit_prompt(self.template.tokenize(self.llama.tokenizer, messages, add_generation_prompt=True),
                         self.n_ctx, limit, None)
        return self._reply(messages, ids, limit, list(self.template.stop_strings) + stops, params)

    def _reply(self, messages, ids, limit, stops, params) -> Iterator[str]:
        pieces: list[str] = []
        try:
            if limit == 0:
                return
            for step in self._completer.run(ids, max_tokens=limit, sampling=params, stop=stops, printable=True,
                                            reply=True):
                if step.text:
                    pieces.append(step.text)
                    yield step.text
        finally:  # a reply cut short (the caller stopped reading) stays as far as it went
            self.messages = messages + [{"role": "assistant", "content": "".join(pieces)}]

    def send(self, user: str, **kwargs) -> str:
        return "".join(self.stream(user, **kwargs))
