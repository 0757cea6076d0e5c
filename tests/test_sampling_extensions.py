"""Sampling beyond llama2.c: top-k, min-p, repetition penalty, stop strings
and stopping at EOS. Defaults leave llama2.c's behaviour untouched (that is
checked bit for bit in test_sampler.py and test_python_api.py)."""
from __future__ import annotations

import numpy as np
import pytest

import llama2c
from helpers import GQA


def softmax(x, t):
    z = np.asarray(x, dtype=np.float64) / t
    z = np.exp(z - z.max())
    return z / z.sum()


def draws(sampler, logits, n=300):
    return [sampler.sample(logits) for _ in range(n)]


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_top_k_one_and_min_p_one_are_greedy(temperature):
    rng = np.random.default_rng(0)
    for _ in range(20):
        logits = rng.normal(size=100).astype(np.float32)
        best = int(np.argmax(logits))
        assert set(draws(llama2c.Sampler(100, temperature=temperature, top_k=1, seed=3), logits, 20)) == {best}
        assert set(draws(llama2c.Sampler(100, temperature=temperature, min_p=1.0, seed=3), logits, 20)) == {best}


def test_top_k_keeps_to_the_k_most_likely_and_reaches_them_all():
    logits = np.linspace(0.0, 0.5, 64).astype(np.float32)  # nearly flat
    s = llama2c.Sampler(64, temperature=1.0, topp=1.0, top_k=5, seed=11)
    got = draws(s, logits, 400)
    assert set(got) == set(range(59, 64))


def test_min_p_floor():
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=2.0, size=200).astype(np.float32)
    p = softmax(logits, 1.0)
    s = llama2c.Sampler(200, temperature=1.0, topp=1.0, min_p=0.2, seed=5)
    got = set(draws(s, logits, 400))
    allowed = {i for i in range(200) if p[i] >= 0.2 * p.max() * (1 - 1e-5)}
    assert got <= allowed and len(got) >= min(2, len(allowed))


def test_top_p_applies_within_top_k():
    # probabilities 0.5, 0.3, 0.2 (then tiny): top_k=3 and topp=0.6 leaves {0, 1}
    logits = np.log(np.array([0.5, 0.3, 0.2] + [1e-9] * 7)).astype(np.float32)
    s = llama2c.Sampler(10, temperature=1.0, topp=0.6, top_k=3, seed=2)
    assert set(draws(s, logits, 300)) == {0, 1}


def test_repetition_penalty_moves_greedy_off_a_seen_token():
    logits = np.array([1.0, 3.0, 2.5, -1.0], dtype=np.float32)
    s = llama2c.Sampler(4, temperature=0.0, repetition_penalty=1.5, seed=1)
    assert s.sample(logits) == 1
    s.accept(1)  # 3.0 / 1.5 = 2.0 < 2.5
    assert s.sample(logits) == 2
    s.accept(2)  # 2.5 / 1.5 ~ 1.67 < 2.0
    assert s.sample(logits) == 1
    plain = llama2c.Sampler(4, temperature=0.0, seed=1)
    plain.accept(1)
    assert plain.sample(logits) == 1  # penalty 1 (default): no effect


def test_repetition_penalty_window_forgets():
    logits = np.array([3.0, 2.5], dtype=np.float32)
    s = llama2c.Sampler(2, temperature=0.0, repetition_penalty=2.0, repetition_window=2, seed=1)
    s.accept(0)
    assert s.sample(logits) == 1
    s.accept(1)
    s.accept(1)  # token 0 has left the window of 2
    assert s.sample(logits) == 0


@pytest.mark.parametrize("bad", [{"top_k": -1}, {"min_p": 1.5}, {"repetition_penalty": 0.0}])
def test_bad_extension_settings(bad):
    with pytest.raises(ValueError):
        llama2c.Sampler(10, seed=1, **bad)


def test_stop_strings_cut_generated_text(make_model):
    m = make_model(GQA, version=1, seed=3)
    llama = llama2c.Llama(m.path, tokenizer=m.tokenizer)
    full = llama.generate("ab", steps=31, seed=4)
    tail = full[len("ab"):]
    assert len(tail) > 6
    stop = tail[3:5]
    cut = full[: len("ab") + tail.index(stop)]
    assert llama.generate("ab", steps=31, seed=4, stop=stop) == cut
    assert "".join(llama.stream("ab", steps=31, seed=4, stop=[stop, "\x00never"])) == cut
    # a stop string that never appears changes nothing, even one that starts like the text
    assert llama.generate("ab", steps=31, seed=4, stop=tail[-2:] + "\x01") == full
    # stop strings only look at generated text, not the prompt
    assert llama.generate("ab", steps=31, seed=4, stop="ab" if "ab" not in tail else "\x02") == full


def test_stop_at_eos(make_model):
    m = make_model(GQA, version=1, seed=3)
    llama = llama2c.Llama(m.path, tokenizer=m.tokenizer)
    eos_piece = llama.tokenizer.piece(2).decode()
    for seed in range(1, 200):
        full = llama.generate("", steps=31, seed=seed, temperature=1.5, topp=1.0)
        if eos_piece in full:
            break
    else:
        pytest.fail("no seed produced EOS; pick another model")
    stopped = llama.generate("", steps=31, seed=seed, temperature=1.5, topp=1.0, stop_at_eos=True)
    assert stopped == full[: full.index(eos_piece)]
