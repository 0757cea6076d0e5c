"""llama2c.data: story readers, tokenizer training, `data prepare`, the TinyStories
download (against a local Range-capable HTTP server) / train_vocab / pretokenize,
and the data command line."""
from __future__ import annotations

import http.server
import io
import json
import random
import re
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

spm = pytest.importorskip("sentencepiece")
pytest.importorskip("tqdm")

from llama2c.data import (is_validation, load_meta, load_split, prepare, read_stories,  # noqa: E402
                          split_text, train_tokenizer)
from llama2c.data import cli as data_cli  # noqa: E402
from llama2c.data import tinystories as ts  # noqa: E402

TINYSTORIES_TXT = "tinystories/TinyStories-validation-head.txt"
EOT_SAMPLE = "tinystories/cs336_tinystories_sample.txt"


# ---------------------------------------------------------------------------
# synthetic text (used here and by test_train.py), so everything runs without
# ../shared/data
# ---------------------------------------------------------------------------

def synthetic_stories(n: int, seed: int = 0) -> list[str]:
    """n small TinyStories-like stories: ASCII prose, digits, quotes, a few accented
    characters and an emoji (byte fallback), some with an inner newline."""
    rng = random.Random(seed)
    names = "Lily Ben Tom Mia Sam Zoe Max Anna Leo Ruby Jack Ella Finn Nora Owen Lucy".split()
    things = ("cat dog bird fish frog duck bear fox kite ball boat cake tree rock star moon "
              "apple truck robot drum shell flower hat box key").split()
    places = "park garden forest beach house river school farm castle jungle kitchen meadow".split()
    adjs = "big small red blue happy sad shiny soft funny tall quiet brave sleepy green".split()
    verbs = "played ran jumped laughed sang looked walked danced smiled hid climbed swam".split()
    extras = ["She said, \"Wow!\"", "He had {n} apples.", "It was a café.", "They felt naïve and new.",
              "The sun was warm.", "It cost {n} coins.", "\"Let's go!\" they shouted.", "🙂"]
    out = []
    for _ in range(n):
        name, name2 = rng.sample(names, 2)
        s = [f"Once upon a time, there was a {rng.choice(adjs)} {rng.choice(things)} named {name}."]
        for _ in range(rng.randint(2, 6)):
            k = rng.random()
            if k < 0.5:
                s.append(f"{name} {rng.choice(verbs)} in the {rng.choice(places)} with {name2}.")
            elif k < 0.8:
                s.append(f"The {rng.choice(adjs)} {rng.choice(things)} {rng.choice(verbs)} near the "
                         f"{rng.choice(adjs)} {rng.choice(places)}.")
            else:
                s.append(rng.choice(extras).format(n=rng.randint(2, 1999)))
        if rng.random() < 0.3:
            s.append("\nThe end.")
        out.append(" ".join(s))
    return out


def write_text(path: Path, stories: list[str]) -> Path:
    path.write_text("\n\n".join(stories) + "\n", encoding="utf-8")
    return path


def decode_split(data_dir: Path, split: str, sp) -> list[str]:
    """The stories of a prepared split, decoded back (each starts at a BOS)."""
    arrays = load_split(data_dir, split)
    if not arrays:
        return []
    ids = np.concatenate(arrays)
    starts = np.flatnonzero(ids == sp.bos_id()).tolist() + [len(ids)]
    assert starts[0] == 0
    return [sp.decode(ids[a + 1:b].tolist()) for a, b in zip(starts, starts[1:])]


