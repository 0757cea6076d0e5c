"""`llama2c data prepare` (and `tokenizer train`) on more dataset formats: a named
text field in JSON/JSONL (--text-field), Parquet files (pyarrow), folders saved by
Hugging Face datasets and hf:NAME (the datasets package; local data only: nothing
is downloaded here). Each format must give the same shards as the same stories
in plain text."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

spm = pytest.importorskip("sentencepiece")
pytest.importorskip("tqdm")

from test_data import decode_split, synthetic_stories, write_text  # noqa: E402

from llama2c.data import (HFDataset, expand_inputs, prepare, read_stories,  # noqa: E402
                          train_tokenizer)
from llama2c.data import cli as data_cli  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Stories, a tokenizer, and the prepared set of the stories as plain text."""
    d = tmp_path_factory.mktemp("formats")
    stories = [s.strip() for s in synthetic_stories(240, seed=11)]
    src = write_text(d / "stories.txt", stories)
    tok = train_tokenizer([src], 400, d / "tok.model")
    prepare([src], tok, d / "plain", val_fraction=0.1, workers=1, progress=False)
    return d, stories, tok


def same_shards(a: Path, b: Path) -> bool:
    files = sorted(p.name for p in a.glob("*.bin"))
    return files == sorted(p.name for p in b.glob("*.bin")) and \
        all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


# ---------------------------------------------------------------------------
# JSON / JSONL with a named field
# ---------------------------------------------------------------------------

def test_jsonl_text_field(corpus, tmp_path):
    d, stories, tok = corpus
    rows = [{"id": i, "body": s, "text": "not this"} for i, s in enumerate(stories)]
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert read_stories(src, text_field="body") == stories
    assert read_stories(src)[0] == "not this"                 # default: "story", then "text"
    assert data_cli.main(["data", "prepare", str(src), "--text-field", "body", "-z", str(tok),
                          "-o", str(tmp_path / "out"), "--val-fraction", "0.1", "-q"]) == 0
    assert same_shards(tmp_path / "out", d / "plain")
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["text_field"] == "body"
    # a record without the field names the line and the flag
    src.write_text('{"body": "a"}\n{"other": "b"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"rows.jsonl:2: .*'body'.*--text-field"):
        read_stories(src, text_field="body")
    # strings are stories only without a field name; JSON lists take the field too
    (tmp_path / "l.json").write_text(json.dumps([{"content": "X"}, {"content": " Y "}]))
    assert read_stories(tmp_path / "l.json", text_field="content") == ["X", "Y"]
    with pytest.raises(ValueError, match="--text-field"):
        read_stories(tmp_path / "l.json")


def test_text_field_for_the_tokenizer(corpus, tmp_path):
    d, stories, tok = corpus
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps({"t": s}) + "\n" for s in stories), encoding="utf-8")
    out = tmp_path / "tok.model"
    assert data_cli.main(["tokenizer", "train", str(src), "--text-field", "t", "--vocab-size", "400",
                          "-o", str(out)]) == 0
    pieces = [spm.SentencePieceProcessor(model_file=str(m)) for m in (out, tok)]
    assert [[sp.id_to_piece(i) for i in range(sp.vocab_size())] for sp in pieces] == \
        [[pieces[1].id_to_piece(i) for i in range(400)]] * 2    # the same text, the same pieces


# ---------------------------------------------------------------------------
# Parquet
# ---------------------------------------------------------------------------

def test_parquet(corpus, tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed (the data extra)")
    pq = pytest.importorskip("pyarrow.parquet")
    d, stories, tok = corpus
    # two files (a directory stands for them, in name order), small row groups
    half = len(stories) // 2
    for name, part in (("p0.parquet", stories[:half]), ("p1.parquet", stories[half:])):
        table = pa.table({"id": list(range(len(part))), "text": part, "lang": ["en"] * len(part)})
        pq.write_table(table, tmp_path / name, row_group_size=37)
    assert expand_inputs(tmp_path) == [tmp_path / "p0.parquet", tmp_path / "p1.parquet"]
    assert read_stories(tmp_path / "p0.parquet") == stories[:half]          # "text" found by itself
    assert data_cli.main(["data", "prepare", str(tmp_path), "-z", str(tok), "-o", str(tmp_path / "out"),
                          "--val-fraction", "0.1", "-q"]) == 0
    assert same_shards(tmp_path / "out", d / "plain")

    # another column name: --text-field; the only string column is found alone
    other = tmp_path / "other"
    other.mkdir()
    pq.write_table(pa.table({"n": [1, 2, 3], "content": ["A", None, " B "]}), other / "x.parquet")
    assert read_stories(other / "x.parquet") == ["A", "B"]                   # nulls are skipped
    assert read_stories(other / "x.parquet", text_field="content") == ["A", "B"]
    with pytest.raises(ValueError, match="no column 'body'"):
        read_stories(other / "x.parquet", text_field="body")
    with pytest.raises(ValueError, match="does not hold strings"):
        read_stories(other / "x.parquet", text_field="n")
    pq.write_table(pa.table({"a": ["x"], "b": ["y"]}), other / "two.parquet")
    with pytest.raises(ValueError, match="which column.*--text-field"):
        read_stories(other / "two.parquet")
    (other / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="not a readable Parquet file"):
        read_stories(other / "bad.parquet")


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)         # import pyarrow fails
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ValueError, match="needs pyarrow.*pip install pyarrow"):
        read_stories(tmp_path / "x.parquet")


