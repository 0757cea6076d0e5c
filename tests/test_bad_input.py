"""Malformed files and bad arguments: clear Python exceptions (FormatError,
InvalidArgumentError, FileNotFoundError) and clean CLI failures, never a crash."""
from __future__ import annotations

import math
import struct

import numpy as np
import pytest

import llama2c
from helpers import R

# small, with GQA and an unshared classifier so every tensor kind is present
SMALL = R.Config(dim=16, hidden_dim=40, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300,
                 seq_len=16)
SMALL_W = R.random_weights(SMALL, 123, shared=False)
VERSIONS = [0, 1, 2, 3]


def model_bytes(version: int, cfg: R.Config = SMALL, w: dict | None = None) -> bytes:
    return R.model_bytes(cfg, SMALL_W if w is None else w, version)


def param_offset(version: int) -> int:
    return 0 if version == 0 else 8


FIELDS = ["dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"]


def set_params(data: bytes, version: int, **changes) -> bytes:
    """Rewrites header fields of an existing file (the body stays as it was)."""
    buf = bytearray(data)
    off = param_offset(version)
    vals = list(struct.unpack_from("<7i", buf, off))
    for k, v in changes.items():
        vals[FIELDS.index(k)] = v
    struct.pack_into("<7i", buf, off, *vals)
    return bytes(buf)


def expect_format_error(path, **kw) -> llama2c.FormatError:
    with pytest.raises(llama2c.FormatError) as ei:
        llama2c.Llama(str(path), **kw)
    assert str(ei.value).strip(), "FormatError without a message"
    return ei.value


@pytest.fixture
def write(tmp_path):
    counter = iter(range(10**6))

    def _write(data: bytes, name: str | None = None):
        path = tmp_path / (name or f"bad{next(counter)}.bin")
        path.write_bytes(data)
        return path
    return _write


# ---------------------------------------------------------------------------
# the exceptions
# ---------------------------------------------------------------------------


def test_exception_hierarchy():
    assert issubclass(llama2c.FormatError, llama2c.Llama2Error)
    assert issubclass(llama2c.FormatError, ValueError)
    assert issubclass(llama2c.InvalidArgumentError, llama2c.Llama2Error)
    assert issubclass(llama2c.InvalidArgumentError, ValueError)


@pytest.mark.parametrize("version", VERSIONS)
def test_valid_small_models_load(write, version):
    """The files the other tests corrupt are fine as written."""
    m = llama2c.Llama(str(write(model_bytes(version))))
    assert m.config.dim == SMALL.dim and m.config.vocab_size == SMALL.vocab_size
    assert np.all(np.isfinite(m.forward(1, 0)))


# ---------------------------------------------------------------------------
# model files
# ---------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        llama2c.Llama(str(tmp_path / "does_not_exist.bin"))


def test_directory_is_not_a_model(tmp_path):
    with pytest.raises((OSError, llama2c.Llama2Error)):
        llama2c.Llama(str(tmp_path))


def test_empty_file(write):
    expect_format_error(write(b""))


@pytest.mark.parametrize("cut", [1, 2, 4, 20, 27, 28, 29, 36, 100, 255, 256, 257, "half",
                                 "-64", "-5", "-4", "-1"])
@pytest.mark.parametrize("version", VERSIONS)
def test_truncated(write, version, cut):
    data = model_bytes(version)
    n = len(data) // 2 if cut == "half" else int(cut)
    if n < 0:
        n = len(data) + n
    expect_format_error(write(data[:n]))


@pytest.mark.parametrize("extra", [b"\0", b"\0\0\0\0", b"garbage!", bytes(1 << 16)],
                         ids=["1", "4", "8", "64k"])
@pytest.mark.parametrize("version", VERSIONS)
def test_trailing_bytes(write, version, extra):
    expect_format_error(write(model_bytes(version) + extra))


@pytest.mark.parametrize("version", [-1, 0, 6, 7, 99, 2**31 - 1])
def test_unknown_version(write, version):
    data = bytearray(model_bytes(1))
    struct.pack_into("<i", data, 4, version)
    err = expect_format_error(write(bytes(data)))
    if version != 0:
        assert "version" in str(err).lower()


def test_magic_alone(write):
    expect_format_error(write(struct.pack("<I", R.MAGIC)))
    expect_format_error(write(struct.pack("<Ii", R.MAGIC, 1)))


