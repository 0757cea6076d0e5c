"""RoPE frequency scaling (`RopeScaling`): Hugging Face's ``rope_scaling`` /
``rope_parameters`` of type "linear" or "llama3" (Llama 3.1 and later), as
ModelArgs carries it, .bin files (versions 3-5) store it and the C engine
applies it (csrc/rope.c: each frequency of a head divided by its divisor).
Plain Python: no numpy, no torch. docs/LLAMA3.md.
"""
from __future__ import annotations

import dataclasses
import math
import struct

__all__ = ["RopeScaling", "TYPE_CODES"]

# the uint8 at byte 48 of a version 3-5 header (0: none); llama2_config.rope_scaling
TYPE_CODES = {"linear": 1, "llama3": 2}
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
# header bytes 48..67: uint8 type, 3 zero bytes, float factor, low, high, int32 original context
HEADER_OFFSET = 48
_LAYOUT = "<B3xfffi"


def _positive(name: str, v, where: str) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: rope scaling {name} = {v!r} is not a number") from None
    if not (math.isfinite(f) and f > 0):
        raise ValueError(f"{where}: rope scaling {name} must be finite and positive (got {v!r})")
    return f


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """type "linear" (every frequency / factor) or "llama3" (Llama 3.1's
    per-frequency divisors from factor, low_freq_factor, high_freq_factor
    and original_max_position_embeddings)."""
    type: str
    factor: float
    low_freq_factor: float = 0.0
    high_freq_factor: float = 0.0
    original_max_position_embeddings: int = 0

    def __post_init__(self):
        self.check()

    def check(self, where: str = "rope scaling") -> None:
        if self.type not in TYPE_CODES:
            raise ValueError(f"{where}: rope scaling type {self.type!r} is not supported "
                             f"(llama2c runs {', '.join(TYPE_CODES)})")
        _positive("factor", self.factor, where)
        if self.type == "llama3":
            low = _positive("low_freq_factor", self.low_freq_factor, where)
            high = _positive("high_freq_factor", self.high_freq_factor, where)
            if not high > low:
                raise ValueError(f"{where}: llama3 rope scaling needs high_freq_factor > low_freq_factor "
                                 f"(got {high:g} and {low:g})")
            orig = self.original_max_position_embeddings
            if isinstance(orig, bool) or not isinstance(orig, int) or orig <= 0:
                raise ValueError(f"{where}: llama3 rope scaling needs a positive integer "
                                 f"original_max_position_embeddings (got {orig!r})")

    # ---- Hugging Face config.json ----
    @classmethod
    def from_hf(cls, rp, where: str = "config.json") -> "RopeScaling | None":
        """A config.json's rope_scaling / rope_parameters dict (None, or type
        "default": no scaling). Other types are a ValueError naming them."""
        if rp is None:
            return None
        if not isinstance(rp, dict):
            raise ValueError(f"{where}: rope_scaling must be an object (got {type(rp).__name__})")
        kind = rp.get("rope_type", rp.get("type", "default"))
        if kind in (None, "default"):
            return None
        if kind == "linear":
            return cls("linear", _positive("factor", rp.get("factor"), where))
        if kind == "llama3":  # every key required, as transformers' own validation does
            missing = [k for k in _LLAMA3_KEYS if rp.get(k) is None]
            if missing:
                raise ValueError(f"{where}: llama3 rope scaling without {', '.join(missing)}")
            orig = rp["original_max_position_embeddings"]
            if isinstance(orig, float) and orig.is_integer():
                orig = int(orig)
            return cls("llama3", _positive("factor", rp["factor"], where),
                       _positive("low_freq_factor", rp["low_freq_factor"], where),
                       _positive("high_freq_factor", rp["high_freq_factor"], where), orig)
        raise ValueError(f"{where}: rope scaling {kind!r} is not supported (llama2c runs linear and llama3)")

    def to_hf(self) -> dict:
        """The rope_scaling object of config.json."""
        if self.type == "linear":
            return {"rope_type": "linear", "factor": float(self.factor)}
        return {"rope_type": "llama3", "factor": float(self.factor), "low_freq_factor": float(self.low_freq_factor),
                "high_freq_factor": float(self.high_freq_factor),
                "original_max_position_embeddings": int(self.original_max_position_embeddings)}

    # ---- .bin header (versions 3-5) ----
    def pack(self) -> bytes:
        """Header bytes 48..67 (docs/FORMAT.md)."""
        return struct.pack(_LAYOUT, TYPE_CODES[self.type], self.factor, self.low_freq_factor,
                           self.high_freq_factor, int(self.original_max_position_embeddings))

    @classmethod
    def unpack(cls, header: bytes, where: str = "model file") -> "RopeScaling | None":
        """The scaling stored in a version 3-5 header (None: type 0)."""
        code, factor, low, high, orig = struct.unpack_from(_LAYOUT, header, HEADER_OFFSET)
        if code == 0:
            return None
        names = {v: k for k, v in TYPE_CODES.items()}
        if code not in names:
            raise ValueError(f"{where}: unknown rope scaling type {code} at header byte {HEADER_OFFSET} "
                             "(known: 0 none, 1 linear, 2 llama3)")
        if names[code] == "linear":
            return cls("linear", factor)
        return cls("llama3", factor, low, high, orig)

    # ---- the math ----
    def divisors(self, head_size: int, rope_theta: float) -> list[float]:
        """Each frequency's divisor (head_size / 2 of them), as csrc/rope.c
        computes them (double precision; llama.cpp's converter writes the
        same numbers as a GGUF's rope_freqs tensor)."""
        n = head_size // 2
        if self.type == "linear":
            return [float(self.factor)] * n
        old, low, high, factor = (float(self.original_max_position_embeddings), float(self.low_freq_factor),
                                  float(self.high_freq_factor), float(self.factor))
        out = []
        for j in range(n):
            wavelen = 2 * math.pi * float(rope_theta) ** (2 * j / head_size)
            if wavelen < old / high:
                out.append(1.0)
            elif wavelen > old / low:
                out.append(factor)
            else:
                smooth = (old / wavelen - low) / (high - low)
                out.append(1.0 / ((1 - smooth) / factor + smooth))
        return out
