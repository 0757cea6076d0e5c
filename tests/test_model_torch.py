"""The PyTorch model (llama2c/model.py) against the numpy reference model
(tests/reference.py, docs/FORWARD.md) and llama2.c's behaviour.

Also holds the small converters other PyTorch tests import:
ref_args / ref_state_dict (reference weights -> ModelArgs / state_dict) and
torch_logits."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import reference as R  # noqa: E402
from helpers import GQA, MHA, MQA, STORIES, assert_f32_close, random_tokens  # noqa: E402

from llama2c.model import ModelArgs, Transformer, ffn_hidden_dim  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # the machine's cores are shared: torch's spinning worker threads slow
    # tiny models down by 20x under contention
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------
# converters shared with test_export.py
# ---------------------------------------------------------------------------


def ref_args(cfg: R.Config, shared: bool = True, **kw) -> ModelArgs:
    return ModelArgs(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                     n_kv_heads=cfg.n_kv_heads, vocab_size=cfg.vocab_size, hidden_dim=cfg.hidden_dim,
                     max_seq_len=cfg.seq_len, rope_theta=cfg.rope_theta, norm_eps=cfg.norm_eps,
                     tie_embeddings=shared, **kw)


def ref_state_dict(cfg: R.Config, w: dict) -> dict:
    """reference.py weights -> llama2c.model state_dict (torch float32)."""
    t = lambda a: torch.from_numpy(np.array(a, dtype=np.float32))  # noqa: E731
    sd = {"tok_embeddings.weight": t(w["token_embedding"]), "norm.weight": t(w["rms_final"])}
    names = {"wq": "attention.wq", "wk": "attention.wk", "wv": "attention.wv", "wo": "attention.wo",
             "w1": "feed_forward.w1", "w2": "feed_forward.w2", "w3": "feed_forward.w3"}
    for i in range(cfg.n_layers):
        sd[f"layers.{i}.attention_norm.weight"] = t(w["rms_att"][i])
        sd[f"layers.{i}.ffn_norm.weight"] = t(w["rms_ffn"][i])
        for k, v in names.items():
            sd[f"layers.{i}.{v}.weight"] = t(w[k][i])
    if "wcls" in w:
        sd["output.weight"] = t(w["wcls"])
    return sd


def ref_model(cfg: R.Config, w: dict, **kw) -> Transformer:
    return Transformer.from_state_dict(ref_args(cfg, R.is_shared(w), **kw), ref_state_dict(cfg, w))


def torch_logits(model: Transformer, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([list(tokens)])).double().numpy()[0]


# ---------------------------------------------------------------------------
# ModelArgs
# ---------------------------------------------------------------------------


def test_hidden_dim_rule():
    assert ffn_hidden_dim(64, 4) == 172            # stories260K
    assert ffn_hidden_dim(288, 32) == 768          # stories15M
    assert ffn_hidden_dim(4096, 256) == 11008      # Llama 2 7B
    assert ModelArgs(dim=64, n_heads=8, multiple_of=4).hidden_dim == 172
    assert ModelArgs(dim=64, n_heads=8, hidden_dim=100).hidden_dim == 100
    a = ModelArgs(dim=64, n_heads=8)
    assert a.n_kv_heads == 8 and a.head_size == 8 and a.kv_dim == 64
    assert ModelArgs(dim=64, n_heads=8, n_kv_heads=2).kv_dim == 16


@pytest.mark.parametrize("bad", [dict(dim=60, n_heads=8), dict(dim=24, n_heads=8),
                                 dict(dim=64, n_heads=8, n_kv_heads=3), dict(dim=64, n_heads=8, n_layers=0),
                                 dict(dim=64, n_heads=8, rope_theta=float("nan")),
                                 dict(dim=64, n_heads=8, norm_eps=0.0)])
def test_model_args_rejects(bad):
    with pytest.raises(ValueError):
        ModelArgs(**bad)


def test_model_args_from_dict_ignores_unknown_keys():
    a = ModelArgs.from_dict(dict(dim=64, n_layers=2, n_heads=8, vocab_size=32, max_seq_len=16,
                                 multiple_of=4, dropout=0.1, something_else=1))
    assert (a.dim, a.hidden_dim, a.dropout, a.max_seq_len) == (64, 172, 0.1, 16)
    assert ModelArgs.from_dict(a.to_dict()) == a


# ---------------------------------------------------------------------------
# logits vs the reference model
# ---------------------------------------------------------------------------

THETA = dataclasses.replace(GQA, rope_theta=1e6, norm_eps=1e-6)

CASES = {
    "gqa-v1-shared": (GQA, 1, True),
    "mha-v1-untied": (MHA, 1, False),
    "mqa-v0-shared": (MQA, 0, True),
    "gqa-v0-untied": (GQA, 0, False),
    "gqa-theta1e6-v3": (THETA, 3, True),
    "mha-theta1e6-v3-untied": (dataclasses.replace(MHA, rope_theta=1e6), 3, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_from_bin_logits_match_reference(make_model, case):
    cfg, version, shared = CASES[case]
    m = make_model(cfg, version=version, shared=shared, seed=7)
    model = Transformer.from_bin(m.path)
    p = model.params
    assert (p.dim, p.hidden_dim, p.n_layers, p.n_heads, p.n_kv_heads, p.vocab_size, p.max_seq_len) \
        == cfg.params()
    assert p.tie_embeddings == shared
    assert (model.output.weight is model.tok_embeddings.weight) == shared
    if version == 3:
        assert p.rope_theta == cfg.rope_theta and p.norm_eps == pytest.approx(cfg.norm_eps)
    else:
        assert (p.rope_theta, p.norm_eps) == (10000.0, 1e-5)
    tokens = random_tokens(cfg, cfg.seq_len, seed=3)
    assert_f32_close(torch_logits(model, tokens), R.forward(cfg, m.w, tokens), case)


def test_rope_theta_matters(make_model):
    """The theta=1e6 case above can fail: with theta 10000 the logits move."""
    m = make_model(THETA, version=3, seed=7)
    tokens = random_tokens(THETA, THETA.seq_len, seed=3)
    wrong = R.forward(dataclasses.replace(THETA, rope_theta=10000.0), m.w, tokens)
    got = torch_logits(Transformer.from_bin(m.path), tokens)
    assert np.abs(got - wrong).max() > 1e-3


def test_from_bin_v2_is_dequantized(make_model):
    m = make_model(GQA, version=2, seed=4)
    model = Transformer.from_bin(m.path)
    tokens = random_tokens(GQA, 16, seed=5)
    ref = R.forward(GQA, R.dequantized_weights(GQA, m.w, m.group_size), tokens)
    assert_f32_close(torch_logits(model, tokens), ref, "v2 dequantized")


def test_batch_rows_are_independent(make_model):
    m = make_model(MQA, version=1, seed=2)
    model = Transformer.from_bin(m.path)
    a, b = random_tokens(MQA, 20, 1), random_tokens(MQA, 20, 2)
    with torch.no_grad():
        both = model(torch.tensor([a, b])).double().numpy()
    np.testing.assert_allclose(both[0], torch_logits(model, a), atol=1e-5)
    np.testing.assert_allclose(both[1], torch_logits(model, b), atol=1e-5)
    assert_f32_close(both[1], R.forward(MQA, m.w, b), "batch row 1")


def test_loss_with_targets_and_ignore_index(make_model):
    m = make_model(GQA, version=1, shared=False, seed=3)
    model = Transformer.from_bin(m.path)
    x = torch.tensor([random_tokens(GQA, 12, 1), random_tokens(GQA, 12, 2)])
    y = torch.roll(x, -1, dims=1)
    y[0, -1] = -1
    y[1, :4] = -1
    logits = model(x, y)
    assert logits.shape == (2, 12, GQA.vocab_size)
    loss = model.last_loss
    # cross-entropy by hand, in float64, over the targets that are not -1
    lg = logits.detach().double().numpy().reshape(-1, GQA.vocab_size)
    tg = y.numpy().reshape(-1)
    keep = tg != -1
    lse = np.log(np.exp(lg - lg.max(1, keepdims=True)).sum(1)) + lg.max(1)
    want = float(np.mean(lse[keep] - lg[keep, tg[keep]]))
    assert float(loss.detach()) == pytest.approx(want, rel=1e-5)
    loss.backward()
    assert model.tok_embeddings.weight.grad is not None
    assert model.layers[0].attention.wk.weight.grad.abs().sum() > 0
    model(x)
    assert model.last_loss is None


def test_rejects_too_long_sequences():
    model = Transformer(ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=10, max_seq_len=4))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros((1, 5), dtype=torch.long))


def test_tied_and_untied_parameters():
    kw = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, max_seq_len=8)
    tied = Transformer(ModelArgs(**kw))
    untied = Transformer(ModelArgs(tie_embeddings=False, **kw))
    assert tied.output.weight is tied.tok_embeddings.weight
    assert untied.output.weight is not untied.tok_embeddings.weight
    assert untied.get_num_params() - tied.get_num_params() == 50 * 32
    assert tied.get_num_params(non_embedding=True) == untied.get_num_params(non_embedding=True)
    # state_dict round trip keeps tying
    again = Transformer.from_state_dict(tied.params, tied.state_dict())
    assert again.output.weight is again.tok_embeddings.weight
    assert torch.equal(again.tok_embeddings.weight, tied.tok_embeddings.weight)


@pytest.mark.slow      # meta-device init imports torch._dynamo (seconds)
@pytest.mark.parametrize("shared", [True, False])
def test_from_state_dict_via_meta_device(make_model, monkeypatch, shared):
    """The path large models take: built on the meta device, materialized
    uninitialized, tied again, RoPE tables recomputed."""
    m = make_model(GQA, version=1, shared=shared, seed=12)
    monkeypatch.setattr(Transformer, "META_INIT_MIN_PARAMS", 0)
    model = Transformer.from_bin(m.path)
    assert model.tok_embeddings.weight.device.type == "cpu"
    assert (model.output.weight is model.tok_embeddings.weight) == shared
    tokens = random_tokens(GQA, GQA.seq_len, 3)
    assert_f32_close(torch_logits(model, tokens), R.forward(GQA, m.w, tokens), "meta path")


def test_from_state_dict_rejects_mismatches():
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=50, max_seq_len=8)
    sd = Transformer(args).state_dict()
    bad = dict(sd)
    del bad["layers.0.attention.wq.weight"]
    with pytest.raises(ValueError, match="missing"):
        Transformer.from_state_dict(args, bad)
    bad = dict(sd)
    bad["output.weight"] = torch.zeros_like(sd["output.weight"])
    with pytest.raises(ValueError, match="differs"):
        Transformer.from_state_dict(args, bad)


def test_init_is_llama2c_style():
    torch.manual_seed(0)
    args = ModelArgs(dim=128, n_layers=4, n_heads=4, vocab_size=512, max_seq_len=16)
    model = Transformer(args)
    resid = 0.02 / math.sqrt(2 * args.n_layers)
    for name, p in model.named_parameters():
        p = p.detach()
        if p.dim() == 1:
            assert torch.all(p == 1), name
            continue
        want = resid if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")) else 0.02
        assert float(p.std()) == pytest.approx(want, rel=0.1), name
        assert abs(float(p.mean())) < want / 5, name


@pytest.mark.slow      # the first optimizer step imports torch._dynamo (seconds)
def test_configure_optimizers():
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=50, max_seq_len=8,
                                  tie_embeddings=False))
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=3e-4, betas=(0.9, 0.95),
                                     device_type="cpu")
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) == 2 * 7 + 2            # 7 matrices per layer, embedding, classifier
    assert len(no_decay["params"]) == 2 * 2 + 1         # 2 norms per layer, final norm
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n == model.get_num_params()
    assert decay["lr"] == 3e-4 and decay["betas"] == (0.9, 0.95)
    assert not decay.get("fused")
    x = torch.randint(0, 50, (2, 8))
    model(x, x)
    model.last_loss.backward()
    before = model.norm.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.norm.weight)


def test_estimate_mfu():
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=100, max_seq_len=32)
    model = Transformer(args)
    N = model.get_num_params()
    per_token = 6 * N + 12 * 2 * 4 * 16 * 32
    want = per_token * 32 * 8 / 0.5 / 312e12
    assert model.estimate_mfu(8, 0.5) == pytest.approx(want, rel=1e-12)
    assert model.estimate_mfu(8, 0.5, peak_flops=1e12) == pytest.approx(want * 312, rel=1e-12)


def test_generate_greedy_top_k_and_cropping(make_model):
    m = make_model(MQA, version=1, seed=9)
    model = Transformer.from_bin(m.path).eval()
    start = torch.tensor([[1, 5, 9]])
    out = model.generate(start, 10, temperature=0.0)
    assert out.shape == (1, 13) and torch.equal(out[:, :3], start)
    # greedy = argmax of the reference logits at every step
    ref = R.greedy(MQA, m.w, 12, prompt=(1, 5, 9))     # stops early only at a BOS
    assert out[0, 3:3 + len(ref)].tolist() == ref
    assert len(ref) == 10 or int(out[0, 3 + len(ref)]) == 1
    # top_k=1 samples the argmax whatever the temperature
    torch.manual_seed(0)
    assert torch.equal(model.generate(start, 10, temperature=1.5, top_k=1), out)
    # sampling stays in range and is reproducible
    torch.manual_seed(1)
    a = model.generate(start.repeat(2, 1), 8, temperature=1.0, top_k=20)
    torch.manual_seed(1)
    b = model.generate(start.repeat(2, 1), 8, temperature=1.0, top_k=20)
    assert torch.equal(a, b) and int(a.max()) < MQA.vocab_size and int(a.min()) >= 0
    # longer than max_seq_len: the context is cropped
    long = model.generate(torch.tensor([random_tokens(MQA, MQA.seq_len - 2, 4)]), 6, temperature=0.0)
    assert long.shape == (1, MQA.seq_len + 4)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=50, max_seq_len=8,
                                  dropout=0.5))
    x = torch.randint(0, 50, (1, 8))
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


@pytest.mark.slow
def test_stories260k_greedy_text(shared_data):
    spm = pytest.importorskip("sentencepiece")
    model = Transformer.from_bin(STORIES / "stories260K.bin").eval()
    out = model.generate(torch.tensor([[1]]), 200, temperature=0.0)[0, 1:].tolist()
    assert 1 not in out                           # run would have stopped at BOS
    sp = spm.SentencePieceProcessor(model_file=str(STORIES / "tok512.model"))
    text = sp.decode(out)
    expected = (STORIES / "expected" / "run_t0_n200.txt").read_text()
    assert len(text) > 400
    assert expected.startswith(text), (text[:80], expected[:80])
    assert text == expected[:-1]                  # all 200 tokens; run adds the final "\n"
