"""The results of a benchmark run: `Row`, one model x weight type x thread
count with every sample of both engines, and `Row.summary()`: the medians and
the ratios ours / llama.cpp that the table shows. Rows round-trip through the
JSON output (dataclasses.asdict / Row(**fields)), which --merge relies on."""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field


@dataclass
class Row:
    """One table row: a model, weight type and thread count, every sample
    (tokens/s) of both engines, and when / under what load it finished."""
    model: str
    weights: str              # "fp32" / "int8" / "bf16" / "q4_0"
    ref_type: str | None      # "f32" / "q8_0" / "f16" / "q4_0" or None
    threads: int
    decode_tokens: int
    prompt_tokens: int
    prefill_batched: bool
    load: float | None = None  # 1-minute load average when the row finished
    when: str = ""             # when the row finished (ISO, seconds)
    ours_decode: list = field(default_factory=list)
    ours_prefill: list = field(default_factory=list)
    ref_decode: list = field(default_factory=list)
    ref_prefill: list = field(default_factory=list)
    note: str = ""

    @staticmethod
    def _median(xs):
        xs = [x for x in xs if x == x]
        return statistics.median(xs) if xs else None

    def summary(self) -> dict:
        out = {}
        for k in ("ours_decode", "ours_prefill", "ref_decode", "ref_prefill"):
            out[k] = self._median(getattr(self, k))
        for kind in ("decode", "prefill"):
            o, r = out[f"ours_{kind}"], out[f"ref_{kind}"]
            out[f"ratio_{kind}"] = o / r if o and r else None
        return out