def test_random_garbage(write):
    rng = np.random.default_rng(0)
    for size in (7, 28, 256, 1000, 100_000):
        expect_format_error(write(rng.integers(0, 256, size, dtype=np.uint8).tobytes()))


BAD_FIELDS = [
    ("dim", 0), ("dim", -16), ("dim", -2**31),
    ("hidden_dim", 0), ("hidden_dim", -40),
    ("n_layers", 0), ("n_layers", -2),
    ("n_heads", 0), ("n_heads", -4),
    ("n_kv_heads", 0), ("n_kv_heads", -2),
    ("vocab_size", 0),
    ("seq_len", 0), ("seq_len", -16),
    # inconsistent with the body: size checks must catch these
    ("dim", 32), ("hidden_dim", 41), ("n_layers", 3), ("vocab_size", 301), ("dim", 2**16),
    ("n_layers", 2**20), ("hidden_dim", 2**30), ("vocab_size", 2**31 - 1), ("seq_len", 2**31 - 1),
]


@pytest.mark.parametrize("field,value", BAD_FIELDS, ids=[f"{f}={v}" for f, v in BAD_FIELDS])
@pytest.mark.parametrize("version", VERSIONS)
def test_bad_dimension(write, version, field, value):
    expect_format_error(write(set_params(model_bytes(version), version, **{field: value})))


def test_v0_vocab_int_min(write):
    """-vocab_size must not overflow for INT_MIN."""
    expect_format_error(write(set_params(model_bytes(0), 0, vocab_size=-2**31)))


HUGE = [
    dict(dim=2**30, hidden_dim=2**30, n_layers=2**30, n_heads=2**10, n_kv_heads=2**10,
         vocab_size=2**30, seq_len=2**30),
    dict(dim=2**31 - 1, hidden_dim=2**31 - 1, n_layers=2**31 - 1, n_heads=1, n_kv_heads=1,
         vocab_size=2**31 - 1, seq_len=2**31 - 1),
    dict(dim=2**16, hidden_dim=2**31 - 1, n_layers=2**31 - 1, n_heads=2**8, n_kv_heads=2**8,
         vocab_size=2**31 - 1, seq_len=2**31 - 1),
    dict(dim=2**24, hidden_dim=2**24, n_layers=2**24, n_heads=2**12, n_kv_heads=2**12,
         vocab_size=2**24, seq_len=2**24),
    # plausible model, tiny file
    dict(dim=4096, hidden_dim=11008, n_layers=32, n_heads=32, n_kv_heads=32, vocab_size=32000,
         seq_len=4096),
]


@pytest.mark.parametrize("dims", HUGE, ids=[str(i) for i in range(len(HUGE))])
@pytest.mark.parametrize("version", VERSIONS)
def test_huge_dimensions(write, version, dims):
    """Sizes that overflow 64 bits (or exceed the file) are format errors."""
    expect_format_error(write(set_params(model_bytes(version), version, **dims)))


# Files whose size matches their (invalid) header exactly: only the
# dimension checks can reject them.
INVALID_SHAPES = {
    "dim_not_multiple_of_heads": R.Config(18, 40, 2, 4, 2, 300, 16),
    "kv_heads_above_heads": R.Config(16, 40, 2, 4, 8, 300, 16),
    "heads_not_multiple_of_kv": R.Config(24, 40, 2, 4, 3, 300, 16),
    "odd_head_size": R.Config(12, 40, 2, 4, 2, 300, 16),
    "seq_len_zero": R.Config(16, 40, 2, 4, 2, 300, 0),
}


@pytest.mark.parametrize("name", sorted(INVALID_SHAPES))
@pytest.mark.parametrize("version", VERSIONS)
def test_consistent_but_invalid_shapes(write, version, name):
    cfg = INVALID_SHAPES[name]
    w = R.random_weights(cfg, 5, shared=True)
    expect_format_error(write(R.model_bytes(cfg, w, version)))


@pytest.mark.parametrize("gs", [0, -8, 3, 6, 12, 32, 1 << 20, 2**31 - 1, -2**31])
def test_bad_group_size(write, gs):
    data = bytearray(model_bytes(2))
    struct.pack_into("<i", data, 37, gs)
    expect_format_error(write(bytes(data)))


