"""The benchmark's models: the standard shapes (SHAPES) and their random
weights, written as a version 1 (fp32) file (`write_random_fp32`) and its
version 2 (int8) copy (`write_int8_from_fp32`). numpy only."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..export.binfmt import pack_header
from ..export.sources import open_bin
from ..export.writers import write_bin
from ..outputs import atomic_write

# name -> (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len)
SHAPES = {
    "stories15M": (288, 768, 6, 6, 6, 32000, 256),
    "stories42M": (512, 1376, 8, 8, 8, 32000, 1024),
    "stories110M": (768, 2048, 12, 12, 12, 32000, 1024),
    "tinyllama": (2048, 5632, 22, 32, 4, 32000, 2048),
}
SHAPE_LABELS = {"stories15M": "stories15M", "stories42M": "stories42M",
                "stories110M": "stories110M", "tinyllama": "TinyLlama-1.1B (GQA)"}
QUANTS = ("fp32", "int8", "bf16", "q4_0")


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
    """A version 1 (fp32) model with random weights, written tensor by tensor
    (params as in SHAPES; the same seed gives the same file)."""
    path = Path(path)
    with atomic_write(path) as f:
        f.write(pack_header(1, params, shared=True))
        for _, _, a in _random_tensors(params, seed):
            f.write(np.ascontiguousarray(a, dtype="<f4").tobytes())
    return path


def write_int8_from_fp32(src: Path, dst: Path) -> Path:
    """The version 2 (int8) copy of a version 1 file (group size 64 halved until
    it divides dim), written by the exporter (export.writers.write_bin)."""
    with open_bin(src) as model:
        if model.version != 1:
            raise ValueError(f"{src}: expected a version 1 file")
        return write_bin(model, dst, version=2, force=True)  # the exporter's group size: 64 halved until it divides dim
