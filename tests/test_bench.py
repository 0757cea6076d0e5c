"""The benchmark's plumbing, for correctness only (no timing assertions):
random-weight model writers, the .bin reader, the GGUF exporter (read back
with gguf.GGUFReader) and, when llama-cpp-python is installed, llama.cpp
computing the same logits as our engine from the exported file."""
from __future__ import annotations

import json

import numpy as np
import pytest

import llama2c
from llama2c import bench
from llama2c import gguf_export as ge

from helpers import GQA, MHA, R, c_logits, llama_cpp_logits, random_tokens

# dim and hidden_dim multiples of 32 (Q8_0 blocks), GQA, vocab > 259 (synthetic vocab)
Q8CFG = R.Config(dim=64, hidden_dim=160, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320, seq_len=32)


def _weights_equal(m: ge.BinModel, w: dict, exact: bool = True, tol: dict | None = None):
    for k, v in w.items():
        if k.startswith("freq_cis"):
            continue
        got = np.asarray(m.weights[k])
        assert got.shape == v.shape, (k, got.shape, v.shape)
        if exact:
            assert np.array_equal(got, v), k
        else:
            assert np.all(np.abs(got - v) <= tol[k]), k


# ---------------------------------------------------------------------------
# reading .bin files and writing the random-weight models
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", [0, 1, 3])
@pytest.mark.parametrize("shared", [True, False])
def test_read_model_fp32(make_model, version, shared):
    mf = make_model(GQA, version=version, shared=shared, seed=11)
    m = ge.read_model(mf.path)
    assert (m.dim, m.hidden_dim, m.n_layers, m.n_heads, m.n_kv_heads, m.vocab_size, m.seq_len) == GQA.params()
    assert m.shared == shared and m.version == version
    assert m.rope_theta == pytest.approx(10000.0) and m.norm_eps == pytest.approx(1e-5)
    _weights_equal(m, mf.w)


@pytest.mark.parametrize("shared", [True, False])
def test_read_model_int8_dequantizes(make_model, shared):
    mf = make_model(GQA, version=2, shared=shared, seed=12)
    m = ge.read_model(mf.path)
    assert m.version == 2 and m.group_size == mf.group_size
    for name in ("token_embedding", "wq", "w2") + (() if shared else ("wcls",)):
        mats = mf.w[name] if mf.w[name].ndim == 3 else mf.w[name][None]
        got = m.weights[name] if m.weights[name].ndim == 3 else m.weights[name][None]
        for a, b in zip(mats, got):
            exp = R.dequantize(*R.quantize_q80(a.ravel(), mf.group_size), mf.group_size).reshape(a.shape)
            assert np.array_equal(b, exp), name


def test_read_model_rejects_junk(tmp_path):
    p = tmp_path / "junk.bin"
    p.write_bytes(b"\x01" * 10)
    with pytest.raises(ValueError):
        ge.read_model(p)


def test_random_model_and_int8_copy(tmp_path):
    params = Q8CFG.params()
    fp32 = bench.write_random_fp32(tmp_path / "m.bin", params, seed=5)
    m = ge.read_model(fp32)
    assert m.version == 1 and m.shared
    w = {k: np.array(v) for k, v in m.weights.items()}
    # O(1) activations: finite logits with a sensible spread
    ours = llama2c.Llama(fp32)
    logits = c_logits(ours, [1, 100, 200, 300])
    assert np.all(np.isfinite(logits)) and 0.1 < logits.std() < 10
    # the int8 copy is byte for byte what the reference exporter writes
    int8 = bench.write_int8_from_fp32(fp32, tmp_path / "m8.bin")
    assert int8.read_bytes() == R.model_bytes(Q8CFG, w, 2)
    # and loads in the engine
    assert llama2c.Llama(int8).config.weights == "q8_0"
    # same seed, same file
    again = bench.write_random_fp32(tmp_path / "m2.bin", params, seed=5)
    assert again.read_bytes() == fp32.read_bytes()


