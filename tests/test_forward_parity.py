"""The C forward pass against the numpy reference (tests/reference.py).

fp32 files (versions 0, 1, 3) must match reference.forward (float64) to
float32 precision; Q8_0 files (version 2) and fp32 files quantized at load
must match reference.forward_q8, the int8 engine's math.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import llama2c
from helpers import (CONFIGS, GQA, MHA, MQA, Q8_TIGHT, R, assert_f32_close, assert_q8_close,
                     c_logits, f32_tolerance, random_tokens)

N_TOKENS = 12


def check_config(model, m) -> None:
    """Llama.config describes the file that was written."""
    c, cfg = model.config, m.cfg
    for field in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size",
                  "seq_len"):
        assert getattr(c, field) == getattr(cfg, field), field
    assert c.head_size == cfg.head_size
    assert c.kv_dim == cfg.kv_dim
    assert bool(c.shared_classifier) == m.shared
    assert c.version == m.version
    assert c.file_size == m.path.stat().st_size
    assert c.n_params == R.n_params(cfg, m.w)
    assert c.rope_theta == pytest.approx(cfg.rope_theta, rel=1e-6)
    assert c.norm_eps == pytest.approx(cfg.norm_eps, rel=1e-6)
    if m.version == 2:
        assert c.weights == "q8_0"
        assert c.group_size == m.group_size
    else:
        assert c.weights == ("bf16" if m.version == 4 else "f32")
        assert not c.group_size


# ---------------------------------------------------------------------------
# fp32
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "unshared"])
@pytest.mark.parametrize("arch", sorted(CONFIGS))
@pytest.mark.parametrize("version", [0, 1, 3])
def test_fp32_parity(make_model, version, arch, shared):
    cfg = CONFIGS[arch]
    seed = 10 * version + (1 if shared else 2) + 100 * sorted(CONFIGS).index(arch)
    m = make_model(cfg, version=version, shared=shared, seed=seed)
    model = llama2c.Llama(str(m.path))
    check_config(model, m)
    tokens = random_tokens(cfg, N_TOKENS, seed)
    ref = R.forward(cfg, m.w, tokens)
    assert_f32_close(c_logits(model, tokens), ref, f"v{version} {arch} shared={shared}")


def test_fp32_full_context(make_model):
    """Every position up to seq_len - 1 (RoPE angles and attention spans grow)."""
    m = make_model(MQA, version=1, shared=False, seed=7)
    tokens = random_tokens(MQA, MQA.seq_len, 7)
    ref = R.forward(MQA, m.w, tokens)
    assert_f32_close(c_logits(llama2c.Llama(m.path), tokens), ref, "full context")


def test_version0_and_1_identical(make_model):
    """The same weights as v0, v1 and v3 (default theta/eps) give the same logits."""
    w = R.random_weights(GQA, 5, shared=False)
    tokens = random_tokens(GQA, 8, 5)
    outs = [c_logits(llama2c.Llama(make_model(GQA, version=v, weights=w).path), tokens)
            for v in (0, 1, 3)]
    np.testing.assert_allclose(outs[1], outs[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(outs[2], outs[0], rtol=0, atol=1e-6)


V3_VARIANTS = {
    "theta1e6_eps1e-6": dict(rope_theta=1e6, norm_eps=1e-6),
    "theta5e5": dict(rope_theta=5e5, norm_eps=1e-5),
    "theta100": dict(rope_theta=100.0, norm_eps=1e-5),
    "eps1e-2": dict(rope_theta=10000.0, norm_eps=1e-2),
}


@pytest.mark.parametrize("variant", sorted(V3_VARIANTS))
@pytest.mark.parametrize("arch", ["gqa", "mha"])
def test_v3_rope_theta_and_norm_eps(make_model, arch, variant):
    cfg = dataclasses.replace(CONFIGS[arch], **V3_VARIANTS[variant])
    m = make_model(cfg, version=3, shared=arch == "gqa", seed=31)
    model = llama2c.Llama(m.path)
    check_config(model, m)
    tokens = random_tokens(cfg, 16, 31)
    ref = R.forward(cfg, m.w, tokens)
    c = c_logits(model, tokens)
    assert_f32_close(c, ref, f"v3 {variant}")
    # the test can tell the header's values from the defaults
    default = R.forward(dataclasses.replace(cfg, rope_theta=1e4, norm_eps=1e-5), m.w, tokens)
    assert np.abs(default - ref).max() > 100 * f32_tolerance(ref)


def test_v3_norm_eps_small_activations(make_model):
    """norm_eps 1e-6 matters when activations are tiny: embeddings of size
    ~1e-3 make mean(x^2) comparable to eps, so a reader that ignores the
    header's norm_eps (or uses 1e-5) fails clearly."""
    cfg = dataclasses.replace(MHA, norm_eps=1e-6)
    w = R.random_weights(cfg, 41, shared=False)
    w["token_embedding"] = (w["token_embedding"] * 1e-3).astype(np.float32)
    m = make_model(cfg, version=3, weights=w)
    tokens = random_tokens(cfg, 8, 41)
    ref = R.forward(cfg, w, tokens)
    wrong = R.forward(dataclasses.replace(cfg, norm_eps=1e-5), w, tokens)
    assert np.abs(wrong - ref).max() > 0.05
    assert_f32_close(c_logits(llama2c.Llama(m.path), tokens), ref, "v3 eps 1e-6 tiny x")


