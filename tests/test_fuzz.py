"""Replays the fuzz seed corpus (fuzz/make_corpus.py, fuzz/regressions/) once
through the ASan + UBSan fuzz harness, when `make fuzz` has built it.

Builds nothing: without build/fuzz/fuzz_llama2 the test skips. The corpus is
generated into a temporary directory (numpy only, about a second); every
seed runs once (-runs=0), so the whole test takes a few seconds. A crash,
sanitizer report, leak, timeout or memory blow-up fails it with the
harness's report and leaves the input in the artifact directory.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HARNESS = REPO / "build" / "fuzz" / "fuzz_llama2"
MAKE_CORPUS = REPO / "fuzz" / "make_corpus.py"
REGRESSIONS = REPO / "fuzz" / "regressions"


def _harness() -> Path:
    if not HARNESS.is_file() or not os.access(HARNESS, os.X_OK):
        pytest.skip("build/fuzz/fuzz_llama2 not built (run `make fuzz` first)")
    return HARNESS


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # the harness is an ASan executable of its own: no preloaded runtime
    env.pop("LD_PRELOAD", None)
    env["ASAN_OPTIONS"] = "detect_leaks=1:allocator_may_return_null=1"
    env["UBSAN_OPTIONS"] = "halt_on_error=1:abort_on_error=1:print_stacktrace=1"
    return env


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, errors="replace", env=_env(),
                          timeout=timeout)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fuzz-corpus")
    proc = subprocess.run([sys.executable, str(MAKE_CORPUS), str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def test_corpus_has_every_kind_of_seed(corpus):
    names = [p.name for p in corpus.iterdir()]
    for prefix in ("model-v0-", "model-v1-", "model-v2-", "model-v3-", "model-v4-", "tok-", "full-"):
        assert any(n.startswith(prefix) for n in names), f"no {prefix}* seed"
    regressions = [p for p in REGRESSIONS.iterdir() if p.is_file() and p.suffix != ".md"] \
        if REGRESSIONS.is_dir() else []
    for r in regressions:
        assert (corpus / f"regression-{r.name}").read_bytes() == r.read_bytes()


def test_replay_corpus(corpus, tmp_path):
    harness = _harness()
    proc = _run([str(harness), "-runs=0", "-seed=1", "-timeout=30", f"-artifact_prefix={tmp_path}/",
                 str(corpus)], timeout=600)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"fuzz harness failed on a seed (rc {proc.returncode}):\n{tail}"
    assert "INITED" in proc.stderr and "Done" in proc.stderr, tail
    executed = [line for line in proc.stderr.splitlines() if line.startswith("stat::number_of_executed_units")]
    n_seeds = sum(1 for p in corpus.iterdir() if p.is_file())
    assert executed and int(executed[0].split(":")[-1]) == n_seeds, tail


def test_mutants_are_deterministic(corpus, tmp_path):
    """-seed fixes the mutants: two short runs report the same coverage."""
    harness = _harness()
    small = tmp_path / "small"
    small.mkdir()
    for p in sorted(corpus.iterdir()):
        if p.is_file() and p.stat().st_size < 20000 and not p.name.startswith("regression-"):
            (small / p.name).write_bytes(p.read_bytes())
    stats = []
    for i in range(2):
        art = tmp_path / f"art{i}"
        art.mkdir()
        proc = _run([str(harness), "-runs=300", "-seed=12345", f"-artifact_prefix={art}/", str(small)],
                    timeout=300)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
        stats.append([line for line in proc.stderr.splitlines()
                      if line.startswith(("stat::coverage_edges", "stat::corpus_units", "stat::models_opened",
                                          "stat::sessions", "stat::number_of_executed_units"))])
    assert stats[0] == stats[1]
