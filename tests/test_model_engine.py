"""The KV-cached PyTorch engine (llama2c.model.Engine, Transformer.generate)
against the C engine and against the uncached loop: a batch of prompts of
different lengths (left or right padding), the sampler's settings, stop tokens,
contexts longer than max_seq_len, and CUDA when there is one. Also the fused
classifier + cross-entropy (linear_cross_entropy) against F.cross_entropy.
Speed is measured by bench/engine_speed.py, not here."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from helpers import GQA, MHA, MQA, random_tokens  # noqa: E402

import llama2c  # noqa: E402
from llama2c.model import (Engine, KVCache, ModelArgs, Transformer, linear_cross_entropy,  # noqa: E402
                           sample_next)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def c_greedy(path, prompt: list[int], n: int) -> list[int]:
    """The C engine's greedy continuation: the prompt in one pass, then one
    token at a time, argmax of the logits (the lowest index among equals)."""
    llama = llama2c.Llama(str(path))
    ctx = llama.create_context()
    logits = ctx.forward_batch(prompt, 0)
    out, pos = [], len(prompt)
    for _ in range(n):
        t = int(np.argmax(logits))
        out.append(t)
        if len(out) == n:
            break
        logits = ctx.forward(t, pos)
        pos += 1
    return out


CASES = {"gqa-shared": (GQA, True), "mha-untied": (MHA, False), "mqa-shared": (MQA, True)}


@pytest.mark.parametrize("case", list(CASES))
def test_cached_greedy_matches_the_c_engine(make_model, case):
    cfg, shared = CASES[case]
    m = make_model(cfg, version=1, shared=shared, seed=21)
    model = Transformer.from_bin(m.path).eval()
    prompts = [random_tokens(cfg, n, seed=n) for n in (1, 5, 11, 3)]
    n_new = cfg.seq_len - 12
    got = Engine(model).generate(prompts, n_new, temperature=0.0)
    for p, g in zip(prompts, got):
        assert g == c_greedy(m.path, p, n_new), (case, p)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_each_row_alone(make_model, side):
    m = make_model(GQA, version=1, seed=22)
    model = Transformer.from_bin(m.path).eval()
    prompts = [random_tokens(GQA, n, seed=40 + n) for n in (7, 2, 4)]
    T = max(len(p) for p in prompts)
    idx = torch.full((3, T), 99, dtype=torch.long)
    mask = torch.zeros((3, T), dtype=torch.long)
    for b, p in enumerate(prompts):
        sl = slice(T - len(p), T) if side == "left" else slice(0, len(p))
        idx[b, sl] = torch.tensor(p)
        mask[b, sl] = 1
    out = model.generate(idx, 9, temperature=0.0, attention_mask=mask, pad_id=0)
    assert out.shape == (3, T + 9)
    for b, p in enumerate(prompts):
        alone = model.generate(torch.tensor([p]), 9, temperature=0.0, use_cache=False)[0].tolist()
        if side == "left":
            assert out[b, T:].tolist() == alone[len(p):]
            assert torch.equal(out[b, :T], idx[b])
        else:
            assert out[b, :len(p) + 9].tolist() == alone
            assert out[b, len(p) + 9:].tolist() == [0] * (T - len(p))


def test_cached_logits_equal_the_full_forward(make_model):
    """Prefill + one-token steps give the logits of the whole sequence at once."""
    m = make_model(MQA, version=1, seed=23)
    model = Transformer.from_bin(m.path).eval()
    seqs = [random_tokens(MQA, 20, seed=1), random_tokens(MQA, 20, seed=2)]
    with torch.no_grad():
        full = model(torch.tensor(seqs))
        cache = KVCache(model.params, 2, 20, pad=[0, 6])
        # row 1 starts as a 6-token-shorter (left-padded) prompt
        first = torch.tensor([seqs[0][:12], [0] * 6 + seqs[1][:6]])
        h = model.hidden_states(first, cache)
        np.testing.assert_allclose(model.output(h[0]).numpy(), full[0, :12].numpy(), atol=2e-5)
        np.testing.assert_allclose(model.output(h[1, 6:]).numpy(), full[1, :6].numpy(), atol=2e-5)
        for i in range(4):
            tok = torch.tensor([[seqs[0][12 + i]], [seqs[1][6 + i]]])
            step = model.output(model.hidden_states(tok, cache)[:, -1])
            np.testing.assert_allclose(step[0].numpy(), full[0, 12 + i].numpy(), atol=2e-5)
            np.testing.assert_allclose(step[1].numpy(), full[1, 6 + i].numpy(), atol=2e-5)
        with pytest.raises(ValueError, match="KV cache"):
            model.hidden_states(torch.zeros((2, 5), dtype=torch.long), cache)


@pytest.mark.parametrize("cfg", [GQA, MQA], ids=["gqa", "mqa"])
def test_decoder_steps_equal_the_full_forward(make_model, cfg):
    """The lean one-token steps (_Decoder, what Engine runs) give the logits of
    the whole sequence at once, with and without left padding."""
    from llama2c.model import _Decoder

    m = make_model(cfg, version=1, seed=28)
    model = Transformer.from_bin(m.path).eval()
    assert _Decoder.usable(model)
    seqs = [random_tokens(cfg, 16, seed=3), random_tokens(cfg, 16, seed=4)]
    with torch.inference_mode():
        full = model(torch.tensor(seqs))
        for pad in ([0, 0], [0, 5]):
            cache = KVCache(model.params, 2, 16, pad=pad)
            first = torch.tensor([[0] * pad[b] + seqs[b][:8 - pad[b]] for b in range(2)])
            model.hidden_states(first, cache)
            dec = _Decoder(model)
            for i in range(8 - pad[1] - 1):
                tok = torch.tensor([seqs[0][8 + i], seqs[1][8 - pad[1] + i]])
                step = dec.step(tok, cache)
                np.testing.assert_allclose(step[0].numpy(), full[0, 8 + i].numpy(), atol=2e-5)
                np.testing.assert_allclose(step[1].numpy(), full[1, 8 - pad[1] + i].numpy(), atol=2e-5)


def test_models_the_decoder_does_not_run_still_generate(make_model):
    """A wrapped linear (as LoRA's), dropout in training mode or bfloat16
    weights take the modules' forward pass, with the same tokens."""
    from llama2c.model import _Decoder

    m = make_model(GQA, version=1, seed=29)
    model = Transformer.from_bin(m.path).eval()
    prompts = [random_tokens(GQA, 4, seed=9)]
    want = Engine(model).generate(prompts, 8, temperature=0.0)

    class Wrapped(torch.nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base = base

        def forward(self, x):
            return self.base(x)

    attn = model.layers[1].attention
    attn.wv = Wrapped(attn.wv)
    assert not _Decoder.usable(model)
    assert Engine(model).generate(prompts, 8, temperature=0.0) == want
    attn.wv = attn.wv.base
    assert _Decoder.usable(model)
    model.params.dropout = 0.1
    assert not _Decoder.usable(model.train()) and _Decoder.usable(model.eval())
    model.params.dropout = 0.0
    assert not _Decoder.usable(model.to(torch.bfloat16))


def test_step_threads_pick_the_faster_count():
    from llama2c.model import _StepThreads

    def run(cost, steps=300, n=2):
        """(thread counts used, total seconds) with step times cost(i)[count]."""
        st, used, total = _StepThreads(n), [], 0.0
        for i in range(steps):
            c = st.next()
            used.append(c)
            st.record(c, cost(i)[c])
            total += cost(i)[c]
        return used, total

    quiet = {2: 0.002, 1: 0.0035}        # two threads win
    busy = {2: 0.2, 1: 0.004}            # other jobs stall every 2-thread step
    used, total = run(lambda i: quiet)
    assert set(used[:2]) == {1, 2} and used[-1] == 2
    assert 3 <= used.count(1) <= 10                     # one thread retried now and then
    assert total <= 300 * quiet[2] * (1 + 1.5 / _StepThreads.RATIO)
    used, total = run(lambda i: busy)
    assert used.count(2) == 1 and total <= 300 * busy[1] + busy[2]
    # the load arrives: two slow steps and the engine moves to one thread
    used, _ = run(lambda i: quiet if i < 100 else busy)
    assert used[90:100].count(2) >= 9 and used[103:].count(2) == 0
    # the load leaves: a retry finds two threads faster again
    used, _ = run(lambda i: {2: 0.02, 1: 0.004} if i < 10 else quiet, steps=400)
    assert used[:10].count(2) == 1 and used[-50:].count(2) >= 48


def test_adaptive_threads_keep_the_tokens_and_torch_setting(make_model):
    m = make_model(MHA, version=1, seed=30)
    model = Transformer.from_bin(m.path).eval()
    prompt = [random_tokens(MHA, 3, seed=11)]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fixed = Engine(model, adaptive_threads=False).generate(prompt, 40, temperature=0.0)
        adaptive = Engine(model).generate(prompt, 40, temperature=0.0)
        assert torch.get_num_threads() == 2
        assert adaptive == fixed == model.generate(torch.tensor(prompt), 40, temperature=0.0,
                                                   use_cache=False)[:, 3:].tolist()
    finally:
        torch.set_num_threads(before)


def test_past_max_seq_len_crops_like_the_uncached_loop(make_model):
    m = make_model(MQA, version=1, seed=24)
    model = Transformer.from_bin(m.path).eval()
    start = torch.tensor([random_tokens(MQA, MQA.seq_len - 5, seed=3)])
    cached = model.generate(start, 12, temperature=0.0)
    plain = model.generate(start, 12, temperature=0.0, use_cache=False)
    assert cached.shape == (1, MQA.seq_len + 7)
    assert torch.equal(cached, plain)


def test_sampling_settings(make_model):
    m = make_model(GQA, version=1, seed=25)
    model = Transformer.from_bin(m.path).eval()
    engine = Engine(model)
    prompts = [[1, 5, 9], [1]]
    greedy = engine.generate(prompts, 10, temperature=0.0)
    # top_k=1, a tiny top_p, or min_p=1 leave only the most likely token
    for kw in (dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)):
        assert engine.generate(prompts, 10, temperature=1.3, **kw) == greedy, kw
    # a generator makes sampling reproducible; tokens stay in the vocabulary
    a = engine.generate(prompts, 12, temperature=1.0, top_k=20, top_p=0.9,
                        generator=torch.Generator().manual_seed(5))
    b = engine.generate(prompts, 12, temperature=1.0, top_k=20, top_p=0.9,
                        generator=torch.Generator().manual_seed(5))
    assert a == b and all(0 <= t < GQA.vocab_size for row in a for t in row)
    # the cached and uncached loops draw the same tokens from the same generator
    c = engine.generate(prompts, 12, temperature=1.0, top_p=0.8, use_cache=False,
                        generator=torch.Generator().manual_seed(5))
    d = engine.generate(prompts, 12, temperature=1.0, top_p=0.8,
                        generator=torch.Generator().manual_seed(5))
    assert c == d


def test_sample_next_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, top_p=0.7, generator=g)) for _ in range(200)}
    assert draws == {0, 1}                        # 0.5 < 0.7, 0.5 + 0.3 exceeds it
    draws = {int(sample_next(logits, 1.0, top_k=3, generator=g)) for _ in range(300)}
    assert draws == {0, 1, 2}
    draws = {int(sample_next(logits, 1.0, min_p=0.5, generator=g)) for _ in range(200)}
    assert draws == {0, 1}                        # p >= 0.25
    assert int(sample_next(torch.tensor([[1.0, 3.0, 3.0]]), 0.0)) == 1     # first maximum


