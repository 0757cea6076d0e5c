"""Models people already have, in from Python without torch:

- the numpy safetensors reader (llama2c/export/safetensors_np.py), against
  the safetensors package and against hostile headers;
- Hugging Face folders: ``llama2c.Llama(folder)`` converts once into a cache
  (llama2c/hf_in.py) and must compute what transformers computes, with torch
  blocked too;
- GGUF files: ``llama2c export OUT --version N --gguf IN.gguf``
  (llama2c/export/gguf_source.py) for every type our exporter writes and for
  K-quants, checked against block decoders written here from the format, and
  clear errors for what it cannot read (hostile headers included).

Tiny models: random Hugging Face LlamaForCausalLM models (transformers) with
the Llama 2 tokenizer.model from ../shared/data, and tests/reference.py models.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import llama2c
import reference as R
from helpers import LLAMA2_TOK, REPO, write_gguf
from llama2c.errors import FormatError
from llama2c.export import main as export_main
from llama2c.export.safetensors_np import SafetensorsFile
from llama2c.export.sources import BinSource, HFSource, open_source

IDS = [1, 450, 4996, 17354, 1701, 29889, 13, 450]


def export(*argv) -> int:
    return export_main([str(a) for a in argv] + ["-q"])


def run_python(code: str, block=(), env=None, timeout=180) -> subprocess.CompletedProcess:
    """A child interpreter in which the modules in `block` cannot be imported."""
    pre = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in block)
    full_env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run([sys.executable, "-c", pre + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=full_env)


# ---------------------------------------------------------------------------
# the safetensors reader
# ---------------------------------------------------------------------------


def st_file(path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> Path:
    """A safetensors file from a header (a dict or raw JSON bytes) and data,
    with the header length field overridable."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def test_reader_reads_f32_f16_bf16_as_the_values_stored(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 5)).astype(np.float32)
    h = rng.standard_normal((4,)).astype(np.float16)
    b = rng.standard_normal((2, 3)).astype(np.float32)
    b_bits = (b.view(np.uint32) >> 16).astype("<u2")       # bf16: the top halves
    header = {"__metadata__": {"format": "pt"},
              "a": {"dtype": "F32", "shape": [3, 5], "data_offsets": [0, 60]},
              "h": {"dtype": "F16", "shape": [4], "data_offsets": [60, 68]},
              "b": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [68, 80]},
              "i": {"dtype": "I64", "shape": [], "data_offsets": [80, 88]},
              "e": {"dtype": "F32", "shape": [0, 4], "data_offsets": [88, 88]}}
    data = a.astype("<f4").tobytes() + h.astype("<f2").tobytes() + b_bits.tobytes() + struct.pack("<q", 7)
    with SafetensorsFile(st_file(tmp_path / "x.safetensors", header, data)) as f:
        assert sorted(f.keys()) == ["a", "b", "e", "h", "i"] and f.metadata() == {"format": "pt"}
        assert np.array_equal(f.get_tensor("a"), a)
        assert np.array_equal(f.get_tensor("h"), h.astype(np.float32))
        assert np.array_equal(f.get_tensor("b"), (b.view(np.uint32) & 0xFFFF0000).view(np.float32))
        assert f.get_tensor("e").shape == (0, 4)
        assert f.get_tensor("a").dtype == np.float32 and f.shape("b") == (2, 3)
        with pytest.raises(FormatError, match="I64"):   # listed, refused when read
            f.get_tensor("i")


def test_reader_agrees_with_the_safetensors_package(tmp_path):
    torch = pytest.importorskip("torch")
    st = pytest.importorskip("safetensors.torch")
    g = torch.Generator().manual_seed(1)
    tensors = {"w32": torch.randn(7, 9, generator=g), "w16": torch.randn(5, 3, generator=g).half(),
               "wbf": torch.randn(4, 6, generator=g).bfloat16(), "v": torch.randn(11, generator=g)}
    path = tmp_path / "t.safetensors"
    st.save_file(tensors, str(path), metadata={"k": "v"})
    with SafetensorsFile(path) as f:
        assert f.metadata() == {"k": "v"}
        for name, t in tensors.items():
            assert np.array_equal(f.get_tensor(name), t.float().numpy()), name


def test_other_dtypes_go_through_torch_when_it_is_there(tmp_path):
    torch = pytest.importorskip("torch")
    st = pytest.importorskip("safetensors.torch")
    from llama2c.export.sources import _safetensors_tensor

    path = tmp_path / "f64.safetensors"
    st.save_file({"w": torch.arange(6, dtype=torch.float64).reshape(2, 3)}, str(path))
    with SafetensorsFile(path) as f:
        assert np.array_equal(np.asarray(_safetensors_tensor(f, "w")), np.arange(6.0).reshape(2, 3))
    proc = run_python(f"""
        from llama2c.export.safetensors_np import SafetensorsFile
        from llama2c.export.sources import _safetensors_tensor
        from llama2c.errors import FormatError
        try:
            _safetensors_tensor(SafetensorsFile({str(path)!r}), "w")
        except FormatError as e:
            print(e)
    """, block=("torch",))
    assert "is F64; llama2c reads F32, F16 and BF16" in proc.stdout, proc.stderr[-2000:]


