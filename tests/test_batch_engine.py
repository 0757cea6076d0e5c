"""Continuous batching: llama2_decode_batch (several sequences, one pass,
each row bit-identical to its own single-token pass) and the server's
BatchEngine built on it (results independent of what else runs, chunked
prefill, cancellation, a bounded queue)."""
from __future__ import annotations

import os
import platform
import sys
import threading
import time

import numpy as np
import pytest

import llama2c
import reference as R
from llama2c import openai_api
from llama2c._ffi import ffi, lib
from llama2c.sampler import SamplingParams
from llama2c.errors import new_error, raise_for
from llama2c.server.engine import ENDED, BatchEngine, QueueFull

CFG = R.Config(dim=64, hidden_dim=172, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=384, seq_len=128)
PROMPTS = ["hello there", "a b a b a", "one", "the quick brown fox jumps over", "x y", "more words here please"]


def decode_batch(contexts, tokens, positions, vocab):
    out = np.empty((len(tokens), vocab), np.float32)
    err = new_error()
    raise_for(lib.llama2_decode_batch(ffi.new("llama2_context *[]", [c._ptr for c in contexts]),
                                      ffi.new("int[]", tokens), ffi.new("int[]", positions), len(tokens),
                                      ffi.from_buffer("float[]", out), err), err)
    return out


@pytest.mark.parametrize("version,quantize", [(1, False), (4, False), (2, False), (1, True)])
def test_decode_batch_rows_are_bit_identical_to_single_passes(make_model, version, quantize):
    m = make_model(CFG, version=version, seed=31)
    llm = llama2c.Llama(m.path, tokenizer=m.tokenizer, quantize=quantize)
    rng = np.random.default_rng(5)
    prompts = [[1] + [int(t) for t in rng.integers(3, CFG.vocab_size, n)] for n in (3, 9, 1, 17, 5)]
    batch = [llm.create_context() for _ in prompts]
    alone = [llm.create_context() for _ in prompts]
    seqs = [list(p) for p in prompts]
    for b, a, p in zip(batch, alone, prompts):
        if len(p) > 1:
            b.forward_batch(p[:-1], 0)
            a.forward_batch(p[:-1], 0)
    for _ in range(12):
        rows = decode_batch(batch, [s[-1] for s in seqs], [len(s) - 1 for s in seqs], CFG.vocab_size)
        for i, (a, s) in enumerate(zip(alone, seqs)):
            ref = a.forward(s[-1], len(s) - 1)
            assert np.array_equal(rows[i], ref), (i, len(s))
            s.append(int(np.argmax(ref)))


def test_decode_batch_refuses_bad_rows(make_model):
    m = make_model(CFG, version=1, seed=32)
    llm = llama2c.Llama(m.path, tokenizer=m.tokenizer)
    other = llama2c.Llama(m.path, tokenizer=m.tokenizer)
    a, b = llm.create_context(), llm.create_context()
    short = llm.create_context(n_ctx=16)
    cases = [([a, b], [1, 1], [0, CFG.seq_len], "out of range"),
             ([a, other.create_context()], [1, 1], [0, 0], "another model"),
             ([short, a], [1, 1], [0, 0], "longer"),
             ([a, a], [1, 1], [3, 3], "increasing"),
             ([a, b], [1, CFG.vocab_size], [0, 0], "out of range")]
    for contexts, tokens, positions, words in cases:
        with pytest.raises(llama2c.InvalidArgumentError, match=words):
            decode_batch(contexts, tokens, positions, CFG.vocab_size)


@pytest.fixture(scope="module")
def llm(make_model):
    m = make_model(CFG, version=1, seed=33)
    return llama2c.Llama(m.path, tokenizer=m.tokenizer)


def concurrently(fn, args):
    out, errors = {}, []

    def one(i, a):
        try:
            out[i] = fn(a)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i, a)) for i, a in enumerate(args)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    return [out[i] for i in range(len(args))]


