"""The OpenAI-shaped API (llama-cpp-python's names and shapes): completions,
streaming, stop strings, logprobs, echo, context limits, all-position
logits, scoring / perplexity and embeddings, checked against the PyTorch
model where numbers are involved."""
from __future__ import annotations

import math

import numpy as np
import pytest

import llama2c
import reference as R
from helpers import greedy_continuation
from llama2c.completion import StopText, fit_prompt
from llama2c.errors import ContextLengthError
from llama2c.scoring import windows

LONG = R.Config(dim=64, hidden_dim=172, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=384, seq_len=160)


@pytest.fixture(scope="module")
def model(make_model):
    return make_model(LONG, version=1, seed=11)


@pytest.fixture(scope="module")
def llm(model):
    return llama2c.Llama(model.path, tokenizer=model.tokenizer)


def torch_model(path):
    pytest.importorskip("torch", reason="the PyTorch reference needs the train extra")
    from llama2c.model import Transformer

    return Transformer.from_bin(path).eval()


def torch_logprobs(tm, ids) -> np.ndarray:
    """(len(ids), vocab) log-softmax of the PyTorch model's logits, float64."""
    import torch

    with torch.no_grad():
        h = tm.hidden_states(torch.tensor([ids]))
        logits = tm.output(h)[0].double()
    return torch.log_softmax(logits, dim=-1).numpy()


def test_completion_shape_and_greedy_text(llm):
    r = llm("hello there", max_tokens=10, temperature=0.0)
    assert r["object"] == "text_completion" and r["id"].startswith("cmpl-")
    assert isinstance(r["created"], int) and r["model"] == llm.model_path
    (choice,) = r["choices"]
    assert set(choice) == {"text", "index", "logprobs", "finish_reason"}
    assert choice["index"] == 0 and choice["logprobs"] is None
    ids = llm.tokenize("hello there")
    expected = greedy_continuation(llm, ids, 10)
    assert choice["text"] == llm.tokenizer.decode_bytes([ids[-1]] + expected)[
        len(llm.tokenizer.decode_bytes([ids[-1]])):].decode("utf-8", "replace")
    assert r["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(expected),
                          "total_tokens": len(ids) + len(expected)}
    assert choice["finish_reason"] == ("length" if len(expected) == 10 else "stop")


def test_max_tokens_counts_new_tokens_and_call_is_create_completion(llm):
    a = llm.create_completion("ab", max_tokens=7, seed=5, stop=None)
    b = llm("ab", max_tokens=7, seed=5)
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    assert a["usage"]["completion_tokens"] <= 7
    if a["choices"][0]["finish_reason"] == "length":
        assert a["usage"]["completion_tokens"] == 7


def test_seed_reproducible_and_default_seed(model):
    llm = llama2c.Llama(model.path, tokenizer=model.tokenizer, seed=123, verbose=False)
    one = llm("the", max_tokens=20, temperature=1.0)["choices"][0]["text"]
    two = llm("the", max_tokens=20, temperature=1.0)["choices"][0]["text"]
    three = llm("the", max_tokens=20, temperature=1.0, seed=123)["choices"][0]["text"]
    assert one == two == three


