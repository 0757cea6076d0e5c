"""Conversion (llama2c/export): .bin versions 0-3 byte for byte against the
reference writer and llama2.c's own files, training checkpoints, Meta and
Hugging Face checkpoints (through transformers), the C engine on exported
files, the tokenizer.bin export, atomic writes and the command line."""
from __future__ import annotations

import dataclasses
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import reference as R  # noqa: E402
from helpers import GQA, LLAMA2_TOK, MHA, MQA, REPO, STORIES, c_logits, random_tokens  # noqa: E402
from test_model_torch import ref_model, ref_state_dict, torch_logits  # noqa: E402

import llama2c  # noqa: E402
from llama2c.errors import FormatError  # noqa: E402
from llama2c.export import binfmt, export_tokenizer, main  # noqa: E402
from llama2c.export.sources import BinSource, CheckpointSource, StateDictSource, canonical_keys  # noqa: E402
from llama2c.export.writers import write_bin, write_hf  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


THETA = dataclasses.replace(GQA, rope_theta=1e6, norm_eps=1e-6)


def export(*argv) -> int:
    return main([str(a) for a in argv] + ["-q"])


def c_engine(path, tokens) -> np.ndarray:
    return c_logits(llama2c.Llama(path, n_threads=1), tokens)


def assert_close_1e4(got: np.ndarray, want: np.ndarray, what: str = "") -> None:
    """fp32 vs fp32 by different code: 1e-4 x max(1, max|logit|)."""
    assert got.shape == want.shape, (got.shape, want.shape)
    err = np.abs(got - want).max()
    tol = 1e-4 * max(1.0, float(np.abs(want).max()))
    assert err <= tol, f"{what}: max |diff| {err:.3g} > {tol:.3g}"


def save_checkpoint(path, model, **extra):
    torch.save({"model": model.state_dict(), "model_args": model.params.to_dict(), **extra}, path)
    return path


def reference_weights(cfg, src: BinSource) -> dict:
    """A BinSource's tensors in reference.py's naming (stacked per layer)."""
    L = cfg.n_layers
    w = {"token_embedding": src.get("tok_embeddings.weight"),
         "rms_att": np.stack([src.get(f"layers.{i}.attention_norm.weight") for i in range(L)]),
         "rms_ffn": np.stack([src.get(f"layers.{i}.ffn_norm.weight") for i in range(L)]),
         "rms_final": src.get("norm.weight")}
    for name, key in binfmt.LAYER_MATRICES:
        w[name] = np.stack([src.get(binfmt.layer_key(i, key)) for i in range(L)])
    if not src.args.tie_embeddings:
        w["wcls"] = src.get("output.weight")
    return w


def with_legacy_tables(cfg, w) -> dict:
    cos, sin = binfmt.legacy_freq_cis(cfg.head_size, cfg.seq_len)
    return {**w, "freq_cis_real": cos, "freq_cis_imag": sin}


# ---------------------------------------------------------------------------
# llama2.c's reference files
# ---------------------------------------------------------------------------


def test_stories260k_as_v1_is_byte_identical(shared_data, tmp_path):
    out = tmp_path / "v1.bin"
    assert export(out, "--version", "1", "--bin", STORIES / "stories260K.bin") == 0
    assert out.read_bytes() == (STORIES / "stories260K_v1.bin").read_bytes()


def test_stories260k_as_v2_gs8_is_byte_identical(shared_data, tmp_path):
    out = tmp_path / "q8.bin"
    assert export(out, "--version", "2", "--group-size", "8", "--bin", STORIES / "stories260K.bin") == 0
    assert out.read_bytes() == (STORIES / "stories260K_q80_gs8.bin").read_bytes()


