"""llama2c.train: tokenizer -> data -> train (one process, DDP, FSDP2) -> resume ->
model.bin -> the C engine. Tiny models (dim 64, 2 layers, vocab 512, seq 64) on a
synthetic corpus, so everything runs without ../shared/data; the TinyStories slice
end-to-end test uses the shared text when it is there."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
spm = pytest.importorskip("sentencepiece")
pytest.importorskip("tqdm")

from helpers import REPO  # noqa: E402
from test_data import synthetic_stories, write_text  # noqa: E402

from llama2c.data import load_split, prepare, train_tokenizer  # noqa: E402
from llama2c.train import TrainConfig, parse_args  # noqa: E402
from llama2c.train import checkpoint as ck  # noqa: E402
from llama2c.train import main as train_main  # noqa: E402
from llama2c.train import train  # noqa: E402
from llama2c.train.config import UsageError  # noqa: E402
from llama2c.train.loader import NotEnoughData, WindowSampler  # noqa: E402
from llama2c.train.trainer import get_lr  # noqa: E402

TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, batch_size=8, max_seq_len=64,
            gradient_accumulation_steps=1, learning_rate=3e-3, warmup_iters=5, eval_iters=4,
            eval_interval=1000, log_interval=1, dropout=0.0, dtype="float32", device="cpu")


def tiny_cfg(data, out, **kw) -> TrainConfig:
    return TrainConfig(**{**TINY, "data": str(data), "out_dir": str(out), **kw})


def tiny_argv(data, out, **kw) -> list[str]:
    return [f"--{k}={v}" for k, v in {**TINY, "data": data, "out_dir": out, **kw}.items()]


def losses(result_or_dir) -> dict[int, float]:
    """iteration -> training loss, from a train() result or an out_dir's log.jsonl."""
    if isinstance(result_or_dir, dict):
        entries = result_or_dir["history"]
    else:
        lines = (Path(result_or_dir) / "log.jsonl").read_text().splitlines()
        entries = [json.loads(x) for x in lines]
    return {e["iter"]: e["loss"] for e in entries if "loss" in e}


def sub_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small matrices run fastest (and reproducibly) on one thread, above all on a
    shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def syn(tmp_path_factory) -> SimpleNamespace:
    """Synthetic stories -> 512-piece tokenizer -> prepared data."""
    d = tmp_path_factory.mktemp("syn")
    src = write_text(d / "stories.txt", synthetic_stories(1500, seed=5))
    tok = train_tokenizer([src], 512, d / "tok512.model")
    prepare([src], tok, d / "data", workers=1, progress=False)
    return SimpleNamespace(dir=d, src=src, tok=tok, data=d / "data")


@pytest.fixture(scope="module")
def trained(syn, tmp_path_factory) -> SimpleNamespace:
    """One 40-iteration run shared by the tests that inspect its outputs."""
    out = tmp_path_factory.mktemp("trained")
    result = train(tiny_cfg(syn.data, out, max_iters=40, eval_interval=20), log=lambda m: None)
    return SimpleNamespace(out=out, result=result, syn=syn)


def tokenizer_bin(model: Path) -> Path:
    try:
        from llama2c.export.tokenizer_bin import export_tokenizer
    except ImportError:
        pytest.skip("llama2c.export.tokenizer_bin is not there yet: cannot write tok.bin for ./run")
    out = model.with_suffix(".bin")
    if not out.exists():
        export_tokenizer(model, out)
    return out


# ---------------------------------------------------------------------------
# pieces
# ---------------------------------------------------------------------------

def test_parse_args_knobs():
    cfg = parse_args(["--data=d", "--batch_size=4", "--max-iters", "10", "--compile", "--decay_lr=False",
                      "--learning_rate=1e-3", "--dtype=bfloat16", "--fsdp", "--max_iters=2e3"])
    assert (cfg.batch_size, cfg.max_iters, cfg.compile, cfg.decay_lr, cfg.fsdp) == (4, 2000, True, False, True)
    assert cfg.learning_rate == 1e-3 and cfg.dtype == "bfloat16"
    assert parse_args(["--data=d", "--compile", "false"]).compile is False
    for bad, match in [(["--data=d", "--max_itrs=3"], "did you mean --max_iters"),
                       (["--data=d", "--dim=abc"], "integer"),
                       (["--data=d", "--dtype=int8"], "dtype"),
                       (["--data=d", "--dim=64", "--n_heads=5"], "multiple"),
                       (["--data=d", "--init_from=gpt2"], "init_from"),
                       ([], "--data")]:
        with pytest.raises(UsageError, match=match):
            parse_args(bad)