@pytest.fixture(scope="module")
def syn_tok(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("syntok")
    src = write_text(d / "stories.txt", synthetic_stories(1200, seed=1))
    return train_tokenizer([src], 512, d / "tok512.model")


# ---------------------------------------------------------------------------
# reading stories
# ---------------------------------------------------------------------------

def test_split_text_blank_lines_endoftext_and_lines():
    assert split_text("one a\nstill one\n\n  \ntwo\n\n\nthree\n") == ["one a\nstill one", "two", "three"]
    eot = "first\nline\n<|endoftext|>\nsecond\n\n<|endoftext|>\n\n<|endoftext|>\nthird\n"
    assert split_text(eot) == ["first\nline", "second", "third"]
    assert split_text("a story\nanother story\r\n\nnope") == ["a story\nanother story", "nope"]
    assert split_text("line one\nline two\r\nline three") == ["line one", "line two", "line three"]
    assert split_text("   \n\n ") == []


def test_read_stories_json_jsonl_text(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"story": " A.\n", "summary": "x"},
                                                 {"story": "B"}, {"story": "  "}, "C"]))
    (tmp_path / "b.jsonl").write_text('{"story": "D"}\n\n{"text": "E"}\n"F"\n')
    (tmp_path / "c.txt").write_text("G\n\nH\n")
    assert read_stories(tmp_path / "a.json") == ["A.", "B", "C"]
    assert read_stories(tmp_path / "b.jsonl") == ["D", "E", "F"]
    assert read_stories(tmp_path / "c.txt") == ["G", "H"]
    (tmp_path / "bad.json").write_text('[{"nostory": 1}]')
    with pytest.raises(ValueError, match="story"):
        read_stories(tmp_path / "bad.json")


def test_endoftext_sample(shared_data):
    stories = read_stories(shared_data / EOT_SAMPLE)
    assert len(stories) == 5
    assert all("<|endoftext|>" not in s for s in stories)
    assert stories[0].startswith("Once upon a time there was a little boy named Ben.")


def test_validation_split_rule():
    flags = [is_validation(i, 0.05) for i in range(100)]
    assert [i for i, f in enumerate(flags) if f] == [0, 20, 40, 60, 80]
    assert sum(is_validation(i, 0.1) for i in range(1000)) == 100
    assert not any(is_validation(i, 0.0) for i in range(50))


# ---------------------------------------------------------------------------
# tokenizer training
# ---------------------------------------------------------------------------

def test_train_tokenizer_settings(syn_tok):
    sp = spm.SentencePieceProcessor(model_file=str(syn_tok))
    assert sp.vocab_size() == 512
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert [sp.id_to_piece(i) for i in (0, 1, 2, 3, 258)] == ["<unk>", "<s>", "</s>", "<0x00>", "<0xFF>"]
    assert syn_tok.with_suffix(".vocab").is_file()
    # digits are split one by one
    digits = [sp.id_to_piece(i) for i in sp.encode("1999")]
    assert "".join(digits).replace("\u2581", "") == "1999" and all(len(p.strip("\u2581")) <= 1 for p in digits)
    # byte fallback: characters never seen come back exactly
    for text in ["日本語 and 🦙", "tabs\tand  two  spaces", "  leading", "x\ny"]:
        ids = sp.encode(text)
        assert 0 not in ids
        assert sp.decode(ids) == text
    # a dummy prefix, no whitespace collapsing (as the C tokenizer encodes)
    assert sp.id_to_piece(sp.encode("Once")[0]).startswith("\u2581")
    assert len(sp.encode("a  b")) > len(sp.encode("a b"))


def test_train_tokenizer_deterministic_and_errors(tmp_path, syn_tok):
    src = write_text(tmp_path / "s.txt", synthetic_stories(1200, seed=1))
    again = train_tokenizer(src, 512, tmp_path / "again.model", num_threads=1)

    def vocab(path):
        sp = spm.SentencePieceProcessor(model_file=str(path))
        return [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.vocab_size())]

    assert vocab(again) == vocab(syn_tok)
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(src, 100, tmp_path / "x.model")
    with pytest.raises(ValueError, match="Vocabulary size too high|vocab"):
        train_tokenizer(src, 60000, tmp_path / "x.model")
    with pytest.raises(FileNotFoundError):
        train_tokenizer(tmp_path / "missing.txt", 512, tmp_path / "x.model")


def test_train_tokenizer_on_tinystories(shared_data, tmp_path):
    text = (shared_data / TINYSTORIES_TXT).read_text(encoding="utf-8")
    src = tmp_path / "slice.txt"
    src.write_text(text[:300_000], encoding="utf-8")
    model = train_tokenizer([src], 512, tmp_path / "tok512.model")
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert sp.vocab_size() == 512
    ids = sp.encode("Once upon a time, there was a little girl named Lily.")
    assert len(ids) < 25          # a real vocabulary: whole words, not bytes
    assert sp.decode(ids) == "Once upon a time, there was a little girl named Lily."


