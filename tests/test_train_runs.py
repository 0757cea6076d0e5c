"""Training runs that don't surprise: a resume keeps the checkpoint's knobs, the
defaults fit a CPU, llama2.c's model table as presets, progress lines with an
ETA for slow iterations and evals, MFU against the device in use."""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sentencepiece")

from test_train import losses, one_thread, syn, tiny_argv, tiny_cfg  # noqa: E402,F401

from llama2c.train import main as train_main  # noqa: E402
from llama2c.train import parse_args, train  # noqa: E402
from llama2c.train import trainer as T  # noqa: E402
from llama2c.train.config import TrainConfig, UsageError  # noqa: E402
from llama2c.train.progress import Progress, fmt_duration  # noqa: E402

QUIET = lambda m: None  # noqa: E731


def ckpt_config(out):
    return torch.load(out / "ckpt.pt", weights_only=True)["config"]


def test_resume_keeps_the_checkpoints_knobs(syn, tmp_path, capsys):
    out = tmp_path / "o"
    argv = tiny_argv(syn.data, out, batch_size=4, gradient_accumulation_steps=2, learning_rate=2e-3,
                     warmup_iters=3, max_iters=4, eval_interval=2, eval_iters=1, min_lr=1e-4, weight_decay=0.05,
                     seed=7)
    assert train_main(argv) == 0
    capsys.readouterr()
    # resume naming only the directory and a new end: everything else is the checkpoint's
    assert train_main(["--init-from=resume", f"--out-dir={out}", "--max-iters=6"]) == 0
    text = capsys.readouterr().out
    assert "tokens per iteration 512 (2 x 1 x 4 x 64)" in text, text
    assert "resume: from the checkpoint:" in text and "batch_size=4" in text
    assert "lr_decay_iters=4 (the old max_iters)" in text
    cfg = ckpt_config(out)
    assert (cfg["batch_size"], cfg["gradient_accumulation_steps"], cfg["learning_rate"], cfg["warmup_iters"],
            cfg["min_lr"], cfg["weight_decay"], cfg["seed"], cfg["max_iters"], cfg["lr_decay_iters"]) == \
        (4, 2, 2e-3, 3, 1e-4, 0.05, 7, 6, 4)
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    lrs = {r["iter"]: r["lr"] for r in rows if "loss" in r}
    assert lrs[4] == lrs[5] == pytest.approx(1e-4)          # the old schedule had ended at iteration 4
    # what is given again wins
    assert train_main(["--init-from=resume", f"--out-dir={out}", "--max-iters=7", "--batch-size=2"]) == 0
    assert "tokens per iteration 256 (2 x 1 x 2 x 64)" in capsys.readouterr().out
    assert ckpt_config(out)["batch_size"] == 2


def test_resume_without_knobs_continues_an_interrupted_run(syn, tmp_path):
    """A run stopped at 3 of 6 and resumed with no knobs at all gives the loss curve of the whole run."""
    kw = dict(max_iters=6, eval_interval=3, eval_iters=1, batch_size=4, learning_rate=2e-3, warmup_iters=2)
    full = train(tiny_cfg(syn.data, tmp_path / "a", **kw), log=QUIET)
    short = dict(kw, max_iters=3, lr_decay_iters=6)
    train(tiny_cfg(syn.data, tmp_path / "b", **short), log=QUIET)
    assert train_main(["--init-from=resume", f"--out-dir={tmp_path / 'b'}", "--max-iters=6",
                       "--lr-decay-iters=6"]) == 0
    assert losses(full) == losses(tmp_path / "b")


