"""End to end on the real llama2.c checkpoints in ../shared/data: stories260K
(v0, v1 and Q8_0 group 8) and aidreams260K. Skipped without the shared data."""
from __future__ import annotations

import numpy as np
import pytest

import llama2c
from helpers import (AIDREAMS, STORIES, R, assert_f32_close, assert_q8_close, c_logits,
                     random_tokens)

MODEL = STORIES / "stories260K.bin"
MODEL_V1 = STORIES / "stories260K_v1.bin"
MODEL_Q8 = STORIES / "stories260K_q80_gs8.bin"
TOK = STORIES / "tok512.bin"
EXPECTED = STORIES / "expected" / "run_t0_n200.txt"
AID_MODEL = AIDREAMS / "aidreams260K.bin"
AID_TOK = AIDREAMS / "tok512.bin"


# every test here reads the reference files: skip them all without ../shared/data
pytestmark = pytest.mark.usefixtures("shared_data")


@pytest.fixture(scope="module")
def data(shared_data):
    return shared_data


@pytest.fixture(scope="module")
def stories(data):
    return R.read_v0(MODEL)


@pytest.fixture(scope="module")
def expected(data) -> bytes:
    return EXPECTED.read_bytes()


def cli_text(proc) -> bytes:
    assert proc.returncode == 0, proc.stderr.decode("utf-8", "replace")
    return proc.stdout


# ---------------------------------------------------------------------------
# greedy: the exact llama2.c output
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("model", [MODEL, MODEL_V1], ids=["v0", "v1"])
def test_run_greedy_expected(cli, expected, model):
    proc = cli("run", model, "-z", TOK, "-t", "0.0", "-n", "200")
    assert cli_text(proc) == expected
    assert b"achieved tok/s" in proc.stderr


def test_runq_greedy_gs8(cli, expected):
    out = cli_text(cli("runq", MODEL_Q8, "-z", TOK, "-t", "0", "-n", "200"))
    assert out.startswith(b"Once upon a time")
    assert len(out) > 200 and out.endswith(b"\n")


@pytest.mark.parametrize("model", [MODEL, MODEL_V1], ids=["v0", "v1"])
def test_python_generate_greedy_expected(expected, model):
    text = llama2c.generate(str(model), "", tokenizer=str(TOK), steps=200, temperature=0.0)
    assert text == expected.decode("utf-8")[:-1]


def test_llama_object_generate_and_stream(expected):
    llm = llama2c.Llama(str(MODEL), tokenizer=str(TOK))
    want = expected.decode("utf-8")[:-1]
    assert llm.generate("", steps=200, temperature=0.0) == want
    assert "".join(llm.stream("", steps=200, temperature=0.0)) == want
    # the object is reusable
    assert llm.generate("", steps=200, temperature=0.0) == want


def test_generate_with_prompt_matches_cli(cli):
    prompt = "Once upon a time, Tom"
    proc = cli("run", MODEL, "-z", TOK, "-t", "0", "-n", "60", "-i", prompt)
    out = cli_text(proc)
    assert out.startswith(prompt.encode())
    text = llama2c.generate(str(MODEL), prompt, tokenizer=str(TOK), steps=60, temperature=0.0)
    assert text.encode() + b"\n" == out


def test_reference_greedy_matches_expected(stories, expected):
    """The numpy reference decodes the same 200 tokens (decoded with tok512.bin)."""
    cfg, w = stories
    toks = R.greedy(cfg, w, 200)
    _, pieces, _ = R.read_tokenizer_bin(TOK)
    assert R.render(pieces, [1] + toks) + b"\n" == expected


# ---------------------------------------------------------------------------
# logits against the reference
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("model", [MODEL, MODEL_V1], ids=["v0", "v1"])
def test_logits_fp32(stories, model):
    cfg, w = stories
    llm = llama2c.Llama(str(model))
    c = llm.config
    assert (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.seq_len) \
        == (64, 172, 5, 8, 4, 512, 512)
    assert c.shared_classifier and c.weights == "f32"
    assert c.version == (0 if model == MODEL else 1)
    tokens = random_tokens(cfg, 24, 1)
    assert_f32_close(c_logits(llm, tokens), R.forward(cfg, w, tokens), model.name)


def test_logits_q8_gs8(stories):
    """The gs8 file: w2 rows (172) are not a multiple of 8, so groups span rows."""
    cfg, w = stories
    llm = llama2c.Llama(str(MODEL_Q8))
    assert llm.config.version == 2 and llm.config.group_size == 8
    assert llm.config.weights == "q8_0"
    tokens = random_tokens(cfg, 24, 2)
    assert_q8_close(c_logits(llm, tokens), cfg, w, tokens, 8, R.forward(cfg, w, tokens),
                    "stories260K_q80_gs8")


