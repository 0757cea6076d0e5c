"""OpenAI-shaped results, as llama-cpp-python's `Llama` returns them:
create_completion (text_completion), create_chat_completion
(chat.completion, streamed as chat.completion.chunk) and create_embedding.

Arguments keep llama-cpp-python's names and defaults (temperature 0.8 for
completions and 0.2 for chat, top_p 0.95, top_k 40, min_p 0.05,
repeat_penalty 1.0, max_tokens 16 for completions and "until the context
is full" for chat), so code written for it runs with the import changed.
Settings it has that this engine does not implement (typical_p, tfs_z,
mirostat, grammars, logits processors, tools) are refused with an
InvalidArgumentError when set to anything but their neutral value, never
silently ignored.
"""
from __future__ import annotations

import time
import uuid
from typing import Iterator

from .completion import Step, fit_prompt
from .errors import InvalidArgumentError
from .sampler import SamplingParams, as_float
from .validate import check_int

# llama-cpp-python parameters this engine has no equivalent for, with their neutral values
NEUTRAL = {"typical_p": 1.0, "tfs_z": 1.0, "mirostat_mode": 0, "suffix": None, "grammar": None,
           "logits_processor": None, "stopping_criteria": None, "functions": None, "function_call": None,
           "tools": None, "tool_choice": None, "response_format": None}


def refuse_unsupported(**given) -> None:
    for name, value in given.items():
        neutral = NEUTRAL[name]
        if value is not None and value != neutral:
            raise InvalidArgumentError(f"{name}={value!r} is not supported by llama2c (leave it at {neutral!r})")


def sampling_of(temperature, top_p, top_k, min_p, repeat_penalty, seed, logit_bias) -> SamplingParams:
    return SamplingParams(temperature=temperature, topp=top_p, top_k=top_k, min_p=min_p,
                          repetition_penalty=repeat_penalty, seed=seed, logit_bias=logit_bias or ())


def check_max_tokens(max_tokens) -> int | None:
    """None or <= 0: until the context is full (as llama-cpp-python)."""
    if max_tokens is None:
        return None
    return check_int("max_tokens", max_tokens)


def check_logprobs(logprobs) -> int | None:
    if logprobs is None or logprobs is False:
        return None
    if logprobs is True:
        return 0
    return check_int("logprobs", logprobs, 0, 1 << 20)


def prompt_ids(llama, prompt) -> tuple[list[int], str]:
    """A str prompt (tokenized with BOS) or a list of token ids; and its text."""
    if isinstance(prompt, str):  # special tokens parsed, as llama-cpp-python's completions (BPE tokenizers)
        return llama.tokenize(prompt, special=True), prompt
    if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        vocab = llama.config.vocab_size
        for t in prompt:
            if not 0 <= t < vocab:
                raise InvalidArgumentError(f"token {t} out of range [0, {vocab})")
        return list(prompt), llama.detokenize(prompt)
    raise InvalidArgumentError("prompt must be a str or a list of token ids")


def _now_id(prefix: str) -> tuple[str, int]:
    return f"{prefix}-{uuid.uuid4().hex}", int(time.time())


class CompletionLogprobs:
    """The OpenAI completion `logprobs` object, built token by token."""

    def __init__(self, llama, offset: int):
        self.llama = llama
        self.offset = offset
        self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []

    def token_text(self, token: int) -> str:
        return self.llama.tokenizer.token_bytes(0, token).decode("utf-8", errors="replace")

    def add(self, text: str, logprob, top, emitted: str) -> None:
        """One token: its text, logprob and top alternatives ((id, logprob)
        pairs); `emitted` is the output text before it (for text_offset)."""
        self.tokens.append(text)
        self.token_logprobs.append(logprob)
        self.text_offset.append(self.offset + len(emitted))
        if top is None:
            self.top_logprobs.append(None)
        else:
            alternatives = {self.token_text(t): lp for t, lp in top}
            alternatives.setdefault(text, logprob)
            self.top_logprobs.append(alternatives)

    def as_dict(self, since: int = 0) -> dict:
        return {"tokens": self.tokens[since:], "text_offset": self.text_offset[since:],
                "token_logprobs": self.token_logprobs[since:], "top_logprobs": self.top_logprobs[since:]}


