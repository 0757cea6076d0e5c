"""Scoring text with the model: per-token log-probabilities, perplexity over
a text of any length with a sliding window, and embeddings.

A window of `window` tokens (default n_ctx) slides by `stride` (default
half the window); each window runs from position 0 of a fresh pass, and
every token is scored once, by the first window that sees it with the most
context before it (token 0, BOS, is never scored). Windows after the first
start mid-text, without BOS, as Hugging Face's sliding-window recipe does.
Log-probabilities are log-softmax of the engine's logits (float64), so
they agree with the PyTorch model (llama2c.model) to float tolerance.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .completion import log_softmax
from .errors import ContextLengthError, InvalidArgumentError
from .validate import check_int

POOLINGS = ("mean", "last")


@dataclass
class Score:
    """tokens: the ids scored (BOS first); token_logprobs[i]: log p(tokens[i] |
    what came before in its window), None for the first."""
    tokens: list[int]
    token_logprobs: list[float | None] = field(default_factory=list)

    @property
    def n_scored(self) -> int:
        return sum(lp is not None for lp in self.token_logprobs)

    @property
    def nll(self) -> float:
        """Mean negative log-likelihood per scored token (nats)."""
        scored = [lp for lp in self.token_logprobs if lp is not None]
        return -math.fsum(scored) / len(scored) if scored else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll) if self.n_scored else float("nan")

    @property
    def perplexity_error(self) -> float:
        """Standard error of the perplexity (delta method over per-token NLLs)."""
        scored = np.array([-lp for lp in self.token_logprobs if lp is not None])
        if scored.size < 2:
            return float("nan")
        return self.perplexity * float(scored.std(ddof=1)) / math.sqrt(scored.size)


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored index) of each window over n tokens
    (1 <= stride < window: consecutive windows overlap)."""
    out, scored_to, begin = [], 1, 0
    while scored_to < n:
        end = min(begin + window, n)
        out.append((begin, end, scored_to))
        scored_to = end
        begin = end - window + stride
    return out


def score_ids(context, ids: list[int], window: int | None = None, stride: int | None = None,
              progress: Callable[[int, int], None] | None = None) -> Score:
    """Scores ids in `context` (a Context, used from position 0)."""
    if len(ids) < 2:
        raise InvalidArgumentError("scoring needs at least two tokens")
    window = context.n_ctx if window is None else check_int("window", window, 2, context.n_ctx)
    stride = max(window // 2, 1) if stride is None else check_int("stride", stride, 1, window - 1)
    result = Score(list(ids), [None] * len(ids))
    spans = windows(len(ids), window, stride)
    for i, (begin, end, first) in enumerate(spans):
        logits, _ = context.eval(ids[begin:end - 1], 0)
        for j in range(first, end):
            lp = log_softmax(logits[j - 1 - begin])
            result.token_logprobs[j] = float(lp[ids[j]])
        if progress is not None:
            progress(i + 1, len(spans))
    return result


def fit_for_embedding(ids: list[int], n_ctx: int, truncate: bool) -> list[int]:
    if len(ids) <= n_ctx:
        return ids
    if not truncate:
        raise ContextLengthError(f"the input is {len(ids)} tokens and the context holds {n_ctx} "
                                 f"(pass truncate=True to embed its first {n_ctx})")
    return ids[:n_ctx]


def embed_ids(context, ids: list[int], pooling: str = "mean", normalize: bool = False) -> np.ndarray:
    """One vector (dim floats) for ids: the final-norm hidden states of the
    tokens, averaged ("mean") or the last token's ("last")."""
    if pooling not in POOLINGS:
        raise InvalidArgumentError(f"pooling must be one of {', '.join(POOLINGS)} (got {pooling!r})")
    _, hidden = context.eval(ids, 0, logits=False, hidden=True)
    vec = hidden.astype(np.float64).mean(axis=0) if pooling == "mean" else hidden[-1].astype(np.float64)
    if normalize:
        norm = np.linalg.norm(vec)
        vec = vec / norm if norm > 0 else vec
    return vec