def test_stories260k_v0_round_trip_is_byte_identical(shared_data, tmp_path):
    original = (STORIES / "stories260K.bin").read_bytes()
    cfg, w = R.read_v0(STORIES / "stories260K.bin")
    cos, sin = binfmt.legacy_freq_cis(cfg.head_size, cfg.seq_len)
    # the tables are computed, not copied: they match the file bit for bit
    assert np.array_equal(cos, w["freq_cis_real"]) and np.array_equal(sin, w["freq_cis_imag"])
    out = tmp_path / "v0.bin"
    assert export(out, "--version", "0", "--bin", STORIES / "stories260K.bin") == 0
    assert out.read_bytes() == original
    # and from the v1 copy (no tables in it) as well
    out2 = tmp_path / "v0b.bin"
    assert export(out2, "--version", "0", "--bin", STORIES / "stories260K_v1.bin") == 0
    assert out2.read_bytes() == original


def test_stories260k_through_a_training_checkpoint(shared_data, tmp_path):
    """from_bin -> training checkpoint -> export v1: llama2.c's v1 bytes."""
    from llama2c.model import Transformer

    ckpt = save_checkpoint(tmp_path / "ckpt.pt", Transformer.from_bin(STORIES / "stories260K.bin"))
    out = tmp_path / "v1.bin"
    assert export(out, "--version", "1", "--checkpoint", ckpt) == 0
    assert out.read_bytes() == (STORIES / "stories260K_v1.bin").read_bytes()


# ---------------------------------------------------------------------------
# readers and writers against tests/reference.py
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "unshared"])
@pytest.mark.parametrize("version_in", [0, 1, 2, 3])
def test_bin_reader_and_writers_match_reference(make_model, tmp_path, version_in, shared):
    cfg = MHA if shared else THETA
    m = make_model(cfg, version=version_in, shared=shared, seed=11)
    src = BinSource(m.path)
    a = src.args
    assert (a.dim, a.hidden_dim, a.n_layers, a.n_heads, a.n_kv_heads, a.vocab_size, a.max_seq_len) \
        == cfg.params()
    assert a.tie_embeddings == shared and src.version == version_in
    want = R.dequantized_weights(cfg, m.w, m.group_size) if version_in == 2 else m.w
    got = reference_weights(cfg, src)
    assert set(got) == set(k for k in want if not k.startswith("freq"))
    for k in got:
        assert np.array_equal(got[k], want[k]), k
    # every output version, byte for byte as reference.py writes it
    file_cfg = cfg if version_in == 3 else dataclasses.replace(cfg, rope_theta=10000.0, norm_eps=1e-5)
    for version_out in (0, 1, 2, 3):
        out = write_bin(src, tmp_path / f"out{version_out}.bin", version_out)
        w = with_legacy_tables(file_cfg, want) if version_out == 0 else want
        expected = R.model_bytes(file_cfg, w, version_out)
        assert out.read_bytes() == expected, (version_in, version_out)


def test_q8_quantization_rounding():
    rng = np.random.default_rng(0)
    w = rng.standard_normal(4 * 64).astype(np.float32)
    w[64:128] = 0.0                                    # an all-zero group: scale 0, q 0
    q, s = binfmt.quantize_q80(w, 64)
    rq, rs = R.quantize_q80(w, 64)
    assert np.array_equal(q, rq) and np.array_equal(s, rs)
    assert s[1] == 0 and not q[64:128].any()
    # exact ties round half to even: scale 1 -> 2.5 -> 2, -3.5 -> -4, 0.5 -> 0
    tie = np.array([127.0, 2.5, -3.5, 0.5], dtype=np.float32)
    q, s = binfmt.quantize_q80(tie, 4)
    assert s.tolist() == [1.0] and q.tolist() == [127, 2, -4, 0]
    assert binfmt.dequantize_q80(q, s, 4).tolist() == [127.0, 2.0, -4.0, 0.0]
    with pytest.raises(ValueError):
        binfmt.quantize_q80(np.zeros(10, np.float32), 4)


