"""`llama2c bench` runs without torch: the package (llama2c/bench/) is
imported and run end to end in a child interpreter with torch blocked,
through `from llama2c.bench import main` and `python -m llama2c.bench`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from helpers import MHA, REPO

BLOCK_TORCH = "import sys; sys.modules['torch'] = None\n"


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))


@pytest.mark.parametrize("entry", ["main", "module"])
def test_bench_without_torch(make_model, tmp_path, entry):
    mf = make_model(MHA, version=2, seed=51)
    argv = [str(mf.path), "-z", str(mf.tokenizer), "--threads", "1", "--reps", "1", "-n", "2", "-P", "3",
            "--no-reference", "--json", "-q", "--cache-dir", str(tmp_path / "c")]
    if entry == "main":
        code = f"""
            from llama2c.bench import main
            rc = main({argv!r})
            assert sys.modules['torch'] is None
            sys.exit(rc)
        """
    else:
        code = f"""
            import runpy
            sys.argv = ["llama2c.bench"] + {argv!r}
            runpy.run_module("llama2c.bench", run_name="__main__")
        """
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)["rows"]
    assert [(r["model"], r["weights"], r["threads"]) for r in rows] == [(mf.path.name, "int8", 1)]
    assert rows[0]["ours_decode"][0] > 0 and rows[0]["ours_prefill"][0] > 0
