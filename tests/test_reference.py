"""Checks of the numpy reference itself (tests/reference.py) against the
public llama2.c files and against independent formulations. These do not use
the llama2c package."""
from __future__ import annotations

import dataclasses
import struct

import numpy as np
import pytest
import sentencepiece

from helpers import LLAMA2_TOK, STORIES, STRINGS, R

# ---------------------------------------------------------------------------
# file formats, against the reference files
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stories(shared_data):
    return R.read_v0(STORIES / "stories260K.bin")


def test_read_write_v0_roundtrip(stories):
    cfg, w = stories
    assert cfg == R.Config(64, 172, 5, 8, 4, 512, 512)
    assert R.is_shared(w)
    assert R.model_bytes(cfg, w, 0) == (STORIES / "stories260K.bin").read_bytes()


def test_write_v1_matches_file(stories):
    cfg, w = stories
    assert R.model_bytes(cfg, w, 1) == (STORIES / "stories260K_v1.bin").read_bytes()
    cfg1, w1, version, gs = R.read_versioned(STORIES / "stories260K_v1.bin")
    assert (cfg1, version, gs) == (cfg, 1, None)
    for k in w1:
        np.testing.assert_array_equal(w1[k], w[k])


def test_write_v2_gs8_matches_file(stories, tmp_path):
    """Byte for byte the exporter's Q8_0 file with group size 8."""
    cfg, w = stories
    path = R.write_v2(tmp_path / "q.bin", cfg, w, group_size=8)
    assert path.read_bytes() == (STORIES / "stories260K_q80_gs8.bin").read_bytes()
    cfg2, w2, version, gs = R.read_versioned(path)
    assert (cfg2, version, gs) == (cfg, 2, 8)
    dq = R.dequantized_weights(cfg, w, 8)
    for k in w2:
        np.testing.assert_array_equal(w2[k], dq[k])


def test_greedy_decodes_expected_text(stories):
    """20 greedy tokens of the float64 reference, decoded by SentencePiece."""
    cfg, w = stories
    toks = R.greedy(cfg, w, 20)
    assert len(toks) == 20
    sp = sentencepiece.SentencePieceProcessor(model_file=str(STORIES / "tok512.model"))
    text = sp.decode(toks)
    expected = (STORIES / "expected" / "run_t0_n200.txt").read_text("utf-8")
    assert len(text) > 60
    assert expected.startswith(text)


def test_tokenizer_export_matches(shared_data, tmp_path):
    for model, binary in [(STORIES / "tok512.model", STORIES / "tok512.bin"),
                          (LLAMA2_TOK / "tokenizer.model", LLAMA2_TOK / "tokenizer.bin")]:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(model))
        pieces, scores = R.tokenizer_from_sentencepiece(sp)
        out = R.write_tokenizer_bin(tmp_path / "t.bin", pieces, scores)
        assert out.read_bytes() == binary.read_bytes()
        max_len, p2, s2 = R.read_tokenizer_bin(binary)
        assert p2 == pieces and max_len == max(len(p) for p in pieces)


def test_reference_encode_matches_sentencepiece(shared_data):
    sp = sentencepiece.SentencePieceProcessor(model_file=str(LLAMA2_TOK / "tokenizer.model"))
    _, pieces, scores = R.read_tokenizer_bin(LLAMA2_TOK / "tokenizer.bin")
    for s in STRINGS:
        assert R.encode(pieces, scores, s, bos=False) == sp.encode(s), s


# ---------------------------------------------------------------------------
# headers
# ---------------------------------------------------------------------------


def test_headers(tmp_path):
    cfg = R.Config(32, 96, 2, 4, 2, 300, 16, rope_theta=1e6, norm_eps=1e-6)
    w = R.random_weights(cfg, 0, shared=False)
    v0 = R.model_bytes(cfg, w, 0)
    assert struct.unpack_from("<7i", v0) == (32, 96, 2, 4, 2, -300, 16)
    for version in (1, 2, 3):
        data = R.model_bytes(cfg, w, version)
        assert struct.unpack_from("<Ii7iB", data) == (0x616B3432, version, 32, 96, 2, 4, 2, 300,
                                                      16, 0)
        if version == 2:
            assert struct.unpack_from("<i", data, 37) == (32,)
            assert data[41:256] == bytes(215)
        elif version == 3:
            assert data[37:40] == b"\0\0\0"
            theta, eps = struct.unpack_from("<ff", data, 40)
            assert theta == np.float32(1e6) and eps == np.float32(1e-6)
            assert data[48:256] == bytes(208)
        else:
            assert data[37:256] == bytes(219)
    assert len(R.model_bytes(cfg, w, 3)) == len(R.model_bytes(cfg, w, 1))
    assert R.model_bytes(cfg, w, 3)[256:] == R.model_bytes(cfg, w, 1)[256:]
    cfg3, w3, version, _ = R.read_versioned(R.write_v3(tmp_path / "v3.bin", cfg, w))
    assert version == 3 and cfg3.rope_theta == np.float32(1e6)
    assert cfg3.norm_eps == np.float32(1e-6)
    for k in w:
        np.testing.assert_array_equal(w3[k], w[k])


