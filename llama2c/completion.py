"""The token loop of the OpenAI-shaped calls (create_completion,
create_chat_completion, chat sessions): prompt ids in, one `Step` per new
token out, with its text, log-probabilities and why generation ended.

It runs in a `Context` and remembers which tokens that context's KV cache
holds, so a prompt that starts like the previous one (a chat's history, a
repeated instruction) is only run from where they differ; the cache holds
exactly what a fresh run would put there (batched and single-token passes
are bit-identical), so reuse never changes a result.

Logits come from the engine; sampling is the C sampler's (llama2_sample,
with top-k, top-p, min-p, temperature, repetition penalty and logit bias).
Log-probabilities are computed from the model's raw logits, before any
sampling transform (penalties, bias, temperature, truncation).
"""
from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from ._ffi import ffi, lib
from .errors import ContextLengthError, InvalidArgumentError
from .sampler import SamplingParams
from .tokenizer import BOS, EOS

TRUNCATE_MODES = (None, "left")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p for each token (float64) from raw logits."""
    z = logits.astype(np.float64)
    z -= z.max()
    return z - np.log(np.exp(z).sum())


def top_alternatives(logprobs: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k most likely tokens as (id, logprob), most likely first (ties: lower id first)."""
    if k <= 0:
        return []
    k = min(k, logprobs.shape[0])
    idx = np.argpartition(-logprobs, k - 1)[:k]
    order = sorted(idx.tolist(), key=lambda i: (-logprobs[i], i))
    return [(i, float(logprobs[i])) for i in order]


def fit_prompt(ids: list[int], n_ctx: int, max_tokens: int | None, truncate: str | None, bos: int = BOS
               ) -> list[int]:
    """ids if they leave room for at least one new token in n_ctx positions;
    otherwise a ContextLengthError, or with truncate="left" the prompt's end
    (BOS kept in front: bos, the model's BOS id) in at most
    n_ctx - min(max_tokens, n_ctx // 2) tokens."""
    if truncate not in TRUNCATE_MODES:
        raise InvalidArgumentError(f"truncate must be None or 'left' (got {truncate!r})")
    if len(ids) < n_ctx:
        return ids
    if truncate is None:
        raise ContextLengthError(
            f"the prompt's {len(ids)} tokens do not fit the context of {n_ctx} with room for a new token "
            f"(at most {n_ctx - 1}): pass truncate='left' to keep the end of the prompt, or a larger n_ctx")
    room = min(max_tokens if max_tokens and max_tokens > 0 else n_ctx // 2, n_ctx // 2)
    keep = max(n_ctx - max(room, 1), 1)
    head = [bos] if ids and ids[0] == bos else []
    return head + ids[len(ids) - (keep - len(head)):] if keep > len(head) else ids[-keep:]


@dataclass
class Step:
    """One new token: its id, the text it releases (stop-string hold-back
    applied), its logprob and top alternatives (when asked), and, on the
    last step, why generation ended ("stop" or "length")."""
    token: int | None
    text: str = ""
    token_text: str = ""
    token_bytes: bytes = b""
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)
    finish_reason: str | None = None


