"""Throughput and latency of `llama2c serve` under N concurrent streaming clients.

    python bench/serve.py                                # the bundled model
    python bench/serve.py MODEL.bin [--tokenizer T]      # a model file
    python bench/serve.py --shape stories110M --quant int8 --threads 2   # random weights of a standard shape

Starts `llama2c serve` in a subprocess on a free 127.0.0.1 port, then for each
N in --clients (default 1,2,4,8,16) runs N client threads at once, each making
--requests streamed greedy completions of exactly --max-tokens tokens (BOS and
EOS banned with logit_bias, so every request is as long). Reports per N:

- aggregate tokens/s: every completion token of the round / the round's wall time;
- TTFT p50/p95: request sent -> first token's event received;
- ITL p50/p95: the gaps between a request's consecutive token events.

It also times the Python API alone on the same model (one in-process stream,
same settings) as the reference for one stream. The clients run in this
process: on a small machine they take CPU from the server, as real clients on
the same host would. --markdown prints the table for docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llama2c.bench.machine import cpu_info, git_commit  # noqa: E402

NO_END = {"1": -100, "2": -100}  # BOS and EOS never sampled: every request runs to max_tokens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


class Server:
    """`llama2c serve` in a subprocess, stopped on exit."""

    def __init__(self, model: str, tokenizer: str | None, parallel: int, threads: int | None, n_ctx: int | None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "llama2c", "serve", model, "--port", str(self.port), "--parallel",
               str(parallel), "--log-level", "warning"]
        if tokenizer:
            cmd += ["--tokenizer", tokenizer]
        if threads:
            cmd += ["--threads", str(threads)]
        if n_ctx:
            cmd += ["--n-ctx", str(n_ctx)]
        self.cmd = cmd

    def __enter__(self) -> "Server":
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(self.cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama2c serve exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                self.health = httpx.get(self.url + "/health", timeout=2).json()
                return self
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise RuntimeError("llama2c serve did not answer in 120 s") from None
                time.sleep(0.1)

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def one_request(http: httpx.Client, url: str, prompt: str, max_tokens: int) -> dict:
    """One streamed completion: its token event times and token count."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "logit_bias": NO_END, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times, usage = [], None
    with http.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            if '"usage":{' in data:  # the last chunk (stream_options.include_usage)
                usage = json.loads(data)["usage"]
            elif '"text":""' not in data:
                times.append(time.perf_counter())
    if usage is None:
        raise RuntimeError("the stream had no usage chunk")
    return {"start": t0, "times": times, "tokens": usage["completion_tokens"]}


def run_round(url: str, n_clients: int, n_requests: int, max_tokens: int, prompts: list[str]) -> dict:
    limits = httpx.Limits(max_connections=n_clients + 4, max_keepalive_connections=n_clients + 4)
    results: list[dict] = []
    lock = threading.Lock()
    with httpx.Client(timeout=600, limits=limits) as http:
        def client(i: int) -> None:
            for j in range(n_requests):
                res = one_request(http, url, prompts[(i + j) % len(prompts)], max_tokens)
                with lock:
                    results.append(res)

        start = time.perf_counter()
        with ThreadPoolExecutor(n_clients) as pool:
            for f in [pool.submit(client, i) for i in range(n_clients)]:
                f.result()
        wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["times"][0] - r["start"] for r in results if r["times"]]
    itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    return {"clients": n_clients, "requests": len(results), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "per_stream_tokens_per_s": tokens / wall / n_clients,
            "ttft_p50_ms": 1e3 * percentile(ttft, 0.5), "ttft_p95_ms": 1e3 * percentile(ttft, 0.95),
            "itl_p50_ms": 1e3 * percentile(itl, 0.5), "itl_p95_ms": 1e3 * percentile(itl, 0.95)}


