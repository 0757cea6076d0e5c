"""generate() / stream() for models whose tokenizer lives in Python (the
byte-level BPE tokenizers of hf_tokenizer.py): the C session loop
(session.c) needs the C tokenizer, so these run the completion loop
(completion.py: C forward passes, C sampling) with generate's settings.

The differences from session.c, for such models (docs/LLAMA3.md):
generation always stops at the tokenizer's stop ids (EOS, <|eot_id|>,
<|end_of_text|>, every eos_token_id of config.json), whatever stop_at_eos
says; the prompt is encoded with special tokens parsed; the text is the
prompt's decode() followed by the new tokens' bytes (special tokens add
nothing), exactly decode(prompt ids + new ids). The sampler is the same C
sampler with the same settings and seed.
"""
from __future__ import annotations

import codecs
from typing import Iterator

from .completion import Completer, StopText
from .errors import ContextLengthError, InvalidArgumentError
from .sampler import SamplingParams
from .validate import check_int


def python_stream(session, prompt: str, *, steps: int, max_tokens: int | None, stop, sampling: SamplingParams
                  ) -> Iterator[str]:
    """The text of Session.stream for a Python tokenizer, piece by piece:
    the prompt's text first, then each new token's. steps / max_tokens as
    Session.generate (steps: positions, prompt included, 0 = n_ctx)."""
    if not isinstance(prompt, str):
        raise TypeError(f"expected a str, got {type(prompt).__name__}")
    tok = session.llama.tokenizer
    ids = tok.encode(prompt, bos=True, special=True)
    if not ids:
        raise InvalidArgumentError("the prompt has no tokens (this tokenizer adds no BOS): give a prompt")
    n, n_ctx = len(ids), session.n_ctx
    if n > n_ctx:
        raise ContextLengthError(f"the prompt is {n} tokens and the context holds {n_ctx} (create_completion(..., "
                                 "truncate='left') keeps the end of a long prompt)")
    if max_tokens is None:
        steps = check_int("steps", steps, 0)
        new = (steps if 0 < steps <= n_ctx else n_ctx) - n + 1  # run's count: a new token from position n - 1
    else:
        new = check_int("max_tokens", max_tokens, 1)
    stopper = StopText(stop)
    if any(not s for s in ([stop] if isinstance(stop, str) else list(stop or []))):
        raise InvalidArgumentError("stop strings must not be empty")
    return _texts(session, tok, ids, new, stopper, sampling)


def _texts(session, tok, ids, new, stopper, sampling) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text = decoder.decode(tok.decode_bytes(ids))
    if text:
        yield text  # the prompt, as `run` prints it first
    if new <= 0 or len(ids) >= session.n_ctx:
        tail = decoder.decode(b"", final=True)
        if tail:
            yield tail
        return
    steps = Completer(session.llama, session).run(ids, max_tokens=new, sampling=sampling, stop=None,
                                                   stop_tokens=tok.stop_ids)
    try:
        for step in steps:
            if step.token is None:
                continue
            out = stopper.push(decoder.decode(step.token_bytes))
            if out:
                yield out
            if stopper.stopped:
                return
        out = stopper.push(decoder.decode(b"", final=True)) + stopper.flush()
        if out:
            yield out
    finally:
        steps.close()  # releases the context at once, also when the caller stops reading