def test_cpu_defaults_and_presets(syn, tmp_path):
    cfg = parse_args(["--data=d"])
    assert cfg.batch_size == 0 and cfg.gradient_accumulation_steps == 0      # chosen for the device
    msgs = []
    res = train(tiny_cfg(syn.data, tmp_path, batch_size=0, gradient_accumulation_steps=0, max_iters=1,
                         eval_iters=1), log=msgs.append)
    assert any("defaults for cpu: --batch_size=8 --gradient_accumulation_steps=1" in m for m in msgs), msgs
    assert any("tokens per iteration 512 (1 x 1 x 8 x 64)" in m for m in msgs), msgs
    assert res["iter_num"] == 1
    rt = T.Runtime(device_type="cuda")
    c = TrainConfig(data="d")
    T.auto_batch(c, rt)
    assert (c.batch_size, c.gradient_accumulation_steps) == (128, 4)
    # llama2.c's table; what the command line gives wins, wherever it stands
    p = parse_args(["--data=d", "--preset=260K"])
    assert (p.dim, p.n_layers, p.n_heads, p.n_kv_heads, p.multiple_of, p.max_seq_len, p.learning_rate) == \
        (64, 5, 8, 4, 4, 512, 1e-3)
    p = parse_args(["--data=d", "--dim=32", "--preset=15m", "--n-heads=4"])
    assert (p.preset, p.dim, p.n_layers, p.n_heads, p.max_seq_len) == ("15M", 32, 6, 4, 256)
    p = parse_args(["--data=d", "--preset=110M"])
    assert (p.dim, p.n_layers, p.n_heads, p.max_seq_len) == (768, 12, 12, 1024)
    with pytest.raises(UsageError, match="preset"):
        parse_args(["--data=d", "--preset=7B"])


def test_progress_lines():
    now = [0.0]
    lines = []
    p = Progress(lines.append, after=5.0, every=5.0, clock=lambda: now[0])
    p.begin("iter 3: micro-batch", 8)
    for done in range(1, 9):
        now[0] += 2.0
        p.step(done)
    assert p.end() == 16.0
    # silent for the first 5 s, then at most every 5 s, with the ETA of the rest
    assert lines == ["iter 3: micro-batch 3/8 | 6.0 s | ETA 10.0 s", "iter 3: micro-batch 6/8 | 12.0 s | ETA 4.0 s"]
    assert fmt_duration(3725) == "1h02m" and fmt_duration(125) == "2m05s" and fmt_duration(float("nan")) == "?"
    quick = []
    q = Progress(quick.append, clock=lambda: now[0])
    q.begin("eval", 100)
    q.step(100)
    assert quick == []


def test_slow_iterations_and_evals_report_progress(syn, tmp_path, monkeypatch):
    monkeypatch.setattr(T, "Progress", lambda emit: Progress(emit, after=0.0, every=0.0))
    msgs = []
    train(tiny_cfg(syn.data, tmp_path, max_iters=2, gradient_accumulation_steps=3, eval_iters=2, eval_interval=1),
          log=msgs.append)
    assert any(m.startswith("iter 0: micro-batch 2/3 |") and "ETA" in m for m in msgs), msgs
    assert any(m.startswith("eval at step 0: val batch 1/2 |") for m in msgs), msgs
    lines = [m for m in msgs if " | loss " in m]
    assert lines and all("| ETA " in m for m in lines)


def test_mfu_is_against_the_device_in_use(syn, tmp_path, monkeypatch):
    from llama2c.train import peak

    state = torch.get_rng_state()
    peak._cache.clear()
    value, how = peak.peak_flops("cpu", "float32")
    assert 1e8 < value < 1e14 and "measured float32 matmul" in how
    # measuring draws nothing from the run's random state (a resume replays it exactly)
    assert torch.equal(torch.get_rng_state(), state)
    assert peak.gpu_table_peak("NVIDIA A100-SXM4-80GB", "bfloat16") == 312e12
    assert peak.gpu_table_peak("NVIDIA H100 80GB HBM3", "float32") == 494e12
    monkeypatch.setattr(T, "peak_flops", lambda *a, **k: (1e9, "a test peak"))
    msgs = []
    res = train(tiny_cfg(syn.data, tmp_path, max_iters=8, eval_iters=1), log=msgs.append)
    assert any("mfu is against 1 GFLOP/s per process (a test peak)" in m for m in msgs)
    rows = [e for e in res["history"] if "mfu" in e]
    model_flops = rows[-1]["tok_s"] * T.model_module().Transformer(T.build_model_args(
        T.model_args_from_config(tiny_cfg(syn.data, tmp_path), 512))).flops_per_token()
    # the logged MFU is a running average: against 1 GFLOP/s it is within a factor of the last rate
    assert 0.2 < rows[-1]["mfu"] / (model_flops / 1e9) < 5
