"""Training speed: `llama2c train` against llama2.c's own, unmodified `train.py`,
on the same data, model shape, batch and machine, runs interleaved.

    python bench/train_speed.py                       # ~3 minutes on 2 busy cores
    python bench/train_speed.py --iters 20 --rounds 3 --json out.json
    python bench/train_speed.py --configs llama2c,ours-fp32 --omp-wait-policy=passive
    python bench/train_speed.py --loss-curve 200      # our bf16 vs fp32 loss curves, two seeds each

What runs (the 15M shape of llama2.c's model table: dim 288, 6 layers, 6 heads,
vocabulary 32000, context 256; batch 8 x 256, no gradient accumulation, eager):

- ``llama2c``: llama2.c's train.py, its folder copied to a temporary directory
  (from ../shared/peers/llama2.c or --llama2c DIR), run as
  ``python train.py --device=cpu --dtype=float32 --compile=False ...`` (on a CPU
  it trains in float32 whatever --dtype says). Its data loader reads
  data/TinyStories_all_data/*.bin: shard 0 is its validation split, the rest
  train; they are our prepared shards under those names (the same uint16
  format: BOS then each story's tokens).
- ``ours-fp32`` / ``ours-bf16``: ``python -m llama2c.train`` on the same tokens
  with ``--dtype=float32`` / ``--dtype=bfloat16`` (bf16 autocast; what
  ``--dtype=auto`` picks on a CPU with AVX512_BF16 or AMX); ``ours-*-compile``
  adds --compile=True.

The text is TinyStories (../shared/data/tinystories, or --text) tokenized with
the Llama 2 tokenizer (../shared/data/llama2/tokenizer.model, or --tokenizer).
Every run prints its milliseconds per iteration; the first --warmup
iterations (which include the first evaluation) are dropped and the median of
the rest is the run's time. The rounds run the configurations one after the
other in turn, so all of them see the same machine; the report gives the median
over rounds, tokens/s (8 x 256 / time), the ratio to llama2.c, and MFU: model
FLOPs (6N + 12 * layers * heads * head_size * context per token, PaLM's count,
as llama2.c's estimate_mfu) per second over the measured peak of this CPU in the
dtype the matmuls run in (the best rate of 2048^2 matmuls, measured between
rounds with the same threads).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
SHAPE = dict(dim=288, n_layers=6, n_heads=6, vocab_size=32000, max_seq_len=256, batch_size=8)
CONFIGS = ("llama2c", "ours-fp32", "ours-bf16", "ours-fp32-compile", "ours-bf16-compile")
DTYPE_OF = {"llama2c": "float32", "ours-fp32": "float32", "ours-bf16": "bfloat16",
            "ours-fp32-compile": "float32", "ours-bf16-compile": "bfloat16"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cpu_name() -> str:
    name = platform.processor() or platform.machine()
    flags = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name") and name in ("", platform.machine(), "x86_64"):
                    name = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    native = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    cores = os.cpu_count() or 1
    return f"{name}, {cores} logical CPUs" + (f", native bf16 ({'+'.join(native)})" if native else
                                               ", no native bf16")


def measure_peak(dtype: str, threads: int, n: int = 2048, seconds: float = 1.0) -> float:
    """The best FLOP/s of n x n matmuls in dtype over three short rounds."""
    import torch

    torch.set_num_threads(threads)
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dt)
    b = torch.randn(n, n, generator=g).to(dt)
    torch.mm(a, b)
    best = 0.0
    for _ in range(3):
        k, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 3:
            torch.mm(a, b)
            k += 1
        best = max(best, 2.0 * n ** 3 * k / (time.perf_counter() - t0))
    return best


def prepare_data(work: Path, text: Path, tokenizer: Path) -> Path:
    """Our prepared directory of the text (cached under work)."""
    sys.path.insert(0, str(REPO))
    from llama2c.data import prepare

    out = work / "tokens"
    if not (out / "meta.json").is_file():
        log(f"tokenizing {text} with {tokenizer} ...")
        prepare([text], tokenizer, out, val_fraction=0.05, workers=1, progress=False)
    return out


def setup_llama2c(work: Path, src: Path, data: Path) -> Path:
    """A copy of llama2.c's folder whose data/ holds our shards in its layout."""
    dst = work / "llama2.c"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    meta = json.loads((data / "meta.json").read_text())
    shards = dst / "data" / "TinyStories_all_data"
    shards.mkdir(parents=True)
    # shard 0 is its validation split, the rest its training split
    files = [s["file"] for s in meta["splits"]["val"]["shards"]] + \
            [s["file"] for s in meta["splits"]["train"]["shards"]]
    for i, name in enumerate(files):
        shutil.copyfile(data / name, shards / f"data{i:02d}.bin")
    return dst


