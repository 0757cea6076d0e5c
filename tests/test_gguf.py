"""GGUF files in: llama.cpp's format read by the C engine (F32, BF16 and Q4_0
in place, F16 and Q8_0 converted exactly), its vocabulary as the
tokenizer, its chat template, and clear errors for what it cannot run.

The files are written with the `gguf` package (our exporter, or its writer
directly for broken files); weights are chosen so that each type holds
them exactly, which makes the GGUF model bit-identical to a .bin one."""
from __future__ import annotations

import subprocess

import numpy as np
import pytest

import llama2c
import helpers as H
import reference as R

gguf = pytest.importorskip("gguf", reason="GGUF tests need the gguf package (the [gguf] extra)")
from llama2c.export.binmodel import read_model  # noqa: E402
from llama2c.export.gguf import export_gguf  # noqa: E402

CFG = R.Config(dim=64, hidden_dim=192, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=384, seq_len=64)
IDS = [1] + list(range(5, 45))


def representable(w: dict, kind: str, seed: int = 0) -> dict:
    """The weights rounded so that `kind` holds them exactly: f16 values,
    or blocks of 32 that are int8 (Q8_0) / 4-bit (Q4_0) multiples of a
    power-of-two scale reaching the type's largest value."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, a in w.items():
        a = np.asarray(a, dtype=np.float32)
        if a.ndim == 1 or name.startswith("rms"):
            out[name] = a
        elif kind == "f16":
            out[name] = a.astype(np.float16).astype(np.float32)
        else:
            lo, hi = (-127, 127) if kind == "q8_0" else (-8, 7)
            q = rng.integers(lo, hi + 1, a.shape).reshape(-1, 32)
            q[:, 0] = hi if kind == "q8_0" else lo  # the block's largest magnitude: fixes the scale
            out[name] = (q * np.float32(2.0 ** -9)).reshape(a.shape).astype(np.float32)
    return out


@pytest.fixture(scope="module")
def models(make_model):
    return {shared: make_model(CFG, version=1, seed=40 + shared, shared=shared) for shared in (True, False)}


def gguf_of(tmp_path, m, ftype):
    out = tmp_path / f"{m.path.stem}_{ftype}.gguf"
    export_gguf(m.path, out, ftype, vocab=str(m.tokenizer), force=True)
    return out


@pytest.mark.parametrize("shared", [True, False])
def test_f32_gguf_is_bit_identical_to_the_bin(models, tmp_path, shared):
    m = models[shared]
    path = gguf_of(tmp_path, m, "f32")
    g = llama2c.Llama(path)
    assert g.config.version == 100 and g.config.weights == "f32" and g.config.shared_classifier == shared
    assert np.array_equal(g.eval(IDS), llama2c.Llama(m.path).eval(IDS))


@pytest.mark.parametrize("kind,bin_version", [("f16", 1), ("bf16", 4), ("q4_0", 5)])
def test_exact_types_match_the_same_weights_in_a_bin(make_model, tmp_path, kind, bin_version):
    base = make_model(CFG, version=1, seed=45)
    w = representable(base.w, "f16" if kind == "bf16" else kind)
    if kind == "bf16":  # bf16-representable: the top half of each float
        w = {k: (v.view(np.uint32) & 0xFFFF0000).view(np.float32) if not k.startswith("rms") else v for k, v in w.items()}
    exact = make_model(CFG, version=bin_version, seed=45, weights=w, name=f"exact_{kind}.bin")
    g = llama2c.Llama(gguf_of(tmp_path, exact, kind))
    ref = llama2c.Llama(exact.path)
    assert g.config.weights == {"bf16": "bf16", "q4_0": "q4_0"}.get(kind, "f32")
    assert ref.config.weights == {"bf16": "bf16", "q4_0": "q4_0"}.get(kind, "f32")
    assert np.array_equal(g.eval(IDS), ref.eval(IDS))


def test_q8_0_gguf_runs_as_the_int8_engine_with_blocks_of_32(make_model, tmp_path):
    base = make_model(CFG, version=1, seed=46)
    w = representable(base.w, "q8_0")
    exact = make_model(CFG, version=1, seed=46, weights=w, name="exact_q8.bin")
    v2 = make_model(CFG, version=2, seed=46, weights=w, group_size=32, name="exact_q8_v2.bin")
    g = llama2c.Llama(gguf_of(tmp_path, exact, "q8_0"))
    assert (g.config.weights, g.config.group_size) == ("q8_0", 32)
    assert np.array_equal(g.eval(IDS), llama2c.Llama(v2.path).eval(IDS))


def test_the_vocabulary_and_chat_template_come_from_the_file(models, tmp_path):
    m = models[True]
    path = gguf_of(tmp_path, m, "f32")
    g, ref = llama2c.Llama(path), llama2c.Llama(m.path, tokenizer=m.tokenizer)
    for text in ["hello there", "  two  spaces", "héllo wörld ✓", "a\nb", ""]:
        assert g.tokenize(text) == ref.tokenize(text), text
        ids = ref.tokenize(text)
        assert g.detokenize(ids) == ref.detokenize(ids)
    assert g.generate("hello", steps=20, temperature=0) == ref.generate("hello", steps=20, temperature=0)
    assert g.chat_template.name == "llama-2"  # no template in the file: the default
    # a file with a template: chat uses it
    src = read_model(m.path)
    out = tmp_path / "with_template.gguf"
    w = gguf.GGUFWriter(str(out), "llama")
    from llama2c.export import gguf as ex
    from llama2c.export.vocab import load_vocab

    ex._add_metadata(w, gguf, src, "f32", "t")
    ex._add_vocab(w, load_vocab(str(m.tokenizer), src.vocab_size, m.path))
    w.add_chat_template("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>")
    ex._add_tensors(w, gguf, src, "f32", False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    templated = llama2c.Llama(out)
    assert templated.chat_template.name == "jinja"
    assert templated.chat_template.render([{"role": "user", "content": "hi"}]) == "<|user|>hi<|assistant|>"


def test_run_program_reads_gguf_with_its_own_vocabulary(models, tmp_path, cli):
    m = models[True]
    path = gguf_of(tmp_path, m, "f32")
    a = cli("run", path, "-t", "0", "-n", "20", "-i", "hello")
    b = cli("run", m.path, "-z", m.tokenizer, "-t", "0", "-n", "20", "-i", "hello")
    assert a.returncode == 0, a.stderr
    assert a.stdout.split(b"\nachieved")[0] == b.stdout.split(b"\nachieved")[0]


def write_broken(tmp_path, m, name, *, arch="llama", drop=(), retype=None, meta=None):
    """A GGUF of m's weights with something wrong: another architecture,
    tensors left out, a tensor stored as another ggml type (raw bytes of the
    right size), extra metadata."""

    def raw(tname, data):
        if not retype or tname != retype[0]:
            return None
        block, size = gguf.GGML_QUANT_SIZES[retype[1]]
        rows, cols = data.shape
        return np.zeros((rows, cols // block * size), np.uint8), retype[1]

    return H.write_gguf(m, tmp_path / name, raw=raw, drop=drop, arch=arch, meta=meta)


def test_unsupported_files_are_clear_errors(models, tmp_path, make_model):
    m = models[True]
    cases = [
        (write_broken(tmp_path, m, "arch.gguf", arch="gpt2"), "architecture \"gpt2\""),
        (write_broken(tmp_path, m, "missing.gguf", drop=("blk.1.ffn_up.weight",)), "no tensor blk.1.ffn_up.weight"),
        (write_broken(tmp_path, m, "scaling.gguf", meta={"llama.rope.scaling.type": "yarn"}), "rope scaling"),
    ]
    big = make_model(R.Config(dim=256, hidden_dim=256, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=300,
                              seq_len=16), version=1, seed=47)
    cases.append((write_broken(tmp_path, big, "k.gguf", retype=("blk.0.attn_q.weight", gguf.GGMLQuantizationType.IQ2_XXS)),
                  "is IQ2_XXS, which llama2c does not run"))  # (K-quants run: test_gguf_quant_types.py)
    for path, words in cases:
        with pytest.raises(llama2c.FormatError, match=words.replace("(", r"\(")):
            llama2c.Llama(path)
    msg = str(pytest.raises(llama2c.FormatError, llama2c.Llama, cases[-1][0]).value)
    assert "llama2c export" in msg and "--gguf" in msg


def test_truncated_and_corrupt_headers(models, tmp_path):
    good = gguf_of(tmp_path, models[True], "f32").read_bytes()
    for n in (3, 8, 23, 100, 2000, len(good) // 2, len(good) - 1):
        p = tmp_path / f"cut{n}.gguf"
        p.write_bytes(good[:n])
        with pytest.raises(llama2c.FormatError):
            llama2c.Llama(p)
    for offset, value in [(4, 7), (8, 2**40), (16, 2**40)]:  # version, tensor count, metadata count
        bad = bytearray(good)
        bad[offset:offset + (4 if offset == 4 else 8)] = value.to_bytes(4 if offset == 4 else 8, "little")
        p = tmp_path / f"bad{offset}.gguf"
        p.write_bytes(bytes(bad))
        with pytest.raises(llama2c.FormatError):
            llama2c.Llama(p)


def test_random_corruption_never_crashes(models, tmp_path):
    """Flipped bytes anywhere in the header and metadata: an error or a
    model, in a child process that must not die of a signal."""
    good = gguf_of(tmp_path, models[True], "f32")
    code = f"""
