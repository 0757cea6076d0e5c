"""The GGUF writer: a llama2c model file (.bin, versions 0-5) as a GGUF file
for llama.cpp (`llama2c export OUT.gguf --version gguf --bin IN.bin`).
Needs the `gguf` package (`pip install gguf`), imported only when writing;
never imports torch.

    from llama2c.export.gguf import export_gguf
    export_gguf("model.bin", "model-q8_0.gguf", ftype="q8_0",
                vocab="tokenizer.model")   # or a tokenizer.bin, or "synthetic"

What is written (architecture "llama"):
  - tensors with llama.cpp's names: token_embd, blk.N.attn_norm / attn_q / attn_k /
    attn_v / attn_output / ffn_norm / ffn_gate (w1) / ffn_down (w2) / ffn_up (w3),
    output_norm and, when the classifier is not shared, output. Norms are always F32;
    the matrices are F32, F16 or Q8_0 (32 values per block, fp16 scale max|w|/127).
  - the hyperparameters llama.cpp reads: context_length, embedding_length,
    block_count, feed_forward_length, attention.head_count(_kv),
    rope.dimension_count, attention.layer_norm_rms_epsilon, rope.freq_base; rope
    scaling as llama.cpp's converter writes it: rope.scaling.type linear +
    rope.scaling.factor, or (llama3) a rope_freqs.weight tensor of per-frequency
    divisors.
  - a Llama 2 (SentencePiece) vocabulary (export/vocab.py): tokens, scores and
    token types from a tokenizer.model, a tokenizer.bin, or a synthetic
    vocabulary for random weights.

wq / wk layout: GGUF "llama" tensors hold the original (Meta) layout, the one
llama2.c files use: llama.cpp rotates adjacent pairs (i, i+1), exactly as
our engine does (docs/FORWARD.md), and its Hugging Face converter *undoes* HF's permutation
before writing. So the matrices are written unchanged (hf_layout=False, the
default); hf_layout=True applies the Meta->HF permutation instead, which only
makes sense for a runtime that expects HF's rotate-half layout.
tests/test_bench.py checks, with llama-cpp-python installed, that llama.cpp
computes the same logits as our engine from a GQA model exported this way.

The file is written like every other export output (llama2c/outputs.py): to a
temporary file beside the target, renamed over it when complete, and an
existing target is replaced only with force=True.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..outputs import atomic_path, refuse_existing
from .binmodel import LAYER_MATRICES, BinModel, read_model
from .hf import hf_to_meta, meta_to_hf
from .vocab import load_vocab

FTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
Q8_0_BLOCK = 32

GGUF_LAYER_NAMES = {
    "rms_att": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output",
    "rms_ffn": "ffn_norm", "w1": "ffn_gate", "w2": "ffn_down", "w3": "ffn_up",
}

# wq / wk permutations (docs/FORWARD.md, "wq / wk layouts"); n_heads = n_kv_heads for wk
permute_meta_to_hf = meta_to_hf
permute_hf_to_meta = hf_to_meta


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
# the writer
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
                vocab=None, hf_layout: bool = False, name: str | None = None, *, force: bool = False) -> Path:
    """Writes model (a .bin path or a BinModel) as a GGUF file for llama.cpp.

    ftype: "f32", "f16", "bf16", "q8_0" or "q4_0" for the matrices
    (token_embd and output included); norms stay F32. Q8_0 and Q4_0 need
    dim and hidden_dim multiples of 32 (Q4_0 and BF16 through the gguf
    package's own quantizers).
    vocab: see export.vocab.load_vocab. hf_layout: see the module docstring
    (keep False for llama.cpp). An existing out_path raises FileExistsError
    unless force=True."""
    ftype = ftype.lower()
    if ftype not in FTYPES:
        raise ValueError(f"ftype must be one of {', '.join(FTYPES)} (got {ftype!r})")
    out_path = Path(out_path)
    refuse_existing(out_path, force)
    import gguf

    model_path = None
    if not isinstance(model, BinModel):
        model_path = Path(model)
        model = read_model(model_path)
    m = model
    if ftype in ("q8_0", "q4_0") and (m.dim % Q8_0_BLOCK or m.hidden_dim % Q8_0_BLOCK):
        raise ValueError(f"{ftype.upper()} needs dim and hidden_dim multiples of {Q8_0_BLOCK} "
                         f"(got {m.dim}, {m.hidden_dim})")
    v = load_vocab(vocab, m.vocab_size, model_path)
    with atomic_path(out_path, overwrite=force) as tmp:
        w = gguf.GGUFWriter(os.fspath(tmp), "llama")
        _add_metadata(w, gguf, m, ftype, name or (model_path.stem if model_path else "llama2c"))
        _add_vocab(w, v)
        _add_tensors(w, gguf, m, ftype, hf_layout)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out_path


def _add_metadata(w, gguf, m: BinModel, ftype: str, name: str) -> None:
    w.add_name(name)
    w.add_context_length(m.seq_len)
    w.add_embedding_length(m.dim)
    w.add_block_count(m.n_layers)
    w.add_feed_forward_length(m.hidden_dim)
    w.add_head_count(m.n_heads)
    w.add_head_count_kv(m.n_kv_heads)
    w.add_rope_dimension_count(m.head_size)
    w.add_layer_norm_rms_eps(float(m.norm_eps))
    w.add_rope_freq_base(float(m.rope_theta))
    if m.rope_scaling is not None and m.rope_scaling.type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(m.rope_scaling.factor))
    w.add_vocab_size(m.vocab_size)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                 "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[ftype]
    w.add_file_type(int(file_type))
    if ftype in ("q8_0", "q4_0"):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_vocab(w, v) -> None:
    w.add_tokenizer_model("llama")
    w.add_token_list(v.tokens)
    w.add_token_scores(v.scores)
    w.add_token_types(v.types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)


def _add_tensors(w, gguf, m: BinModel, ftype: str, hf_layout: bool) -> None:
    def matrix(tname: str, a: np.ndarray) -> None:
        if ftype == "f32":
            w.add_tensor(tname, np.ascontiguousarray(a, dtype=np.float32))
        elif ftype == "f16":
            w.add_tensor(tname, np.asarray(a, dtype=np.float32).astype(np.float16))
        elif ftype in ("bf16", "q4_0"):
            from gguf import quants

            qtype = gguf.GGMLQuantizationType.BF16 if ftype == "bf16" else gguf.GGMLQuantizationType.Q4_0
            q = quants.quantize(np.ascontiguousarray(a, dtype=np.float32), qtype)
            w.add_tensor(tname, q, raw_shape=q.shape, raw_dtype=qtype)
        else:
            q = _q8_0(a)
            w.add_tensor(tname, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    def norm(tname: str, a: np.ndarray) -> None:
        w.add_tensor(tname, np.ascontiguousarray(a, dtype=np.float32))

    wt = m.weights
    if m.rope_scaling is not None and m.rope_scaling.type == "llama3":  # as llama.cpp's converter writes it
        w.add_tensor("rope_freqs.weight", np.asarray(m.rope_scaling.divisors(m.head_size, m.rope_theta),
                                                     dtype=np.float32))
    matrix("token_embd.weight", wt["token_embedding"])
    for layer in range(m.n_layers):
        pre = f"blk.{layer}."
        norm(pre + "attn_norm.weight", wt["rms_att"][layer])
        for key in LAYER_MATRICES:
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