# prompt chunks in the decoding pass (fuse >= chunk) or in passes of their own (fuse 0)
@pytest.mark.parametrize("parallel,chunk,fuse", [(2, 4, 16), (4, 64, 16), (8, 1, 0), (4, 64, 0)])
def test_results_do_not_depend_on_what_else_runs(llm, parallel, chunk, fuse):
    engine = BatchEngine(llm, parallel=parallel, prefill_chunk=chunk, fuse_chunk=fuse)
    try:
        settings = [dict(prompt=p, max_tokens=20, temperature=0.0) for p in PROMPTS] + \
                   [dict(prompt=p, max_tokens=15, temperature=0.9, seed=7 + i, logprobs=2) for i, p in enumerate(PROMPTS)]
        alone = [llm.create_completion(**s)["choices"][0] for s in settings]
        together = concurrently(lambda s: openai_api.create_completion(llm, runner=engine.run, **s)["choices"][0],
                                settings)
        for a, b in zip(alone, together):
            assert a["text"] == b["text"] and a["finish_reason"] == b["finish_reason"]
            assert a["logprobs"] == b["logprobs"]
        assert engine.stats()["active"] == 0
    finally:
        engine.close()


LONG = R.Config(dim=16, hidden_dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=300, seq_len=4096)


@pytest.fixture(scope="module")
def long_llm(make_model):
    """A model whose generations last a while (thousands of positions)."""
    m = make_model(LONG, version=1, seed=34)
    return llama2c.Llama(m.path, tokenizer=m.tokenizer)


def test_streams_cancel_and_free_their_slots(long_llm):
    llm, long = long_llm, LONG
    engine = BatchEngine(llm, parallel=2)
    try:
        it = openai_api.create_completion(llm, "hello", max_tokens=None, temperature=0.0, stream=True,
                                          logit_bias={1: -1e9, 2: -1e9}, runner=engine.run)
        next(it)
        it.close()
        deadline = time.time() + 5
        while engine.stats()["active"] and time.time() < deadline:
            time.sleep(0.01)
        assert engine.stats()["active"] == 0
        # it stopped where it was, long before the end of the context
        assert max(len(s.cached) for s in engine._slots) < long.seq_len - 100
        # a request never read and dropped is cancelled too
        steps = engine.run(llm.tokenize("x"), max_tokens=None, sampling=llama2c.SamplingParams(temperature=0.0),
                           stop_tokens=())
        del steps
        deadline = time.time() + 5
        while (engine.stats()["active"] or engine.stats()["waiting"]) and time.time() < deadline:
            time.sleep(0.01)
        assert engine.stats() == {"parallel": 2, "active": 0, "waiting": 0}
        assert max(len(s.cached) for s in engine._slots) < long.seq_len - 100
    finally:
        engine.close()


def test_a_full_queue_refuses_at_once(long_llm):
    llm = long_llm
    engine = BatchEngine(llm, parallel=1, max_waiting=1)
    sampling = llama2c.SamplingParams(temperature=0.0)
    try:
        first = engine.run(llm.tokenize("a"), max_tokens=None, sampling=sampling, stop_tokens=())
        next(first)
        second = engine.run(llm.tokenize("b"), max_tokens=5, sampling=sampling)
        with pytest.raises(QueueFull):
            engine.run(llm.tokenize("c"), max_tokens=5, sampling=sampling)
        first.close()
        assert sum(1 for s in second if s.token is not None) <= 5
    finally:
        engine.close()


def test_bad_settings_raise_when_queued(llm):
    engine = BatchEngine(llm, parallel=1)
    try:
        with pytest.raises(llama2c.InvalidArgumentError):
            engine.run([], max_tokens=5, sampling=llama2c.SamplingParams())
        assert engine.stats()["waiting"] == 0
    finally:
        engine.close()