def test_group_size_not_dividing_dim_consistent_file(write):
    """A v2 file written consistently with a group size that does not divide
    dim (dim 24, group 16: each matrix still splits into whole groups)."""
    cfg = R.Config(24, 64, 1, 4, 2, 320, 8)
    w = R.random_weights(cfg, 9, shared=True)
    assert all(m.size % 16 == 0 for m in R.q8_matrices(cfg, w))
    expect_format_error(write(R.model_bytes(cfg, w, 2, group_size=16)))


@pytest.mark.parametrize("field,value", [("rope_theta", math.nan), ("rope_theta", math.inf),
                                         ("rope_theta", 0.0), ("rope_theta", -10000.0),
                                         ("norm_eps", math.nan), ("norm_eps", math.inf),
                                         ("norm_eps", 0.0), ("norm_eps", -1e-5)])
def test_v3_bad_floats(write, field, value):
    data = bytearray(model_bytes(3))
    struct.pack_into("<f", data, 40 if field == "rope_theta" else 44, value)
    expect_format_error(write(bytes(data)))


def test_shared_flag_inconsistent(write):
    # v1/v3 unshared file flagged shared: wcls becomes trailing bytes
    for version in (1, 3):
        data = bytearray(model_bytes(version))
        data[36] = 1
        expect_format_error(write(bytes(data)))
    # shared file flagged unshared: wcls missing
    w = R.random_weights(SMALL, 1, shared=True)
    for version in (1, 2, 3):
        data = bytearray(R.model_bytes(SMALL, w, version))
        data[36] = 0
        expect_format_error(write(bytes(data)))
    # v0: vocab sign flipped either way
    expect_format_error(write(set_params(R.model_bytes(SMALL, w, 0), 0, vocab_size=-300)))
    expect_format_error(write(set_params(model_bytes(0), 0, vocab_size=300)))


def test_quantize_bad_file(write):
    with pytest.raises(llama2c.FormatError):
        llama2c.Llama(str(write(model_bytes(1)[:-3])), quantize=True)


# ---------------------------------------------------------------------------
# tokenizer files
# ---------------------------------------------------------------------------

PIECES, SCORES = R.make_vocab(SMALL.vocab_size)


def tok_bytes(pieces=PIECES, scores=SCORES, max_len=None) -> bytes:
    if max_len is None:
        max_len = max(len(p) for p in pieces)
    out = [struct.pack("<I", max_len)]
    for p, s in zip(pieces, scores):
        out.append(struct.pack("<fi", s, len(p)) + p)
    return b"".join(out)


def entry_offsets(pieces=PIECES) -> list[int]:
    offs, off = [], 4
    for p in pieces:
        offs.append(off)
        off += 8 + len(p)
    return offs


def test_valid_tokenizer_loads(write):
    tok = llama2c.Tokenizer(str(write(tok_bytes())))
    assert tok.vocab_size == SMALL.vocab_size
    assert llama2c.Tokenizer(str(write(tok_bytes())), vocab_size=100).vocab_size == 100


def test_tokenizer_missing(tmp_path):
    with pytest.raises(FileNotFoundError):
        llama2c.Tokenizer(str(tmp_path / "nope.bin"))


@pytest.mark.parametrize("vocab_size", [None, SMALL.vocab_size])
def test_tokenizer_truncated(write, vocab_size):
    data = tok_bytes()
    offs = entry_offsets()
    cuts = [0, 1, 2, 3]
    for k in (0, 1, 5, 150, len(offs) - 1):  # inside entry k: score, length, piece
        cuts += [offs[k] + 2, offs[k] + 6]
        if len(PIECES[k]) > 1:
            cuts.append(offs[k] + 8 + len(PIECES[k]) - 1)
    for cut in cuts:
        with pytest.raises(llama2c.FormatError) as ei:
            llama2c.Tokenizer(str(write(data[:cut])), vocab_size=vocab_size)
        assert str(ei.value).strip()


@pytest.mark.parametrize("length", [-1, -2**31, 2**31 - 1, 1000])
def test_tokenizer_bad_length(write, length):
    data = bytearray(tok_bytes())
    off = entry_offsets()[7]
    struct.pack_into("<i", data, off + 4, length)
    with pytest.raises(llama2c.FormatError):
        llama2c.Tokenizer(str(write(bytes(data))))


def test_tokenizer_piece_longer_than_max(write):
    longest = max(len(p) for p in PIECES)
    with pytest.raises(llama2c.FormatError):
        llama2c.Tokenizer(str(write(tok_bytes(max_len=longest - 1))))
    with pytest.raises(llama2c.FormatError):
        llama2c.Tokenizer(str(write(tok_bytes(max_len=0))))


