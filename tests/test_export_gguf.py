"""`llama2c export OUT.gguf --version gguf --bin IN.bin`: the GGUF writer
(llama2c/export/gguf.py) behind the export command line, with the rules of
the other outputs (no overwrite without --force, atomic writes), working with
torch blocked, and the old module path llama2c.gguf_export."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from helpers import MHA, REPO, R

from llama2c.export.cli import main

gguf = pytest.importorskip("gguf")

# dim and hidden_dim multiples of 32 (Q8_0 blocks), GQA, vocab > 259 (synthetic vocab)
Q8CFG = R.Config(dim=64, hidden_dim=160, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320, seq_len=32)


def _no_temp_files(folder):
    return not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("gguf_type", ["f32", "f16", "q8_0"])
def test_export_gguf_cli_without_torch(make_model, tmp_path, gguf_type):
    mf = make_model(Q8CFG, version=1, shared=False, seed=41)
    out = tmp_path / f"m-{gguf_type}.gguf"
    code = textwrap.dedent(f"""
        import sys
        sys.modules['torch'] = None
        from llama2c.cli import main
        rc = main(["export", {str(out)!r}, "--version", "gguf", "--bin", {str(mf.path)!r},
                   "--gguf-type", "{gguf_type}", "--tokenizer", "synthetic"])
        assert sys.modules['torch'] is None
        sys.exit(rc)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out} (GGUF {gguf_type.upper()}" in proc.stdout
    # the same file as the Python API writes
    from llama2c.export import export_gguf

    again = export_gguf(mf.path, tmp_path / "api.gguf", gguf_type, vocab="synthetic")
    assert out.read_bytes() == again.read_bytes()
    want = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "q8_0": gguf.GGMLQuantizationType.Q8_0}[gguf_type]
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    assert tensors["blk.1.ffn_down.weight"].tensor_type == want
    assert tensors["output.weight"].tensor_type == want
    assert tensors["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert _no_temp_files(tmp_path)


def test_refuses_an_existing_output_without_force(make_model, tmp_path, capsys):
    mf = make_model(MHA, version=1, seed=42)
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    argv = [str(out), "--version", "gguf", "--bin", str(mf.path)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("llama2c export: error:") and "--force" in err and err.count("\n") == 1
    assert out.read_bytes() == b"keep me"
    assert main(argv + ["--force"]) == 0
    assert out.read_bytes()[:4] == b"GGUF"
    assert _no_temp_files(tmp_path)
    # the API has the same rule
    from llama2c.export.gguf import export_gguf

    with pytest.raises(FileExistsError):
        export_gguf(mf.path, out)


def test_a_failed_export_leaves_the_old_file(make_model, tmp_path, monkeypatch):
    from llama2c.export import gguf as writer

    mf = make_model(MHA, version=1, seed=43)
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")

    def fail(*args, **kw):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(writer, "_add_tensors", fail)
    with pytest.raises(RuntimeError):
        writer.export_gguf(mf.path, out, force=True)
    assert out.read_bytes() == b"old"
    assert _no_temp_files(tmp_path)
    with pytest.raises(RuntimeError):
        writer.export_gguf(mf.path, tmp_path / "new.gguf")
    assert not (tmp_path / "new.gguf").exists() and _no_temp_files(tmp_path)


def test_cli_errors(make_model, tmp_path, capsys):
    mf = make_model(MHA, version=1, seed=44)   # dim 48: no Q8_0 blocks
    out = str(tmp_path / "x.gguf")
    cases = [
        [out, "--version", "gguf", "--bin", str(mf.path), "--gguf-type", "q8_0"],
        [out, "--version", "gguf", "--hf", str(tmp_path)],
        [out, "--version", "gguf", "--bin", str(mf.path), "--max-seq-len", "8"],
        [out, "--version", "gguf", "--bin", str(mf.path), "--group-size", "8"],
        [out, "--version", "gguf", "--bin", str(tmp_path / "missing.bin")],
        [out, "--version", "gguf", "--bin", str(mf.path), "--tokenizer", str(tmp_path / "missing.model")],
        [str(tmp_path / "x.bin"), "--version", "1", "--bin", str(mf.path), "--gguf-type", "f16"],
    ]
    for argv in cases:
        capsys.readouterr()
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("llama2c export: error:") and err.count("\n") == 1, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert main([out, "--version", "gguf", "--bin", str(mf.path), "--gguf-type", "q4_k"]) == 2  # not a choice (q4_0 became one)


def test_old_module_path(make_model, tmp_path):
    import llama2c.export
    import llama2c.export.gguf
    import llama2c.gguf_export

    assert llama2c.gguf_export.export_gguf is llama2c.export.gguf.export_gguf is llama2c.export.export_gguf
    mf = make_model(MHA, version=1, seed=45)
    out = tmp_path / "m.gguf"
    assert llama2c.gguf_export.main([str(mf.path), str(out), "--type", "f16"]) == 0
    assert llama2c.gguf_export.main([str(mf.path), str(out), "--type", "f16"]) == 1   # exists
    assert llama2c.gguf_export.main([str(mf.path), str(out), "--type", "f32", "--force"]) == 0
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F32
