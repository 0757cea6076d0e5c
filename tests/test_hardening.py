"""Regression tests for the hardening review (issue 12, findings 1-6): hostile
files and arguments get a clear error, never a crash, a hang, gigabytes of
memory or a silently wrong answer. Anything that crashed or hung before the
fixes runs in a subprocess with a timeout, so a regression fails the test
instead of killing or stalling the suite."""
from __future__ import annotations

import dataclasses
import os
import struct
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import llama2c
from helpers import GQA, MHA, REPO, R

PY = sys.executable


def run_python(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Runs code in a fresh interpreter (with tests/ importable)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO)]))
    return subprocess.run([PY, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def llama2c_cli(*args, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "llama2c", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, **kw)


def v1_bytes(cfg: R.Config, w: dict) -> bytes:
    return R.model_bytes(cfg, w, 1)


# ---------------------------------------------------------------------------
# 1. byte fallback past a small vocabulary
# ---------------------------------------------------------------------------

SMALL_PIECES = [b"<unk>", b"\n<s>\n", b"\n</s>\n", b" ", b"h", b"e", b"l", b"o", b"w", b"r", b"d",
                b"he", b"ll", b"lo", b" w", b"or", b"ld", b"hell", b"hello", b" wor", b" world"]


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    """A 21-token tokenizer (no byte pieces at all) and a model of that vocabulary."""
    root = tmp_path_factory.mktemp("small_vocab")
    tok = R.write_tokenizer_bin(root / "tok21.bin", SMALL_PIECES, [-float(i) for i in range(len(SMALL_PIECES))])
    cfg = R.Config(dim=16, hidden_dim=32, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=len(SMALL_PIECES),
                   seq_len=32)
    model = R.write_model(root / "model21.bin", cfg, R.random_weights(cfg, 5), 1)
    return model, tok


def test_byte_fallback_stays_inside_a_small_vocabulary(small_vocab):
    _, tok = small_vocab
    proc = run_python(f"""
        import llama2c
        tk = llama2c.Tokenizer({str(tok)!r})
        ids = tk.encode("hello world, ünïcödé 🦙 zzz")
        assert all(0 <= i < tk.vocab_size for i in ids), ids
        print(ids)
    """)
    assert proc.returncode == 0, proc.stderr
    ids = eval(proc.stdout)
    assert ids[:4] == [1, 3, 18, 20]  # BOS, the dummy-prefix " ", "hello", " world"
    assert 0 in ids  # bytes with no token of their own are <unk>


def test_tokenizer_opened_with_a_smaller_vocab_size(make_model):
    tok512 = make_model.tokenizer(512)
    proc = run_python(f"""
        import llama2c
        tk = llama2c.Tokenizer({str(tok512)!r}, vocab_size=50)
        ids = tk.encode("hello world")
        assert all(0 <= i < 50 for i in ids), ids
    """)
    assert proc.returncode == 0, proc.stderr


def test_run_and_cli_with_a_vocabulary_below_259(small_vocab, cli):
    model, tok = small_vocab
    proc = cli("run", model, "-z", tok, "-n", "12", "-t", "0", "-i", "hello wörld ✓")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(b"hello")
    proc = llama2c_cli("generate", "héllo wörld", "--model", model, "--tokenizer", tok, "-n", "12", "-t", "0")
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------------
# 2. memory follows the positions used, not the header's seq_len
# ---------------------------------------------------------------------------

HUGE_SEQ = R.Config(dim=64, hidden_dim=128, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=512, seq_len=2**20)


@pytest.fixture(scope="module")
def huge_seq_model(tmp_path_factory, make_model):
    """(a file claiming 2^20 positions, the same weights with seq_len 64, tokenizer)"""
    root = tmp_path_factory.mktemp("huge_seq")
    w = R.random_weights(HUGE_SEQ, 3)
    path = R.write_model(root / "seq2p20.bin", HUGE_SEQ, w, 1)
    twin = R.write_model(root / "seq64.bin", dataclasses.replace(HUGE_SEQ, seq_len=64), w, 1)
    return path, twin, make_model.tokenizer(512)


def peak_rss_mb(code: str) -> float:
    """Peak resident memory (MB) of the child processes that code starts, or
    of the interpreter itself when it starts none."""
    proc = run_python(textwrap.dedent(code) + textwrap.dedent("""
        import resource
        kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        print(kids or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """), timeout=120)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.split()[-1]) / 1024


# The old engine sized and zeroed the KV cache and prefill buffers for all
# 2^20 positions: 1.3-3.5 GB. Each run is compared with the same run of the
# same weights in a file of seq_len 64. AddressSanitizer builds (CI) write
# shadow memory for every allocation, touched or not: they get more room,
# still far below the old gigabytes.
SLACK_MB = 512 if "asan" in os.environ.get("LD_PRELOAD", "") else 64

def test_short_run_of_a_huge_seq_len_file_stays_small(huge_seq_model, cli):
    path, twin, tok = huge_seq_model
    assert path.stat().st_size < 2**20
    code = """
        import subprocess
        p = subprocess.run([{run!r}, {model!r}, "-z", {tok!r}, "-n", "8", "-i", "a b"], capture_output=True)
        assert p.returncode == 0, p.stderr
    """
    mb = peak_rss_mb(code.format(run=str(cli.run), model=str(path), tok=str(tok)))
    base = peak_rss_mb(code.format(run=str(cli.run), model=str(twin), tok=str(tok)))
    assert mb < base + SLACK_MB, f"./run of an 8-token prompt used {mb:.0f} MB ({base:.0f} MB at seq_len 64)"


def test_short_python_run_of_a_huge_seq_len_file_stays_small(huge_seq_model):
    path, twin, tok = huge_seq_model
    code = """
        import llama2c
        llama = llama2c.Llama({model!r}, tokenizer={tok!r})
        llama.generate("a b c d e f", steps=8, seed=1)
        llama.forward_batch([1, 2, 3, 4], 0)
        session = llama.chat_session()
        session.send("hi", steps=4, seed=1)
    """
    mb = peak_rss_mb(code.format(model=str(path), tok=str(tok)))
    base = peak_rss_mb(code.format(model=str(twin), tok=str(tok)))
    assert mb < base + SLACK_MB, f"Llama(...).generate of 8 steps used {mb:.0f} MB ({base:.0f} MB at seq_len 64)"


def test_n_ctx_limits_positions_and_keeps_logits(make_model):
    m = make_model(GQA, version=1, seed=11)
    full = llama2c.Llama(m.path, tokenizer=m.tokenizer)
    short = llama2c.Llama(m.path, tokenizer=m.tokenizer, n_ctx=8)
    assert (full.n_ctx, short.n_ctx) == (GQA.seq_len, 8)
    tokens = [1, 5, 9, 77, 3, 12, 200, 4]
    np.testing.assert_array_equal(short.forward_batch(tokens, 0), full.forward_batch(tokens, 0))
    with pytest.raises(llama2c.InvalidArgumentError, match="out of range"):
        short.forward(1, 8)
    with pytest.raises(llama2c.InvalidArgumentError, match="seq_len"):
        llama2c.Llama(m.path, n_ctx=GQA.seq_len + 1)
    with pytest.raises(llama2c.InvalidArgumentError):
        llama2c.Llama(m.path, n_ctx=-1)
    assert llama2c.Llama(m.path, n_ctx=0).n_ctx == GQA.seq_len  # 0: the model's, as in llama-cpp-python
    # the generation budget follows n_ctx
    assert short.generate("", steps=0, temperature=0) == short.generate("", steps=100, temperature=0)


def test_long_context_still_runs_to_its_seq_len(make_model):
    cfg = R.Config(dim=16, hidden_dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=300, seq_len=600)
    m = make_model(cfg, version=1, seed=4)
    llama = llama2c.Llama(m.path)
    tokens = [int(t) for t in np.random.default_rng(0).integers(3, 300, cfg.seq_len)]
    c = llama.forward_batch(tokens, 0)
    ref = R.forward(cfg, m.w, tokens)[-1]
    assert np.max(np.abs(c - ref)) < 1e-3


def test_cli_ctx_option(make_model, cli):
    m = make_model(MHA, version=1, seed=6)
    proc = llama2c_cli("generate", "--model", m.path, "--tokenizer", m.tokenizer, "-t", "0", "-n", "0", "--ctx", "5")
    assert proc.returncode == 0, proc.stderr
    proc = llama2c_cli("generate", "--model", m.path, "--tokenizer", m.tokenizer, "--ctx", "100000")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "seq_len" in proc.stderr
    proc = cli("run", m.path, "-z", m.tokenizer, "-c", "100000")
    assert proc.returncode == 1 and b"seq_len" in proc.stderr


# ---------------------------------------------------------------------------
# 3. FIFOs and other special files: an error, not a hang
# ---------------------------------------------------------------------------

@pytest.fixture
def fifo(tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    path = tmp_path / "model.fifo"
    os.mkfifo(path)
    return path


def test_run_refuses_a_fifo(fifo, cli, make_model):
    proc = cli("run", fifo, timeout=20)
    assert proc.returncode == 1 and b"not a regular file" in proc.stderr
    m = make_model(MHA, version=1, seed=6)
    proc = cli("run", m.path, "-z", fifo, timeout=20)
    assert proc.returncode == 1 and b"not a regular file" in proc.stderr


@pytest.mark.parametrize("call", ["llama2c.Llama(path)", "llama2c.Tokenizer(path)"])
def test_python_refuses_a_fifo(fifo, call):
    proc = run_python(f"""
        import llama2c
        path = {str(fifo)!r}
        try:
            {call}
        except llama2c.Llama2IOError as e:
            print("refused:", e)
    """, timeout=20)
    assert proc.returncode == 0, proc.stderr
    assert "not a regular file" in proc.stdout


def test_directories_are_refused(tmp_path):
    with pytest.raises(llama2c.Llama2IOError, match="not a regular file"):
        llama2c.Llama(tmp_path)
    with pytest.raises(llama2c.Llama2IOError, match="not a regular file"):
        llama2c.Tokenizer(tmp_path)


# ---------------------------------------------------------------------------
# 4. integers past 32 bits, thread counts, NUL bytes in paths
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mha(make_model):
    m = make_model(MHA, version=1, seed=6)
    return llama2c.Llama(m.path, tokenizer=m.tokenizer)


@pytest.mark.parametrize("kwargs", [dict(steps=2**31), dict(top_k=2**31), dict(steps=-1), dict(top_k=-2**40),
                                    dict(temperature=10**400), dict(steps=1.5), dict(min_p=2.0),
                                    dict(seed=float("nan")), dict(seed="7")])
def test_out_of_range_settings(mha, kwargs):
    with pytest.raises(llama2c.InvalidArgumentError):
        mha.generate("a", **kwargs)
    with pytest.raises(llama2c.InvalidArgumentError):
        list(mha.stream("a", **kwargs))


@pytest.mark.parametrize("token,pos", [(1, 2**31), (2**31, 0), (-2**63, 0), (1, -1), (1, 2**64)])
def test_out_of_range_forward(mha, token, pos):
    with pytest.raises(llama2c.InvalidArgumentError):
        mha.forward(token, pos)
    with pytest.raises(llama2c.InvalidArgumentError):
        mha.forward_batch([1, token], pos)


def test_batch_positions_near_int_max(mha):
    # the old message computed pos + n - 1 in int: signed overflow (UBSan)
    with pytest.raises(llama2c.InvalidArgumentError, match="do not fit"):
        mha.forward_batch([1, 2, 3], 2**31 - 2)


def test_tokenizer_and_sampler_ints(mha):
    tk = mha.tokenizer
    for bad in (2**31, -2**40):
        with pytest.raises(llama2c.InvalidArgumentError):
            tk.piece(bad)
        with pytest.raises(llama2c.InvalidArgumentError):
            tk.decode([bad])
    with pytest.raises(llama2c.InvalidArgumentError):
        llama2c.Tokenizer(mha._tokenizer_path, vocab_size=2**31)
    with pytest.raises(llama2c.InvalidArgumentError):
        llama2c.Sampler(2**31)
    with pytest.raises(llama2c.InvalidArgumentError):
        llama2c.Sampler(10, repetition_window=2**31)


def test_thread_count_is_capped(make_model):
    m = make_model(MHA, version=1, seed=6)
    before = threading.active_count()
    llama = llama2c.Llama(m.path, n_threads=1000)
    llama.forward(1, 0)
    tasks = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 0
    assert tasks <= 256 + 16 + before, f"{tasks} threads after n_threads=1000"
    with pytest.raises(llama2c.InvalidArgumentError):
        llama2c.Llama(m.path, n_threads=0)
    with pytest.raises(llama2c.InvalidArgumentError):
        llama2c.Llama(m.path, n_threads=2**31)


def test_nul_bytes_in_paths_are_refused(make_model, tmp_path):
    m = make_model(MHA, version=1, seed=6)
    with pytest.raises(llama2c.InvalidArgumentError, match="NUL"):
        llama2c.Llama(str(m.path) + "\0ignored")
    with pytest.raises(llama2c.InvalidArgumentError, match="NUL"):
        llama2c.Tokenizer(str(m.tokenizer) + "\0x")
    with pytest.raises(llama2c.InvalidArgumentError, match="NUL"):
        llama2c.Llama(m.path, tokenizer=str(m.tokenizer) + "\0x")


@pytest.mark.parametrize("args", [["-n", "2147483648"], ["-k", "2147483648"], ["--threads", "99999999999"],
                                  ["--seed", "99999999999999999999999"], ["-n", "-5"], ["--ctx", "-1"]])
def test_cli_big_numbers_are_one_line(make_model, args):
    m = make_model(MHA, version=1, seed=6)
    proc = llama2c_cli("generate", "x", "--model", m.path, "--tokenizer", m.tokenizer, "-n", "4", *args)
    if args[0] == "--seed":  # any seed is fine: it is reduced to 64 bits
        assert proc.returncode == 0, proc.stderr
        return
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


# ---------------------------------------------------------------------------
# 5. non-finite weights: refused at load, never undefined behaviour
# ---------------------------------------------------------------------------

def poisoned(name: str, value: float, cfg: R.Config = MHA, index=(0, 1)) -> dict:
    w = {k: v.copy() for k, v in R.random_weights(cfg, 9).items()}
    w[name][index] = value
    return w


@pytest.mark.parametrize("version", [0, 1, 3, 4])
@pytest.mark.parametrize("name,value,where", [("wq", np.nan, "wq of layer 0"), ("w2", np.inf, "w2 of layer 0"),
                                              ("rms_final", -np.inf, "rms_final"),
                                              ("token_embedding", np.nan, "embedding")])
def test_non_finite_weights_are_a_format_error(tmp_path, version, name, value, where):
    index = (1,) if name == "rms_final" else (0, 1)
    w = poisoned(name, value, index=index)
    path = R.write_model(tmp_path / "nan.bin", MHA, w, version)
    with pytest.raises(llama2c.FormatError, match=where):
        llama2c.Llama(path)
    if version != 4:
        with pytest.raises(llama2c.FormatError, match="NaN or infinite"):
            llama2c.Llama(path, quantize=True)


def test_non_finite_q8_scale_is_a_format_error(tmp_path, cli, make_model):
    w = R.random_weights(MHA, 9)
    path = R.write_model(tmp_path / "q8.bin", MHA, w, 2)
    data = bytearray(path.read_bytes())
    gs = R.default_group_size(MHA.dim)
    d, L = MHA.dim, MHA.n_layers
    # header, norms, then the embedding's int8 values and its scales
    scales_at = 256 + 4 * (2 * L * d + d) + MHA.vocab_size * d
    struct.pack_into("<f", data, scales_at + 4 * 3, float("inf"))
    path.write_bytes(bytes(data))
    with pytest.raises(llama2c.FormatError, match="NaN or infinite"):
        llama2c.Llama(path)
    proc = cli("run", path, "-z", make_model.tokenizer(MHA.vocab_size))
    assert proc.returncode == 1 and b"NaN or infinite" in proc.stderr
    assert gs > 0


def test_runq_refuses_nan_weights(tmp_path, cli, make_model):
    path = R.write_model(tmp_path / "nan.bin", MHA, poisoned("w1", np.nan), 1)
    proc = cli("runq", path, "-z", make_model.tokenizer(MHA.vocab_size), "-n", "4")
    assert proc.returncode == 1 and b"w1 of layer 0" in proc.stderr


def test_huge_finite_weights_do_not_overflow_the_int8_path(tmp_path, make_model):
    # finite weights whose products overflow to inf / NaN in the activations:
    # the int8 activation quantizer must carry NaN on, not convert it to int
    w = R.random_weights(MHA, 9)
    w["wo"][:] = 3e38
    w["w1"][:] = -3e38
    path = R.write_model(tmp_path / "huge.bin", MHA, w, 1)
    llama = llama2c.Llama(path, quantize=True)
    logits = llama.forward(5, 0)
    assert logits.shape == (MHA.vocab_size,)


# ---------------------------------------------------------------------------
# 6. every conversation and every generate() has a KV cache of its own
# ---------------------------------------------------------------------------

LONG_GQA = R.Config(dim=32, hidden_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=384, seq_len=256)


def test_chat_session_is_not_disturbed_between_turns(make_model):
    m = make_model(LONG_GQA, version=1, seed=12)
    llama = llama2c.Llama(m.path, tokenizer=m.tokenizer)
    greedy = dict(temperature=0.0, steps=6)

    quiet = llama.chat_session()
    first = quiet.send("hello there", **greedy)
    second = quiet.send("tell me more", **greedy)

    busy = llama.chat_session()
    assert busy.send("hello there", **greedy) == first
    llama.generate("Once upon a time there was", steps=LONG_GQA.seq_len, temperature=0)  # fills a whole cache
    other = llama.chat_session()
    other.send("something else entirely, at length", **greedy)
    llama.forward_batch([1, 7, 8, 9, 10, 11], 0)
    assert busy.send("tell me more", **greedy) == second


def test_forward_sequence_survives_generate_in_another_thread(make_model):
    m = make_model(GQA, version=1, seed=13)
    llama = llama2c.Llama(m.path, tokenizer=m.tokenizer)
    tokens = [1, 40, 41, 42, 43, 44, 45, 46, 47, 48]
    ref = R.forward(GQA, m.w, tokens)
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            llama.generate("lots of other text", steps=GQA.seq_len, temperature=0)

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        for _ in range(3):
            for pos, t in enumerate(tokens):
                logits = llama.forward(t, pos)
                assert np.max(np.abs(logits - ref[pos])) < 1e-3, f"position {pos}"
    finally:
        stop.set()
        worker.join()


def test_contexts_are_independent(make_model):
    m = make_model(GQA, version=1, seed=14)
    llama = llama2c.Llama(m.path)
    a, b = llama.create_context(), llama.create_context(n_ctx=12)
    assert b.n_ctx == 12
    seq_a, seq_b = [1, 50, 60, 70], [1, 99, 98, 97]
    for pos in range(4):
        la = a.forward(seq_a[pos], pos)
        lb = b.forward(seq_b[pos], pos)
    np.testing.assert_array_equal(la, llama.create_context().forward_batch(seq_a, 0))
    np.testing.assert_array_equal(lb, llama.create_context().forward_batch(seq_b, 0))


def test_python_readers_refuse_a_fifo(fifo, tmp_path):
    proc = run_python(f"""
        from llama2c.export.sources import open_source
        from llama2c.gguf_export import read_model
        import llama2c
        for call in (lambda: open_source("bin", {str(fifo)!r}), lambda: read_model({str(fifo)!r})):
            try:
                call()
            except llama2c.Llama2IOError as e:
                print("refused:", e)
    """, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("not a regular file") == 2
    proc = llama2c_cli("export", tmp_path / "out.bin", "--version", "1", "--bin", fifo, timeout=30)
    assert proc.returncode == 1 and "not a regular file" in proc.stderr


def test_sessions_generate_on_their_own_contexts(make_model):
    m = make_model(LONG_GQA, version=1, seed=15)
    llama = llama2c.Llama(m.path, tokenizer=m.tokenizer)
    expected = llama.generate("Once upon", steps=40, temperature=0)
    session = llama.session(n_ctx=64)
    assert session.n_ctx == 64
    it = session.stream("Once upon", steps=40, temperature=0)
    first = next(it)
    with pytest.raises(llama2c.StateError, match="busy"):
        session.forward(1, 0)  # would overwrite the cache under the unfinished stream
    assert llama.generate("Once upon", steps=40, temperature=0) == expected  # another context
    assert first + "".join(it) == expected
    assert session.generate("Once upon", steps=40, temperature=0) == expected


def test_two_chat_sessions_in_two_threads(make_model):
    m = make_model(LONG_GQA, version=1, seed=16)
    llama = llama2c.Llama(m.path, tokenizer=m.tokenizer)
    turns = {"a": ["hello there", "and then?"], "b": ["what is a cat", "why", "tell me more"]}

    def talk(name):
        session = llama.chat_session(system=f"You are {name}.")
        return [session.send(t, temperature=0.0, steps=8) for t in turns[name]]

    one_after_other = {name: talk(name) for name in turns}
    results = {}
    threads = [threading.Thread(target=lambda n=n: results.__setitem__(n, talk(n))) for n in turns for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == one_after_other


def test_sampling_params_one_object_everywhere(make_model):
    m = make_model(LONG_GQA, version=1, seed=17)
    llama = llama2c.Llama(m.path, tokenizer=m.tokenizer)
    params = llama2c.SamplingParams(temperature=0.7, topp=0.8, seed=42, top_k=20)
    assert llama.generate("Once", steps=20, sampling=params) == llama.generate(
        "Once", steps=20, temperature=0.7, topp=0.8, seed=42, top_k=20)
    # keywords override the object's fields
    assert llama.generate("Once", steps=20, sampling=params, temperature=0) == llama.generate(
        "Once", steps=20, seed=42, topp=0.8, top_k=20, temperature=0)
    assert llama.chat("hi", steps=6, sampling=params) == llama.chat_session().send("hi", steps=6, sampling=params)
    with pytest.raises(llama2c.InvalidArgumentError):
        llama2c.SamplingParams(top_k=2**31)
    with pytest.raises(llama2c.InvalidArgumentError):
        llama2c.SamplingParams(repetition_window=0)
    with pytest.raises(TypeError, match="tempurature"):
        llama.generate("Once", tempurature=0.5)


def test_a_turn_that_does_not_fit_leaves_the_conversation_usable(make_model):
    cfg = R.Config(dim=32, hidden_dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=384, seq_len=64)
    m = make_model(cfg, version=1, seed=18)
    llama = llama2c.Llama(m.path, tokenizer=m.tokenizer)
    s = llama.chat_session()
    s.send("hi", temperature=0.0, steps=4)
    pos = s.pos
    with pytest.raises(llama2c.InvalidArgumentError, match="do not fit"):
        s.send("a very long message " * 20, temperature=0.0)
    assert s.pos == pos
    again = llama.chat_session()
    again.send("hi", temperature=0.0, steps=4)
    assert s.send("ok", temperature=0.0, steps=4) == again.send("ok", temperature=0.0, steps=4)
    assert s.pos == again.pos


def test_abandoned_reply_is_cut_where_it_is(make_model):
    m = make_model(LONG_GQA, version=1, seed=19)
    llama = llama2c.Llama(m.path, tokenizer=m.tokenizer)
    s = llama.chat_session()
    it = s.stream("tell me", temperature=0.0, steps=50)
    next(it)
    it.close()  # the reply so far stays in the context; the next turn follows it
    assert s.send("and?", temperature=0.0, steps=5) is not None


def test_logit_bias_in_the_c_sampler(make_model):
    m = make_model(LONG_GQA, version=1, seed=20)
    llama = llama2c.Llama(m.path, tokenizer=m.tokenizer)
    word = next(t for t in range(300, 384) if llama.tokenizer.piece(t).strip().isalpha())
    piece = llama.tokenizer.piece(word).decode()
    forced = llama.generate("Once", steps=8, temperature=0, logit_bias={word: 100.0})
    assert forced.endswith(piece * 4), (forced, piece)
    # greedy, then with its first generated token banned: the continuation changes
    params = llama2c.SamplingParams(temperature=0)
    session = llama.session()
    prompt = llama.tokenize("Once")
    first = int(np.argmax(session.forward_batch(prompt, 0)))
    plain = llama.generate("Once", steps=len(prompt) + 1, sampling=params)
    banned = llama.generate("Once", steps=len(prompt) + 1, sampling=params, logit_bias={first: float("-inf")})
    assert plain != banned
    with pytest.raises(llama2c.InvalidArgumentError):
        llama.generate("Once", steps=3, logit_bias={LONG_GQA.vocab_size: 1.0})
    with pytest.raises(llama2c.InvalidArgumentError):
        llama2c.SamplingParams(logit_bias={1: float("nan")})
    proc = llama2c_cli("generate", "Once", "--model", m.path, "--tokenizer", m.tokenizer, "-n", "4", "-t", "0",
                       "--logit-bias", "x=1")
    assert proc.returncode == 1 and "--logit-bias" in proc.stderr and proc.stderr.count("\n") == 1
    proc = llama2c_cli("generate", "Once", "--model", m.path, "--tokenizer", m.tokenizer, "--steps", "8", "-t", "0",
                       "--logit-bias", f"{word}=100")
    assert proc.returncode == 0 and proc.stdout.rstrip("\n") == forced, proc.stderr


def test_help_and_version(cli):
    proc = cli("run", "--help")
    assert proc.returncode == 0 and proc.stdout.startswith(b"usage: ") and not proc.stderr
    proc = cli("run")
    assert proc.returncode == 1 and proc.stderr.startswith(b"usage: ")  # llama2.c's behaviour without arguments
    proc = llama2c_cli("run", "--help")
    assert proc.returncode == 0 and "usage: " in proc.stdout
    proc = llama2c_cli("--version")
    assert proc.returncode == 0 and proc.stdout.startswith(f"llama2c {llama2c.__version__}")


def test_generate_prompt_from_stdin_and_chat_max_tokens(make_model):
    m = make_model(LONG_GQA, version=1, seed=22)
    args = ["--model", m.path, "--tokenizer", m.tokenizer, "-n", "12", "-t", "0"]
    piped = llama2c_cli("generate", "-", *args, input="Once upon")
    direct = llama2c_cli("generate", "Once upon", *args)
    assert piped.returncode == 0 and piped.stdout == direct.stdout
    llama = llama2c.Llama(m.path, tokenizer=m.tokenizer)
    reply = llama.chat_session().send("hi", temperature=0.0, steps=3)
    proc = llama2c_cli("chat", "--model", m.path, "--tokenizer", m.tokenizer, "-t", "0", "--max-tokens", "3",
                       input="hi\n")
    assert proc.returncode == 0 and proc.stdout.startswith(f"User: Assistant: {reply}\n"), proc.stdout