def command(config: str, iters: int, work: Path, data: Path, l2c: Path):
    common = dict(batch_size=SHAPE["batch_size"], max_seq_len=SHAPE["max_seq_len"],
                  gradient_accumulation_steps=1, dim=SHAPE["dim"], n_layers=SHAPE["n_layers"],
                  n_heads=SHAPE["n_heads"], max_iters=iters, eval_interval=100000, eval_iters=1,
                  log_interval=1)
    if config == "llama2c":
        args = dict(common, device="cpu", dtype="float32", compile=False, vocab_source="llama2",
                    vocab_size=SHAPE["vocab_size"], n_kv_heads=SHAPE["n_heads"], out_dir=str(work / "out-l2c"))
        return [sys.executable, "train.py"] + [f"--{k}={v}" for k, v in args.items()], l2c
    args = dict(common, device="cpu", dtype=DTYPE_OF[config], compile=config.endswith("-compile"),
                data=str(data), out_dir=str(work / f"out-{config}"), overwrite=True, export_version=-1)
    return [sys.executable, "-m", "llama2c.train"] + [f"--{k}={v}" for k, v in args.items()], REPO


ITER_LINE = {
    # llama2.c: "5 | loss 9.1234 | lr 2.500000e-06 | 1234.56ms | mfu 0.01%"
    "llama2c": re.compile(r"^(\d+) \| loss ([0-9.naninf]+) \| lr \S+ \| ([0-9.]+)ms"),
    # ours: "5 | loss 9.1234 | lr 2.500e-06 | 1234.5 ms | 1,659 tok/s | mfu ..."
    "ours": re.compile(r"^(\d+) \| loss ([0-9.naninf]+) \| lr \S+ \| ([0-9.]+) ms"),
}


def run_one(config: str, iters: int, work: Path, data: Path, l2c: Path, env: dict, timeout: float):
    argv, cwd = command(config, iters, work, data, l2c)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{config} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n"
                           f"{proc.stderr[-3000:]}")
    pattern = ITER_LINE["llama2c" if config == "llama2c" else "ours"]
    its = {}
    for line in proc.stdout.splitlines():
        m = pattern.match(line.strip())
        if m:
            its[int(m.group(1))] = (float(m.group(3)) / 1000.0, float(m.group(2)))
    if not its:
        raise RuntimeError(f"{config}: no iteration lines in its output:\n{proc.stdout[-2000:]}")
    return its, time.perf_counter() - t0


