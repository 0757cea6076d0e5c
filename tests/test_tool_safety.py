"""The tools do not read outside a model folder nor destroy data (issue 12):

- a Hugging Face folder whose index or symlinks lead out of it is refused;
- `train` from scratch refuses an out_dir that holds a checkpoint (--overwrite);
- `data prepare` keeps the old shards when the new set fails;
- stale checkpoint temporaries are removed on the next save and on resume;
- `export`, `tokenizer train` and `tokenizer export` refuse to replace outputs
  without --force;
- a corrupt checkpoint on resume is a one-line error;
- torch>=2.6 and weights_only=True everywhere.

Tiny models (dim 16, one layer) and a small synthetic corpus: seconds."""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sentencepiece")
pytest.importorskip("tqdm")

from helpers import REPO  # noqa: E402
from test_data import synthetic_stories, write_text  # noqa: E402

from llama2c.data import cli as data_cli  # noqa: E402
from llama2c.data import prepare, train_tokenizer  # noqa: E402
from llama2c.errors import FormatError  # noqa: E402
from llama2c.export import main as export_main  # noqa: E402
from llama2c.export.sources import BinSource, open_source  # noqa: E402
from llama2c.export.writers import write_bin, write_hf  # noqa: E402
from llama2c.model import ModelArgs, Transformer  # noqa: E402
from llama2c.train import TrainConfig, train  # noqa: E402
from llama2c.train import checkpoint as ck  # noqa: E402
from llama2c.train import main as train_main  # noqa: E402

TINY = dict(dim=16, n_layers=1, n_heads=2, n_kv_heads=2, batch_size=2, max_seq_len=16,
            gradient_accumulation_steps=1, max_iters=2, warmup_iters=1, eval_interval=1000,
            eval_iters=1, log_interval=1, dtype="float32", device="cpu")


def quiet(_msg):
    pass


def tiny_argv(data, out, **kw) -> list[str]:
    return [f"--{k}={v}" for k, v in {**TINY, "data": data, "out_dir": out, **kw}.items()]


def one_line_error(err: str, prog: str) -> str:
    assert err.startswith(f"{prog}: error:") and err.count("\n") == 1, err
    return err


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> SimpleNamespace:
    """A 384-piece tokenizer, prepared data and one tiny finished training run."""
    d = tmp_path_factory.mktemp("safety")
    src = write_text(d / "stories.txt", synthetic_stories(500, seed=3))
    tok = train_tokenizer([src], 384, d / "tok.model", num_threads=1)
    prepare([src], tok, d / "data", workers=1, progress=False)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(TrainConfig(**TINY, data=str(d / "data"), out_dir=str(d / "run")), log=quiet)
    finally:
        torch.set_num_threads(n)
    return SimpleNamespace(dir=d, src=src, tok=tok, data=d / "data", run=d / "run")


@pytest.fixture()
def run_copy(corpus, tmp_path) -> Path:
    """A private copy of the finished run's out_dir."""
    return Path(shutil.copytree(corpus.run, tmp_path / "out"))


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=32,
                                 max_seq_len=8))


# ---------------------------------------------------------------------------
# 1. Hugging Face folders: no shard outside the folder
# ---------------------------------------------------------------------------


