"""Batched prompt processing must be bit-identical to feeding tokens one at a
time: the KV cache it leaves and the logits it returns."""
from __future__ import annotations

import numpy as np
import pytest

import llama2c
import reference as R
from helpers import GQA, MHA, random_tokens

CASES = [
    ("v1-gqa", GQA, 1, True),
    ("v1-mha-unshared", MHA, 1, False),
    ("v2-gqa-rowspan", GQA, 2, True),  # hidden 172 with group 64: groups span rows
    ("v3", R.Config(dim=64, hidden_dim=160, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300,
                    seq_len=80, rope_theta=1e6, norm_eps=1e-6), 3, True),
    ("v4-bf16-gqa", GQA, 4, True),
    ("v4-bf16-mha-unshared", MHA, 4, False),
]


# every case as stored, and the fp32 ones also quantized on load
RUNS = [(*c, False) for c in CASES] + [(*c, True) for c in CASES if c[2] != 2]


@pytest.mark.parametrize("name,cfg,version,shared,quantize", RUNS,
                         ids=[f"{r[0]}{'-q8' if r[4] else ''}" for r in RUNS])
def test_batch_equals_sequential(make_model, name, cfg, version, shared, quantize):
    m = make_model(cfg, version=version, shared=shared, seed=21)
    n = min(cfg.seq_len - 4, 75)  # more than one internal chunk of 64 (LLAMA2_MAX_BATCH)
    toks = random_tokens(cfg, n + 3, seed=5)
    seq = llama2c.Llama(m.path, quantize=quantize)
    bat = llama2c.Llama(m.path, quantize=quantize)
    for pos in range(n):
        expected = seq.forward(toks[pos], pos)
    got = bat.forward_batch(toks[:n], 0)
    assert np.array_equal(got, expected)
    # the cache it left behind gives identical logits for the following tokens
    for pos in range(n, n + 3):
        assert np.array_equal(bat.forward(toks[pos], pos), seq.forward(toks[pos], pos))
    # a batch that continues a sequence
    again = llama2c.Llama(m.path, quantize=quantize)
    again.forward_batch(toks[:7], 0)
    again.forward_batch(toks[7:n], 7)
    assert np.array_equal(again.forward(toks[n], n), seq.forward(toks[n], n))


def test_batch_arguments(make_model):
    m = make_model(GQA, version=1, seed=21)
    llama = llama2c.Llama(m.path)
    with pytest.raises(llama2c.InvalidArgumentError):
        llama.forward_batch([], 0)
    with pytest.raises(llama2c.InvalidArgumentError):
        llama.forward_batch([1, 2, GQA.vocab_size], 0)
    with pytest.raises(llama2c.InvalidArgumentError):
        llama.forward_batch([1] * 4, GQA.seq_len - 3)
    with pytest.raises(llama2c.InvalidArgumentError):
        llama.forward_batch([1, 2], -1)


def test_generate_with_prompt_equals_token_by_token(make_model):
    """The session prefills the prompt in a batch; compare with a manual
    sequential loop (greedy) decoded the same way."""
    m = make_model(GQA, version=1, seed=8)
    llama = llama2c.Llama(m.path, tokenizer=m.tokenizer)
    prompt = "abba cab ab ba abc"
    ids = llama.tokenize(prompt)
    assert len(ids) > 3
    manual = llama2c.Llama(m.path, tokenizer=m.tokenizer)
    out = list(ids)
    logits = None
    for pos in range(GQA.seq_len - 1):
        logits = manual.forward(out[pos], pos)
        if pos + 1 >= len(out):
            nxt = int(np.argmax(logits))
            if nxt == 1:
                break
            out.append(nxt)
    text = llama.generate(prompt, steps=GQA.seq_len - 1, temperature=0.0)
    filtered = "".join(ch for ch in manual.detokenize(out) if ch != "\ufffd" and (ch.isprintable() or ch.isspace()))
    assert text == filtered
