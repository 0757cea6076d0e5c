"""Generation speed of the KV-cached PyTorch engine (llama2c.model.Engine, what
Transformer.generate runs) against the uncached loop (``use_cache=False``:
llama2.c's model.generate, the whole context through the model for every token).

    python bench/engine_speed.py                           # 15M shape, 256 new tokens, batch 1 and 8
    python bench/engine_speed.py --batches 1 --reps 3 --device cuda
    python bench/engine_speed.py --model out/model.bin     # a trained model instead of random weights

The model has the 15M shape of llama2.c's table (dim 288, 6 layers, 6 heads,
vocabulary 32000, context 256; random weights) in float32. Row b of a batch
starts from a prompt of 1 + b % 8 tokens (BOS, then random ones; rows of
different lengths are left-padded) and decodes --new tokens greedily; a row
that outgrows the context is cropped to its last 256 tokens and recomputed,
in both loops (llama2.c's cropping). The loops alternate (the order flipped
every repetition), --reps times each; the report gives the median wall time,
new tokens per second (all rows) and the speed-up, and checks that every loop
produced the same tokens. With one row and more than one thread the engine
picks its thread count step by step (Engine's adaptive_threads); it is also
run with torch's setting fixed ("cached, fixed threads") and on one thread
("cached, 1 thread"), for comparison. --no-uncached leaves out llama2.c's loop
(which takes minutes on busy cores) to compare those three alone.
The first line names the CPU, torch and the threads; the load average is
printed before and after each batch size (the machine may be shared).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def cpu_name() -> str:
    """The CPU's model name and core count (from /proc/cpuinfo where there is one)."""
    import os
    import platform

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} logical CPUs"


def load() -> str:
    import os

    return f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "?"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="", help="a model .bin (default: the 15M shape, random weights)")
    p.add_argument("--new", type=int, default=256, help="new tokens per row (default 256)")
    p.add_argument("--batches", default="1,8", help="batch sizes (default 1,8)")
    p.add_argument("--reps", type=int, default=2, help="runs of each loop (default 2)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    p.add_argument("--no-uncached", action="store_true", help="leave out the uncached loop")
    a = p.parse_args(argv)

    import torch

    from llama2c.model import Engine, ModelArgs, Transformer

    if a.threads:
        torch.set_num_threads(a.threads)
    if a.model:
        model = Transformer.from_bin(a.model, device=a.device)
    else:
        torch.manual_seed(0)
        model = Transformer(ModelArgs(dim=288, n_layers=6, n_heads=6, vocab_size=32000,
                                      max_seq_len=256)).to(a.device)
    model.eval()
    P = model.params
    new = a.new

    def sync():
        if str(a.device).startswith("cuda"):
            torch.cuda.synchronize()

    print(f"model: dim {P.dim}, {P.n_layers} layers, {P.n_heads} heads, vocab {P.vocab_size}, "
          f"context {P.max_seq_len}; {model.get_num_params():,} parameters, float32, {a.device}, "
          f"{torch.get_num_threads()} threads; torch {torch.__version__}; CPU: {cpu_name()}")
    for B in [int(x) for x in a.batches.split(",") if x.strip()]:
        g = torch.Generator().manual_seed(B)
        rows = [[1] + torch.randint(2, P.vocab_size, (b % 8,), generator=g).tolist() for b in range(B)]
        T = max(len(r) for r in rows)
        idx = torch.zeros((B, T), dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        for b, r in enumerate(rows):
            idx[b, T - len(r):] = torch.tensor(r)
            mask[b, T - len(r):] = 1
        idx, mask = idx.to(a.device), mask.to(a.device)

        def run(name):
            if name == "uncached":
                if B == 1:      # one row needs no mask: llama2.c's plain loop
                    return model.generate(idx[:, mask[0].bool()], new, temperature=0.0, use_cache=False)
                return model.generate(idx, new, temperature=0.0, attention_mask=mask, use_cache=False)
            if name == "cached":
                return model.generate(idx, new, temperature=0.0, attention_mask=mask)
            n = torch.get_num_threads()
            if name == "cached, 1 thread":
                torch.set_num_threads(1)
            try:
                got = Engine(model, adaptive_threads=False).generate(rows, new, temperature=0.0)
            finally:
                torch.set_num_threads(n)
            return torch.tensor(got)

        names = ([] if a.no_uncached else ["uncached"]) + ["cached"]
        if B == 1 and torch.get_num_threads() > 1 and not str(a.device).startswith("cuda"):
            names += ["cached, fixed threads", "cached, 1 thread"]
        times = {n: [] for n in names}
        outs = {}
        load0 = load()
        for rep in range(a.reps):
            for name in (names if rep % 2 == 0 else names[::-1]):
                sync()
                t0 = time.perf_counter()
                out = run(name)
                sync()
                times[name].append(time.perf_counter() - t0)
                outs[name] = out[:, -new:].cpu()
        same = all(torch.equal(o, outs[names[0]]) for o in outs.values())
        u = statistics.median(times[names[0]])
        parts = []
        for name in names:
            t = statistics.median(times[name])
            ratio = f": {u / t:.1f}x" if names[0] == "uncached" and name != names[0] else ""
            parts.append(f"{name} {t:.2f} s ({B * new / t:,.1f} tok/s){ratio} "
                         f"[{' '.join(f'{x:.2f}' for x in times[name])}]")
        print(f"batch {B}: {new} new tokens per row; " + "; ".join(parts) +
              f"; same tokens: {'yes' if same else 'NO'}; load average {load0} -> {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
