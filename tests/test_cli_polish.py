"""The command line's polish (issue 14, item 7; docs/CLI.md): kebab-case flags
everywhere with the old spellings as hidden aliases, `chat -v` and `chat
--stop`, `train` writing tokenizer.bin beside model.bin, `bench` saying why a
cell reads n/a, and the export versions in `llama2c --help`."""
from __future__ import annotations

import inspect
import io
import re
from types import SimpleNamespace

import pytest

from helpers import GQA, R

from llama2c import cli
from llama2c.bench import cli as bench_cli
from llama2c.bench.report import markdown, na_reasons
from llama2c.bench.results import Row
from llama2c.cliargs import Parser
from llama2c.data import cli as data_cli
from llama2c.export import cli as export_cli

# a context long enough for the chat template's markup around a turn
CHAT_CFG = R.Config(dim=32, hidden_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=384, seq_len=256)
UNDERSCORE_FLAG = re.compile(r"(?<![\w-])--[a-z0-9]+_[a-z0-9_]+")


def parse(argv):
    return vars(cli.build_parser().parse_args(argv))


def help_text(capsys, main, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    return capsys.readouterr().out


# ---------------------------------------------------------------------------
# kebab-case flags, old spellings as hidden aliases
# ---------------------------------------------------------------------------

def test_old_spellings_parse_as_the_kebab_flags():
    new = ["--top-p", "0.5", "--top-k", "7", "--min-p", "0.1", "--repeat-penalty", "1.3",
           "--logit-bias", "5=-inf", "--seed", "4"]
    old = ["--topp", "0.5", "--top_k=7", "--min_p", "0.1", "--repeat_penalty=1.3", "--logit_bias", "5=-inf",
           "-s4"]
    for command in ("generate", "chat"):
        want = parse([command, *new])
        assert want["top_p"] == 0.5 and want["top_k"] == 7 and want["repeat_penalty"] == 1.3
        assert parse([command, *old]) == want
        assert parse([command, "--top_p", "0.5"])["top_p"] == 0.5
    assert parse(["generate", "x", "--stop_at_eos"])["stop_at_eos"] is True
    assert parse(["chat", "--max_tokens", "9"])["max_tokens"] == 9 == parse(["chat", "-n", "9"])["max_tokens"]
    # an unknown underscore flag is still an error, and `--` ends the rewriting
    with pytest.raises(SystemExit):
        parse(["generate", "--top_q", "1"])
    assert parse(["generate", "--", "--top_p"])["prompt"] == "--top_p"


def test_old_spellings_in_the_tools():
    d = data_cli.build_parser()
    new = vars(d.parse_args(["data", "prepare", "a.txt", "-z", "t.model", "-o", "out", "--val-fraction", "0.2"]))
    assert new["tokenizer"] == "t.model" and new["val_fraction"] == 0.2
    assert vars(d.parse_args(["data", "prepare", "a.txt", "-t", "t.model", "-o", "out",
                              "--val_fraction=0.2"])) == new
    assert vars(d.parse_args(["data", "prepare", "a.txt", "-tt.model", "-o", "out", "--val_fraction", "0.2"])) == new
    ts = vars(d.parse_args(["data", "tinystories", "train_vocab", "--vocab_size=512", "--num_shards", "3",
                            "--data_dir", "dd"]))
    assert (ts["vocab_size"], ts["num_shards"], ts["data_dir"]) == (512, 3, "dd")
    e = vars(export_cli.build_parser().parse_args(["o.bin", "--version", "2", "--bin", "i.bin", "--group_size", "8",
                                                   "--max_seq_len=64"]))
    assert (e["group_size"], e["max_seq_len"]) == (8, 64)
    b = vars(bench_cli.build_parser().parse_args(["m.bin", "--decode_tokens", "4", "--prompt_tokens=6",
                                                  "--no_reference", "--json_out", "f.json"]))
    assert (b["decode_tokens"], b["prompt_tokens"], b["no_reference"], b["json_out"]) == (4, 6, True, "f.json")


def test_alias_cannot_shadow_a_flag():
    p = Parser(prog="x")
    p.add_argument("--tokenizer", "-z")
    p.add_argument("--temperature", "-t")
    with pytest.raises(ValueError):
        p.alias("-z", "-t")
    with pytest.raises(ValueError):
        p.alias("--missing", "--old")


@pytest.mark.parametrize("argv", [
    [], ["generate"], ["chat"], ["info"],
])
def test_help_shows_kebab_case_only(capsys, argv):
    text = help_text(capsys, cli.main, [*argv, "--help"])
    assert not UNDERSCORE_FLAG.findall(text), text
    assert "--topp" not in text


@pytest.mark.parametrize("main, argv", [
    (export_cli.main, []),
    (bench_cli.main, []),
    (data_cli.main, ["tokenizer", "train"]),
    (data_cli.main, ["tokenizer", "export"]),
    (data_cli.main, ["data", "prepare"]),
    (data_cli.main, ["data", "tinystories", "download"]),
    (data_cli.main, ["data", "tinystories", "train_vocab"]),
    (data_cli.main, ["data", "tinystories", "pretokenize"]),
])
def test_tool_help_shows_kebab_case_only(capsys, main, argv):
    if main is export_cli.main:   # returns the status instead of exiting
        assert main(["--help"]) == 0
        text = capsys.readouterr().out
    else:
        text = help_text(capsys, main, [*argv, "--help"])
    assert "--help" in text
    assert not UNDERSCORE_FLAG.findall(text), text
    if argv[:2] == ["data", "prepare"]:
        assert "-z" in text and not re.search(r"(?<![\w-])-t\b", text)   # -t is hidden there


def test_train_help_lists_kebab_knobs(capsys):
    from llama2c.train import main as train_main

    assert train_main(["--help"]) == 0
    text = capsys.readouterr().out
    knobs = [line.split()[0] for line in text.splitlines() if line.startswith("  --")]
    assert "--max-seq-len=256" in knobs and "--init-from=scratch" in knobs and len(knobs) > 30
    assert not [k for k in knobs if "_" in k]
    examples = text.split("Examples:")[1].replace("--nproc_per_node", "")   # torchrun's own flag
    assert "--max-seq-len=" in examples and not UNDERSCORE_FLAG.findall(examples)


def test_train_knobs_take_both_spellings():
    from llama2c.train import parse_args
    from llama2c.train.config import UsageError

    a = parse_args(["--data=d", "--max-seq-len=100", "--init-from", "resume", "--batch-size", "3", "--decay-lr=false"])
    b = parse_args(["--data=d", "--max_seq_len=100", "--init_from", "resume", "--batch_size", "3", "--decay_lr=false"])
    assert a.to_dict() == b.to_dict()
    assert (a.max_seq_len, a.init_from, a.batch_size, a.decay_lr) == (100, "resume", 3, False)
    # messages follow the command line's spelling
    with pytest.raises(UsageError, match="--init-from must be"):
        parse_args(["--data=d", "--init-from=gpt2"])
    with pytest.raises(UsageError, match="--init_from must be"):
        parse_args(["--data=d", "--init_from=gpt2"])
    with pytest.raises(UsageError, match=r"did you mean --max-iters"):
        parse_args(["--data=d", "--max-itrs=3"])


def test_top_level_help_lists_the_export_versions(capsys):
    text = help_text(capsys, cli.main, ["--help"])
    assert "{" + ",".join(export_cli.VERSIONS) + "}" in text
    assert export_cli.VERSIONS == ["0", "1", "2", "3", "4", "5", "hf", "gguf"]
    for version, what in export_cli.VERSION_HELP.items():
        assert re.search(rf"^  {re.escape(version)} +{re.escape(what)}$", text, re.M), version


# ---------------------------------------------------------------------------
# generate and chat through cli.main
# ---------------------------------------------------------------------------

def run_main(capsys, monkeypatch, argv, stdin: str = ""):
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_generate_old_and_new_spellings_give_the_same_text(make_model, capsys, monkeypatch):
    m = make_model(GQA, version=1, seed=31)
    base = ["generate", "Once", "-m", m.path, "-z", m.tokenizer, "-n", "20"]
    rc, new, _ = run_main(capsys, monkeypatch, base + ["--top-p", "0.6", "--top-k", "9", "--repeat-penalty", "1.2",
                                                       "--seed", "5"])
    assert rc == 0 and new.strip()
    rc, old, _ = run_main(capsys, monkeypatch, base + ["--topp", "0.6", "--top_k", "9", "--repeat_penalty=1.2",
                                                       "-s", "5"])
    assert rc == 0 and old == new


def test_chat_verbose_reports_tokens_per_second(make_model, capsys, monkeypatch):
    m = make_model(CHAT_CFG, version=1, seed=33)   # two replies of several tokens
    argv = ["chat", "-m", m.path, "-z", m.tokenizer, "-t", "0", "--max-tokens", "6"]
    rc, out, err = run_main(capsys, monkeypatch, argv + ["-v"], stdin="hi\nhello\n")
    assert rc == 0 and out.count("Assistant: ") == 2
    assert len(re.findall(r"^achieved tok/s: \d+\.\d$", err, re.M)) == 2, err
    rc, quiet_out, quiet_err = run_main(capsys, monkeypatch, argv, stdin="hi\nhello\n")
    assert rc == 0 and quiet_out == out and "tok/s" not in quiet_err


def chat_has_stop() -> bool:
    from llama2c.chat import ChatSession

    return "stop" in inspect.signature(ChatSession.stream).parameters


@pytest.mark.skipif(not chat_has_stop(), reason="ChatSession.stream has no stop= yet")
def test_chat_stop_ends_the_reply(make_model, capsys, monkeypatch):
    import llama2c

    m = make_model(CHAT_CFG, version=1, seed=35)
    llama = llama2c.Llama(str(m.path), tokenizer=str(m.tokenizer))
    full = llama.chat_session().send("hi", temperature=0.0, max_tokens=12)
    assert len(full) >= 4, full
    stops = [full[len(full) // 2:len(full) // 2 + 2], "\x00never"]
    cut = llama.chat_session().send("hi", temperature=0.0, max_tokens=12, stop=stops)
    assert len(cut) < len(full)
    argv = ["chat", "-m", m.path, "-z", m.tokenizer, "-t", "0", "--max-tokens", "12"]
    rc, out, _ = run_main(capsys, monkeypatch, argv, stdin="hi\n")
    assert rc == 0 and out.startswith(f"User: Assistant: {full}\n")
    args = [x for s in stops for x in ("--stop", s)]
    rc, out, _ = run_main(capsys, monkeypatch, argv + args, stdin="hi\n")
    assert rc == 0 and out.startswith(f"User: Assistant: {cut}\n"), (out, cut)


# ---------------------------------------------------------------------------
# train writes tokenizer.bin beside model.bin
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("sentencepiece")
    pytest.importorskip("tqdm")
    from test_data import synthetic_stories, write_text

    from llama2c.data import prepare, train_tokenizer

    d = tmp_path_factory.mktemp("polish")
    src = write_text(d / "stories.txt", synthetic_stories(500, seed=3))
    tok = train_tokenizer([src], 384, d / "tok.model", num_threads=1)
    prepare([src], tok, d / "data", workers=1, progress=False)
    return SimpleNamespace(dir=d, tok=tok, data=d / "data")


def train_argv(data, out, **kw):
    knobs = {"data": data, "out-dir": out, "dim": 32, "n-layers": 1, "n-heads": 2, "batch-size": 4,
             "max-seq-len": 32, "gradient-accumulation-steps": 1, "max-iters": 2, "eval-iters": 1,
             "eval-interval": 1000, "warmup-iters": 1, "dtype": "float32", "device": "cpu", **kw}
    return [f"--{k}={v}" for k, v in knobs.items()]


@pytest.fixture()
def one_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_train_writes_tokenizer_bin_that_generate_finds(prepared, tmp_path, capsys, monkeypatch, one_thread):
    from llama2c.export.tokenizer_bin import export_tokenizer
    from llama2c.train import main as train_main

    want = export_tokenizer(prepared.tok, tmp_path / "want.bin").read_bytes()
    out = tmp_path / "out"
    assert train_main(train_argv(prepared.data, out)) == 0
    log = capsys.readouterr().out
    assert (out / "tokenizer.bin").read_bytes() == want
    assert f"wrote {out / 'tokenizer.bin'}" in log
    assert not [p for p in out.iterdir() if p.name.startswith(".")]   # no temporary file left
    # the next command works without --tokenizer
    rc, text, err = run_main(capsys, monkeypatch, ["generate", "Once", "--model", out / "model.bin", "-n", "8",
                                                   "-s", "1"])
    assert rc == 0 and text.strip(), err
    # a resumed run finds the same file there and leaves it alone, without a warning
    stamp = (out / "tokenizer.bin").stat().st_mtime_ns
    assert train_main(train_argv(prepared.data, out, **{"init-from": "resume", "max-iters": 3})) == 0
    log = capsys.readouterr().out
    assert (out / "tokenizer.bin").stat().st_mtime_ns == stamp and "warning" not in log


def test_train_keeps_a_different_tokenizer_bin_without_overwrite(prepared, tmp_path, capsys, one_thread):
    from llama2c.train import main as train_main

    out = tmp_path / "out"
    out.mkdir()
    mine = out / "tokenizer.bin"
    mine.write_bytes(b"the user's own file")
    assert train_main(train_argv(prepared.data, out)) == 0
    log = capsys.readouterr().out
    assert mine.read_bytes() == b"the user's own file"
    assert "warning: kept" in log and "--overwrite" in log
    assert (out / "model.bin").is_file()
    # --overwrite starts over, tokenizer.bin included
    assert train_main(train_argv(prepared.data, out, overwrite="true")) == 0
    capsys.readouterr()
    assert mine.read_bytes() != b"the user's own file" and mine.stat().st_size > 1000


def test_train_without_the_data_tokenizer_writes_no_tokenizer_bin(prepared, tmp_path, capsys, one_thread):
    import shutil

    from llama2c.train import main as train_main

    data = tmp_path / "data"
    shutil.copytree(prepared.data, data)
    (data / "tokenizer.model").unlink()
    meta = (data / "meta.json").read_text().replace(str(prepared.tok.resolve()), str(tmp_path / "gone.model"))
    (data / "meta.json").write_text(meta)
    out = tmp_path / "out"
    assert train_main(train_argv(data, out)) == 0
    assert "no tokenizer.bin written" in capsys.readouterr().out
    assert (out / "model.bin").is_file() and not (out / "tokenizer.bin").exists()


# ---------------------------------------------------------------------------
# bench: why a cell reads n/a
# ---------------------------------------------------------------------------

def row(weights="fp32", threads=1, ref=True, prefill=True, note="", decode=(50.0,)):
    return Row("m.bin", weights, "f32" if ref else None, threads, 8, 16, True,
               ours_decode=list(decode), ours_prefill=[200.0] if prefill else [],
               ref_decode=[40.0] if ref else [], ref_prefill=[150.0] if ref and prefill else [], note=note)


META = {"reps": 1, "llama_cpp_ok": True, "llama_cpp": "0.3.36"}
MISSING = "llama-cpp-python not importable (ModuleNotFoundError: No module named 'llama_cpp')"


def test_bench_table_without_n_a_has_no_explanation():
    table = markdown([row(), row(threads=2)], META)
    assert "n/a" not in table and na_reasons([row()], META) == []


def test_bench_explains_a_missing_llama_cpp():
    meta = {**META, "llama_cpp_ok": False, "llama_cpp": MISSING}
    table = markdown([row(ref=False)], meta)
    assert "| n/a |" in table
    why = table.split("Why n/a:")[1]
    assert "llama.cpp columns: llama-cpp-python is not installed" in why
    assert "ratio columns" in why
    off = markdown([row(ref=False)], {**meta, "llama_cpp": "disabled (--no-reference)", "no_reference": True})
    assert "llama.cpp columns: not run (--no-reference)." in off
    broken = markdown([row(ref=False)], {**meta, "llama_cpp": "llama-cpp-python not importable (OSError: bad .so)"})
    assert "does not load here (llama-cpp-python not importable (OSError: bad .so))" in broken


def test_bench_explains_a_model_llama_cpp_could_not_run():
    bad = row(weights="int8", threads=2, ref=False, note="llama.cpp: ValueError: shape not supported by GGUF")
    table = markdown([row(), bad], META)
    assert "llama.cpp columns of m.bin int8 2t: llama.cpp could not run this model " \
           "(ValueError: shape not supported by GGUF)." in table
    assert table.count("shape not supported") == 1         # not repeated in the notes
    assert "llama.cpp columns:" not in table                # the other row has its figures


def test_bench_explains_prefill_and_decode_n_a():
    table = markdown([row(prefill=False)], {**META, "no_prefill": True})
    assert "prefill columns: not measured (--no-prefill)." in table
    table = markdown([row(decode=[float("nan")])], META)
    assert "decode ours of m.bin fp32 1t: no token was timed" in table