# ---------------------------------------------------------------------------
# Hugging Face datasets
# ---------------------------------------------------------------------------

def test_saved_dataset_folder(corpus, tmp_path):
    datasets = pytest.importorskip("datasets", reason="the datasets package is not installed (the data "
                                                      "extra); saved-dataset folders are not checked")
    d, stories, tok = corpus
    ds = datasets.Dataset.from_dict({"id": list(range(len(stories))), "text": stories})
    ds.save_to_disk(str(tmp_path / "saved"))
    # the folder is one input, not its json files
    assert expand_inputs(tmp_path / "saved") == [HFDataset(str(tmp_path / "saved"), folder=True)]
    assert read_stories(tmp_path / "saved") == stories
    assert data_cli.main(["data", "prepare", str(tmp_path / "saved"), "-z", str(tok), "-o",
                          str(tmp_path / "out"), "--val-fraction", "0.1", "-q"]) == 0
    assert same_shards(tmp_path / "out", d / "plain")

    # a DatasetDict: --split picks one (default train); another column by --text-field
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"body": stories[:200], "title": ["t"] * 200}),
        "validation": datasets.Dataset.from_dict({"body": stories[200:], "title": ["v"] * 40}),
    })
    dd.save_to_disk(str(tmp_path / "dict"))
    assert read_stories(tmp_path / "dict", text_field="body") == stories[:200]
    assert read_stories(tmp_path / "dict", text_field="body", split="validation") == stories[200:]
    with pytest.raises(ValueError, match="no split 'test'.*train, validation"):
        read_stories(tmp_path / "dict", text_field="body", split="test")
    with pytest.raises(ValueError, match="which column"):
        read_stories(tmp_path / "dict")
    out = tmp_path / "val"
    assert data_cli.main(["data", "prepare", str(tmp_path / "dict"), "--split", "validation",
                          "--text-field", "body", "-z", str(tok), "-o", str(out), "-q"]) == 0
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    got = decode_split(out, "train", sp) + decode_split(out, "val", sp)
    assert sorted(got) == sorted(stories[200:])


def test_hf_name_loads_local_data(corpus, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets", reason="the datasets package is not installed (the data "
                                                      "extra)")
    # offline, and its cache in tmp_path rather than the home directory
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    d, stories, tok = corpus
    folder = tmp_path / "local"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in stories),
                                        encoding="utf-8")
    # hf:PATH goes through datasets.load_dataset (a local folder here, so nothing downloads)
    assert expand_inputs(f"hf:{folder}") == [HFDataset(str(folder))]
    assert data_cli.main(["data", "prepare", f"hf:{folder}", "-z", str(tok), "-o", str(tmp_path / "out"),
                          "--val-fraction", "0.1", "-q"]) == 0
    assert same_shards(tmp_path / "out", d / "plain")
    with pytest.raises(ValueError, match="give a dataset name"):
        expand_inputs("hf:")
    with pytest.raises(ValueError, match="datasets could not load it"):
        read_stories(f"hf:{tmp_path / 'missing-folder'}")


def test_datasets_missing(corpus, tmp_path, monkeypatch, capsys):
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "dataset_info.json").write_text("{}")
    (tmp_path / "saved" / "state.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)        # import datasets fails
    with pytest.raises(ValueError, match="needs the datasets package.*pip install datasets"):
        read_stories(tmp_path / "saved")
    assert data_cli.main(["data", "prepare", "hf:some/name", "-z", str(corpus[2]),
                          "-o", str(tmp_path / "o"), "-q"]) == 1
    err = capsys.readouterr().err
    assert "error: hf:some/name: reading a Hugging Face dataset needs the datasets package" in err
    assert not (tmp_path / "o").exists()
