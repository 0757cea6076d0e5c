#!/usr/bin/env python3
"""Writes the seed corpus of the fuzz harness (csrc/fuzz_llama2.c).

    python3 fuzz/make_corpus.py [OUT_DIR]        (default: build/fuzz-corpus)

Every seed is one harness input: a selector byte, 8 knob bytes, then the
target's files (see the comment at the top of csrc/fuzz_llama2.c or
fuzz/README.md). The seeds are tiny valid model files of every format
version (0-5: legacy, fp32, Q8_0, fp32 with rope_theta / norm_eps, bf16, Q4_0),
shared and unshared classifiers, GQA / MQA, small tokenizers with and
without <0xHH> byte tokens, full runs that tie them together, and the
hostile cases the engine must reject or survive: vocabularies below 259
with byte fallback, huge seq_len in small files, NaN / Inf weights and
scales, versions out of range, zero / negative / inconsistent dimensions,
broken tokenizer entries. When ../shared/data exists, the small reference
stories260K files join in. The crash reproducers kept in fuzz/regressions/
are copied in as they are.

Only numpy; deterministic (same bytes every run). The corpus is generated
at run time into a build directory and never committed.
"""
from __future__ import annotations

import math
import shutil
import struct
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
REGRESSIONS = HERE / "regressions"
SHARED = REPO.parent / "shared" / "data"
MAGIC = 0x616B3432
SHARED_LIMIT = 2 * 1024 * 1024  # reference files above this are left out

# selector byte (byte 0 of an input)
T_MODEL, T_TOKENIZER, T_GENERATE, T_CHAT = 0, 1, 2, 3
QUANTIZE, THREADS2 = 4, 8


# ---------------------------------------------------------------------------
# model files
# ---------------------------------------------------------------------------

# the hyperparameters, in file order: the test suite's reference Config (numpy only)
sys.path.insert(0, str(REPO / "tests"))
from reference import Config as Cfg  # noqa: E402


def weights(c: Cfg, seed: int, shared: bool = True, scale: float = 1.0) -> dict[str, np.ndarray]:
    """Small random float32 weights (activations stay O(1))."""
    rng = np.random.default_rng(seed)
    L, d, h, kv, V = c.n_layers, c.dim, c.hidden_dim, c.kv_dim, c.vocab_size

    def normal(shape, fan_in):
        return (rng.standard_normal(shape) * scale / math.sqrt(fan_in)).astype("<f4")

    w = {
        "emb": normal((V, d), 1.0),
        "rms_att": (1 + 0.1 * rng.standard_normal((L, d))).astype("<f4"),
        "wq": normal((L, d, d), d), "wk": normal((L, kv, d), d), "wv": normal((L, kv, d), d),
        "wo": normal((L, d, d), 2 * d),
        "rms_ffn": (1 + 0.1 * rng.standard_normal((L, d))).astype("<f4"),
        "w1": normal((L, h, d), d), "w2": normal((L, d, h), 2 * h), "w3": normal((L, h, d), d),
        "rms_final": (1 + 0.1 * rng.standard_normal(d)).astype("<f4"),
    }
    if not shared:
        w["wcls"] = normal((V, d), d)
    return w


LAYER_MATS = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]


def f32(a) -> bytes:
    return np.ascontiguousarray(a, dtype="<f4").tobytes()


def header_versioned(c: Cfg, version: int, shared: bool, gs: int = 0, ints=None) -> bytes:
    h = bytearray(256)
    struct.pack_into("<Ii7i", h, 0, MAGIC, version, *(list(c.params()) if ints is None else ints))
    h[36] = 1 if shared else 0
    if version == 2:
        struct.pack_into("<i", h, 37, gs)
    elif version >= 3:
        struct.pack_into("<ff", h, 40, c.rope_theta, c.norm_eps)
    return bytes(h)


def default_gs(dim: int) -> int:
    gs = 64
    while dim % gs:
        gs //= 2
    return gs


def q80(a: np.ndarray, gs: int) -> bytes:
    """Q8_0 as the exporter writes it: int8 values, then one fp32 scale per group."""
    flat = np.asarray(a, dtype=np.float32).reshape(-1, gs)
    wmax = np.abs(flat).max(axis=1)
    scale = (wmax / 127.0).astype(np.float32)
    safe = np.where(scale == 0, 1, scale)
    q = np.where(scale[:, None] == 0, 0, np.round(flat / safe[:, None])).astype(np.int8)
    return q.tobytes() + scale.astype("<f4").tobytes()


def bf16(a: np.ndarray) -> bytes:
    """Round to nearest even into the top 16 bits (NaN stays NaN)."""
    u = np.ascontiguousarray(a, dtype="<f4").view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(np.asarray(a, dtype=np.float32))
    rounded[nan] = 0x7FC0
    return rounded.astype("<u2").tobytes()


