"""Throughput and latency of `llama2c serve` under N concurrent streaming clients,
beside llama-cpp-python's OpenAI server on the same weights and the `run` program.

    python bench/serve.py                                # the bundled model
    python bench/serve.py MODEL.bin [--tokenizer T]      # a model file
    python bench/serve.py --shape stories110M --quant int8 --threads 2 --peer llama-cpp --markdown

Starts `llama2c serve` in a subprocess on a free 127.0.0.1 port (and with --peer
llama-cpp, `python -m llama_cpp.server` on the GGUF copy of the same weights: Q8_0
for int8, F32 for fp32, F16 for bf16, same threads and context), then sweeps
--repeat times (default 3) over N in --clients (default 1,2,4,8,16): N clients
at once against each server in turn (which server goes first alternates),
each client making --requests streamed greedy completions of exactly --max-tokens
tokens (BOS and EOS banned with logit_bias, so every request is as long). Each
sweep first measures the references once: `run` on the same .bin (its own
`achieved tok/s`, greedy from BOS, same thread count), the C batch decoder alone
(llama2_decode_batch at 1 row and at the largest N, no sampling) and one
in-process stream of the Python API. Reported per server and N (rates: the median
over the sweeps; latency percentiles: over every request of every sweep):

- aggregate tokens/s: every completion token of the round / the round's wall time;
- TTFT p50/p95: request sent -> first token's event received;
- ITL p50/p95: the gaps between a request's consecutive token events;
- others' CPU: the share of the machine's CPU time (/proc/stat) that went to
  neither the server nor the clients during the round: other jobs, whose load
  makes a round slower (each round first waits, up to --settle s, for idle CPUs);

and the targets as ratios within each sweep (then their median): one stream's
decode rate (tokens after the first over the time from the first token's event to
the last, the way `run` times itself) over `run`'s; the largest N's aggregate
over one stream's; and the largest N's over the batch decoder alone. The clients
run in this process, all in one thread (bench/sse_client.py's run_streams: one
kept-alive connection each, events kept raw and parsed after the round): on a
small machine they take CPU from the servers, as real clients on the same host
would, but as little as a client can. --markdown prints the tables for
docs/BENCHMARKS.md. bench/serve_overhead.py measures the CPU time per token of the
HTTP path alone (no model).

The peer needs llama-cpp-python's server extra: pip install sse-starlette
starlette-context pydantic-settings fastapi.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llama2c.bench.machine import cpu_info, git_commit, loadavg  # noqa: E402
from sse_client import run_streams  # noqa: E402  (bench/, beside this file)

NO_END = {"1": -100, "2": -100}  # BOS and EOS never sampled: every request runs to max_tokens
GGUF_TYPE = {"int8": "q8_0", "fp32": "f32", "bf16": "f16", "q4_0": "q4_0"}
PROMPTS = ["Once upon a time", "The little dog", "One day, Lily", "Tom and Sam went", "The sun was",
           "In a small town", "A big red ball", "The cat sat"]


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


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot (/proc/stat; zeros elsewhere)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def process_ticks(pid: int) -> int:
    """utime + stime of a process (all its threads), in clock ticks (0 where unknown)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, ValueError, IndexError):
        return 0


def settle(max_wait: float, busy_below: float = 0.15) -> float:
    """Waits (at most max_wait s) until the machine's CPUs are less than
    busy_below busy over 0.3 s; returns the last busy fraction seen."""
    deadline = time.monotonic() + max_wait
    while True:
        b0, t0 = cpu_jiffies()
        time.sleep(0.3)
        b1, t1 = cpu_jiffies()
        busy = (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0
        if busy < busy_below or time.monotonic() > deadline:
            return busy


class Server:
    """An HTTP server in a subprocess (ready when `probe` answers), stopped on exit."""

    def __init__(self, name: str, cmd: list[str], port: int, probe: str = "/health", env: dict | None = None):
        self.name, self.cmd, self.port, self.probe = name, cmd, port, probe
        self.url = f"http://127.0.0.1:{port}"
        self.env = dict(os.environ, **(env or {}))

    def __enter__(self) -> "Server":
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                r = httpx.get(self.url + self.probe, timeout=2)
                if r.status_code == 200:
                    self.health = r.json()
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not answer in 180 s")
            time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def ours(model: str, tokenizer: str | None, parallel: int, threads: int | None, n_ctx: int | None) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "llama2c", "serve", model, "--port", str(port), "--parallel", str(parallel),
           "--log-level", "warning"]
    if tokenizer:
        cmd += ["--tokenizer", tokenizer]
    if threads:
        cmd += ["--threads", str(threads)]
    if n_ctx:
        cmd += ["--n-ctx", str(n_ctx)]
    env = {"PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return Server("llama2c serve", cmd, port, "/health", env)


def llama_cpp_server(gguf: Path, threads: int, n_ctx: int) -> Server:
    """llama-cpp-python's own server: requests queue for its one model (no
    batching); interrupt_requests off, so that a new request waits instead of
    cutting the running stream short."""
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
           "--port", str(port), "--n_threads", str(threads), "--n_threads_batch", str(threads),
           "--n_ctx", str(n_ctx), "--interrupt_requests", "False", "--verbose", "False"]
    return Server("llama-cpp-python server", cmd, port, "/v1/models")