def test_stop_tokens_and_errors(make_model):
    m = make_model(GQA, version=1, seed=26)
    model = Transformer.from_bin(m.path).eval()
    engine = Engine(model)
    full = engine.generate([[1, 7]], 12, temperature=0.0)[0]
    stop = full[4]
    first = full.index(stop)
    assert engine.generate([[1, 7]], 12, temperature=0.0, stop_tokens=[stop])[0] == full[:first + 1]
    out = model.generate(torch.tensor([[1, 7]]), 12, temperature=0.0, stop_tokens=[stop], pad_id=0)
    assert out[0, 2:3 + first].tolist() == full[:first + 1] and not out[0, 3 + first:].any()
    with pytest.raises(ValueError, match="at least one token"):
        engine.generate([[1], []], 3)
    with pytest.raises(ValueError, match="vocabulary"):
        engine.generate([[GQA.vocab_size]], 3)
    with pytest.raises(ValueError, match="same side"):
        model.generate(torch.ones((1, 4), dtype=torch.long), 2,
                       attention_mask=torch.tensor([[1, 0, 1, 1]]))
    assert engine.generate([[1]], 0) == [[]]


@pytest.mark.parametrize("device", DEVICES)
def test_runs_on_every_device(make_model, device):
    m = make_model(GQA, version=1, seed=27)
    model = Transformer.from_bin(m.path, device=device).eval()
    prompts = [random_tokens(GQA, n, seed=n) for n in (3, 8)]
    got = Engine(model).generate(prompts, 10, temperature=0.0)
    cpu = Engine(Transformer.from_bin(m.path).eval()).generate(prompts, 10, temperature=0.0)
    assert got == cpu
    sampled = model.generate(torch.tensor([prompts[1]], device=device), 5, temperature=0.8, top_p=0.9)
    assert sampled.device.type == device and sampled.shape == (1, 13)