def test_group_size(make_model, tmp_path, capsys):
    m = make_model(MHA, version=1, seed=3)            # dim 48
    gs_of = lambda p: struct.unpack_from("<i", p.read_bytes(), 37)[0]  # noqa: E731
    assert export(tmp_path / "a.bin", "--version", "2", "--bin", m.path) == 0
    assert gs_of(tmp_path / "a.bin") == 16
    assert export(tmp_path / "b.bin", "--version", "2", "--group-size", "8", "--bin", m.path) == 0
    assert gs_of(tmp_path / "b.bin") == 8
    capsys.readouterr()
    assert export(tmp_path / "c.bin", "--version", "2", "--group-size", "64", "--bin", m.path) == 0
    assert gs_of(tmp_path / "c.bin") == 16
    assert "warning" in capsys.readouterr().err
    assert (tmp_path / "b.bin").read_bytes() == R.model_bytes(MHA, m.w, 2, 8)


@pytest.mark.parametrize("damage", ["truncated", "trailing", "bad-version", "bad-dims"])
def test_bin_reader_rejects_bad_files(make_model, tmp_path, damage, capsys):
    data = bytearray(make_model(GQA, version=1, seed=1).path.read_bytes())
    if damage == "truncated":
        data = data[:-4]
    elif damage == "trailing":
        data += b"\0" * 4
    elif damage == "bad-version":
        data[4:8] = struct.pack("<i", 9)
    else:
        data[20:24] = struct.pack("<i", 3)            # n_heads 3 does not divide dim 64
    bad = tmp_path / "bad.bin"
    bad.write_bytes(bytes(data))
    with pytest.raises(FormatError):
        BinSource(bad)
    capsys.readouterr()
    assert export(tmp_path / "out.bin", "--version", "1", "--bin", bad) == 1
    err = capsys.readouterr().err
    assert err.startswith("llama2c export: error:") and err.count("\n") == 1, err
    assert not (tmp_path / "out.bin").exists()


# ---------------------------------------------------------------------------
# PyTorch checkpoints -> files -> the C engine
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["gqa-v1", "gqa-v0", "mqa-v3", "theta-untied-v3", "untied-v0"])
def test_c_engine_matches_pytorch_on_exports(tmp_path, case):
    cfg, shared, version = {
        "gqa-v1": (GQA, True, 1), "gqa-v0": (GQA, True, 0), "mqa-v3": (MQA, True, 3),
        "theta-untied-v3": (THETA, False, 3), "untied-v0": (MHA, False, 0)}[case]
    model = ref_model(cfg, R.random_weights(cfg, 21, shared))
    ckpt = save_checkpoint(tmp_path / "ckpt.pt", model, iter_num=3)
    out = tmp_path / "model.bin"
    assert export(out, "--version", version, "--checkpoint", ckpt) == 0
    info = llama2c.Llama(out).config
    assert info.shared_classifier == shared and info.rope_theta == pytest.approx(
        cfg.rope_theta if version == 3 else 1e4)
    tokens = random_tokens(cfg, cfg.seq_len, 8)
    assert_close_1e4(c_engine(out, tokens), torch_logits(model, tokens), case)


def test_c_engine_int8_on_v2_export(tmp_path):
    from helpers import assert_q8_close

    model = ref_model(GQA, R.random_weights(GQA, 22, True))
    ckpt = save_checkpoint(tmp_path / "ckpt.pt", model)
    out = tmp_path / "q8.bin"
    assert export(out, "--version", "2", "--checkpoint", ckpt) == 0
    tokens = random_tokens(GQA, GQA.seq_len, 9)
    c = c_engine(out, tokens)
    ref = torch_logits(model, tokens)
    agree = np.mean(c.argmax(1) == ref.argmax(1))
    assert agree >= 0.75, f"int8 top-1 agrees with fp32 PyTorch on only {agree:.0%} of positions"
    # and exactly the int8 engine's math on the model's weights
    w = reference_weights(GQA, BinSource(write_bin(model, tmp_path / "f32.bin", 1)))
    assert_q8_close(c, GQA, w, tokens, binfmt.default_group_size(GQA.dim), what="v2 export")


class _Arbitrary:
    """Any class: weights_only=True must refuse to rebuild it."""


