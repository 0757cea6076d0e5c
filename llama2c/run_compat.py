"""`llama2c run`: the `run` program itself (csrc/run.c), with the same arguments.

The program is built into the package as llama2c/bin/run (run.exe on Windows):
`make run` copies it there and `pip install` compiles it. So the flags, defaults,
stdout and stderr of `llama2c run` are the C program's own, not a copy of them.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PROGRAM = Path(__file__).resolve().parent / "bin" / ("run.exe" if os.name == "nt" else "run")


def main(argv: list[str]) -> int:
    if not PROGRAM.is_file():
        print(f"llama2c run: {PROGRAM} is missing: build it with `make run` or `pip install -e .`",
              file=sys.stderr)
        return 1
    args = [str(PROGRAM), *argv]
    if os.name == "posix":
        # the program takes over this process: its exit status, signals, stdin and stdout
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(PROGRAM, args)
    return subprocess.call(args)
