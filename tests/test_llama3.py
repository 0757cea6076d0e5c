"""Llama 3-style models end to end (docs/LLAMA3.md): a byte-level BPE
tokenizer trained here with `tokenizers` (Llama 3's split regex, special
tokens <|begin_of_text|>, <|eot_id|>, ...) and a transformers
LlamaForCausalLM with GQA, rope_theta 500000 and llama3 rope scaling whose
original context (32) is short enough that the scaling changes the
frequencies, saved as a Hugging Face folder; then the same model as GGUF
files written here with the gguf package, by our exporter and (with
LLAMA2C_LLAMA_CPP_DIR) by llama.cpp's own convert_hf_to_gguf.py, run by
llama-cpp-python too when it is installed. Nothing is downloaded.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import llama2c
from llama2c.errors import FormatError, InvalidArgumentError

from helpers import REPO, STRINGS

pytest.importorskip("tokenizers")

# Llama 3's pre-tokenizer split (its tokenizer.json's regex)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
ORIGINAL_CTX = 32
SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": ORIGINAL_CTX}
# a Llama 3-format chat template (header, content, <|eot_id|> per message)
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
            "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
            "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
PROMPT = "Lily saw the kamiren by the solbri tree, and she said: it's a pharen! The dog ran to the big red ball"
TEXTS = STRINGS + ["café naïve über", " leading space", "🦙🦙 x", "don't  stop\n\nnow"]


def corpus(n: int = 400) -> list[str]:
    """Paragraphs of made-up words (syllables, so that BPE learns a few
    hundred merges), some words with accents, CJK and emoji."""
    rng = random.Random(0)
    syl = ["ka", "mi", "ren", "sol", "bri", "pha", "lo", "ta", "an", "el", "or", "us", "ith", "ze", "qu", "gon",
           "é", "ü", "ñ"]
    words = ["the", "a", "dog", "ran", "big", "red", "ball", "Lily", "said", "café", "naïve", "日本", "🙂", "don't",
             "it's", "1234", "3.14"]
    words += ["".join(rng.choice(syl) for _ in range(rng.randint(1, 3))) for _ in range(300)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) + ".\n" for _ in range(n)]


@pytest.fixture(scope="module")
def hf(tmp_path_factory, transformers, torch):
    """The Hugging Face folder, its tokenizer and model (float32, eager)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=700, show_progress=False,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(SPECIALS)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    spec = json.loads(tok.to_str())
    assert len(spec["model"]["merges"]) >= 300
    spec["model"]["ignore_merges"] = True  # as Llama 3's tokenizer.json
    tok = Tokenizer.from_str(json.dumps(spec))
    folder = tmp_path_factory.mktemp("llama3") / "model"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    fast.chat_template = TEMPLATE
    fast.save_pretrained(folder)
    eos = [tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot_id|>")]
    config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, rope_theta=500000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, bos_token_id=bos, eos_token_id=eos, rope_scaling=dict(SCALING),
                         initializer_range=0.1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    model.generation_config.save_pretrained(folder)
    return folder, AutoTokenizer.from_pretrained(folder), model


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def llm(hf, cache):
    return llama2c.Llama(hf[0], cache_dir=cache, n_threads=1)


def hf_logits(torch, model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].double().numpy()


def hf_greedy(torch, model, ids, n: int) -> list[int]:
    """Greedy new tokens, stopping after an EOS of the generation config (included)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([list(ids)]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def assert_rel_close(got, want, rel, what=""):
    err = float(np.abs(np.asarray(got, np.float64) - want).max())
    tol = rel * max(1.0, float(np.abs(want).max()))
    assert err <= tol, f"{what}: max |diff| {err:.3g} > {tol:.3g}"


def long_ids(llm) -> list[int]:
    ids = llm.tokenize(PROMPT + " " + PROMPT)
    assert len(ids) > 2 * ORIGINAL_CTX
    return ids


# ---------------------------------------------------------------------------
# rope scaling: the frequencies
# ---------------------------------------------------------------------------

def test_divisors_match_transformers_inverse_frequencies(hf, torch):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from llama2c.rope_scaling import RopeScaling

    config = hf[2].config
    hs, theta = 32, 500000.0
    want = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")[0].double().numpy()
    base = 1.0 / theta ** (np.arange(0, hs, 2, dtype=np.float64) / hs)
    div = np.array(RopeScaling.from_hf(SCALING).divisors(hs, theta))
    np.testing.assert_allclose(base / div, want, rtol=1e-6)
    # every branch is used: unscaled, scaled by the factor, and smoothed in between
    assert div[0] == 1.0 and div[-1] == 8.0 and ((div > 1) & (div < 8)).any()
    lin = RopeScaling.from_hf({"rope_type": "linear", "factor": 4.0})
    config.rope_parameters = {"rope_type": "linear", "factor": 4.0, "rope_theta": theta}
    try:
        want = ROPE_INIT_FUNCTIONS["linear"](config, "cpu")[0].double().numpy()
    finally:
        config.rope_parameters = dict(SCALING, rope_theta=theta)
    np.testing.assert_allclose(base / np.array(lin.divisors(hs, theta)), want, rtol=1e-6)


# ---------------------------------------------------------------------------
# the tokenizer
# ---------------------------------------------------------------------------

def test_tokenize_matches_transformers(llm, hf):
    tok = hf[1]
    assert type(llm.tokenizer).__name__ == "BPETokenizer"
    for text in TEXTS:
        assert llm.tokenize(text) == tok(text)["input_ids"], text
        assert llm.tokenize(text, add_bos=False) == tok.encode(text, add_special_tokens=False), text
        assert llm.detokenize(llm.tokenize(text)) == tok.decode(tok(text)["input_ids"], skip_special_tokens=True)
    # special tokens in text: parsed when asked (special=True, as transformers), plain text otherwise
    text = "<|start_header_id|>user<|end_header_id|> hi<|eot_id|>"
    assert llm.tokenize(text, special=True) == tok(text)["input_ids"]
    assert tok.convert_tokens_to_ids("<|eot_id|>") not in llm.tokenize(text)
    assert (llm.token_bos(), llm.token_eos()) == (tok.bos_token_id, tok.eos_token_id)
    assert set(llm.tokenizer.stop_ids) == {tok.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<|eot_id|>")}


def test_pieces_are_bytes_so_split_characters_stream(llm):
    tok = llm.tokenizer
    ids = llm.tokenize("🦙", add_bos=False)
    assert len(ids) > 1  # the llama is no token of this vocabulary: byte pieces
    parts = [tok.token_bytes(0, t) for t in ids]
    assert all(p and p != "🦙".encode() for p in parts) and b"".join(parts) == "🦙".encode()
    with pytest.raises(UnicodeDecodeError):
        parts[0].decode("utf-8")
    assert tok.token_bytes(0, llm.token_bos()) == b"" and tok.piece(llm.token_bos()) == b"<|begin_of_text|>"


# ---------------------------------------------------------------------------
# the model: logits, greedy tokens, streaming, chat
# ---------------------------------------------------------------------------

def test_logits_match_transformers_past_the_original_context(llm, hf, torch):
    _, _, model = hf
    c = llm.config
    assert (c.version, c.n_kv_heads, c.rope_theta, c.rope_scaling_type) == (3, 2, 500000.0, "llama3")
    assert c.rope_scaling.original_max_position_embeddings == ORIGINAL_CTX
    ids = long_ids(llm)
    ref = hf_logits(torch, model, ids)
    ours = llm.eval(ids)
    assert_rel_close(ours, ref, 1e-4, "all positions")
    assert_rel_close(ours[ORIGINAL_CTX:], ref[ORIGINAL_CTX:], 1e-4, "past the original context")
    # the scaling matters at these positions: without it the logits are far off
    from transformers import LlamaForCausalLM

    plain_config = model.config.__class__.from_dict(model.config.to_dict())
    plain_config.rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
    plain = LlamaForCausalLM(plain_config).eval()
    plain.load_state_dict(model.state_dict())
    assert np.abs(hf_logits(torch, plain, ids) - ref)[ORIGINAL_CTX:].max() > 0.05


def test_greedy_tokens_and_streamed_text_agree_with_transformers(llm, hf, torch):
    _, tok, model = hf
    ids = llm.tokenize(PROMPT)
    assert len(ids) > ORIGINAL_CTX // 2
    new = hf_greedy(torch, model, ids, 40)
    assert len(ids) + len(new) > ORIGINAL_CTX
    want = tok.decode(ids + new, skip_special_tokens=True)
    pieces = list(llm.stream(PROMPT, max_tokens=40, temperature=0))
    assert len(pieces) > 2 and "".join(pieces) == want
    assert llm.generate(PROMPT, max_tokens=40, temperature=0) == want
    done = llm.create_completion(PROMPT, max_tokens=40, temperature=0)
    assert PROMPT + done["choices"][0]["text"] == want
    assert done["usage"]["prompt_tokens"] == len(ids)
    stopped = new[-1] in llm.tokenizer.stop_ids
    assert done["usage"]["completion_tokens"] == len(new)
    assert done["choices"][0]["finish_reason"] == ("stop" if stopped else "length")
    chunks = llm.create_completion(PROMPT, max_tokens=40, temperature=0, stream=True)
    assert PROMPT + "".join(c["choices"][0]["text"] for c in chunks) == want


def test_sampled_stream_is_the_decode_of_its_tokens(llm):
    from llama2c.sampler import SamplingParams

    ids = llm.tokenize(PROMPT)
    sampling = SamplingParams(temperature=1.5, topp=1.0, seed=11)
    steps = list(llm._completer().run(ids, max_tokens=60, sampling=sampling))
    new = [s.token for s in steps if s.token is not None]
    text = "".join(llm.stream(PROMPT, max_tokens=60, sampling=sampling))
    assert text == llm.detokenize(ids + new) and len(new) > 10


def test_chat_completion_uses_the_folders_template(llm, hf, torch):
    _, tok, model = hf
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello friend"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert llm.chat_template.source == TEMPLATE
    new = hf_greedy(torch, model, ids, 16)
    reply = llm.create_chat_completion(messages, temperature=0, max_tokens=16)
    assert reply["usage"]["prompt_tokens"] == len(ids)
    assert reply["choices"][0]["message"]["content"] == tok.decode(new, skip_special_tokens=True)
    chunks = llm.create_chat_completion(messages, temperature=0, max_tokens=16, stream=True)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == \
        reply["choices"][0]["message"]["content"]


def test_generate_command_on_the_folder(llm, hf, cache, tmp_path):
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "xdg"))
    proc = subprocess.run([sys.executable, "-m", "llama2c", "generate", "--model", str(hf[0]), PROMPT,
                           "-n", "12", "-t", "0"], capture_output=True, env=env, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode("utf-8") == llm.generate(PROMPT, max_tokens=12, temperature=0) + "\n"


# ---------------------------------------------------------------------------
# .bin files keep the scaling; what cannot hold it refuses
# ---------------------------------------------------------------------------

def test_bin_round_trip_keeps_the_scaling(llm, hf, cache, tmp_path, transformers, torch):
    from llama2c.export.sources import BinSource, HFSource
    from llama2c.export.writers import write_bin, write_hf
    from llama2c.rope_scaling import RopeScaling

    folder = hf[0]
    want = RopeScaling("llama3", 8.0, 1.0, 4.0, ORIGINAL_CTX)
    ids = long_ids(llm)
    ref = llm.eval(ids)
    for version in (3, 4):
        with HFSource(folder) as src:
            assert src.args.rope_scaling == want
            path = write_bin(src, tmp_path / f"v{version}.bin", version)
        with BinSource(path) as back:
            assert back.args.rope_scaling == want
        other = llama2c.Llama(path, tokenizer=folder / "tokenizer.json", n_threads=1)
        assert other.config.rope_scaling == want
        if version == 3:
            assert np.array_equal(other.eval(ids), ref)
        else:
            assert_rel_close(other.eval(ids), ref, 0.05, "bf16")
    for version in (0, 1, 2):
        with HFSource(folder) as src, pytest.raises(ValueError, match="rope scaling"):
            write_bin(src, tmp_path / f"bad{version}.bin", version)
        assert not (tmp_path / f"bad{version}.bin").exists()
    with pytest.raises(InvalidArgumentError, match="llama3 rope scaling"):
        llama2c.Llama(folder, cache_dir=cache, dtype="int8")
    # back to a Hugging Face folder: transformers reads the scaling and computes the same logits
    write_hf(BinSource(tmp_path / "v3.bin"), tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["rope_scaling"]["rope_type"] == "llama3"
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert_rel_close(hf_logits(torch, back, ids), hf_logits(torch, hf[2], ids), 1e-5, "write_hf")
    # the PyTorch model has no rope scaling: it refuses rather than dropping it
    from llama2c.model import Transformer

    with pytest.raises(ValueError, match="rope scaling"):
        Transformer.from_bin(tmp_path / "v3.bin")


def test_linear_scaling_matches_transformers(hf, tmp_path, transformers, torch):
    folder = tmp_path / "linear"
    shutil.copytree(hf[0], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("rope_scaling", None)
    cfg["rope_parameters"] = {"rope_type": "linear", "factor": 4.0, "rope_theta": 500000.0}
    (folder / "config.json").write_text(json.dumps(cfg))
    model = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    llm = llama2c.Llama(folder, cache_dir=tmp_path / "cache", n_threads=1)
    assert llm.config.rope_scaling_type == "linear" and llm.config.rope_scaling.factor == 4.0
    ids = long_ids(llm)
    assert_rel_close(llm.eval(ids), hf_logits(torch, model, ids), 1e-4, "linear")


def test_unknown_rope_scaling_is_a_clear_error(hf, llm, cache, tmp_path):
    folder = tmp_path / "yarn"
    shutil.copytree(hf[0], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("rope_scaling", None)
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 500000.0,
                              "original_max_position_embeddings": 32}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="rope scaling 'yarn' is not supported"):
        llama2c.Llama(folder, cache_dir=tmp_path / "cache")
    # a .bin header with an unknown type, or llama3 factors that make no sense
    from llama2c.export.sources import BinSource

    good = next(Path(cache).glob("*/model.bin")).read_bytes()
    cases = {"unknown rope scaling type 9": good[:48] + b"\x09" + good[49:],
             "high_freq_factor > low_freq_factor": good[:56] + struct.pack("<ff", 4.0, 1.0) + good[64:],
             "original": good[:64] + struct.pack("<i", 0) + good[68:]}
    for i, (words, data) in enumerate(cases.items()):
        path = tmp_path / f"bad{i}.bin"
        path.write_bytes(data)
        with pytest.raises(FormatError, match=words):
            llama2c.Llama(path)
        with pytest.raises(FormatError, match=words):
            BinSource(path)


# ---------------------------------------------------------------------------
# GGUF: a "gpt2" vocabulary and rope_freqs, as llama.cpp's converter writes them
# ---------------------------------------------------------------------------

def hf_to_meta(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes Hugging Face's q/k row order (rotary halves -> adjacent pairs)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, -1).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf, path: Path, *, pre: str = "llama-bpe", rope_freqs: np.ndarray | None = None) -> Path:
    """The Hugging Face folder as llama.cpp's converter lays it out: F32
    tensors under llama.cpp's names (q / k in Meta's order), the gpt2
    tokenizer metadata, and the llama3 divisors in rope_freqs.weight."""
    gguf = pytest.importorskip("gguf")
    from safetensors.numpy import load_file

    folder, tok, model = hf
    c = model.config
    t = load_file(folder / "model.safetensors")
    spec = json.loads((folder / "tokenizer.json").read_text())
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    specials = {i for i, a in tok.added_tokens_decoder.items() if a.special}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tok.convert_ids_to_tokens(list(range(len(tok)))))
    w.add_token_types([3 if i in specials else 1 for i in range(len(tok))])
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_add_bos_token(True)
    w.add_chat_template(TEMPLATE)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.add_tensor("token_embd.weight", t["model.embed_tokens.weight"])
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.down_proj": "ffn_down",
             "mlp.up_proj": "ffn_up", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for layer in range(c.num_hidden_layers):
        for hname, gname in names.items():
            a = t[f"model.layers.{layer}.{hname}.weight"]
            if gname == "attn_q":
                a = hf_to_meta(a, c.num_attention_heads)
            elif gname == "attn_k":
                a = hf_to_meta(a, c.num_key_value_heads)
            w.add_tensor(f"blk.{layer}.{gname}.weight", np.ascontiguousarray(a))
    w.add_tensor("output_norm.weight", t["model.norm.weight"])
    w.add_tensor("output.weight", t["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def transformers_rope_freqs(model) -> np.ndarray:
    """The divisors as llama.cpp's converter derives them: unscaled / llama3 frequencies."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hs = model.config.hidden_size // model.config.num_attention_heads
    scaled = ROPE_INIT_FUNCTIONS["llama3"](model.config, "cpu")[0].double().numpy()
    return (1.0 / 500000.0 ** (np.arange(0, hs, 2, dtype=np.float64) / hs)) / scaled


