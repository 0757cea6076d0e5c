"""The measurement: `measure` builds one table row by running our engine and
llama.cpp alternately on the same model, after `settle` has waited for the
process to go idle (neither engine is timed while the other's threads still
spin). Decode is N tokens after BOS (fewer for models over BIG_MODEL_PARAMS
with --big-decode-tokens), prefill a P-token prompt at position 0."""
from __future__ import annotations

import datetime as _dt
import time
from pathlib import Path

from .machine import loadavg
from .ours import Ours, RunProgram
from .prompts import prompt_tokens
from .reference import LlamaCpp
from .report import fmt
from .results import Row
from .specs import ModelSpec, gguf_for

BIG_MODEL_PARAMS = 300_000_000  # --big-decode-tokens applies above this


def settle(limit_s: float = 0.5) -> float:
    """Waits until this process's threads are idle (under 1 ms of CPU time in
    a 5 ms window, at most limit_s), so that no engine is timed while the
    other's workers still spin after their last call: llama.cpp's keep one
    core busy for about 10 ms after each call, ours for about 0.5 ms.
    Returns the seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < limit_s:
        c0 = time.process_time()
        time.sleep(0.005)
        if time.process_time() - c0 < 0.001:
            break
    return time.perf_counter() - start


def measure(spec: ModelSpec, threads: int, args, ref_ok: bool, log=print) -> Row:
    """One row: spec at `threads` threads, ours (and llama.cpp when ref_ok)
    after one warm-up, args.reps interleaved repetitions whose order flips
    every pair, settle() before every timed run. args: the parsed command
    line (decode_tokens, big_decode_tokens, prompt_tokens, reps, no_prefill,
    ref_type, engine, run_bin, cache_dir)."""
    n_dec, n_pre = args.decode_tokens, args.prompt_tokens
    ours = RunProgram(spec, threads, Path(args.run_bin)) if args.engine == "run" else Ours(spec, threads)
    cfg = ours.config
    if args.big_decode_tokens and cfg.n_params > BIG_MODEL_PARAMS:
        n_dec = args.big_decode_tokens
    n_dec = max(1, min(n_dec, cfg.seq_len - 1))
    n_pre = max(2, min(n_pre, cfg.seq_len))
    ref_type = args.ref_type or {"int8": "q8_0", "bf16": "f16", "q4_0": "q4_0"}.get(spec.quant, "f32")
    row = Row(spec.label, spec.quant, ref_type if ref_ok else None, threads, n_dec, n_pre, ours.batched)
    ref = None
    try:
        if ref_ok:
            try:
                g = gguf_for(spec, ref_type, Path(args.cache_dir), log)
                ref = LlamaCpp(g, threads, n_ctx=cfg.seq_len, n_batch=max(n_pre, 32))
            except Exception as e:  # export or load failed: say so in the row
                row.note = f"llama.cpp: {type(e).__name__}: {e}"
                row.ref_type = None
                ref = None
        prompt = prompt_tokens(n_pre, cfg.vocab_size)
        runners = [("ours", ours)] + ([("ref", ref)] if ref is not None else [])
        # warm-up: page the weights in, start the thread pools (not recorded)
        for _, r in runners:
            r.decode(min(n_dec, 8))
            r.prefill(prompt[: min(n_pre, 16)])
        for rep in range(args.reps):
            order = runners if rep % 2 == 0 else runners[::-1]
            for who, r in order:
                settle()
                tps, _ = r.decode(n_dec)
                getattr(row, f"{who}_decode").append(tps)
            if not args.no_prefill:
                for who, r in order:
                    settle()
                    getattr(row, f"{who}_prefill").append(r.prefill(prompt))
        la = loadavg()
        row.load = la[0] if la else None
        row.when = _dt.datetime.now().isoformat(timespec="seconds")
        s = row.summary()
        log(f"  {row.model} {row.weights} {threads}t: decode {fmt(s['ours_decode'])} vs {fmt(s['ref_decode'])}, "
            f"prefill {fmt(s['ours_prefill'])} vs {fmt(s['ref_prefill'])}")
    finally:
        ours.close()
        if ref is not None:
            ref.close()
    return row