def test_lr_schedule():
    cfg = TrainConfig(data="d", learning_rate=1.0, warmup_iters=10, max_iters=110, min_lr=0.1)
    assert get_lr(0, cfg) == 0.0 and get_lr(5, cfg) == 0.5 and get_lr(10, cfg) == 1.0
    assert get_lr(60, cfg) == pytest.approx(0.55)
    assert get_lr(110, cfg) == pytest.approx(0.1) and get_lr(500, cfg) == 0.1
    assert all(get_lr(i, cfg) >= get_lr(i + 1, cfg) for i in range(10, 120))
    cfg.decay_lr = False
    assert get_lr(0, cfg) == get_lr(77, cfg) == 1.0


def test_window_sampler_shards_by_rank_and_resumes():
    shards = [np.arange(1000, dtype=np.uint16), np.arange(5000, 5700, dtype=np.uint16)]
    ranks = [WindowSampler(shards, 16, 4, rank=r, world_size=2, seed=3) for r in range(2)]
    assert ranks[0].n_windows == ranks[1].n_windows == ((999 // 16) + (699 // 16)) // 2

    def starts(s):
        return {int(s.window(i)[0]) for i in range(s.n_windows)}

    a, b = starts(ranks[0]), starts(ranks[1])
    assert a and b and not (a & b)                 # each rank reads a different part
    x, y = ranks[0].next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])        # targets are inputs shifted by one
    # a sampler restored from a state continues the same sequence, across epochs
    s = WindowSampler(shards, 16, 5, seed=9)
    for _ in range(23):
        s.next_batch()
    state = dict(s.state_dict())
    want = [s.next_batch()[0] for _ in range(30)]
    t = WindowSampler(shards, 16, 5, seed=9)
    t.load_state_dict(state)
    assert all(torch.equal(p, q) for p, q in zip(want, [t.next_batch()[0] for _ in range(30)]))
    with pytest.raises(NotEnoughData, match="max_seq_len"):
        WindowSampler([np.arange(10, dtype=np.uint16)], 16, 1)


