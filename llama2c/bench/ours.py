"""Our side of the benchmark: `Ours` runs a model through libllama2 (decode
drives the same C session loop as `run`, one llama2_session_step per token,
timed from the end of the first step as `run` times it; prefill is one
llama2_forward_batch call) and `RunProgram` times decode with the ./run
program itself (its `achieved tok/s` line). Both have decode(n) ->
(tokens/s, tokens timed), prefill(tokens) -> tokens/s and close()."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from .specs import ModelSpec


class Ours:
    """Our engine through libllama2, decode timed exactly as `run` times it."""

    name = "llama2c"

    def __init__(self, spec: ModelSpec, threads: int):
        from ..generate import Llama

        self.llama = Llama(spec.path, tokenizer=spec.tokenizer, n_threads=threads)
        self.config = self.llama.config
        if spec.tokenizer is None:
            raise FileNotFoundError(f"{spec.path}: no tokenizer.bin beside it; pass --tokenizer")
        self.llama.tokenizer  # load it now, not inside a timed region
        from .._ffi import lib

        try:
            lib.llama2_forward_batch
            self.batched = True
        except AttributeError:
            self.batched = False

    def decode(self, n: int) -> tuple[float, int]:
        """(tokens/s, tokens timed) of a greedy run of n + 1 steps after BOS."""
        from .. import _ffi
        from .._ffi import ffi, lib
        from ..errors import new_error, raise_for
        from ..sampler import Sampler

        llama = self.llama
        context = llama.create_context()
        sampler = Sampler(self.config.vocab_size, temperature=0.0, topp=0.9, seed=1)
        out, err = ffi.new("llama2_session **"), new_error()
        raise_for(lib.llama2_session_new_ctx(out, context._ptr, llama.tokenizer._ptr, sampler._ptr,
                                             _ffi.MODE_GENERATE, b"", 0, n + 1, err), err)
        session = ffi.gc(out[0], lib.llama2_session_free)
        step = ffi.new("llama2_step *")
        start, timed_from, pos = None, 0, 0
        context._enter()
        try:
            while True:
                raise_for(lib.llama2_session_step(session, step, err), err)
                pos = step.pos
                if step.kind != _ffi.STEP_TOKEN:
                    break
                if start is None:
                    start, timed_from = time.perf_counter(), pos
        finally:
            context._exit()
        end = time.perf_counter()
        del session, sampler, context
        if start is None or pos <= timed_from:
            return float("nan"), 0
        return (pos - timed_from) / (end - start), pos - timed_from

    def prefill(self, tokens: list[int]) -> float:
        t0 = time.perf_counter()
        if self.batched:
            self.llama.forward_batch(tokens, 0)
        else:
            for pos, tok in enumerate(tokens):
                self.llama.forward(tok, pos)
        return len(tokens) / (time.perf_counter() - t0)

    def close(self):
        self.llama = None


class RunProgram:
    """Decode through the ./run program (its `achieved tok/s` line); prefill
    still goes through the library."""

    name = "llama2c (run)"

    def __init__(self, spec: ModelSpec, threads: int, run_bin: Path):
        self.spec, self.threads, self.run_bin = spec, threads, run_bin
        self.lib = Ours(spec, threads)
        self.config = self.lib.config
        self.batched = self.lib.batched

    def decode(self, n: int) -> tuple[float, int]:
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads))
        cmd = [os.fspath(self.run_bin), os.fspath(self.spec.path), "-z", os.fspath(self.spec.tokenizer),
               "-t", "0", "-n", str(n + 1), "-s", "1"]
        proc = subprocess.run(cmd, capture_output=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.decode(errors='replace').strip()}")
        for line in proc.stderr.decode(errors="replace").splitlines():
            if line.startswith("achieved tok/s:"):
                return float(line.split(":", 1)[1]), n
        raise RuntimeError(f"no 'achieved tok/s' line from {' '.join(cmd)}")

    def prefill(self, tokens):
        return self.lib.prefill(tokens)

    def close(self):
        self.lib.close()