def test_default_group_size():
    assert [R.default_group_size(d) for d in (64, 128, 48, 32, 96, 24, 288, 4096)] == \
        [64, 64, 16, 32, 32, 8, 32, 64]


# ---------------------------------------------------------------------------
# Q8_0
# ---------------------------------------------------------------------------


def test_quantize_q80_rounding():
    g = np.array([127.0, 2.5, 3.5, -2.5, -0.5, 0.5, 1.49, -127.0], dtype=np.float32)
    q, s = R.quantize_q80(g, 8)
    assert s.tolist() == [1.0]
    assert q.tolist() == [127, 2, 4, -2, 0, 0, 1, -127]  # half to even
    q, s = R.quantize_q80(np.zeros(16, np.float32), 8)
    assert q.tolist() == [0] * 16 and s.tolist() == [0.0, 0.0]
    with pytest.raises(ValueError):
        R.quantize_q80(np.ones(10, np.float32), 4)


def test_quantize_q80_error_bound():
    x = np.random.default_rng(0).standard_normal(4096).astype(np.float32)
    q, s = R.quantize_q80(x, 64)
    assert q.dtype == np.int8 and s.dtype == np.float32 and s.shape == (64,)
    assert np.abs(q).max() == 127
    err = np.abs(R.dequantize(q, s, 64) - x).reshape(-1, 64)
    assert (err <= s[:, None] * 0.5 + 1e-7).all()


def test_c_round_half_away_from_zero():
    v = np.array([2.5, -2.5, 0.5, -0.5, 1.4999999, 3.5, -3.5, 0.0])
    assert R.c_round(v).tolist() == [3, -3, 1, -1, 1, 4, -4, 0]


def test_quantize_activation_partial_group():
    x = np.array([1.0, -2.0, 0.5, 4.0, 0.1, 0.2, -0.3, 0.4, 10.0, 5.0])
    out = R.quantize_activation(x, 4)
    # groups [0:4] (max 4), [4:8] (max 0.4), [8:10] (max 10, partial)
    s = [4 / 127, 0.4 / 127, 10 / 127]
    want = np.concatenate([R.c_round(x[0:4] / s[0]) * s[0], R.c_round(x[4:8] / s[1]) * s[1],
                           R.c_round(x[8:10] / s[2]) * s[2]])
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-15)
    assert out[8] == 10.0 and out[3] == 4.0
    assert (R.quantize_activation(np.zeros(5), 4) == 0).all()


def test_forward_q8_row_spanning_groups():
    """forward_q8 quantizes each matrix flattened: with hidden 172 and group 8
    a w2 group spans two rows. Compare one w2 against a per-element loop."""
    m = np.random.default_rng(1).standard_normal((64, 172)).astype(np.float32)
    deq = R.q8_roundtrip(m, 8)
    flat = m.reshape(-1)
    for g in (21, 22, 43):  # groups 21 and 43 span a row boundary (172 = 21.5 * 8)
        block = flat[8 * g: 8 * g + 8]
        scale = np.float32(np.abs(block).max() / np.float32(127))
        np.testing.assert_array_equal(deq.reshape(-1)[8 * g: 8 * g + 8],
                                      np.rint(block / scale).astype(np.float32) * scale)


# ---------------------------------------------------------------------------
# forward pass
# ---------------------------------------------------------------------------


def test_gqa_equals_mha_with_repeated_kv():
    """GQA (h uses kv head h // kv_mul) equals MHA whose wk/wv repeat each
    kv head kv_mul times."""
    cfg = R.Config(32, 64, 2, 8, 2, 100, 16)
    w = R.random_weights(cfg, 3)
    mha = dataclasses.replace(cfg, n_kv_heads=8)
    w2 = dict(w)
    hs = cfg.head_size
    for name in ("wk", "wv"):
        heads = w[name].reshape(cfg.n_layers, cfg.n_kv_heads, hs, cfg.dim)
        w2[name] = np.repeat(heads, cfg.kv_mul, axis=1).reshape(cfg.n_layers, cfg.dim, cfg.dim)
    tokens = [1, 5, 9, 33, 2, 70, 70, 4]
    np.testing.assert_allclose(R.forward(cfg, w, tokens), R.forward(mha, w2, tokens),
                               rtol=0, atol=1e-12)