def test_checkpoint_variants(tmp_path):
    model = ref_model(GQA, R.random_weights(GQA, 5, True))
    expected = write_bin(model, tmp_path / "direct.bin", 1).read_bytes()
    # torch.compile / DDP prefixes and llama2.c's model_args (no hidden_dim, no tie flag)
    sd = {"_orig_mod." + k: v for k, v in model.state_dict().items()}
    margs = dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=GQA.vocab_size,
                 multiple_of=4, max_seq_len=GQA.seq_len, dropout=0.0)
    torch.save({"model": sd, "model_args": margs, "iter_num": 1, "best_val_loss": 1.0}, tmp_path / "c.pt")
    src = CheckpointSource(tmp_path / "c.pt")
    assert src.args.tie_embeddings and src.args.hidden_dim == 172
    assert write_bin(src, tmp_path / "c.bin", 1).read_bytes() == expected
    from llama2c.model import Transformer

    again = Transformer.from_checkpoint(tmp_path / "c.pt")
    tokens = random_tokens(GQA, 10, 1)
    np.testing.assert_array_equal(torch_logits(again, tokens), torch_logits(model, tokens))
    # no model_args: a one-line error
    torch.save({"model": model.state_dict()}, tmp_path / "bad.pt")
    assert export(tmp_path / "x.bin", "--version", "1", "--checkpoint", tmp_path / "bad.pt") == 1
    # weights_only refuses arbitrary objects
    torch.save({"model": model.state_dict(), "model_args": margs, "x": _Arbitrary()},
               tmp_path / "evil.pt")
    with pytest.raises(FormatError):
        CheckpointSource(tmp_path / "evil.pt")


def test_lossy_version_warns(tmp_path, capsys):
    model = ref_model(THETA, R.random_weights(THETA, 2, True))
    ckpt = save_checkpoint(tmp_path / "ckpt.pt", model)
    capsys.readouterr()
    assert export(tmp_path / "v1.bin", "--version", "1", "--checkpoint", ckpt) == 0
    assert "rope_theta" in capsys.readouterr().err
    assert export(tmp_path / "v3.bin", "--version", "3", "--checkpoint", ckpt) == 0
    assert "warning" not in capsys.readouterr().err


# ---------------------------------------------------------------------------
# Meta Llama 2 checkpoints
# ---------------------------------------------------------------------------


def _meta_dim(key):
    if key.endswith("norm.weight"):
        return None
    return 1 if key == "tok_embeddings.weight" or key.endswith(("wo.weight", "w2.weight")) else 0


def write_meta(folder, cfg, w, n_shards=2, dtype=torch.float32, **params):
    folder.mkdir()
    sd = ref_state_dict(cfg, w)
    shards = [dict() for _ in range(n_shards)]
    for k, v in sd.items():
        d = _meta_dim(k)
        parts = [v] * n_shards if d is None else list(v.chunk(n_shards, dim=d))
        for s, p in zip(shards, parts):
            s[k] = p.clone().to(dtype)
    for i, s in enumerate(shards):
        s["rope.freqs"] = torch.ones(cfg.head_size // 2)
        torch.save(s, folder / f"consolidated.{i:02d}.pth")
    p = {"dim": cfg.dim, "multiple_of": 4, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
         "n_layers": cfg.n_layers, "norm_eps": cfg.norm_eps, "vocab_size": -1, **params}
    (folder / "params.json").write_text(json.dumps(p))
    return folder


def test_meta_two_shards(tmp_path):
    w = R.random_weights(GQA, 31, shared=False)
    folder = write_meta(tmp_path / "llama-2-tiny", GQA, w)
    out = tmp_path / "meta.bin"
    assert export(out, "--version", "1", "--meta-llama", folder, "--max-seq-len", GQA.seq_len) == 0
    assert out.read_bytes() == R.model_bytes(GQA, w, 1)
    tokens = random_tokens(GQA, GQA.seq_len, 2)
    assert_close_1e4(c_engine(out, tokens), R.forward(GQA, w, tokens), "meta")
    # without --max-seq-len: llama2.c's 2048
    assert export(tmp_path / "b.bin", "--version", "1", "--meta-llama", folder) == 0
    assert struct.unpack_from("<i", (tmp_path / "b.bin").read_bytes(), 32)[0] == 2048


def test_meta_bf16_and_rope_theta(tmp_path):
    w = R.random_weights(MQA, 32, shared=False)
    folder = write_meta(tmp_path / "codellama-tiny", MQA, w, n_shards=2, dtype=torch.bfloat16,
                        rope_theta=1e6, max_seq_len=MQA.seq_len)
    out = tmp_path / "m.bin"
    assert export(out, "--version", "3", "--meta-llama", folder) == 0
    src = BinSource(out)
    assert src.args.rope_theta == 1e6 and src.args.max_seq_len == MQA.seq_len
    bf = {k: v.to(torch.bfloat16).float().numpy() for k, v in ref_state_dict(MQA, w).items()}
    for k in canonical_keys(src.args):
        assert np.array_equal(src.get(k), bf[k]), k


# ---------------------------------------------------------------------------
# Hugging Face
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def hf_logits(folder_or_model, tokens) -> np.ndarray:
    from transformers import LlamaForCausalLM

    m = folder_or_model
    if not hasattr(m, "forward"):
        m = LlamaForCausalLM.from_pretrained(str(m), attn_implementation="eager")
    m.eval()
    with torch.no_grad():
        return m(torch.tensor([list(tokens)])).logits[0].double().numpy()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["gqa-tied", "gqa-untied-theta"])