HOSTILE = {
    "shorter than its length field": (None, b"", 0),
    "header length past the end": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, 10**6),
    "header length 2^64-1": ({}, b"", 2**64 - 1),
    "not JSON": (b"{not json", b"", None),
    "not UTF-8": (b'{"\xff": 1}', b"", None),
    "JSON list": (b"[1, 2]", b"", None),
    "duplicate names": (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                        b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', b"\0" * 8, None),
    "entry not an object": ({"a": [1, 2]}, b"", None),
    "unknown dtype": ({"a": {"dtype": "F31", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, None),
    "dtype not a string": ({"a": {"dtype": 5, "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, None),
    "negative dimension": ({"a": {"dtype": "F32", "shape": [-1, -4], "data_offsets": [0, 16]}}, b"\0" * 16, None),
    "float dimension": ({"a": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}, b"\0" * 4, None),
    "bool dimension": ({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4, None),
    "offsets past the end": ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, None),
    "offsets far past the end": ({"a": {"dtype": "F32", "shape": [2**40],
                                        "data_offsets": [0, 2**42]}}, b"\0" * 8, None),
    "negative offsets": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}, b"\0" * 4, None),
    "offsets reversed": ({"a": {"dtype": "F32", "shape": [0], "data_offsets": [4, 0]}}, b"\0" * 4, None),
    "three offsets": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}}, b"\0" * 8, None),
    "overlapping tensors": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                             "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, None),
    "huge shape, small span": ({"a": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 4]}},
                               b"\0" * 4, None),
    "shape product wraps 64 bits": ({"a": {"dtype": "F32", "shape": [2**32, 2**32, 1], "data_offsets": [0, 0]}},
                                    b"", None),
    "span larger than the shape": ({"a": {"dtype": "F16", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None),
    "metadata not strings": ({"__metadata__": {"a": 1}}, b"", None),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_safetensors_headers_are_format_errors(tmp_path, case):
    header, data, length = HOSTILE[case]
    path = tmp_path / "bad.safetensors"
    if header is None:
        path.write_bytes(b"\x10\0\0")
    else:
        st_file(path, header, data, length)
    with pytest.raises(FormatError):
        SafetensorsFile(path)


def test_hostile_safetensors_in_a_folder_is_one_line_export_error(tmp_path, capsys):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(
        {"model_type": "llama", "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
         "num_attention_heads": 2, "vocab_size": 300}))
    st_file(folder / "model.safetensors", {"model.embed_tokens.weight": {
        "dtype": "F32", "shape": [300, 8], "data_offsets": [0, 9600]}}, b"\0" * 100)
    with pytest.raises(FormatError, match="past the end"):
        HFSource(folder)
    capsys.readouterr()
    assert export(tmp_path / "m.bin", "--version", "1", "--hf", folder) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("llama2c export: error:") and "past the end" in err and "\n" not in err
    assert not (tmp_path / "m.bin").exists()


# ---------------------------------------------------------------------------
# Hugging Face folders
# ---------------------------------------------------------------------------

HF_CASES = {  # name: (hidden, intermediate, layers, heads, kv heads, tied, rope_theta, rms_norm_eps, dtype)
    "fp32-gqa-tied": (64, 172, 2, 8, 4, True, 10000.0, 1e-5, "float32"),
    "fp32-mha-untied": (48, 128, 2, 4, 4, False, 5e5, 1e-6, "float32"),
    "bf16-gqa-untied": (64, 96, 2, 8, 2, False, 10000.0, 1e-6, "bfloat16"),
}


@pytest.fixture(scope="module")
def llama2_tokenizer():
    path = LLAMA2_TOK / "tokenizer.model"
    if not path.is_file():
        pytest.skip("../shared/data/llama2/tokenizer.model not found: reference files are only present in "
                    "the development checkout")
    return path


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory, transformers, torch, llama2_tokenizer):
    """name -> (folder, reference model in float32 with exactly the saved values)."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("hf")
    out = {}
    for seed, (name, (d, h, L, H, KV, tie, theta, eps, dtype)) in enumerate(HF_CASES.items()):
        torch.manual_seed(100 + seed)
        config = LlamaConfig(hidden_size=d, intermediate_size=h, num_hidden_layers=L, num_attention_heads=H,
                             num_key_value_heads=KV, vocab_size=32000, max_position_embeddings=64,
                             rms_norm_eps=eps, rope_theta=theta,
                             tie_word_embeddings=tie)
        model = LlamaForCausalLM(config)
        with torch.no_grad():                     # O(1) logits instead of near-uniform ones
            for pname, p in model.named_parameters():
                if p.dim() == 1:
                    p.uniform_(0.9, 1.1)
                else:
                    p.normal_(0.0, (1.5 if "q_proj" in pname or "k_proj" in pname else 1.0) / np.sqrt(p.shape[1]))
                if dtype == "bfloat16":           # the reference holds the bf16 values exactly
                    p.copy_(p.to(torch.bfloat16).float())
        model.eval()
        folder = root / name
        saved = copy.deepcopy(model).to(torch.bfloat16) if dtype == "bfloat16" else model
        saved.save_pretrained(folder)
        shutil.copy(llama2_tokenizer, folder / "tokenizer.model")
        conf = json.loads((folder / "config.json").read_text())
        assert conf.get("torch_dtype", conf.get("dtype")) == dtype
        out[name] = (folder, model)
    return out


def hf_logits(torch, model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].double().numpy()


def hf_greedy(torch, model, ids, n) -> list[int]:
    ids = list(ids)
    for _ in range(n):
        ids.append(int(hf_logits(torch, model, ids)[-1].argmax()))
    return ids


def our_greedy(llm, ids, n) -> list[int]:
    ctx = llm.create_context()
    ids = list(ids)
    logits = None
    for pos, t in enumerate(ids):
        logits = ctx.forward(t, pos)
    for _ in range(n):
        ids.append(int(np.argmax(logits)))
        logits = ctx.forward(ids[-1], len(ids) - 1)
    return ids


def assert_rel_close(got, want, rel, what=""):
    err = float(np.abs(np.asarray(got, np.float64) - want).max())
    tol = rel * max(1.0, float(np.abs(want).max()))
    assert err <= tol, f"{what}: max |diff| {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("name", list(HF_CASES))
def test_llama_on_a_folder_matches_transformers(hf_models, torch, tmp_path, name, capsys):
    folder, model = hf_models[name]
    cache = tmp_path / "cache"
    llm = llama2c.Llama(folder, cache_dir=cache, n_threads=1)
    bf16 = HF_CASES[name][-1] == "bfloat16"
    c = llm.config
    assert (c.version, c.weights) == ((4, "bf16") if bf16 else (3, "f32"))   # the folder's own dtype
    d, _, _, _, kv, tied, theta, eps, _ = HF_CASES[name]
    assert (c.dim, c.n_kv_heads, c.shared_classifier, c.rope_theta) == (d, kv, tied, theta)
    assert c.norm_eps == pytest.approx(eps)
    ref = hf_logits(torch, model, IDS)
    # fp32: the same math in another order; bf16: exact weights, fused multiply-adds
    assert_rel_close(llm.eval(IDS), ref, 1e-3 if bf16 else 1e-4, name)
    assert our_greedy(llm, IDS[:3], 12) == hf_greedy(torch, model, IDS[:3], 12)
    # the folder's tokenizer.model became tokenizer.bin
    sp = pytest.importorskip("sentencepiece").SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    for text in ("Hello, world!", "  two spaces, émigré 🦙"):
        assert llm.tokenize(text) == [1] + sp.encode(text)
    assert "converting" in capsys.readouterr().err


def test_the_cache_is_reused_and_keyed_by_files_and_dtype(hf_models, tmp_path, capsys):
    folder, _ = hf_models["fp32-gqa-tied"]
    cache = tmp_path / "cache"
    a = llama2c.Llama(folder, cache_dir=cache)
    (key,) = [p for p in cache.iterdir()]
    model = key / "model.bin"
    assert sorted(p.name for p in key.iterdir()) == ["model.bin", "source.json", "tokenizer.bin"]
    assert json.loads((key / "source.json").read_text())["dtype"] == "fp32"
    stamp = model.stat().st_mtime_ns
    capsys.readouterr()
    b = llama2c.Llama(folder, cache_dir=cache)
    assert "converting" not in capsys.readouterr().err and model.stat().st_mtime_ns == stamp
    assert np.array_equal(a.eval(IDS), b.eval(IDS))
    assert Path(b.model_path) == model
    # other dtypes: other entries
    q = llama2c.Llama(folder, cache_dir=cache, dtype="int8")
    h = llama2c.Llama(folder, cache_dir=cache, dtype="bf16")
    assert (q.config.version, q.config.weights, h.config.version) == (2, "q8_0", 4)
    assert len(list(cache.iterdir())) == 3
    assert_rel_close(h.eval(IDS), a.eval(IDS).astype(np.float64), 0.05, "bf16 vs fp32")
    # a changed weight file: converted again
    st = folder / "model.safetensors"
    os.utime(st, ns=(st.stat().st_atime_ns, st.stat().st_mtime_ns + 10**9))
    llama2c.Llama(folder, cache_dir=cache)
    assert len(list(cache.iterdir())) == 4
    # no leftovers of the atomic writes
    assert not [p for p in cache.rglob("*.tmp")]


def test_default_cache_is_under_xdg_cache_home(hf_models, tmp_path, monkeypatch):
    folder, _ = hf_models["fp32-mha-untied"]
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    llm = llama2c.Llama(folder)
    assert Path(llm.model_path).parent.parent == tmp_path / "xdg" / "llama2c" / "hf"


def test_bad_dtype_arguments(hf_models, tmp_path, make_model):
    folder, _ = hf_models["fp32-mha-untied"]
    with pytest.raises(llama2c.InvalidArgumentError, match="dtype"):
        llama2c.Llama(folder, dtype="fp8", cache_dir=tmp_path)
    # version 2 files cannot carry rope_theta 5e5: refused rather than silently changed
    with pytest.raises(llama2c.InvalidArgumentError, match="rope_theta 500000"):
        llama2c.Llama(folder, dtype="int8", cache_dir=tmp_path)
    assert not list(tmp_path.rglob("model.bin"))
    m = make_model(R.Config(dim=32, hidden_dim=64, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=300,
                            seq_len=16), version=1, seed=5)
    with pytest.raises(llama2c.InvalidArgumentError, match="folders"):
        llama2c.Llama(m.path, dtype="bf16")
    with pytest.raises(llama2c.Llama2IOError, match="config.json"):
        llama2c.Llama(tmp_path, cache_dir=tmp_path / "c")


def test_a_folder_without_torch(hf_models, tmp_path):
    """import llama2c + Llama(folder) + the export command: torch blocked."""
    folder, _ = hf_models["bf16-gqa-untied"]
    want = llama2c.Llama(folder, cache_dir=tmp_path / "ref").eval(IDS)
    out = tmp_path / "logits.npy"
    proc = run_python(f"""
        import numpy as np, llama2c
        llm = llama2c.Llama({str(folder)!r}, cache_dir={str(tmp_path / 'c')!r})
        np.save({str(out)!r}, llm.eval({IDS}))
        print(llm.generate("Once upon", steps=6, temperature=0))
        from llama2c.export import main
        assert main([{str(tmp_path / 'x.bin')!r}, "--version", "3", "--hf", {str(folder)!r}, "-q"]) == 0
        assert "transformers" not in sys.modules and sys.modules["torch"] is None
    """, block=("torch",))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("Once upon")
    assert np.array_equal(np.load(out), want)
    assert BinSource(tmp_path / "x.bin").args.n_kv_heads == 2


def test_without_sentencepiece_the_error_says_pass_tokenizer(hf_models, tmp_path):
    folder, _ = hf_models["fp32-gqa-tied"]
    proc = run_python(f"""
        import llama2c
        try:
            llama2c.Llama({str(folder)!r}, cache_dir={str(tmp_path / 'c')!r})
        except ImportError as e:
            print("ERR", e)
        llm = llama2c.Llama({str(folder)!r}, cache_dir={str(tmp_path / 'c')!r},
                            tokenizer={str(LLAMA2_TOK / 'tokenizer.bin')!r})
        print("OK", llm.tokenize("Hello"))
    """, block=("sentencepiece",))
    assert proc.returncode == 0, proc.stderr[-3000:]
    err, ok = proc.stdout.strip().splitlines()
    assert err.startswith("ERR") and "sentencepiece" in err and "tokenizer=" in err
    assert ok == "OK [1, 15043]"


def test_info_and_generate_commands_take_a_folder(hf_models, tmp_path):
    folder, _ = hf_models["fp32-mha-untied"]
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    info = run_python(f"from llama2c.cli import main; sys.exit(main(['info', {str(folder)!r}]))", env=env)
    assert info.returncode == 0, info.stderr
    assert "version 3" in info.stdout and "kv heads 4" in info.stdout
    gen = run_python(f"from llama2c.cli import main; sys.exit(main(['generate', '--model', {str(folder)!r}, "
                     "'-t', '0', '-n', '8', 'Hello']))", env=env)
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith("Hello")


# ---------------------------------------------------------------------------
# GGUF in
# ---------------------------------------------------------------------------

GCFG = R.Config(dim=64, hidden_dim=192, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=384, seq_len=64)


@pytest.fixture(scope="module")
def gguf():
    return pytest.importorskip("gguf", reason="GGUF files are written with the gguf package")


def gguf_tensors(path) -> dict:
    """name -> (ggml type id, ne, raw bytes) of a GGUF file, through the gguf
    package's reader (trusted files only)."""
    import gguf

    r = gguf.GGUFReader(str(path))
    return {t.name: (int(t.tensor_type), tuple(int(x) for x in t.shape), np.asarray(t.data).reshape(-1).view(np.uint8))
            for t in r.tensors}


