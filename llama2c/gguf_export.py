"""Export llama2c model files (.bin, versions 0-4) to GGUF, llama.cpp's format.

Used by `llama2c bench` to run llama.cpp on exactly the weights our engine runs.
Needs the `gguf` package (`pip install gguf`); `import llama2c` does not.

    from llama2c.gguf_export import export_gguf
    export_gguf("model.bin", "model-q8_0.gguf", ftype="q8_0",
                vocab="tokenizer.model")   # or a tokenizer.bin, or "synthetic"

What is written (architecture "llama"):
  - tensors with llama.cpp's names: token_embd, blk.N.attn_norm / attn_q / attn_k /
    attn_v / attn_output / ffn_norm / ffn_gate (w1) / ffn_down (w2) / ffn_up (w3),
    output_norm and, when the classifier is not shared, output. Norms are always F32;
    the matrices are F32, F16 or Q8_0 (32 values per block, fp16 scale max|w|/127).
  - the hyperparameters llama.cpp reads: context_length, embedding_length,
    block_count, feed_forward_length, attention.head_count(_kv),
    rope.dimension_count, attention.layer_norm_rms_epsilon, rope.freq_base.
  - a Llama 2 (SentencePiece) vocabulary: tokens, scores and token types from a
    tokenizer.model, a tokenizer.bin, or a synthetic vocabulary for random weights.

wq / wk layout: GGUF "llama" tensors hold the original (Meta) layout, the one
llama2.c files use: llama.cpp rotates adjacent pairs (i, i+1), exactly as
our engine does (docs/FORWARD.md), and its Hugging Face converter *undoes* HF's permutation
before writing. So the matrices are written unchanged (hf_layout=False, the
default); hf_layout=True applies the Meta->HF permutation instead, which only
makes sense for a runtime that expects HF's rotate-half layout.
tests/test_bench.py checks, with llama-cpp-python installed, that llama.cpp
computes the same logits as our engine from a GQA model exported this way.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .validate import regular_file

MAGIC = 0x616B3432
HEADER_BYTES = 256

FTYPES = ("f32", "f16", "q8_0")
Q8_0_BLOCK = 32
SPIECE_SPACE = "\u2581"  # SentencePiece's visible space

# token types (llama.cpp / gguf TokenType values)
TT_NORMAL, TT_UNKNOWN, TT_CONTROL, TT_USER_DEFINED, TT_UNUSED, TT_BYTE = 1, 2, 3, 4, 5, 6

_LAYER_MATRICES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
GGUF_LAYER_NAMES = {
    "rms_att": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output",
    "rms_ffn": "ffn_norm", "w1": "ffn_gate", "w2": "ffn_down", "w3": "ffn_up",
}


# ---------------------------------------------------------------------------
# reading llama2c model files
# ---------------------------------------------------------------------------


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


def _bf16(raw, off: int, shape) -> tuple[np.ndarray, int]:
    n = int(np.prod(shape))
    end = off + 2 * n
    if end > raw.size:
        raise ValueError("model file is truncated")
    h = raw[off:end].view("<u2").astype(np.uint32) << 16
    return h.view(np.float32).reshape(shape), end


def _read_fp32_body(path, raw, off: int, m: BinModel, bf16: bool = False) -> None:
    L, d = m.n_layers, m.dim
    w = m.weights
    mat = _bf16 if bf16 else _f32
    w["rms_att"], off = _f32(raw, off, (L, d))
    w["rms_ffn"], off = _f32(raw, off, (L, d))
    w["rms_final"], off = _f32(raw, off, (d,))
    w["token_embedding"], off = mat(raw, off, (m.vocab_size, d))
    for name in _LAYER_MATRICES:
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
    for name in _LAYER_MATRICES:
        shape = m.matrix_shapes()[name]
        w[name] = np.stack([matrix(shape) for _ in range(L)])
    if not m.shared:
        w["wcls"] = matrix((m.vocab_size, d))


# ---------------------------------------------------------------------------
# wq / wk permutation (docs/FORWARD.md, "wq / wk layouts")
# ---------------------------------------------------------------------------


def permute_meta_to_hf(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Meta -> Hugging Face layout of one projection (n_heads = n_kv_heads for wk)."""
    d_out, d_in = w.shape
    return w.reshape(n_heads, d_out // n_heads // 2, 2, d_in).transpose(0, 2, 1, 3).reshape(d_out, d_in)


def permute_hf_to_meta(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Hugging Face -> Meta layout (the inverse of permute_meta_to_hf)."""
    d_out, d_in = w.shape
    return w.reshape(n_heads, 2, d_out // n_heads // 2, d_in).transpose(0, 2, 1, 3).reshape(d_out, d_in)


# ---------------------------------------------------------------------------
# Q8_0 blocks
# ---------------------------------------------------------------------------


def quantize_q8_0(w: np.ndarray) -> np.ndarray:
    """Q8_0 bytes of a float matrix whose rows are multiples of 32 long: per block
    of 32 values an fp16 scale d = max|w| / 127 and 32 int8 values round(w / d).
    Returns uint8 of shape (rows, cols // 32 * 34)."""
    w = np.asarray(w, dtype=np.float32)
    rows, cols = w.shape
    if cols % Q8_0_BLOCK:
        raise ValueError(f"Q8_0 needs rows that are a multiple of {Q8_0_BLOCK} long (got {cols})")
    blocks = w.reshape(-1, Q8_0_BLOCK)
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    q = np.clip(np.round(blocks * inv), -127, 127).astype(np.int8)
    out = np.empty((blocks.shape[0], 2 + Q8_0_BLOCK), dtype=np.uint8)
    out[:, :2] = d.astype("<f2").view(np.uint8)
    out[:, 2:] = q.view(np.uint8)
    return out.reshape(rows, cols // Q8_0_BLOCK * (2 + Q8_0_BLOCK))


def dequantize_q8_0(data: np.ndarray, cols: int) -> np.ndarray:
    """float32 (rows, cols) from Q8_0 bytes as quantize_q8_0 returns them."""
    blocks = np.asarray(data, dtype=np.uint8).reshape(-1, 2 + Q8_0_BLOCK)
    d = blocks[:, :2].copy().view("<f2").astype(np.float32)
    q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
    return (q * d).reshape(-1, cols)


def _q8_0(w: np.ndarray) -> np.ndarray:
    """gguf's own Q8_0 quantizer when the installed gguf has one, else ours."""
    try:
        import gguf
        from gguf import quants

        return quants.quantize(np.ascontiguousarray(w, dtype=np.float32), gguf.GGMLQuantizationType.Q8_0)
    except (ImportError, AttributeError, NotImplementedError):
        return quantize_q8_0(w)


# ---------------------------------------------------------------------------
# vocabularies
# ---------------------------------------------------------------------------


@dataclass
class Vocab:
    tokens: list[str]   # SentencePiece pieces (spaces as U+2581)
    scores: list[float]
    types: list[int]    # TT_*


def synthetic_pieces(n: int) -> list[str]:
    """n distinct Llama-2-style pieces: <unk>, <s>, </s>, <0x00>..<0xFF>, then
    made-up words (for random-weight models, whose vocabulary means nothing)."""
    if n < 259:
        raise ValueError(f"a synthetic Llama 2 vocabulary needs at least 259 tokens (got {n})")
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    letters = "abcdefghijklmnopqrstuvwxyz"
    for i in range(n - 259):
        k, word = i // 2, ""
        while True:
            word = letters[k % 26] + word
            k = k // 26 - 1
            if k < 0:
                break
        pieces.append((SPIECE_SPACE + word) if i % 2 == 0 else word)
    return pieces


def _types_for(pieces: list[str]) -> list[int]:
    types = []
    for i, p in enumerate(pieces):
        if i == 0:
            types.append(TT_UNKNOWN)
        elif i in (1, 2):
            types.append(TT_CONTROL)
        elif len(p) == 6 and p.startswith("<0x") and p.endswith(">"):
            types.append(TT_BYTE)
        else:
            types.append(TT_NORMAL)
    return types


def synthetic_vocab(n: int) -> Vocab:
    pieces = synthetic_pieces(n)
    return Vocab(pieces, [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(n - 259)],
                 _types_for(pieces))


def sentencepiece_vocab(path: str | os.PathLike) -> Vocab:
    """The vocabulary of a SentencePiece tokenizer.model (needs sentencepiece)."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=os.fspath(path))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        if sp.is_unknown(i):
            types.append(TT_UNKNOWN)
        elif sp.is_control(i):
            types.append(TT_CONTROL)
        elif sp.is_unused(i):
            types.append(TT_UNUSED)
        elif sp.is_byte(i):
            types.append(TT_BYTE)
        else:
            types.append(TT_NORMAL)
    return Vocab(tokens, scores, types)


def tokenizer_bin_vocab(path: str | os.PathLike, vocab_size: int) -> Vocab:
    """The vocabulary of a llama2.c tokenizer.bin (docs/FORMAT.md)."""
    data = Path(path).read_bytes()
    off = 4
    tokens, scores = [], []
    for i in range(vocab_size):
        if off + 8 > len(data):
            raise ValueError(f"{path}: holds fewer than {vocab_size} tokens")
        score, n = struct.unpack_from("<fi", data, off)
        off += 8
        piece = data[off:off + n].decode("utf-8", errors="replace")
        off += n
        if i == 1 and piece.strip() == "<s>":
            piece = "<s>"
        elif i == 2 and piece.strip() == "</s>":
            piece = "</s>"
        tokens.append(piece.replace(" ", SPIECE_SPACE))
        scores.append(float(score))
    return Vocab(tokens, scores, _types_for(tokens))


def write_tokenizer_bin(path: str | os.PathLike, vocab: Vocab) -> Path:
    """Writes a vocabulary as llama2.c's tokenizer.bin (spaces as ' ', BOS / EOS
    as "\\n<s>\\n" / "\\n</s>\\n")."""
    pieces = []
    for i, t in enumerate(vocab.tokens):
        if i == 1:
            t = "\n<s>\n"
        elif i == 2:
            t = "\n</s>\n"
        pieces.append(t.replace(SPIECE_SPACE, " ").encode("utf-8"))
    out = [struct.pack("<I", max(len(p) for p in pieces))]
    for p, s in zip(pieces, vocab.scores):
        out.append(struct.pack("<fi", s, len(p)) + p)
    path = Path(path)
    path.write_bytes(b"".join(out))
    return path


def load_vocab(vocab, vocab_size: int, model_path: Path | None = None) -> Vocab:
    """vocab: a Vocab, "synthetic", a tokenizer.model / tokenizer.bin path, or None
    (tokenizer.bin beside the model if it has vocab_size tokens, else synthetic)."""
    if isinstance(vocab, Vocab):
        v = vocab
    elif vocab is None:
        beside = model_path.parent / "tokenizer.bin" if model_path is not None else None
        v = None
        if beside is not None and beside.exists():
            try:
                v = tokenizer_bin_vocab(beside, vocab_size)
            except ValueError:
                v = None
        if v is None:
            v = synthetic_vocab(vocab_size)
    elif str(vocab) == "synthetic":
        v = synthetic_vocab(vocab_size)
    else:
        p = Path(vocab)
        with open(p, "rb") as f:
            head = f.read(64)
        # a SentencePiece model is a protobuf (first field tag 0x0a); tokenizer.bin
        # starts with a small uint32 max_token_length
        if p.suffix == ".model" or (head[:1] == b"\x0a" and struct.unpack_from("<I", head)[0] > 4096):
            v = sentencepiece_vocab(p)
        else:
            v = tokenizer_bin_vocab(p, vocab_size)
    if len(v.tokens) < vocab_size:
        raise ValueError(f"the vocabulary has {len(v.tokens)} tokens, the model {vocab_size}")
    if len(v.tokens) > vocab_size:
        v = Vocab(v.tokens[:vocab_size], v.scores[:vocab_size], v.types[:vocab_size])
    return v


# ---------------------------------------------------------------------------
# GGUF writer
# ---------------------------------------------------------------------------


def gguf_tensor_names(n_layers: int, shared: bool) -> list[str]:
    """The tensor names export_gguf writes, in order."""
    names = ["token_embd.weight"]
    for layer in range(n_layers):
        names += [f"blk.{layer}.{GGUF_LAYER_NAMES[k]}.weight"
                  for k in ("rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3")]
    names.append("output_norm.weight")
    if not shared:
        names.append("output.weight")
    return names


def export_gguf(model: str | os.PathLike | BinModel, out_path: str | os.PathLike, ftype: str = "f32",
                vocab=None, hf_layout: bool = False, name: str | None = None) -> Path:
    """Writes model (a .bin path or a BinModel) as a GGUF file for llama.cpp.

    ftype: "f32", "f16" or "q8_0" for the matrices (token_embd and output
    included); norms stay F32. Q8_0 needs dim and hidden_dim multiples of 32.
    vocab: see load_vocab. hf_layout: see the module docstring (keep False
    for llama.cpp)."""
    import gguf

    ftype = ftype.lower()
    if ftype not in FTYPES:
        raise ValueError(f"ftype must be one of {', '.join(FTYPES)} (got {ftype!r})")
    model_path = None
    if not isinstance(model, BinModel):
        model_path = Path(model)
        model = read_model(model_path)
    m = model
    if ftype == "q8_0" and (m.dim % Q8_0_BLOCK or m.hidden_dim % Q8_0_BLOCK):
        raise ValueError(f"Q8_0 needs dim and hidden_dim multiples of {Q8_0_BLOCK} "
                         f"(got {m.dim}, {m.hidden_dim})")
    v = load_vocab(vocab, m.vocab_size, model_path)

    out_path = Path(out_path)
    tmp = out_path.with_name(out_path.name + ".part")
    w = gguf.GGUFWriter(os.fspath(tmp), "llama")
    w.add_name(name or (model_path.stem if model_path else "llama2c"))
    w.add_context_length(m.seq_len)
    w.add_embedding_length(m.dim)
    w.add_block_count(m.n_layers)
    w.add_feed_forward_length(m.hidden_dim)
    w.add_head_count(m.n_heads)
    w.add_head_count_kv(m.n_kv_heads)
    w.add_rope_dimension_count(m.head_size)
    w.add_layer_norm_rms_eps(float(m.norm_eps))
    w.add_rope_freq_base(float(m.rope_theta))
    w.add_vocab_size(m.vocab_size)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[ftype]
    w.add_file_type(int(file_type))
    if ftype == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    w.add_tokenizer_model("llama")
    w.add_token_list(v.tokens)
    w.add_token_scores(v.scores)
    w.add_token_types(v.types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    def matrix(tname: str, a: np.ndarray) -> None:
        if ftype == "f32":
            w.add_tensor(tname, np.ascontiguousarray(a, dtype=np.float32))
        elif ftype == "f16":
            w.add_tensor(tname, np.asarray(a, dtype=np.float32).astype(np.float16))
        else:
            q = _q8_0(a)
            w.add_tensor(tname, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    def norm(tname: str, a: np.ndarray) -> None:
        w.add_tensor(tname, np.ascontiguousarray(a, dtype=np.float32))

    wt = m.weights
    matrix("token_embd.weight", wt["token_embedding"])
    for layer in range(m.n_layers):
        pre = f"blk.{layer}."
        norm(pre + "attn_norm.weight", wt["rms_att"][layer])
        for key in _LAYER_MATRICES:
            a = wt[key][layer]
            if hf_layout and key == "wq":
                a = permute_meta_to_hf(np.asarray(a), m.n_heads)
            elif hf_layout and key == "wk":
                a = permute_meta_to_hf(np.asarray(a), m.n_kv_heads)
            if key == "w1":  # keep llama.cpp's order: norm, q, k, v, o, ffn_norm, gate, down, up
                norm(pre + "ffn_norm.weight", wt["rms_ffn"][layer])
            matrix(pre + GGUF_LAYER_NAMES[key] + ".weight", a)
    norm("output_norm.weight", wt["rms_final"])
    if not m.shared:
        matrix("output.weight", wt["wcls"])

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, out_path)
    return out_path


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m llama2c.gguf_export",
                                description="Export a llama2c .bin model to GGUF (llama.cpp).")
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--type", default="f32", choices=FTYPES, help="matrix type (default f32)")
    p.add_argument("--vocab", default=None,
                   help="tokenizer.model, tokenizer.bin or 'synthetic' (default: tokenizer.bin "
                        "beside the model, else synthetic)")
    args = p.parse_args(argv)
    export_gguf(args.model, args.out, args.type, vocab=args.vocab)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
