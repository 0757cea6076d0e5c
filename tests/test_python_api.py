"""The Python API around the engine: generate/stream vs the `run` program,
threads, chat, config, the `llama2c` command line, and import hygiene."""
from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest

import llama2c
import reference as R
from helpers import GQA, MHA, REPO

LONG = R.Config(dim=64, hidden_dim=172, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=384,
                seq_len=160)

PYTHON = sys.executable


def run_stdout(cli, model, *args, prog="run", stdin=None):
    proc = cli(prog, model.path, "-z", model.tokenizer, *args, input=stdin)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode("utf-8")


@pytest.mark.parametrize("prompt", ["", "ab ba", "hello there"])
@pytest.mark.parametrize("temperature,topp", [(0.0, 0.9), (1.0, 0.9), (0.8, 0.0), (1.2, 0.5)])
def test_generate_matches_run(cli, make_model, prompt, temperature, topp):
    m = make_model(GQA, version=1, seed=3)
    args = ["-t", temperature, "-p", topp, "-s", 7, "-n", 25]
    if prompt:
        args += ["-i", prompt]
    expected = run_stdout(cli, m, *args)
    assert expected.endswith("\n")
    llama = llama2c.Llama(m.path, tokenizer=m.tokenizer)
    got = llama.generate(prompt, steps=25, temperature=temperature, topp=topp, seed=7)
    assert got == expected[:-1]
    assert "".join(llama.stream(prompt, steps=25, temperature=temperature, topp=topp, seed=7)) == got
    assert llama2c.generate(m.path, prompt, tokenizer=m.tokenizer, steps=25, temperature=temperature,
                            topp=topp, seed=7) == got


def test_runq_matches_quantized_llama(cli, make_model):
    m = make_model(MHA, version=1, seed=4)
    expected = run_stdout(cli, m, "-s", 11, "-n", 20, prog="runq")
    got = llama2c.Llama(m.path, tokenizer=m.tokenizer, quantize=True).generate(steps=20, seed=11)
    assert got == expected[:-1]