def test_cancel_from_another_thread_while_waiting_for_a_slot(long_llm):
    llm = long_llm
    engine = BatchEngine(llm, parallel=1)
    sampling = llama2c.SamplingParams(temperature=0.0)
    try:
        first = engine.run(llm.tokenize("a"), max_tokens=None, sampling=sampling, stop_tokens=())
        next(first)
        queued = engine.run(llm.tokenize("b"), max_tokens=5, sampling=sampling)
        got = []
        reader = threading.Thread(target=lambda: got.extend(queued))
        reader.start()
        time.sleep(0.05)
        assert engine.stats()["waiting"] == 1
        queued.cancel()  # from this thread, while the reader waits in next()
        reader.join(timeout=5)
        assert not reader.is_alive() and got == []
        assert engine.stats()["waiting"] == 0
        first.cancel()
        rest = list(first)  # ends soon after the cancel, far from the end of the context
        assert len(rest) < LONG.seq_len - 100
        deadline = time.time() + 5
        while engine.stats()["active"] and time.time() < deadline:
            time.sleep(0.01)
        assert engine.stats()["active"] == 0
    finally:
        engine.close()


class CountingWaker:
    """A waker shared by several requests (the server's Hub is one): counts its wake-ups."""

    def __init__(self):
        self.wakes = 0
        self.event = threading.Event()

    def wake(self) -> None:
        self.wakes += 1
        self.event.set()


def test_a_shared_waker_is_woken_once_per_step_for_all_requests(llm):
    """The server's path: requests queued with one waker; the engine wakes it
    once per turn whatever the number of requests, and take() hands out each
    request's steps without waiting, the same steps a thread iterating gets."""
    sampling = llama2c.SamplingParams(temperature=0.0)
    engine = BatchEngine(llm, parallel=4)
    try:
        ids = [llm.tokenize(p) for p in PROMPTS[:4]]
        want = [[(s.token, s.text, s.finish_reason) for s in engine.run(i, max_tokens=12, sampling=sampling)]
                for i in ids]
        waker = CountingWaker()
        pushed = [engine.run(i, waker=waker, max_tokens=12, sampling=sampling) for i in ids]
        with pytest.raises(TypeError, match="take"):
            next(pushed[0])  # pushed steps are taken, not waited for
        got, ends = [[] for _ in ids], [None] * len(ids)
        deadline = time.time() + 30
        while any(e is None for e in ends):
            assert time.time() < deadline, "the requests did not end"
            waker.event.wait(1)
            waker.event.clear()
            for k, steps in enumerate(pushed):
                new, end = steps.take()
                got[k] += [(s.token, s.text, s.finish_reason) for s in new]
                ends[k] = end
        assert got == want
        assert all(e is ENDED for e in ends)
        assert pushed[0].take() == ([], ENDED)  # the end stays
        n_steps = sum(len(g) for g in got)
        # 4 requests of 13 steps each in about 13 decoding turns (+ 4 prefills): never a wake-up per step
        assert waker.wakes <= n_steps // 2, (waker.wakes, n_steps)
        assert engine.stats()["active"] == 0
    finally:
        engine.close()


def test_a_failure_reaches_the_pushed_requests_after_their_steps(long_llm, monkeypatch):
    llm = long_llm
    sampling = llama2c.SamplingParams(temperature=0.0)
    engine = BatchEngine(llm, parallel=2)
    try:
        waker = CountingWaker()
        steps = engine.run(llm.tokenize("hello"), waker=waker, max_tokens=None, sampling=sampling, stop_tokens=())
        deadline = time.time() + 10
        first: list = []
        while len(first) < 3:
            assert time.time() < deadline
            waker.event.wait(1)
            waker.event.clear()
            first += steps.take()[0]

        def broken(*a):
            raise RuntimeError("decode failed")
        monkeypatch.setattr(engine, "_decode", broken)
        while True:
            assert time.time() < deadline
            waker.event.wait(1)
            waker.event.clear()
            new, end = steps.take()
            if end is not None:
                break
        assert isinstance(end, RuntimeError) and str(end) == "decode failed"
        assert engine.stats()["active"] == 0
    finally:
        monkeypatch.undo()
        engine.close()