def request_body(prompt: str, max_tokens: int) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "repeat_penalty": 1.0,
            "logit_bias": NO_END, "stream_options": {"include_usage": True}}


def summarize(record: dict, max_tokens: int) -> dict:
    """One streamed completion (run_streams' record, parsed after the round):
    its token event times and token count (the usage chunk's, when the
    server sends one; else max_tokens for a stream that ended for its
    length, else its token events)."""
    if record["status"] != 200:
        raise RuntimeError(f"HTTP {record['status']}: {record['body'][:300]!r}")
    times, usage, finish = [], None, None
    for now, data in record["events"]:
        if data == b"[DONE]":
            continue  # the body ends right after it
        chunk = json.loads(data)
        if chunk.get("usage") and not chunk.get("choices"):  # the last chunk (stream_options.include_usage)
            usage = chunk["usage"]
            continue
        choice = chunk["choices"][0]
        if choice["text"]:
            times.append(now)
        finish = choice["finish_reason"] or finish
    if usage is not None:
        tokens = usage["completion_tokens"]
    else:
        tokens = max_tokens if finish == "length" else len(times)
    return {"start": record["start"], "times": times, "tokens": tokens}


def merge(rows: list[dict]) -> dict:
    """One row for R sweeps of the same round: median rates, percentiles over every request."""
    ttft = [x for r in rows for x in r["ttft"]]
    itl = [x for r in rows for x in r["itl"]]
    rate = statistics.median(r["tokens_per_s"] for r in rows)
    return {"clients": rows[0]["clients"], "sweeps": len(rows), "tokens_per_s": rate,
            "tokens_per_s_each": [r["tokens_per_s"] for r in rows],
            "per_stream_tokens_per_s": rate / rows[0]["clients"],
            "decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in rows),
            "decode_each": [r["decode_tokens_per_s"] for r in rows],
            "ttft_p50_ms": 1e3 * percentile(ttft, 0.5), "ttft_p95_ms": 1e3 * percentile(ttft, 0.95),
            "itl_p50_ms": 1e3 * percentile(itl, 0.5), "itl_p95_ms": 1e3 * percentile(itl, 0.95),
            "load_1min": [r["load_1min"] for r in rows], "others_each": [r["others_cpu"] for r in rows],
            "others_cpu": statistics.median(r["others_cpu"] for r in rows)}


def run_round(url: str, n_clients: int, n_requests: int, max_tokens: int, prompts: list[str],
              pid: int | None = None) -> dict:
    """One round; `others_cpu`: the share of the machine's CPU time that went
    to neither the server (pid) nor these clients during it (other jobs)."""
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    bodies = [[request_body(prompts[(i + j) % len(prompts)], max_tokens) for j in range(n_requests)]
              for i in range(n_clients)]
    load = loadavg()
    busy0, total0 = cpu_jiffies()
    ours0 = process_ticks(pid) + process_ticks(os.getpid()) if pid else 0
    start = time.perf_counter()
    records = run_streams(host, int(port), "/v1/completions", bodies)  # every client at once, in this thread
    wall = time.perf_counter() - start
    busy1, total1 = cpu_jiffies()
    ours1 = process_ticks(pid) + process_ticks(os.getpid()) if pid else 0
    others = ((busy1 - busy0) - (ours1 - ours0)) / (total1 - total0) if pid and total1 > total0 else float("nan")
    results = [summarize(r, max_tokens) for r in records]
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["times"][0] - r["start"] for r in results if r["times"]]
    itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    decode = [(len(r["times"]) - 1) / (r["times"][-1] - r["times"][0]) for r in results
              if len(r["times"]) > 2 and r["times"][-1] > r["times"][0]]
    return {"clients": n_clients, "requests": len(results), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "per_stream_tokens_per_s": tokens / wall / n_clients,
            "decode_tokens_per_s": statistics.median(decode) if decode else float("nan"),
            "ttft_p50_ms": 1e3 * percentile(ttft, 0.5), "ttft_p95_ms": 1e3 * percentile(ttft, 0.95),
            "itl_p50_ms": 1e3 * percentile(itl, 0.5), "itl_p95_ms": 1e3 * percentile(itl, 0.95),
            "load_1min": load[0] if load else None, "others_cpu": max(0.0, others), "ttft": ttft, "itl": itl}


