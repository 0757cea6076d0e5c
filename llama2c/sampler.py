"""The sampler (temperature, top-p) and its xorshift RNG, as in docs/SAMPLING.md."""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from ._ffi import ffi, lib
from .errors import InvalidArgumentError, new_error, raise_for
from .validate import check_int

U64 = (1 << 64) - 1


def as_float(name: str, value) -> float:
    """value as a float; anything else (or an int too big for a float) is an
    InvalidArgumentError."""
    if isinstance(value, bool):
        raise InvalidArgumentError(f"{name} must be a number (got {value!r})")
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        raise InvalidArgumentError(f"{name} must be a number (got {value!r})") from None


def check_settings(temperature: float, topp: float, top_k: int = 0, min_p: float = 0.0,
                   repetition_penalty: float = 1.0) -> tuple[float, float, int, float, float]:
    """The settings checked, as the floats and int C takes (an
    InvalidArgumentError names the first one out of range)."""
    temperature, topp = as_float("temperature", temperature), as_float("topp", topp)
    min_p, repetition_penalty = as_float("min_p", min_p), as_float("repetition_penalty", repetition_penalty)
    if not temperature >= 0.0:
        raise InvalidArgumentError(f"temperature must be >= 0 (got {temperature})")
    if not 0.0 <= topp <= 1.0:
        raise InvalidArgumentError(f"topp must be in [0, 1] (got {topp})")
    top_k = check_int("top_k", top_k, 0)
    if not 0.0 <= min_p <= 1.0:
        raise InvalidArgumentError(f"min_p must be in [0, 1] (got {min_p})")
    if not 0.0 < repetition_penalty < float("inf"):
        raise InvalidArgumentError(f"repetition_penalty must be > 0 and finite (got {repetition_penalty})")
    return temperature, topp, top_k, min_p, repetition_penalty


def normalize_logit_bias(bias) -> tuple:
    """{token: bias} or (token, bias) pairs as sorted (int, float) pairs;
    tokens are C ints, biases numbers or -inf (NaN and +inf are refused)."""
    if not bias:
        return ()
    items = bias.items() if isinstance(bias, dict) else bias
    pairs = {}
    for pair in items:
        try:
            token, value = pair
        except (TypeError, ValueError):
            raise InvalidArgumentError(f"logit_bias entries are (token, bias) pairs (got {pair!r})") from None
        value = as_float("logit_bias value", value)
        if value != value or value == float("inf"):
            raise InvalidArgumentError(f"logit bias of token {token} must be a number or -inf (got {value})")
        pairs[check_int("logit_bias token", int(token) if isinstance(token, str) else token, 0)] = value
    return tuple(sorted(pairs.items()))


def resolve_seed(seed: int | None) -> int:
    """None, 0 or a negative seed: a fresh random seed (the CLI uses the clock)."""
    if seed is None:
        return int.from_bytes(os.urandom(4), "little") or 1
    if isinstance(seed, float) and seed.is_integer():
        seed = int(seed)
    seed = check_int("seed", seed, -(2**1000), 2**1000)  # any size: reduced to 64 bits
    if seed <= 0:
        return int.from_bytes(os.urandom(4), "little") or 1
    return seed & U64


class Sampler:
    """temperature, topp: llama2.c's sampler. top_k, min_p, repetition_penalty
    (over the last repetition_window tokens passed to accept()): extensions,
    off by default."""

    def __init__(self, vocab_size: int, *, temperature: float = 1.0, topp: float = 0.9,
                 seed: int | None = None, top_k: int = 0, min_p: float = 0.0,
                 repetition_penalty: float = 1.0, repetition_window: int = 64, logit_bias=None):
        settings = check_settings(temperature, topp, top_k, min_p, repetition_penalty)
        self.vocab_size = check_int("vocab_size", vocab_size, 1)
        params = ffi.new("llama2_sampler_params *")
        lib.llama2_sampler_params_default(params)
        params.temperature, params.topp, params.topk, params.minp, params.repetition_penalty = settings
        params.repetition_window = check_int("repetition_window", repetition_window, 0)
        out = ffi.new("llama2_sampler **")
        err = new_error()
        raise_for(lib.llama2_sampler_new(out, self.vocab_size, params, resolve_seed(seed), err), err)
        self._ptr = ffi.gc(out[0], lib.llama2_sampler_free)
        bias = normalize_logit_bias(logit_bias)
        if bias:
            raise_for(lib.llama2_sampler_set_logit_bias(self._ptr, ffi.new("int[]", [t for t, _ in bias]),
                                                        ffi.new("float[]", [b for _, b in bias]), len(bias), err), err)

    def sample(self, logits) -> int:
        """Chooses a token; the caller's array is left untouched."""
        buf = np.array(logits, dtype=np.float32, copy=True).ravel()
        if buf.shape[0] != self.vocab_size:
            raise InvalidArgumentError(f"expected {self.vocab_size} logits, got {buf.shape[0]}")
        return self._sample_inplace(buf)

    def _sample_inplace(self, buf: np.ndarray) -> int:
        return lib.llama2_sample(self._ptr, ffi.from_buffer("float[]", buf))

    def accept(self, token: int) -> None:
        """Records a context token for the repetition penalty."""
        lib.llama2_sampler_accept(self._ptr, check_int("token", token))

    @property
    def rng_state(self) -> int:
        return lib.llama2_sampler_rng_state(self._ptr)


def random_u32(state: int) -> tuple[int, int]:
    """One step of the xorshift RNG: (value, new_state)."""
    s = ffi.new("uint64_t *", int(state) & U64)
    value = lib.llama2_random_u32(s)
    return value, s[0]


def random_f32(state: int) -> tuple[float, int]:
    s = ffi.new("uint64_t *", int(state) & U64)
    value = lib.llama2_random_f32(s)
    return value, s[0]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen: the fields of llama2_sampler_params plus
    the seed. The defaults are llama2.c's (temperature 1, top-p 0.9, the
    extensions off). Checked when made: a bad value is an
    InvalidArgumentError. Every call that samples takes `sampling=` (one of
    these) and/or the field names as keywords, which override it."""

    temperature: float = 1.0
    topp: float = 0.9
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repetition_window: int = 64  # how many recent tokens the penalty looks at
    seed: int | None = None  # None, 0 or negative: a fresh random seed
    # token id -> added to its logit before anything else (-inf bans it); a dict
    # or (id, bias) pairs, kept as sorted pairs
    logit_bias: tuple = ()

    def __post_init__(self):
        check_settings(self.temperature, self.topp, self.top_k, self.min_p, self.repetition_penalty)
        check_int("repetition_window", self.repetition_window, 1)
        object.__setattr__(self, "logit_bias", normalize_logit_bias(self.logit_bias))

    @classmethod
    def of(cls, sampling: "SamplingParams | None" = None, **overrides) -> "SamplingParams":
        """sampling (default: the defaults) with the given fields replaced."""
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"unknown sampling setting(s): {', '.join(unknown)}")
        return dataclasses.replace(sampling if sampling is not None else cls(), **overrides)

    def sampler(self, vocab_size: int) -> Sampler:
        return Sampler(vocab_size, temperature=self.temperature, topp=self.topp, seed=resolve_seed(self.seed),
                       top_k=self.top_k, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                       repetition_window=self.repetition_window, logit_bias=self.logit_bias)
