"""Version 4 files: bf16 matrices (docs/FORMAT.md).

A bf16 file runs as the fp32 file of its (bf16-rounded) values up to rounding:
bf16 widens to fp32 without error, and the bf16 matmuls then fuse each
multiply-add (docs/FORMAT.md), where fp32 files keep llama2.c's separate
multiply and add. Every kernel gives the same bits for a bf16 file. The writers
are checked against an independent rounding (tests/reference.py) and against
torch.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import llama2c
from helpers import CONFIGS, GQA, MHA, R, assert_f32_close, c_logits, random_tokens
from llama2c.export import binfmt
from llama2c.export.sources import open_bin
from llama2c.export.writers import write_bin


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "unshared"])
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_bf16_file_runs_as_its_fp32_values(make_model, arch, shared):
    cfg = CONFIGS[arch]
    w = R.random_weights(cfg, 400 + sorted(CONFIGS).index(arch), shared=shared)
    v4 = make_model(cfg, version=4, weights=w)
    v1 = make_model(cfg, version=1, weights=R.bf16_weights(w))
    a, b = llama2c.Llama(v4.path), llama2c.Llama(v1.path)
    c = a.config
    assert c.version == 4 and c.weights == "bf16" and not c.group_size
    assert c.n_params == b.config.n_params
    tokens = random_tokens(cfg, 12, 5)
    got, want = c_logits(a, tokens), c_logits(b, tokens)
    assert not np.array_equal(got, want)  # fused multiply-adds round differently...
    assert_f32_close(got, want, f"v4 vs v1 {arch}")  # ...within float rounding
    # and both agree with the float64 reference on the rounded weights
    ref = R.forward(cfg, R.bf16_weights(w), tokens)
    assert_f32_close(got, ref, f"v4 {arch}")
    assert_f32_close(want, ref, f"v1 {arch}")


def test_bf16_file_layout(make_model):
    cfg = GQA
    w = R.random_weights(cfg, 3, shared=False)
    m = make_model(cfg, version=4, weights=w)
    L, d, h, kv, V = cfg.n_layers, cfg.dim, cfg.hidden_dim, cfg.kv_dim, cfg.vocab_size
    norms = 2 * L * d + d
    mats = 2 * V * d + L * (2 * d * d + 2 * kv * d + 3 * h * d)
    assert m.path.stat().st_size == 256 + 4 * norms + 2 * mats
    raw = m.path.read_bytes()
    assert raw[4:8] == (4).to_bytes(4, "little")
    # the embedding's first value, right after the fp32 norms, is the rounded bf16 of w
    off = 256 + 4 * norms
    first = int.from_bytes(raw[off:off + 2], "little")
    assert first == int(R.bf16_bits(w["token_embedding"].ravel()[:1])[0])


def test_exporter_writes_the_reference_bytes(make_model, tmp_path):
    w = R.random_weights(MHA, 8, shared=True)
    v1 = make_model(MHA, version=1, weights=w)
    ref = make_model(MHA, version=4, weights=w)
    with open_bin(v1.path) as src:
        out = write_bin(src, tmp_path / "m4.bin", 4)
    assert out.read_bytes() == ref.path.read_bytes()
    # and reading it back widens exactly
    with open_bin(out) as src:
        emb = src.get("tok_embeddings.weight")
    assert np.array_equal(emb, R.bf16_round(w["token_embedding"]))


def test_rounding_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(10000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 10000),
                        np.array([0.0, -0.0, 1.0, 1.00390625, 1.01171875, 3.0e38, -1e-40], np.float32)])
    x = x.astype(np.float32)
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(binfmt.to_bf16(x), want)
    assert np.array_equal(R.bf16_bits(x), want)
    assert np.array_equal(binfmt.from_bf16(want), torch.from_numpy(want.view(np.int16)).view(
        torch.bfloat16).float().numpy())


def test_bf16_quantized_at_load_matches_its_fp32_values(make_model):
    """runq / quantize=True on a bf16 file: the int8 engine on the same values."""
    w = R.random_weights(GQA, 12, shared=True)
    a = llama2c.Llama(make_model(GQA, version=4, weights=w).path, quantize=True)
    b = llama2c.Llama(make_model(GQA, version=1, weights=R.bf16_weights(w)).path, quantize=True)
    assert a.config.weights == "q8_0"
    tokens = random_tokens(GQA, 8, 12)
    assert np.array_equal(c_logits(a, tokens), c_logits(b, tokens))


def test_bf16_kernels_agree(make_model):
    """The scalar and SIMD bf16 kernels give the same logits (separate processes,
    since the kernels are chosen when a model is opened from LLAMA2_KERNELS)."""
    m = make_model(MHA, version=4, weights=R.random_weights(MHA, 13, shared=False))
    code = ("import sys, numpy as np, llama2c; L = llama2c.Llama(sys.argv[1]);"
            "out = L.forward_batch([1, 5, 9, 2, 7, 3, 8], 0); sys.stdout.buffer.write(out.tobytes())")
    outs = []
    for kernels in ("scalar", "avx2"):
        env = dict(__import__("os").environ, LLAMA2_KERNELS=kernels)
        r = subprocess.run([sys.executable, "-c", code, str(m.path)], capture_output=True, env=env, timeout=120)
        assert r.returncode == 0, r.stderr.decode()
        outs.append(np.frombuffer(r.stdout, dtype=np.float32))
    assert outs[0].size == MHA.vocab_size
    assert np.array_equal(outs[0], outs[1])


def test_truncated_bf16_file(make_model, tmp_path):
    m = make_model(GQA, version=4, seed=14)
    bad = tmp_path / "short.bin"
    bad.write_bytes(m.path.read_bytes()[:-2])
    with pytest.raises(llama2c.FormatError, match="truncated"):
        llama2c.Llama(bad)


def test_cli_export_and_info(make_model, tmp_path):
    v1 = make_model(GQA, version=1, seed=15)
    out = tmp_path / "m.bin"
    r = subprocess.run([sys.executable, "-m", "llama2c", "export", str(out), "--version", "4", "--bin",
                        str(v1.path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "llama2c", "info", str(out)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "version 4 (bf16" in r.stdout