def model_bytes(c: Cfg, w: dict, version: int, gs: int | None = None) -> bytes:
    shared = "wcls" not in w
    if version == 0:
        ints = list(c.params())
        if not shared:
            ints[5] = -ints[5]
        body = [f32(w["emb"]), f32(w["rms_att"]), f32(w["wq"]), f32(w["wk"]), f32(w["wv"]),
                f32(w["wo"]), f32(w["rms_ffn"]), f32(w["w1"]), f32(w["w2"]), f32(w["w3"]),
                f32(w["rms_final"])]
        # freq_cis_real, freq_cis_imag: seq_len x head_size/2 each (ignored by the engine)
        hs = c.head_size
        freqs = 1.0 / (10000.0 ** (np.arange(0, hs, 2)[: hs // 2] / hs))
        ang = np.outer(np.arange(c.seq_len), freqs)
        body += [f32(np.cos(ang)), f32(np.sin(ang))]
        if not shared:
            body.append(f32(w["wcls"]))
        return struct.pack("<7i", *ints) + b"".join(body)
    norms = f32(w["rms_att"]) + f32(w["rms_ffn"]) + f32(w["rms_final"])
    mats = [w["emb"]] + [w[k] for k in LAYER_MATS] + ([] if shared else [w["wcls"]])
    if version == 2:
        g = default_gs(c.dim) if gs is None else gs
        parts = [q80(w["emb"], g)]
        for k in LAYER_MATS:
            parts += [q80(w[k][layer], g) for layer in range(c.n_layers)]
        if not shared:
            parts.append(q80(w["wcls"], g))
        return header_versioned(c, 2, shared, g) + norms + b"".join(parts)
    if version == 4:
        return header_versioned(c, 4, shared) + norms + b"".join(bf16(m) for m in mats)
    if version == 5:  # Q4_0 blocks (GGUF's), w2 fp32 when its rows are not whole blocks
        parts = [gg_tensor_bytes(w["emb"], GG_Q4_0)]
        for k in LAYER_MATS:
            parts += [f32(w[k][layer]) if k == "w2" and c.hidden_dim % 32 else gg_tensor_bytes(w[k][layer], GG_Q4_0)
                      for layer in range(c.n_layers)]
        if not shared:
            parts.append(gg_tensor_bytes(w["wcls"], GG_Q4_0))
        return header_versioned(c, 5, shared) + norms + b"".join(parts)
    return header_versioned(c, version, shared) + norms + b"".join(f32(m) for m in mats)


# ---------------------------------------------------------------------------
# tokenizer.bin files
# ---------------------------------------------------------------------------

WORDS = ["Once", "upon", "a", "time", "there", "was", "little", "girl", "named", "Lily", "She",
         "loved", "to", "play", "outside", "the", "park", "sun", "happy", "dog", "cat", "ball"]


def vocab_pieces(n: int, byte_tokens: bool) -> list[tuple[bytes, float]]:
    """<unk>, <s>, </s>, optionally <0x00>..<0xFF>, then characters and merges
    (scores decreasing, as SentencePiece writes them), n entries in all."""
    pieces: list[tuple[bytes, float]] = [(b"<unk>", 0.0), (b"\n<s>\n", 0.0), (b"\n</s>\n", 0.0)]
    if byte_tokens:
        pieces += [(f"<0x{i:02X}>".encode(), 0.0) for i in range(256)]
    seen = {p for p, _ in pieces}
    cands: list[bytes] = [b" ", b"e", b"t", b"a", b"o", b"n", b"i", b"h", b"s", b"r", b"d", b"l",
                          b"u", b"y", b"w", b"m", b"g", b"c", b"p", b"f", b"b", b"k", b"v", b".",
                          b",", b"O", b"L", b"S", b"T", "é".encode(), "ü".encode(), "日".encode()]
    for word in WORDS:
        for i in range(2, len(word) + 1):
            cands.append(word[:i].encode())
        cands.append((" " + word).encode())
        for i in range(2, len(word) + 1):
            cands.append((" " + word[:i]).encode())
    cands += [b"  ", b"\n", b"\n\n", b"he", b"the", b" the", b"in", b"an", b"and", b" and"]
    score = -1.0
    for p in cands:
        if len(pieces) >= n:
            break
        if p in seen:
            continue
        seen.add(p)
        pieces.append((p, score))
        score -= 0.25
    k = 0
    while len(pieces) < n:  # filler pieces
        p = f"zz{k}".encode()
        k += 1
        pieces.append((p, score))
        score -= 0.25
    return pieces[:n]


def tokenizer_bytes(pieces: list[tuple[bytes, float]], max_len: int | None = None) -> bytes:
    m = max(len(p) for p, _ in pieces) if max_len is None else max_len
    out = [struct.pack("<I", m)]
    for p, s in pieces:
        out.append(struct.pack("<fi", s, len(p)) + p)
    return b"".join(out)


def raw_entry(piece: bytes, score: float = 0.0, length: int | None = None) -> bytes:
    return struct.pack("<fi", score, len(piece) if length is None else length) + piece


# ---------------------------------------------------------------------------
# GGUF files (llama.cpp's format), written here with numpy only
# ---------------------------------------------------------------------------

GG_F32, GG_F16, GG_Q4_0, GG_Q8_0, GG_BF16 = 0, 1, 2, 8, 30
GG_Q4_1, GG_Q5_0, GG_Q5_1, GG_Q2_K, GG_Q3_K, GG_Q4_K, GG_Q5_K, GG_Q6_K = 3, 6, 7, 10, 11, 12, 13, 14
GG_IQ4_NL, GG_IQ4_XS, GG_TQ1_0, GG_TQ2_0, GG_IQ2_XXS = 20, 23, 34, 35, 16
GG_TYPE_BLOCK = {GG_F32: (1, 4), GG_F16: (1, 2), GG_Q4_0: (32, 18), GG_Q8_0: (32, 34), GG_BF16: (1, 2),
                 GG_IQ2_XXS: (256, 66)}
# the types the engine dequantizes at load: (values, bytes) per block and its
# fp16 scales as (byte offset, magnitude giving values of about 0.05); every
# other byte of a block may hold anything
GG_DEQUANT = {
    GG_Q4_1: (32, 20, ((0, 4e-3), (2, 3e-2))), GG_Q5_0: (32, 22, ((0, 3e-3),)),
    GG_Q5_1: (32, 24, ((0, 2e-3), (2, 3e-2))), GG_Q2_K: (256, 84, ((80, 1e-3), (82, 1e-3))),
    GG_Q3_K: (256, 110, ((108, 5e-4),)), GG_Q4_K: (256, 144, ((0, 1e-4), (2, 5e-4))),
    GG_Q5_K: (256, 176, ((0, 5e-5), (2, 5e-4))), GG_Q6_K: (256, 210, ((208, 2e-5),)),
    GG_IQ4_NL: (32, 18, ((0, 5e-4),)), GG_IQ4_XS: (256, 136, ((0, 2e-5),)),
    GG_TQ1_0: (256, 54, ((52, 5e-2),)), GG_TQ2_0: (256, 66, ((64, 5e-2),)),
}
GG_TYPE_BLOCK.update({t: (block, size) for t, (block, size, _) in GG_DEQUANT.items()})
GG_NAMES = {"wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output", "w1": "ffn_gate",
            "w2": "ffn_down", "w3": "ffn_up"}


def gg_str(s: bytes | str) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def gg_kv(key: str, vtype: int, payload: bytes) -> bytes:
    return gg_str(key) + struct.pack("<I", vtype) + payload


def gg_tensor_bytes(a: np.ndarray, gtype: int) -> bytes:
    a = np.ascontiguousarray(a, dtype="<f4")
    if gtype == GG_F32:
        return a.tobytes()
    if gtype == GG_F16:
        return a.astype("<f2").tobytes()
    if gtype == GG_BF16:
        return (a.view("<u4") >> 16).astype("<u2").tobytes()
    blocks = a.reshape(-1, 32)
    if gtype == GG_Q8_0:
        d = (np.abs(blocks).max(axis=1) / 127).astype("<f2")
        inv = np.where(d == 0, 0, 1 / np.maximum(d.astype("<f4"), 1e-30))
        q = np.clip(np.round(blocks * inv[:, None]), -127, 127).astype("i1")
        return b"".join(d[i].tobytes() + q[i].tobytes() for i in range(len(blocks)))
    if gtype == GG_Q4_0:
        d = (np.abs(blocks).max(axis=1) / 8).astype("<f2")
        inv = np.where(d == 0, 0, 1 / np.maximum(d.astype("<f4"), 1e-30))
        q = np.clip(np.round(blocks * inv[:, None]) + 8, 0, 15).astype("u1")
        packed = q[:, :16] | (q[:, 16:] << 4)
        return b"".join(d[i].tobytes() + packed[i].tobytes() for i in range(len(blocks)))
    if gtype in GG_DEQUANT:  # random blocks with finite scales of either sign
        block, size, scales = GG_DEQUANT[gtype]
        n = a.size // block
        rng = np.random.default_rng(a.size * 64 + gtype)
        b = rng.integers(0, 256, (n, size), dtype=np.uint8)
        for at, mag in scales:
            s = rng.uniform(0.5, 1.5, n) * rng.choice([-mag, mag], n)
            b[:, at:at + 2] = s.astype("<f2").view(np.uint8).reshape(n, 2)
        return b.tobytes()
    block, size = GG_TYPE_BLOCK[gtype]
    return bytes(a.size // block * size)  # a type the engine refuses: zero bytes of its size


def gguf_bytes(c: Cfg, w: dict, mtype: int = GG_F32, pieces=None, arch: str = "llama", version: int = 3,
               drop=(), extra_kv: bytes = b"", n_kv_extra: int = 0, template: str | None = None,
               types: dict | None = None) -> bytes:
    """A GGUF model of weights w (as weights() makes them): matrices in mtype,
    norms F32, with a vocabulary (tokens, scores, types) when pieces are given;
    types: tensor name -> ggml type, overriding those."""
    kvs = [gg_kv("general.architecture", 8, gg_str(arch))]
    for key, value in [("context_length", c.seq_len), ("embedding_length", c.dim), ("block_count", c.n_layers),
                       ("feed_forward_length", c.hidden_dim), ("attention.head_count", c.n_heads),
                       ("attention.head_count_kv", c.n_kv_heads)]:
        kvs.append(gg_kv(f"{arch}.{key}", 4, struct.pack("<I", value)))
    kvs.append(gg_kv(f"{arch}.rope.freq_base", 6, struct.pack("<f", c.rope_theta)))
    kvs.append(gg_kv(f"{arch}.attention.layer_norm_rms_epsilon", 6, struct.pack("<f", c.norm_eps)))
    if pieces is not None:
        tokens = [p.replace(b" ", "\u2581".encode()) for p, _ in pieces]
        kvs.append(gg_kv("tokenizer.ggml.model", 8, gg_str("llama")))
        kvs.append(gg_kv("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, len(tokens)) + b"".join(gg_str(t) for t in tokens)))
        kvs.append(gg_kv("tokenizer.ggml.scores", 9, struct.pack("<IQ", 6, len(pieces)) +
                         struct.pack(f"<{len(pieces)}f", *[sc for _, sc in pieces])))
        kvs.append(gg_kv("tokenizer.ggml.token_type", 9, struct.pack("<IQ", 5, len(pieces)) +
                         struct.pack(f"<{len(pieces)}i", *([2, 3, 3] + [1] * (len(pieces) - 3)))))
    if template is not None:
        kvs.append(gg_kv("tokenizer.chat_template", 8, gg_str(template)))
    tensors = [("token_embd.weight", w["emb"], mtype), ("output_norm.weight", w["rms_final"], GG_F32)]
    for layer in range(c.n_layers):
        tensors.append((f"blk.{layer}.attn_norm.weight", w["rms_att"][layer], GG_F32))
        tensors.append((f"blk.{layer}.ffn_norm.weight", w["rms_ffn"][layer], GG_F32))
        for k, gname in GG_NAMES.items():
            tensors.append((f"blk.{layer}.{gname}.weight", w[k][layer], mtype))
    if "wcls" in w:
        tensors.append(("output.weight", w["wcls"], mtype))
    tensors = [(n, a, (types or {}).get(n, t)) for n, a, t in tensors if n not in drop]
    infos, data = [], b""
    for name, a, gtype in tensors:
        a = np.asarray(a)
        gtype = gtype if a.shape[-1] % GG_TYPE_BLOCK[gtype][0] == 0 else GG_F32
        dims = list(reversed(a.shape))
        infos.append(gg_str(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
                     + struct.pack("<IQ", gtype, len(data)))
        data += gg_tensor_bytes(a, gtype)
        data += bytes(-len(data) % 32)
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs) + n_kv_extra) + b"".join(kvs) + extra_kv
    head += b"".join(infos)
    return head + bytes(-len(head) % 32) + data


# ---------------------------------------------------------------------------
# harness inputs
# ---------------------------------------------------------------------------

def knobs(*b: int) -> bytes:
    k = bytes(b) + bytes(8 - len(b))
    assert len(k) == 8
    return k


def model_input(model: bytes, sel: int = 0, k: bytes = knobs(3, 5, 0, 1, 7, 8, 9)) -> bytes:
    return bytes([T_MODEL | sel]) + k + model


def tok_input(tok: bytes, text: bytes, vocab_mode: int = 0, vocab: int = 0, bos=True, eos=False,
              empty_too=False, ids=(4, 1, 2, 250, 241), sel: int = 0) -> bytes:
    k0 = vocab_mode | (4 if bos else 0) | (8 if eos else 0) | (16 if empty_too else 0)
    k = knobs(k0, vocab & 0xFF, (vocab >> 8) & 0xFF, *ids)
    return bytes([T_TOKENIZER | sel]) + k + struct.pack("<I", len(tok)) + tok + text


def full_input(model: bytes, tok: bytes, prompt: bytes, chat=False, sel: int = 0, temp=0, topp=0,
               topk=0, minp=0, pen=0, window=0, steps=8, run=False, tok_all=False, stops=False,
               stop_eos=False, seq_steps=False, seed=42, ctx: int | None = None) -> bytes:
    """ctx: None runs the session in the model's default context, else in a new
    context whose n_ctx is table entry `ctx` (pick_n_ctx in the harness)."""
    k3 = ((steps - 1) & 7) | (8 if run else 0) | (16 if tok_all else 0) | (32 if stops else 0) \
        | (64 if stop_eos else 0) | (128 if seq_steps else 0)
    k7 = 0 if ctx is None else 1 | (ctx & 15) << 1
    k = bytes([temp | topp << 4, topk | minp << 4, pen | window << 4, k3]) + struct.pack("<I", seed)[:3] + bytes([k7])
    return (bytes([(T_CHAT if chat else T_GENERATE) | sel]) + k + struct.pack("<I", len(model)) + model
            + struct.pack("<I", len(tok)) + tok + prompt)


def set_ints(model: bytes, **changes) -> bytes:
    """Rewrites header ints of a model file (version 0 or versioned)."""
    names = ["dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"]
    buf = bytearray(model)
    off = 8 if struct.unpack_from("<I", buf, 0)[0] == MAGIC else 0
    for k, v in changes.items():
        struct.pack_into("<i", buf, off + 4 * names.index(k), v)
    return bytes(buf)


def poke(data: bytes, off: int, fmt: str, *vals) -> bytes:
    buf = bytearray(data)
    struct.pack_into(fmt, buf, off, *vals)
    return bytes(buf)


def seeds() -> dict[str, bytes]:
    out: dict[str, bytes] = {}

    # --- configurations ---
    gqa = Cfg(16, 40, 2, 4, 2, 300, 16)          # GQA, vocab > 259 (byte tokens fit)
    mha = Cfg(8, 24, 1, 2, 2, 64, 8)              # vocab < 259
    mqa = Cfg(32, 48, 1, 4, 1, 40, 32)            # MQA
    odd = Cfg(24, 20, 2, 3, 3, 260, 12)           # head_size 8, hidden 20 (Q8_0 groups span rows)
    tiny = Cfg(8, 8, 1, 4, 4, 16, 8)              # head_size 2
    cfgs = {"gqa": gqa, "mha": mha, "mqa": mqa, "odd": odd, "tiny": tiny}

    # --- valid models of every version ---
    models: dict[str, bytes] = {}
    for name, c in cfgs.items():
        for shared in (True, False):
            w = weights(c, seed=len(models) + 1, shared=shared)
            tag = f"{name}-{'shared' if shared else 'unshared'}"
            for v in range(5):
                models[f"v{v}-{tag}"] = model_bytes(c, w, v)
            if c.dim % 8 == 0:
                models[f"v2-gs8-{tag}"] = model_bytes(c, w, 2, gs=8)
            models[f"v2-gs2-{tag}"] = model_bytes(c, w, 2, gs=2)
            if c.dim % 32 == 0:
                models[f"v5-{tag}"] = model_bytes(c, w, 5)
    q4c = Cfg(32, 64, 2, 4, 2, 300, 16)  # every matrix Q4_0 (mqa's hidden 48 keeps w2 fp32)
    models["v5-q4-shared"] = model_bytes(q4c, weights(q4c, 97), 5)
    models["v5-q4-unshared"] = model_bytes(q4c, weights(q4c, 96, shared=False), 5)
    theta = replace(gqa, rope_theta=1e6, norm_eps=1e-6)
    models["v3-theta1e6-gqa"] = model_bytes(theta, weights(theta, 99), 3)
    models["v4-theta5e5-mqa"] = model_bytes(replace(mqa, rope_theta=5e5), weights(mqa, 98), 4)

    for name, m in models.items():
        out[f"model-{name}"] = model_input(m)
    for name in ("v0-gqa-unshared", "v1-gqa-shared", "v3-odd-unshared", "v4-gqa-unshared",
                 "v1-tiny-shared", "v4-mqa-shared"):
        out[f"model-{name}-quantize"] = model_input(models[name], QUANTIZE)
    out["model-v1-gqa-threads2"] = model_input(models["v1-gqa-unshared"], THREADS2)
    out["model-v2-gqa-threads2"] = model_input(models["v2-gqa-shared"], THREADS2 | QUANTIZE)
    out["model-v5-q4-threads2"] = model_input(models["v5-q4-shared"], THREADS2 | QUANTIZE)
    # hostile tokens, positions and batch sizes on a valid model (k[3] >> 2: 48-55 hostile
    # batch positions, 56-63 odd batch sizes; k[0], k[1], k[4..6] >= 240: hostile tokens)
    v1 = models["v1-gqa-shared"]
    for v in range(48, 64):
        out[f"model-v1-batch{v}"] = model_input(v1, 0, knobs(1, 2, 3, v << 2 | 1, 5, 6, 7))
    for i, k in enumerate([knobs(240, 241, 224, 1, 7, 8, 9), knobs(243, 244, 227, 0, 240, 241, 242),
                           knobs(1, 2, 225, 3, 243, 244, 245), knobs(1, 2, 229, 2, 246, 247, 248),
                           knobs(1, 2, 231, 1, 249, 250, 251), knobs(252, 253, 226, 1, 253, 254, 255)]):
        out[f"model-v1-hostile-args{i}"] = model_input(v1, 0, k)
    # passes in new contexts: k[7] bits 0-1 where (1 one context, 2 two, 3 one then the
    # default), bits 2-5 n_ctx (pick_n_ctx: 0 seq_len, 1 seq_len, 2..6: 1, 2, 3, 4, 8,
    # 7 seq_len-1, 8 seq_len+1, 9 -1, 10 INT_MAX, 11 INT_MIN, 12 16, 13 5)
    for where in (1, 2, 3):
        for idx in range(14):
            out[f"model-v1-ctx{where}-n{idx}"] = model_input(v1, 0, knobs(3, 5, 0, 1, 7, 8, 9, where | idx << 2))
    out["model-v2-ctx2-quantize"] = model_input(models["v2-gqa-shared"], QUANTIZE | THREADS2,
                                                knobs(3, 5, 0, 1, 7, 8, 9, 2 | 4 << 2))

    # --- hostile model files ---
    # huge seq_len in a ~1 MB versioned file (the body does not depend on seq_len)
    big = Cfg(256, 16, 1, 8, 8, 32, 1 << 20)
    wbig = weights(big, 7)
    for s in (1 << 20, 1 << 22):
        out[f"model-v1-seq{s}-1mb"] = model_input(model_bytes(replace(big, seq_len=s), wbig, 1))
    small_big = Cfg(8, 8, 1, 1, 1, 16, 1 << 22)
    out["model-v1-seq4194304-dim8"] = model_input(model_bytes(small_big, weights(small_big, 3), 1))
    out["model-v3-seq4194304-dim8"] = model_input(model_bytes(small_big, weights(small_big, 3), 3))
    s0 = Cfg(16, 16, 1, 4, 4, 16, 1 << 14)  # version 0 stores seq_len x head_size floats
    out["model-v0-seq16384"] = model_input(model_bytes(s0, weights(s0, 4), 0))
    out["model-v1-seq4194304-full-gen"] = full_input(
        model_bytes(small_big, weights(small_big, 3), 1),
        tokenizer_bytes(vocab_pieces(16, False)), b"Once", seq_steps=True)
    out["model-v1-seq4194304-full-ctx"] = full_input(
        model_bytes(small_big, weights(small_big, 3), 1),
        tokenizer_bytes(vocab_pieces(16, False)), b"Once", seq_steps=True, ctx=7)

    # NaN / Inf weights and scales
    def nan_weights(c: Cfg, seed: int, shared=True) -> dict[str, np.ndarray]:
        w = weights(c, seed, shared)
        w["wq"][0, 0, 0] = np.nan
        w["w1"][0, 1, 2] = np.inf
        w["w2"][0, 2, 1] = -np.inf
        w["emb"][3, 0] = np.nan
        return w
    wn = nan_weights(gqa, 11, shared=False)
    for v in (0, 1, 3, 4):
        out[f"model-v{v}-nan-weights"] = model_input(model_bytes(gqa, wn, v))
        out[f"model-v{v}-nan-weights-quantize"] = model_input(model_bytes(gqa, wn, v), QUANTIZE)
    wq = weights(gqa, 12, shared=False)
    v2 = bytearray(model_bytes(gqa, wq, 2))
    norms = 256 + 4 * (2 * gqa.n_layers * gqa.dim + gqa.dim)
    emb_q = gqa.vocab_size * gqa.dim
    gs = default_gs(gqa.dim)
    struct.pack_into("<f", v2, norms + emb_q, float("nan"))        # first embedding scale
    struct.pack_into("<f", v2, norms + emb_q + 4, float("inf"))    # second
    wq_at = norms + emb_q + 4 * (emb_q // gs)
    n_wq = gqa.dim * gqa.dim
    struct.pack_into("<f", v2, wq_at + n_wq, float("nan"))        # layer 0 wq scale
    struct.pack_into("<f", v2, wq_at + n_wq + 4, float("-inf"))
    out["model-v2-nan-scales"] = model_input(bytes(v2))
    v2n = bytearray(model_bytes(gqa, wq, 2))
    struct.pack_into("<f", v2n, 256, float("nan"))                 # rms_att[0]
    struct.pack_into("<f", v2n, 256 + 8, float("inf"))
    out["model-v2-nan-norms"] = model_input(bytes(v2n))
    huge = weights(gqa, 13, shared=False)
    huge["wq"] *= 1e30
    huge["w1"] *= 3e38
    out["model-v1-huge-weights-quantize"] = model_input(model_bytes(gqa, huge, 1), QUANTIZE)
    out["model-v2-huge-weights"] = model_input(model_bytes(gqa, huge, 2))

    # version field out of range, bad flags, bad rope_theta / norm_eps
    for bad in (0, 5, -1, 2**31 - 1, -(2**31), 256):
        out[f"model-version{bad}"] = model_input(poke(v1, 4, "<i", bad))
    out["model-v1-shared2"] = model_input(poke(v1, 36, "<B", 2))
    out["model-v1-shared255"] = model_input(poke(v1, 36, "<B", 255))
    v3 = models["v3-gqa-shared"]
    for i, (theta_v, eps_v) in enumerate([(float("nan"), 1e-5), (0.0, 1e-5), (float("inf"), 1e-5),
                                          (-1.0, 1e-5), (1e4, 0.0), (1e4, float("nan")), (1e4, -1e-5),
                                          (1e-45, 1e-5), (3.4e38, 1e-5), (1e4, 3.4e38)]):
        out[f"model-v3-theta-eps{i}"] = model_input(poke(v3, 40, "<ff", theta_v, eps_v))
    v2s = models["v2-gqa-shared"]
    for g in (0, -1, 3, 32, 64, 2**31 - 1, 1 << 16, (1 << 16) + 1, 1):
        out[f"model-v2-group{g}"] = model_input(poke(v2s, 37, "<i", g))

    # zero / negative / inconsistent dimensions (header only: the body stays)
    fields = ["dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"]
    for v, m in (("v0", models["v0-gqa-shared"]), ("v1", v1)):
        for f in fields:
            for val in (0, -1, -(2**31), 2**31 - 1):
                out[f"model-{v}-{f}{val}"] = model_input(set_ints(m, **{f: val}))
        out[f"model-{v}-heads3"] = model_input(set_ints(m, n_heads=3))            # dim % heads
        out[f"model-{v}-kv3"] = model_input(set_ints(m, n_kv_heads=3))            # heads % kv
        out[f"model-{v}-kv8"] = model_input(set_ints(m, n_kv_heads=8))            # kv > heads
        out[f"model-{v}-oddhead"] = model_input(set_ints(m, n_heads=16, n_kv_heads=16))
        out[f"model-{v}-dim-big"] = model_input(set_ints(m, dim=1 << 16, n_heads=1, n_kv_heads=1))
        out[f"model-{v}-layers-big"] = model_input(set_ints(m, n_layers=1 << 20))
    # a version 0 file whose (dims) make a v1 magic-less reading go wrong
    out["model-v0-vocab-intmin"] = model_input(set_ints(models["v0-gqa-shared"], vocab_size=-(2**31)))
    # sizes: truncated, trailing bytes, header only, tiny, empty
    out["model-v1-truncated"] = model_input(v1[:-3])
    out["model-v1-trailing"] = model_input(v1 + b"\0\0\0\0")
    out["model-v1-header-only"] = model_input(v1[:256])
    out["model-v1-short-header"] = model_input(v1[:100])
    out["model-v0-short-header"] = model_input(models["v0-gqa-shared"][:20])
    out["model-3bytes"] = model_input(b"ak4")
    out["model-empty"] = model_input(b"")
    out["model-magic-only"] = model_input(struct.pack("<I", MAGIC))
    out["selector-only"] = bytes([0])

    # --- tokenizers ---
    tok300 = tokenizer_bytes(vocab_pieces(300, True))        # with <0xHH> byte tokens
    tok64 = tokenizer_bytes(vocab_pieces(64, False))         # vocab < 259, no byte tokens
    tok64b = tokenizer_bytes(vocab_pieces(64, True)[:64])    # vocab < 259 cut inside the byte tokens
    tok16 = tokenizer_bytes(vocab_pieces(16, False))
    tok40 = tokenizer_bytes(vocab_pieces(40, False))
    tok260 = tokenizer_bytes(vocab_pieces(260, True))
    texts = {
        "ascii": b"Once upon a time, there was a little girl named Lily.",
        "utf8": "Lily ate a crêpe über 日本 \U0001F600 ok".encode(),
        "badutf8": b"a\xff\xfe\xc3(\xe2\x82 \xf0\x9f\x98 \x80\x80\x80\x80\x80 end",
        "ctrl": b"\x00\x01\x02 \t\n\r <s> </s> <0x41> <unk>",
        "spaces": b"    the   the  ",
        "one": b"x",
        "empty": b"",
    }
    for tname, tok, modes in (("bytes300", tok300, [(0, 0), (1, 300), (1, 40), (1, 258), (1, 259)]),
                              ("nobytes64", tok64, [(0, 0), (1, 64), (1, 3), (1, 10)]),
                              ("cutbytes64", tok64b, [(0, 0), (1, 64)]),
                              ("tiny16", tok16, [(0, 0), (1, 16)]),
                              ("bytes260", tok260, [(0, 0), (1, 259)])):
        for mode, vocab in modes:
            for txt_name, txt in texts.items():
                if mode == 1 and txt_name in ("spaces", "one", "ctrl"):
                    continue
                out[f"tok-{tname}-v{vocab if mode else 'all'}-{txt_name}"] = tok_input(
                    tok, txt, mode, vocab, bos=True, eos=txt_name == "ascii", empty_too=txt_name == "one")
    for i, vh in enumerate(range(8)):  # hostile vocab_size arguments
        out[f"tok-bytes300-hostile-vocab{i}"] = tok_input(tok300, texts["ascii"], 3, vh)
    out["tok-bytes300-ids"] = tok_input(tok300, texts["utf8"], 0, 0, ids=(240, 241, 242, 243, 244))
    out["tok-bytes300-ids2"] = tok_input(tok300, texts["utf8"], 0, 0, ids=(248, 249, 250, 252, 255))
    # hostile tokenizer files
    base = vocab_pieces(20, False)
    good = b"".join(raw_entry(p, s) for p, s in base)
    hostile_toks = {
        "negative-len": struct.pack("<I", 8) + good + raw_entry(b"", 0.0, -1),
        "len-over-max": struct.pack("<I", 4) + good,
        "max0": struct.pack("<I", 0) + good,
        "max-huge": struct.pack("<I", 0xFFFFFFFF) + good,
        "max65536": struct.pack("<I", 65536) + good,
        "truncated-entry": struct.pack("<I", 8) + good + struct.pack("<fi", 0.0, 6) + b"ab",
        "truncated-header": struct.pack("<I", 8) + good + b"\0\0\0",
        "two-tokens": tokenizer_bytes(base[:2]),
        "three-tokens": tokenizer_bytes(base[:3]),
        "empty-pieces": tokenizer_bytes([(b"", 0.0)] * 10 + base),
        "dup-pieces": tokenizer_bytes(base + [(b"e", 5.0), (b"e", 6.0), (b"the", 1.0)]),
        "nan-scores": tokenizer_bytes([(p, float("nan") if i % 2 else float("-inf")) for i, (p, _) in enumerate(base)]),
        "inf-scores": tokenizer_bytes([(p, float("inf")) for p, _ in base] + [(b"th", float("inf"))]),
        "byte-lookalikes": tokenizer_bytes(base + [(b"<0x", 0.0), (b"<0xZZ>", 0.0), (b"<0x4>", 0.0),
                                                   (b"<0x41", 0.0), (b"<0xfff>", 0.0), (b"<0x0G>", 0.0),
                                                   (b" <0x41>", 0.0), (b"<0xA", 0.0)]),
        "long-piece": tokenizer_bytes(base + [(b"a" * 1000, 1.0), (b"aa", 2.0)]),
        "only-header": struct.pack("<I", 8),
        "short": b"\x08\x00",
        "empty": b"",
    }
    for name, tb in hostile_toks.items():
        out[f"tok-hostile-{name}"] = tok_input(tb, texts["utf8"], 0, 0)
        out[f"tok-hostile-{name}-v20"] = tok_input(tb, texts["ascii"], 1, 20)

    # --- full runs ---
    m300 = models["v1-gqa-shared"]
    m260 = models["v2-odd-unshared"]
    m64 = models["v1-mha-shared"]
    m40 = models["v3-mqa-unshared"]
    m16 = models["v4-tiny-shared"]
    prompt = b"Once upon a time"
    full = {
        "v1-300": full_input(m300, tok300, prompt),
        "v0-300": full_input(models["v0-gqa-unshared"], tok300, prompt, temp=1),
        "v2-260": full_input(m260, tok260, prompt),
        "v3-40": full_input(m40, tok40, b"the dog"),
        "v4-16": full_input(m16, tok16, b"tea"),
        "v1-300-quantize": full_input(m300, tok300, prompt, sel=QUANTIZE),
        "v4-300-quantize": full_input(models["v4-gqa-unshared"], tok300, prompt, sel=QUANTIZE | THREADS2),
        "v1-300-greedy-run": full_input(m300, tok300, prompt, temp=1, run=True),
        "v1-300-topk-minp": full_input(m300, tok300, prompt, topk=3, minp=1, pen=1, window=2),
        "v1-300-topp": full_input(m300, tok300, prompt, topp=3),
        "v1-300-stops": full_input(m300, tok300, b"a b a b a", stops=True, stop_eos=True),
        "v1-300-stops-run": full_input(m300, tok300, b"abab", stops=True, run=True),
        "v1-300-utf8": full_input(m300, tok300, texts["utf8"]),
        "v1-300-badutf8": full_input(m300, tok300, texts["badutf8"]),
        "v1-300-empty-prompt": full_input(m300, tok300, b""),
        "v1-300-tok-all": full_input(m300, tok300, prompt, tok_all=True),
        "v1-300-seqsteps": full_input(m300, tok300, prompt, seq_steps=True),
        "v1-300-chat": full_input(m300, tok300, b"Hi there, how are you?", chat=True),
        "v2-260-chat": full_input(m260, tok260, b"sys prompt and user", chat=True, temp=3),
        "v1-300-nan-sampler": full_input(m300, tok300, prompt, temp=10, topp=5, minp=5, pen=6),
        "v1-300-bad-sampler": full_input(m300, tok300, prompt, temp=11, topk=8, pen=4, window=4),
        "v1-300-huge-temp": full_input(m300, tok300, prompt, temp=9, pen=7),
        "v1-300-tiny-temp": full_input(m300, tok300, prompt, temp=8, topp=7, pen=8),
        # a model vocabulary below 259 with a byte-fallback tokenizer opened at that size:
        # byte fallback ids (3 + byte) can fall outside the vocabulary
        "v1-64-tok300-at64": full_input(m64, tok300, b"zebra quiz \xc3\xa9!"),
        "v1-64-nobytes": full_input(m64, tok64, b"Once upon a xylophone QQ"),
        "v1-64-cutbytes": full_input(m64, tok64b, b"hello"),
        "v1-64-tok300-chat": full_input(m64, tok300, b"zzz", chat=True),
        "v3-40-nobytes-all": full_input(m40, tok64, b"jump", tok_all=True),
        "v4-16-tok300": full_input(m16, tok300, b"\xff\x00Q"),
        "v1-nan-weights": full_input(model_bytes(gqa, wn, 1), tok300, prompt, temp=3, topp=3),
        "v1-nan-weights-greedy": full_input(model_bytes(gqa, wn, 1), tok300, prompt, temp=1),
        "v2-nan-scales": full_input(bytes(v2), tok300, prompt),
        "v1-nan-weights-quantize": full_input(model_bytes(gqa, wn, 1), tok300, prompt, sel=QUANTIZE),
        "v1-300-tok-hostile": full_input(m300, hostile_toks["byte-lookalikes"], prompt),
        "v1-300-tok-short": full_input(m300, tok64, prompt),
        "v1-300-ctx-seq": full_input(m300, tok300, prompt, ctx=0),
        "v1-300-ctx2": full_input(m300, tok300, prompt, ctx=3),
        "v1-300-ctx1-chat": full_input(m300, tok300, b"hi", chat=True, ctx=2),
        "v1-300-ctx8-run": full_input(m300, tok300, prompt, ctx=6, run=True),
        # chat with k[3] bit 3: the API's conversation mode (with an earlier turn when tok_all)
        "v1-300-conversation": full_input(m300, tok300, prompt, chat=True, run=True, temp=1),
        "v1-300-conversation-history": full_input(m300, tok300, b"sys user reply", chat=True, run=True,
                                                  tok_all=True, steps=3),
        "v1-300-ctx-big": full_input(m300, tok300, prompt, ctx=8),
        "v2-260-ctx4-stops": full_input(m260, tok260, b"a a a", ctx=5, stops=True),
    }
    for name, data in full.items():
        out[f"full-{name}"] = data

    # --- GGUF files: every type the engine reads, their vocabulary, and broken ones ---
    g32 = Cfg(32, 64, 2, 4, 2, 300, 16)  # rows of 32: the block types fit
    wg = weights(g32, seed=77)
    wg_un = weights(g32, seed=78, shared=False)
    pieces = vocab_pieces(300, True)
    ggufs = {f"{n}-{tag}": gguf_bytes(g32, ww, t, pieces)
             for n, t in [("f32", GG_F32), ("f16", GG_F16), ("bf16", GG_BF16), ("q8", GG_Q8_0), ("q4", GG_Q4_0)]
             for tag, ww in [("shared", wg), ("unshared", wg_un)]}
    # the types dequantized at load (to bf16): blocks of 32 in g32, of 256 in g256
    g256 = Cfg(256, 256, 1, 4, 4, 300, 8)
    w256, w256_un = weights(g256, 79), weights(g256, 80, shared=False)
    for n, t in [("q4_1", GG_Q4_1), ("q5_0", GG_Q5_0), ("q5_1", GG_Q5_1), ("iq4nl", GG_IQ4_NL)]:
        ggufs[f"{n}-{'unshared' if t in (GG_Q4_1, GG_Q5_1) else 'shared'}"] = \
            gguf_bytes(g32, wg_un if t in (GG_Q4_1, GG_Q5_1) else wg, t, pieces)
    for n, t in [("q2k", GG_Q2_K), ("q3k", GG_Q3_K), ("q4k", GG_Q4_K), ("q5k", GG_Q5_K), ("q6k", GG_Q6_K),
                 ("iq4xs", GG_IQ4_XS), ("tq1", GG_TQ1_0), ("tq2", GG_TQ2_0)]:
        ggufs[n] = gguf_bytes(g256, w256_un if t in (GG_Q3_K, GG_Q5_K, GG_TQ1_0) else w256, t, pieces)
    good = ggufs["q8-shared"]
    ggufs.update({
        "v2": gguf_bytes(g32, wg, GG_F32, pieces, version=2),
        "v9": gguf_bytes(g32, wg, GG_F32, pieces, version=9),
        "gpt2-arch": gguf_bytes(g32, wg, GG_F32, pieces, arch="gpt2"),
        "no-vocab": gguf_bytes(g32, wg, GG_F32, None),
        "missing-tensor": gguf_bytes(g32, wg, GG_F32, pieces, drop=("blk.1.ffn_up.weight",)),
        "iq2xxs": gguf_bytes(g256, w256, GG_IQ2_XXS, pieces),  # refused: no dequantizer
        # llama.cpp's Q4_0 file: Q6_K classifier; a Q4_K_M-like mix; broken K-quant blocks
        "q4-q6k-out": gguf_bytes(g256, w256_un, GG_Q4_0, pieces, types={"output.weight": GG_Q6_K}),
        "kmix": gguf_bytes(g256, w256_un, GG_Q4_K, pieces, types={"output.weight": GG_Q6_K,
                                                                   "blk.0.attn_v.weight": GG_Q6_K}),
        "q6k-norm": gguf_bytes(g256, w256, GG_Q4_0, pieces, types={"blk.0.ffn_norm.weight": GG_Q6_K}),
        "q6k-nan-scale": poke(gguf_bytes(g256, w256, GG_Q6_K, pieces), -2, "<H", 0x7E00),
        "template": gguf_bytes(g32, wg, GG_F32, pieces, template="{{ messages[0].content }}"),
        "nested-array": gguf_bytes(g32, wg, GG_F32, pieces, n_kv_extra=1,
                                   extra_kv=gg_kv("x.nested", 9, struct.pack("<IQ", 9, 1) + struct.pack("<IQ", 4, 2) + bytes(8))),
        "huge-string": gguf_bytes(g32, wg, GG_F32, pieces, n_kv_extra=1,
                                  extra_kv=gg_str("x.s") + struct.pack("<IQ", 8, 1 << 62)),
        "huge-array": gguf_bytes(g32, wg, GG_F32, pieces, n_kv_extra=1,
                                 extra_kv=gg_str("x.a") + struct.pack("<IIQ", 9, 4, 1 << 61)),
        "truncated": good[:len(good) - 100],
        "header-only": good[:24],
        "many-tensors": poke(good, 8, "<Q", 1 << 40),
    })
    for name, data in ggufs.items():
        out[f"gguf-model-{name}"] = model_input(data)
        out[f"gguf-tok-{name}"] = tok_input(data, texts["ascii"], 1, 300)
    for name in ("f32-shared", "q8-unshared", "q4-shared", "bf16-unshared", "f16-shared", "template",
                 "q5_0-shared", "q4_1-unshared", "q4-q6k-out", "kmix", "q6k"):
        out[f"gguf-full-{name}"] = full_input(ggufs[name], ggufs[name], prompt, temp=1)
        out[f"gguf-full-{name}-quantize"] = full_input(ggufs[name], ggufs[name], prompt, sel=QUANTIZE)
    out["gguf-full-q8-chat"] = full_input(ggufs["q8-shared"], ggufs["q8-shared"], b"hi", chat=True, run=True)

    # --- reference files from ../shared/data (not committed anywhere) ---
    ref = SHARED / "tinyllamas" / "stories260K"
    files = {n: ref / n for n in ("stories260K.bin", "stories260K_v1.bin", "stories260K_q80_gs8.bin", "tok512.bin")}
    have = {n: p.read_bytes() for n, p in files.items() if p.is_file() and p.stat().st_size < SHARED_LIMIT}
    if "tok512.bin" in have:
        tok512 = have["tok512.bin"]
        out["ref-tok512-ascii"] = tok_input(tok512, texts["ascii"], 0, 0)
        out["ref-tok512-utf8"] = tok_input(tok512, texts["utf8"], 1, 512)
        out["ref-tok512-v100"] = tok_input(tok512, texts["ascii"], 1, 100)
        for n in ("stories260K.bin", "stories260K_v1.bin", "stories260K_q80_gs8.bin"):
            if n in have:
                stem = n.removesuffix(".bin")
                out[f"ref-{stem}-model"] = model_input(have[n])
                out[f"ref-{stem}-gen"] = full_input(have[n], tok512, b"Once upon a time", temp=1)
                out[f"ref-{stem}-chat"] = full_input(have[n], tok512, b"Lily", chat=True, steps=6)
        if "stories260K.bin" in have:
            out["ref-stories260K-quantize-gen"] = full_input(have["stories260K.bin"], tok512, b"Tom", sel=QUANTIZE)
    return out


def main(argv: list[str]) -> int:
    out_dir = Path(argv[1]) if len(argv) > 1 else REPO / "build" / "fuzz-corpus"
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.iterdir():
        if old.is_file():
            old.unlink()
    corpus = seeds()
    for name, data in sorted(corpus.items()):
        (out_dir / name).write_bytes(data)
    n_reg = 0
    if REGRESSIONS.is_dir():
        for f in sorted(REGRESSIONS.iterdir()):
            if f.is_file() and not f.name.startswith(".") and f.suffix != ".md":
                shutil.copyfile(f, out_dir / f"regression-{f.name}")
                n_reg += 1
    total = sum(len(d) for d in corpus.values())
    print(f"make_corpus: {len(corpus)} seeds ({total / 1e6:.1f} MB) and {n_reg} regression inputs in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
