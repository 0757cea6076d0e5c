"""Fixtures for the llama2c test suite.

- REPO / SHARED_DATA: the repository root and the reference files that live
  next to it (../shared/data, only present in the development checkout);
  the `shared_data` fixture skips a test when they are absent.
- cli: the ./run and ./runq binaries, built with `make run` when missing.
- make_model: tiny random models written with tests/reference.py.
- torch / transformers: torch on one thread (transformers' reference
  logits, deterministic and quick) and transformers, skipped when not installed.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import (  # noqa: E402,F401
    CONFIGS, GQA, MHA, MQA, REPO, SHARED_DATA, Cli, ModelFactory, ModelFile,
)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data not found: reference files are only present in the "
                    "development checkout")
    return SHARED_DATA


@pytest.fixture(scope="session")
def cli() -> Cli:
    # CI points LLAMA2C_BIN_DIR at the sanitizer build (make sanitize)
    bin_dir = os.environ.get("LLAMA2C_BIN_DIR")
    if bin_dir:
        run, runq = Path(bin_dir) / "run", Path(bin_dir) / "runq"
        if not run.exists() or not runq.exists():
            pytest.fail(f"LLAMA2C_BIN_DIR={bin_dir} holds no run/runq")
        return Cli(run, runq)
    run, runq = REPO / "run", REPO / "runq"
    # Built only when missing: `make run` also copies libllama2 into llama2c/,
    # which must not be rewritten under a process that has it loaded.
    if not run.exists() or not runq.exists():
        proc = subprocess.run(["make", "run"], cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0 or not run.exists() or not runq.exists():
            pytest.fail(f"`make run` failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return Cli(run, runq)


@pytest.fixture(scope="session")
def make_model(tmp_path_factory) -> ModelFactory:
    """make_model(cfg, version=1, shared=True, seed=0, group_size=None) -> ModelFile
    (cached per arguments for the session). Each model comes with a matching
    random tokenizer (ModelFile.tokenizer)."""
    return ModelFactory(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def gqa_model(make_model) -> ModelFile:
    return make_model(GQA, version=1, shared=True, seed=1)


@pytest.fixture(scope="session")
def unshared_model(make_model) -> ModelFile:
    return make_model(MHA, version=1, shared=False, seed=2)




@pytest.fixture(scope="module")
def torch():
    """torch with one intra-op thread for the module's tests (restored after)."""
    t = pytest.importorskip("torch")
    n = t.get_num_threads()
    t.set_num_threads(1)
    yield t
    t.set_num_threads(n)


@pytest.fixture(scope="module")
def transformers(torch):
    return pytest.importorskip("transformers")