def python_api_alone(model: str, tokenizer: str | None, threads: int | None, n_ctx: int | None, prompt: str,
                     max_tokens: int, reps: int = 3) -> float:
    """tokens/s of one in-process stream through the Python API (best of reps)."""
    from llama2c import Llama

    llama = Llama(model, tokenizer=tokenizer, n_threads=threads, n_ctx=n_ctx)
    best = 0.0
    for _ in range(reps):
        t0, n = time.perf_counter(), 0
        for chunk in llama.create_completion(prompt, max_tokens=max_tokens, temperature=0, stream=True,
                                             logit_bias={int(k): v for k, v in NO_END.items()}):
            n += bool(chunk["choices"][0]["text"])
        best = max(best, n / (time.perf_counter() - t0))
    return best


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"Model: {meta['model']} ({meta['weights']}, n_ctx {meta['n_ctx']}), {meta['parallel']} slots, "
             f"{meta['threads']} threads; {meta['requests']} requests per client, {meta['max_tokens']} tokens each, "
             f"greedy. CPU: {meta['cpu']} ({meta['cores']} cores). Commit {meta['commit']}, engine "
             f"{meta['engine']}.", "",
             "| clients | aggregate tok/s | per stream tok/s | x one stream | TTFT p50 / p95 (ms) | "
             "ITL p50 / p95 (ms) |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    one = rows[0]["tokens_per_s"] if rows else float("nan")
    for r in rows:
        lines.append(f"| {r['clients']} | {r['tokens_per_s']:.0f} | {r['per_stream_tokens_per_s']:.0f} | "
                     f"{r['tokens_per_s'] / one:.2f} | {r['ttft_p50_ms']:.1f} / {r['ttft_p95_ms']:.1f} | "
                     f"{r['itl_p50_ms']:.2f} / {r['itl_p95_ms']:.2f} |")
    lines += ["", f"One stream through the Python API in-process (no HTTP): {meta['python_alone']:.0f} tok/s."]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default=None, help="model .bin (default: the bundled model)")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--shape", default=None, help="random weights of a standard shape (llama2c bench's), e.g. "
                                                 "stories15M, stories110M")
    p.add_argument("--quant", default="int8", choices=["fp32", "int8", "bf16"], help="with --shape (default int8)")
    p.add_argument("--clients", default="1,2,4,8,16", help="concurrent clients per round (default 1,2,4,8,16)")
    p.add_argument("--requests", type=int, default=3, help="streamed requests per client (default 3)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per request (default 64)")
    p.add_argument("--parallel", type=int, default=None, help="server slots (default: the largest --clients)")
    p.add_argument("--threads", type=int, default=None, help="server threads (default: all cores)")
    p.add_argument("--n-ctx", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    args = p.parse_args()

    model, tokenizer = args.model, args.tokenizer
    if args.shape:
        from llama2c.bench.specs import default_cache_dir, shape_models

        spec = shape_models(args.shape, [args.quant], default_cache_dir(), log=lambda m: print(m, file=sys.stderr))[0]
        model, tokenizer = str(spec.path), str(spec.tokenizer)
    elif model is None:
        from llama2c.bundled import bundled_model

        m, t = bundled_model()
        model, tokenizer = str(m), str(t)
    clients = [int(c) for c in args.clients.split(",")]
    parallel = args.parallel or max(clients)
    prompts = ["Once upon a time", "The little dog", "One day, Lily", "Tom and Sam went", "The sun was",
               "In a small town", "A big red ball", "The cat sat"]

    from llama2c import Llama

    info = Llama(model, tokenizer=tokenizer, n_ctx=args.n_ctx)
    n_ctx = int(info.n_ctx)
    if len(info.tokenize(max(prompts, key=len))) + args.max_tokens > n_ctx:
        raise SystemExit(f"--max-tokens {args.max_tokens} does not fit the context of {n_ctx} after a prompt")
    cpu = cpu_info()
    meta = {"model": Path(model).name if not args.shape else f"{args.shape} (random weights)",
            "weights": info.config.weights, "n_ctx": n_ctx, "parallel": parallel,
            "threads": args.threads or os.cpu_count(), "requests": args.requests, "max_tokens": args.max_tokens,
            "cpu": cpu["model"], "cores": cpu["cores"], "commit": git_commit() or "?"}
    del info
    meta["python_alone"] = python_api_alone(model, tokenizer, args.threads, args.n_ctx, prompts[0], args.max_tokens)
    rows = []
    with Server(model, tokenizer, parallel, args.threads, args.n_ctx) as server:
        from llama2c.server import engine as engine_module

        meta["engine"] = f"{engine_module.BatchEngine.__module__}.BatchEngine ({server.health['parallel']} slots)"
        run_round(server.url, 2, 1, 8, prompts)  # warm-up
        for n in clients:
            row = run_round(server.url, n, args.requests, args.max_tokens, prompts)
            rows.append(row)
            print(f"clients {n:3d}: {row['tokens_per_s']:8.1f} tok/s aggregate, TTFT p50 {row['ttft_p50_ms']:.1f} ms "
                  f"p95 {row['ttft_p95_ms']:.1f} ms, ITL p50 {row['itl_p50_ms']:.2f} ms p95 "
                  f"{row['itl_p95_ms']:.2f} ms", file=sys.stderr, flush=True)
        health = httpx.get(server.url + "/health").json()
        if health["active"] or health["waiting"]:
            print(f"warning: slots still busy after the rounds: {health}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(markdown(meta, rows) if args.markdown else json.dumps({"meta": meta, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