def run_program(model: str, tokenizer: str | None, threads: int, steps: int) -> float | None:
    """`run`'s own `achieved tok/s` (greedy from BOS, -n steps); None when
    this checkout has no `run` (make run)."""
    binary = REPO / "run"
    if not binary.exists():
        return None
    cmd = [str(binary), model, "-t", "0", "-n", str(steps), "-s", "1"] + (["-z", tokenizer] if tokenizer else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), LLAMA2_THREADS=str(threads))
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    m = re.search(r"achieved tok/s: ([0-9.]+)", r.stderr)
    if r.returncode != 0 or not m:
        raise RuntimeError(f"run failed: {r.stderr[-300:]}")
    return float(m.group(1))


def engine_alone(llama, rows: list[int], steps: int) -> dict[int, float]:
    """tokens/s of the C batch decoder alone (llama2_decode_batch, no
    sampling, no Python between steps but the call) at each batch size: the
    ceiling of what the server can scale to. Timed on a second pass over the
    same positions: the server's slots keep their contexts, whose KV cache
    pages are then already in memory."""
    import numpy as np

    from llama2c._ffi import ffi, lib
    from llama2c.errors import new_error, raise_for

    out = {}
    for n in rows:
        contexts = [llama.create_context() for _ in range(n)]
        logits = np.empty((n, llama.config.vocab_size), np.float32)
        ptrs, tokens, positions = ffi.new("llama2_context *[]", [c._ptr for c in contexts]), ffi.new("int[]", n), \
            ffi.new("int[]", n)
        buf, err = ffi.from_buffer("float[]", logits), new_error()
        for timed in (False, True):
            t0 = time.perf_counter()
            for pos in range(steps):
                for b in range(n):
                    tokens[b], positions[b] = 3 + (pos * 7 + b) % 100, pos
                raise_for(lib.llama2_decode_batch(ptrs, tokens, positions, n, buf, err), err)
        out[n] = n * steps / (time.perf_counter() - t0)
    return out


def python_api_alone(llama, prompt: str, max_tokens: int) -> float:
    """Decode rate of one in-process stream through the Python API (timed
    from the first token to the last, as `run`)."""
    times = []
    for chunk in llama.create_completion(prompt, max_tokens=max_tokens, temperature=0, stream=True,
                                         logit_bias={int(k): v for k, v in NO_END.items()}):
        if chunk["choices"][0]["text"]:
            times.append(time.perf_counter())
    return (len(times) - 1) / (times[-1] - times[0])


class Others:
    """The share of the machine's CPU time that went to other jobs while in
    the block: neither this process nor its finished children (`run`)."""

    def __enter__(self) -> "Others":
        self.busy, self.total = cpu_jiffies()
        self.ours = self._ours()
        return self

    @staticmethod
    def _ours() -> float:
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

    def __exit__(self, *exc) -> None:
        busy, total = cpu_jiffies()
        tick = os.sysconf("SC_CLK_TCK")
        self.share = max(0.0, ((busy - self.busy) / tick - (self._ours() - self.ours)) / max((total - self.total) / tick,
                                                                                              1e-9))


def references(llama, model: str, tokenizer: str | None, threads: int, rows: list[int], max_tokens: int,
               settle_s: float) -> dict:
    """One measurement of each reference, each after the CPUs settle: `run`,
    the batch decoder alone, one Python API stream; `others`: the largest
    share of the CPUs other jobs took during one of them."""
    out, others = {}, []
    for key, measure in (("run", lambda: run_program(model, tokenizer, threads, max_tokens + 1)),
                         ("engine", lambda: engine_alone(llama, rows, max_tokens)),
                         ("python", lambda: python_api_alone(llama, PROMPTS[0], max_tokens))):
        settle(settle_s)
        with Others() as o:
            out[key] = measure()
        others.append(o.share)
    out["others"] = max(others)
    return out