def check_gguf_model(g, hf, torch, llm_folder, rel=1e-4):
    _, tok, model = hf
    assert type(g.tokenizer).__name__ == "BPETokenizer" and g.config.rope_scaling_type == "factors"
    for text in TEXTS:
        assert g.tokenize(text) == tok(text)["input_ids"], text
    assert set(g.tokenizer.stop_ids) >= {tok.eos_token_id, tok.convert_tokens_to_ids("<|eot_id|>")}
    ids = long_ids(g)
    assert_rel_close(g.eval(ids), hf_logits(torch, model, ids), rel, "GGUF vs transformers")
    prompt = g.tokenize(PROMPT)
    assert g.generate(PROMPT, max_tokens=24, temperature=0) == tok.decode(
        prompt + hf_greedy(torch, model, prompt, 24), skip_special_tokens=True)
    messages = [{"role": "user", "content": "hello friend"}]
    reply = g.create_chat_completion(messages, temperature=0, max_tokens=8)
    assert reply["usage"]["prompt_tokens"] == len(tok.apply_chat_template(messages, add_generation_prompt=True,
                                                                           return_dict=False))
    assert reply["choices"][0]["message"] == llm_folder.create_chat_completion(
        messages, temperature=0, max_tokens=8)["choices"][0]["message"]


