"""CPU time per streamed token of `llama2c serve` without the model: what the
HTTP path costs (event loop, engine thread's Python, sampling, clients).

    python bench/serve_overhead.py                                   # stories110M shape, int8
    python bench/serve_overhead.py --shape stories15M --clients 1,8,16

Runs `llama2c serve` in a subprocess whose model passes do nothing (the
batch decoder and the prompt passes return fixed random logits), so each
token costs only what is not the model: the engine thread's Python and the
C sampler, the event loop's chunks, JSON and writes, the worker threads.
Clients as bench/serve.py's stream greedy completions of --max-tokens
tokens; the report gives, per N, the CPU time per token of the server's
event-loop thread, its engine thread (the busiest other thread), its other
threads, and the clients. CPU time is counted per thread (/proc), so unlike
tokens/s it hardly moves with the load other jobs put on the machine.
Linux only.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def serve_without_model(argv: list[str]) -> int:
    """`llama2c serve ARGV` with the model's passes replaced by no-ops."""
    import numpy as np

    import llama2c.context as context
    import llama2c.server.engine as engine
    from llama2c.cli import main

    real, start = engine.lib, engine.BatchEngine.__init__
    rng = np.random.default_rng(0)
    fixed: dict = {}

    def init(self, llama, *args, **kwargs):
        start(self, llama, *args, **kwargs)
        if hasattr(self, "_logits"):  # what every decoding step "computes"
            self._logits[:] = rng.standard_normal(self._logits.shape)
        fixed["logits"] = rng.standard_normal(llama.config.vocab_size).astype(np.float32)

    class NoDecode:
        def __getattr__(self, name):
            return getattr(real, name)

        def llama2_decode_batch(self, contexts, tokens, positions, n, logits, err):
            return 0

    def no_pass(self, *args):
        return fixed["logits"].copy()

    engine.BatchEngine.__init__ = init
    engine.lib = NoDecode()
    context.Context._forward = no_pass
    context.Context._forward_batch = no_pass
    return main(["serve"] + argv)


def thread_ticks(pid: int) -> dict[int, int]:
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[int(tid)] = int(fields[11]) + int(fields[12])
        except (OSError, ValueError, IndexError):
            pass
    return out


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-without-model":
        return serve_without_model(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="stories110M")
    p.add_argument("--quant", default="int8", choices=["fp32", "int8", "bf16"])
    p.add_argument("--clients", default="1,8")
    p.add_argument("--requests", type=int, default=16, help="streamed requests per client (default 16)")
    p.add_argument("--max-tokens", type=int, default=128)
    args = p.parse_args()

    import serve

    from llama2c.bench.machine import cpu_info, git_commit, loadavg
    from llama2c.bench.specs import default_cache_dir, shape_models

    spec = shape_models(args.shape, [args.quant], default_cache_dir(), log=lambda m: print(m, file=sys.stderr))[0]
    tick = os.sysconf("SC_CLK_TCK")
    cpu = cpu_info()
    print(f"CPU: {cpu['model']} ({cpu['cores']} cores), load average {loadavg()}, commit {git_commit()}; "
          f"{args.shape} {args.quant} vocabulary, no model passes; {args.requests} requests x {args.max_tokens} "
          "tokens per client")
    print("| clients | event loop | engine thread | other server threads | clients | total (us per token) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for n in [int(c) for c in args.clients.split(",")]:
        server = serve.ours(str(spec.path), str(spec.tokenizer), max(n, 1), 1, None)
        server.cmd = [sys.executable, str(Path(__file__).resolve()), "--serve-without-model"] + server.cmd[4:]
        with server as s:
            serve.run_round(s.url, n, 1, args.max_tokens, serve.PROMPTS)  # warm-up
            before, c0 = thread_ticks(s.proc.pid), time.process_time()
            row = serve.run_round(s.url, n, args.requests, args.max_tokens, serve.PROMPTS)
            after, c1 = thread_ticks(s.proc.pid), time.process_time()
        per = {tid: (after[tid] - before.get(tid, 0)) / tick for tid in after}
        loop = per.pop(s.proc.pid, 0.0)
        engine = max(per.values(), default=0.0)
        others = sum(per.values()) - engine
        us = [1e6 * x / row["tokens"] for x in (loop, engine, others, c1 - c0)]
        print(f"| {n} | {us[0]:.0f} | {us[1]:.0f} | {us[2]:.0f} | {us[3]:.0f} | {sum(us):.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