def test_rope_pairs():
    cfg = R.Config(16, 32, 1, 2, 2, 50, 8, rope_theta=100.0)
    v = np.arange(16, dtype=np.float64) + 1
    np.testing.assert_array_equal(R._rope(v, 0, cfg), v)
    r = R._rope(v, 3, cfg)
    # pair (i, i+1) rotated by 3 / 100^((i mod 8) / 8)
    for i in range(0, 16, 2):
        a = 3 / 100.0 ** ((i % 8) / 8)
        assert r[i] == pytest.approx(v[i] * np.cos(a) - v[i + 1] * np.sin(a))
        assert r[i + 1] == pytest.approx(v[i] * np.sin(a) + v[i + 1] * np.cos(a))


def test_first_position_ignores_attention_details():
    """At pos 0 attention returns v itself: a one-layer model's logits can be
    written out by hand."""
    cfg = R.Config(16, 24, 1, 4, 2, 40, 4)
    w = R.random_weights(cfg, 8, shared=False)
    f = {k: v.astype(np.float64) for k, v in w.items()}

    def norm(x, g):
        return x * g / np.sqrt(np.mean(x * x) + 1e-5)
    x = f["token_embedding"][7]
    xb = norm(x, f["rms_att"][0])
    v = f["wv"][0] @ xb
    att = np.repeat(v.reshape(2, 4), 2, axis=0).reshape(-1)
    x = x + f["wo"][0] @ att
    xb = norm(x, f["rms_ffn"][0])
    h1, h3 = f["w1"][0] @ xb, f["w3"][0] @ xb
    x = x + f["w2"][0] @ (h1 / (1 + np.exp(-h1)) * h3)
    logits = f["wcls"] @ norm(x, f["rms_final"])
    np.testing.assert_allclose(R.forward(cfg, w, [7])[0], logits, rtol=1e-12, atol=1e-12)


def test_random_weights_give_reasonable_logits():
    for cfg in (R.Config(64, 172, 2, 8, 4, 384, 32), R.Config(32, 96, 3, 4, 1, 512, 48)):
        for shared in (True, False):
            w = R.random_weights(cfg, 0, shared)
            R.check_weights(cfg, w)
            assert all(a.dtype == np.float32 for a in w.values())
            logits = R.forward(cfg, w, [1, 10, 20, 30])
            assert 0.5 < logits.std() < 2.0
            assert np.abs(logits).max() < 10


# ---------------------------------------------------------------------------
# sampler
# ---------------------------------------------------------------------------


def naive_sample(logits, temperature, topp, rng):
    """SPEC 5 written with np.float32 scalars and plain loops."""
    f = np.float32
    x = [f(v) / f(temperature) for v in logits]
    m = max(x)
    e = [f(np.exp(np.float64(f(v - m)))) for v in x]
    total = f(0)
    for v in e:
        total = f(total + v)
    p = [f(v / total) for v in e]
    coin = rng.f32()
    n = len(p)
    if topp <= 0 or topp >= 1:
        cdf = f(0)
        for i, v in enumerate(p):
            cdf = f(cdf + v)
            if coin < cdf:
                return i
        return n - 1
    cutoff = f(f(1) - f(topp)) / f(n - 1)
    kept = sorted([(v, i) for i, v in enumerate(p) if v >= cutoff], key=lambda t: (-t[0], t[1]))
    cum, last = f(0), len(kept) - 1
    for j, (v, _) in enumerate(kept):
        cum = f(cum + v)
        if cum > f(topp):
            last = j
            break
    r = f(coin * cum)
    cdf = f(0)
    for j in range(last + 1):
        cdf = f(cdf + kept[j][0])
        if r < cdf:
            return kept[j][1]
    return kept[last][1]


@pytest.mark.parametrize("topp", [0.0, 0.5, 0.9, 1.0])
def test_sample_equals_naive_loops(topp):
    rng = np.random.default_rng(4)
    a, b = R.Rng(99), R.Rng(99)
    for i in range(60):
        n = 64
        logits = (rng.integers(-3, 4, n) if i % 2 else rng.standard_normal(n) * 3)
        logits = logits.astype(np.float32)
        assert R.sample(logits, 0.9, topp, a) == naive_sample(logits, 0.9, topp, b)


def test_rng_basics():
    r = R.Rng(0)
    assert r.u32() == 0 and r.state == 0
    r = R.Rng(42)
    vals = [r.u32() for _ in range(1000)]
    assert all(0 <= v < 2**32 for v in vals) and len(set(vals)) == 1000
    f = [R.Rng(s).f32() for s in range(1, 200)]
    assert all(0 <= v < 1 for v in f)
    # u32 then f32 of the same state relate by >> 8
    r1, r2 = R.Rng(7), R.Rng(7)
    assert np.float32(r1.u32() >> 8) / np.float32(2**24) == r2.f32()


def test_greedy_sample_is_first_argmax():
    logits = np.array([0, 3, 1, 3], dtype=np.float32)
    assert R.sample(logits, 0.0, 0.9, R.Rng(1)) == 1