def flops_per_iter() -> float:
    d, L, H, V, T, B = (SHAPE[k] for k in ("dim", "n_layers", "n_heads", "vocab_size", "max_seq_len",
                                           "batch_size"))
    hidden = 32 * ((int(2 * 4 * d / 3) + 31) // 32)
    n_params = V * d + L * (4 * d * d + 3 * d * hidden + 2 * d) + d      # tied classifier
    return (6 * n_params + 12 * L * H * (d // H) * T) * T * B


def bench(a) -> dict:
    import torch

    threads = a.threads or torch.get_num_threads()
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = str(threads)
    env.pop("GOMP_SPINCOUNT", None)
    if a.omp_wait_policy != "unset":
        env["OMP_WAIT_POLICY"] = a.omp_wait_policy.upper()
    else:
        env.pop("OMP_WAIT_POLICY", None)
    env.setdefault("PYTHONUNBUFFERED", "1")
    configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    bad = [c for c in configs if c not in CONFIGS]
    if bad:
        raise SystemExit(f"unknown config {bad[0]!r}: choose from {', '.join(CONFIGS)}")

    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="llama2c-train-speed."))
    work.mkdir(parents=True, exist_ok=True)
    try:
        data = prepare_data(work, Path(a.text), Path(a.tokenizer))
        l2c = setup_llama2c(work, Path(a.llama2c), data) if "llama2c" in configs else work
        times = {c: [] for c in configs}
        losses = {c: [] for c in configs}
        peaks = {"float32": [], "bfloat16": []}
        load = [os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")]
        for r in range(a.rounds):
            for dt in peaks:
                if any(DTYPE_OF[c] == dt for c in configs):
                    peaks[dt].append(measure_peak(dt, threads))
            order = configs if r % 2 == 0 else configs[::-1]      # alternate who goes first
            for c in order:
                its, wall = run_one(c, a.iters, work, data, l2c, env, a.timeout)
                timed = [its[i][0] for i in sorted(its) if i >= a.warmup]
                if not timed:
                    raise SystemExit(f"{c}: only {len(its)} iterations: raise --iters above --warmup")
                med = statistics.median(timed)
                times[c].append(med)
                losses[c].append([its[i][1] for i in sorted(its)])
                log(f"round {r + 1}/{a.rounds} {c:18s} {med * 1000:8.1f} ms/iter "
                    f"({len(timed)} timed iterations, {wall:.0f} s in all)")
            load.append(os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"))
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)

    flops = flops_per_iter()
    tokens = SHAPE["batch_size"] * SHAPE["max_seq_len"]
    peak = {dt: max(v) for dt, v in peaks.items() if v}
    base = statistics.median(times["llama2c"]) if "llama2c" in times else None
    rows = []
    for c in configs:
        t = statistics.median(times[c])
        dt = DTYPE_OF[c]
        rows.append(dict(config=c, dtype=dt, s_per_iter=t, per_round=times[c], tokens_per_s=tokens / t,
                         vs_llama2c=(base / t) if base else None, gflops=flops / t / 1e9,
                         mfu=flops / t / peak[dt] if dt in peak else None,
                         first_losses=losses[c][0][:5]))
    return dict(cpu=cpu_name(), torch=torch.__version__, threads=threads,
                omp_wait_policy=a.omp_wait_policy, iters=a.iters, warmup=a.warmup, rounds=a.rounds,
                shape=SHAPE, flops_per_iter=flops, peak_gflops={k: v / 1e9 for k, v in peak.items()},
                load_average=load, results=rows)


def report(res: dict) -> str:
    lines = [f"CPU: {res['cpu']}; torch {res['torch']}; {res['threads']} threads; "
             f"OMP_WAIT_POLICY {res['omp_wait_policy']}",
             "peak (best 2048^2 matmul): " + ", ".join(f"{k} {v:,.0f} GFLOP/s"
                                                        for k, v in res["peak_gflops"].items()),
             f"15M shape, batch 8 x 256 = 2,048 tokens/iter, {res['flops_per_iter'] / 1e9:.0f} GFLOP/iter; "
             f"{res['rounds']} rounds x {res['iters']} iters (first {res['warmup']} dropped); "
             f"load average {', '.join(f'{x:.1f}' for x in res['load_average'])}",
             "",
             f"{'config':18s} {'dtype':9s} {'s/iter':>7s} {'tokens/s':>9s} {'vs llama2.c':>11s} "
             f"{'GFLOP/s':>8s} {'MFU':>6s}  per round (s/iter)"]
    for r in res["results"]:
        ratio = f"{r['vs_llama2c']:.2f}x" if r["vs_llama2c"] else "-"
        mfu = f"{r['mfu'] * 100:.1f}%" if r["mfu"] is not None else "-"
        rounds = " ".join(f"{x:.3f}" for x in r["per_round"])
        lines.append(f"{r['config']:18s} {r['dtype']:9s} {r['s_per_iter']:7.3f} {r['tokens_per_s']:9,.0f} "
                     f"{ratio:>11s} {r['gflops']:8.1f} {mfu:>6s}  {rounds}")
    return "\n".join(lines)


def loss_curve(a) -> int:
    """Our fp32 and bf16 runs over the same batches, from --seeds seeds (each
    seed changes the initial weights and the batch order): the training loss
    in windows of iterations and the final validation loss, with the spread
    between seeds as the measure of noise."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="llama2c-loss-curve."))
    work.mkdir(parents=True, exist_ok=True)
    n = a.loss_curve
    seeds = [1337 + i for i in range(max(1, a.seeds))]
    curves, vals = {}, {}
    try:
        data = prepare_data(work, Path(a.text), Path(a.tokenizer))
        for seed in seeds:
            for dt in ("float32", "bfloat16"):
                out = work / f"curve-{dt}-{seed}"
                argv = [sys.executable, "-m", "llama2c.train", f"--data={data}", f"--out-dir={out}",
                        "--overwrite", f"--dtype={dt}", "--device=cpu", f"--seed={seed}",
                        f"--batch-size={SHAPE['batch_size']}", f"--max-seq-len={SHAPE['max_seq_len']}",
                        "--gradient-accumulation-steps=1", f"--dim={SHAPE['dim']}",
                        f"--n-layers={SHAPE['n_layers']}", f"--n-heads={SHAPE['n_heads']}",
                        f"--max-iters={n}", "--learning-rate=1e-3", f"--warmup-iters={max(1, n // 10)}",
                        f"--eval-interval={n}", "--eval-iters=8", "--log-interval=1", "--export-version=-1"]
                log(f"seed {seed}: training {n} iterations in {dt} ...")
                subprocess.run(argv, cwd=REPO, env=env, check=True, capture_output=True, text=True,
                               timeout=a.timeout * 4)
                entries = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
                curves[dt, seed] = {e["iter"]: e["loss"] for e in entries if "loss" in e}
                vals[dt, seed] = [e["val_loss"] for e in entries if "val_loss" in e][-1]
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)

    def window(dt, seed, lo, hi):
        return statistics.mean(curves[dt, seed][i] for i in range(lo, hi) if i in curves[dt, seed])

    step = max(1, n // 10)
    print(f"training loss, mean of each window of {step} iterations ({len(seeds)} seed(s): "
          f"{', '.join(map(str, seeds))}; bf16-fp32 per seed, and the spread of fp32 between seeds)")
    print(f"{'iters':>11s} {'fp32':>8s} {'bf16':>8s} {'bf16-fp32':>20s} {'fp32 seeds':>11s}")
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        f = [window("float32", s_, lo, hi) for s_ in seeds]
        b = [window("bfloat16", s_, lo, hi) for s_ in seeds]
        diffs = " ".join(f"{y - x:+.3f}" for x, y in zip(f, b))
        spread = f"{max(f) - min(f):.3f}" if len(seeds) > 1 else "-"
        print(f"{lo:5d}-{hi - 1:<5d} {statistics.mean(f):8.4f} {statistics.mean(b):8.4f} {diffs:>20s} "
              f"{spread:>11s}")
    for s_ in seeds:
        print(f"seed {s_}: final val loss fp32 {vals['float32', s_]:.4f}, bf16 {vals['bfloat16', s_]:.4f} "
              f"({vals['bfloat16', s_] - vals['float32', s_]:+.4f})")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="llama2c,ours-fp32,ours-bf16",
                   help=f"comma list from {', '.join(CONFIGS)}")
    p.add_argument("--iters", type=int, default=12, help="iterations per run (default 12)")
    p.add_argument("--warmup", type=int, default=3, help="leading iterations not timed (default 3)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of every config (default 2)")
    p.add_argument("--threads", type=int, default=0, help="torch threads for both (default: torch's)")
    p.add_argument("--omp-wait-policy", choices=("passive", "active", "unset"), default="unset",
                   help="OMP_WAIT_POLICY for both trainers (default unset: each its own, "
                        "libgomp's spin-then-sleep for llama2.c's, a short spin for ours "
                        "(llama2c.omp_wait); passive or active: the same for both)")
    p.add_argument("--llama2c", default=str(SHARED / "peers" / "llama2.c"),
                   help="llama2.c's source folder (train.py, model.py, tinystories.py, ...)")
    p.add_argument("--text", default=str(SHARED / "data" / "tinystories" / "TinyStories-validation-head.txt"))
    p.add_argument("--tokenizer", default=str(SHARED / "data" / "llama2" / "tokenizer.model"),
                   help="a 32000-piece SentencePiece model (Llama 2's)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per run")
    p.add_argument("--keep", default="", help="work in this directory and keep it")
    p.add_argument("--json", default="", help="also write the results here")
    p.add_argument("--loss-curve", type=int, default=0, metavar="N",
                   help="instead: train ours N iterations in fp32 and in bf16 and compare the losses")
    p.add_argument("--seeds", type=int, default=2, help="seeds for --loss-curve (default 2)")
    a = p.parse_args(argv)
    for path in (a.text, a.tokenizer) + ((a.llama2c,) if "llama2c" in a.configs and not a.loss_curve else ()):
        if not Path(path).exists():
            raise SystemExit(f"{path}: not found (see --help)")
    if a.loss_curve:
        return loss_curve(a)
    res = bench(a)
    text = report(res)
    print(text)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