def test_stream_matches_whole_and_ends_with_finish_reason(llm):
    whole = llm("hello", max_tokens=25, seed=9)
    chunks = list(llm("hello", max_tokens=25, seed=9, stream=True))
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == whole["choices"][0]["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_stop_strings_cut_the_text_in_whole_and_stream(llm):
    free = llm("a", max_tokens=40, temperature=0.0)["choices"][0]["text"]
    assert len(free) > 6
    stop = free[3:5]
    cut = llm("a", max_tokens=40, temperature=0.0, stop=[stop])
    assert cut["choices"][0]["text"] == free[:free.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    streamed = "".join(c["choices"][0]["text"] for c in llm("a", max_tokens=40, temperature=0.0, stop=stop,
                                                              stream=True))
    assert streamed == cut["choices"][0]["text"]


def test_stop_text_holds_back_partial_matches():
    s = StopText(["END"])
    assert s.push("abcE") == "abc"
    assert s.push("N") == ""
    assert s.push("x") == "ENx"
    assert s.push("yyEND more") == "yy" and s.stopped


def test_logprobs_match_pytorch(model, llm):
    tm = torch_model(model.path)
    r = llm("hello there", max_tokens=12, temperature=0.0, logprobs=3)
    lp = r["choices"][0]["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    ids = llm.tokenize("hello there")
    new = greedy_continuation(llm, ids, 12)
    assert len(lp["tokens"]) == len(new) == r["usage"]["completion_tokens"]
    ref = torch_logprobs(tm, ids + new)
    for i, t in enumerate(new):
        want = ref[len(ids) - 1 + i]
        assert lp["token_logprobs"][i] == pytest.approx(want[t], abs=1e-4)
        top = lp["top_logprobs"][i]
        best = np.argsort(-want)[:3]
        assert len(top) >= 3
        assert sorted(top.values(), reverse=True)[:3] == pytest.approx(sorted(want[best], reverse=True), abs=1e-4)
    # greedy: the chosen token is the most likely one
    assert all(v == max(top.values()) for v, top in zip(lp["token_logprobs"], lp["top_logprobs"]))
    # offsets: where each token's text starts in prompt + completion
    text = r["choices"][0]["text"]
    assert lp["text_offset"][0] == len("hello there")
    assert lp["text_offset"] == sorted(lp["text_offset"])
    if "\ufffd" not in text:  # (random vocabularies make broken UTF-8 at times)
        for off, tok in zip(lp["text_offset"], lp["tokens"]):
            assert ("hello there" + text)[off:off + len(tok)] == tok


def test_logprobs_are_before_sampling_transforms(llm):
    plain = llm("ab", max_tokens=1, temperature=0.0, logprobs=1)["choices"][0]["logprobs"]
    token = llm.tokenize("ab")
    first = greedy_continuation(llm, token, 1)[0]
    biased = llm("ab", max_tokens=1, temperature=0.0, logprobs=1, logit_bias={first: -100.0},
                 repeat_penalty=1.3)["choices"][0]["logprobs"]
    # another token was chosen, but the logprobs are the model's own
    assert biased["tokens"][0] != plain["tokens"][0]
    assert biased["top_logprobs"][0][plain["tokens"][0]] == pytest.approx(plain["token_logprobs"][0])


def test_echo_with_logprobs_scores_the_prompt(model, llm):
    tm = torch_model(model.path)
    r = llm("hello there you", max_tokens=3, temperature=0.0, echo=True, logprobs=2)
    ids = llm.tokenize("hello there you")
    choice = r["choices"][0]
    assert choice["text"].startswith("hello there you")
    lp = choice["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    ref = torch_logprobs(tm, ids)
    for i in range(1, len(ids)):
        assert lp["token_logprobs"][i] == pytest.approx(ref[i - 1][ids[i]], abs=1e-4)
    assert lp["text_offset"][:len(ids)] == sorted(lp["text_offset"][:len(ids)])


def test_all_logits_are_bit_identical_to_forward(make_model):
    for version in (0, 1, 2, 4):
        m = make_model(LONG, version=version, seed=12)
        llm = llama2c.Llama(m.path, tokenizer=m.tokenizer)
        ids = [1] + list(range(3, 90))
        every = llm.eval(ids)
        cx = llm.create_context()
        one_by_one = np.stack([cx.forward(t, i) for i, t in enumerate(ids)])
        assert every.shape == (len(ids), LONG.vocab_size)
        assert np.array_equal(every, one_by_one), version
        assert np.array_equal(llm.create_context().forward_batch(ids, 0, all_logits=True), one_by_one)
        assert np.array_equal(llm.create_context().forward_batch(ids, 0), one_by_one[-1])


def test_prompt_that_does_not_fit_raises_and_truncates_on_request(model):
    llm = llama2c.Llama(model.path, tokenizer=model.tokenizer, n_ctx=24)
    long = "hello there " * 20
    n = len(llm.tokenize(long))
    assert n > 24
    with pytest.raises(ContextLengthError) as info:
        llm(long, max_tokens=4)
    assert isinstance(info.value, ValueError)
    assert f"{n} tokens" in str(info.value) and "context of 24" in str(info.value)
    r = llm(long, max_tokens=4, temperature=0.0, truncate="left")
    assert r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"] <= 24
    assert r["usage"]["prompt_tokens"] <= 24 - 4
    with pytest.raises(llama2c.InvalidArgumentError):
        llm(long, truncate="middle")


def test_generation_ends_with_length_at_the_end_of_the_context(model):
    llm = llama2c.Llama(model.path, tokenizer=model.tokenizer, n_ctx=20)
    bias = {1: float("-inf"), 2: float("-inf")}  # never stop early
    for stream in (False, True):
        r = llm("hello", max_tokens=100, temperature=0.0, logit_bias=bias, stream=stream)
        if stream:
            chunks = list(r)
            assert chunks[-1]["choices"][0]["finish_reason"] == "length"
            continue
        assert r["choices"][0]["finish_reason"] == "length"
        assert r["usage"]["total_tokens"] == 20
    r = llm("hello", max_tokens=None, temperature=0.0, logit_bias=bias)
    assert r["usage"]["total_tokens"] == 20


def test_fit_prompt_keeps_bos_and_the_end():
    ids = [1] + list(range(10, 40))
    assert fit_prompt(ids, 64, 16, None) == ids
    kept = fit_prompt(ids, 16, 4, "left")
    assert kept[0] == 1 and kept[-1] == 39 and len(kept) == 12
    assert fit_prompt(ids, 16, 100, "left") == [1] + list(range(33, 40))


def test_prefix_reuse_does_not_change_results(llm, model):
    fresh = llama2c.Llama(model.path, tokenizer=model.tokenizer)
    llm("hello there my friend", max_tokens=5, temperature=0.0)
    a = llm("hello there my dear", max_tokens=15, temperature=0.0, logprobs=2)
    b = fresh("hello there my dear", max_tokens=15, temperature=0.0, logprobs=2)
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    assert a["choices"][0]["logprobs"]["token_logprobs"] == b["choices"][0]["logprobs"]["token_logprobs"]


def test_unsupported_settings_are_refused_not_ignored(llm, model):
    with pytest.raises(llama2c.InvalidArgumentError, match="mirostat_mode"):
        llm("a", mirostat_mode=2)
    with pytest.raises(llama2c.InvalidArgumentError, match="suffix"):
        llm("a", suffix="b")
    with pytest.raises(llama2c.InvalidArgumentError):
        llm("a", max_tokens="many")
    with pytest.raises(llama2c.InvalidArgumentError):
        llm("a", temperature=-1)
    with pytest.raises(TypeError):
        llama2c.Llama(model.path, tokenizer=model.tokenizer, n_cxt=5)
    llama2c.Llama(model_path=str(model.path), tokenizer=model.tokenizer, n_ctx=64, n_threads=1, verbose=False,
                  n_batch=512, n_gpu_layers=0)


def test_token_id_prompts(llm):
    ids = llm.tokenize("hello")
    assert llm(ids, max_tokens=5, temperature=0.0)["choices"][0]["text"] == \
        llm("hello", max_tokens=5, temperature=0.0)["choices"][0]["text"]
    with pytest.raises(llama2c.InvalidArgumentError):
        llm([1, 10**6])


# ---- scoring and perplexity ----

def test_windows_score_every_token_once():
    for n, w, s in [(10, 4, 2), (3, 4, 2), (50, 16, 5), (17, 16, 15), (100, 8, 1)]:
        spans = windows(n, w, s)
        scored = [j for b, e, f in spans for j in range(f, e)]
        assert scored == list(range(1, n))
        assert all(e - b <= w and f > b for b, e, f in spans)


@pytest.mark.parametrize("window,stride", [(None, None), (40, 16), (33, 32)])
def test_score_matches_pytorch_with_a_sliding_window(model, llm, window, stride):
    tm = torch_model(model.path)
    text = "hello there, this is a longer text " * 12
    ids = llm.tokenize(text)
    assert len(ids) > 160  # longer than the context: several windows
    s = llm.score(text, window=window, stride=stride)
    w = window or llm.n_ctx
    st = stride or w // 2
    assert s.tokens == ids and s.token_logprobs[0] is None
    expected = [None] * len(ids)
    for b, e, f in windows(len(ids), w, st):
        ref = torch_logprobs(tm, ids[b:e])
        for j in range(f, e):
            expected[j] = ref[j - 1 - b][ids[j]]
    got = np.array(s.token_logprobs[1:], dtype=np.float64)
    assert np.allclose(got, np.array(expected[1:], dtype=np.float64), atol=1e-4)
    ppl = math.exp(-float(np.mean(expected[1:])))
    assert s.perplexity == pytest.approx(ppl, rel=1e-4)
    assert llm.perplexity(text, window=window, stride=stride) == pytest.approx(ppl, rel=1e-4)


# ---- embeddings ----

@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_embeddings_match_pytorch_hidden_states(model, llm, pooling):
    import_torch = pytest.importorskip("torch", reason="the PyTorch reference needs the train extra")
    tm = torch_model(model.path)
    texts = ["hello there", "a b a b"]
    got = llm.embed(texts, pooling=pooling)
    for text, vec in zip(texts, got):
        with import_torch.no_grad():
            h = tm.hidden_states(import_torch.tensor([llm.tokenize(text)]))[0].double().numpy()
        want = h.mean(axis=0) if pooling == "mean" else h[-1]
        assert len(vec) == LONG.dim
        assert np.allclose(vec, want, atol=1e-4)
    one = llm.embed("hello there", pooling=pooling, normalize=True)
    assert np.linalg.norm(one) == pytest.approx(1.0)


def test_create_embedding_shape_and_errors(llm, model):
    r = llm.create_embedding(["hello", "there"])
    assert r["object"] == "list" and len(r["data"]) == 2
    assert r["data"][1] == {"object": "embedding", "embedding": r["data"][1]["embedding"], "index": 1}
    assert r["usage"]["prompt_tokens"] == len(llm.tokenize("hello")) + len(llm.tokenize("there"))
    with pytest.raises(llama2c.InvalidArgumentError):
        llm.embed("x", pooling="max")
    short = llama2c.Llama(model.path, tokenizer=model.tokenizer, n_ctx=8)
    with pytest.raises(ContextLengthError):
        short.embed("hello there " * 10, truncate=False)
    assert len(short.embed("hello there " * 10)) == LONG.dim


# ---- the command line ----

def cli(*args, stdin=None):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "llama2c", *map(str, args)], capture_output=True, text=True,
                          input=stdin, timeout=120)


def test_generate_n_counts_new_tokens_and_steps_counts_positions(model, llm):
    base = ["generate", "hello there", "--model", model.path, "--tokenizer", model.tokenizer, "-t", "0"]
    new = cli(*base, "-n", "6")
    assert new.returncode == 0, new.stderr
    assert new.stdout.rstrip("\n") == llm.generate("hello there", max_tokens=6, temperature=0)
    n_prompt = len(llm.tokenize("hello there"))
    assert llm.generate("hello there", max_tokens=6, temperature=0) == \
        llm.generate("hello there", steps=n_prompt - 1 + 6, temperature=0)
    old = cli(*base, "--steps", "6")
    assert old.returncode == 0 and old.stdout.rstrip("\n") == llm.generate("hello there", steps=6, temperature=0)
    bad = cli(*base, "-n", "-1")
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1


def test_generate_prompt_longer_than_the_context(model):
    short = llama2c.Llama(model.path, tokenizer=model.tokenizer, n_ctx=8)
    with pytest.raises(ContextLengthError):
        short.generate("hello there " * 10, max_tokens=2)
    proc = cli("generate", "hello there " * 10, "--model", model.path, "--tokenizer", model.tokenizer, "-c", "8")
    assert proc.returncode == 1 and "do not fit" not in proc.stdout and proc.stderr.count("\n") == 1


def test_perplexity_command(model, llm, tmp_path):
    text = "hello there, this is a text to score " * 8
    path = tmp_path / "t.txt"
    path.write_text(text)
    proc = cli("perplexity", path, "--model", model.path, "--tokenizer", model.tokenizer, "--ctx", "48",
               "--stride", "16")
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("perplexity:"))
    assert float(line.split()[1]) == pytest.approx(llm.perplexity(text, window=48, stride=16), rel=1e-4)
    missing = cli("perplexity", tmp_path / "nope.txt", "--model", model.path)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1


def test_llama_cpp_python_helpers(llm):
    assert llm.n_ctx() == llm.n_ctx == LONG.seq_len
    assert llm.n_vocab() == LONG.vocab_size and llm.n_embd() == LONG.dim
    assert (llm.token_bos(), llm.token_eos()) == (1, 2)
    assert llm.tokenize(b"hello") == llm.tokenize("hello")
    assert llm.tokenize("hello", add_bos=False) == llm.tokenize("hello")[1:]


def test_no_broken_character_at_the_end(model):
    """A completion cut by max_tokens in the middle of a multi-byte character
    ends before it, not with a replacement character."""
    llm = llama2c.Llama(model.path, tokenizer=model.tokenizer)
    byte_tokens = [t for t in range(3, 259) if llm.tokenizer.piece(t) == b"<0xE2>"]
    if not byte_tokens:
        pytest.skip("this vocabulary has no <0xE2> byte token")
    r = llm("hello", max_tokens=1, temperature=0.0, logit_bias={byte_tokens[0]: 100.0})
    assert r["choices"][0]["text"] == "" and r["usage"]["completion_tokens"] == 1


def test_an_abandoned_stream_frees_its_context_at_once(llm):
    """A stream left mid-way (a `break` out of the loop) lets go of the
    context when dropped, without waiting for the cycle collector."""
    import gc

    gc.disable()
    try:
        for _ in range(2):
            stream = llm.create_completion("once upon", max_tokens=8, temperature=0, stream=True)
            next(stream)
            del stream
        assert llm.create_completion("once upon", max_tokens=3, temperature=0)["choices"][0]["finish_reason"]
        stream = llm.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=8, stream=True)
        next(stream), next(stream)
        del stream
        assert llm.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=2)["choices"]
    finally:
        gc.enable()