# ---------------------------------------------------------------------------
# data prepare
# ---------------------------------------------------------------------------

def test_prepare_round_trip_all_formats(tmp_path, syn_tok):
    stories = synthetic_stories(300, seed=7)
    a, b, c = stories[:100], stories[100:200], stories[200:]
    write_text(tmp_path / "a.txt", a)
    (tmp_path / "b.json").write_text(json.dumps([{"story": s, "source": "t"} for s in b]),
                                     encoding="utf-8")
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"story": s}) + "\n" for s in c),
                                      encoding="utf-8")
    inputs = [tmp_path / "a.txt", tmp_path / "b.json", tmp_path / "c.jsonl"]
    meta = prepare(inputs, syn_tok, tmp_path / "out", val_fraction=0.1, workers=1, progress=False)
    sp = spm.SentencePieceProcessor(model_file=str(syn_tok))
    expect = [s.strip() for s in stories]
    want_val = [s for i, s in enumerate(expect) if is_validation(i, 0.1)]
    want_train = [s for i, s in enumerate(expect) if not is_validation(i, 0.1)]
    assert decode_split(tmp_path / "out", "train", sp) == want_train
    assert decode_split(tmp_path / "out", "val", sp) == want_val
    assert meta["vocab_size"] == 512 and meta["splits"]["val"]["stories"] == 30
    assert meta["splits"]["train"]["stories"] == 270
    assert load_meta(tmp_path / "out") == meta
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == syn_tok.read_bytes()
    ids = np.concatenate(load_split(tmp_path / "out", "train"))
    assert ids.dtype == np.uint16 and ids.max() < 512
    assert meta["splits"]["train"]["tokens"] == ids.size


def test_prepare_parallel_matches_serial(tmp_path, syn_tok):
    stories = synthetic_stories(500, seed=3)
    src = write_text(tmp_path / "in.txt", stories)
    one = prepare([src], syn_tok, tmp_path / "one", workers=1, progress=False)
    # workers forced on (threshold 0), small chunks and shards, a progress bar
    two = prepare([src], syn_tok, tmp_path / "two", workers=2, chunk_stories=37,
                  shard_tokens=4000, parallel_threshold=0, progress=True)
    for split in ("train", "val"):
        a = np.concatenate(load_split(tmp_path / "one", split))
        b = np.concatenate(load_split(tmp_path / "two", split))
        assert np.array_equal(a, b)
        assert one["splits"][split]["tokens"] == two["splits"][split]["tokens"]
    assert len(two["splits"]["train"]["shards"]) > 1
    assert len(one["splits"]["train"]["shards"]) == 1


def test_prepare_tinystories_text(shared_data, tmp_path, syn_tok):
    src = shared_data / TINYSTORIES_TXT
    meta = prepare([src], syn_tok, tmp_path / "d", workers=2, progress=False)
    sp = spm.SentencePieceProcessor(model_file=str(syn_tok))
    stories = read_stories(src)
    got = decode_split(tmp_path / "d", "train", sp) + decode_split(tmp_path / "d", "val", sp)
    assert sorted(got) == sorted(stories)
    assert meta["splits"]["val"]["stories"] == sum(is_validation(i, 0.05) for i in range(len(stories)))


def test_prepare_refuses_big_vocab(tmp_path, syn_tok, monkeypatch):
    import llama2c.data.shards as P

    class Big:
        def vocab_size(self):
            return 70000

        def bos_id(self):
            return 1

    monkeypatch.setattr(P, "_load_sp", lambda path: Big())
    src = write_text(tmp_path / "in.txt", ["a story"])
    with pytest.raises(ValueError, match="uint16"):
        prepare([src], syn_tok, tmp_path / "o", progress=False)