def test_gguf_with_a_gpt2_vocabulary_and_rope_freqs(hf, llm, torch, tmp_path):
    path = write_gguf(hf, tmp_path / "m.gguf", rope_freqs=transformers_rope_freqs(hf[2]))
    g = llama2c.Llama(path, n_threads=1)
    check_gguf_model(g, hf, torch, llm)
    assert g.chat_template.source == TEMPLATE
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-m", "llama2c", "generate", "--model", str(path), PROMPT, "-n", "6",
                           "-t", "0"], capture_output=True, env=env, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode("utf-8") == g.generate(PROMPT, max_tokens=6, temperature=0) + "\n"


def test_gguf_pre_tokenizers(hf, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = write_gguf(hf, tmp_path / "qwen.gguf", pre="qwen2")
    g = llama2c.Llama(path)
    assert g.eval([1, 2]).shape == (2, g.config.vocab_size)  # the weights run
    with pytest.raises(FormatError, match="pre-tokenizer 'qwen2'"):
        g.tokenize("hello")
    # "gpt-2": GPT-2's split, as the tokenizers library's own ByteLevel pre-tokenizer does it
    g2 = llama2c.Llama(write_gguf(hf, tmp_path / "gpt2.gguf", pre="gpt-2"))
    spec = json.loads((hf[0] / "tokenizer.json").read_text())
    ref = Tokenizer(models.BPE(vocab=spec["model"]["vocab"],
                               merges=[tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
                                       for m in spec["model"]["merges"]]))
    ref.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    ref.add_special_tokens(SPECIALS)
    for text in TEXTS:
        assert g2.tokenize(text, add_bos=False) == ref.encode(text).ids, text
        assert g2.detokenize(g2.tokenize(text)) == text
    # the splits differ: Llama 3's keeps ".\n" together (a merge it learned), GPT-2's cannot
    llama3 = llama2c.Llama(write_gguf(hf, tmp_path / "l3.gguf"))
    assert g2.tokenize("end.\n") != llama3.tokenize("end.\n")
    assert len(llama3.tokenize("end.\n", add_bos=False)) < len(g2.tokenize("end.\n", add_bos=False))
    # llama.cpp's "default" split round-trips too
    d = llama2c.Llama(write_gguf(hf, tmp_path / "default.gguf", pre="default"))
    for text in TEXTS:
        assert d.detokenize(d.tokenize(text)) == text


def test_our_gguf_export_carries_the_scaling(llm, hf, tmp_path):
    pytest.importorskip("gguf")
    from llama2c.export.gguf import export_gguf
    from llama2c.export.sources import HFSource
    from llama2c.export.writers import write_bin

    with HFSource(hf[0]) as src:
        write_bin(src, tmp_path / "m.bin", 3)
    out = export_gguf(tmp_path / "m.bin", tmp_path / "m.gguf", "f32", vocab="synthetic")
    g = llama2c.Llama(out, tokenizer=hf[0] / "tokenizer.json", n_threads=1)
    assert g.config.rope_scaling_type == "factors"
    ids = long_ids(llm)
    assert_rel_close(g.eval(ids), llm.eval(ids), 1e-6, "exported GGUF")
    # linear: rope.scaling.type and .factor, read back by the engine and by the GGUF reader
    import dataclasses

    from llama2c.export.gguf_source import GGUFSource
    from llama2c.export.sources import BinSource
    from llama2c.rope_scaling import RopeScaling

    with BinSource(tmp_path / "m.bin") as src:
        src.args = dataclasses.replace(src.args, rope_scaling=RopeScaling("linear", 2.0))
        write_bin(src, tmp_path / "lin.bin", 3)
    lin = export_gguf(tmp_path / "lin.bin", tmp_path / "lin.gguf", "f32", vocab="synthetic")
    g = llama2c.Llama(lin, n_threads=1)
    assert (g.config.rope_scaling_type, g.config.rope_scaling) == ("linear", RopeScaling("linear", 2.0))
    assert np.array_equal(g.eval(ids), llama2c.Llama(tmp_path / "lin.bin", n_threads=1).eval(ids))
    with GGUFSource(lin) as src:
        assert src.args.rope_scaling == RopeScaling("linear", 2.0)


def test_bad_rope_freqs_are_format_errors(hf, tmp_path):
    good = transformers_rope_freqs(hf[2])
    cases = {"rope_freqs.weight is 8 x 1, expected 16 x 1": good[:8],
             "rope frequency factor 3 is nan": np.where(np.arange(16) == 3, np.nan, good),
             "rope frequency factor 0 is 0": np.where(np.arange(16) == 0, 0.0, good)}
    for i, (words, freqs) in enumerate(cases.items()):
        path = write_gguf(hf, tmp_path / f"bad{i}.gguf", rope_freqs=freqs)
        with pytest.raises(FormatError, match=words):
            llama2c.Llama(path)


def test_without_tokenizers_the_error_names_the_extra(hf, tmp_path, monkeypatch):
    llm = llama2c.Llama(write_gguf(hf, tmp_path / "m.gguf"))
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match=r'pip install "llama2c\[hf\]"'):
        llm.tokenize("hello")


