"""`llama2c bench`: decode and prompt-processing speed, ours against llama.cpp.

    llama2c bench --shape stories15M,stories42M --threads 1,2
    llama2c bench model.bin other.bin --threads 2 --json
    python -m llama2c.bench --shape tinyllama --quant int8 --reps 3

For every model file (or random-weight model of a standard shape, written once
to a cache directory) and thread count it measures, as medians over
interleaved repetitions (ours, llama.cpp, ours, llama.cpp, ...; the order
flips every pair):

  decode   tokens/s of greedy generation after a BOS, timed from the end of
           the first step, as `run` reports `achieved tok/s` (our side runs the
           same C session loop as `run`, one llama2_session_step per token;
           --engine run calls the ./run program itself and parses its line);
  prefill  tokens/s over a P-token prompt at position 0, through
           llama2_forward_batch when the library has it, else one token at a
           time (what the engine does then).

The reference is llama.cpp through llama-cpp-python when it can be imported,
on the same weights exported to GGUF (llama2c/gguf_export.py): fp32 files run
as F32, int8 (version 2) files as Q8_0 and bf16 (version 4) files as F16
(--ref-type forces one type). Without it the reference columns read "n/a". Results print as a Markdown
table (--json: JSON with every sample); --update-doc FILE rewrites the table
between the `<!-- bench:begin -->` and `<!-- bench:end -->` markers of FILE.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import platform
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

MAGIC = 0x616B3432
HEADER_BYTES = 256
BOS = 1

# name -> (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len)
SHAPES = {
    "stories15M": (288, 768, 6, 6, 6, 32000, 256),
    "stories42M": (512, 1376, 8, 8, 8, 32000, 1024),
    "stories110M": (768, 2048, 12, 12, 12, 32000, 1024),
    "tinyllama": (2048, 5632, 22, 32, 4, 32000, 2048),
}
SHAPE_LABELS = {"stories15M": "stories15M", "stories42M": "stories42M",
                "stories110M": "stories110M", "tinyllama": "TinyLlama-1.1B (GQA)"}
QUANTS = ("fp32", "int8", "bf16")
BIG_MODEL_PARAMS = 300_000_000  # --big-decode-tokens applies above this
DOC_BEGIN, DOC_END = "<!-- bench:begin -->", "<!-- bench:end -->"


# ---------------------------------------------------------------------------
# random-weight models of the standard shapes
# ---------------------------------------------------------------------------


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llama2c" / "bench"


def group_size_for(dim: int) -> int:
    gs = 64
    while dim % gs:
        gs //= 2
    return gs


def _header(params, version: int, group_size: int | None = None, shared: bool = True) -> bytes:
    h = struct.pack("<Ii7iB", MAGIC, version, *params, 1 if shared else 0)
    if version == 2:
        h += struct.pack("<i", group_size)
    return h + b"\0" * (HEADER_BYTES - len(h))


def _random_tensors(params, seed: int):
    """Yields (name, layer or None, array) in version 1 file order. Random normal
    float32 scaled so activations stay O(1): matrices std 1/sqrt(fan_in) (wo and
    w2 halved so the residual stream does not grow, wq / wk x1.5 so attention is
    not uniform), norms 1 +- 0.1, a shared embedding / classifier of std
    1/sqrt(dim) (logits of std ~1). Each tensor has its own seed, so any one can
    be made without the others."""
    dim, hidden, L, nh, nkv, vocab, _ = params
    kv = dim * nkv // nh

    def rng(*key):
        return np.random.default_rng([seed, *key])

    for i, name in enumerate(("rms_att", "rms_ffn")):
        yield name, None, (1 + rng(i).uniform(-0.1, 0.1, (L, dim))).astype(np.float32)
    yield "rms_final", None, (1 + rng(2).uniform(-0.1, 0.1, dim)).astype(np.float32)
    emb = rng(3).standard_normal((vocab, dim), dtype=np.float32)
    emb *= np.float32(1 / np.sqrt(dim))
    yield "token_embedding", None, emb
    shapes = {"wq": (dim, dim), "wk": (kv, dim), "wv": (kv, dim), "wo": (dim, dim),
              "w1": (hidden, dim), "w2": (dim, hidden), "w3": (hidden, dim)}
    gain = {"wq": 1.5, "wk": 1.5, "wo": 0.5, "w2": 0.5}
    for j, (name, shape) in enumerate(shapes.items()):
        for layer in range(L):
            a = rng(10 + j, layer).standard_normal(shape, dtype=np.float32)
            a *= np.float32(gain.get(name, 1.0) / np.sqrt(shape[1]))
            yield name, layer, a


def write_random_fp32(path: Path, params, seed: int = 1234) -> Path:
    """A version 1 (fp32) model with random weights, written tensor by tensor."""
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        f.write(_header(params, 1))
        for _, _, a in _random_tensors(params, seed):
            f.write(np.ascontiguousarray(a, dtype="<f4").tobytes())
    os.replace(tmp, path)
    return path


def quantize_groups(w: np.ndarray, gs: int) -> tuple[np.ndarray, np.ndarray]:
    """Version 2 Q8_0 of a matrix flattened row after row: per group of gs values
    scale = max|w| / 127 and q = round(w / scale) (half to even, as the exporter)."""
    g = np.asarray(w, dtype=np.float32).reshape(-1, gs)
    scale = np.abs(g).max(axis=1) / np.float32(127)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(scale[:, None] > 0, g / scale[:, None], 0)
    return np.clip(np.round(q), -127, 127).astype(np.int8), scale.astype(np.float32)


def write_int8_from_fp32(src: Path, dst: Path) -> Path:
    """The version 2 (int8) copy of a version 1 file (group size 64 halved until
    it divides dim), matrix by matrix."""
    from .gguf_export import read_model

    m = read_model(src)
    if m.version != 1:
        raise ValueError(f"{src}: expected a version 1 file")
    params = (m.dim, m.hidden_dim, m.n_layers, m.n_heads, m.n_kv_heads, m.vocab_size, m.seq_len)
    gs = group_size_for(m.dim)
    w = m.weights
    tmp = dst.with_name(dst.name + ".part")
    with open(tmp, "wb") as f:
        f.write(_header(params, 2, gs, m.shared))
        for name in ("rms_att", "rms_ffn", "rms_final"):
            f.write(np.ascontiguousarray(w[name], dtype="<f4").tobytes())
        mats = [w["token_embedding"]]
        for name in ("wq", "wk", "wv", "wo", "w1", "w2", "w3"):
            mats += [w[name][layer] for layer in range(m.n_layers)]
        if not m.shared:
            mats.append(w["wcls"])
        for a in mats:
            q, s = quantize_groups(a, gs)
            f.write(q.tobytes())
            f.write(s.astype("<f4").tobytes())
    os.replace(tmp, dst)
    return dst


@dataclass
class ModelSpec:
    """One model to benchmark: our file, its tokenizer, and how to make the GGUF."""
    label: str
    path: Path
    tokenizer: Path | None
    quant: str                 # "fp32", "int8" or "bf16" (how our engine runs it)
    vocab: str | None = None   # for the GGUF: "synthetic", a tokenizer path, or None (beside)


def shape_models(shape: str, quants, cache_dir: Path, seed: int = 1234, log=print) -> list[ModelSpec]:
    """The cached random-weight models of a standard shape (written when missing)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r} (one of {', '.join(SHAPES)})")
    from .gguf_export import synthetic_vocab, write_tokenizer_bin

    params = SHAPES[shape]
    d = cache_dir / shape
    d.mkdir(parents=True, exist_ok=True)
    tok = d / "tokenizer.bin"
    if not tok.exists():
        write_tokenizer_bin(tok, synthetic_vocab(params[5]))
    fp32 = d / "model-fp32.bin"
    if not fp32.exists():
        log(f"writing {fp32} (random weights, shape {shape})")
        write_random_fp32(fp32, params, seed)
    out = []
    for q in quants:
        if q == "fp32":
            out.append(ModelSpec(SHAPE_LABELS[shape], fp32, tok, "fp32", "synthetic"))
        elif q == "int8":
            int8 = d / "model-int8.bin"
            if not int8.exists():
                log(f"writing {int8}")
                write_int8_from_fp32(fp32, int8)
            out.append(ModelSpec(SHAPE_LABELS[shape], int8, tok, "int8", "synthetic"))
        elif q == "bf16":
            bf16 = d / "model-bf16.bin"
            if not bf16.exists():
                log(f"writing {bf16}")
                from .export.sources import open_bin
                from .export.writers import write_bin
                with open_bin(fp32) as src:
                    write_bin(src, bf16, 4)
            out.append(ModelSpec(SHAPE_LABELS[shape], bf16, tok, "bf16", "synthetic"))
        else:
            raise ValueError(f"unknown weight type {q!r} (fp32, int8 or bf16)")
    return out