def f16(b: np.ndarray) -> np.ndarray:
    return b.copy().view("<f2").astype(np.float32)


def decode(ttype: int, ne, raw: np.ndarray) -> np.ndarray:
    """Block decoders written from the ggml formats: F32, F16, BF16, Q8_0,
    Q4_0 (32 values: fp16 scale, low nibbles first), Q4_K (256 values: fp16
    d and dmin, twelve bytes of 6-bit scales and mins, 128 bytes of nibbles)."""
    cols = ne[0]
    if ttype == 0:
        v = raw.copy().view("<f4")
    elif ttype == 1:
        v = f16(raw)
    elif ttype == 30:
        v = (raw.copy().view("<u2").astype(np.uint32) << 16).view(np.float32)
    elif ttype == 8:
        b = raw.reshape(-1, 34)
        v = (b[:, 2:].view(np.int8).astype(np.float32) * f16(b[:, :2])).reshape(-1)
    elif ttype == 2:
        b = raw.reshape(-1, 18)
        q = np.concatenate([b[:, 2:] & 15, b[:, 2:] >> 4], axis=1).astype(np.float32) - 8
        v = (q * f16(b[:, :2])).reshape(-1)
    elif ttype == 12:
        out = []
        for blk in raw.reshape(-1, 144):
            d, dmin = f16(blk[0:2])[0], f16(blk[2:4])[0]
            s, qs = blk[4:16].astype(np.int32), blk[16:]

            def scale_min(j):
                if j < 4:
                    return s[j] & 63, s[j + 4] & 63
                return (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4)

            for chunk in range(4):
                q = qs[32 * chunk:32 * chunk + 32]
                for j, nib in ((2 * chunk, q & 15), (2 * chunk + 1, q >> 4)):
                    sc, m = scale_min(j)
                    out.append(np.float32(d * sc) * nib.astype(np.float32) - np.float32(dmin * m))
        v = np.concatenate(out)
    else:
        raise AssertionError(f"no decoder for type {ttype}")
    return v.reshape(-1, cols)