def test_shapes_table():
    assert bench.SHAPES["stories15M"] == (288, 768, 6, 6, 6, 32000, 256)
    assert bench.SHAPES["stories42M"] == (512, 1376, 8, 8, 8, 32000, 1024)
    assert bench.SHAPES["stories110M"] == (768, 2048, 12, 12, 12, 32000, 1024)
    assert bench.SHAPES["tinyllama"] == (2048, 5632, 22, 32, 4, 32000, 2048)
    for dim, hidden, *_ in bench.SHAPES.values():
        assert dim % 32 == 0 and hidden % 32 == 0  # Q8_0 blocks fit


# ---------------------------------------------------------------------------
# vocabularies
# ---------------------------------------------------------------------------


def test_synthetic_vocab_and_tokenizer_bin(tmp_path):
    v = ge.synthetic_vocab(1000)
    assert len(v.tokens) == len(set(v.tokens)) == 1000
    assert v.tokens[:3] == ["<unk>", "<s>", "</s>"] and v.tokens[3 + 0x0A] == "<0x0A>"
    assert v.types[0] == ge.TT_UNKNOWN and v.types[1] == v.types[2] == ge.TT_CONTROL
    assert set(v.types[3:259]) == {ge.TT_BYTE} and set(v.types[259:]) == {ge.TT_NORMAL}
    path = ge.write_tokenizer_bin(tmp_path / "tok.bin", v)
    tok = llama2c.Tokenizer(path, vocab_size=1000)
    assert tok.vocab_size == 1000
    back = ge.tokenizer_bin_vocab(path, 1000)
    assert back.tokens == v.tokens and back.scores == v.scores and back.types == v.types
    with pytest.raises(ValueError):
        ge.synthetic_vocab(100)


def test_sentencepiece_vocab(shared_data):
    pytest.importorskip("sentencepiece")
    v = ge.sentencepiece_vocab(shared_data / "llama2" / "tokenizer.model")
    assert len(v.tokens) == 32000
    assert v.tokens[:3] == ["<unk>", "<s>", "</s>"] and v.tokens[3] == "<0x00>"
    assert v.types[0] == ge.TT_UNKNOWN and v.types[1] == ge.TT_CONTROL and v.types[3] == ge.TT_BYTE
    # the same pieces as llama2.c's tokenizer.bin export of it
    b = ge.tokenizer_bin_vocab(shared_data / "llama2" / "tokenizer.bin", 32000)
    assert b.tokens[259:] == v.tokens[259:]


# ---------------------------------------------------------------------------
# wq / wk permutation helpers (docs/FORWARD.md, "wq / wk layouts")
# ---------------------------------------------------------------------------


def test_permutations():
    n_heads, head, d_in = 3, 8, 5
    w = np.arange(n_heads * head * d_in, dtype=np.float32).reshape(n_heads * head, d_in)
    hf = ge.permute_meta_to_hf(w, n_heads)
    # HF keeps, per head, the even rows of the Meta layout first, then the odd ones
    for h in range(n_heads):
        blk = w[h * head:(h + 1) * head]
        assert np.array_equal(hf[h * head:(h + 1) * head], np.concatenate([blk[0::2], blk[1::2]]))
    assert np.array_equal(ge.permute_hf_to_meta(hf, n_heads), w)


# ---------------------------------------------------------------------------
# the GGUF file, read back without llama.cpp
# ---------------------------------------------------------------------------


def _field(reader, key):
    f = reader.fields[key]
    if len(f.types) == 1 and f.types[0].name == "STRING":
        return bytes(f.parts[f.data[0]]).decode()
    if f.types[0].name == "ARRAY":
        vals = [f.parts[i] for i in f.data]
        if f.types[-1].name == "STRING":
            return [bytes(v).decode() for v in vals]
        return [v.tolist()[0] for v in vals]
    return f.parts[f.data[0]].tolist()[0]