# ---------------------------------------------------------------------------
# the fused classifier + cross-entropy
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_cross_entropy_matches_f_cross_entropy(dtype, reduction, monkeypatch):
    import llama2c.model as M

    monkeypatch.setattr(M, "CE_CHUNK_ELEMENTS", 7 * 300)        # several chunks, a ragged last one
    monkeypatch.setattr(M, "CE_CHUNK_ELEMENTS_LOW", 5 * 300)
    g = torch.Generator().manual_seed(0)
    N, d, V = 33, 16, 300
    h0, w0 = torch.randn(N, d, generator=g), torch.randn(V, d, generator=g) * 0.3
    t = torch.randint(0, V, (N,), generator=g)
    t[[0, 5, 6]] = -100
    dt = getattr(torch, dtype)

    def run(fn, with_logits):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dt, enabled=dt != torch.float32):
            loss, logits = fn(h, w)
        total = loss * 0.7 + ((logits.float() ** 2).mean() if with_logits else 0)
        total.backward()
        return loss.detach(), logits, h.grad, w.grad

    def ref(h, w):
        lg = F.linear(h, w)
        return F.cross_entropy(lg.float(), t, ignore_index=-100, reduction=reduction), lg

    def fused(with_logits):
        return lambda h, w: linear_cross_entropy(h, w, t, ignore_index=-100, reduction=reduction,
                                                 return_logits=with_logits)

    tol = dict(rtol=1e-5, atol=1e-6) if dt == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    for with_logits in (False, True):
        a = run(ref, with_logits)
        b = run(fused(with_logits), with_logits)
        torch.testing.assert_close(b[0], a[0], **tol)
        torch.testing.assert_close(b[2], a[2], **tol)
        torch.testing.assert_close(b[3], a[3], **tol)
        if with_logits:
            assert b[1].dtype == a[1].dtype
            torch.testing.assert_close(b[1].float(), a[1].float(), **tol)
        else:
            assert b[1] is None
    # without gradients: the same loss, chunk by chunk
    with torch.no_grad():
        loss, _ = linear_cross_entropy(h0, w0, t, ignore_index=-100, reduction=reduction)
        torch.testing.assert_close(loss, F.cross_entropy(F.linear(h0, w0), t, ignore_index=-100,
                                                         reduction=reduction), rtol=1e-5, atol=1e-6)