@pytest.fixture(scope="module")
def gmodels(make_model):
    return {shared: make_model(GCFG, version=1, seed=70 + shared, shared=shared) for shared in (True, False)}


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("ftype", ["f32", "f16", "bf16", "q8_0", "q4_0"])
def test_gguf_round_trip_is_the_dequantized_weights(gguf, gmodels, tmp_path, ftype, shared):
    from llama2c.export.gguf import export_gguf
    from llama2c.export.gguf_source import gguf_name

    m = gmodels[shared]
    g = export_gguf(m.path, tmp_path / f"m_{ftype}.gguf", ftype, vocab=str(m.tokenizer))
    out = tmp_path / "out" / "back.bin"
    assert export(out, "--version", "1", "--gguf", g) == 0
    raw = gguf_tensors(g)
    with BinSource(out) as back:
        assert back.args.tie_embeddings == shared and back.args.vocab_size == GCFG.vocab_size
        for key in back.keys():
            ttype, ne, data = raw[gguf_name(key)]
            want = decode(ttype, ne, data).reshape(back.get(key).shape)
            assert np.array_equal(back.get(key), want), key
            if ftype in ("f32",):
                assert np.array_equal(back.get(key), BinSource(m.path).get(key)), key
    # its vocabulary, as the file it came from
    assert (out.parent / "tokenizer.bin").read_bytes() == m.tokenizer.read_bytes()
    # the engine reads the GGUF exactly as the converted file (F16 widened,
    # BF16 as version 4, Q8_0 as version 2 with groups of 32, Q4_0 as version 5)
    if ftype == "bf16":
        assert export(out, "--version", "4", "--gguf", g, "--force") == 0
    elif ftype == "q4_0":
        assert export(out, "--version", "5", "--gguf", g, "--force") == 0
    elif ftype == "q8_0":
        assert export(out, "--version", "2", "--group-size", "32", "--gguf", g, "--force") == 0
    ids = [1] + list(range(5, 40))
    assert np.array_equal(llama2c.Llama(g).eval(ids), llama2c.Llama(out).eval(ids))