import random, sys, llama2c
data = open({str(good)!r}, 'rb').read()
rng = random.Random(1)
for i in range(300):
    bad = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        at = rng.randrange(0, min(len(bad), 6000))
        bad[at] = rng.randrange(256)
    p = {str(tmp_path / 'fuzz.gguf')!r}
    open(p, 'wb').write(bytes(bad))
    try:
        llama2c.Llama(p, tokenizer=p).generate('hi', steps=4, temperature=0)
    except (llama2c.Llama2Error, ValueError, OSError):
        pass
print('ok')
"""
    import sys

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stderr[-2000:])


def test_general_alignment_is_honoured(models, tmp_path):
    m = models[True]
    src = read_model(m.path)
    from llama2c.export import gguf as ex
    from llama2c.export.vocab import load_vocab

    out = tmp_path / "align64.gguf"
    w = gguf.GGUFWriter(str(out), "llama")
    w.data_alignment = 64
    ex._add_metadata(w, gguf, src, "f32", "t")
    ex._add_vocab(w, load_vocab(str(m.tokenizer), src.vocab_size, m.path))
    w.add_uint32("general.alignment", 64)
    ex._add_tensors(w, gguf, src, "f32", False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert np.array_equal(llama2c.Llama(out).eval(IDS), llama2c.Llama(m.path).eval(IDS))
