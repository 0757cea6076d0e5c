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
Q8_LOOSE = 0.05   # x max|logit|: one activation rounded the other way
Q8_VS_F32 = 0.2   # x max|logit|: int8 engine vs the exact fp32 model


def assert_q8_close(c: np.ndarray, ref_q8: np.ndarray, ref_f32: np.ndarray | None = None,
                    what: str = "") -> None:
    """C int8 logits vs reference.forward_q8.

    The C engine computes activations in float32 and the reference in
    float64, so once in a while an activation that sits within float32
    rounding of a .5 quantization boundary rounds the other way (one int8
    step on one element). That changes the logits of that position (and,
    through the KV cache, a little of later ones) by up to ~1% of the logit
    range. So: most positions must agree to Q8_TIGHT (any systematic error -
    unquantized activations, dropped row tails, wrong groups or scales - hits
    every position), at most a quarter may be off, but none by more than
    Q8_LOOSE, and the argmax must agree wherever the error cannot explain a
    swap."""
    assert c.shape == ref_q8.shape, (c.shape, ref_q8.shape)
    assert np.all(np.isfinite(c)), f"{what}: non-finite logits"
    m = float(np.abs(ref_q8).max())
    per_pos = np.abs(c - ref_q8).max(axis=1)
    info = f"{what}: per-position max |C - forward_q8| / max|logit| = " \
           f"{np.array2string(per_pos / m, precision=2)}"
    n_off = int((per_pos > Q8_TIGHT * m).sum())
    assert n_off <= len(per_pos) // 4, f"{n_off} positions beyond {Q8_TIGHT}; {info}"
    assert per_pos.max() <= Q8_LOOSE * m, info
    top2 = np.sort(ref_q8, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * per_pos
    assert np.array_equal(c.argmax(axis=1)[clear], ref_q8.argmax(axis=1)[clear]), info
    if ref_f32 is not None:
        err = np.abs(c - ref_f32).max()
        assert err <= Q8_VS_F32 * np.abs(ref_f32).max(), \
            f"{what}: int8 logits too far from the fp32 model: {err:.3g}"