def test_gguf_conversion_without_torch(gguf, gmodels, tmp_path):
    from llama2c.export.gguf import export_gguf

    m = gmodels[True]
    g = export_gguf(m.path, tmp_path / "m.gguf", "q4_0", vocab=str(m.tokenizer))
    out, out5 = tmp_path / "o" / "m.bin", tmp_path / "o" / "m5.bin"
    proc = run_python(f"""
        from llama2c.export import main
        rc = main([{str(out)!r}, "--version", "0", "--gguf", {str(g)!r}, "-q"])
        rc = rc or main([{str(out5)!r}, "--version", "5", "--gguf", {str(g)!r}, "-q", "--force"])
        assert sys.modules["torch"] is None
        sys.exit(rc)
    """, block=("torch",))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = [1, 5, 6, 7]
    # Q4_0 runs as the Q4_0 engine: as the version 5 file of the same blocks; the
    # version 0 file holds them dequantized
    assert np.array_equal(llama2c.Llama(out5).eval(ids), llama2c.Llama(g).eval(ids))
    with BinSource(out) as a, BinSource(out5) as b:
        assert all(np.array_equal(a.get(k), b.get(k)) for k in a.keys())


def test_gguf_hyperparameters_and_every_bin_version(gguf, make_model, tmp_path):
    from llama2c.export.gguf import export_gguf

    cfg = R.Config(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, seq_len=40,
                   rope_theta=5e5, norm_eps=1e-6)
    m = make_model(cfg, version=3, seed=72, shared=False)
    g = export_gguf(m.path, tmp_path / "m.gguf", "f32", vocab=str(m.tokenizer))
    with open_source("gguf", g) as src, BinSource(m.path) as ref:
        # the same float32 values (GGUFSource reads 1e-06, BinSource 9.99999997e-07)
        assert np.float32(src.args.norm_eps) == np.float32(ref.args.norm_eps)
        assert src.args == dataclasses.replace(ref.args, norm_eps=src.args.norm_eps)
        assert src.args.norm_eps == 1e-6
    for v in ("0", "1", "2", "3", "4"):
        out = tmp_path / f"v{v}.bin"
        assert export(out, "--version", v, "--gguf", g) == 0
        with BinSource(out) as b:
            assert b.version == int(v)
            if v in ("3", "4"):
                assert (b.args.rope_theta, np.float32(b.args.norm_eps)) == (5e5, np.float32(1e-6))
    assert (tmp_path / "v3.bin").read_bytes() == m.path.read_bytes()
    # --max-seq-len applies
    assert export(tmp_path / "short.bin", "--version", "3", "--gguf", g, "--max-seq-len", "16") == 0
    assert BinSource(tmp_path / "short.bin").args.max_seq_len == 16


