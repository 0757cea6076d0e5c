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
in both loops (llama2.c's cropping). The two loops alternate, --reps
times each; the report gives the median wall time, new tokens per second (all
rows) and the speed-up, and checks that both loops produced the same tokens.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="", help="a model .bin (default: the 15M shape, random weights)")
    p.add_argument("--new", type=int, default=256, help="new tokens per row (default 256)")
    p.add_argument("--batches", default="1,8", help="batch sizes (default 1,8)")
    p.add_argument("--reps", type=int, default=2, help="runs of each loop (default 2)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    a = p.parse_args(argv)

    import torch

    from llama2c.model import ModelArgs, Transformer

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
          f"{torch.get_num_threads()} threads; torch {torch.__version__}")
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
        times = {"cached": [], "uncached": []}
        outs = {}
        for _ in range(a.reps):
            for name, cache in (("uncached", False), ("cached", True)):
                sync()
                t0 = time.perf_counter()
                if cache or B == 1:     # one row needs no mask: llama2.c's plain loop
                    out = model.generate(idx if cache else idx[:, mask[0].bool()], new, temperature=0.0,
                                         attention_mask=mask if cache else None, use_cache=cache)
                else:
                    out = model.generate(idx, new, temperature=0.0, attention_mask=mask, use_cache=False)
                sync()
                times[name].append(time.perf_counter() - t0)
                outs[name] = out[:, -new:].cpu()
        same = torch.equal(outs["cached"], outs["uncached"])
        c, u = statistics.median(times["cached"]), statistics.median(times["uncached"])
        print(f"batch {B}: {new} new tokens per row; uncached {u:.2f} s ({B * new / u:,.1f} tok/s), "
              f"cached {c:.2f} s ({B * new / c:,.1f} tok/s): {u / c:.1f}x; "
              f"same tokens: {'yes' if same else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