def hf_with_outside_shard(tmp_path: Path, how: str) -> Path:
    """An HF folder whose weights are only reachable outside it."""
    elsewhere = write_hf(tiny_model(), tmp_path / "elsewhere")
    outside = elsewhere / "model.safetensors"
    folder = tmp_path / "hf"
    folder.mkdir()
    shutil.copy(elsewhere / "config.json", folder / "config.json")
    if how == "symlink":
        os.symlink(os.path.relpath(outside, folder), folder / "model.safetensors")
        return folder
    from safetensors import safe_open

    with safe_open(str(outside), framework="pt") as f:
        names = list(f.keys())
    target = "../elsewhere/model.safetensors" if how == "dotdot" else str(outside.resolve())
    index = {"metadata": {}, "weight_map": {n: target for n in names}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_hf_shard_outside_the_folder_is_refused(tmp_path, capsys, how):
    folder = hf_with_outside_shard(tmp_path, how)
    with pytest.raises(FormatError, match="outside"):
        with open_source("hf", folder) as src:
            for key in src.keys():
                src.get(key)
    out = tmp_path / "m.bin"
    capsys.readouterr()
    assert export_main([str(out), "--version", "1", "--hf", str(folder), "-q"]) == 1
    assert "outside" in one_line_error(capsys.readouterr().err, "llama2c export")
    assert not out.exists()


def test_meta_shard_symlinked_outside_the_folder_is_refused(tmp_path):
    model = tiny_model()
    (tmp_path / "elsewhere").mkdir()
    torch.save(model.state_dict(), tmp_path / "elsewhere" / "consolidated.00.pth")
    folder = tmp_path / "meta"
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps({"dim": 16, "n_layers": 1, "n_heads": 2,
                                                    "norm_eps": 1e-5, "vocab_size": -1}))
    os.symlink("../elsewhere/consolidated.00.pth", folder / "consolidated.00.pth")
    with pytest.raises(FormatError, match="outside"):
        open_source("meta", folder)
    # the same file inside the folder is fine
    (folder / "consolidated.00.pth").unlink()
    shutil.copy(tmp_path / "elsewhere" / "consolidated.00.pth", folder)
    with open_source("meta", folder) as src:
        assert src.args.dim == 16


def test_hf_cache_snapshot_symlinks_still_work(tmp_path):
    """huggingface_hub's cache links snapshots/REV/* to ../../blobs/*: that is allowed."""
    src = write_hf(tiny_model(), tmp_path / "plain")
    repo = tmp_path / "models--x--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        blob = repo / "blobs" / f"blob-{name}"
        shutil.copy(src / name, blob)
        os.symlink(os.path.relpath(blob, snap), snap / name)
    with open_source("hf", src) as a, open_source("hf", snap) as b:
        for key in a.keys():
            assert (a.get(key) == b.get(key)).all(), key


# ---------------------------------------------------------------------------
# 2. tools that destroy data
# ---------------------------------------------------------------------------


def test_train_from_scratch_refuses_an_existing_checkpoint(corpus, run_copy, capsys):
    before = snapshot(run_copy)
    assert "ckpt.pt" in before and "model.bin" in before
    with pytest.raises(FileExistsError, match="--init_from=resume.*--overwrite"):
        train(TrainConfig(**TINY, data=str(corpus.data), out_dir=str(run_copy)), log=quiet)
    capsys.readouterr()
    assert train_main(tiny_argv(corpus.data, run_copy)) == 1
    err = one_line_error(capsys.readouterr().err, "llama2c train")
    assert "--init_from=resume" in err and "--overwrite" in err
    assert snapshot(run_copy) == before
    # --overwrite starts over: a new checkpoint, a fresh log
    assert train_main(tiny_argv(corpus.data, run_copy, seed=7) + ["--overwrite"]) == 0
    after = snapshot(run_copy)
    assert after["ckpt.pt"] != before["ckpt.pt"]
    iters = [json.loads(x)["iter"] for x in after["log.jsonl"].decode().splitlines() if '"loss"' in x]
    assert iters == [0, 1]