# ---------------------------------------------------------------------------
# sampling: CLI, Python and the reference sampler agree
# ---------------------------------------------------------------------------


def reference_sampled_text(llm: llama2c.Llama, tok: llama2c.Tokenizer, prompt: str, steps: int,
                           temperature: float, topp: float, seed: int) -> bytes:
    """SPEC 6 generation loop on the C logits with reference.sample and
    reference.Rng: one random draw per sampled token, none for the prompt."""
    prompt_ids = tok.encode(prompt)
    pieces = [tok.piece(i) for i in range(tok.vocab_size)]
    rng = R.Rng(seed)
    seq = [prompt_ids[0]]
    token = prompt_ids[0]
    for pos in range(steps):
        logits = llm.forward(token, pos)
        if pos + 1 < len(prompt_ids):
            nxt = prompt_ids[pos + 1]
        else:
            nxt = R.sample(logits, temperature, topp, rng)
        if nxt == 1:
            break
        seq.append(nxt)
        token = nxt
    return R.render(pieces, seq)


@pytest.mark.parametrize("prompt,temperature,topp,seed", [
    ("", 1.0, 0.9, 42),
    ("", 0.8, 0.0, 7),
    ("Once upon a time", 1.2, 0.5, 1234),
    ("Lily", 1.0, 1.0, 987654321),
])
def test_sampled_generation(cli, prompt, temperature, topp, seed):
    steps = 150
    args = ["-z", TOK, "-n", steps, "-t", temperature, "-p", topp, "-s", seed]
    if prompt:
        args += ["-i", prompt]
    out = cli_text(cli("run", MODEL, *args))
    py = llama2c.generate(str(MODEL), prompt, tokenizer=str(TOK), steps=steps,
                          temperature=temperature, topp=topp, seed=seed)
    assert py.encode() + b"\n" == out
    llm = llama2c.Llama(str(MODEL), tokenizer=str(TOK))
    ref = reference_sampled_text(llm, llama2c.Tokenizer(str(TOK)), prompt, steps, temperature,
                                 topp, seed)
    assert ref + b"\n" == out


def test_seed_42_is_reproducible():
    kw = dict(tokenizer=str(TOK), steps=80, temperature=1.0, seed=42)
    a = llama2c.generate(str(MODEL), "", **kw)
    assert a == llama2c.generate(str(MODEL), "", **kw)
    assert a != llama2c.generate(str(MODEL), "", **{**kw, "seed": 43})


def test_runq_sampled_matches_python_q8(cli):
    out = cli_text(cli("runq", MODEL_Q8, "-z", TOK, "-n", 100, "-s", 42, "-t", 1.0))
    py = llama2c.generate(str(MODEL_Q8), "", tokenizer=str(TOK), steps=100, temperature=1.0,
                          seed=42)
    assert py.encode() + b"\n" == out


# ---------------------------------------------------------------------------
# aidreams260K: another shape (4 layers, MHA, seq_len 128), its own tokenizer
# ---------------------------------------------------------------------------


def test_aidreams_runs(cli, data):
    out = cli_text(cli("run", AID_MODEL, "-z", AID_TOK, "-t", "0", "-n", "0"))
    assert len(out.strip()) > 100
    py = llama2c.generate(str(AID_MODEL), "", tokenizer=str(AID_TOK), steps=0, temperature=0.0)
    assert py.encode() + b"\n" == out
    # the whole context (steps 0 = seq_len 128) decoded by the reference
    cfg, w = R.read_v0(AID_MODEL)
    assert cfg.seq_len == 128 and cfg.n_kv_heads == cfg.n_heads == 4
    _, pieces, _ = R.read_tokenizer_bin(AID_TOK)
    assert R.render(pieces, [1] + R.greedy(cfg, w, cfg.seq_len)) + b"\n" == out


def test_aidreams_logits(data):
    cfg, w = R.read_v0(AID_MODEL)
    tokens = random_tokens(cfg, 20, 3)
    assert_f32_close(c_logits(llama2c.Llama(str(AID_MODEL)), tokens), R.forward(cfg, w, tokens),
                     "aidreams260K")


def test_aidreams_sampled(cli, data):
    out = cli_text(cli("run", AID_MODEL, "-z", AID_TOK, "-s", 5, "-t", 1.0, "-n", 100))
    py = llama2c.generate(str(AID_MODEL), "", tokenizer=str(AID_TOK), steps=100, temperature=1.0,
                          seed=5)
    assert py.encode() + b"\n" == out
    assert np.isfinite(llama2c.Llama(str(AID_MODEL)).forward(1, 0)).all()