def test_rope_theta_is_discriminating():
    """Sanity of the v3 tests: theta 1e6 and 1e4 give clearly different logits."""
    cfg = dataclasses.replace(GQA, rope_theta=1e6)
    w = R.random_weights(cfg, 3)
    tokens = random_tokens(cfg, 8, 3)
    a = R.forward(cfg, w, tokens)
    b = R.forward(dataclasses.replace(cfg, rope_theta=1e4), w, tokens)
    assert np.abs(a - b)[2:].max() > 0.05


# ---------------------------------------------------------------------------
# int8 (Q8_0)
# ---------------------------------------------------------------------------

# dim 64 with hidden 172: w2 rows (length 172) are not a multiple of any of
# these group sizes, so groups span rows (the case the original runq drops).
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "unshared"])
@pytest.mark.parametrize("group_size", [64, 32, 8])
def test_q8_file_parity(make_model, group_size, shared):
    cfg = GQA
    assert cfg.hidden_dim % group_size != 0
    seed = 50 + group_size + (0 if shared else 1)
    m = make_model(cfg, version=2, shared=shared, seed=seed, group_size=group_size)
    model = llama2c.Llama(m.path)
    check_config(model, m)
    tokens = random_tokens(cfg, N_TOKENS, seed)
    ref = R.forward(cfg, m.w, tokens)
    ref_q8 = assert_q8_close(c_logits(model, tokens), cfg, m.w, tokens, group_size, ref,
                             f"v2 gs{group_size}")
    # the comparison can fail: activation quantization alone moves every position
    no_act = R.forward_q8(cfg, m.w, tokens, group_size, quantize_activations=False)
    assert (np.abs(no_act - ref_q8).max(axis=1) > 10 * Q8_TIGHT * np.abs(ref_q8).max()).all()