def markdown(meta: dict, results: dict[str, list[dict]]) -> str:
    load = meta["load"]
    lines = [f"Model: {meta['model']} ({meta['weights']}, n_ctx {meta['n_ctx']}), {meta['threads']} threads; "
             f"{meta['requests']} requests per client, {meta['max_tokens']} tokens each, greedy; "
             f"{meta['repeat']} sweep(s), rates are medians. llama2c serve: {meta['parallel']} slots"
             + (f"; llama-cpp-python {meta['peer']}" if meta.get("peer") else "")
             + f". CPU: {meta['cpu']} ({meta['cores']} cores); load average {load[0]:.2f}-{load[1]:.2f} over the "
             f"rounds (1 min). Commit {meta['commit']}.", "",
             "| server | clients | aggregate tok/s | per stream tok/s | x one stream | TTFT p50 / p95 (ms) | "
             "ITL p50 / p95 (ms) | others' CPU | each sweep (tok/s) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, rows in results.items():
        one = rows[0]["tokens_per_s"] if rows else float("nan")
        for r in rows:
            lines.append(f"| {name} | {r['clients']} | {r['tokens_per_s']:.0f} | {r['per_stream_tokens_per_s']:.0f} | "
                         f"{r['tokens_per_s'] / one:.2f} | {r['ttft_p50_ms']:.1f} / {r['ttft_p95_ms']:.1f} | "
                         f"{r['itl_p50_ms']:.2f} / {r['itl_p95_ms']:.2f} | {r['others_cpu']:.0%} | "
                         + " / ".join(f"{x:.0f}" for x in r["tokens_per_s_each"]) + " |")
    lines.append("")
    lines += summary(meta, results)
    return "\n".join(lines)


def _each(values) -> str:
    return ", ".join(f"{v:.2f}" if v < 10 else f"{v:.0f}" for v in values)


def summary(meta: dict, results: dict[str, list[dict]]) -> list[str]:
    """The lines that answer the targets, each a median over the sweeps of a
    ratio within one sweep (the references ran in the same sweep)."""
    refs = meta["references"]
    out = []
    run = [r["run"] for r in refs if r["run"]]
    sizes = sorted(refs[0]["engine"]) if refs else []
    if run:
        out.append(f"`run` on the same .bin ({meta['threads']} threads, greedy from BOS, {meta['max_tokens'] + 1} "
                   f"steps): {statistics.median(run):.0f} achieved tok/s (each sweep: {_each(run)}).")
    if sizes:
        rates = {n: [r["engine"][n] for r in refs] for n in sizes}
        out.append("The C batch decoder alone (llama2_decode_batch, no sampling): "
                   + ", ".join(f"{statistics.median(rates[n]):.0f} tok/s at {n} row{'s' if n > 1 else ''}"
                               for n in sizes)
                   + f" (each sweep: {'; '.join(_each(rates[n]) for n in sizes)}).")
    out.append(f"One in-process stream of the Python API: {statistics.median(r['python'] for r in refs):.0f} tok/s "
               f"(each sweep: {_each(r['python'] for r in refs)}).")
    for name, rows in results.items():
        by = {r["clients"]: r for r in rows}
        parts = []
        if 1 in by and run and len(run) == len(refs):
            ratio = [d / r["run"] for d, r in zip(by[1]["decode_each"], refs)]
            quiet = [x for x, r, o in zip(ratio, refs, by[1]["others_each"]) if max(r["others"], o) < QUIET]
            parts.append(f"one stream decodes (first token to last) at {statistics.median(ratio):.0%} of `run`'s "
                         f"rate in the same sweep (each: {_each(ratio)}{_quiet(quiet)})")
        top = max(by) if by else None
        if 1 in by and top and top > 1:
            ratio = [a / b for a, b in zip(by[top]["tokens_per_s_each"], by[1]["tokens_per_s_each"])]
            quiet = [x for x, a, b in zip(ratio, by[top]["others_each"], by[1]["others_each"]) if max(a, b) < QUIET]
            parts.append(f"{top} streams give {statistics.median(ratio):.2f}x one stream's aggregate tok/s "
                         f"(each: {_each(ratio)}{_quiet(quiet)})")
            if name == "llama2c serve" and top in sizes:
                ratio = [a / r["engine"][top] for a, r in zip(by[top]["tokens_per_s_each"], refs)]
                quiet = [x for x, r, o in zip(ratio, refs, by[top]["others_each"]) if max(r["others"], o) < QUIET]
                parts.append(f"{top} streams through HTTP run at {statistics.median(ratio):.0%} of the batch decoder "
                             f"alone at {top} rows (each: {_each(ratio)}{_quiet(quiet)})")
        if parts:
            out.append(f"{name}: " + "; ".join(parts) + ".")
    return out


QUIET = 0.05  # a sweep's ratio counts as quiet when other jobs took under 5% of the CPUs in both its measurements


def _quiet(values: list[float]) -> str:
    return f"; where other jobs took under {QUIET:.0%} of the CPUs: {_each(values)}" if values else ""


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
    p.add_argument("--peer", choices=["none", "llama-cpp"], default="none",
                   help="also drive llama-cpp-python's server on the GGUF copy of the same weights")
    p.add_argument("--repeat", type=int, default=3, help="sweeps over --clients (default 3)")
    p.add_argument("--settle", type=float, default=20.0,
                   help="before each round, wait up to this many seconds for the CPUs to be idle (default 20)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    args = p.parse_args()

    model, tokenizer, spec = args.model, args.tokenizer, None
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
    threads = args.threads or os.cpu_count() or 1

    from llama2c import Llama

    info = Llama(model, tokenizer=tokenizer, n_ctx=args.n_ctx)
    n_ctx = int(info.n_ctx)
    if len(info.tokenize(max(PROMPTS, key=len))) + args.max_tokens > n_ctx:
        raise SystemExit(f"--max-tokens {args.max_tokens} does not fit the context of {n_ctx} after a prompt")
    cpu = cpu_info()
    meta = {"model": Path(model).name if not args.shape else f"{args.shape} (random weights)",
            "weights": info.config.weights, "n_ctx": n_ctx, "parallel": parallel, "threads": threads,
            "requests": args.requests, "max_tokens": args.max_tokens, "cpu": cpu["model"], "cores": cpu["cores"],
            "commit": git_commit() or "?", "repeat": args.repeat}
    del info
    servers = [ours(model, tokenizer, parallel, args.threads, args.n_ctx)]
    if args.peer == "llama-cpp":
        if spec is None:
            from llama2c.bench.specs import file_model

            spec = file_model(model, tokenizer)
        from llama2c.bench.specs import default_cache_dir, gguf_for

        gguf = gguf_for(spec, GGUF_TYPE[spec.quant], default_cache_dir(), log=lambda m: print(m, file=sys.stderr))
        servers.append(llama_cpp_server(gguf, threads, n_ctx))
        import llama_cpp

        meta["peer"] = f"{llama_cpp.__version__}'s server on {gguf.name} ({GGUF_TYPE[spec.quant].upper()})"
    engine_rows = sorted({1, max(clients)})
    local = Llama(model, tokenizer=tokenizer, n_threads=threads, n_ctx=args.n_ctx)  # for the references
    meta["references"] = []
    sweeps: dict[str, dict[int, list[dict]]] = {s.name: {n: [] for n in clients} for s in servers}
    loads = []
    for s in servers:
        s.__enter__()
    try:
        for s in servers:
            run_round(s.url, 2, 1, args.max_tokens, PROMPTS)  # warm-up
        k = 0
        for sweep in range(args.repeat):
            meta["references"].append(references(local, model, tokenizer, threads, engine_rows, args.max_tokens,
                                                 args.settle))
            print(f"references: {meta['references'][-1]}", file=sys.stderr, flush=True)
            for n in clients:
                k += 1
                for s in servers if k % 2 else servers[::-1]:  # alternate which server goes first
                    settle(args.settle)
                    row = run_round(s.url, n, args.requests, args.max_tokens, PROMPTS, s.proc.pid)
                    sweeps[s.name][n].append(row)
                    loads.append(row["load_1min"] or 0.0)
                    print(f"{s.name:24s} clients {n:3d}: {row['tokens_per_s']:7.1f} tok/s aggregate, TTFT p50 "
                          f"{row['ttft_p50_ms']:.1f} ms p95 {row['ttft_p95_ms']:.1f} ms, ITL p50 "
                          f"{row['itl_p50_ms']:.2f} ms p95 {row['itl_p95_ms']:.2f} ms (load {row['load_1min']}, "
                          f"others' CPU {row['others_cpu']:.0%})",
                          file=sys.stderr, flush=True)
        health = httpx.get(servers[0].url + "/health").json()
        if health["active"] or health["waiting"]:
            print(f"warning: slots still busy after the rounds: {health}", file=sys.stderr)
    finally:
        for s in servers:
            s.__exit__(None, None, None)
    meta["load"] = (min(loads), max(loads)) if loads else (0.0, 0.0)
    results = {name: [merge(rows) for rows in by_n.values()] for name, by_n in sweeps.items()}
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(markdown(meta, results) if args.markdown else json.dumps({"meta": meta, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
