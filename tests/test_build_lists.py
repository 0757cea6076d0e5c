"""The C build's lists agree: csrc/Makefile's LIB_SRC (setup.py reads it from there),
build_msvc.bat's SRC and the files in csrc/; the programs stay out of the library;
`llama2c run` says how to build the program when it is missing."""
from __future__ import annotations

import re

from helpers import REPO

CSRC = REPO / "csrc"
# files with a main() (the programs, the C tests, the fuzz harness, the kernel
# timer) and the command line the programs share: none is in the library
NOT_LIBRARY = {"run.c", "runq.c", "cli.c", "test_llama2.c", "test_q4.c", "fuzz_llama2.c", "bench_kernels.c"}


def make_list(name: str) -> list[str]:
    text = (CSRC / "Makefile").read_text()
    found = re.search(rf"^{name}[ \t]*=((?:.*\\\n)*.*)$", text, re.M)
    assert found, f"csrc/Makefile has no {name}"
    return found.group(1).replace("\\\n", " ").split()


def test_library_sources_are_the_c_files_without_main():
    lib = make_list("LIB_SRC")
    assert len(set(lib)) == len(lib)
    assert set(lib) == {p.name for p in CSRC.glob("*.c")} - NOT_LIBRARY
    for name in lib:
        assert not re.search(r"^\s*int\s+main\s*\(", (CSRC / name).read_text(), re.M), name
    assert make_list("RUN_SRC") == ["run.c", "cli.c"] and make_list("RUNQ_SRC") == ["runq.c", "cli.c"]
    assert "llama2_cli_main" not in (CSRC / "llama2.h").read_text()


def test_build_msvc_bat_lists_the_library_sources_with_crlf():
    raw = (REPO / "build_msvc.bat").read_bytes()
    assert raw.count(b"\n") == raw.count(b"\r\n")
    src = re.search(r"^set SRC=(.*?)\r?$", raw.decode(), re.M)
    assert src, "build_msvc.bat has no `set SRC=` line"
    assert [s.removeprefix("csrc\\") for s in src.group(1).split()] == make_list("LIB_SRC")


def test_setup_py_reads_the_makefile_list():
    text = (REPO / "setup.py").read_text()
    assert 'make_list("LIB_SRC")' in text and "csrc/checkpoint.c" not in text


def test_llama2c_run_without_the_program(monkeypatch, tmp_path, capsys):
    from llama2c import run_compat

    monkeypatch.setattr(run_compat, "PROGRAM", tmp_path / "bin" / "run")
    assert run_compat.main(["model.bin"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "make run" in err and "pip install -e ." in err