@pytest.mark.parametrize("ftype", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("shared", [True, False])
def test_gguf_export_reads_back(make_model, tmp_path, ftype, shared):
    gguf = pytest.importorskip("gguf")
    mf = make_model(Q8CFG, version=1, shared=shared, seed=21)
    cfg, w = mf.cfg, mf.w
    out = ge.export_gguf(mf.path, tmp_path / f"m-{ftype}.gguf", ftype, vocab="synthetic")
    r = gguf.GGUFReader(out)

    assert _field(r, "general.architecture") == "llama"
    expect = {
        "llama.context_length": cfg.seq_len, "llama.embedding_length": cfg.dim,
        "llama.block_count": cfg.n_layers, "llama.feed_forward_length": cfg.hidden_dim,
        "llama.attention.head_count": cfg.n_heads, "llama.attention.head_count_kv": cfg.n_kv_heads,
        "llama.rope.dimension_count": cfg.head_size,
    }
    for k, v in expect.items():
        assert _field(r, k) == v, k
    assert _field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert _field(r, "llama.rope.freq_base") == pytest.approx(10000.0)
    assert _field(r, "tokenizer.ggml.model") == "llama"
    tokens = _field(r, "tokenizer.ggml.tokens")
    assert len(tokens) == cfg.vocab_size and tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert len(_field(r, "tokenizer.ggml.scores")) == cfg.vocab_size
    types = _field(r, "tokenizer.ggml.token_type")
    assert types[1] == ge.TT_CONTROL and types[3] == ge.TT_BYTE and types[-1] == ge.TT_NORMAL
    assert _field(r, "tokenizer.ggml.bos_token_id") == 1 and _field(r, "tokenizer.ggml.eos_token_id") == 2

    tensors = {t.name: t for t in r.tensors}
    assert list(tensors) == ge.gguf_tensor_names(cfg.n_layers, shared)
    assert ("output.weight" in tensors) == (not shared)
    mat_type = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
                "q8_0": gguf.GGMLQuantizationType.Q8_0}[ftype]

    def check(name, a):
        t = tensors[name]
        a = np.asarray(a, dtype=np.float32)
        # GGUF lists dimensions fastest first: (in, out) for an (out, in) matrix
        assert list(t.shape) == list(a.shape[::-1]), (name, t.shape, a.shape)
        if a.ndim == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
            assert np.array_equal(np.asarray(t.data).reshape(a.shape), a), name
            return
        assert t.tensor_type == mat_type, (name, t.tensor_type)
        if ftype == "f32":
            assert np.array_equal(np.asarray(t.data).reshape(a.shape), a), name
        elif ftype == "f16":
            assert np.array_equal(np.asarray(t.data).reshape(a.shape), a.astype(np.float16)), name
        else:
            raw = np.asarray(t.data, dtype=np.uint8).reshape(-1, 34)
            d16 = raw[:, :2].copy().view("<f2").astype(np.float32)[:, 0]
            q = raw[:, 2:].copy().view(np.int8).astype(np.float32)
            blocks = a.reshape(-1, 32)
            amax = np.abs(blocks).max(axis=1)
            # the fp16 scale is max|w| / 127 rounded to fp16
            assert np.array_equal(d16, (amax / np.float32(127)).astype(np.float16).astype(np.float32)), name
            assert np.abs(q).max() <= 127
            # dequantized within half a step (plus the scale's fp16 rounding, at most 127 ulps of it)
            err = np.abs(q * d16[:, None] - blocks)
            bound = 0.5 * d16 + 127 * np.abs(d16 - amax / 127) + 1e-7
            assert np.all(err <= bound[:, None]), (name, float((err - bound[:, None]).max()))
            # and gguf's own dequantizer agrees with our reading of the blocks
            deq = gguf.quants.dequantize(np.asarray(t.data), gguf.GGMLQuantizationType.Q8_0)
            assert np.allclose(deq.reshape(a.shape), (q * d16[:, None]).reshape(a.shape))

    check("token_embd.weight", w["token_embedding"])
    for layer in range(cfg.n_layers):
        check(f"blk.{layer}.attn_norm.weight", w["rms_att"][layer])
        check(f"blk.{layer}.ffn_norm.weight", w["rms_ffn"][layer])
        for key in ("wq", "wk", "wv", "wo", "w1", "w2", "w3"):
            # Meta layout, unpermuted (see gguf_export's docstring)
            check(f"blk.{layer}.{ge.GGUF_LAYER_NAMES[key]}.weight", w[key][layer])
    check("output_norm.weight", w["rms_final"])
    if not shared:
        check("output.weight", w["wcls"])