def test_tokenizer_fewer_entries_than_vocab(write):
    short = write(tok_bytes(PIECES[:280], SCORES[:280]))
    with pytest.raises(llama2c.FormatError):
        llama2c.Tokenizer(str(short), vocab_size=SMALL.vocab_size)
    model = write(model_bytes(1))
    with pytest.raises(llama2c.FormatError):
        m = llama2c.Llama(str(model), tokenizer=str(short))
        m.tokenize("hello")
    with pytest.raises(llama2c.FormatError):
        llama2c.generate(str(model), "", tokenizer=str(short), steps=4, temperature=0.0)


def test_tokenizer_piece_out_of_range(write):
    tok = llama2c.Tokenizer(str(write(tok_bytes())))
    for bad in (-1, SMALL.vocab_size, 10**6):
        with pytest.raises(llama2c.InvalidArgumentError):
            tok.piece(bad)
        with pytest.raises(llama2c.InvalidArgumentError):
            tok.decode([1, bad])


# ---------------------------------------------------------------------------
# forward arguments
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2])
def test_forward_bad_arguments(write, version):
    model = llama2c.Llama(str(write(model_bytes(version))))
    good = model.forward(1, 0).copy()
    V, S = SMALL.vocab_size, SMALL.seq_len
    for token, pos in [(-1, 0), (V, 0), (V + 1000, 0), (-(2**31), 0), (0, -1), (0, S),
                       (0, S + 5), (0, -(2**31)), (-1, -1)]:
        with pytest.raises(llama2c.InvalidArgumentError) as ei:
            model.forward(token, pos)
        assert isinstance(ei.value, ValueError) and str(ei.value).strip()
    # the model is still usable and unchanged
    np.testing.assert_array_equal(model.forward(1, 0), good)
    model.forward(V - 1, S - 1)


# ---------------------------------------------------------------------------
# the command-line programs
# ---------------------------------------------------------------------------


def assert_clean_failure(proc, usage: bool = False) -> None:
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode > 0, f"rc {proc.returncode} (negative: killed by a signal)\n{err}"
    assert err.strip(), "no message on stderr"
    if usage:
        assert "usage" in err.lower(), err


@pytest.fixture
def good_files(write):
    return write(model_bytes(1), "good.bin"), write(tok_bytes(), "tok.bin")


@pytest.mark.parametrize("prog", ["run", "runq"])
def test_cli_bad_model_files(cli, write, tmp_path, prog, good_files):
    _, tok = good_files
    data = model_bytes(2 if prog == "runq" else 1)
    bad = [
        tmp_path / "missing.bin",
        write(b""),
        write(data[:100]),
        write(data[:-1]),
        write(data + b"\0"),
        write(set_params(data, 1, dim=0)),
        write(set_params(data, 1, **HUGE[0])),
        write(set_params(model_bytes(0), 0, **HUGE[1])),
        write(struct.pack("<Ii", R.MAGIC, 7) + data[8:]),
    ]
    for path in bad:
        proc = cli(prog, path, "-z", tok, "-n", "4")
        assert_clean_failure(proc)


@pytest.mark.parametrize("prog", ["run", "runq"])
def test_cli_bad_tokenizer(cli, write, prog):
    model = write(model_bytes(2 if prog == "runq" else 1))
    for tok in [write(tok_bytes()[:50]), write(tok_bytes(PIECES[:200], SCORES[:200])),
                write(b"")]:
        assert_clean_failure(cli(prog, model, "-z", tok, "-n", "4"))


@pytest.mark.parametrize("args", [["-x", "1"], ["-t"], ["-n"], ["-m", "foo"], ["-t", "0", "-q"],
                                  ["-z"], ["--help"], ["-tt", "1"]],
                         ids=lambda a: " ".join(a))
@pytest.mark.parametrize("prog", ["run", "runq"])
def test_cli_bad_flags(cli, write, prog, args):
    model = write(model_bytes(2 if prog == "runq" else 1))
    tok = write(tok_bytes())
    assert_clean_failure(cli(prog, model, "-z", tok, *args), usage=True)


@pytest.mark.parametrize("prog", ["run", "runq"])
def test_cli_no_arguments(cli, prog):
    assert_clean_failure(cli(prog), usage=True)