def test_import_llama2c_does_not_import_tokenizers():
    code = "import sys, llama2c; assert 'tokenizers' not in sys.modules, 'tokenizers imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)


# ---------------------------------------------------------------------------
# llama.cpp's own converter and llama.cpp itself
# ---------------------------------------------------------------------------

CONVERT = """
import runpy, sys
src = sys.argv[1]
sys.path[:0] = [src, src + "/gguf-py"]
import conversion.base as base
# the pre-tokenizer is recognised by a hash of known vocabularies; this one is
# trained here, with Llama 3's split, so it is named as Llama 3's
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "llama-bpe"
sys.argv = [src + "/convert_hf_to_gguf.py"] + sys.argv[2:]
runpy.run_path(src + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def test_llama_cpp_converter_and_llama_cpp(hf, llm, torch, tmp_path):
    src = os.environ.get("LLAMA2C_LLAMA_CPP_DIR")
    if not src or not (Path(src) / "convert_hf_to_gguf.py").is_file():
        pytest.skip("set LLAMA2C_LLAMA_CPP_DIR to a llama.cpp source tree to run llama.cpp's converter")
    out = tmp_path / "cpp.gguf"
    proc = subprocess.run([sys.executable, "-c", CONVERT, src, str(hf[0]), "--outfile", str(out), "--outtype", "f32"],
                          capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    g = llama2c.Llama(out, n_threads=1)
    check_gguf_model(g, hf, torch, llm)
    try:
        import llama_cpp
    except ImportError:
        pytest.skip("llama_cpp (llama-cpp-python) is not importable: llama.cpp's logits not compared")
    ids = long_ids(g)
    cpp = llama_cpp.Llama(model_path=str(out), n_ctx=256, n_threads=1, n_threads_batch=1, logits_all=True,
                          type_k=0, type_v=0, verbose=False)  # fp32 KV cache: no fp16 rounding
    try:
        assert cpp.tokenize(PROMPT.encode("utf-8")) == g.tokenize(PROMPT)
        cpp.eval(ids)
        theirs = np.array(cpp.scores[:len(ids)], dtype=np.float64)
    finally:
        cpp.close()
    ours = g.eval(ids)
    assert_rel_close(ours, theirs, 1e-4, "ours vs llama.cpp")
    assert (ours.argmax(1) == theirs.argmax(1)).all()