def test_prepare_errors(tmp_path, syn_tok):
    with pytest.raises(FileNotFoundError):
        prepare([tmp_path / "nope.txt"], syn_tok, tmp_path / "o", progress=False)
    src = write_text(tmp_path / "in.txt", ["x"])
    with pytest.raises(FileNotFoundError):
        prepare([src], tmp_path / "nope.model", tmp_path / "o", progress=False)
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ValueError):
        prepare([src], tmp_path / "junk.model", tmp_path / "o", progress=False)
    with pytest.raises(FileNotFoundError, match="meta.json"):
        load_meta(tmp_path)


# ---------------------------------------------------------------------------
# TinyStories download against a local server
# ---------------------------------------------------------------------------

class _RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves server.payload at any path, honouring `Range: bytes=N-` (206, or 416
    past the end) unless server.ignore_range; server.cut > 0 makes the next
    response stop after that many body bytes and drop the connection."""

    def do_GET(self):  # noqa: N802
        srv = self.server
        data = srv.payload
        rng = self.headers.get("Range")
        srv.ranges.append(rng)
        start = 0
        if rng and not srv.ignore_range:
            m = re.fullmatch(r"bytes=(\d+)-", rng.strip())
            start = int(m.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Type", "application/gzip")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if srv.cut:
            self.wfile.write(body[:srv.cut])
            self.wfile.flush()
            srv.cut = 0
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    httpd.payload, httpd.ranges, httpd.cut, httpd.ignore_range = b"", [], 0, False
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/datasets/TinyStories_all_data.tar.gz"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def tinystories_archive(n_shards: int = 3, per_shard: int = 150) -> bytes:
    """A small archive shaped like TinyStories_all_data.tar.gz: data00.json ... at the
    top, each a JSON list of {"story", "instruction", "summary", "source"}."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for k in range(n_shards):
            items = [{"story": s, "instruction": {"prompt:": "", "words": ["x"], "features": []},
                      "summary": "", "source": "GPT-4"}
                     for s in synthetic_stories(per_shard, seed=100 + k)]
            blob = json.dumps(items).encode("utf-8")
            info = tarfile.TarInfo(f"data{k:02d}.json")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


@pytest.fixture(scope="module")
def archive() -> bytes:
    return tinystories_archive()


def test_download_full_and_extract(server, archive, tmp_path):
    server.payload = archive
    target = ts.download(tmp_path, server.url, progress=True)
    assert (tmp_path / ts.ARCHIVE).read_bytes() == archive
    assert not (tmp_path / (ts.ARCHIVE + ".part")).exists()
    assert sorted(p.name for p in ts.shard_files(tmp_path)) == ["data00.json", "data01.json", "data02.json"]
    assert target == tmp_path / "TinyStories_all_data"
    assert server.ranges == [None]
    # a second call finds everything in place and downloads nothing
    ts.download(tmp_path, server.url, progress=False)
    assert server.ranges == [None]


def test_download_resumes_partial_file(server, archive, tmp_path):
    server.payload = archive
    k = len(archive) // 3
    (tmp_path / (ts.ARCHIVE + ".part")).write_bytes(archive[:k])
    ts.download(tmp_path, server.url, progress=False)
    assert server.ranges == [f"bytes={k}-"]
    assert (tmp_path / ts.ARCHIVE).read_bytes() == archive
    assert len(ts.shard_files(tmp_path)) == 3


def test_download_interrupted_then_resumed(server, archive, tmp_path):
    server.payload = archive
    server.cut = len(archive) // 2             # the first response dies half way
    ts.download(tmp_path, server.url, progress=False, retry_wait=0)
    assert server.ranges == [None, f"bytes={len(archive) // 2}-"]
    assert (tmp_path / ts.ARCHIVE).read_bytes() == archive


def test_download_interrupted_without_retries_keeps_partial(server, archive, tmp_path):
    server.payload = archive
    server.cut = 1000
    with pytest.raises(ts.DownloadError, match="run again"):
        ts.download(tmp_path, server.url, progress=False, retries=0, retry_wait=0)
    part = tmp_path / (ts.ARCHIVE + ".part")
    assert part.read_bytes() == archive[:1000] and not (tmp_path / ts.ARCHIVE).exists()
    # running again continues from byte 1000
    ts.download(tmp_path, server.url, progress=False)
    assert server.ranges[-1] == "bytes=1000-"
    assert (tmp_path / ts.ARCHIVE).read_bytes() == archive