def test_gguf_to_hf_folder(gguf, gmodels, tmp_path, transformers, torch):
    from llama2c.export.gguf import export_gguf

    m = gmodels[False]
    g = export_gguf(m.path, tmp_path / "m.gguf", "f16", vocab=str(m.tokenizer))
    folder = tmp_path / "hf"
    assert export(folder, "--version", "hf", "--gguf", g) == 0
    assert (folder / "tokenizer.bin").read_bytes() == m.tokenizer.read_bytes()
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(folder), attn_implementation="eager").eval()
    ids = [1] + list(range(5, 30))
    assert_rel_close(llama2c.Llama(g, n_threads=1).eval(ids), hf_logits(torch, model, ids), 1e-4, "gguf vs hf")


def test_gguf_from_llama_cpps_converter_needs_no_permutation(hf_models, tmp_path):
    """wq / wk of a GGUF that llama.cpp's own convert_hf_to_gguf.py wrote are in
    Meta's layout: read without permutation, they equal the HF folder's with
    HF's permutation undone, and compute transformers' logits. Needs a llama.cpp
    source tree (LLAMA2C_LLAMA_CPP_DIR, e.g. llama-cpp-python's vendor/llama.cpp)."""
    src = os.environ.get("LLAMA2C_LLAMA_CPP_DIR")
    if not src or not (Path(src) / "convert_hf_to_gguf.py").is_file():
        pytest.skip("set LLAMA2C_LLAMA_CPP_DIR to a llama.cpp source tree to run llama.cpp's converter")
    folder, _ = hf_models["fp32-mha-untied"]
    out = tmp_path / "conv.gguf"
    proc = subprocess.run([sys.executable, str(Path(src) / "convert_hf_to_gguf.py"), str(folder), "--outfile",
                           str(out), "--outtype", "f32"], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(Path(src) / "gguf-py")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open_source("gguf", out) as g, open_source("hf", folder) as h:
        assert g.args == h.args
        for key in h.keys():
            assert np.array_equal(g.get(key), h.get(key)), key
        assert g.tokenizer_bin_bytes() == (LLAMA2_TOK / "tokenizer.bin").read_bytes()


KCFG = R.Config(dim=256, hidden_dim=512, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=300, seq_len=32)


def q4_k_bytes(rows: int, cols: int, rng) -> np.ndarray:
    """Random valid Q4_K blocks: small positive fp16 d / dmin, random scales and nibbles."""
    blocks = rng.integers(0, 256, (rows * cols // 256, 144), dtype=np.uint8)
    blocks[:, 0:2] = rng.uniform(1e-4, 4e-4, (len(blocks), 1)).astype("<f2").view(np.uint8)
    blocks[:, 2:4] = rng.uniform(1e-4, 4e-4, (len(blocks), 1)).astype("<f2").view(np.uint8)
    return blocks.reshape(rows, cols // 256 * 144)


def write_k_quant_gguf(gguf, m, path, seed=0) -> Path:
    """m's model as a GGUF whose every matrix is random Q4_K data (norms F32)."""
    rng = np.random.default_rng(seed)

    def raw(name, data):
        if data.ndim != 2:
            return None
        return q4_k_bytes(*data.shape, rng), gguf.GGMLQuantizationType.Q4_K

    return write_gguf(m, path, raw=raw)


def test_k_quant_gguf_converts_and_runs(gguf, make_model, tmp_path, capsys):
    from llama2c.export.gguf_source import gguf_name

    m = make_model(KCFG, version=1, seed=73, shared=False)
    g = write_k_quant_gguf(gguf, m, tmp_path / "k.gguf")
    with pytest.warns(llama2c.ConversionWarning, match="Q4_K"):  # runs, dequantized to bf16 at load
        direct = llama2c.Llama(g)
    out = tmp_path / "k.bin"
    assert export(out, "--version", "1", "--gguf", g) == 0
    raw = gguf_tensors(g)
    with open_source("gguf", g) as src, BinSource(out) as back:
        assert src.tensor_type("layers.0.feed_forward.w2.weight") == "Q4_K"
        for key in back.keys():
            ttype, ne, data = raw[gguf_name(key)]
            want = decode(ttype, ne, data).reshape(back.get(key).shape)
            np.testing.assert_allclose(back.get(key), want, rtol=1e-6, atol=1e-9, err_msg=key)
    llm = llama2c.Llama(out)
    logits = llm.eval([1, 5, 6, 7])
    assert np.isfinite(logits).all() and logits.std() > 0
    assert llm.generate("ab", steps=6, temperature=0).startswith("ab")
    # the direct run is the converted fp32 file's up to its bf16 rounding (2^-9 relative)
    assert np.abs(direct.eval([1, 5, 6, 7]) - logits).max() <= 0.01 * np.abs(logits).max()


def broken_gguf(gguf, m, path, *, arch="llama", drop=(), extra=(), meta=None) -> Path:
    from llama2c.export import gguf as ex
    from llama2c.export.binmodel import read_model
    from llama2c.export.vocab import load_vocab

    src = read_model(m.path)
    w = gguf.GGUFWriter(str(path), arch)
    ex._add_metadata(w, gguf, src, "f32", "t")
    ex._add_vocab(w, load_vocab(str(m.tokenizer), src.vocab_size, m.path))
    for key, value in (meta or {}).items():
        (w.add_string if isinstance(value, str) else w.add_uint32)(key, value)
    real_add = w.add_tensor
    w.add_tensor = lambda name, data, **kw: None if name in drop else real_add(name, data, **kw)
    ex._add_tensors(w, gguf, src, "f32", False)
    for name in extra:
        real_add(name, np.zeros(src.dim, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unsupported_gguf_files_are_named_errors(gguf, gmodels, tmp_path, capsys):
    m = gmodels[True]
    cases = {
        "architecture 'gpt2'": dict(arch="gpt2"),
        "no tensor blk.1.ffn_up.weight": dict(drop=("blk.1.ffn_up.weight",)),
        "rope scaling 'yarn'": dict(meta={"llama.rope.scaling.type": "yarn"}),
        "rope_freqs.weight": dict(extra=("rope_freqs.weight",)),
        "blk.0.attn_q.bias is not part": dict(extra=("blk.0.attn_q.bias",)),
        "mixture-of-experts": dict(meta={"llama.expert_count": 8}),
        "key_length = 4 differs from the head size 8": dict(meta={"llama.attention.key_length": 4}),
    }
    for i, (words, kw) in enumerate(cases.items()):
        path = broken_gguf(gguf, m, tmp_path / f"b{i}.gguf", **kw)
        with pytest.raises(FormatError, match=words.replace("(", r"\(")):
            open_source("gguf", path)
        capsys.readouterr()
        assert export(tmp_path / f"b{i}.bin", "--version", "1", "--gguf", path) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("llama2c export: error:") and "\n" not in err, err
        assert not (tmp_path / f"b{i}.bin").exists()


def test_gguf_without_a_sentencepiece_vocabulary_warns(gguf, gmodels, tmp_path, capsys):
    from llama2c.export.binmodel import read_model

    m = gmodels[True]
    src = read_model(m.path)
    path = tmp_path / "bpe.gguf"
    from llama2c.export import gguf as ex

    w = gguf.GGUFWriter(str(path), "llama")
    ex._add_metadata(w, gguf, src, "f32", "t")
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(src.vocab_size)])
    ex._add_tensors(w, gguf, src, "f32", False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    capsys.readouterr()
    assert export(tmp_path / "o" / "m.bin", "--version", "1", "--gguf", path) == 0
    assert "no tokenizer.bin written" in capsys.readouterr().err
    assert not (tmp_path / "o" / "tokenizer.bin").exists()


def test_an_existing_different_tokenizer_bin_needs_force(gguf, gmodels, tmp_path, capsys):
    from llama2c.export.gguf import export_gguf

    m = gmodels[True]
    g = export_gguf(m.path, tmp_path / "m.gguf", "f32", vocab=str(m.tokenizer))
    out = tmp_path / "o"
    out.mkdir()
    (out / "tokenizer.bin").write_bytes(b"mine")
    capsys.readouterr()
    assert export(out / "m.bin", "--version", "1", "--gguf", g) == 1
    assert "tokenizer.bin already exists" in capsys.readouterr().err
    assert not (out / "m.bin").exists() and (out / "tokenizer.bin").read_bytes() == b"mine"
    assert export(out / "m.bin", "--version", "1", "--gguf", g, "--force") == 0
    assert (out / "tokenizer.bin").read_bytes() == m.tokenizer.read_bytes()
    # the same vocabulary already there: fine without --force
    assert export(out / "m2.bin", "--version", "1", "--gguf", g) == 0


def test_hostile_gguf_headers(tmp_path):
    """Claimed lengths and counts larger than the file are FormatErrors, found
    at once (gguf's own GGUFReader loops for the claimed count of this first
    file: it would hang)."""
    def kv_file(body: bytes, n_kv=1, n_tensors=0, version=3) -> Path:
        p = tmp_path / f"h{len(list(tmp_path.iterdir()))}.gguf"
        p.write_bytes(b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + body + b"\0" * 64)
        return p

    def key(name: bytes) -> bytes:
        return struct.pack("<Q", len(name)) + name

    cases = [
        kv_file(key(b"a") + struct.pack("<IIQ", 9, 0, 2**40)),             # uint8 array of 2^40
        kv_file(key(b"a") + struct.pack("<IIQ", 9, 8, 2**40)),             # string array of 2^40
        kv_file(key(b"a") + struct.pack("<IQ", 8, 2**63)),                 # string of 2^63 bytes
        kv_file(struct.pack("<Q", 2**62)),                                 # key of 2^62 bytes
        kv_file(key(b"a") + struct.pack("<I", 77)),                        # unknown value type
        kv_file(key(b"a") + struct.pack("<II", 9, 9) * 6 + struct.pack("<Q", 1)),   # nested too deep
        kv_file(b"", n_kv=2**40),
        kv_file(b"", n_kv=0, version=1),
        kv_file(b"", n_kv=0, n_tensors=1),                                 # a tensor cut short
        kv_file(key(b"w") + struct.pack("<I", 2) + struct.pack("<QQ", 2**31, 2**31) + struct.pack("<IQ", 0, 0),
                n_kv=0, n_tensors=1),                                      # beyond the file
        kv_file(key(b"w") + struct.pack("<I", 9), n_kv=0, n_tensors=1),     # 9 dimensions
        kv_file(key(b"w") + struct.pack("<IQIQ", 1, 32, 0, 3), n_kv=0, n_tensors=1),   # misaligned
        kv_file(key(b"w") + struct.pack("<IQIQ", 1, 31, 8, 0), n_kv=0, n_tensors=1),   # Q8_0 rows of 31
    ]
    for path in cases:
        t = time.time()
        with pytest.raises(FormatError):
            open_source("gguf", path)
        assert time.time() - t < 5, path
    (tmp_path / "short.gguf").write_bytes(b"GGUF\3\0\0\0")
    with pytest.raises(FormatError):
        open_source("gguf", tmp_path / "short.gguf")


def test_truncated_and_fuzzed_gguf_files(gguf, gmodels, tmp_path):
    from llama2c.export.gguf import export_gguf

    m = gmodels[False]
    good = export_gguf(m.path, tmp_path / "m.gguf", "q8_0", vocab=str(m.tokenizer)).read_bytes()
    bad = tmp_path / "bad.gguf"
    for n in (8, 24, 100, 3000, len(good) // 2, len(good) - 1):
        bad.write_bytes(good[:n])
        with pytest.raises(FormatError):
            open_source("gguf", bad)
    rng = np.random.default_rng(3)
    outcomes = {"ok": 0, "error": 0}
    for _ in range(300):
        data = bytearray(good)
        for _ in range(int(rng.integers(1, 8))):
            data[int(rng.integers(0, 6000))] = int(rng.integers(0, 256))
        bad.write_bytes(bytes(data))
        try:
            with open_source("gguf", bad) as src:
                for key in src.keys():
                    src.get(key)
                src.tokenizer_bin_bytes()
            outcomes["ok"] += 1
        except FormatError:
            outcomes["error"] += 1
    assert outcomes["error"] > 0 and sum(outcomes.values()) == 300
