"""The .bin model format (docs/FORMAT.md): headers, tensor
order, Q8_0 and Q4_0 quantization and the legacy RoPE tables. numpy only (the
legacy tables use torch, imported when they are computed)."""
from __future__ import annotations

import math
import struct

import numpy as np

MAGIC = 0x616B3432          # "ak42"
HEADER_BYTES = 256
LEGACY_HEADER_BYTES = 28
VERSIONS = (0, 1, 2, 3, 4, 5)

# per-layer matrices of the file formats, in file order:
# (file name, canonical key inside layer i)
LAYER_MATRICES = [
    ("wq", "attention.wq.weight"),
    ("wk", "attention.wk.weight"),
    ("wv", "attention.wv.weight"),
    ("wo", "attention.wo.weight"),
    ("w1", "feed_forward.w1.weight"),
    ("w2", "feed_forward.w2.weight"),
    ("w3", "feed_forward.w3.weight"),
]


def layer_key(i: int, name: str) -> str:
    return f"layers.{i}.{name}"


def default_group_size(dim: int, start: int = 64) -> int:
    """`start` (64 by default) halved until it divides dim."""
    gs = int(start)
    if gs <= 0:
        raise ValueError(f"group size must be positive, got {start}")
    while dim % gs != 0:
        gs //= 2
    return gs