def test_download_server_ignoring_range_and_complete_part(server, archive, tmp_path):
    server.payload = archive
    server.ignore_range = True
    (tmp_path / (ts.ARCHIVE + ".part")).write_bytes(b"garbage that is not the start")
    ts.download(tmp_path / "a", server.url, progress=False)   # fresh dir: plain GET
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / (ts.ARCHIVE + ".part")).write_bytes(archive[:500])
    ts.download(tmp_path / "b", server.url, progress=False)   # 200 to a Range: start over
    assert (tmp_path / "b" / ts.ARCHIVE).read_bytes() == archive
    # a .part that is already complete: 416 means done
    server.ignore_range = False
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / (ts.ARCHIVE + ".part")).write_bytes(archive)
    ts.download(tmp_path / "c", server.url, progress=False)
    assert server.ranges[-1] == f"bytes={len(archive)}-"
    assert (tmp_path / "c" / ts.ARCHIVE).read_bytes() == archive


def test_download_unreachable(tmp_path):
    with pytest.raises(ts.DownloadError):
        ts.download(tmp_path, "http://127.0.0.1:1/TinyStories_all_data.tar.gz", progress=False,
                    retries=1, retry_wait=0)
    assert not (tmp_path / ts.ARCHIVE).exists()


def test_tinystories_pipeline_cli(server, archive, tmp_path):
    """download -> train_vocab -> pretokenize through the command line."""
    server.payload = archive
    d = str(tmp_path / "data")
    assert data_cli.main(["data", "tinystories", "download", "--data-dir", d, "--url", server.url, "-q"]) == 0
    assert data_cli.main(["data", "tinystories", "train_vocab", "--vocab_size=512", "--data_dir", d]) == 0
    assert (tmp_path / "data" / "tok512.model").is_file()
    assert data_cli.main(["data", "tinystories", "pretokenize", "--vocab-size", "512", "--data-dir", d,
                          "-q", "--workers", "1"]) == 0
    meta = load_meta(tmp_path / "data" / "tok512")
    assert meta["vocab_size"] == 512
    assert meta["splits"]["train"]["stories"] + meta["splits"]["val"]["stories"] == 450
    # pretokenize without a tokenizer for vocab 0 is a clear error
    assert data_cli.main(["data", "tinystories", "pretokenize", "--data-dir", d]) == 1


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------

def test_cli_tokenizer_train_prepare_export(tmp_path, capsys):
    src = write_text(tmp_path / "s.txt", synthetic_stories(800, seed=11))
    tok = tmp_path / "tok.model"
    assert data_cli.main(["tokenizer", "train", str(src), "--vocab-size", "512", "-o", str(tok)]) == 0
    assert tok.is_file()
    assert data_cli.main(["data", "prepare", str(src), "--tokenizer", str(tok), "-o",
                          str(tmp_path / "d"), "--val-fraction", "0.1", "-q"]) == 0
    assert load_meta(tmp_path / "d")["splits"]["val"]["stories"] == 80
    err = capsys.readouterr().err
    assert "train 720 stories" in err
    try:
        from llama2c.export.tokenizer_bin import export_tokenizer
    except ImportError:
        pytest.skip("llama2c.export.tokenizer_bin is not there yet: tokenizer export not checked")
    assert data_cli.main(["tokenizer", "export", str(tok)]) == 0
    export_tokenizer(tok, tmp_path / "ref.bin")
    assert (tmp_path / "tok.bin").read_bytes() == (tmp_path / "ref.bin").read_bytes()


def test_cli_errors(tmp_path, capsys):
    assert data_cli.main(["data", "prepare", str(tmp_path / "none.txt"), "--tokenizer", "t.model",
                          "-o", str(tmp_path / "o")]) == 1
    assert "error:" in capsys.readouterr().err
    src = write_text(tmp_path / "s.txt", ["just a few words"])
    assert data_cli.main(["tokenizer", "train", str(src), "--vocab-size", "5000", "-o",
                          str(tmp_path / "t.model")]) == 1
    assert "SentencePiece could not train" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        data_cli.main(["tokenizer", "train", str(src), "-o", "x.model"])   # no --vocab-size