def test_q8_groups_across_rows_in_whole_runs(make_model):
    """hidden 96 with groups of 64 (stories42M: 1376): w2's groups span rows at
    multiples of 32, the case the SIMD span kernel takes; it must agree with
    the portable loop exactly and with the int8 reference."""
    cfg = R.Config(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, seq_len=48)
    m = make_model(cfg, version=2, shared=True, seed=91, group_size=64)
    tokens = random_tokens(cfg, N_TOKENS, 91)
    got = c_logits(llama2c.Llama(m.path), tokens)
    assert_q8_close(got, cfg, m.w, tokens, 64, R.forward(cfg, m.w, tokens), "v2 hidden 96 gs64")
    import os, subprocess, sys
    code = ("import sys, numpy as np, llama2c; L = llama2c.Llama(sys.argv[1]);"
            "sys.stdout.buffer.write(np.stack([L.forward(t, p) for p, t in enumerate(map(int, sys.argv[2:]))]).tobytes())")
    r = subprocess.run([sys.executable, "-c", code, str(m.path), *map(str, tokens)], capture_output=True,
                       env=dict(os.environ, LLAMA2_KERNELS="scalar"), timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    assert np.array_equal(np.frombuffer(r.stdout, dtype=np.float32).reshape(got.shape), got)


@pytest.mark.parametrize("arch", ["mha", "mqa"])
def test_q8_default_group_size(make_model, arch):
    """Default group size: 64 halved until it divides dim (16 for dim 48, 32 for 32)."""
    cfg = CONFIGS[arch]
    m = make_model(cfg, version=2, shared=False, seed=61)
    assert m.group_size == {"mha": 16, "mqa": 32}[arch]
    model = llama2c.Llama(m.path)
    check_config(model, m)
    tokens = random_tokens(cfg, N_TOKENS, 61)
    assert_q8_close(c_logits(model, tokens), cfg, m.w, tokens, m.group_size,
                    R.forward(cfg, m.w, tokens), f"v2 {arch}")


@pytest.mark.parametrize("version", [0, 1, 3])
@pytest.mark.parametrize("arch", ["gqa", "mha"])
def test_quantize_at_load(make_model, version, arch):
    """Llama(fp32 file, quantize=True) runs the int8 engine on weights
    quantized at load with the default group size."""
    cfg = CONFIGS[arch]
    m = make_model(cfg, version=version, shared=arch == "mha", seed=70 + version)
    model = llama2c.Llama(m.path, quantize=True)
    gs = R.default_group_size(cfg.dim)
    c = model.config
    assert c.weights == "q8_0" and c.group_size == gs and c.version == version
    tokens = random_tokens(cfg, N_TOKENS, 70 + version)
    assert_q8_close(c_logits(model, tokens), cfg, m.w, tokens, gs, R.forward(cfg, m.w, tokens),
                    f"quantize=True v{version}")


def test_quantize_at_load_matches_v2_file(make_model):
    """Quantizing at load gives the same weights as the exporter's v2 file."""
    w = R.random_weights(GQA, 77, shared=False)
    a = llama2c.Llama(make_model(GQA, version=1, weights=w).path, quantize=True)
    b = llama2c.Llama(make_model(GQA, version=2, weights=w).path)
    tokens = random_tokens(GQA, 8, 77)
    np.testing.assert_allclose(c_logits(a, tokens), c_logits(b, tokens), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------
# state handling
# ---------------------------------------------------------------------------


def test_forward_returns_a_copy(gqa_model):
    model = llama2c.Llama(gqa_model.path)
    first = model.forward(1, 0)
    kept = first.copy()
    first[:] = 1e9  # writing into the result must not disturb the engine
    second = model.forward(5, 1)
    np.testing.assert_array_equal(kept, model.forward(1, 0))
    assert not np.array_equal(second, kept)


def test_rerun_sequence_same_object(gqa_model):
    """Starting again at pos 0 overwrites the cache: same logits again."""
    model = llama2c.Llama(gqa_model.path)
    tokens = random_tokens(GQA, 10, 3)
    a = c_logits(model, tokens)
    b = c_logits(model, tokens)
    np.testing.assert_array_equal(a, b)


def test_two_models_are_independent(gqa_model, unshared_model):
    a, b = llama2c.Llama(gqa_model.path), llama2c.Llama(unshared_model.path)
    a2 = llama2c.Llama(gqa_model.path)
    ta, tb = random_tokens(GQA, 8, 1), random_tokens(MHA, 8, 2)
    ta2 = random_tokens(GQA, 8, 9)
    out_a, out_b, out_a2 = [], [], []
    for pos in range(8):  # interleaved
        out_a.append(a.forward(ta[pos], pos))
        out_a2.append(a2.forward(ta2[pos], pos))
        out_b.append(b.forward(tb[pos], pos))
    np.testing.assert_array_equal(np.stack(out_a), c_logits(llama2c.Llama(gqa_model.path), ta))
    np.testing.assert_array_equal(np.stack(out_a2), c_logits(llama2c.Llama(gqa_model.path), ta2))
    np.testing.assert_array_equal(np.stack(out_b),
                                  c_logits(llama2c.Llama(unshared_model.path), tb))


@pytest.mark.parametrize("version", [1, 2])
def test_threads_do_not_change_results(make_model, version):
    m = make_model(GQA, version=version, seed=90)
    tokens = random_tokens(GQA, 10, 90)
    one = c_logits(llama2c.Llama(m.path, n_threads=1), tokens)
    many = c_logits(llama2c.Llama(m.path, n_threads=4), tokens)
    np.testing.assert_allclose(many, one, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------
# the CLI on random models: the same engine, the SPEC 6 loop
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("prog,version", [("run", 0), ("run", 1), ("run", 3), ("runq", 2)])
def test_cli_greedy_random_model(cli, make_model, prog, version):
    w = R.random_weights(GQA, 95, shared=False)
    # zero classifier rows for the raw bytes 0x80..0xFF (ids 131..258): their
    # logit 0 never wins, so the text has no partial UTF-8 to reassemble
    w["wcls"][3 + 0x80: 259] = 0
    m = make_model(GQA, version=version, weights=w)
    steps = 24
    proc = cli(prog, m.path, "-z", m.tokenizer, "-t", "0", "-n", steps)
    assert proc.returncode == 0, proc.stderr.decode()
    llm = llama2c.Llama(m.path, tokenizer=m.tokenizer)
    assert llm.generate("", steps=steps, temperature=0.0).encode() + b"\n" == proc.stdout
    # greedy tokens from forward(): argmax, stop at BOS
    seq = [1]
    for pos in range(steps):
        nxt = int(np.argmax(llm.forward(seq[-1], pos)))
        if nxt == 1:
            break
        seq.append(nxt)
    assert len(seq) > 10 and all(not 3 + 0x80 <= t <= 258 for t in seq)
    _, pieces, _ = R.read_tokenizer_bin(m.tokenizer)
    assert R.render(pieces, seq) + b"\n" == proc.stdout