def test_gguf_export_hf_layout_and_errors(make_model, tmp_path):
    gguf = pytest.importorskip("gguf")
    mf = make_model(GQA, version=1, seed=22)
    out = ge.export_gguf(mf.path, tmp_path / "hf.gguf", "f32", vocab="synthetic", hf_layout=True)
    t = {x.name: x for x in gguf.GGUFReader(out).tensors}
    wk = np.asarray(t["blk.1.attn_k.weight"].data).reshape(GQA.kv_dim, GQA.dim)
    assert np.array_equal(wk, ge.permute_meta_to_hf(mf.w["wk"][1], GQA.n_kv_heads))
    with pytest.raises(ValueError, match="Q8_0"):  # hidden_dim 172 is not a multiple of 32
        ge.export_gguf(mf.path, tmp_path / "bad.gguf", "q8_0", vocab="synthetic")
    with pytest.raises(ValueError):
        ge.export_gguf(mf.path, tmp_path / "bad.gguf", "q4_0", vocab="synthetic")


def test_q8_0_helpers_match_gguf():
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(3)
    a = rng.standard_normal((6, 96)).astype(np.float32)
    a[0, :32] = 0  # an all-zero block
    ours = ge.quantize_q8_0(a)
    theirs = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
    assert ours.shape == theirs.shape == (6, 3 * 34)
    assert np.array_equal(ours, theirs)
    assert np.array_equal(ge.dequantize_q8_0(ours, 96)[0, :32], np.zeros(32, np.float32))


# ---------------------------------------------------------------------------
# `llama2c bench` end to end (our engine only; no timing checked)
# ---------------------------------------------------------------------------


def test_bench_main_json(make_model, tmp_path, capsys):
    mf = make_model(MHA, version=1, seed=23)
    rc = bench.main([str(mf.path), "-z", str(mf.tokenizer), "--threads", "1,2", "--reps", "2", "-n", "4",
                     "-P", "5", "--no-reference", "--json", "-q", "--cache-dir", str(tmp_path / "c")])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    assert data["meta"]["llama_cpp_ok"] is False
    rows = data["rows"]
    assert [(r["threads"], r["weights"]) for r in rows] == [(1, "fp32"), (2, "fp32")]
    for r in rows:
        assert len(r["ours_decode"]) == 2 and len(r["ours_prefill"]) == 2
        assert r["ours_decode"][0] > 0 and r["ours_prefill"][0] > 0
        assert r["ref_decode"] == [] and r["median"]["ratio_decode"] is None
        assert r["median"]["ours_decode"] > 0
        assert r["decode_tokens"] == 4 and r["prompt_tokens"] == 5


