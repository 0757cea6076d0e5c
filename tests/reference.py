"""Pure numpy reference for the llama2c test suite.

Everything here follows docs/FORMAT.md, docs/FORWARD.md, docs/TOKENIZER.md and
docs/SAMPLING.md directly:
model file writers and readers for versions 0-5, Q8_0 and Q4_0 quantization, the
forward pass (fp32 math computed in float64, and the int8 engine's math),
the tokenizer.bin writer plus a reference encoder, and the xorshift RNG and
sampler computed in float32 like the C engine.

It depends on numpy only and is used both by the tests and by hand, e.g.
``python -c "import tests.reference"``.
"""
from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import numpy as np

MAGIC = 0x616B3432
HEADER_BYTES = 256

F32 = np.float32

# ---------------------------------------------------------------------------
# configuration and weights
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.dim * self.n_kv_heads // self.n_heads

    @property
    def kv_mul(self) -> int:
        return self.n_heads // self.n_kv_heads

    def params(self) -> tuple[int, ...]:
        return (self.dim, self.hidden_dim, self.n_layers, self.n_heads, self.n_kv_heads,
                self.vocab_size, self.seq_len)


# (name, shape) of the per-layer matrices, in file order
def _matrix_shapes(cfg: Config) -> list[tuple[str, tuple[int, int]]]:
    d, h, kv = cfg.dim, cfg.hidden_dim, cfg.kv_dim
    return [("wq", (d, d)), ("wk", (kv, d)), ("wv", (kv, d)), ("wo", (d, d)),
            ("w1", (h, d)), ("w2", (d, h)), ("w3", (h, d))]


def weight_shapes(cfg: Config, shared: bool = True) -> dict[str, tuple[int, ...]]:
    L = cfg.n_layers
    shapes: dict[str, tuple[int, ...]] = {
        "token_embedding": (cfg.vocab_size, cfg.dim),
        "rms_att": (L, cfg.dim),
        "rms_ffn": (L, cfg.dim),
        "rms_final": (cfg.dim,),
    }
    for name, (r, c) in _matrix_shapes(cfg):
        shapes[name] = (L, r, c)
    if not shared:
        shapes["wcls"] = (cfg.vocab_size, cfg.dim)
    return shapes


def is_shared(w: dict) -> bool:
    return "wcls" not in w


def random_weights(cfg: Config, seed: int, shared: bool = True) -> dict[str, np.ndarray]:
    """Random float32 weights whose activations and logits stay O(1).

    Matrices are normal / sqrt(fan_in) (a bit smaller for the residual
    projections wo and w2 so the residual stream does not grow), norms are
    1 +- 0.1, and the embedding / classifier are scaled so that logits have a
    standard deviation around 1 (not degenerate, not huge).
    """
    rng = np.random.default_rng(seed)
    L, d = cfg.n_layers, cfg.dim
    w: dict[str, np.ndarray] = {}

    def normal(shape, std):
        return (rng.standard_normal(shape) * std).astype(F32)

    # The final rmsnorm output has entries ~1, so classifier rows with std
    # 1/sqrt(d) give logits with std ~1; a shared embedding is that classifier.
    # An unshared embedding can be anything (the first rmsnorm rescales it).
    w["token_embedding"] = normal((cfg.vocab_size, d), 1.0 / np.sqrt(d) if shared else 1.0)
    w["rms_att"] = (1.0 + rng.uniform(-0.1, 0.1, (L, d))).astype(F32)
    w["rms_ffn"] = (1.0 + rng.uniform(-0.1, 0.1, (L, d))).astype(F32)
    w["rms_final"] = (1.0 + rng.uniform(-0.1, 0.1, (d,))).astype(F32)
    for name, (r, c) in _matrix_shapes(cfg):
        std = 1.0 / np.sqrt(c)
        if name in ("wo", "w2"):
            std *= 0.5
        if name in ("wq", "wk"):
            std *= 1.5  # make attention scores non-trivial
        w[name] = normal((L, r, c), std)
    if not shared:
        w["wcls"] = normal((cfg.vocab_size, d), 1.0 / np.sqrt(d))
    # canonical order
    return {k: w[k] for k in weight_shapes(cfg, shared)}


def check_weights(cfg: Config, w: dict) -> None:
    shapes = weight_shapes(cfg, is_shared(w))
    assert set(shapes) == set(k for k in w if not k.startswith("freq_cis")), sorted(w)
    for k, s in shapes.items():
        assert w[k].shape == s, (k, w[k].shape, s)


def n_params(cfg: Config, w: dict) -> int:
    return int(sum(w[k].size for k in weight_shapes(cfg, is_shared(w))))


def default_group_size(dim: int) -> int:
    gs = 64
    while dim % gs != 0:
        gs //= 2
    return gs


# ---------------------------------------------------------------------------
# file writers
# ---------------------------------------------------------------------------


def _f32bytes(a) -> bytes:
    return np.ascontiguousarray(a, dtype="<f4").tobytes()


