"""The model-file tools work in an install without torch: converting between
.bin versions, exporting GGUF and reading models never import it (torch is
blocked in a child interpreter)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from helpers import MHA, REPO, R

BLOCK_TORCH = "import sys; sys.modules['torch'] = None\n"


def run_without_torch(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120, env=env)


@pytest.fixture(scope="module")
def fp32_model(make_model):
    return make_model(MHA, version=1, seed=21)


@pytest.mark.parametrize("version", [0, 1, 2, 3, 4])
def test_bin_conversion_without_torch(fp32_model, tmp_path, version):
    out = tmp_path / f"v{version}.bin"
    proc = run_without_torch(f"""
        from llama2c.export import main
        sys.exit(main([{str(out)!r}, "--version", "{version}", "--bin", {str(fp32_model.path)!r}, "--quiet"]))
    """)
    assert proc.returncode == 0, proc.stderr
    import llama2c

    ref = llama2c.Llama(fp32_model.path).forward(5, 0)
    got = llama2c.Llama(out).forward(5, 0)
    tol = {0: 0, 1: 0, 3: 0, 2: 0.5, 4: 0.5}[version]  # int8 and bf16 round the weights
    assert abs(got - ref).max() <= tol + 1e-6


def test_gguf_export_without_torch(fp32_model, tmp_path):
    gguf = tmp_path / "m.gguf"
    proc = run_without_torch(f"""
        from llama2c.gguf_export import main
        sys.exit(main([{str(fp32_model.path)!r}, {str(gguf)!r}, "--type", "f16"]))
    """)
    if "No module named 'gguf'" in proc.stderr:
        pytest.skip("the gguf package is not installed")
    assert proc.returncode == 0, proc.stderr
    assert gguf.read_bytes()[:4] == b"GGUF"


def test_reading_models_never_imports_torch(fp32_model):
    proc = run_without_torch(f"""
        from llama2c.export.sources import open_bin
        from llama2c.model_args import ModelArgs
        with open_bin({str(fp32_model.path)!r}) as src:
            assert isinstance(src.args, ModelArgs) and src.args.dim == {MHA.dim}
            assert src.get("tok_embeddings.weight").shape == ({MHA.vocab_size}, {MHA.dim})
    """)
    assert proc.returncode == 0, proc.stderr
