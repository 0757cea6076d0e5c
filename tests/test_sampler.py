"""The sampler and its RNG against reference.Rng / reference.sample (SPEC 5)."""
from __future__ import annotations

import numpy as np
import pytest

import llama2c
from helpers import R

SEEDS = [1, 42, 1337, 0x2545F4914F6CDD1D, 2**63 + 12345, 2**64 - 1]


@pytest.mark.parametrize("seed", SEEDS)
def test_random_u32_sequence(seed):
    ref = R.Rng(seed)
    state = seed
    for _ in range(200):
        value, state = llama2c.random_u32(state)
        assert value == ref.u32()
        assert state == ref.state
        assert 0 <= value < 2**32


@pytest.mark.parametrize("seed", SEEDS)
def test_random_f32_sequence(seed):
    ref = R.Rng(seed)
    state = seed
    values = []
    for _ in range(200):
        value, state = llama2c.random_f32(state)
        assert value == float(ref.f32())
        assert state == ref.state
        values.append(value)
    assert all(0.0 <= v < 1.0 for v in values)
    assert len(set(values)) > 190


def test_rng_state_zero_is_fixed_point():
    assert llama2c.random_u32(0) == (0, 0)


def random_logits(rng: np.random.Generator, n: int, kind: str) -> np.ndarray:
    if kind == "normal":
        return (rng.standard_normal(n) * 2).astype(np.float32)
    if kind == "ties":
        # few distinct values: many exactly equal probabilities
        return rng.integers(-3, 4, n).astype(np.float32)
    if kind == "peaked":
        x = rng.standard_normal(n).astype(np.float32)
        x[rng.integers(0, n, 3)] += 8
        return x
    if kind == "flat":
        return np.zeros(n, dtype=np.float32)
    raise ValueError(kind)


KINDS = ["normal", "ties", "peaked", "flat"]


@pytest.mark.parametrize("topp", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.3])
def test_sampler_matches_reference(temperature, topp):
    vocab = 512
    seed = 1000 + int(temperature * 10) * 7 + int(topp * 100)
    rng = np.random.default_rng(seed)
    sampler = llama2c.Sampler(vocab, temperature=temperature, topp=topp, seed=seed)
    ref_rng = R.Rng(seed)
    got, want = [], []
    for i in range(240):
        logits = random_logits(rng, vocab, KINDS[i % len(KINDS)])
        got.append(sampler.sample(logits))
        want.append(R.sample(logits, temperature, topp, ref_rng))
    assert got == want
    assert len(set(got)) > 20  # really sampling


def test_sampler_leaves_logits_untouched():
    logits = np.random.default_rng(0).standard_normal(512).astype(np.float32)
    keep = logits.copy()
    s = llama2c.Sampler(512, temperature=0.8, topp=0.9, seed=7)
    for _ in range(5):
        s.sample(logits)
    np.testing.assert_array_equal(logits, keep)


@pytest.mark.parametrize("topp", [0.0, 0.9])
def test_greedy_is_first_argmax(topp):
    rng = np.random.default_rng(5)
    s = llama2c.Sampler(300, temperature=0.0, topp=topp, seed=3)
    for i in range(100):
        logits = rng.integers(-5, 5, 300).astype(np.float32)  # ties for the max
        if i % 3 == 0:
            logits = rng.standard_normal(300).astype(np.float32)
        assert s.sample(logits) == int(np.argmax(logits))


def test_greedy_draws_nothing():
    """Temperature 0 uses no random numbers: interleaving greedy samplers
    does not matter, and the sampled tokens are the argmax."""
    logits = np.random.default_rng(9).standard_normal(64).astype(np.float32)
    a = llama2c.Sampler(64, temperature=0.0, seed=11)
    assert [a.sample(logits) for _ in range(3)] == [int(np.argmax(logits))] * 3


def test_same_seed_same_sequence():
    rng = np.random.default_rng(1)
    logits = [rng.standard_normal(128).astype(np.float32) for _ in range(50)]
    a = llama2c.Sampler(128, temperature=1.0, topp=0.9, seed=123)
    b = llama2c.Sampler(128, temperature=1.0, topp=0.9, seed=123)
    c = llama2c.Sampler(128, temperature=1.0, topp=0.9, seed=124)
    sa = [a.sample(x) for x in logits]
    assert sa == [b.sample(x) for x in logits]
    assert sa != [c.sample(x) for x in logits]


def test_one_hot_distribution():
    """A single overwhelming logit is always chosen, whatever the coin."""
    logits = np.full(256, -50.0, dtype=np.float32)
    logits[77] = 50.0
    for topp in (0.0, 0.5, 0.9, 1.0):
        s = llama2c.Sampler(256, temperature=1.0, topp=topp, seed=99)
        assert all(s.sample(logits) == 77 for _ in range(20))
