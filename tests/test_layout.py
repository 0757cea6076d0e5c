"""The architecture's shape: no cycles among Python imports, C includes or C
calls (scripts/check_cycles.py), and the checker itself finds one when there is."""
from __future__ import annotations

import subprocess
import sys

from helpers import REPO

sys.path.insert(0, str(REPO / "scripts"))
import check_cycles  # noqa: E402


def test_no_dependency_cycles():
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "check_cycles.py"), str(REPO)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.startswith("cycles: 0")


def test_the_checker_finds_a_cycle(tmp_path):
    pkg = tmp_path / "llama2c"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import x\n")
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    (csrc / "one.c").write_text('#include "one.h"\nint f(void) { return g(); }\n')
    (csrc / "two.c").write_text("int g(void) { return f(); }\n")
    (csrc / "one.h").write_text('#include "two.h"\n')
    (csrc / "two.h").write_text('#include "one.h"\n')
    graphs = [check_cycles.python_graph(tmp_path), check_cycles.include_graph(csrc), check_cycles.call_graph(csrc)]
    assert [check_cycles.cycles(g) for g in graphs] == [[["llama2c.a", "llama2c.sub.b"]], [["one.h", "two.h"]],
                                                         [["one.c", "two.c"]]]