def test_prepare_keeps_the_old_shards_when_the_new_set_fails(corpus, tmp_path):
    out = tmp_path / "data"
    prepare([corpus.src], corpus.tok, out, workers=1, shard_tokens=2000, chunk_stories=50,
            progress=False)
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    assert "train_0001.bin" in before
    empty = write_text(tmp_path / "empty.txt", [])
    bad = tmp_path / "bad.json"
    bad.write_text("[{\"story\": \"ok\"}, {\"story\": ")
    parent_before = sorted(p.name for p in tmp_path.iterdir())
    for inputs in ([empty], [corpus.src, bad]):
        with pytest.raises(ValueError):
            prepare(inputs, corpus.tok, out, workers=1, shard_tokens=2000, progress=False)
        assert snapshot(out) == before
        assert sorted(p.name for p in tmp_path.iterdir()) == parent_before     # no temp dir left
    # success replaces the whole set (no stale train_0001.bin) and keeps other files
    few = write_text(tmp_path / "few.txt", synthetic_stories(30, seed=9))
    meta = prepare([few], corpus.tok, out, workers=1, progress=False)
    names = set(snapshot(out))
    assert names == {"meta.json", "tokenizer.model", "train_0000.bin", "val_0000.bin", "notes.txt"}
    assert json.loads((out / "meta.json").read_text()) == meta
    assert (out / "notes.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


STALE = [".ckpt.pt.abcd1234.tmp", ".ckpt.pt.x_9zq0w1.tmp"]
KEPT = [".ckpt.pt.keep", "ckpt.pt.abcd1234.tmp", ".model.bin.abcd1234.tmp", ".ckpt.pt.abc.tmp",
        "notes.tmp"]


def test_stale_checkpoint_temporaries_are_removed(corpus, run_copy):
    def plant():
        for name in STALE + KEPT:
            (run_copy / name).write_bytes(b"partial")

    plant()
    ck.atomic_save({"a": torch.ones(1)}, run_copy / "other.pt")     # another file's save: no effect
    assert all((run_copy / n).exists() for n in STALE)
    ckpt = ck.load_checkpoint(run_copy / "ckpt.pt")                 # resume cleans
    assert not any((run_copy / n).exists() for n in STALE)
    assert all((run_copy / n).exists() for n in KEPT)
    plant()
    ck.atomic_save(ckpt, run_copy / "ckpt.pt")                      # the next save cleans
    assert not any((run_copy / n).exists() for n in STALE)
    assert all((run_copy / n).exists() for n in KEPT)
    # and through a real resume
    plant()
    result = train(TrainConfig(**{**TINY, "max_iters": 3}, data=str(corpus.data), out_dir=str(run_copy),
                               init_from="resume"), log=quiet)
    assert result["iter_num"] == 3
    assert not any((run_copy / n).exists() for n in STALE)
    assert all((run_copy / n).exists() for n in KEPT)


def test_export_refuses_to_replace_outputs_without_force(run_copy, tmp_path, capsys):
    ckpt = run_copy / "ckpt.pt"
    out = tmp_path / "m.bin"
    out.write_bytes(b"precious")
    capsys.readouterr()
    assert export_main([str(out), "--version", "1", "--checkpoint", str(ckpt), "-q"]) == 1
    assert "--force" in one_line_error(capsys.readouterr().err, "llama2c export")
    assert out.read_bytes() == b"precious"
    assert export_main([str(out), "--version", "1", "--checkpoint", str(ckpt), "-q", "--force"]) == 0
    assert BinSource(out).args.dim == 16
    # the Python functions the command calls
    with pytest.raises(FileExistsError, match="--force"):
        write_bin(tiny_model(), out, 1)
    write_bin(tiny_model(), out, 1, force=True)
    # a Hugging Face folder with a hand-edited config.json
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text('{"edited": true}')
    capsys.readouterr()
    assert export_main([str(folder), "--version", "hf", "--checkpoint", str(ckpt), "-q"]) == 1
    err = one_line_error(capsys.readouterr().err, "llama2c export")
    assert "--force" in err and "config.json" in err
    assert (folder / "config.json").read_text() == '{"edited": true}'
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]
    with pytest.raises(FileExistsError, match="--force"):
        write_hf(tiny_model(), folder)
    assert export_main([str(folder), "--version", "hf", "--checkpoint", str(ckpt), "-q", "--force"]) == 0
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llama"