def file_model(path: str, tokenizer: str | None) -> ModelSpec:
    from .gguf_export import read_model

    p = Path(path)
    m = read_model(p)  # header check (and the version decides the row's weight type)
    tok = Path(tokenizer) if tokenizer else p.resolve().parent / "tokenizer.bin"
    if not tok.exists():
        tok = None
    return ModelSpec(p.name, p, tok, {2: "int8", 4: "bf16"}.get(m.version, "fp32"),
                     os.fspath(tok) if tok else "synthetic")


def gguf_for(spec: ModelSpec, ref_type: str, cache_dir: Path, log=print) -> Path:
    """The GGUF copy of spec's weights (made once, kept beside the cache)."""
    from .gguf_export import export_gguf

    st = spec.path.stat()
    key = hashlib.sha1(f"{spec.path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{spec.vocab}".encode()).hexdigest()[:12]
    if spec.path.resolve().is_relative_to(cache_dir.resolve()):
        out = spec.path.with_name(f"{spec.path.stem}-{ref_type}.gguf")
    else:
        (cache_dir / "gguf").mkdir(parents=True, exist_ok=True)
        out = cache_dir / "gguf" / f"{spec.path.stem}-{key}-{ref_type}.gguf"
    if not out.exists() or out.stat().st_mtime_ns < st.st_mtime_ns:
        log(f"writing {out}")
        export_gguf(spec.path, out, ref_type, vocab=spec.vocab)
    return out