def test_model_loss_and_frozen_weights():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=50, max_seq_len=8))
    x = torch.randint(0, 50, (3, 8))
    y = torch.randint(0, 50, (3, 8))
    y[0, :3] = -100
    want = F.cross_entropy(model(x).reshape(-1, 50), y.reshape(-1), ignore_index=-100, reduction="sum")
    got = model.loss(x, y, ignore_index=-100, reduction="sum")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # a frozen classifier (as under LoRA) gets no gradient; the rest still does
    model.tok_embeddings.weight.requires_grad_(False)
    model.loss(x, y, ignore_index=-100).backward()
    assert model.tok_embeddings.weight.grad is None
    assert model.layers[0].attention.wq.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros(2, dtype=torch.long),
                             reduction="none")


# ---------------------------------------------------------------------------
# the CPU settings the trainer takes from llama2c.model
# ---------------------------------------------------------------------------

def test_dtype_auto_on_a_cpu(monkeypatch):
    import llama2c.model as M
    from llama2c.train import TrainConfig
    from llama2c.train.trainer import Runtime, resolve_dtype

    assert isinstance(M.cpu_has_native_bf16(), bool)
    cpu = Runtime(device="cpu", device_type="cpu")
    monkeypatch.setattr(M, "cpu_has_native_bf16", lambda: True)
    assert resolve_dtype(TrainConfig(data="d"), cpu) == "bfloat16"
    assert resolve_dtype(TrainConfig(data="d", dtype="float32"), cpu) == "float32"
    monkeypatch.setattr(M, "cpu_has_native_bf16", lambda: False)
    assert resolve_dtype(TrainConfig(data="d"), cpu) == "float32"


def test_fused_adamw_on_request():
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=50, max_seq_len=8))
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu", fused=True)
    assert all(g.get("fused") for g in opt.param_groups)
    assert not model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu").param_groups[0].get("fused")
