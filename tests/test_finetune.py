"""llama2c.finetune: LoRA and full fine-tunes of tiny random models (tests/reference.py
files), their outputs in the C engine, PEFT's format both ways (and the peft
package itself when installed), Llama(lora=), exact resume, masking, DDP."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from helpers import REPO, R  # noqa: E402

import llama2c  # noqa: E402
from llama2c.finetune import data as D  # noqa: E402
from llama2c.finetune import main as finetune_main  # noqa: E402
from llama2c.finetune.config import FinetuneConfig, UsageError, parse_args  # noqa: E402
from llama2c.finetune.trainer import Finetuner, finetune  # noqa: E402
from llama2c.lora_merge import (LoraAdapter, merge_lora, parse_targets, peft_name,  # noqa: E402
                                read_safetensors)

# GQA (8 query heads, 4 kv heads): the q and k permutations use different head counts
FT = R.Config(dim=64, hidden_dim=172, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=384, seq_len=96)
QUIET = lambda m: None  # noqa: E731


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def base(make_model):
    return make_model(FT, version=1, shared=True, seed=11)


def _words(rng, k):
    vocab = ["cat", "dog", "sun", "play", "big", "day", "warm", "little", "saw", "time", "happy", "they"]
    return " ".join(rng.choice(vocab) for _ in range(k))


def write_toy(path: Path, n: int, seed: int) -> Path:
    """A chat task: any question about a word gets the same short answer, which
    names the word (so the model must copy it): 'the <word> was warm'."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        w = _words(rng, 1)
        q = f"{_words(rng, 2)} {w}?"
        if i % 3 == 0:
            rows.append({"prompt": f"Q: {q}\nA:", "completion": f" the {w} was warm"})
        else:
            rows.append({"messages": [{"role": "user", "content": q},
                                      {"role": "assistant", "content": f"the {w} was warm"}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    return SimpleNamespace(train=write_toy(d / "train.jsonl", 96, 1), val=write_toy(d / "val.jsonl", 16, 2))


def cfg_for(model, toy, out, **kw) -> FinetuneConfig:
    settings = dict(base=str(model.path), tokenizer=str(model.tokenizer), data=str(toy.train),
                    val_data=str(toy.val), out_dir=str(out), batch_size=8, max_iters=24, eval_interval=12,
                    warmup_iters=2, learning_rate=3e-3, log_interval=4, device="cpu", dtype="float32")
    settings.update(kw)
    return FinetuneConfig(**settings)


@pytest.fixture(scope="module")
def lora_run(base, toy, tmp_path_factory):
    """One LoRA run shared by the tests that inspect its outputs."""
    out = tmp_path_factory.mktemp("lora")
    ft = Finetuner(cfg_for(base, toy, out), log=QUIET)
    result = ft.run()
    return SimpleNamespace(out=out, result=result, model=ft.raw.eval(), base=base)


def logits_of(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0].double().numpy()


def c_logits(llama, tokens):
    return np.stack([llama.forward(t, i).astype(np.float64) for i, t in enumerate(tokens)])


TOKENS = [1, 259, 316, 298, 303, 308, 309, 318, 259, 329, 2, 100, 383]


# ---------------------------------------------------------------------------
# data: masks, padding, packing
# ---------------------------------------------------------------------------

def test_masking_counts_only_assistant_tokens(base):
    from llama2c.chat_template import ChatTemplate
    from llama2c.tokenizer import Tokenizer

    tok = Tokenizer(base.tokenizer)
    msgs = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "the cat"},
            {"role": "assistant", "content": "saw a dog"}, {"role": "user", "content": "and then"},
            {"role": "assistant", "content": "they played"}]
    for name in ("llama-2", "chatml", "zephyr"):
        tmpl = ChatTemplate.get(name)
        ex = D.chat_example(tok, tmpl, msgs)
        assert ex.ids.tolist() == tmpl.tokenize(tok, msgs, add_generation_prompt=False)
        # the counted tokens spell the two replies (and their end-of-turn marker), nothing else
        counted = tok.decode(ex.ids[ex.mask].tolist()) if name != "llama-2" else \
            tok.decode([t for t in ex.ids[ex.mask].tolist() if t != 2])
        assert "saw a dog" in counted and "they played" in counted, (name, counted)
        for other in ("be nice", "the cat", "and then"):
            assert other not in counted, (name, counted)
        runs = np.flatnonzero(np.diff(np.r_[0, ex.mask.astype(int), 0]) == 1)
        assert len(runs) == 2, name                     # one counted stretch per assistant turn
        if name == "llama-2":                           # each reply ends with its EOS, counted
            assert ex.ids[ex.mask].tolist().count(2) == 2
    # labels: -100 wherever the next token is not an assistant token
    ex = D.chat_example(tok, ChatTemplate.get("llama-2"), msgs)
    x, y = D._rows_to_batch([(ex.ids, ex.mask)])
    assert (y[0] != D.IGNORE).sum() == ex.mask[1:].sum() == ex.n_targets
    assert np.array_equal(y[0][y[0] != D.IGNORE], ex.ids[1:][ex.mask[1:]])
    assert np.array_equal(x[0], ex.ids[:-1])
    # prompt / completion: the completion and EOS count
    pc = D.prompt_completion_example(tok, "Q: the cat?\nA:", " a dog")
    assert pc.ids[0] == 1 and pc.ids[-1] == 2
    assert tok.decode([t for t in pc.ids[pc.mask].tolist() if t != 2]).strip() == "a dog"
    # plain text: everything counts
    tx = D.text_example(tok, "the sun was warm")
    assert tx.mask.all() and tx.ids[0] == 1


def test_padded_and_packed_batches(base, toy):
    from llama2c.chat_template import ChatTemplate
    from llama2c.tokenizer import Tokenizer

    tok = Tokenizer(base.tokenizer)
    exs = D.load_examples(toy.train, tok, ChatTemplate.get("llama-2"))
    assert len(exs) == 96
    padded = D.PaddedBatches(exs, 40, 4, seed=3)
    x, y = padded.next_batch()
    assert x.shape == y.shape and x.shape[0] == 4 and x.shape[1] <= 40
    lengths = [len(exs[i].ids) for i in range(96)]
    assert x.shape[1] <= max(lengths) - 1
    # the padding of every row is labelled -100
    for r in range(4):
        n = int((y[r] != D.IGNORE).sum())
        assert n > 0
    packed = D.PackedBatches(exs, 16, 4, seed=3)
    x, y = packed.next_batch()
    assert x.shape == (4, 16)
    stream = np.concatenate([e.ids for e in exs])
    windows = np.lib.stride_tricks.sliding_window_view(stream, 17)[::16]     # stride max_seq_len
    for row_x, row_y in zip(x, y):
        w = windows[np.flatnonzero((windows[:, :16] == row_x).all(1))[0]]
        assert np.array_equal(row_y[row_y != D.IGNORE], w[1:][row_y != D.IGNORE])
    # the order is resumable
    state = packed.state_dict()
    want = [packed.next_batch()[0] for _ in range(30)]
    again = D.PackedBatches(exs, 16, 4, seed=3)
    again.load_state_dict(state)
    assert all(np.array_equal(a, b) for a, b in zip(want, [again.next_batch()[0] for _ in range(30)]))
    # two processes: disjoint rows
    r0 = D.PaddedBatches(exs, 40, 4, rank=0, world_size=2, seed=1)
    r1 = D.PaddedBatches(exs, 40, 4, rank=1, world_size=2, seed=1)
    assert not set(r0.order.items.tolist()) & set(r1.order.items.tolist())


# ---------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------

def test_lora_lowers_loss_and_leaves_the_base_frozen(lora_run):
    res = lora_run.result
    assert res["val_loss_after"] < res["val_loss_before"] - 1.0, res
    evals = [e for e in res["history"] if "val_loss" in e]
    assert [e["iter"] for e in evals] == [0, 12, 24]
    model, base = lora_run.model, lora_run.base
    # every base weight is frozen and bit-for-bit the file's
    from llama2c.export.sources import open_bin

    with open_bin(base.path) as src:
        sd = model.state_dict()
        for key in src.keys():
            assert np.array_equal(sd[key].numpy(), src.get(key)), key
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert len(trainable) == 2 * 7 * FT.n_layers and frozen
    assert all(float(model.get_submodule(n.rsplit(".", 1)[0]).lora_B.detach().abs().max()) > 0 for n in trainable)
    out = lora_run.out
    for name in ("model.bin", "tokenizer.bin", "adapter_config.json", "adapter_model.safetensors", "ckpt.pt",
                 "log.jsonl"):
        assert (out / name).is_file(), name
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    # the checkpoint holds the adapters, not the base
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["format"] == "llama2c-finetune" and ckpt["mode"] == "lora" and "model" not in ckpt
    assert set(ckpt["trainable"]) == set(trainable)


def test_lora_before_training_is_the_base(base, toy, tmp_path):
    """B starts at zero: zero iterations give the base model back."""
    res = finetune(cfg_for(base, toy, tmp_path, max_iters=0), log=QUIET)
    assert res["val_loss_after"] == res["val_loss_before"]
    a = llama2c.Llama(base.path, tokenizer=base.tokenizer)
    b = llama2c.Llama(tmp_path / "model.bin")
    np.testing.assert_array_equal(c_logits(a, TOKENS[:5]), c_logits(b, TOKENS[:5]))


def test_merged_bin_matches_pytorch_and_runs_in_c(lora_run, cli):
    model_bin = lora_run.out / "model.bin"
    llama = llama2c.Llama(model_bin)           # tokenizer.bin beside it
    assert llama.config.version == 1           # the base's version
    got = c_logits(llama, TOKENS)
    want = logits_of(lora_run.model, TOKENS)   # base + adapters in PyTorch, unmerged
    np.testing.assert_allclose(got, want, atol=2e-4 * max(1.0, np.abs(want).max()), rtol=0)
    base_logits = c_logits(llama2c.Llama(lora_run.base.path, tokenizer=lora_run.base.tokenizer), TOKENS)
    assert np.abs(base_logits - got).max() > 0.1       # the adapter changed the model
    proc = cli("run", model_bin, "-z", lora_run.out / "tokenizer.bin", "-n", 20, "-s", 1)
    assert proc.returncode == 0, proc.stderr.decode()


def test_llama_lora_equals_the_merged_model(lora_run, tmp_path):
    import tempfile

    before = set(os.listdir(tempfile.gettempdir()))
    with_lora = llama2c.Llama(lora_run.base.path, tokenizer=lora_run.base.tokenizer, lora=lora_run.out)
    merged = llama2c.Llama(lora_run.out / "model.bin")
    np.testing.assert_array_equal(c_logits(with_lora, TOKENS), c_logits(merged, TOKENS))
    if os.name != "nt":
        left = [n for n in set(os.listdir(tempfile.gettempdir())) - before if "-lora-" in n]
        assert not left                          # the merged copy is not left behind
    assert with_lora.model_path == os.fspath(lora_run.base.path)
    # the config file alone names the folder too; a cache keeps the merged file
    cached = llama2c.Llama(lora_run.base.path, tokenizer=lora_run.base.tokenizer,
                           lora=lora_run.out / "adapter_config.json")
    np.testing.assert_array_equal(c_logits(cached, TOKENS[:4]), c_logits(merged, TOKENS[:4]))
    from llama2c.lora_merge import merged_model_file

    p1, temp1 = merged_model_file(lora_run.base.path, lora_run.out, cache_dir=tmp_path)
    p2, _ = merged_model_file(lora_run.base.path, lora_run.out, cache_dir=tmp_path)
    assert p1 == p2 and not temp1 and p1.read_bytes() == (lora_run.out / "model.bin").read_bytes()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        llama2c.Llama(lora_run.base.path, lora=tmp_path)


def test_adapter_files_have_peft_names(lora_run):
    cfg = json.loads((lora_run.out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16
    assert sorted(cfg["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                    "up_proj", "down_proj"])
    tensors, meta = read_safetensors(lora_run.out / "adapter_model.safetensors")
    assert meta == {"format": "pt"}
    names = set(tensors)
    for i in range(FT.n_layers):
        for t in ("wq", "wk", "wv", "wo", "w1", "w2", "w3"):
            assert {peft_name(i, t, "A"), peft_name(i, t, "B")} <= names
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in names
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in names
    assert tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"].shape == (32, 8)
    assert tensors["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (8, 172)
    # q/k lora_B rows are stored in HF's rotary layout: loading undoes it exactly
    ad = LoraAdapter.load(lora_run.out, FT.n_heads, FT.n_kv_heads)
    mods = {k: m for k, m in __import__("llama2c.finetune.lora", fromlist=["x"]).lora_modules(
        lora_run.model).items()}
    for key, (a, b) in ad.weights.items():
        np.testing.assert_array_equal(a, mods[key].lora_A.detach().numpy())
        np.testing.assert_array_equal(b, mods[key].lora_B.detach().numpy())
    q_file = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert not np.array_equal(q_file, ad.weights[(0, "wq")][1])


def test_merge_of_a_permuted_adapter_matches_torch(lora_run, tmp_path):
    """merge_lora (numpy, from the files) = the adapted PyTorch model's merged weights."""
    from llama2c.export.sources import open_bin
    from llama2c.finetune.lora import merged_state_dict

    out = merge_lora(lora_run.base.path, lora_run.out, tmp_path / "m.bin", version=3)
    sd = merged_state_dict(lora_run.model)
    with open_bin(out) as src:
        assert src.version == 3
        for key in src.keys():
            np.testing.assert_allclose(src.get(key), sd[key].numpy(), atol=1e-6, rtol=0)
    with pytest.raises(FileExistsError):
        merge_lora(lora_run.base.path, lora_run.out, out)


def test_peft_loads_the_adapter_on_our_hf_export(lora_run, tmp_path):
    pytest.importorskip("transformers", reason="transformers is not installed")
    peft = pytest.importorskip("peft", reason="peft is not installed (pip install peft)")
    from transformers import LlamaForCausalLM

    from llama2c.export import write_hf

    hf_dir = write_hf(lora_run.base.path, tmp_path / "hf")
    model = LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        plain = model(torch.tensor([TOKENS])).logits[0].double().numpy()
    pm = peft.PeftModel.from_pretrained(model, lora_run.out)
    pm.eval()
    with torch.no_grad():
        adapted = pm(torch.tensor([TOKENS])).logits[0].double().numpy()
    merged = c_logits(llama2c.Llama(lora_run.out / "model.bin"), TOKENS)
    scale = max(1.0, np.abs(merged).max())
    np.testing.assert_allclose(adapted, merged, atol=2e-4 * scale, rtol=0)
    assert np.abs(plain - adapted).max() > 0.1          # the adapter was applied
    base_c = c_logits(llama2c.Llama(lora_run.base.path, tokenizer=lora_run.base.tokenizer), TOKENS)
    np.testing.assert_allclose(plain, base_c, atol=2e-4 * scale, rtol=0)


def test_resume_continues_the_same_run(base, toy, tmp_path):
    """2N iterations in one go == N, then --resume to 2N: same losses, same adapters, same files."""
    common = dict(gradient_accumulation_steps=2, batch_size=4, lora_dropout=0.1, eval_interval=3,
                  log_interval=1, lr_decay_iters=8)
    full = finetune(cfg_for(base, toy, tmp_path / "a", max_iters=8, **common), log=QUIET)
    finetune(cfg_for(base, toy, tmp_path / "b", max_iters=4, **common), log=QUIET)
    # a resume needs only the directory; the rest comes from the checkpoint
    assert finetune_main(["--out-dir", str(tmp_path / "b"), "--resume", "--max-iters", "8"]) == 0

    def curve(d):
        rows = [json.loads(x) for x in (d / "log.jsonl").read_text().splitlines()]
        return {r["iter"]: r["loss"] for r in rows if "loss" in r}

    a, b = curve(tmp_path / "a"), curve(tmp_path / "b")
    assert sorted(a) == sorted(b) == list(range(8))
    assert [a[i] for i in range(8)] == [b[i] for i in range(8)]
    ca = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    cb = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert all(torch.equal(ca["trainable"][k], cb["trainable"][k]) for k in ca["trainable"])
    assert ca["sampler"] == cb["sampler"] and cb["config"]["batch_size"] == 4
    for name in ("model.bin", "adapter_model.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert full["val_loss_before"] == json.loads((tmp_path / "b" / "log.jsonl").read_text().splitlines()[0])[
        "val_loss"]


def test_full_finetune(base, toy, tmp_path):
    res = finetune(cfg_for(base, toy, tmp_path, full=True, learning_rate=1e-3), log=QUIET)
    assert res["val_loss_after"] < res["val_loss_before"] - 1.0
    assert res["adapter"] is None and not (tmp_path / "adapter_config.json").exists()
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["mode"] == "full"
    # the checkpoint is a training checkpoint the readers know: a base for a next fine-tune
    from llama2c.model import Transformer

    model = Transformer.from_checkpoint(tmp_path / "ckpt.pt").eval()
    got = c_logits(llama2c.Llama(tmp_path / "model.bin"), TOKENS)
    want = logits_of(model, TOKENS)
    np.testing.assert_allclose(got, want, atol=2e-4 * max(1.0, np.abs(want).max()), rtol=0)
    more = finetune(cfg_for(base, toy, tmp_path / "again", base=str(tmp_path / "ckpt.pt"), max_iters=2,
                            eval_interval=2), log=QUIET)
    assert more["val_loss_before"] == pytest.approx(res["val_loss_after"], rel=1e-6)


@pytest.mark.parametrize("kind", ["v0", "v2", "v4", "checkpoint", "hf"])
def test_any_base_model(base, toy, tmp_path, kind, make_model):
    from llama2c.export import write_bin, write_hf

    if kind.startswith("v"):
        path = write_bin(base.path, tmp_path / f"base_{kind}.bin", int(kind[1]))
        # float32 bases keep their version; int8 and bf16 ones merge exactly into float32
        want_version = {"v0": 0, "v2": 1, "v4": 1}[kind]
    elif kind == "hf":
        path = write_hf(base.path, tmp_path / "hf")
        want_version = 1
    else:
        from llama2c.model import Transformer

        m = Transformer.from_bin(base.path)
        path = tmp_path / "ckpt.pt"
        torch.save({"model": m.state_dict(), "model_args": {**m.params.__dict__}}, path)
        want_version = 1
    out = tmp_path / "out"
    res = finetune(cfg_for(base, toy, out, base=str(path), max_iters=2, eval_interval=2), log=QUIET)
    llama = llama2c.Llama(out / "model.bin", tokenizer=base.tokenizer)
    assert llama.config.version == want_version
    # the same adapter on the base, merged in the C engine's loader, gives the same model
    if kind.startswith("v"):
        merged = llama2c.Llama(path, tokenizer=base.tokenizer, lora=out)
        np.testing.assert_array_equal(c_logits(merged, TOKENS[:4]), c_logits(llama, TOKENS[:4]))
    assert res["val_loss_after"] < res["val_loss_before"]


def test_command_line(base, toy, tmp_path, capsys):
    assert finetune_main(["--help"]) == 0
    assert "--lora-rank" in capsys.readouterr().out
    assert finetune_main(["--base", str(base.path), "--data", str(toy.train)]) == 2
    assert "--out-dir" in capsys.readouterr().err
    assert finetune_main(["--out-dir", str(tmp_path / "x"), "--base", str(base.path), "--data", str(toy.train),
                          "--lora-targets", "wq,bogus"]) == 2
    assert "unknown LoRA target" in capsys.readouterr().err
    assert finetune_main(["--out-dir", str(tmp_path), "--resume"]) == 1
    assert "no checkpoint" in capsys.readouterr().err
    other_tok = tmp_path / "tok300.bin"
    R.write_tokenizer_bin(other_tok, *R.make_vocab(300))
    assert finetune_main(["--out-dir", str(tmp_path / "y"), "--base", str(base.path), "--data", str(toy.train),
                          "--tokenizer", str(other_tok)]) == 1
    assert "has 300 tokens, the model 384" in capsys.readouterr().err
    with pytest.raises(UsageError, match="shape comes from the base"):
        parse_args(["--out-dir=o", "--base=b", "--data=d", "--dim=64"])
    cfg = parse_args(["--out_dir=o", "--init-from=b", "--data=d", "--lora_rank=4", "--packing", "--full=false"])
    assert (cfg.base, cfg.lora_rank, cfg.packing, cfg.full) == ("b", 4, "true", False)
    assert cfg.given >= {"out_dir", "base", "data", "lora_rank", "packing", "full"}
    assert parse_targets("q_proj,w2,attn") == ["wq", "wk", "wv", "wo", "w2"]
    # `llama2c train --init-from=MODEL` is the same fine-tune, through the llama2c command
    from llama2c.cli import main as cli_main

    argv = ["--tokenizer", str(base.tokenizer), "--data", str(toy.train), "--val-data", str(toy.val),
            "--max-iters=2", "--eval-interval=2", "--batch-size=4"]
    assert cli_main(["train", f"--init-from={base.path}", f"--out-dir={tmp_path / 't'}", *argv]) == 0
    assert "held-out loss" in capsys.readouterr().out
    assert cli_main(["finetune", "--base", str(base.path), "--out-dir", str(tmp_path / "f"), *argv]) == 0
    capsys.readouterr()
    assert (tmp_path / "t" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "f" / "adapter_model.safetensors").read_bytes()
    # an earlier run is not replaced silently; train's resume of a fine-tune's directory works
    assert cli_main(["finetune", "--base", str(base.path), "--out-dir", str(tmp_path / "f"), *argv]) == 1
    assert "--resume" in capsys.readouterr().err
    assert cli_main(["train", "--init-from=resume", f"--out-dir={tmp_path / 'f'}", "--max-iters=3"]) == 0
    assert "resumed from" in capsys.readouterr().out


# ---------------------------------------------------------------------------
# several processes (torchrun, gloo on CPU)
# ---------------------------------------------------------------------------

def torchrun(args, timeout=240):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "llama2c.finetune", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


@pytest.mark.slow
def test_lora_ddp_two_processes(base, toy, tmp_path):
    out = tmp_path / "ddp"
    args = ["--base", base.path, "--tokenizer", base.tokenizer, "--data", toy.train, "--val-data", toy.val,
            "--out-dir", out, "--max-iters", 6, "--lora-dropout", 0.1, "--eval-interval", 3, "--batch-size", 4,
            "--gradient-accumulation-steps", 2, "--learning-rate", 3e-3, "--warmup-iters", 1, "--device", "cpu",
            "--dtype", "float32", "--log-interval", 1]
    proc = torchrun(args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "DDP: 2 process(es)" in proc.stdout and proc.stdout.count("step 6: train loss") == 1
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 6 and len(ckpt["rng"]) == 2
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_loss" in r]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    # the base stays bit-identical under DDP: zero adapters give the base back
    merged = llama2c.Llama(out / "model.bin")
    assert np.abs(c_logits(merged, TOKENS[:4]) - c_logits(llama2c.Llama(base.path, tokenizer=base.tokenizer),
                                                          TOKENS[:4])).max() > 0
    # stopped at 3 and resumed under torchrun: the same losses as the run in one go
    out2 = tmp_path / "ddp2"
    args2 = [str(out2) if a == out else a for a in args]
    args2[args2.index("--max-iters") + 1] = 3
    first = torchrun(args2 + ["--lr-decay-iters", 6])
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    more = torchrun(["--out-dir", out2, "--resume", "--max-iters", 6])
    assert more.returncode == 0 and "resumed from" in more.stdout, more.stdout[-3000:] + more.stderr[-3000:]
    curve = lambda d: {r["iter"]: r["loss"] for r in map(json.loads, (d / "log.jsonl").read_text().splitlines())  # noqa: E731
                       if "loss" in r}
    assert curve(out) == curve(out2) and len(curve(out)) == 6
    # the DDP checkpoint resumes in one process
    res = finetune(FinetuneConfig(out_dir=str(out), resume=True, max_iters=8, device="cpu"), log=QUIET)
    assert res["iter_num"] == 8


def test_applying_an_adapter_needs_no_torch(lora_run, tmp_path):
    """Llama(lora=) and merge_lora are numpy-only (torch blocked in a child interpreter)."""
    code = f"""
import sys; sys.modules['torch'] = None
import numpy as np, llama2c
from llama2c.lora_merge import merge_lora
a = llama2c.Llama({str(lora_run.base.path)!r}, tokenizer={str(lora_run.base.tokenizer)!r}, lora={str(lora_run.out)!r})
merge_lora({str(lora_run.base.path)!r}, {str(lora_run.out)!r}, {str(tmp_path / 'm.bin')!r})
b = llama2c.Llama({str(tmp_path / 'm.bin')!r}, tokenizer={str(lora_run.base.tokenizer)!r})
assert np.array_equal(a.forward(5, 0), b.forward(5, 0))
print("ok")
"""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr
    assert (tmp_path / "m.bin").read_bytes() == (lora_run.out / "model.bin").read_bytes()


def test_plain_text_and_prepared_data(base, tmp_path):
    """Text files are packed into windows and every token counts; a `llama2c data prepare`
    directory is read through the training sampler."""
    text = tmp_path / "stories.txt"
    rng = np.random.default_rng(4)
    text.write_text("\n\n".join(f"the {_words(rng, 1)} saw a {_words(rng, 1)}. they were happy."
                                for _ in range(200)), encoding="utf-8")
    msgs = []
    res = finetune(FinetuneConfig(base=str(base.path), tokenizer=str(base.tokenizer), data=str(text),
                                  out_dir=str(tmp_path / "t"), max_iters=12, eval_interval=6, batch_size=4,
                                  max_seq_len=32, learning_rate=3e-3, warmup_iters=1, device="cpu",
                                  dtype="bfloat16"), log=msgs.append)
    assert any("packed into windows" in m for m in msgs), msgs
    assert res["val_loss_after"] < res["val_loss_before"] - 0.5
    # every token of the text counts: the training rows carry no -100
    from llama2c.chat_template import ChatTemplate
    from llama2c.tokenizer import Tokenizer

    exs = D.load_examples(text, Tokenizer(base.tokenizer), ChatTemplate.get(None))
    _, y = D.PackedBatches(exs, 32, 4).next_batch()
    assert (y != D.IGNORE).all()
    pytest.importorskip("sentencepiece")
    from test_data import synthetic_stories, write_text

    from llama2c.data import prepare, train_tokenizer

    src = write_text(tmp_path / "syn.txt", synthetic_stories(300, seed=3))
    tok = train_tokenizer([src], 384, tmp_path / "tok384.model")
    prepare([src], tok, tmp_path / "data", workers=1, progress=False)
    res = finetune(FinetuneConfig(base=str(base.path), data=str(tmp_path / "data"), out_dir=str(tmp_path / "p"),
                                  max_iters=4, eval_interval=2, eval_iters=2, batch_size=4, max_seq_len=32,
                                  device="cpu"), log=QUIET)
    assert res["iter_num"] == 4 and res["val_loss_after"] < res["val_loss_before"]
    # its tokenizer (the data's) is the one written beside model.bin
    assert llama2c.Llama(tmp_path / "p" / "model.bin").tokenizer.vocab_size == 384


def test_merged_hugging_face_folder(lora_run, tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    import shutil

    out = shutil.copytree(lora_run.out, tmp_path / "run")
    # a finished run resumed with --hf: nothing left to train, the outputs are written again
    res = finetune(FinetuneConfig(out_dir=str(out), resume=True, hf=True, device="cpu"), log=QUIET)
    assert res["iter_num"] == 24 and (out / "model.bin").read_bytes() == (lora_run.out / "model.bin").read_bytes()
    model = transformers.LlamaForCausalLM.from_pretrained(res["hf"], torch_dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(torch.tensor([TOKENS])).logits[0].double().numpy()
    want = c_logits(llama2c.Llama(lora_run.out / "model.bin"), TOKENS)
    np.testing.assert_allclose(got, want, atol=2e-4 * max(1.0, np.abs(want).max()), rtol=0)


def test_train_api_with_a_model_to_start_from(base, toy, tmp_path):
    """train(TrainConfig(init_from=MODEL)) runs the fine-tune, with the knobs both share."""
    import shutil

    from llama2c.train import TrainConfig, train

    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(base.path, d / "model.bin")
    shutil.copy(base.tokenizer, d / "tokenizer.bin")          # found beside the model
    msgs = []
    res = train(TrainConfig(init_from=str(d / "model.bin"), data=str(toy.train), out_dir=str(tmp_path / "o"),
                            max_iters=3, eval_interval=3, batch_size=4, learning_rate=3e-3, device="cpu",
                            dtype="float32"), log=msgs.append)
    assert res["iter_num"] == 3 and res["adapter"] == str(tmp_path / "o")
    assert any("LoRA r=8" in m for m in msgs) and any("lr 0.003, 3 iterations" in m for m in msgs), msgs
    assert any(" | ETA " in m for m in msgs)


def test_an_adapter_made_by_peft_applies_here(base, tmp_path):
    """An adapter peft itself trained and saved (other targets, rsLoRA, an alpha_pattern)
    merges here into the model peft computes."""
    pytest.importorskip("transformers", reason="transformers is not installed")
    peft = pytest.importorskip("peft", reason="peft is not installed (pip install peft)")
    from transformers import LlamaForCausalLM

    from llama2c.export import write_hf

    hf_dir = write_hf(base.path, tmp_path / "hf")
    model = LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "down_proj"],
                             use_rslora=True, alpha_pattern={"k_proj": 3}, init_lora_weights=False,
                             task_type="CAUSAL_LM")
    torch.manual_seed(0)
    pm = peft.get_peft_model(model, config).eval()
    pm.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        want = pm(torch.tensor([TOKENS])).logits[0].double().numpy()
    got = c_logits(llama2c.Llama(base.path, tokenizer=base.tokenizer, lora=tmp_path / "adapter"), TOKENS)
    np.testing.assert_allclose(got, want, atol=2e-4 * max(1.0, np.abs(want).max()), rtol=0)
    plain = c_logits(llama2c.Llama(base.path, tokenizer=base.tokenizer), TOKENS)
    assert np.abs(plain - got).max() > 0.05
    ad = LoraAdapter.load(tmp_path / "adapter", FT.n_heads, FT.n_kv_heads)
    assert ad.targets == ["wq", "wk", "w2"]
    assert ad.scaling[(0, "wq")] == pytest.approx(8 / 2) and ad.scaling[(0, "wk")] == pytest.approx(3 / 2)


def test_adapters_that_cannot_apply_are_refused(lora_run, tmp_path):
    import shutil

    from llama2c.errors import FormatError

    def variant(name, config=None, drop=None, extra=None):
        d = shutil.copytree(lora_run.out, tmp_path / name, ignore=shutil.ignore_patterns("*.bin", "ckpt.pt"))
        if config:
            cfg = json.loads((d / "adapter_config.json").read_text())
            cfg.update(config)
            (d / "adapter_config.json").write_text(json.dumps(cfg))
        if drop or extra:
            from llama2c.lora_merge import _write_safetensors

            tensors, _ = read_safetensors(d / "adapter_model.safetensors")
            tensors = {k: v for k, v in tensors.items() if k != drop}
            tensors.update(extra or {})
            _write_safetensors(d / "adapter_model.safetensors", list(tensors.items()), {}, True)
        return d

    cases = [(variant("dora", {"use_dora": True}), "DoRA"),
             (variant("save", {"modules_to_save": ["lm_head"]}), "modules_to_save"),
             (variant("ia3", {"peft_type": "IA3"}), "not LoRA"),
             (variant("half", drop=peft_name(1, "wv", "B")), "lora_A only"),
             (variant("head", extra={"base_model.model.lm_head.lora_A.weight": np.zeros((8, 64), np.float32)}),
              "not a LoRA A/B matrix")]
    for folder, match in cases:
        with pytest.raises(FormatError, match=match):
            LoraAdapter.load(folder, FT.n_heads, FT.n_kv_heads)
    other = make_other_model(tmp_path)
    with pytest.raises(FormatError, match="not this model's adapter"):
        merge_lora(other, lora_run.out, tmp_path / "x.bin")


def make_other_model(tmp_path):
    cfg = R.Config(dim=32, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=384, seq_len=32)
    return R.write_model(tmp_path / "other.bin", cfg, R.random_weights(cfg, 3), 1)


def test_a_gguf_base(base, toy, tmp_path):
    pytest.importorskip("gguf", reason="the gguf package is not installed")
    from llama2c.export import export_gguf

    path = export_gguf(base.path, tmp_path / "base.gguf", "f32", vocab=base.tokenizer)
    out = tmp_path / "out"
    cfg = cfg_for(base, toy, out, base=str(path), tokenizer="", max_iters=2, eval_interval=2)
    res = finetune(cfg, log=QUIET)                  # the GGUF file's own vocabulary encodes the data
    assert res["val_loss_after"] < res["val_loss_before"]
    assert (out / "tokenizer.bin").read_bytes() == base.tokenizer.read_bytes()
    assert llama2c.Llama(out / "model.bin").config.version == 1