def create_completion(llama, prompt, suffix=None, max_tokens: int | None = 16, temperature: float = 0.8,
                      top_p: float = 0.95, min_p: float = 0.05, typical_p: float = 1.0, logprobs: int | None = None,
                      echo: bool = False, stop=None, frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
                      repeat_penalty: float = 1.0, top_k: int = 40, stream: bool = False, seed: int | None = None,
                      tfs_z: float = 1.0, mirostat_mode: int = 0, mirostat_tau: float = 5.0,
                      mirostat_eta: float = 0.1, model: str | None = None, stopping_criteria=None,
                      logits_processor=None, grammar=None, logit_bias=None, truncate: str | None = None,
                      runner=None):
    """A text completion: a dict shaped as OpenAI's text_completion, or with
    stream=True an iterator of chunks of that shape (the last one carries
    finish_reason). See Llama.create_completion. runner: what generates
    (Completer.run's signature; default llama's own completer, the server
    passes its batch engine's)."""
    refuse_unsupported(suffix=suffix, typical_p=typical_p, tfs_z=tfs_z, mirostat_mode=mirostat_mode,
                       stopping_criteria=stopping_criteria, logits_processor=logits_processor, grammar=grammar)
    sampling = sampling_of(temperature, top_p, top_k, min_p, repeat_penalty, seed, logit_bias)
    max_tokens, k = check_max_tokens(max_tokens), check_logprobs(logprobs)
    penalties = (as_float("presence_penalty", presence_penalty), as_float("frequency_penalty", frequency_penalty))
    given, prompt_text = prompt_ids(llama, prompt)
    ids = fit_prompt(given, llama.n_ctx, max_tokens, truncate, bos=llama.token_bos())
    if len(ids) != len(given):  # truncated: the text that went in
        prompt_text = llama.detokenize(ids)
    cid, created = _now_id("cmpl")
    completer = llama._completer()
    shape = _CompletionShape(llama, cid, created, model or llama.model_path, prompt_text if echo else "", len(ids),
                             k, offset=0 if echo else len(prompt_text))
    if echo and k is not None:
        shape.add_prompt(ids, completer.prompt_logprobs(ids, k))
    steps = (runner or completer.run)(ids, max_tokens=max_tokens, sampling=sampling, stop=stop, logprobs=k,
                          presence_penalty=penalties[0], frequency_penalty=penalties[1])
    return ChunkStream(shape, steps) if stream else shape.whole(steps)


class _CompletionShape:
    """Steps -> the text_completion dict, whole or as stream chunks."""

    def __init__(self, llama, cid, created, model, echo_text, n_prompt, k, offset):
        self.llama, self.cid, self.created, self.model = llama, cid, created, model
        self.echo_text, self.n_prompt = echo_text, n_prompt
        self.logprobs = CompletionLogprobs(llama, offset) if k is not None else None
        self.text = ""
        self.n_completion = 0
        self.seen = 0  # logprobs entries already sent in a chunk

    def add_prompt(self, ids, scored) -> None:
        """The echoed prompt's tokens and their (logprob, top) pairs (the
        first token's are None: nothing comes before it)."""
        tok, emitted, prev = self.llama.tokenizer, "", 0
        for token, (lp, top) in zip(ids, scored):
            text = tok.token_bytes(prev, token).decode("utf-8", errors="replace")
            self.logprobs.add(text, lp, top, emitted)
            emitted += text
            prev = token

    def _record(self, step: Step) -> None:
        if step.token is not None:
            self.n_completion += 1
            if self.logprobs is not None:
                self.logprobs.add(step.token_text, step.logprob, step.top, self.echo_text + self.text)
        self.text += step.text

    def _body(self, text: str, logprobs, finish_reason) -> dict:
        return {"id": self.cid, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish_reason}]}

    def whole(self, steps) -> dict:
        finish = None
        for step in steps:
            self._record(step)
            finish = step.finish_reason or finish
        body = self._body(self.echo_text + self.text, self.logprobs.as_dict() if self.logprobs else None, finish)
        body["usage"] = {"prompt_tokens": self.n_prompt, "completion_tokens": self.n_completion,
                         "total_tokens": self.n_prompt + self.n_completion}
        return body

    def first_chunks(self) -> list[dict]:
        """The chunks before any step: the echoed prompt, if asked for."""
        if not self.echo_text:
            return []
        lp = self.logprobs.as_dict() if self.logprobs else None
        self.seen = len(self.logprobs.tokens) if self.logprobs else 0
        return [self._body(self.echo_text, lp, None)]

    def step_chunks(self, step: Step) -> list[dict]:
        """The chunks of one step (none while a stop string's start is held back)."""
        self._record(step)
        lp = None
        if self.logprobs is not None:
            lp, self.seen = self.logprobs.as_dict(self.seen), len(self.logprobs.tokens)
        if step.text or step.finish_reason or (lp and lp["tokens"]):
            return [self._body(step.text, lp, step.finish_reason)]
        return []


class ChunkStream:
    """A streamed result (stream=True): an iterator of chunk dicts that
    pulls its runner's steps as it goes. A caller that gets the steps some
    other way (the server, whose engine pushes them) asks for the chunks
    step by step instead (`first`, then `chunks_of` each step), or for the
    whole, non-streamed result of all the steps (`whole`): one of the three
    ways per stream. close() ends the steps (and frees what they hold)."""

    def __init__(self, shape, steps):
        self.shape, self.steps = shape, steps
        self._pulled: Iterator[dict] | None = None

    def __iter__(self) -> "ChunkStream":
        return self

    def __next__(self) -> dict:
        if self._pulled is None:
            self._pulled = _pull(self.shape, self.steps)  # (not a method: no cycle through self)
        return next(self._pulled)

    def first(self) -> list[dict]:
        return self.shape.first_chunks()

    def chunks_of(self, step: Step) -> list[dict]:
        return self.shape.step_chunks(step)

    def whole(self, steps) -> dict:
        return self.shape.whole(steps)

    def close(self) -> None:
        if self._pulled is not None:
            self._pulled.close()
        close = getattr(self.steps, "close", None)
        if close is not None:
            close()


def _pull(shape, steps) -> Iterator[dict]:
    """A ChunkStream's chunks, pulling its steps: dropped, it closes the
    steps at once (a Completer's releases its context)."""
    yield from shape.first_chunks()
    for step in steps:
        yield from shape.step_chunks(step)