# ---------------------------------------------------------------------------
# runners: ours (libllama2 or ./run) and llama.cpp
# ---------------------------------------------------------------------------


def prompt_tokens(n: int, vocab_size: int, seed: int = 7) -> list[int]:
    """BOS then n-1 random ordinary tokens (ids >= 3)."""
    rng = np.random.default_rng(seed)
    return [BOS] + [int(t) for t in rng.integers(3, vocab_size, n - 1)]


class Ours:
    """Our engine through libllama2, decode timed exactly as `run` times it."""

    name = "llama2c"

    def __init__(self, spec: ModelSpec, threads: int):
        from .generate import Llama

        self.llama = Llama(spec.path, tokenizer=spec.tokenizer, n_threads=threads)
        self.config = self.llama.config
        if spec.tokenizer is None:
            raise FileNotFoundError(f"{spec.path}: no tokenizer.bin beside it; pass --tokenizer")
        self.llama.tokenizer  # load it now, not inside a timed region
        from ._ffi import lib

        try:
            lib.llama2_forward_batch
            self.batched = True
        except AttributeError:
            self.batched = False

    def decode(self, n: int) -> tuple[float, int]:
        """(tokens/s, tokens timed) of a greedy run of n + 1 steps after BOS."""
        from . import _ffi
        from ._ffi import ffi, lib
        from .errors import new_error, raise_for
        from .sampler import Sampler

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


# ---------------------------------------------------------------------------
# the measurement
# ---------------------------------------------------------------------------


@dataclass
class Row:
    model: str
    weights: str              # "fp32" / "int8" / "bf16"
    ref_type: str | None      # "f32" / "q8_0" / "f16" or None
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
    n_dec, n_pre = args.decode_tokens, args.prompt_tokens
    ours = RunProgram(spec, threads, Path(args.run_bin)) if args.engine == "run" else Ours(spec, threads)
    cfg = ours.config
    if args.big_decode_tokens and cfg.n_params > BIG_MODEL_PARAMS:
        n_dec = args.big_decode_tokens
    n_dec = max(1, min(n_dec, cfg.seq_len - 1))
    n_pre = max(2, min(n_pre, cfg.seq_len))
    ref_type = args.ref_type or {"int8": "q8_0", "bf16": "f16"}.get(spec.quant, "f32")
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
        la = _loadavg()
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


# ---------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------


def fmt(x, digits=None) -> str:
    if x is None:
        return "n/a"
    if digits is None:
        digits = 0 if x >= 100 else 1 if x >= 10 else 2
    return f"{x:.{digits}f}"


def fmt_ratio(x) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def cpu_info() -> dict:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    simd = [f for f in ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
                        "avx_vnni", "amx_bf16") if f in flags]
    return {"model": model, "cores": os.cpu_count(), "simd": simd,
            "avx512": any(f.startswith("avx512") for f in flags)}


TYPE_NAMES = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}