def quantize_q80(w: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Q8_0 over the flattened array: per group of group_size consecutive
    values scale = max|w| / 127 (float32) and q = w / scale rounded half to
    even (float32 division), in [-127, 127]; an all-zero group has scale 0
    and q 0. Returns (int8 values, float32 scales)."""
    x = np.ascontiguousarray(w, dtype=np.float32).reshape(-1)
    if x.size % group_size != 0:
        raise ValueError(f"{x.size} values do not split into groups of {group_size}")
    g = x.reshape(-1, group_size)
    scale = np.abs(g).max(axis=1) / np.float32(127.0)
    scale = scale.astype(np.float32)
    safe = np.where(scale == 0, np.float32(1.0), scale)
    q = np.rint(g / safe[:, None])
    np.clip(q, -127, 127, out=q)
    return q.astype(np.int8).reshape(-1), scale


# ---------------------------------------------------------------------------
# Q4_0 (version 5 and GGUF): llama.cpp's blocks
# ---------------------------------------------------------------------------

Q4_BLOCK = 32          # values per block
Q4_BLOCK_BYTES = 18    # fp16 scale + 16 bytes of nibbles
Q4_CHUNK = 1 << 20     # values quantized at a time (bounds the temporaries)


def q4_0_bytes(n: int) -> int:
    """Bytes of n Q4_0 values (n a multiple of 32)."""
    return n // Q4_BLOCK * Q4_BLOCK_BYTES


def v5_w2_is_q4(hidden_dim: int) -> bool:
    """Version 5 stores w2 (rows of hidden_dim values) as Q4_0 when its rows
    are whole blocks, else as fp32."""
    return hidden_dim % Q4_BLOCK == 0


def quantize_q4_0(w: np.ndarray) -> np.ndarray:
    """Q4_0 blocks of a float array whose rows are multiples of 32 long, as
    llama.cpp's reference quantizer and the gguf package compute them (the
    bytes are identical to gguf.quants.quantize(w, Q4_0)): per block of 32
    consecutive values, m = the value of largest magnitude (the first one on
    a tie), d = m / -8 and id = 1 / d (0 when d is 0) in float32, each value
    q = min(15, trunc(x * id + 8.5)) (float32 product and sum: round half up
    of x / d, plus 8), the scale stored as fp16 (round to nearest even).
    Block layout: fp16 d, then byte j = q[j] | q[j + 16] << 4. Returns uint8
    of shape (..., cols // 32 * 18). Raises ValueError for NaN, infinite or
    too large (|w| > 8 * 65504: the fp16 scale would overflow) values."""
    x = np.ascontiguousarray(w, dtype=np.float32)
    shape = x.shape
    if not shape or shape[-1] % Q4_BLOCK:
        raise ValueError(f"Q4_0 needs rows that are a multiple of {Q4_BLOCK} long (got shape {shape})")
    flat = x.reshape(-1, Q4_BLOCK)
    out = np.empty((flat.shape[0], Q4_BLOCK_BYTES), dtype=np.uint8)
    step = max(1, Q4_CHUNK // Q4_BLOCK)
    for b0 in range(0, flat.shape[0], step):
        blocks = flat[b0:b0 + step]
        if not np.isfinite(blocks).all():
            raise ValueError("Q4_0: the weights hold a NaN or infinity")
        imax = np.abs(blocks).argmax(axis=1)[:, None]
        m = np.take_along_axis(blocks, imax, axis=1)
        d = m / np.float32(-8)
        with np.errstate(divide="ignore"):
            inv = np.where(d == 0, np.float32(0), np.float32(1) / np.where(d == 0, np.float32(1), d))
        q = np.trunc(blocks * inv.astype(np.float32) + np.float32(8.5)).astype(np.float32)
        q = np.clip(q, 0, 15).astype(np.uint8)
        with np.errstate(over="ignore"):
            d16 = d.astype("<f2")
        if not np.isfinite(d16).all():
            raise ValueError("Q4_0: a weight is too large for an fp16 block scale (|w| > 524032)")
        out[b0:b0 + step, :2] = d16.view(np.uint8)
        out[b0:b0 + step, 2:] = q[:, :16] | (q[:, 16:] << np.uint8(4))
    return out.reshape(*shape[:-1], shape[-1] // Q4_BLOCK * Q4_BLOCK_BYTES)


def dequantize_q4_0(data: np.ndarray, shape) -> np.ndarray:
    """float32 (nibble - 8) * d of Q4_0 bytes (exact), in `shape`."""
    blocks = np.asarray(data, dtype=np.uint8).reshape(-1, Q4_BLOCK_BYTES)
    d = blocks[:, :2].copy().view("<f2").astype(np.float32)
    qs = blocks[:, 2:]
    q = np.concatenate([qs & np.uint8(15), qs >> np.uint8(4)], axis=1).astype(np.int8) - np.int8(8)
    return (q.astype(np.float32) * d).reshape(shape)


def to_bf16(w: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), rounded to nearest, ties to
    even, as torch's .to(torch.bfloat16); NaN stays NaN."""
    u = np.ascontiguousarray(w, dtype="<f4").reshape(-1).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    out = np.where(nan, (u >> 16) | 0x40, rounded).astype(np.uint16)
    return out


def from_bf16(h: np.ndarray) -> np.ndarray:
    """bf16 bit patterns -> float32 (exact)."""
    return (np.asarray(h, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def dequantize_q80(q: np.ndarray, scale: np.ndarray, group_size: int) -> np.ndarray:
    """float32 q * scale per group (one rounding, like the engine)."""
    qf = np.asarray(q, dtype=np.int8).reshape(-1, group_size).astype(np.float32)
    return (qf * np.asarray(scale, dtype=np.float32)[:, None]).reshape(-1)


def legacy_freq_cis(head_size: int, seq_len: int, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """The freq_cis_real / freq_cis_imag tables of a version 0 file,
    (seq_len, head_size/2) each, computed the way llama2.c's legacy export
    does: in float32 torch ops (inverse frequencies 1 / theta^(2i/hs) from a
    float32 arange, outer product with the positions, cos and sin). The
    engine ignores them; this reproduces existing files bit for bit. Without
    torch the same formula runs in numpy float32 (a torch-free install can
    still write version 0; those ignored tables may then differ in the last
    bit from llama2.c's)."""
    try:
        import torch
    except ImportError:
        inv = np.float32(1.0) / (np.float32(theta) ** (np.arange(0, head_size, 2, dtype=np.float32)[: head_size // 2]
                                                       / np.float32(head_size)))
        ang = np.outer(np.arange(seq_len, dtype=np.float32), inv).astype(np.float32)
        return np.cos(ang), np.sin(ang)
    with torch.device("cpu"):
        inv = 1.0 / (theta ** (torch.arange(0, head_size, 2)[: head_size // 2].float() / head_size))
        ang = torch.outer(torch.arange(seq_len), inv).float()
        return torch.cos(ang).numpy(), torch.sin(ang).numpy()


def pack_header(version: int, params: tuple[int, ...], shared: bool, group_size: int | None = None,
                rope_theta: float = 10000.0, norm_eps: float = 1e-5, rope_scaling=None) -> bytes:
    """The header of a model file. params = (dim, hidden_dim, n_layers,
    n_heads, n_kv_heads, vocab_size, seq_len) with vocab_size positive;
    rope_scaling (a RopeScaling, versions 3-5 only) goes at bytes 48-67."""
    dim, hidden, L, H, KV, V, S = (int(v) for v in params)
    if rope_scaling is not None and version not in (3, 4, 5):
        raise ValueError(f"version {version} files cannot carry rope scaling ({rope_scaling.type}): "
                         "use version 3, 4 or 5")
    if version == 0:
        return struct.pack("<7i", dim, hidden, L, H, KV, V if shared else -V, S)
    h = struct.pack("<Ii7iB", MAGIC, version, dim, hidden, L, H, KV, V, S, 1 if shared else 0)
    if version == 2:
        h += struct.pack("<i", int(group_size))
    elif version in (3, 4, 5):
        h += b"\0\0\0" + struct.pack("<ff", rope_theta, norm_eps)
        if rope_scaling is not None:
            h += rope_scaling.pack()
    elif version != 1:
        raise ValueError(f"unknown model file version {version}")
    return h + b"\0" * (HEADER_BYTES - len(h))


def check_dims(dim, hidden, L, H, KV, V, S, where: str = "") -> None:
    """The engine's structural checks on the 7 hyperparameters."""
    pre = f"{where}: " if where else ""
    for name, v in (("dim", dim), ("hidden_dim", hidden), ("n_layers", L), ("n_heads", H),
                    ("n_kv_heads", KV), ("vocab_size", V), ("seq_len", S)):
        if v <= 0:
            raise ValueError(f"{pre}{name} must be positive, got {v}")
    if dim % H != 0 or (dim // H) % 2 != 0:
        raise ValueError(f"{pre}dim {dim} does not split into {H} heads of even size")
    if H % KV != 0:
        raise ValueError(f"{pre}n_heads {H} is not a multiple of n_kv_heads {KV}")


def check_float_param(name: str, v: float, where: str = "") -> None:
    if not (math.isfinite(v) and v > 0):
        pre = f"{where}: " if where else ""
        raise ValueError(f"{pre}{name} must be finite and positive, got {v}")
