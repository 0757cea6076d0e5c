"""GGUF tensors of the types the engine dequantizes at load (csrc/gguf.c):
Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS, TQ1_0, TQ2_0.

- Random valid blocks of each type: the engine's bf16 matrices are exactly the
  gguf package's dequantization rounded to bf16 (the same logits, bit for bit,
  as a version 4 file of those values), its token embedding exactly the fp32
  dequantization; the notice says what was converted.
- llama.cpp itself (skipped without llama-cpp-python): a model with rows of 256
  values written as F32 GGUF and quantized by llama.cpp (Q4_0, whose
  output.weight llama.cpp stores as Q6_K, Q4_K_M, Q5_K_M, Q6_K, Q5_0, Q4_1 and
  more); our logits and greedy tokens against llama.cpp's on the same file.
"""
from __future__ import annotations

import ctypes
import warnings

import numpy as np
import pytest

import llama2c
from helpers import (LLAMA2_TOK, R, assert_f32_close, c_logits, greedy_continuation, llama_cpp_logits, random_tokens,
                     write_gguf)

gguf = pytest.importorskip("gguf")
from gguf import quants  # noqa: E402

Q = gguf.GGMLQuantizationType
DEQUANTIZED = ["Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0"]

# where each type's fp16 scales (d, and m / dmin) sit in a block; every other
# byte of a block may hold anything
FP16_AT = {"Q4_0": (0,), "Q8_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q2_K": (80, 82),
           "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "IQ4_NL": (0,), "IQ4_XS": (0,),
           "TQ1_0": (52,), "TQ2_0": (64,)}

# dim and hidden_dim multiples of 256 (K-quant blocks), GQA, two layers
KCFG = R.Config(dim=256, hidden_dim=512, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, seq_len=32)