def test_bench_markdown_and_doc(make_model, tmp_path, capsys):
    mf = make_model(MHA, version=2, seed=24)
    doc = tmp_path / "BENCH.md"
    doc.write_text("# B\n\nintro\n\n<!-- bench:begin -->\nold\n<!-- bench:end -->\n\ntail\n")
    rc = bench.main([str(mf.path), "-z", str(mf.tokenizer), "--threads", "1", "--reps", "1", "-n", "3",
                     "-P", "4", "--no-reference", "-q", "--cache-dir", str(tmp_path / "c"),
                     "--update-doc", str(doc)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| model | weights" in out and f"| {mf.path.name} | int8 / - | 1 | 3 / 4 |" in out
    text = doc.read_text()
    assert text.startswith("# B\n\nintro\n\n<!-- bench:begin -->") and text.endswith("<!-- bench:end -->\n\ntail\n")
    assert "old" not in text and f"| {mf.path.name} | int8 / - | 1 | 3 / 4 |" in text


def test_bench_merge(make_model, tmp_path, capsys):
    a, b = make_model(MHA, version=1, seed=25), make_model(MHA, version=2, seed=25)
    common = ["-z", str(a.tokenizer), "--reps", "1", "-n", "2", "-P", "3", "--no-reference", "-q",
              "--cache-dir", str(tmp_path / "c")]
    first = tmp_path / "first.json"
    assert bench.main([str(a.path), "--threads", "1,2", "--json-out", str(first)] + common) == 0
    both = tmp_path / "both.json"
    assert bench.main([str(b.path), str(a.path), "--threads", "2", "--merge", str(first),
                       "--json-out", str(both)] + common) == 0
    rows = json.loads(both.read_text())["rows"]
    # a at 1 thread kept from the first run; a and b at 2 threads measured now; fp32 before int8
    assert [(r["model"], r["weights"], r["threads"]) for r in rows] == [
        (a.path.name, "fp32", 1), (a.path.name, "fp32", 2), (b.path.name, "int8", 2)]
    assert rows[0] == json.loads(first.read_text())["rows"][0]
    assert all(r["load"] is None or r["load"] >= 0 for r in rows)
    capsys.readouterr()


def test_bench_bad_arguments(capsys):
    assert bench.main([]) == 2
    assert bench.main(["--shape", "nope", "--no-reference"]) == 1
    assert "unknown shape" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# llama.cpp on the exported file computes our function (needs llama-cpp-python)
# ---------------------------------------------------------------------------


_llama_cpp_logits = llama_cpp_logits  # (tests/helpers.py, shared with test_gguf_quant_types.py)


def test_llama_cpp_f32_matches_ours(make_model, tmp_path):
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gguf")
    mf = make_model(GQA, version=1, seed=31)  # GQA: wk with n_kv_heads
    tokens = random_tokens(GQA, 20, seed=4)
    ours = c_logits(llama2c.Llama(mf.path), tokens)
    g = ge.export_gguf(mf.path, tmp_path / "m.gguf", "f32", vocab="synthetic")
    ref = _llama_cpp_logits(g, tokens, GQA.seq_len)
    tol = 1e-3 * max(1.0, float(np.abs(ours).max()))
    assert np.abs(ref - ours).max() <= tol, np.abs(ref - ours).max(axis=1)
    assert np.array_equal(ref.argmax(axis=1), ours.argmax(axis=1))
    # the test can tell layouts apart: Hugging Face's permutation computes another function
    g_hf = ge.export_gguf(mf.path, tmp_path / "hf.gguf", "f32", vocab="synthetic", hf_layout=True)
    assert np.abs(_llama_cpp_logits(g_hf, tokens, GQA.seq_len) - ours).max() > 10 * tol


def test_llama_cpp_greedy_and_q8_0(make_model, tmp_path):
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gguf")
    mf = make_model(Q8CFG, version=1, seed=32)
    # greedy tokens after BOS agree (F32)
    ours = llama2c.Llama(mf.path)
    seq, tok = [], 1
    for pos in range(12):
        tok = int(np.argmax(ours.forward(tok, pos)))
        seq.append(tok)
    g = ge.export_gguf(mf.path, tmp_path / "m.gguf", "f32", vocab="synthetic")
    ref = bench.LlamaCpp(g, 1, n_ctx=Q8CFG.seq_len, n_batch=32, f32_kv=True)  # the bench's runner
    theirs, tok = [], 1
    for _ in range(12):
        ref.llm.eval([tok])
        tok = int(np.argmax(ref._last_logits()))
        theirs.append(tok)
    assert theirs == seq
    assert ref.decode(5)[1] == 5 and ref.prefill([1, 5, 6, 7]) > 0
    ref.close()
    # Q8_0: the quantized model stays close to the fp32 one
    tokens = random_tokens(Q8CFG, 12, seed=5)
    f32 = c_logits(llama2c.Llama(mf.path), tokens)
    g8 = ge.export_gguf(mf.path, tmp_path / "m8.gguf", "q8_0", vocab="synthetic")
    q8 = _llama_cpp_logits(g8, tokens, Q8CFG.seq_len)
    assert np.abs(q8 - f32).max() <= 0.1 * np.abs(f32).max()
