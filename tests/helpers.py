"""Helpers shared by the test modules (imported by conftest.py and the tests):
paths, tiny model configurations, the model-file factory, the CLI wrapper and
the comparison helpers used for logits."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
SHARED_DATA = REPO.parent / "shared" / "data"

if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

import reference as R  # noqa: E402

STORIES = SHARED_DATA / "tinyllamas" / "stories260K"
AIDREAMS = SHARED_DATA / "aidreams260K"
LLAMA2_TOK = SHARED_DATA / "llama2"

# texts for the tokenizer tests: ASCII, code, accents, CJK, emoji (byte
# fallback), control whitespace, Llama 2 chat markup, runs of spaces, digits
STRINGS = [
    "Hello, world!",
    "I believe the meaning of life is",
    "Simply put, the theory of relativity states that ",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "class Foo:\n\tdef bar(self):\n\t\treturn {'a': [1, 2, 3]}\n",
    "Crème brûlée, naïve café, jalapeño, Ærøskøbing, Straße",
    "Привет, мир! Καλημέρα κόσμε.",
    "日本語のテキストと中文文本，还有한국어.",
    "emoji: 🦙🚀😀👍🏽 and 🇫🇷 flags",
    "🦙",
    "mixed\ttabs\tand\nnew\nlines\r\nwindows",
    "[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\nWhat is the capital of France? [/INST]",
    "[INST] Tell me a joke. [/INST]",
    "   three leading spaces",
    " a",
    "trailing spaces   ",
    "multiple    spaces   between     words",
    "1234567890 3.14159 2024-01-01 0x1F 1e-5",
    "a",
    " ",
    "\n",
    "\n\n\n",
    "",
    "The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX!",
    "unicode math: ∑ ∫ √ ∞ ≠ ≤ ≥ → λ π",
    "zero\u200bwidth and non\u00a0breaking",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor "
    "incididunt ut labore et dolore magna aliqua.",
]


@dataclasses.dataclass(frozen=True)
class Cli:
    run: Path
    runq: Path

    def __call__(self, prog: str, *args, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        exe = self.run if prog == "run" else self.runq
        return subprocess.run([str(exe), *map(str, args)], capture_output=True,
                              timeout=timeout, **kw)


# ---------------------------------------------------------------------------
# tiny random models
# ---------------------------------------------------------------------------

# head_size 8, GQA (2 query heads per kv head), hidden not a multiple of 8
GQA = R.Config(dim=64, hidden_dim=172, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=384,
               seq_len=32)
# multi-head attention, dim 48 (default Q8_0 group size 16)
MHA = R.Config(dim=48, hidden_dim=128, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=300,
               seq_len=32)
# multi-query attention (one kv head), three layers, longer context
MQA = R.Config(dim=32, hidden_dim=96, n_layers=3, n_heads=4, n_kv_heads=1, vocab_size=512,
               seq_len=48)

CONFIGS = {"gqa": GQA, "mha": MHA, "mqa": MQA}


@dataclasses.dataclass
class ModelFile:
    path: Path
    cfg: R.Config
    w: dict
    version: int
    group_size: int | None
    tokenizer: Path

    @property
    def shared(self) -> bool:
        return R.is_shared(self.w)


class ModelFactory:
    def __init__(self, root: Path):
        self.root = root
        self.cache: dict = {}

    def tokenizer(self, vocab_size: int) -> Path:
        path = self.root / f"tok{vocab_size}.bin"
        if not path.exists():
            pieces, scores = R.make_vocab(vocab_size)
            R.write_tokenizer_bin(path, pieces, scores)
        return path

    def __call__(self, cfg: R.Config, version: int = 1, shared: bool = True, seed: int = 0,
                 group_size: int | None = None, weights: dict | None = None,
                 name: str | None = None) -> ModelFile:
        key = (cfg, version, shared, seed, group_size, name)
        if weights is None and key in self.cache:
            return self.cache[key]
        w = weights if weights is not None else R.random_weights(cfg, seed, shared)
        if version == 2 and group_size is None:
            group_size = R.default_group_size(cfg.dim)
        fname = name or f"m{len(self.cache)}_v{version}.bin"
        path = R.write_model(self.root / fname, cfg, w, version, group_size)
        m = ModelFile(path, cfg, w, version, group_size if version == 2 else None,
                      self.tokenizer(cfg.vocab_size))
        self.cache[key if weights is None else (key, len(self.cache))] = m
        return m


def random_tokens(cfg: R.Config, n: int, seed: int) -> list[int]:
    """BOS followed by n-1 random tokens."""
    rng = np.random.default_rng(seed)
    return [1] + [int(t) for t in rng.integers(0, cfg.vocab_size, n - 1)]


# ---------------------------------------------------------------------------
# comparing C logits with the reference
# ---------------------------------------------------------------------------


def c_logits(model, tokens) -> np.ndarray:
    """Runs llama2c.Llama.forward(token, pos) for pos = 0..n-1 on a fresh
    sequence and stacks the logits (checking each is a float32 vector)."""
    rows = []
    vocab = model.config.vocab_size
    for pos, tok in enumerate(tokens):
        out = model.forward(tok, pos)
        assert isinstance(out, np.ndarray), type(out)
        assert out.dtype == np.float32 and out.shape == (vocab,), (out.dtype, out.shape)
        rows.append(out.astype(np.float64))
    return np.stack(rows)


def f32_tolerance(ref: np.ndarray) -> float:
    """fp32 engine vs float64 reference: 1e-5 absolute on logits of order 1
    (relative to the largest logit when that is above 1)."""
    return 1e-5 * max(1.0, float(np.abs(ref).max()))


def assert_f32_close(c: np.ndarray, ref: np.ndarray, what: str = "") -> None:
    assert c.shape == ref.shape, (c.shape, ref.shape)
    assert np.all(np.isfinite(c)), f"{what}: non-finite logits"
    per_pos = np.abs(c - ref).max(axis=1)
    tol = f32_tolerance(ref)
    assert per_pos.max() <= tol, (
        f"{what}: max |C - reference| = {per_pos.max():.3g} > {tol:.3g}; "
        f"per position: {np.array2string(per_pos, precision=2)}")
    top2 = np.sort(ref, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * tol
    assert np.array_equal(c.argmax(axis=1)[clear], ref.argmax(axis=1)[clear]), what


Q8_TIGHT = 2e-4   # x max|logit|: the same int8 math up to float rounding
Q8_VS_F32 = 0.2   # x max|logit|: int8 engine vs the exact fp32 model
Q8_MAX_FLIPS = 4  # activations allowed to round the other way in one sequence


def assert_q8_close(c: np.ndarray, cfg: R.Config, w: dict, tokens, group_size: int,
                    ref_f32: np.ndarray | None = None, what: str = "") -> np.ndarray:
    """C int8 logits vs the int8 engine's math (reference.forward_q8).

    The C engine computes activations in float32 and the reference in
    float64, so now and then an activation within float32 rounding of a .5
    quantization boundary rounds the other way (one int8 step on one
    element). That moves the logits of its position, and through the KV cache
    of every later position, by up to ~1% of the logit range - more than any
    useful tolerance. reference.forward_q8_explain replays forward_q8 with
    such near ties (within 2e-3 of a boundary) rounded the other way until
    the C logits agree; at most Q8_MAX_FLIPS may be needed. Every position
    must then agree to Q8_TIGHT x max|logit|: unquantized activations,
    dropped row tails, wrong groups or scales miss by far more. Returns the
    reference logits used."""
    tokens = list(tokens)
    assert c.shape == (len(tokens), cfg.vocab_size), c.shape
    assert np.all(np.isfinite(c)), f"{what}: non-finite logits"
    tol = Q8_TIGHT * float(np.abs(c).max())
    ref, flips = R.forward_q8_explain(cfg, w, tokens, group_size, c, tol,
                                      max_flips=Q8_MAX_FLIPS)
    per_pos = np.abs(c - ref).max(axis=1)
    assert per_pos.max() <= tol, (
        f"{what}: per-position max |C - forward_q8| / max|logit| = "
        f"{np.array2string(per_pos / np.abs(c).max(), precision=2)} "
        f"(tolerance {Q8_TIGHT}; activation flips tried: {flips})")
    assert len(flips) <= Q8_MAX_FLIPS
    top2 = np.sort(ref, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * per_pos
    assert np.array_equal(c.argmax(axis=1)[clear], ref.argmax(axis=1)[clear]), what
    if ref_f32 is not None:
        err = np.abs(c - ref_f32).max()
        assert err <= Q8_VS_F32 * np.abs(ref_f32).max(), \
            f"{what}: int8 logits too far from the fp32 model: {err:.3g}"
    return ref


def greedy_continuation(llm, ids, n: int) -> list:
    """Up to n greedy tokens after ids in a fresh context of llm (a
    llama2c.Llama), stopping before BOS or EOS: what greedy generation of
    new tokens should give."""
    cx = llm.create_context()
    logits = cx.forward_batch(ids, 0)
    out, pos = [], len(ids)
    for _ in range(n):
        t = int(np.argmax(logits))
        if t in (1, 2):
            break
        out.append(t)
        logits = cx.forward(t, pos)
        pos += 1
    return out


# ---------------------------------------------------------------------------
# GGUF files with tensors of any ggml type, and llama.cpp's logits
# ---------------------------------------------------------------------------


def write_gguf(m: ModelFile, path, raw=None, drop=(), arch: str = "llama", meta=None) -> Path:
    """m's model as a GGUF file through llama2c's writer (every tensor F32,
    m's tokenizer as the vocabulary), except where raw(name, array) gives a
    tensor's bytes instead: (uint8 array of rows x bytes per row, ggml type);
    None keeps it F32. Tensors named in drop are left out; arch names the
    architecture, meta adds string metadata. Needs gguf."""
    import gguf

    from llama2c.export import gguf as ex
    from llama2c.export.binmodel import read_model
    from llama2c.export.vocab import load_vocab

    path = Path(path)
    src = read_model(m.path)
    w = gguf.GGUFWriter(str(path), arch)
    ex._add_metadata(w, gguf, src, "f32", path.stem)
    ex._add_vocab(w, load_vocab(str(m.tokenizer), src.vocab_size, m.path))
    for key, value in (meta or {}).items():
        w.add_string(key, value)
    real_add = w.add_tensor

    def add(name, data, **kw):
        if name in drop:
            return None
        got = raw(name, data) if raw is not None else None
        if got is None:
            return real_add(name, data, **kw)
        q, qtype = got
        return real_add(name, q, raw_shape=q.shape, raw_dtype=qtype)

    w.add_tensor = add
    ex._add_tensors(w, gguf, src, "f32", False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def llama_cpp_logits(path, tokens, n_ctx: int) -> np.ndarray:
    """llama.cpp's logits (float64, one row per token) for tokens at
    positions 0.. of a GGUF file, through llama-cpp-python (skips the test
    when it is not installed); fp32 KV cache, one thread."""
    import pytest

    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=1,
                          n_threads_batch=1, logits_all=True, type_k=0, type_v=0, verbose=False)
    try:
        llm.eval(list(tokens))
        return np.array(llm.scores[: len(tokens)], dtype=np.float64)
    finally:
        close = getattr(llm, "close", None)
        if close:
            close()


def runnable_tiers(monkeypatch) -> list[str]:
    """The kernel tiers this machine runs: those a forced LLAMA2_KERNELS name
    actually gets; and "avx512-noamx" (AVX-512 without its AMX kernel) where
    the avx512 tier uses AMX, so that both tables are compared."""
    from llama2c.cpu import kernel_info

    monkeypatch.delenv("LLAMA2_KERNELS", raising=False)
    amx = "AMX tiles" in kernel_info()["reason"]
    out = []
    for tier in ("scalar", "avx2", "avx512", "neon"):
        monkeypatch.setenv("LLAMA2_KERNELS", tier)
        if kernel_info()["tier"] == tier:
            out.append(tier)
    if amx and "avx512" in out:
        out.append("avx512-noamx")
    monkeypatch.delenv("LLAMA2_KERNELS")
    return out