def test_tokenizer_tools_refuse_to_replace_outputs_without_force(corpus, tmp_path, capsys):
    from llama2c.export import tokenizer_bin

    tok_bin = tmp_path / "tok.bin"
    tok_bin.write_bytes(b"precious")
    capsys.readouterr()
    assert data_cli.main(["tokenizer", "export", str(corpus.tok), "-o", str(tok_bin)]) == 1
    assert "--force" in one_line_error(capsys.readouterr().err, "llama2c")
    assert tokenizer_bin.main([str(corpus.tok), "-o", str(tok_bin)]) == 1
    assert "--force" in one_line_error(capsys.readouterr().err, "llama2c tokenizer export")
    assert tok_bin.read_bytes() == b"precious"
    assert data_cli.main(["tokenizer", "export", str(corpus.tok), "-o", str(tok_bin), "--force"]) == 0
    assert tok_bin.read_bytes() != b"precious"
    tok_bin.write_bytes(b"precious")
    assert tokenizer_bin.main([str(corpus.tok), "-o", str(tok_bin), "--force"]) == 0
    assert tok_bin.read_bytes() != b"precious"

    model = tmp_path / "t.model"
    model.write_bytes(b"precious")
    argv = ["tokenizer", "train", str(corpus.src), "--vocab-size", "384", "-o", str(model),
            "--threads", "1"]
    capsys.readouterr()
    assert data_cli.main(argv) == 1
    assert "--force" in one_line_error(capsys.readouterr().err, "llama2c")
    assert model.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.model", "tok.bin"]
    assert data_cli.main(argv + ["--force"]) == 0
    import sentencepiece as spm

    assert spm.SentencePieceProcessor(model_file=str(model)).vocab_size() == 384


def corrupt(path: Path, how: str) -> None:
    good = path.read_bytes()
    if how == "garbage":
        path.write_bytes(b"hello, this is not a checkpoint")
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(good[:len(good) // 2])
    elif how == "foreign-object":
        torch.save({"model": {}, "x": _Arbitrary()}, path)
    else:                                   # a valid torch file, not a training checkpoint
        torch.save([1, 2, 3], path)


class _Arbitrary:
    pass


@pytest.mark.parametrize("how", ["garbage", "empty", "truncated", "foreign-object", "not-a-dict"])
def test_resume_from_a_corrupt_checkpoint_is_one_line(corpus, run_copy, capsys, how):
    corrupt(run_copy / "ckpt.pt", how)
    capsys.readouterr()
    rc = train_main(["--init_from=resume", f"--out_dir={run_copy}", f"--data={corpus.data}"])
    assert rc == 1
    err = one_line_error(capsys.readouterr().err, "llama2c train")
    assert "ckpt.pt" in err


def test_resume_from_a_corrupt_checkpoint_through_the_llama2c_command(corpus, run_copy):
    corrupt(run_copy / "ckpt.pt", "garbage")
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "llama2c", "train", "--init_from=resume",
                           f"--out_dir={run_copy}"], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    one_line_error(proc.stderr, "llama2c train")


# ---------------------------------------------------------------------------
# 3. the torch floor and weights_only
# ---------------------------------------------------------------------------


def test_train_extra_requires_torch_2_6():
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    torch_req = [r for r in extras["train"] if re.match(r"torch\b", r)]
    assert torch_req == ["torch>=2.6,<3"]


def test_every_torch_load_uses_weights_only():
    calls = []
    for path in sorted((REPO / "llama2c").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr == "load" and isinstance(node.func.value, ast.Name) \
                    and node.func.value.id == "torch":
                kw = {k.arg: k.value for k in node.keywords}
                safe = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                calls.append((f"{path.relative_to(REPO)}:{node.lineno}", safe))
    assert calls, "no torch.load found: the scan is broken"
    assert all(safe for _, safe in calls), [c for c, safe in calls if not safe]