class StopText:
    """Cuts the output at the first stop string; holds back text that could
    still turn out to be the start of one."""

    def __init__(self, stops):
        stops = [stops] if isinstance(stops, str) else list(stops or [])
        for s in stops:
            if not isinstance(s, str):
                raise InvalidArgumentError(f"stop strings must be str (got {type(s).__name__})")
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """The part of text (plus what was held) that is safe to emit."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.pending, self.stopped = self.pending[:cut], "", True
            return out
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class PrintableText:
    """Bytes to text through the engine's output filter (llama2_utf8_filter:
    what `run`'s chat prints), with the incremental decoder's interface."""

    def __init__(self):
        self.state = ffi.new("llama2_utf8_filter *")
        lib.llama2_utf8_filter_reset(self.state)

    def decode(self, data: bytes) -> str:
        if not data:
            return ""
        out = ffi.new("char[]", len(data) + 4)
        n = lib.llama2_utf8_filter_push(self.state, data, len(data), out)
        return ffi.unpack(out, n).decode("utf-8", errors="replace")


class Completer:
    """Generates in `context` (a Context of `llama`), reusing the cached
    prefix between calls. One call at a time (the context's lock)."""

    def __init__(self, llama, context):
        self.llama = llama
        self.context = context
        self.cached: list[int] = []  # the tokens at positions 0.. of the KV cache

    def prefill(self, ids: list[int]) -> np.ndarray:
        """Runs ids from where the cache first differs (the last token at
        least) and returns the last token's logits; the caller holds the
        context."""
        same = matching_prefix(self.cached, ids)
        self.cached = self.cached[:same]
        rest = ids[same:]
        cx = self.context
        logits = cx._forward_batch(rest, same) if len(rest) > 1 else cx._forward(rest[0], same)
        self.cached = list(ids)
        return logits

    def prompt_logprobs(self, ids: list[int], k: int) -> list[tuple[float | None, list | None]]:
        """(logprob, top k alternatives) of each prompt token given the ones
        before it, from one pass over the whole prompt; (None, None) for the
        first. The cache then holds ids."""
        with self.context.held():
            self.cached = []
            logits, _ = self.context._eval(ids, 0)
            self.cached = list(ids)
        out: list[tuple[float | None, list | None]] = [(None, None)]
        for i in range(1, len(ids)):
            lp = log_softmax(logits[i - 1])
            out.append((float(lp[ids[i]]), top_alternatives(lp, k)))
        return out

    def run(self, ids: list[int], **settings) -> Iterator[Step]:
        """New tokens after ids (see TokenLoop for the settings), run in this
        completer's context from where its cache differs."""
        loop = TokenLoop(self.llama, ids, self.context.n_ctx, **settings)
        with self.context.held():
            logits = self.prefill(ids)
            while True:
                steps, token = loop.feed(logits)
                yield from steps
                if token is None:
                    return
                logits = self.context._forward(token, len(self.cached))
                self.cached.append(token)


def matching_prefix(cached: list[int], ids: list[int]) -> int:
    """How many leading tokens of ids the cache already holds (the last
    token of ids always runs again: its logits are needed)."""
    same, limit = 0, min(len(cached), len(ids) - 1)
    while same < limit and cached[same] == ids[same]:
        same += 1
    return same


class TokenLoop:
    """One request's generation, fed one logits row at a time: sampling,
    log-probabilities, stop tokens and strings, text, the token budget.
    Completer.run drives it in one context; the server's batch engine drives
    many at once."""

    def __init__(self, llama, ids: list[int], n_ctx: int, *, max_tokens: int | None, sampling: SamplingParams,
                 stop=None, logprobs: int | None = None, presence_penalty: float = 0.0,
                 frequency_penalty: float = 0.0, stop_tokens=None, printable: bool = False,
                 reply: bool = False):
        """New tokens after ids (which must fit: see fit_prompt) until a stop
        token (not emitted), a stop string (cut, not emitted), max_tokens
        (None or <= 0: until the context is full) or the end of the context.
        stop_tokens None: the tokenizer's stop_ids (a BPE tokenizer: EOS,
        <|eot_id|>, ...), else EOS and BOS.
        printable: the text goes through the engine's output filter (chat:
        control bytes and broken UTF-8 dropped, as `run` prints); reply: the
        first token's leading space goes (a chat reply after its prompt)."""
        if not ids:
            raise InvalidArgumentError("the prompt has no tokens (an empty prompt still has BOS)")
        self.tok = llama.tokenizer
        self.budget = n_ctx - len(ids)
        if max_tokens is not None and max_tokens > 0:
            self.budget = min(self.budget, max_tokens)
        self.stopper = StopText(stop)
        self.sampler = sampling.sampler(llama.config.vocab_size)
        for t in ids[-sampling.repetition_window:]:
            self.sampler.accept(t)
        self.k = logprobs
        self.penalties = (presence_penalty, frequency_penalty)
        if stop_tokens is None:
            stop_tokens = getattr(self.tok, "stop_ids", (EOS, BOS))
        self.stop_tokens = tuple(stop_tokens)
        self.counts: dict[int, int] = {}
        self.decoder = PrintableText() if printable else codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.prev = BOS if reply else ids[-1]
        self.made = 0

    def _end(self, reason: str) -> Step:
        return Step(None, self.stopper.flush(), finish_reason=reason)  # an unfinished UTF-8 character is dropped

    def feed(self, logits: np.ndarray) -> tuple[list[Step], int | None]:
        """The steps these logits (the last token's, a float32 array the loop
        may modify) make, and the token to run next (None: finished)."""
        if self.made >= self.budget:
            return [self._end("length")], None
        lp = log_softmax(logits) if self.k is not None else None
        presence, frequency = self.penalties
        if self.counts and (presence or frequency):
            seen = np.fromiter(self.counts, dtype=np.int64)
            logits[seen] -= np.float32(presence) + np.float32(frequency) * np.fromiter(
                self.counts.values(), dtype=np.float32)
        token = self.sampler._sample_inplace(logits)
        self.sampler.accept(token)
        self.made += 1
        if token in self.stop_tokens:
            return [self._end("stop")], None
        self.counts[token] = self.counts.get(token, 0) + 1
        raw = self.tok.token_bytes(self.prev, token)
        step = Step(token, self.stopper.push(self.decoder.decode(raw)), raw.decode("utf-8", errors="replace"), raw)
        if lp is not None:
            step.logprob = float(lp[token])
            step.top = top_alternatives(lp, self.k)
        if self.stopper.stopped:
            step.finish_reason = "stop"
            return [step], None
        self.prev = token
        if self.made >= self.budget:
            return [step, self._end("length")], None
        return [step], token
