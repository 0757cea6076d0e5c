"""A whole model file (.bin, versions 0-4) as numpy arrays: `read_model(path)`
returns a `BinModel` with the hyperparameters and every weight under the
names of llama2.c's `TransformerWeights` (token_embedding, rms_att, wq, ...,
wcls). fp32 files are memory-mapped, int8 (version 2) ones dequantized and bf16
(version 4) ones widened to float32. The GGUF writer and `llama2c bench` read
models this way; the converters use `export.sources.BinSource` instead.
numpy only."""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..validate import regular_file
from .binfmt import HEADER_BYTES, MAGIC

# the per-layer matrices in file order
LAYER_MATRICES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


@dataclass
class BinModel:
    """A model file's hyperparameters and weights (numpy arrays; fp32 files are
    memory-mapped, int8 ones dequantized to float32)."""
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared: bool
    version: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    group_size: int = 0
    weights: dict = field(default_factory=dict)

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.dim * self.n_kv_heads // self.n_heads

    def matrix_shapes(self) -> dict[str, tuple[int, int]]:
        d, h, kv = self.dim, self.hidden_dim, self.kv_dim
        return {"wq": (d, d), "wk": (kv, d), "wv": (kv, d), "wo": (d, d),
                "w1": (h, d), "w2": (d, h), "w3": (h, d)}


def read_model(path: str | os.PathLike) -> BinModel:
    """Reads a llama2c/llama2.c model file of version 0 to 4 (bf16 widened to fp32)."""
    path = Path(path)
    regular_file(path)
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    if raw.size < 28:
        raise ValueError(f"{path}: too small to be a model file ({raw.size} bytes)")
    magic = struct.unpack_from("<I", raw, 0)[0]
    if magic != MAGIC:
        return _read_v0(path, raw)
    version = struct.unpack_from("<i", raw, 4)[0]
    params = struct.unpack_from("<7i", raw, 8)
    shared = bool(raw[36])
    m = BinModel(*params, shared=shared, version=version)
    _check_params(path, m)
    if version == 1:
        _read_fp32_body(path, raw, HEADER_BYTES, m)
    elif version == 3:
        m.rope_theta, m.norm_eps = struct.unpack_from("<ff", raw, 40)
        _read_fp32_body(path, raw, HEADER_BYTES, m)
    elif version == 4:
        m.rope_theta, m.norm_eps = struct.unpack_from("<ff", raw, 40)
        _read_fp32_body(path, raw, HEADER_BYTES, m, bf16=True)
    elif version == 2:
        m.group_size = struct.unpack_from("<i", raw, 37)[0]
        _read_q8_body(path, raw, m)
    else:
        raise ValueError(f"{path}: model file version {version} is not supported by the GGUF exporter")
    return m


def _check_params(path, m: BinModel) -> None:
    vals = (m.dim, m.hidden_dim, m.n_layers, m.n_heads, m.n_kv_heads, m.vocab_size, m.seq_len)
    if min(vals) <= 0 or m.dim % m.n_heads or m.n_heads % m.n_kv_heads or m.head_size % 2:
        raise ValueError(f"{path}: bad hyperparameters {vals}")


def _f32(raw, off: int, shape) -> tuple[np.ndarray, int]:
    n = int(np.prod(shape))
    end = off + 4 * n
    if end > raw.size:
        raise ValueError("model file is truncated")
    return raw[off:end].view("<f4").reshape(shape), end


def _bf16(raw, off: int, shape) -> tuple[np.ndarray, int]:
    n = int(np.prod(shape))
    end = off + 2 * n
    if end > raw.size:
        raise ValueError("model file is truncated")
    h = raw[off:end].view("<u2").astype(np.uint32) << 16
    return h.view(np.float32).reshape(shape), end


def _read_v0(path, raw) -> BinModel:
    params = list(struct.unpack_from("<7i", raw, 0))
    shared = params[5] > 0
    params[5] = abs(params[5])
    m = BinModel(*params, shared=shared, version=0)
    _check_params(path, m)
    L, d, off = m.n_layers, m.dim, 28
    w = m.weights
    w["token_embedding"], off = _f32(raw, off, (m.vocab_size, d))
    w["rms_att"], off = _f32(raw, off, (L, d))
    for name in ("wq", "wk", "wv", "wo"):
        w[name], off = _f32(raw, off, (L, *m.matrix_shapes()[name]))
    w["rms_ffn"], off = _f32(raw, off, (L, d))
    for name in ("w1", "w2", "w3"):
        w[name], off = _f32(raw, off, (L, *m.matrix_shapes()[name]))
    w["rms_final"], off = _f32(raw, off, (d,))
    off += 4 * m.seq_len * m.head_size  # freq_cis_real and freq_cis_imag (unused)
    if not shared:
        w["wcls"], off = _f32(raw, off, (m.vocab_size, d))
    return m


def _read_fp32_body(path, raw, off: int, m: BinModel, bf16: bool = False) -> None:
    L, d = m.n_layers, m.dim
    w = m.weights
    mat = _bf16 if bf16 else _f32
    w["rms_att"], off = _f32(raw, off, (L, d))
    w["rms_ffn"], off = _f32(raw, off, (L, d))
    w["rms_final"], off = _f32(raw, off, (d,))
    w["token_embedding"], off = mat(raw, off, (m.vocab_size, d))
    for name in LAYER_MATRICES:
        w[name], off = mat(raw, off, (L, *m.matrix_shapes()[name]))
    if not m.shared:
        w["wcls"], off = mat(raw, off, (m.vocab_size, d))


def _read_q8_body(path, raw, m: BinModel) -> None:
    gs = m.group_size
    if gs <= 0 or m.dim % gs:
        raise ValueError(f"{path}: bad group size {gs}")
    L, d = m.n_layers, m.dim
    w = m.weights
    off = HEADER_BYTES
    w["rms_att"], off = _f32(raw, off, (L, d))
    w["rms_ffn"], off = _f32(raw, off, (L, d))
    w["rms_final"], off = _f32(raw, off, (d,))

    def matrix(shape):
        nonlocal off
        n = shape[0] * shape[1]
        if off + n + 4 * (n // gs) > raw.size:
            raise ValueError(f"{path}: model file is truncated")
        q = raw[off:off + n].view(np.int8)
        off += n
        s, off = _f32(raw, off, (n // gs,))
        return (q.reshape(-1, gs).astype(np.float32) * s[:, None]).reshape(shape)

    w["token_embedding"] = matrix((m.vocab_size, d))
    for name in LAYER_MATRICES:
        shape = m.matrix_shapes()[name]
        w[name] = np.stack([matrix(shape) for _ in range(L)])
    if not m.shared:
        w["wcls"] = matrix((m.vocab_size, d))