def test_atomic_save_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    ck.atomic_save({"a": torch.ones(2)}, path)

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(RuntimeError):
        ck.atomic_save({"a": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_rng_state_round_trip():
    import random

    state = ck.rng_state()
    want = (torch.rand(3), np.random.rand(3), random.random())
    ck.set_rng_state(state)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and want[2] == got[2]


# ---------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------

def test_loss_falls_and_outputs(trained):
    curve = losses(trained.result)
    assert sorted(curve) == list(range(40))
    first, last = curve[0], np.mean([curve[i] for i in range(35, 40)])
    assert first > 5.5                                # about ln(512) = 6.24 at the start
    assert last < first - 1.5, curve
    out = trained.out
    assert (out / "model.bin").is_file() and (out / "ckpt.pt").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]   # no temp files left
    ckpt = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
    assert ckpt["iter_num"] == 40 and ckpt["format"] == "llama2c-train"
    assert ckpt["model_args"]["vocab_size"] == 512 and ckpt["model_args"]["n_kv_heads"] == 2
    assert ckpt["config"]["max_iters"] == 40
    assert set(ckpt["rng"][0]) == {"torch", "cuda", "numpy", "python"}
    assert ckpt["sampler"]["pos"] > 0
    evals = [e for e in trained.result["history"] if "val_loss" in e]
    assert [e["iter"] for e in evals] == [0, 20, 40]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0
    log = (out / "log.jsonl").read_text().splitlines()
    assert {"iter", "loss", "lr", "ms", "tok_s", "mfu"} <= set(json.loads(log[1]))


@pytest.mark.parametrize("dropout,gas", [(0.0, 1), (0.1, 2)])
def test_resume_continues_the_same_loss_curve(syn, tmp_path, dropout, gas):
    """2N iterations in one go == N iterations, then resume to 2N (bitwise)."""
    n = 6
    common = dict(dropout=dropout, gradient_accumulation_steps=gas, eval_interval=4,
                  lr_decay_iters=2 * n, warmup_iters=2)
    quiet = lambda m: None  # noqa: E731
    full = train(tiny_cfg(syn.data, tmp_path / "a", max_iters=2 * n, **common), log=quiet)
    train(tiny_cfg(syn.data, tmp_path / "b", max_iters=n, **common), log=quiet)
    resumed = train(tiny_cfg(syn.data, tmp_path / "b", max_iters=2 * n, init_from="resume", **common),
                    log=quiet)
    a, b = losses(full), losses(tmp_path / "b")
    assert sorted(a) == sorted(b) == list(range(2 * n))
    assert [a[i] for i in range(2 * n)] == [b[i] for i in range(2 * n)]
    assert sorted(losses(resumed)) == list(range(n, 2 * n))
    wa = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    wb = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert all(torch.equal(wa["model"][k], wb["model"][k]) for k in wa["model"])
    assert wa["sampler"] == wb["sampler"]
    assert (tmp_path / "a" / "model.bin").read_bytes() == (tmp_path / "b" / "model.bin").read_bytes()


def test_bfloat16_autocast_on_cpu(syn, tmp_path):
    result = train(tiny_cfg(syn.data, tmp_path, max_iters=3, dtype="bfloat16", eval_iters=1),
                   log=lambda m: None)
    assert np.isfinite(list(losses(result).values())).all()
    assert (tmp_path / "model.bin").is_file()


def test_small_validation_split_and_too_little_data(syn, tmp_path):
    src = write_text(tmp_path / "few.txt", synthetic_stories(40, seed=1))
    prepare([src], syn.tok, tmp_path / "d", val_fraction=0.01, workers=1, progress=False)
    n_val = sum(len(a) for a in load_split(tmp_path / "d", "val"))     # one story
    msgs = []
    # windows of n_val + 1 tokens: the validation split cannot fill one
    result = train(tiny_cfg(tmp_path / "d", tmp_path / "o", max_iters=2, eval_iters=1, max_seq_len=n_val),
                   log=msgs.append)
    assert any("train loss stands in" in m for m in msgs)
    assert result["iter_num"] == 2
    with pytest.raises(NotEnoughData, match="train split"):
        train(tiny_cfg(tmp_path / "d", tmp_path / "o2", max_iters=2, max_seq_len=100_000), log=msgs.append)


def test_cli_main(syn, tmp_path, capsys):
    assert train_main(["--help"]) == 0
    assert "--gradient_accumulation_steps" in capsys.readouterr().out
    assert train_main(["--data=x", "--bogus=1"]) == 2
    assert "unknown option --bogus" in capsys.readouterr().err
    assert train_main(["--data", str(tmp_path / "missing")]) == 1
    assert "meta.json" in capsys.readouterr().err
    assert train_main(["--init_from=resume", f"--out_dir={tmp_path}"]) == 1
    assert "no checkpoint" in capsys.readouterr().err
    argv = tiny_argv(syn.data, tmp_path / "o", max_iters=3, eval_iters=1)
    assert train_main(argv) == 0
    out = capsys.readouterr().out
    assert "tok/s" in out and "mfu" in out and "wrote" in out and "model.bin" in out
    # a finished run resumed with the same max_iters has nothing left to do
    assert train_main(argv + ["--init_from=resume"]) == 0
    assert "nothing to train" in capsys.readouterr().out


# ---------------------------------------------------------------------------
# the exported model in the C engine
# ---------------------------------------------------------------------------

def test_model_bin_matches_pytorch_and_runs_in_c(trained, cli):
    import llama2c
    from llama2c.model import Transformer

    tok_bin = tokenizer_bin(trained.syn.tok)
    model_bin = trained.out / "model.bin"
    proc = cli("run", model_bin, "-z", tok_bin, "-n", 20, "-s", 1)
    assert proc.returncode == 0, proc.stderr.decode()
    assert len(proc.stdout.decode("utf-8", "replace").strip()) > 0
    # the C engine's logits match the PyTorch model of the checkpoint
    ref = Transformer.from_checkpoint(trained.out / "ckpt.pt")
    ref.eval()
    llama = llama2c.Llama(str(model_bin), tokenizer=str(tok_bin), n_threads=1)
    tokens = [1, 400, 300, 17, 250]
    with torch.no_grad():
        want = ref(torch.tensor([tokens]))[0].numpy()
    for pos, t in enumerate(tokens):
        np.testing.assert_allclose(llama.forward(t, pos), want[pos], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_end_to_end_tinystories(shared_data, tmp_path, cli):
    """The user's five steps on a slice of real TinyStories text, through the entry points."""
    from llama2c.data import cli as data_cli

    text = (shared_data / "tinystories" / "TinyStories-validation-head.txt").read_text(encoding="utf-8")
    src = tmp_path / "stories.txt"
    src.write_text(text[:400_000], encoding="utf-8")
    tok = tmp_path / "tok512.model"
    assert data_cli.main(["tokenizer", "train", str(src), "--vocab-size", "512", "-o", str(tok)]) == 0
    tok_bin = tokenizer_bin(tok)
    assert data_cli.main(["data", "prepare", str(src), "--tokenizer", str(tok), "-o", str(tmp_path / "d"),
                          "-q"]) == 0
    out = tmp_path / "out"
    assert train_main(tiny_argv(tmp_path / "d", out, max_iters=60, eval_interval=30,
                                learning_rate=4e-3)) == 0
    curve = losses(out)
    assert np.mean([curve[i] for i in range(55, 60)]) < curve[0] - 1.0
    evals = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if "val_loss" in x]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0
    proc = cli("run", out / "model.bin", "-z", tok_bin, "-n", 20)
    assert proc.returncode == 0, proc.stderr.decode()


# ---------------------------------------------------------------------------
# several processes (torchrun, gloo on CPU)
# ---------------------------------------------------------------------------

def torchrun(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "llama2c.train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=sub_env(),
                          cwd=REPO)


@pytest.mark.slow
def test_ddp_and_fsdp_two_processes(syn, tmp_path):
    """DDP and FSDP2 runs on 2 processes finish, checkpoint and export; they agree with
    each other; a DDP checkpoint resumes under FSDP2, an FSDP one in a single process."""
    kw = dict(max_iters=6, eval_interval=3, gradient_accumulation_steps=2, eval_iters=2)
    ddp = torchrun(tiny_argv(syn.data, tmp_path / "ddp", **kw))
    assert ddp.returncode == 0, ddp.stdout[-3000:] + ddp.stderr[-3000:]
    assert "DDP: 2 process(es)" in ddp.stdout
    assert ddp.stdout.count("step 6: train loss") == 1          # rank 0 logs alone
    fsdp = torchrun(tiny_argv(syn.data, tmp_path / "fsdp", **kw) + ["--fsdp"])
    assert fsdp.returncode == 0, fsdp.stdout[-3000:] + fsdp.stderr[-3000:]
    assert "FSDP2: 2 process(es)" in fsdp.stdout
    for name in ("ddp", "fsdp"):
        assert (tmp_path / name / "model.bin").is_file()
        ckpt = torch.load(tmp_path / name / "ckpt.pt", weights_only=True)
        assert ckpt["iter_num"] == 6 and len(ckpt["rng"]) == 2
        # the tied embedding/classifier survived sharding
        assert torch.equal(ckpt["model"]["tok_embeddings.weight"], ckpt["model"]["output.weight"])
    a, b = losses(tmp_path / "ddp"), losses(tmp_path / "fsdp")
    assert sorted(a) == sorted(b) == list(range(6))
    np.testing.assert_allclose([a[i] for i in range(6)], [b[i] for i in range(6)], rtol=1e-5)
    assert a[5] < a[0]
    # per-rank data: two processes see different batches than one process does
    single = train(tiny_cfg(syn.data, tmp_path / "one", **kw, export_version=-1), log=lambda m: None)
    assert losses(single)[0] != a[0]
    # a DDP checkpoint resumes under FSDP2
    more = torchrun(tiny_argv(syn.data, tmp_path / "ddp", **{**kw, "max_iters": 8})
                    + ["--fsdp", "--init_from=resume"])
    assert more.returncode == 0, more.stdout[-3000:] + more.stderr[-3000:]
    assert "resumed from" in more.stdout and sorted(losses(tmp_path / "ddp")) == list(range(8))
    # resume the FSDP checkpoint in this (single) process
    resumed = train(tiny_cfg(syn.data, tmp_path / "fsdp", **{**kw, "max_iters": 8}, init_from="resume"),
                    log=lambda m: None)
    assert sorted(losses(resumed)) == [6, 7] and resumed["iter_num"] == 8