def test_llama2c_run_subcommand_matches_run(cli, make_model):
    m = make_model(GQA, version=1, seed=3)
    args = ["-s", "5", "-n", "30", "-i", "ab"]
    expected = run_stdout(cli, m, *args)
    proc = subprocess.run([PYTHON, "-m", "llama2c", "run", str(m.path), "-z", str(m.tokenizer), *args],
                          capture_output=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode() == expected


def test_chat_mode_cli_and_python_agree(cli, make_model):
    m = make_model(LONG, version=1, seed=3)
    stdin = b"be brief\nhello\nmore please\n"
    args = ["-m", "chat", "-s", "9", "-n", "150"]
    expected = run_stdout(cli, m, *args, stdin=stdin)
    assert expected.startswith("Enter system prompt (optional): ")
    assert "Assistant: " in expected
    proc = subprocess.run([PYTHON, "-m", "llama2c", "run", str(m.path), "-z", str(m.tokenizer), *args],
                          capture_output=True, cwd=REPO, input=stdin)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode() == expected


def test_chat_greedy_equals_manual_template(make_model):
    m = make_model(LONG, version=1, seed=5)
    llama = llama2c.Llama(m.path, tokenizer=m.tokenizer)
    reply = llama.chat("hi", system="sys", temperature=0.0, steps=12)
    ids = llama.tokenize("[INST] <<SYS>>\nsys\n<</SYS>>\n\nhi [/INST]")
    other = llama2c.Llama(m.path, tokenizer=m.tokenizer)
    pos, logits = 0, None
    for t in ids:
        logits = other.forward(t, pos)
        pos += 1
    out = []
    for _ in range(12):
        t = int(np.argmax(logits))
        if t == 2:
            break
        out.append(t)
        logits = other.forward(t, pos)
        pos += 1
    # chat text goes through the printable filter: bytes that do not form UTF-8
    # and control characters are dropped where detokenize shows U+FFFD / keeps them
    plain = "".join(ch for ch in other.detokenize(out) if ch != "\ufffd" and (ch.isprintable() or ch.isspace()))
    assert reply == plain
    assert len(out) > 0


def test_chat_session_keeps_context(make_model):
    m = make_model(LONG, version=1, seed=5)
    llama = llama2c.Llama(m.path, tokenizer=m.tokenizer)
    s = llama.chat_session(system="sys")
    s.send("one", temperature=0.0, steps=5)
    first_pos = s.pos
    s.send("two", temperature=0.0, steps=5)
    assert s.pos > first_pos
    with pytest.raises(llama2c.InvalidArgumentError):
        llama.chat([{"role": "assistant", "content": "x"}])


def test_threads_run_side_by_side_and_release_the_gil(make_model):
    m = make_model(GQA, version=1, seed=6)
    a = llama2c.Llama(m.path, tokenizer=m.tokenizer)
    b = llama2c.Llama(m.path, tokenizer=m.tokenizer)
    expected = {s: a.generate("ab", steps=31, seed=s) for s in (1, 2)}
    results = {}

    def work(model, seed):
        for _ in range(30):
            text = model.generate("ab", steps=31, seed=seed)
            if text != expected[seed]:
                results[seed] = text
                return
        results.setdefault(seed, "ok")

    ticks = 0
    threads = [threading.Thread(target=work, args=(a, 1)), threading.Thread(target=work, args=(b, 2))]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        ticks += 1  # only advances while C runs without the GIL
    for t in threads:
        t.join()
    assert results == {1: "ok", 2: "ok"}
    assert ticks > 1000


def test_busy_model_is_refused_in_the_same_thread(make_model):
    m = make_model(GQA, version=1, seed=6)
    llama = llama2c.Llama(m.path, tokenizer=m.tokenizer)
    it = llama.stream("ab", steps=10, seed=1)
    next(it)
    with pytest.raises(llama2c.StateError):
        llama.generate("ab", steps=5)
    it.close()
    assert llama.generate("ab", steps=5, seed=1)


def test_config_fields(make_model):
    m = make_model(MHA, version=2, shared=False, seed=2)
    c = llama2c.Llama(m.path).config
    assert (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.seq_len) == \
        (MHA.dim, MHA.hidden_dim, MHA.n_layers, MHA.n_heads, MHA.n_kv_heads, MHA.vocab_size, MHA.seq_len)
    assert c.version == 2 and c.weights == "q8_0" and c.group_size == m.group_size
    assert c.shared_classifier is False and c.file_size == m.path.stat().st_size
    assert c.n_params == sum(int(v.size) for v in m.w.values())


def test_tokenize_round_trip(make_model):
    m = make_model(GQA, version=1, seed=3)
    llama = llama2c.Llama(m.path, tokenizer=m.tokenizer)
    for text in ["ab", "abba cab", "x\ny"]:
        ids = llama.tokenize(text)
        assert ids[0] == 1
        assert llama.detokenize(ids) == text
    assert llama.tokenize("ab", bos=False, eos=True)[-1] == 2


def test_missing_tokenizer_is_a_clear_error(make_model, tmp_path):
    m = make_model(GQA, version=1, seed=3)
    lone = tmp_path / "lone.bin"
    lone.write_bytes(m.path.read_bytes())
    llama = llama2c.Llama(lone)
    assert llama.forward(1, 0).shape == (GQA.vocab_size,)
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        llama.generate("x")


def test_bad_settings_raise(make_model):
    m = make_model(GQA, version=1, seed=3)
    llama = llama2c.Llama(m.path, tokenizer=m.tokenizer)
    for kw in ({"temperature": -1.0}, {"topp": 1.5}, {"steps": -3}):
        with pytest.raises(ValueError):
            llama.generate("x", **kw)


def test_import_does_not_pull_torch():
    code = "import sys, llama2c; llama2c.Llama; print('torch' in sys.modules)"
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_cli_info_and_one_line_errors(make_model, tmp_path):
    m = make_model(GQA, version=2, seed=3)
    out = subprocess.run([PYTHON, "-m", "llama2c", "info", str(m.path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "version 2" in out.stdout and "dim 64" in out.stdout
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\x00" * 40)
    out = subprocess.run([PYTHON, "-m", "llama2c", "info", str(bad)], capture_output=True, text=True)
    assert out.returncode == 1
    assert out.stderr.startswith("llama2c: error:") and len(out.stderr.strip().splitlines()) == 1
    assert "Traceback" not in out.stderr
