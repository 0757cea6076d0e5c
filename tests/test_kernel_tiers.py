"""Kernel tiers (issue 18): LLAMA2_KERNELS forces a tier the CPU runs and falls
back, with a reason, from one it cannot run; llama2c.cpu reports the choice;
and models opened under every tier this machine runs give bit-identical logits
(fp32, bf16 and int8 with groups across rows, prefill and decode). The kernels
themselves are checked tier by tier against the portable loop in `make testcc`."""
from __future__ import annotations

import numpy as np
import pytest

import llama2c
import reference as R
from helpers import runnable_tiers
from llama2c.cpu import TIERS, format_kernel_info, kernel_info

# hidden 160 with groups of 64: int8 groups across rows in whole 32-column runs;
# 40 rows per head matrix: half blocks of the AVX-512 tier's 16-row layout
CFG = R.Config(dim=64, hidden_dim=160, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=40, seq_len=48)


def test_kernel_info_reports_tier_reason_and_flags(monkeypatch):
    monkeypatch.delenv("LLAMA2_KERNELS", raising=False)
    info = kernel_info()
    assert info["tier"] in ("scalar", "avx2", "avx512", "neon")
    assert info["reason"].startswith("the best this CPU runs")
    assert info["forced"] is None
    assert isinstance(info["cpu_flags"], list)
    if info["tier"] == "avx512":
        assert {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "os_zmm"} <= set(info["cpu_flags"])
    if info["tier"] == "avx2":
        assert {"avx2", "fma"} <= set(info["cpu_flags"])
    text = format_kernel_info(info)
    assert f"kernel tier: {info['tier']}" in text and "why:" in text


def test_forcing_a_tier(monkeypatch):
    best = kernel_info()["tier"]
    for name in TIERS:
        monkeypatch.setenv("LLAMA2_KERNELS", name)
        info = kernel_info()
        assert info["forced"] == name
        if info["tier"] == ("scalar" if name == "portable" else name):
            assert info["reason"] == f"forced by LLAMA2_KERNELS={name}"
        else:  # a tier this CPU cannot run: the best one, and why
            assert info["tier"] == best, info
            assert "cannot run" in info["reason"] and best in info["reason"], info
    monkeypatch.setenv("LLAMA2_KERNELS", "portable")
    assert kernel_info()["tier"] == "scalar"
    monkeypatch.setenv("LLAMA2_KERNELS", "no-such-tier")
    info = kernel_info()
    assert info["tier"] == best and "not a tier name" in info["reason"]


@pytest.mark.parametrize("version,quantize", [(1, False), (4, False), (1, True), (2, False)],
                         ids=["fp32", "bf16", "int8-on-load", "int8-v2"])
def test_every_tier_gives_the_same_logits(make_model, monkeypatch, version, quantize):
    tiers = runnable_tiers(monkeypatch)
    print("tiers run here:", ", ".join(tiers))
    m = make_model(CFG, version=version, seed=3, group_size=64 if version == 2 else None)
    tokens = [1, 7, 3, 22, 9, 31, 2, 17, 5]
    results = {}
    for tier in tiers:
        monkeypatch.setenv("LLAMA2_KERNELS", tier)
        llm = llama2c.Llama(str(m.path), tokenizer=str(m.tokenizer), quantize=quantize)
        batch = llm.forward_batch(tokens[:6], 0)          # prefill
        steps = [llm.forward(t, 6 + i) for i, t in enumerate(tokens[6:])]  # decode
        results[tier] = np.concatenate([batch.ravel()] + [s.ravel() for s in steps])
    for tier, got in results.items():
        assert got.tobytes() == results["scalar"].tobytes(), f"{tier} differs from the portable loop"


def test_info_cpu_names_the_tier():
    import subprocess
    import sys

    from llama2c.cpu import kernel_info

    proc = subprocess.run([sys.executable, "-m", "llama2c", "info", "--cpu"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"kernel tier: {kernel_info()['tier']}\n") and "why: " in proc.stdout
    forced = subprocess.run([sys.executable, "-m", "llama2c", "info", "--cpu"], capture_output=True, text=True,
                            timeout=60, env={**__import__("os").environ, "LLAMA2_KERNELS": "scalar"})
    assert forced.stdout.startswith("kernel tier: scalar\n") and "LLAMA2_KERNELS" in forced.stdout