def test_hf_export_and_import_round_trip(transformers, tmp_path, case):
    cfg, shared = (GQA, True) if case == "gqa-tied" else (THETA, False)
    model = ref_model(cfg, R.random_weights(cfg, 41, shared))
    ckpt = save_checkpoint(tmp_path / "ckpt.pt", model)
    folder = tmp_path / "hf"
    assert export(folder, "--version", "hf", "--checkpoint", ckpt) == 0
    conf = json.loads((folder / "config.json").read_text())
    assert conf["architectures"] == ["LlamaForCausalLM"] and conf["model_type"] == "llama"
    # exporting again over the folder takes --force; stale shards beside it are refused
    assert export(folder, "--version", "hf", "--checkpoint", ckpt) == 1
    assert export(folder, "--version", "hf", "--checkpoint", ckpt, "--force") == 0
    (tmp_path / "stale").mkdir()
    (tmp_path / "stale" / "model-00001-of-00002.safetensors").write_bytes(b"")
    assert export(tmp_path / "stale", "--version", "hf", "--checkpoint", ckpt, "--force") == 1
    assert not (tmp_path / "stale" / "model.safetensors").exists()
    assert (conf["hidden_size"], conf["intermediate_size"], conf["num_hidden_layers"],
            conf["num_attention_heads"], conf["num_key_value_heads"], conf["vocab_size"],
            conf["max_position_embeddings"]) == cfg.params()
    assert conf["rope_theta"] == cfg.rope_theta and conf["rms_norm_eps"] == cfg.norm_eps
    assert conf["tie_word_embeddings"] is shared and conf["torch_dtype"] == "float32"
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert ("lm_head.weight" in f.keys()) == (not shared)
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == 2
    tokens = random_tokens(cfg, cfg.seq_len, 4)
    hf = hf_logits(folder, tokens)
    assert_close_1e4(hf, torch_logits(model, tokens), f"{case}: transformers vs llama2c.model")
    # import back: the exact same weights, and the C engine agrees with transformers
    back = tmp_path / "back.bin"
    assert export(back, "--version", "3", "--hf", folder) == 0
    assert back.read_bytes() == write_bin(model, tmp_path / "direct.bin", 3).read_bytes()
    assert_close_1e4(c_engine(back, tokens), hf, f"{case}: C engine vs transformers")