def markdown(rows: list[Row], meta: dict) -> str:
    lines = [
        "| model | weights (ours / llama.cpp) | threads | N / P | decode ours tok/s | decode llama.cpp tok/s | "
        "decode ratio | prefill ours tok/s | prefill llama.cpp tok/s | prefill ratio | load |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        s = r.summary()
        ref = TYPE_NAMES.get(r.ref_type, "-") if r.ref_type else "-"
        lines.append(
            f"| {r.model} | {r.weights} / {ref} | {r.threads} | {r.decode_tokens} / {r.prompt_tokens} | "
            f"{fmt(s['ours_decode'])} | {fmt(s['ref_decode'])} | "
            f"{fmt_ratio(s['ratio_decode'])} | {fmt(s['ours_prefill'])} | {fmt(s['ref_prefill'])} | "
            f"{fmt_ratio(s['ratio_prefill'])} | {'?' if r.load is None else f'{r.load:.1f}'} |")
    notes = [f"- {r.model} {r.weights} {r.threads}t: {r.note}" for r in rows if r.note]
    first = rows[0] if rows else None
    foot = [
        "",
        "Decode: greedy, N tokens after BOS, timed from the end of the first step like `run`. "
        "Prefill: a P-token prompt at position 0"
        + (" through `llama2_forward_batch`." if first and first.prefill_batched else ", one token at a time.")
        + f" Medians of {meta['reps']} interleaved pairs; ratio = ours / llama.cpp. "
        "load: the 1-minute load average when the row finished (this benchmark's own threads included).",
    ]
    if not meta.get("llama_cpp_ok"):
        foot.append(f"llama.cpp columns: n/a: {meta.get('llama_cpp')}")
    return "\n".join(lines + foot + ([""] + notes if notes else [])) + "\n"


def machine_line(meta: dict) -> str:
    c = meta["cpu"]
    load = ""
    if meta.get("load_before") and meta.get("load_after"):
        load = (f" Load average (1/5/15 min) {'/'.join(map(str, meta['load_before']))} at the start, "
                f"{'/'.join(map(str, meta['load_after']))} at the end.")
    partial = "" if meta.get("complete", True) else " (run in progress: rows so far)"
    return (f"{meta['date']}{partial}, {c['model']}, {c['cores']} cores, SIMD: {' '.join(c['simd']) or 'none'}"
            f"{'' if c['avx512'] else ' (no AVX-512)'}; llama2c {meta['llama2c']}"
            f"{' @ ' + meta['commit'] if meta.get('commit') else ''}; llama-cpp-python "
            f"{meta['llama_cpp'] if meta.get('llama_cpp_ok') else 'not available'}.{load}")


def update_doc(path: Path, table: str, meta: dict, command: str) -> None:
    block = (f"{DOC_BEGIN}\nMeasured {machine_line(meta)}\n\nCommand: `{command}`\n\n{table}{DOC_END}")
    text = path.read_text() if path.exists() else f"# Benchmarks\n\n{DOC_BEGIN}\n{DOC_END}\n"
    if DOC_BEGIN in text and DOC_END in text:
        head, rest = text.split(DOC_BEGIN, 1)
        _, tail = rest.split(DOC_END, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent.parent
    try:
        c = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                           text=True, timeout=10)
        if c.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return c.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _csv(kind):
    def parse(s):
        return [kind(x) for x in s.split(",") if x.strip()]
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llama2c bench",
                                description="Decode and prompt-processing tokens/s, ours vs llama.cpp.")
    p.add_argument("models", nargs="*", help="model .bin files (fp32 versions 0/1/3, int8 version 2, bf16 version 4)")
    p.add_argument("--shape", type=_csv(str), default=[], action="extend",
                   help=f"random-weight models of these shapes: {', '.join(SHAPES)} (comma list)")
    p.add_argument("--quant", type=_csv(str), default=None,
                   help="weight types for --shape: fp32,int8,bf16 (default all three)")
    p.add_argument("--threads", type=_csv(int), default=[1, 2], help="thread counts (default 1,2)")
    p.add_argument("--tokenizer", "-z", default=None, help="tokenizer.bin for the model files "
                   "(default: beside each model)")
    p.add_argument("--decode-tokens", "-n", type=int, default=128, help="tokens decoded after BOS (default 128)")
    p.add_argument("--big-decode-tokens", type=int, default=None,
                   help=f"tokens decoded for models over {BIG_MODEL_PARAMS // 10**6}M parameters "
                        "(default: --decode-tokens)")
    p.add_argument("--prompt-tokens", "-P", type=int, default=128, help="prompt length for prefill (default 128)")
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions (default 5)")
    p.add_argument("--no-prefill", action="store_true", help="measure decode only")
    p.add_argument("--no-reference", action="store_true", help="do not run llama.cpp")
    p.add_argument("--ref-type", choices=("f32", "f16", "q8_0"), default=None,
                   help="GGUF type for llama.cpp (default: f32 for fp32 files, q8_0 for int8, f16 for bf16)")
    p.add_argument("--engine", choices=("python", "run"), default="python",
                   help="our decode through the library (default) or the ./run program")
    p.add_argument("--run-bin", default=os.fspath(Path(__file__).resolve().parent.parent / "run"),
                   help="the run program for --engine run")
    p.add_argument("--cache-dir", default=os.fspath(default_cache_dir()),
                   help="where random-weight models and GGUF copies are kept")
    p.add_argument("--json", action="store_true", help="print JSON instead of the Markdown table")
    p.add_argument("--json-out", default=None, help="also write the JSON to this file")
    p.add_argument("--update-doc", default=None, metavar="FILE",
                   help=f"rewrite the table between {DOC_BEGIN} and {DOC_END} in FILE")
    p.add_argument("--merge", default=None, metavar="JSON",
                   help="start from the rows of an earlier --json-out file; rows measured now "
                        "(same model, weights and threads) replace them")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress lines on stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log = (lambda *a, **k: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    if not args.models and not args.shape:
        print("llama2c bench: error: give model files or --shape NAME", file=sys.stderr)
        return 2
    if args.reps < 1 or args.decode_tokens < 1 or args.prompt_tokens < 2 or not args.threads \
            or min(args.threads) < 1:
        print("llama2c bench: error: --reps, --decode-tokens >= 1, --prompt-tokens >= 2, --threads >= 1",
              file=sys.stderr)
        return 2
    quants = args.quant or list(QUANTS)
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    try:
        specs: list[ModelSpec] = []
        for shape in args.shape:
            key = next((k for k in SHAPES if k.lower() == shape.lower()), shape)
            specs += shape_models(key, quants, cache, log=log)
        for m in args.models:
            specs.append(file_model(m, args.tokenizer))
    except (OSError, ValueError) as e:
        print(f"llama2c bench: error: {e}", file=sys.stderr)
        return 1

    ref_ok, ref_info = (False, "disabled (--no-reference)") if args.no_reference else llama_cpp_status()
    if not ref_ok:
        log(f"reference: {ref_info}")
    from . import __version__

    meta = {"date": _dt.date.today().isoformat(), "cpu": cpu_info(), "llama2c": __version__,
            "commit": _git_commit(), "llama_cpp_ok": ref_ok, "llama_cpp": ref_info, "reps": args.reps,
            "decode_tokens": args.decode_tokens, "prompt_tokens": args.prompt_tokens, "engine": args.engine}
    meta["load_before"] = _loadavg()
    command = os.environ.get("LLAMA2C_BENCH_COMMAND") or \
        "llama2c bench " + " ".join(argv if argv is not None else sys.argv[1:])
    rows: list[Row] = []
    planned = [(spec.label, spec.quant, t) for spec in specs for t in args.threads]
    if args.merge:
        try:
            old = json.loads(Path(args.merge).read_text())
        except (OSError, ValueError) as e:
            print(f"llama2c bench: error: --merge {args.merge}: {e}", file=sys.stderr)
            return 1
        names = set(Row.__dataclass_fields__)
        for d in old.get("rows", []):
            r = Row(**{k: v for k, v in d.items() if k in names})
            if (r.model, r.weights, r.threads) not in planned:
                rows.append(r)
        meta["merged_from"] = old.get("meta")
        if old.get("meta", {}).get("date") and old["meta"]["date"] != meta["date"]:
            meta["date"] = f"{old['meta']['date']} to {meta['date']}"
    n_planned = len(rows) + len(planned)

    def report(final: bool):
        # written after every row, so a long run that dies keeps what it measured
        meta["load_after"] = _loadavg()
        meta["complete"] = final
        order = list(SHAPE_LABELS.values())
        ordered = sorted(rows, key=lambda r: (order.index(r.model) if r.model in order else len(order),
                                              QUANTS.index(r.weights) if r.weights in QUANTS else 9))
        table = markdown(ordered, meta)
        data = {"meta": meta, "rows": [dict(asdict(r), median=r.summary()) for r in ordered]}
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(data, indent=1) + "\n")
        if args.update_doc:
            update_doc(Path(args.update_doc), table, meta, command)
        return table, data

    for spec in specs:
        for t in args.threads:
            rows.append(measure(spec, t, args, ref_ok, log))
            if len(rows) < n_planned:
                report(False)
    table, data = report(True)
    if args.json:
        print(json.dumps(data, indent=1))
    else:
        print(machine_line(meta) + "\n")
        print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
