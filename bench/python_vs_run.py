"""Decode speed of the Python API against the `run` program on the same model.

    python bench/python_vs_run.py MODEL.bin TOKENIZER.bin [--steps 256] [--reps 3]

Greedy decoding from BOS. `run` reports its own `achieved tok/s` (timed from the
end of the first step); the Python side is timed the same way, from the first
streamed piece to the last. Runs alternate so that both see the same machine.
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import llama2c


def run_program(binary: Path, model: str, tok: str, steps: int) -> float:
    r = subprocess.run([str(binary), model, "-z", tok, "-n", str(steps), "-t", "0", "-s", "1"],
                       capture_output=True, text=True, check=True)
    m = re.search(r"achieved tok/s: ([0-9.]+)", r.stderr)
    if not m:
        raise RuntimeError(f"no 'achieved tok/s' line from {binary}: {r.stderr[-200:]}")
    return float(m.group(1))


def python_stream(llama: llama2c.Llama, steps: int) -> float:
    t0, n = None, 0
    for _ in llama.stream("", steps=steps, temperature=0.0):
        n += 1
        if n == 1:
            t0 = time.perf_counter()
    return (n - 1) / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("tokenizer")
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--run", default=str(Path(__file__).resolve().parent.parent / "run"),
                   help="the run program (default: ./run of this checkout)")
    a = p.parse_args()
    llama = llama2c.Llama(a.model, tokenizer=a.tokenizer)
    ours, prog = [], []
    for _ in range(a.reps):
        prog.append(run_program(Path(a.run), a.model, a.tokenizer, a.steps))
        ours.append(python_stream(llama, a.steps))
    print(f"run:    {', '.join(f'{v:.1f}' for v in prog)} tok/s (median {statistics.median(prog):.1f})")
    print(f"python: {', '.join(f'{v:.1f}' for v in ours)} tok/s (median {statistics.median(ours):.1f})")
    print(f"python / run: {statistics.median(ours) / statistics.median(prog):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