def random_blocks(name: str, rows: int, cols: int, rng, std: float) -> np.ndarray:
    """rows x cols values of type `name` as random valid blocks (rows x bytes
    per row): random bytes, finite fp16 scales of either sign chosen so that
    the values have about this standard deviation."""
    qtype = Q[name]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = rows * cols // block
    b = rng.integers(0, 256, (n, size), dtype=np.uint8)
    for at in FP16_AT[name]:  # unit scales first, to measure the spread
        b[:, at:at + 2] = np.ones(n, "<f2").view(np.uint8).reshape(n, 2)
    unit = float(quants.dequantize(b.reshape(rows, -1), qtype).std())
    for at in FP16_AT[name]:
        s = rng.uniform(0.5, 1.5, n) * rng.choice([-1.0, 1.0], n) * std / unit
        b[:, at:at + 2] = s.astype("<f2").view(np.uint8).reshape(n, 2)
    return b.reshape(rows, cols // block * size)


def dequantized(raw: np.ndarray, name: str) -> np.ndarray:
    """The gguf package's dequantization (float32, rows x cols)."""
    return quants.dequantize(raw, Q[name]).astype(np.float32)


def quantized_model(make_model, name: str, seed: int, *, matrices=True, embedding=False, shared=False,
                    cfg=KCFG):
    """A random model and a GGUF file of it whose matrices (token_embd and
    output included when asked) are random blocks of type `name`.
    Returns (GGUF path, the float32 values each tensor holds, by tensor name)."""
    rng = np.random.default_rng(seed)
    w = R.random_weights(cfg, seed, shared=shared)
    w["token_embedding"] = R.bf16_round(w["token_embedding"])  # bf16 values: a version 4 file holds them exactly
    m = make_model(cfg, version=1, weights=w, shared=shared)
    values = {}

    def raw(tname, a):
        is_emb = tname == "token_embd.weight"
        if a.ndim != 2 or (is_emb and not embedding) or (not is_emb and not matrices):
            return None
        q = random_blocks(name, *a.shape, rng, std=1 / np.sqrt(a.shape[1]))
        values[tname] = dequantized(q, name)
        return q, Q[name]

    path = write_gguf(m, m.path.with_name(f"{m.path.stem}-{name}.gguf"), raw)
    return path, w, values


def weights_of(cfg: R.Config, w: dict, values: dict) -> dict:
    """w with each tensor that values holds replaced by it (reference.py's names)."""
    out = dict(w)
    names = {"wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output", "w1": "ffn_gate",
             "w2": "ffn_down", "w3": "ffn_up"}
    for key, g in names.items():
        if f"blk.0.{g}.weight" in values:
            out[key] = np.stack([values[f"blk.{layer}.{g}.weight"] for layer in range(cfg.n_layers)])
    if "token_embd.weight" in values:
        out["token_embedding"] = values["token_embd.weight"]
    if "output.weight" in values:
        out["wcls"] = values["output.weight"]
    return out


def load(path, **kw) -> llama2c.Llama:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", llama2c.ConversionWarning)
        return llama2c.Llama(path, **kw)


# ---------------------------------------------------------------------------
# every type, from random blocks
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", DEQUANTIZED)
def test_matrices_are_the_dequantized_values_rounded_to_bf16(make_model, name):
    seed = 100 + DEQUANTIZED.index(name)
    path, w, values = quantized_model(make_model, name, seed)
    assert len(values) == 7 * KCFG.n_layers + 1  # every matrix and output.weight
    with pytest.warns(llama2c.ConversionWarning) as record:
        llm = llama2c.Llama(path)
    want = f"GGUF tensors of type {name} ({7 * KCFG.n_layers + 1} tensors) were dequantized to bf16 at load"
    assert llm.notice == want and [str(r.message) for r in record] == [want]
    assert llm.config.weights == "bf16" and llm.config.group_size == 0
    # a version 4 file of the dequantized values (rounded to bf16 by its writer) runs the same bits
    v4 = make_model(KCFG, version=4, weights=weights_of(KCFG, w, values), shared=False)
    tokens = random_tokens(KCFG, 10, seed)
    got, want_logits = c_logits(llm, tokens), c_logits(load(v4.path), tokens)
    assert np.isfinite(got).all() and got.std() > 0.1
    assert np.array_equal(got, want_logits), np.abs(got - want_logits).max()
    # and not merely the fp32 values, nor another type's reading of the same bytes
    assert_f32_close(got, R.forward(KCFG, R.bf16_weights(weights_of(KCFG, w, values)), tokens), name)
    assert np.abs(got - c_logits(load(make_model(KCFG, version=1, shared=False,
                                                 weights=weights_of(KCFG, w, values)).path), tokens)).max() > 0


@pytest.mark.parametrize("name", DEQUANTIZED)
def test_token_embedding_is_the_exact_fp32_dequantization(make_model, name):
    seed = 200 + DEQUANTIZED.index(name)
    path, w, values = quantized_model(make_model, name, seed, matrices=False, embedding=True)
    assert list(values) == ["token_embd.weight"]
    llm = load(path)
    assert llm.notice == (f"GGUF tensors of type {name} (1 tensor) were dequantized to bf16 at load "
                          "(the token embedding to fp32)")
    assert llm.config.weights == "f32"
    v1 = make_model(KCFG, version=1, weights=weights_of(KCFG, w, values), shared=False)
    tokens = random_tokens(KCFG, 8, seed)
    assert np.array_equal(c_logits(llm, tokens), c_logits(load(v1.path), tokens))


@pytest.mark.parametrize("name", ["Q6_K", "Q4_K", "Q5_0"])
def test_shared_classifier_from_a_quantized_embedding(make_model, name):
    """No output.weight: rows are looked up in the fp32 dequantization and the
    classifier runs its bf16 rounding (counted once in the notice)."""
    path, w, values = quantized_model(make_model, name, 300, matrices=False, embedding=True, shared=True)
    llm = load(path)
    assert llm.config.shared_classifier
    assert llm.notice.startswith(f"GGUF tensors of type {name} (1 tensor) were")
    ref_w = weights_of(KCFG, w, values)
    ref_w["wcls"] = R.bf16_round(ref_w["token_embedding"])
    tokens = random_tokens(KCFG, 8, 3)
    assert_f32_close(c_logits(llm, tokens), R.forward(KCFG, ref_w, tokens), name)


def test_mixed_types_in_one_file(make_model):
    """llama.cpp's own mixes: Q4_0 matrices with a Q6_K classifier run the Q4_0
    engine (group size 32) beside a bf16 classifier; each layer its own type."""
    rng = np.random.default_rng(5)
    w = R.random_weights(KCFG, 5, shared=False)
    m = make_model(KCFG, version=1, weights=w, shared=False)
    kinds = {"output.weight": "Q6_K", "blk.0.attn_v.weight": "Q5_K", "blk.1.ffn_down.weight": "Q3_K",
             "token_embd.weight": "Q4_K"}

    def raw(tname, a):
        if a.ndim != 2:
            return None
        name = kinds.get(tname, "Q4_0")
        if name == "Q4_0":
            q = quants.quantize(np.ascontiguousarray(a, np.float32), Q.Q4_0)
        else:
            q = random_blocks(name, *a.shape, rng, std=1 / np.sqrt(a.shape[1]))
        return q, Q[name]

    path = write_gguf(m, m.path.with_name("mixed.gguf"), raw)
    llm = load(path)
    assert llm.config.weights == "q4_0" and llm.config.group_size == 32
    assert llm.notice == ("GGUF tensors of type Q3_K (1 tensor), Q4_K (1 tensor), Q5_K (1 tensor), Q6_K (1 tensor) "
                          "were dequantized to bf16 at load (the token embedding to fp32)")
    logits = c_logits(llm, random_tokens(KCFG, 6, 1))
    assert np.isfinite(logits).all() and logits.std() > 0.1
    quantized = c_logits(load(path, quantize=True), random_tokens(KCFG, 6, 1))  # runq: bf16 -> Q8_0
    assert np.abs(quantized - logits).max() < 0.1 * np.abs(logits).max()


def test_refused_and_corrupt_blocks_are_clear_errors(make_model, tmp_path):
    w = R.random_weights(KCFG, 7, shared=False)
    m = make_model(KCFG, version=1, weights=w, shared=False)
    rng = np.random.default_rng(7)

    def retyped(tname, qname):
        def raw(name, a):
            if name != tname:
                return None
            block, size = gguf.GGML_QUANT_SIZES[Q[qname]]
            if qname in FP16_AT:
                return random_blocks(qname, *a.shape, rng, std=0.05), Q[qname]
            return np.zeros((a.shape[0], a.shape[1] // block * size), np.uint8), Q[qname]
        return raw

    iq2 = write_gguf(m, tmp_path / "iq2.gguf", retyped("blk.0.attn_q.weight", "IQ2_XXS"))
    msg = str(pytest.raises(llama2c.FormatError, llama2c.Llama, iq2).value)
    assert "IQ2_XXS, which llama2c does not run" in msg and "llama2c export" in msg and "--gguf" in msg
    # norms are never quantized (llama.cpp keeps them F32)
    norm = write_gguf(m, tmp_path / "norm.gguf",
                      lambda name, a: (random_blocks("Q4_K", 1, a.size, rng, 0.05), Q.Q4_K)
                      if name == "blk.1.ffn_norm.weight" else None)
    with pytest.raises(llama2c.FormatError, match="norm must not be quantized"):
        llama2c.Llama(norm)
    # a NaN or infinite fp16 scale anywhere is refused like any non-finite weight
    for qname, bad in [("Q6_K", 0x7E00), ("Q4_K", 0x7C00), ("Q4_1", 0x7E00), ("IQ4_XS", 0xFC00)]:
        for tname in ("blk.1.ffn_up.weight", "token_embd.weight"):
            def raw(name, a, qname=qname, bad=bad, tname=tname):
                if name != tname:
                    return None
                q = random_blocks(qname, *a.shape, rng, std=0.05)
                size = gguf.GGML_QUANT_SIZES[Q[qname]][1]
                at = q.shape[1] - size + FP16_AT[qname][-1]  # the last block of the first row
                q[0, at:at + 2] = np.array([bad], "<u2").view(np.uint8)
                return q, Q[qname]
            p = write_gguf(m, tmp_path / f"nan-{qname}.gguf", raw)
            with pytest.raises(llama2c.FormatError, match="NaN or infinite"):
                load(p)


def test_run_prints_the_notice_on_stderr_only(make_model, cli):
    path, w, values = quantized_model(make_model, "Q4_K", 400)
    v4 = make_model(KCFG, version=4, weights=weights_of(KCFG, w, values), shared=False)
    args = ["-z", v4.tokenizer, "-n", "8", "-t", "0", "-i", "ab"]
    proc = cli("run", path, *args)
    assert proc.returncode == 0, proc.stderr
    assert "note: GGUF tensors of type Q4_K (15 tensors) were dequantized to bf16 at load" in proc.stderr.decode()
    assert b"note:" not in proc.stdout and proc.stdout.startswith(b"ab")
    assert proc.stdout == cli("run", v4.path, *args).stdout  # the version 4 file of the same values
    quantized = cli("runq", path, *args)
    assert quantized.returncode == 0 and b"note: GGUF tensors of type Q4_K" in quantized.stderr


def test_llama2c_commands_show_the_notice(make_model, capsys):
    from llama2c.cli import main

    path, _, _ = quantized_model(make_model, "Q5_K", 401)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the commands print the notice instead of warning
        assert main(["info", str(path)]) == 0
        out = capsys.readouterr().out
        assert "note:        GGUF tensors of type Q5_K (15 tensors) were dequantized to bf16 at load" in out
        assert "run as bf16" in out
        assert main(["generate", "ab", "--model", str(path), "--tokenizer", str(make_model.tokenizer(300)),
                     "-n", "4", "-t", "0"]) == 0
        got = capsys.readouterr()
        assert got.out.startswith("ab") and "note" not in got.out
        assert "llama2c: note: GGUF tensors of type Q5_K (15 tensors) were dequantized" in got.err


# ---------------------------------------------------------------------------
# llama.cpp's own quantizer and engine
# ---------------------------------------------------------------------------

# rows of 256 values everywhere (K-quants), the Llama 2 vocabulary
LCFG = R.Config(dim=256, hidden_dim=768, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, seq_len=64)


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory):
    """A random model, written as an F32 GGUF file with the Llama 2 tokenizer
    (../shared/data; else a made-up vocabulary of 32000 pieces), whose greedy
    continuation is clear: each token's classifier row adds a strong term
    along one other token's embedding (a random bigram table), so greedy
    tokens do not hinge on near ties."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (.ci/run builds it)")
    from llama2c.export import gguf as ge

    w = R.random_weights(LCFG, 16, shared=False)
    rng = np.random.default_rng(16)
    emb = w["token_embedding"]
    nxt = rng.integers(3, LCFG.vocab_size, LCFG.vocab_size)  # never BOS / EOS
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    np.add.at(w["wcls"], nxt, 1.0 * unit.astype(np.float32))
    root = tmp_path_factory.mktemp("llama_cpp")
    binf = R.write_model(root / "m.bin", LCFG, w, 1)
    vocab = LLAMA2_TOK / "tokenizer.model"
    return ge.export_gguf(binf, root / "m-f32.gguf", "f32", vocab=str(vocab) if vocab.is_file() else "synthetic")


def llama_cpp_quantize(src, out, ftype: str):
    llama_cpp = pytest.importorskip("llama_cpp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = 1
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params)) == 0
    return out


def llama_cpp_greedy(path, text: bytes, n: int) -> tuple[list[int], list[int]]:
    """llama.cpp's tokens of text (BOS first) and up to n greedy tokens after
    them, stopping before BOS or EOS (as helpers.greedy_continuation)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=LCFG.seq_len, n_threads=1, n_threads_batch=1,
                          logits_all=True, type_k=0, type_v=0, verbose=False)
    try:
        out, prompt = [], llm.tokenize(text)
        llm.eval(prompt)
        for _ in range(n):
            t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            if t in (1, 2):
                break
            out.append(t)
            llm.eval([t])
        return prompt, out
    finally:
        llm.close()


# file type -> the tensor types llama.cpp writes for it
LLAMA_CPP_TYPES = {
    "Q4_0": {"Q4_0", "Q6_K", "F32"},  # output.weight: Q6_K (rows of 256)
    "Q4_K_M": {"Q4_K", "Q6_K", "F32"},
    "Q5_K_M": {"Q5_K", "Q6_K", "F32"},
    "Q6_K": {"Q6_K", "F32"},
    "Q5_0": {"Q5_0", "Q6_K", "F32"},
    "Q4_1": {"Q4_1", "Q6_K", "F32"},
    "Q5_1": {"Q5_1", "Q6_K", "F32"},
    "Q3_K_M": {"Q3_K", "Q4_K", "Q5_K", "Q6_K", "F32"},
    "Q2_K": {"Q2_K", "Q3_K", "Q6_K", "F32"},
}

# |ours - llama.cpp| <= LLAMA_CPP_TOL x max|logit| on the same file.
# llama.cpp's CPU engine multiplies these weights by activations quantized to
# 8 bits (Q8_0 / Q8_1 blocks of 32 for the legacy types, Q8_K blocks of 256 for
# K-quants); we multiply the dequantized weights (bf16-rounded, 2^-9 relative)
# by the fp32 activations. Over 2 layers x 7 matmuls and the classifier that
# measured 0.5-0.8% of the largest logit for every type here; 2% leaves room,
# and is far below each type's own quantization error against the F32 model
# (2-24%), which the test also checks: a wrong block decoder, or running other
# weights than the file's, misses by that much or more.
LLAMA_CPP_TOL = 0.02


@pytest.mark.parametrize("ftype", sorted(LLAMA_CPP_TYPES))
def test_llama_cpp_quantized_files_match_llama_cpp(f32_gguf, ftype):
    path = llama_cpp_quantize(f32_gguf, f32_gguf.with_name(f"m-{ftype}.gguf"), ftype)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert set(types.values()) == LLAMA_CPP_TYPES[ftype], types
    if ftype == "Q4_0":
        assert types["output.weight"] == "Q6_K" and types["blk.0.attn_q.weight"] == "Q4_0"
    with pytest.warns(llama2c.ConversionWarning):
        llm = llama2c.Llama(path)
    converted = sorted({t for t in types.values() if t not in ("F32", "Q4_0")})
    assert all(f"{t} (" in llm.notice for t in converted), llm.notice
    assert llm.config.weights == ("q4_0" if ftype == "Q4_0" else "bf16")

    tokens = random_tokens(LCFG, 24, 9)
    theirs = llama_cpp_logits(path, tokens, LCFG.seq_len)
    ours = c_logits(llm, tokens)
    f32 = llama_cpp_logits(f32_gguf, tokens, LCFG.seq_len)
    scale = np.abs(f32).max()
    ours_err, quant_err = np.abs(ours - theirs).max() / scale, np.abs(theirs - f32).max() / scale
    assert ours_err <= LLAMA_CPP_TOL, (ours_err, quant_err)
    assert ours_err < 0.5 * quant_err, (ours_err, quant_err)  # we run the file's quantized weights
    top2 = np.sort(theirs, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * LLAMA_CPP_TOL * scale
    assert clear.sum() >= len(tokens) // 2 and np.array_equal(ours.argmax(1)[clear], theirs.argmax(1)[clear])

    # 16 greedy tokens after a prompt tokenized by each engine from the file's own vocabulary
    text, steps = "Once upon a time", 16
    ours_greedy, (prompt, theirs_greedy) = None, llama_cpp_greedy(path, text.encode(), steps)
    if (LLAMA2_TOK / "tokenizer.model").is_file():  # the Llama 2 vocabulary: "\u2581Once" is one token
        assert llm.tokenize(text) == prompt == [1, 9038, 2501, 263, 931]
    ours_greedy = greedy_continuation(llm, prompt, steps)
    assert len(ours_greedy) == steps and ours_greedy == theirs_greedy
