"""The sampler (temperature, top-p) and its xorshift RNG, as in SPEC.md section 5."""
from __future__ import annotations

import os

import numpy as np

from ._ffi import ffi, lib
from .errors import InvalidArgumentError, new_error, raise_for

U64 = (1 << 64) - 1


def check_settings(temperature: float, topp: float) -> None:
    if not temperature >= 0.0:
        raise InvalidArgumentError(f"temperature must be >= 0 (got {temperature})")
    if not 0.0 <= topp <= 1.0:
        raise InvalidArgumentError(f"topp must be in [0, 1] (got {topp})")


def resolve_seed(seed: int | None) -> int:
    """None, 0 or a negative seed: a fresh random seed (the CLI uses the clock)."""
    if seed is None or int(seed) <= 0:
        return int.from_bytes(os.urandom(4), "little") or 1
    return int(seed) & U64


class Sampler:
    def __init__(self, vocab_size: int, *, temperature: float = 1.0, topp: float = 0.9,
                 seed: int | None = None):
        check_settings(temperature, topp)
        self.vocab_size = int(vocab_size)
        params = ffi.new("llama2_sampler_params *", {"temperature": temperature, "topp": topp})
        out = ffi.new("llama2_sampler **")
        err = new_error()
        raise_for(lib.llama2_sampler_new(out, self.vocab_size, params, resolve_seed(seed), err), err)
        self._ptr = ffi.gc(out[0], lib.llama2_sampler_free)

    def sample(self, logits) -> int:
        """Chooses a token; the caller's array is left untouched."""
        buf = np.array(logits, dtype=np.float32, copy=True).ravel()
        if buf.shape[0] != self.vocab_size:
            raise InvalidArgumentError(f"expected {self.vocab_size} logits, got {buf.shape[0]}")
        return self._sample_inplace(buf)

    def _sample_inplace(self, buf: np.ndarray) -> int:
        return lib.llama2_sample(self._ptr, ffi.from_buffer("float[]", buf))

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