def _freq_cis(cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    hs = cfg.head_size
    freqs = 1.0 / (cfg.rope_theta ** (np.arange(0, hs, 2)[: hs // 2] / hs))
    ang = np.outer(np.arange(cfg.seq_len), freqs)
    return np.cos(ang).astype(F32), np.sin(ang).astype(F32)


def header_v0(cfg: Config, shared: bool) -> bytes:
    p = list(cfg.params())
    if not shared:
        p[5] = -p[5]
    return struct.pack("<7i", *p)


def header_versioned(cfg: Config, version: int, shared: bool, group_size: int | None = None,
                     rope_theta: float | None = None, norm_eps: float | None = None) -> bytes:
    h = struct.pack("<Ii", MAGIC, version) + struct.pack("<7i", *cfg.params())
    h += struct.pack("<B", 1 if shared else 0)
    if version == 2:
        h += struct.pack("<i", group_size)
    elif version in (3, 4, 5):
        h += b"\0\0\0" + struct.pack("<ff", cfg.rope_theta if rope_theta is None else rope_theta,
                                     cfg.norm_eps if norm_eps is None else norm_eps)
    assert len(h) <= HEADER_BYTES
    return h + b"\0" * (HEADER_BYTES - len(h))


def body_v0(cfg: Config, w: dict) -> bytes:
    check_weights(cfg, w)
    parts = [w["token_embedding"], w["rms_att"], w["wq"], w["wk"], w["wv"], w["wo"],
             w["rms_ffn"], w["w1"], w["w2"], w["w3"], w["rms_final"]]
    if "freq_cis_real" in w:
        parts += [w["freq_cis_real"], w["freq_cis_imag"]]
    else:
        parts += list(_freq_cis(cfg))
    if not is_shared(w):
        parts.append(w["wcls"])
    return b"".join(_f32bytes(p) for p in parts)


def body_v1(cfg: Config, w: dict) -> bytes:
    check_weights(cfg, w)
    names = ["rms_att", "rms_ffn", "rms_final", "token_embedding",
             "wq", "wk", "wv", "wo", "w1", "w2", "w3"]
    if not is_shared(w):
        names.append("wcls")
    return b"".join(_f32bytes(w[n]) for n in names)


def body_v2(cfg: Config, w: dict, group_size: int) -> bytes:
    check_weights(cfg, w)
    out = [_f32bytes(w["rms_att"]), _f32bytes(w["rms_ffn"]), _f32bytes(w["rms_final"])]
    for m in q8_matrices(cfg, w):
        q, s = quantize_q80(m.ravel(), group_size)
        out.append(q.astype(np.int8).tobytes())
        out.append(_f32bytes(s))
    return b"".join(out)


def bf16_bits(a) -> np.ndarray:
    """Round float32 to bfloat16, nearest with ties to even, as uint16 bit
    patterns (finite inputs; written independently of llama2c.export)."""
    a = np.ascontiguousarray(a, dtype=np.float32).ravel()
    bits = a.view(np.uint32)
    low = bits & np.uint32(0xFFFF)
    high = (bits >> np.uint32(16)).astype(np.uint32)
    up = (low > 0x8000) | ((low == 0x8000) & ((high & 1) == 1))
    return (high + up.astype(np.uint32)).astype(np.uint16)


def bf16_round(a) -> np.ndarray:
    """float32 values rounded to bfloat16 and widened back (exact)."""
    a = np.asarray(a, dtype=np.float32)
    return (bf16_bits(a).astype(np.uint32) << np.uint32(16)).view(np.float32).reshape(a.shape)


def bf16_weights(w: dict) -> dict:
    """The weights a version 4 file of w holds: matrices bf16-rounded, norms as they are."""
    return {k: (v if k.startswith("rms_") or k.startswith("freq_") else bf16_round(v)) for k, v in w.items()}


def body_v4(cfg: Config, w: dict) -> bytes:
    check_weights(cfg, w)
    out = [_f32bytes(w["rms_att"]), _f32bytes(w["rms_ffn"]), _f32bytes(w["rms_final"])]
    for m in q8_matrices(cfg, w):  # the same matrices in the same order as version 2
        out.append(bf16_bits(m).astype("<u2").tobytes())
    return b"".join(out)


def body_v5(cfg: Config, w: dict) -> bytes:
    """Norms fp32, then the version 2 matrices as Q4_0 blocks; w2 fp32 when
    hidden_dim is not a multiple of 32 (docs/FORMAT.md, version 5)."""
    check_weights(cfg, w)
    out = [_f32bytes(w["rms_att"]), _f32bytes(w["rms_ffn"]), _f32bytes(w["rms_final"])]
    for name, m in q8_matrix_names(cfg, w):
        if name == "w2" and cfg.hidden_dim % 32:
            out.append(_f32bytes(m))
        else:
            out.append(quantize_q4_0(m).tobytes())
    return b"".join(out)


def q8_matrix_names(cfg: Config, w: dict) -> list[tuple[str, np.ndarray]]:
    """(name, matrix) of a version 2 file's matrices, in file order."""
    mats = [("token_embedding", w["token_embedding"])]
    for name, _ in _matrix_shapes(cfg):
        mats += [(name, w[name][l]) for l in range(cfg.n_layers)]
    if not is_shared(w):
        mats.append(("wcls", w["wcls"]))
    return mats


def q8_matrices(cfg: Config, w: dict) -> list[np.ndarray]:
    """The matrices of a version 2 file, in file order."""
    mats = [w["token_embedding"]]
    for name, _ in _matrix_shapes(cfg):
        mats += [w[name][l] for l in range(cfg.n_layers)]
    if not is_shared(w):
        mats.append(w["wcls"])
    return mats


def model_bytes(cfg: Config, w: dict, version: int, group_size: int | None = None) -> bytes:
    shared = is_shared(w)
    if version == 0:
        return header_v0(cfg, shared) + body_v0(cfg, w)
    if version == 1:
        return header_versioned(cfg, 1, shared) + body_v1(cfg, w)
    if version == 2:
        gs = default_group_size(cfg.dim) if group_size is None else group_size
        return header_versioned(cfg, 2, shared, gs) + body_v2(cfg, w, gs)
    if version == 3:
        return header_versioned(cfg, 3, shared) + body_v1(cfg, w)
    if version == 4:
        return header_versioned(cfg, 4, shared) + body_v4(cfg, w)
    if version == 5:
        return header_versioned(cfg, 5, shared) + body_v5(cfg, w)
    raise ValueError(f"unknown version {version}")


def _write(path, data: bytes) -> Path:
    path = Path(path)
    path.write_bytes(data)
    return path


def write_v0(path, cfg: Config, w: dict) -> Path:
    return _write(path, model_bytes(cfg, w, 0))


def write_v1(path, cfg: Config, w: dict) -> Path:
    return _write(path, model_bytes(cfg, w, 1))


def write_v2(path, cfg: Config, w: dict, group_size: int | None = None) -> Path:
    return _write(path, model_bytes(cfg, w, 2, group_size))


def write_v3(path, cfg: Config, w: dict) -> Path:
    return _write(path, model_bytes(cfg, w, 3))


def write_model(path, cfg: Config, w: dict, version: int, group_size: int | None = None) -> Path:
    return _write(path, model_bytes(cfg, w, version, group_size))


# ---------------------------------------------------------------------------
# file readers (used to check the writers against the reference files)
# ---------------------------------------------------------------------------


def _take(buf: bytes, off: int, shape, dtype="<f4") -> tuple[np.ndarray, int]:
    n = int(np.prod(shape))
    itemsize = np.dtype(dtype).itemsize
    a = np.frombuffer(buf, dtype=dtype, count=n, offset=off).reshape(shape)
    return a.astype(F32 if dtype == "<f4" else np.int8), off + n * itemsize


def read_v0(path) -> tuple[Config, dict[str, np.ndarray]]:
    """Reads a legacy (version 0) file; keeps the freq_cis tables so that
    write_v0 reproduces the file byte for byte."""
    buf = Path(path).read_bytes()
    p = struct.unpack_from("<7i", buf, 0)
    shared = p[5] > 0
    cfg = Config(p[0], p[1], p[2], p[3], p[4], abs(p[5]), p[6])
    L, d, h, kv, V = cfg.n_layers, cfg.dim, cfg.hidden_dim, cfg.kv_dim, cfg.vocab_size
    off = 28
    w: dict[str, np.ndarray] = {}
    for name, shape in [("token_embedding", (V, d)), ("rms_att", (L, d)), ("wq", (L, d, d)),
                        ("wk", (L, kv, d)), ("wv", (L, kv, d)), ("wo", (L, d, d)),
                        ("rms_ffn", (L, d)), ("w1", (L, h, d)), ("w2", (L, d, h)),
                        ("w3", (L, h, d)), ("rms_final", (d,)),
                        ("freq_cis_real", (cfg.seq_len, cfg.head_size // 2)),
                        ("freq_cis_imag", (cfg.seq_len, cfg.head_size // 2))]:
        w[name], off = _take(buf, off, shape)
    if not shared:
        w["wcls"], off = _take(buf, off, (V, d))
    if off != len(buf):
        raise ValueError(f"{path}: {len(buf) - off} unexpected trailing bytes")
    return cfg, w


def read_versioned(path) -> tuple[Config, dict[str, np.ndarray], int, int | None]:
    """Reads a version 1, 2 or 3 file. Returns (cfg, weights, version, group_size);
    version 2 weights come back dequantized."""
    buf = Path(path).read_bytes()
    magic, version = struct.unpack_from("<Ii", buf, 0)
    if magic != MAGIC:
        raise ValueError("bad magic")
    p = struct.unpack_from("<7i", buf, 8)
    shared = buf[36] != 0
    theta, eps = 10000.0, 1e-5
    gs = None
    if version == 2:
        (gs,) = struct.unpack_from("<i", buf, 37)
    if version == 3:
        theta, eps = (float(v) for v in struct.unpack_from("<ff", buf, 40))
    cfg = Config(*p, rope_theta=theta, norm_eps=eps)
    L, d = cfg.n_layers, cfg.dim
    off = HEADER_BYTES
    w: dict[str, np.ndarray] = {}
    w["rms_att"], off = _take(buf, off, (L, d))
    w["rms_ffn"], off = _take(buf, off, (L, d))
    w["rms_final"], off = _take(buf, off, (d,))
    shapes = weight_shapes(cfg, shared)
    order = ["token_embedding"] + [n for n, _ in _matrix_shapes(cfg)] + ([] if shared else ["wcls"])
    if version in (1, 3):
        for name in order:
            w[name], off = _take(buf, off, shapes[name])
    elif version == 2:
        def q8(shape):
            nonlocal off
            n = int(np.prod(shape))
            q, off = _take(buf, off, (n,), "i1")
            s, off = _take(buf, off, (n // gs,))
            return dequantize(q, s, gs).reshape(shape)
        for name in order:
            shape = shapes[name]
            if len(shape) == 3:
                w[name] = np.stack([q8(shape[1:]) for _ in range(L)])
            else:
                w[name] = q8(shape)
    else:
        raise ValueError(f"unsupported version {version}")
    if off != len(buf):
        raise ValueError(f"{path}: {len(buf) - off} unexpected trailing bytes")
    return cfg, {k: w[k] for k in shapes}, version, gs


# ---------------------------------------------------------------------------
# Q8_0
# ---------------------------------------------------------------------------


def quantize_q80(flat, gs: int) -> tuple[np.ndarray, np.ndarray]:
    """Weights as the exporter quantizes them: per group of gs consecutive
    values scale = max|w| / 127 (float32), q = round half to even (w / scale);
    a zero scale gives q = 0. len(flat) must be a multiple of gs."""
    x = np.asarray(flat, dtype=F32).reshape(-1)
    if gs <= 0 or x.size % gs != 0:
        raise ValueError(f"{x.size} values do not split into groups of {gs}")
    g = x.reshape(-1, gs)
    scale = (np.abs(g).max(axis=1) / F32(127.0)).astype(F32)
    safe = np.where(scale == 0, F32(1.0), scale).astype(F32)
    q = np.rint(g / safe[:, None]).astype(F32)
    q[scale == 0] = 0
    q = np.clip(q, -127, 127).astype(np.int8)
    return q.reshape(-1), scale


def dequantize(q, s, gs: int) -> np.ndarray:
    q = np.asarray(q, dtype=np.int8).reshape(-1, gs).astype(F32)
    return (q * np.asarray(s, dtype=F32)[:, None]).reshape(-1).astype(F32)


def q8_roundtrip(m: np.ndarray, gs: int) -> np.ndarray:
    """A weight matrix as the int8 engine sees it (quantized over the
    flattened matrix, then dequantized)."""
    q, s = quantize_q80(m.reshape(-1), gs)
    return dequantize(q, s, gs).reshape(m.shape)


# ---------------------------------------------------------------------------
# Q4_0 (version 5): llama.cpp's reference quantizer, written from its C loop
# ---------------------------------------------------------------------------


def quantize_q4_0(m) -> np.ndarray:
    """llama.cpp's quantize_row_q4_0_ref on each row (rows a multiple of 32
    long), in float32: per block, max = the value of largest |x| (first one
    on ties), d = max / -8, id = 1/d (0 if d == 0), q = min(15, (int)(x*id +
    8.5)); stored as fp16 d then byte j = q[j] | q[j+16] << 4. Returns the
    bytes as uint8, 18 per block, rows after rows."""
    x = np.ascontiguousarray(m, dtype=F32).reshape(-1, 32)
    out = np.zeros((x.shape[0], 18), dtype=np.uint8)
    for b in range(x.shape[0]):
        blk = x[b]
        amax, mx = F32(0), F32(0)
        for v in blk:
            if amax < abs(v):
                amax, mx = abs(v), v
        d = F32(mx / F32(-8))
        inv = F32(F32(1) / d) if d != 0 else F32(0)
        q = [min(15, int(F32(F32(v * inv) + F32(8.5)))) for v in blk]
        out[b, :2] = np.frombuffer(np.float16(d).tobytes(), dtype=np.uint8)
        out[b, 2:] = [q[j] | (q[j + 16] << 4) for j in range(16)]
    return out.reshape(-1)


def dequantize_q4_0(data, shape) -> np.ndarray:
    """(nibble - 8) * fp16 scale, per block of 32."""
    blocks = np.asarray(data, dtype=np.uint8).reshape(-1, 18)
    d = blocks[:, :2].copy().view("<f2").astype(F32)[:, 0]
    lo = (blocks[:, 2:] & 15).astype(np.int32) - 8
    hi = (blocks[:, 2:] >> 4).astype(np.int32) - 8
    q = np.concatenate([lo, hi], axis=1).astype(F32)
    return (q * d[:, None]).reshape(shape).astype(F32)


def q4_roundtrip(m: np.ndarray) -> np.ndarray:
    return dequantize_q4_0(quantize_q4_0(m), m.shape)


def q4_weights(cfg: Config, w: dict) -> dict[str, np.ndarray]:
    """The weights as a version 5 file holds them: every matrix through Q4_0
    (w2 left fp32 when hidden_dim % 32 != 0); norms as they are."""
    dq = {k: v for k, v in w.items() if not k.startswith("freq_cis")}
    dq["token_embedding"] = q4_roundtrip(w["token_embedding"])
    for name, _ in _matrix_shapes(cfg):
        if name == "w2" and cfg.hidden_dim % 32:
            continue
        dq[name] = np.stack([q4_roundtrip(w[name][l]) for l in range(cfg.n_layers)])
    if "wcls" in w:
        dq["wcls"] = q4_roundtrip(w["wcls"])
    return dq


def c_round(v: np.ndarray) -> np.ndarray:
    """C's round(): half away from zero."""
    return np.sign(v) * np.floor(np.abs(v) + 0.5)


def quantize_activation(x: np.ndarray, gs: int) -> np.ndarray:
    """The int8 engine's activation quantization, returned dequantized:
    groups of gs along the vector from index 0 (the last one may be partial),
    scale = max|x| / 127, q = round half away from zero."""
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros_like(x)
    for start in range(0, x.size, gs):
        g = x[start:start + gs]
        scale = np.abs(g).max() / 127.0
        if scale == 0:
            continue
        out[start:start + gs] = c_round(g / scale) * scale
    return out


# ---------------------------------------------------------------------------
# forward pass
# ---------------------------------------------------------------------------


def _rmsnorm(x, w, eps):
    return x * w / np.sqrt(np.mean(x * x) + eps)


def _rope(v: np.ndarray, pos: int, cfg: Config) -> np.ndarray:
    """Rotates pairs (i, i+1) of v with the angle pos / theta^((i mod hs)/hs)."""
    n = v.size
    i = np.arange(0, n, 2)
    freq = 1.0 / (float(cfg.rope_theta) ** ((i % cfg.head_size) / cfg.head_size))
    a = pos * freq
    c, s = np.cos(a), np.sin(a)
    v0, v1 = v[0::2], v[1::2]
    out = np.empty_like(v)
    out[0::2] = v0 * c - v1 * s
    out[1::2] = v0 * s + v1 * c
    return out


def _silu(z):
    return z / (1.0 + np.exp(-z))


class Runner:
    """Incremental float64 forward pass with a KV cache, one token at a time;
    act (if given) is applied to every matmul input vector (the int8 engine's
    activation quantization)."""

    def __init__(self, cfg: Config, w: dict, act=None):
        self.cfg = cfg
        self.f = {k: np.asarray(v, dtype=np.float64) for k, v in w.items()
                  if not k.startswith("freq_cis")}
        self.act = act if act is not None else (lambda v: v)
        hs = cfg.head_size
        self.kcache = np.zeros((cfg.n_layers, cfg.seq_len, cfg.n_kv_heads, hs))
        self.vcache = np.zeros((cfg.n_layers, cfg.seq_len, cfg.n_kv_heads, hs))

    def copy(self) -> "Runner":
        """An independent copy (same weights, copied KV cache)."""
        r = Runner.__new__(Runner)
        r.cfg, r.f, r.act = self.cfg, self.f, self.act
        r.kcache, r.vcache = self.kcache.copy(), self.vcache.copy()
        return r

    def step(self, token: int, pos: int) -> np.ndarray:
        cfg, f, act = self.cfg, self.f, self.act
        if hasattr(act, "begin"):
            act.begin(pos)
        hs = cfg.head_size
        eps = float(cfg.norm_eps)
        kvh = np.arange(cfg.n_heads) // cfg.kv_mul
        x = f["token_embedding"][token].copy()
        for l in range(cfg.n_layers):
            xb = act(_rmsnorm(x, f["rms_att"][l], eps))
            q = _rope(f["wq"][l] @ xb, pos, cfg)
            k = _rope(f["wk"][l] @ xb, pos, cfg)
            v = f["wv"][l] @ xb
            self.kcache[l, pos] = k.reshape(cfg.n_kv_heads, hs)
            self.vcache[l, pos] = v.reshape(cfg.n_kv_heads, hs)
            qh = q.reshape(cfg.n_heads, hs)
            keys = self.kcache[l, : pos + 1][:, kvh]      # (t, n_heads, hs)
            vals = self.vcache[l, : pos + 1][:, kvh]
            scores = np.einsum("hd,thd->ht", qh, keys) / np.sqrt(hs)
            scores = np.exp(scores - scores.max(axis=1, keepdims=True))
            scores /= scores.sum(axis=1, keepdims=True)
            att = np.einsum("ht,thd->hd", scores, vals).reshape(-1)
            x = x + f["wo"][l] @ act(att)
            xb = act(_rmsnorm(x, f["rms_ffn"][l], eps))
            hb = _silu(f["w1"][l] @ xb) * (f["w3"][l] @ xb)
            x = x + f["w2"][l] @ act(hb)
        x = act(_rmsnorm(x, f["rms_final"], eps))
        wcls = f["wcls"] if "wcls" in f else f["token_embedding"]
        return wcls @ x


def _run(cfg: Config, w: dict, tokens, act=None) -> np.ndarray:
    tokens = list(tokens)
    if len(tokens) > cfg.seq_len:
        raise ValueError("more tokens than seq_len")
    r = Runner(cfg, w, act)
    return np.stack([r.step(t, p) for p, t in enumerate(tokens)]) if tokens else \
        np.zeros((0, cfg.vocab_size))


def forward(cfg: Config, w: dict, tokens) -> np.ndarray:
    """Logits (len(tokens), vocab) in float64 for positions 0..n-1 (SPEC 3)."""
    return _run(cfg, w, list(tokens))


def dequantized_weights(cfg: Config, w: dict, group_size: int) -> dict[str, np.ndarray]:
    """The weights as a Q8_0 engine holds them: every matrix (embedding,
    per-layer matrices, wcls) quantized over its flattened values; norms as is."""
    dq = {k: v for k, v in w.items() if not k.startswith("freq_cis")}
    dq["token_embedding"] = q8_roundtrip(w["token_embedding"], group_size)
    for name, _ in _matrix_shapes(cfg):
        dq[name] = np.stack([q8_roundtrip(w[name][l], group_size) for l in range(cfg.n_layers)])
    if "wcls" in w:
        dq["wcls"] = q8_roundtrip(w["wcls"], group_size)
    return dq


def forward_q8(cfg: Config, w: dict, tokens, group_size: int | None = None,
               quantize_activations: bool = True) -> np.ndarray:
    """The int8 engine's math: Q8_0 weights (dequantized), and every matmul
    input activation quantized per group (round half away from zero).
    quantize_activations=False gives the same weights with exact activations
    (useful to size tolerances)."""
    gs = default_group_size(cfg.dim) if group_size is None else group_size
    dq = dequantized_weights(cfg, w, gs)
    act = (lambda v: quantize_activation(v, gs)) if quantize_activations else None
    return _run(cfg, dq, list(tokens), act)


class Q8Activations:
    """The int8 engine's activation quantizer (see quantize_activation) that
    also records near ties - elements whose x / scale lies within `delta`
    of a rounding boundary (k + 0.5), where float32 rounding in the engine may
    legitimately round the other way - and can force chosen elements to the
    other rounding. Elements are named (pos, call, index): call counts the
    quantizations within one forward step."""

    def __init__(self, gs: int, delta: float = 0.0, flips=frozenset(), exact=None):
        self.gs, self.delta, self.flips = gs, delta, frozenset(flips)
        self.exact = exact  # exact(call): that call's input goes to an fp32 matrix, unquantized
        self.pos, self.call = 0, 0
        self.near: list[tuple[int, int, int]] = []

    def begin(self, pos: int) -> None:
        self.pos, self.call = pos, 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if self.exact is not None and self.exact(self.call):
            self.call += 1
            return x
        out = np.zeros_like(x)
        for start in range(0, x.size, self.gs):
            g = x[start:start + self.gs]
            scale = np.abs(g).max() / 127.0
            if scale == 0:
                continue
            v = g / scale
            q = c_round(v)
            if self.delta > 0:
                a = np.abs(v)
                for j in np.nonzero(np.abs(a - np.floor(a) - 0.5) < self.delta)[0]:
                    key = (self.pos, self.call, start + int(j))
                    self.near.append(key)
                    if key in self.flips:
                        lo = np.floor(a[j])
                        other = lo if abs(q[j]) == lo + 1 else lo + 1
                        q[j] = np.sign(v[j]) * other
            out[start:start + self.gs] = q * scale
        self.call += 1
        return out


def forward_q8_explain(cfg: Config, w: dict, tokens, group_size: int, target: np.ndarray,
                       tol: float, delta: float = 2e-3, max_flips: int = 4, dq: dict | None = None,
                       exact=None):
    """forward_q8, allowing for the engine's float32 rounding of activations.

    An engine computing activations in float32 rounds an activation that sits
    within float32 noise of a k + 0.5 boundary either way; one such flip moves
    the logits of its position and, through the KV cache, of every later one.
    Starting from forward_q8, this looks for the earliest position where
    `target` (the engine's logits, shape (n, vocab)) is more than `tol` away,
    and tries forcing the other rounding on each near tie (within `delta`
    of a boundary) up to that position, keeping the one that makes the
    target agree furthest. It repeats up to max_flips times.

    Returns (logits, flips): the reference logits of the best explanation
    found (forward_q8's own when no flip is needed) and the flips used. The
    caller checks that target agrees with those logits everywhere.
    dq: the weights as the engine holds them (default: w through Q8_0 with
    group_size; q4_weights(cfg, w) for the Q4_0 engine, whose activations
    are quantized in groups of 32). exact: see Q8Activations (the calls
    whose matrix is fp32: w2 of a version 5 file with hidden_dim % 32 != 0)."""
    gs = group_size
    tokens = list(tokens)
    if dq is None:
        dq = dequantized_weights(cfg, w, gs)
    n = len(tokens)

    def run(flips, base=None, start=0):
        """Runs positions start..n-1 (earlier rows, near ties and KV cache
        come from base, a previous run)."""
        act = Q8Activations(gs, delta, flips, exact)
        if base is None:
            r, rows = Runner(cfg, dq, act), []
        else:
            r = base[2].copy()
            r.act = act
            rows = list(base[0][:start])
            act.near = [k for k in base[1] if k[0] < start]
        for p in range(start, n):
            rows.append(r.step(tokens[p], p))
        return np.stack(rows), act.near, r

    def first_bad(logits):
        bad = np.nonzero(np.abs(target - logits).max(axis=1) > tol)[0]
        return int(bad[0]) if bad.size else n

    flips: frozenset = frozenset()
    cur = run(flips)
    for _ in range(max_flips):
        p = first_bad(cur[0])
        if p == n:
            break
        best = None
        # most flips show at their own position first: try those first
        cands = sorted((k for k in cur[1] if k[0] <= p and k not in flips),
                       key=lambda k: (-k[0], k[1], k[2]))
        for k in cands:
            cand = run(flips | {k}, base=cur, start=k[0])
            q = first_bad(cand[0])
            if q > p and (best is None or q > best[0]):
                best = (q, k, cand)
                if q == n:
                    break
        if best is None:
            break
        flips = flips | {best[1]}
        cur = best[2]
    return cur[0], sorted(flips)


def greedy(cfg: Config, w: dict, steps: int, prompt=(1,)) -> list[int]:
    """Greedy decoding with the float64 reference, like the CLI with -t 0:
    feeds the prompt (BOS by default), then argmax tokens; returns the tokens
    chosen after the prompt, stopping before a BOS or after steps positions."""
    r = Runner(cfg, w)
    prompt = list(prompt)
    token, out = prompt[0], []
    for pos in range(min(steps, cfg.seq_len)):
        logits = r.step(token, pos)
        if pos + 1 < len(prompt):
            token = prompt[pos + 1]
            continue
        token = int(np.argmax(logits))
        if token == 1:
            break
        out.append(token)
    return out


# ---------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------


def write_tokenizer_bin(path, pieces: list[bytes], scores: list[float],
                        max_len: int | None = None) -> Path:
    if max_len is None:
        max_len = max((len(p) for p in pieces), default=0)
    out = [struct.pack("<I", max_len)]
    for p, s in zip(pieces, scores, strict=True):
        out.append(struct.pack("<fi", s, len(p)) + p)
    return _write(path, b"".join(out))


def read_tokenizer_bin(path) -> tuple[int, list[bytes], list[float]]:
    buf = Path(path).read_bytes()
    (max_len,) = struct.unpack_from("<I", buf, 0)
    off = 4
    pieces, scores = [], []
    while off < len(buf):
        s, n = struct.unpack_from("<fi", buf, off)
        off += 8
        pieces.append(buf[off:off + n])
        scores.append(s)
        off += n
    return max_len, pieces, scores


def tokenizer_from_sentencepiece(sp) -> tuple[list[bytes], list[float]]:
    """Pieces and scores exported from a SentencePieceProcessor (SPEC 4)."""
    pieces, scores = [], []
    for i in range(sp.get_piece_size()):
        t = sp.id_to_piece(i)
        if i == sp.bos_id():
            t = "\n<s>\n"
        elif i == sp.eos_id():
            t = "\n</s>\n"
        pieces.append(t.replace("\u2581", " ").encode("utf-8"))
        scores.append(sp.get_score(i))
    return pieces, scores


_SAMPLE_TEXT = (
    "Once upon a time there was a little cat. The cat liked to play in the sun. "
    "One day the cat saw a big dog. The dog said hello and they played together. "
    "They were happy and the sun was warm. The end."
)


def make_vocab(vocab_size: int, text: str = _SAMPLE_TEXT) -> tuple[list[bytes], list[float]]:
    """A small llama2.c-style vocabulary for random test models: <unk>, BOS,
    EOS, the 256 byte pieces, printable ASCII characters, then BPE merges
    learned from `text` (score = -merge rank), padded with unreachable pieces."""
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [b"<0x%02X>" % i for i in range(256)]
    scores = [0.0] * len(pieces)
    chars = [chr(c) for c in range(32, 127) if chr(c) not in "<>"]
    for i, c in enumerate(chars):
        pieces.append(c.encode())
        scores.append(-1e6 - i)
    words = [[c.encode() for c in " " + wd] for wd in text.split()]
    rank = 0
    while len(pieces) < vocab_size:
        counts: dict[tuple[bytes, bytes], int] = {}
        for wd in words:
            for a, b in zip(wd, wd[1:]):
                counts[(a, b)] = counts.get((a, b), 0) + 1
        if not counts:
            break
        (a, b), _ = max(counts.items(), key=lambda kv: kv[1])
        merged = a + b
        if merged not in pieces:
            pieces.append(merged)
            scores.append(float(-rank))
            rank += 1
        for wd in words:
            i = 0
            while i < len(wd) - 1:
                if wd[i] == a and wd[i + 1] == b:
                    wd[i: i + 2] = [merged]
                i += 1
    while len(pieces) < vocab_size:
        pieces.append(b"<pad%d>" % len(pieces))
        scores.append(-1e9)
    return pieces[:vocab_size], scores[:vocab_size]


def render(pieces: list[bytes], tokens: list[int]) -> bytes:
    """The bytes the CLI prints for a token sequence that starts with the
    first fed token (normally BOS): SPEC 4 decode of each (prev, token) pair,
    dropping single bytes that are neither printable ASCII nor whitespace
    (multi-byte UTF-8 is passed through)."""
    out = bytearray()
    for prev, tok in zip(tokens, tokens[1:]):
        p = pieces[tok]
        if prev == 1 and p.startswith(b" "):
            p = p[1:]
        if len(p) == 6 and p.startswith(b"<0x") and p.endswith(b">"):
            try:
                p = bytes([int(p[3:5], 16)])
            except ValueError:
                pass
        if len(p) == 1 and p[0] < 0x80 and not (32 <= p[0] < 127 or p in b" \t\n\v\f\r"):
            continue
        out += p
    return bytes(out)


def _utf8_codepoints(b: bytes) -> list[bytes]:
    out = []
    i = 0
    while i < len(b):
        j = i + 1
        while j < len(b) and (b[j] & 0xC0) == 0x80 and j - i < 4:
            j += 1
        out.append(b[i:j])
        i = j
    return out


def encode(pieces: list[bytes], scores: list[float], text: str | bytes, bos: bool = True,
           eos: bool = False) -> list[int]:
    """SPEC 4 encode (BPE by piece score, leftmost on ties)."""
    lookup = {}
    for i, p in enumerate(pieces):
        lookup.setdefault(p, i)
    data = text.encode("utf-8") if isinstance(text, str) else text
    toks: list[int] = [1] if bos else []
    body: list[int] = []
    if data:
        body.append(lookup[b" "])
    for cp in _utf8_codepoints(data):
        if cp in lookup:
            body.append(lookup[cp])
        else:
            body.extend(b + 3 for b in cp)
    while True:
        best, best_i, best_id = -np.inf, -1, -1
        for i in range(len(body) - 1):
            m = lookup.get(pieces[body[i]] + pieces[body[i + 1]])
            if m is not None and scores[m] > best:
                best, best_i, best_id = scores[m], i, m
        if best_i < 0:
            break
        body[best_i: best_i + 2] = [best_id]
    toks += body
    if eos:
        toks.append(2)
    return toks


# ---------------------------------------------------------------------------
# RNG and sampler (float32 arithmetic, sequential sums, like the C code)
# ---------------------------------------------------------------------------

_M64 = (1 << 64) - 1


class Rng:
    """xorshift* RNG of SPEC 5."""

    def __init__(self, seed: int):
        self.state = seed & _M64

    def u32(self) -> int:
        s = self.state
        s ^= s >> 12
        s ^= (s << 25) & _M64
        s ^= s >> 27
        self.state = s
        return ((s * 0x2545F4914F6CDD1D) & _M64) >> 32

    def f32(self) -> np.float32:
        return F32(self.u32() >> 8) / F32(16777216.0)


def softmax_f32(x: np.ndarray) -> np.ndarray:
    """C-style float softmax: max, expf(x - max), sequential float sum, divide.
    expf is taken as the correctly rounded exp (glibc's is within 0.502 ulp)."""
    x = np.asarray(x, dtype=F32)
    m = x.max()
    e = np.exp((x - m).astype(np.float64)).astype(F32)
    total = np.add.accumulate(e, dtype=F32)[-1]  # sequential float32 sum
    return (e / total).astype(F32)


def sample(logits: np.ndarray, temperature: float, topp: float, rng: Rng) -> int:
    """SPEC 5 sample() with float32 arithmetic (matches the C sampler)."""
    logits = np.asarray(logits, dtype=F32)
    n = logits.size
    if temperature == 0.0:
        return int(np.argmax(logits))
    probs = softmax_f32((logits / F32(temperature)).astype(F32))
    coin = rng.f32()
    topp32 = F32(topp)
    if topp32 <= 0 or topp32 >= 1:
        cdf = np.add.accumulate(probs, dtype=F32)
        hit = np.nonzero(coin < cdf)[0]
        return int(hit[0]) if hit.size else n - 1
    cutoff = F32(F32(1.0) - topp32) / F32(n - 1)
    idx = np.nonzero(probs >= cutoff)[0]
    order = idx[np.argsort(-probs[idx], kind="stable")]
    p = probs[order]
    cum = np.add.accumulate(p, dtype=F32)
    over = np.nonzero(cum > topp32)[0]
    last = int(over[0]) if over.size else len(order) - 1
    r = F32(coin * cum[last])
    hit = np.nonzero(r < cum[: last + 1])[0]
    return int(order[hit[0]]) if hit.size else int(order[last])