def random_hf_model(cfg: R.Config, tie: bool, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
                         num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                         num_key_value_heads=cfg.n_kv_heads, vocab_size=cfg.vocab_size,
                         max_position_embeddings=cfg.seq_len, rms_norm_eps=cfg.norm_eps,
                         rope_theta=cfg.rope_theta, tie_word_embeddings=tie)
    model = LlamaForCausalLM(config)
    with torch.no_grad():                     # O(1) logits instead of near-uniform ones
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.9, 1.1)
            else:
                p.normal_(0.0, (1.5 if name.endswith(("q_proj.weight", "k_proj.weight")) else 1.0)
                          / np.sqrt(p.shape[1]))
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["safetensors", "sharded", "pytorch_bin"])
def test_hf_import_from_save_pretrained(transformers, tmp_path, layout):
    cfg = dataclasses.replace(GQA, n_kv_heads=2, rope_theta=5e5, norm_eps=1e-6)
    tie = layout == "sharded"
    model = random_hf_model(cfg, tie, seed=5)
    folder = tmp_path / "hf"
    if layout == "safetensors":
        model.save_pretrained(folder)
    elif layout == "sharded":
        model.save_pretrained(folder, max_shard_size="100KB")
        assert (folder / "model.safetensors.index.json").is_file()
        assert len(list(folder.glob("model-*-of-*.safetensors"))) > 2
    else:
        folder.mkdir()
        model.config.to_json_file(folder / "config.json")
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    out = tmp_path / "m.bin"
    assert export(out, "--version", "3", "--hf", folder) == 0
    c = llama2c.Llama(out).config
    assert (c.n_kv_heads, c.rope_theta, c.norm_eps, c.shared_classifier) == \
        (2, 5e5, pytest.approx(1e-6), tie)
    tokens = random_tokens(cfg, cfg.seq_len, 6)
    assert_close_1e4(c_engine(out, tokens), hf_logits(model, tokens), layout)
    if tie:
        # no lm_head.weight among the weights means tied, whatever config.json says
        conf = json.loads((folder / "config.json").read_text())
        conf.pop("tie_word_embeddings", None)
        (folder / "config.json").write_text(json.dumps(conf))
        assert export(tmp_path / "m2.bin", "--version", "3", "--hf", folder) == 0
        assert (tmp_path / "m2.bin").read_bytes() == out.read_bytes()


@pytest.mark.slow
def test_hf_tokenizer_files(transformers, shared_data, tmp_path):
    model = ref_model(GQA, R.random_weights(GQA, 1, True))
    folder = write_hf(model, tmp_path / "hf", tokenizer=STORIES / "tok512.model")
    assert (folder / "tokenizer.model").read_bytes() == (STORIES / "tok512.model").read_bytes()
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    assert tc["tokenizer_class"] == "LlamaTokenizer" and tc["bos_token"] == "<s>"
    assert json.loads((folder / "special_tokens_map.json").read_text())["eos_token"] == "</s>"
    pytest.importorskip("google.protobuf", reason="transformers needs protobuf to read tokenizer.model")
    import sentencepiece as spm
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    sp = spm.SentencePieceProcessor(model_file=str(STORIES / "tok512.model"))
    text = "Once upon a time, Lily saw a big red ball."
    assert tok.encode(text) == [1] + sp.encode(text)


def test_hf_config_rejections():
    from llama2c.export import hf

    base = dict(model_type="llama", hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                num_attention_heads=8, vocab_size=100)
    a = hf.args_from_config(base)
    assert a["n_kv_heads"] == 8 and a["rope_theta"] == 10000.0 and a["tie_embeddings"] is False
    assert hf.args_from_config({**base, "rope_parameters": {"rope_type": "default",
                                                           "rope_theta": 5e5}})["rope_theta"] == 5e5
    for bad in ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, {"model_type": "gemma"},
                {"head_dim": 16}, {"attention_bias": True}, {"hidden_act": "gelu"}):
        with pytest.raises(ValueError):
            hf.args_from_config({**base, **bad})
    # the permutation round trip, per head count
    w = np.arange(32 * 5, dtype=np.float32).reshape(32, 5)
    for n in (1, 2, 4):
        assert np.array_equal(hf.hf_to_meta(hf.meta_to_hf(w, n), n), w)
    assert not np.array_equal(hf.meta_to_hf(w, 2), w)