def test_short_prompts_share_one_decoding_pass(llm):
    """A burst of short prompts rides along in one decoding pass (fuse_chunk
    tokens in all, taking turns), a long one gets a pass of its own."""
    from types import SimpleNamespace as NS

    engine = BatchEngine(llm, parallel=4, prefill_chunk=64, fuse_chunk=16)
    try:
        slots = [NS(request=NS(pending=list(range(n)))) for n in (5, 6, 9, 3)]
        chunks = engine._next_chunks(slots)
        assert [len(c) for _, c in chunks] == [6, 9, 1]          # the second slot's turn, then the next ones
        assert [s for s, _ in chunks] == slots[1:4]
        chunks = engine._next_chunks(slots)
        assert [len(c) for _, c in chunks] == [9, 3, 4]
        long = [NS(request=NS(pending=list(range(40)))), NS(request=NS(pending=[1, 2]))]
        engine._turn = -1
        chunks = engine._next_chunks(long)
        assert [len(c) for _, c in chunks] == [40]                # longer than fuse_chunk: alone
    finally:
        engine.close()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


BIG_KV = R.Config(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=300, seq_len=16384)


def test_reserving_commits_kv_memory_and_changes_nothing(make_model):
    """Context.reserve commits the KV cache of the first positions without
    touching what is there (the engine calls it beside running passes)."""
    m = make_model(BIG_KV, version=1, seed=5)
    llm = llama2c.Llama(m.path, tokenizer=m.tokenizer)
    ids = [1, 20, 31, 7, 99, 5]
    a, b = llm.create_context(), llm.create_context()
    want = [a.forward(t, i) for i, t in enumerate(ids)]
    b.forward(ids[0], 0)
    b.reserve(64)                                   # in the middle of a sequence
    got = [b.forward(ids[0], 0)] + [b.forward(t, i) for i, t in enumerate(ids[1:], 1)]
    assert all(np.array_equal(x, y) for x, y in zip(want, got))
    b.reserve(10 ** 9)                              # more than n_ctx: capped
    b.reserve(0)
    with pytest.raises(llama2c.Llama2Error, match="n_positions"):
        b.reserve(-1)
    release = tuple(int(x) for x in platform.release().split(".")[:2] if x.isdigit())
    if sys.platform != "linux" or release < (5, 14):
        pytest.skip("committing pages without writing them needs Linux 5.14 (MADV_POPULATE_WRITE)")
    c = llm.create_context()
    before = _rss_bytes()
    c.reserve(16384)                                # 2 layers x 16384 x 64 x (keys + values) x 4 bytes: 16 MiB
    grown = _rss_bytes() - before
    assert grown >= 12 << 20, f"RSS grew by {grown} bytes"


def test_the_engine_reserves_each_request_s_positions(long_llm):
    engine = BatchEngine(long_llm, parallel=2, reserve_at_start=0)
    try:
        assert all(s.reserved == 0 for s in engine._slots)
        steps = list(engine.run(long_llm.tokenizer.encode("hello", bos=True, eos=False), max_tokens=40,
                                sampling=SamplingParams(temperature=0.0)))
        assert steps and any(s.reserved >= 40 for s in engine._slots)
    finally:
        engine.close()


def test_the_engine_reserves_every_slot_s_first_positions_at_start(make_model):
    """Before any request, each slot's first positions get committed in the
    background (a first burst of requests would otherwise fault them in
    inside its first decoding steps)."""
    if sys.platform != "linux":
        pytest.skip("RSS is read from /proc")
    m = make_model(BIG_KV, version=1, seed=5)
    llm = llama2c.Llama(m.path, tokenizer=m.tokenizer)
    before = _rss_bytes()
    engine = BatchEngine(llm, parallel=2, reserve_at_start=4096)
    assert [s.reserved for s in engine._slots] == [4096, 4096]
    engine.close()  # the reserver finishes its queued work first
    grown = _rss_bytes() - before  # 2 slots x 2 layers x 4096 x 64 x (keys + values) x 4 bytes: 8 MiB
    release = tuple(int(x) for x in platform.release().split(".")[:2] if x.isdigit())
    if release < (5, 14):
        pytest.skip("committing pages without writing them needs Linux 5.14 (MADV_POPULATE_WRITE)")
    assert grown >= 6 << 20, f"RSS grew by {grown} bytes"
