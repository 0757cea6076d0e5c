"""The reference side of the benchmark: llama.cpp through llama-cpp-python
(`LlamaCpp`, on the GGUF copy of the same weights), with the same decode /
prefill / close interface as our runners (bench/ours.py), and
`llama_cpp_status()` saying whether it can run here."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from .prompts import BOS



def llama_cpp_status() -> tuple[bool, str]:
    """(importable, version or the reason it is not)."""
    try:
        import llama_cpp
    except Exception as e:  # ImportError, or a broken shared library
        return False, f"llama-cpp-python not importable ({type(e).__name__}: {e})"
    return True, getattr(llama_cpp, "__version__", "?")


class LlamaCpp:
    """llama.cpp through llama-cpp-python on the GGUF copy of the same weights."""

    name = "llama.cpp"

    def __init__(self, gguf_path: Path, threads: int, n_ctx: int, n_batch: int, f32_kv: bool = False):
        from llama_cpp import Llama

        kw = dict(model_path=os.fspath(gguf_path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                  n_threads=threads, n_threads_batch=threads, logits_all=False, verbose=False, seed=1)
        if f32_kv:
            kw.update(type_k=0, type_v=0)  # GGML_TYPE_F32
        self.llm = Llama(**kw)
        self.n_vocab = self.llm.n_vocab()

    def _last_logits(self) -> np.ndarray:
        # eval() keeps no logits without logits_all: read the context's (last token's) row
        import llama_cpp

        return np.ctypeslib.as_array(llama_cpp.llama_get_logits(self.llm.ctx), shape=(self.n_vocab,))

    def decode(self, n: int) -> tuple[float, int]:
        """Greedy decoding, one llama_decode per token, like ours: (tokens/s, n)."""
        llm = self.llm
        llm.reset()
        llm.eval([BOS])  # the first step: not timed, as in `run`
        tok = int(np.argmax(self._last_logits()))
        start = time.perf_counter()
        for _ in range(n):
            llm.eval([tok])
            tok = int(np.argmax(self._last_logits()))
        return n / (time.perf_counter() - start), n

    def prefill(self, tokens: list[int]) -> float:
        llm = self.llm
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(tokens)
        return len(tokens) / (time.perf_counter() - t0)

    def close(self):
        if self.llm is not None:
            close = getattr(self.llm, "close", None)
            if close:
                close()
        self.llm = None