# ---------------------------------------------------------------------------
# tokenizer.bin
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["llama2", "tok512"])
def test_tokenizer_export_is_byte_identical(shared_data, tmp_path, which):
    pytest.importorskip("sentencepiece")
    model, ref = {"llama2": (LLAMA2_TOK / "tokenizer.model", LLAMA2_TOK / "tokenizer.bin"),
                  "tok512": (STORIES / "tok512.model", STORIES / "tok512.bin")}[which]
    out = export_tokenizer(model, tmp_path / "tok.bin")
    assert out.read_bytes() == ref.read_bytes()


def test_tokenizer_export_default_path_and_errors(shared_data, tmp_path, capsys):
    pytest.importorskip("sentencepiece")
    from llama2c.export import tokenizer_bin

    model = tmp_path / "tok512.model"
    model.write_bytes((STORIES / "tok512.model").read_bytes())
    assert tokenizer_bin.main([str(model)]) == 0
    assert (tmp_path / "tok512.bin").read_bytes() == (STORIES / "tok512.bin").read_bytes()
    capsys.readouterr()
    assert tokenizer_bin.main([str(tmp_path / "missing.model")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("llama2c tokenizer export: error:") and err.count("\n") == 1
    (tmp_path / "junk.model").write_bytes(b"not a model")
    assert tokenizer_bin.main([str(tmp_path / "junk.model"), "-o", str(tmp_path / "j.bin")]) == 1
    assert not (tmp_path / "j.bin").exists()


# ---------------------------------------------------------------------------
# atomic writes, command line, imports
# ---------------------------------------------------------------------------


class _Failing(StateDictSource):
    def _get(self, key):
        if key == "layers.1.attention.wq.weight":
            raise RuntimeError("disk on fire")
        return super()._get(key)


def test_failed_export_leaves_no_partial_file(tmp_path):
    model = ref_model(GQA, R.random_weights(GQA, 3, True))
    for version in (0, 2):
        out = tmp_path / "model.bin"
        out.write_bytes(b"previous")
        with pytest.raises(RuntimeError, match="disk on fire"):
            write_bin(_Failing(model.params, model.state_dict()), out, version, force=True)
        assert out.read_bytes() == b"previous"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]
    with pytest.raises(RuntimeError):
        write_hf(_Failing(model.params, model.state_dict()), tmp_path / "hf")
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    assert not [p for p in (tmp_path / "hf").iterdir() if p.name.endswith(".tmp")]
    # a successful write gets the usual file mode, not mkstemp's 0600
    out = write_bin(model, tmp_path / "ok.bin", 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "model.bin", "ok.bin"]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def test_cli_errors(tmp_path, capsys, make_model):
    m = make_model(GQA, version=1, seed=1)
    cases = [
        ["x.bin", "--version", "1", "--bin", str(tmp_path / "missing.bin")],
        ["x.bin", "--version", "1", "--hf", str(tmp_path)],
        ["x.bin", "--version", "1", "--meta-llama", str(tmp_path)],
        ["x.bin", "--version", "1", "--checkpoint", str(m.path)],         # not a torch file
        ["x.bin", "--version", "1", "--bin", str(m.path), "--group-size", "8"],
        ["x.bin", "--version", "1", "--bin", str(m.path), "--tokenizer", str(m.tokenizer)],
        ["x.bin", "--version", "2", "--bin", str(m.path), "--group-size", "0"],
    ]
    for argv in cases:
        capsys.readouterr()
        argv[0] = str(tmp_path / argv[0])
        assert main(argv + ["-q"]) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("llama2c export: error:") and err.count("\n") == 1, (argv, err)
        assert not (tmp_path / "x.bin").exists()
    # usage errors: argparse's status 2
    assert main([str(tmp_path / "y.bin"), "--version", "7", "--bin", str(m.path)]) == 2
    assert main([str(tmp_path / "y.bin"), "--version", "1"]) == 2
    assert main([str(tmp_path / "y.bin"), "--version", "1", "--bin", "a", "--hf", "b"]) == 2


def test_importing_llama2c_does_not_import_torch():
    code = ("import sys, llama2c, llama2c.export, llama2c.export.tokenizer_bin, "
            "llama2c.export.binfmt, llama2c.export.hf; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
