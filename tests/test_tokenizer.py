"""The tokenizer.bin tokenizer against SentencePiece (the Llama 2 tokenizer and
stories260K's tok512) and against reference.encode (SPEC 4)."""
from __future__ import annotations

import pytest
import sentencepiece

import llama2c
from helpers import LLAMA2_TOK, STORIES, STRINGS, R


@pytest.fixture(scope="module")
def llama_tok(shared_data):
    path = LLAMA2_TOK / "tokenizer.bin"
    sp = sentencepiece.SentencePieceProcessor(model_file=str(LLAMA2_TOK / "tokenizer.model"))
    return llama2c.Tokenizer(str(path)), sp, R.read_tokenizer_bin(path)


@pytest.fixture(scope="module")
def tok512(shared_data):
    path = STORIES / "tok512.bin"
    sp = sentencepiece.SentencePieceProcessor(model_file=str(STORIES / "tok512.model"))
    return llama2c.Tokenizer(str(path)), sp, R.read_tokenizer_bin(path)


def _id(s: str) -> str:
    return repr(s[:20])


@pytest.mark.parametrize("text", STRINGS, ids=_id)
def test_encode_matches_sentencepiece(llama_tok, text):
    tok, sp, _ = llama_tok
    assert tok.encode(text, bos=False) == sp.encode(text)


@pytest.mark.parametrize("text", STRINGS, ids=_id)
def test_encode_bos_eos(llama_tok, text):
    tok, sp, _ = llama_tok
    ids = sp.encode(text)
    assert tok.encode(text) == [1] + ids
    assert tok.encode(text, bos=True, eos=True) == [1] + ids + [2]
    assert tok.encode(text, bos=False, eos=True) == ids + [2]


@pytest.mark.parametrize("text", [s for s in STRINGS if not s.startswith(" ")], ids=_id)
def test_decode_roundtrip(llama_tok, text):
    tok, sp, _ = llama_tok
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert sp.decode(ids[1:]) == text  # the strings are fair


def test_empty_string(llama_tok):
    tok, _, _ = llama_tok
    assert tok.encode("") == [1]
    assert tok.encode("", bos=False) == []
    assert tok.encode("", bos=True, eos=True) == [1, 2]
    assert tok.decode([1]) == ""


def test_byte_fallback(llama_tok):
    """A character missing from the vocab becomes its UTF-8 bytes (id = byte + 3)."""
    tok, _, _ = llama_tok
    ids = tok.encode("🦙", bos=False)
    assert ids[0] == 29871  # the dummy prefix " "
    assert ids[1:] == [b + 3 for b in "🦙".encode()]
    assert tok.decode([1] + ids) == "🦙"


def test_pieces_llama2(llama_tok):
    tok, _, (max_len, pieces, scores) = llama_tok
    assert tok.vocab_size == len(pieces) == 32000
    assert tok.piece(0) == b"<unk>"
    assert tok.piece(1) == b"\n<s>\n"
    assert tok.piece(2) == b"\n</s>\n"
    assert tok.piece(3) == b"<0x00>"
    assert tok.piece(258) == b"<0xFF>"
    assert tok.piece(29871) == b" "
    for i in range(0, 32000, 7):
        assert tok.piece(i) == pieces[i]
    assert tok.piece(31999) == pieces[31999]


def test_long_text_matches_sentencepiece(llama_tok, shared_data):
    tok, sp, _ = llama_tok
    text = (shared_data / "tinystories" / "cs336_tinystories_sample.txt").read_text("utf-8")
    assert tok.encode(text, bos=False) == sp.encode(text)
    assert tok.decode(tok.encode(text)) == text


def test_tinystories_paragraphs_llama2(llama_tok, shared_data):
    tok, sp, _ = llama_tok
    text = (shared_data / "tinystories" / "TinyStories-validation-head.txt").read_text("utf-8")
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    # every non-ASCII paragraph (curly quotes, accents, ...) and some others
    chosen = [p for p in paragraphs if not p.isascii()][:40] + paragraphs[:40]
    for p in chosen:
        assert tok.encode(p, bos=False) == sp.encode(p), p


# ---------------------------------------------------------------------------
# tok512 (stories260K): trained with remove_extra_whitespaces, so only texts
# without runs of spaces compare directly with SentencePiece.
# ---------------------------------------------------------------------------

TOK512_STRINGS = [
    "Once upon a time, there was a little girl named Lily.",
    "She loved to play outside in the park.",
    'Lily\'s mom said, "Lily, let\'s go to the park."',
    "The cat sat on the mat.\nThe dog barked.",
    "Zebras and xylophones quickly jumped 12345 times!",
    "café naïve 🙂 日本",
    "a",
]


@pytest.mark.parametrize("text", TOK512_STRINGS, ids=_id)
def test_tok512_matches_sentencepiece(tok512, text):
    tok, sp, (_, pieces, scores) = tok512
    assert tok.encode(text, bos=False) == sp.encode(text)
    assert tok.encode(text) == R.encode(pieces, scores, text)
    assert tok.decode(tok.encode(text)) == text


def test_tok512_stories(tok512, shared_data):
    tok, sp, _ = tok512
    text = (shared_data / "tinystories" / "TinyStories-validation-head.txt").read_text("utf-8")
    paragraphs = [p for p in text.split("\n\n") if p.strip() and "  " not in p
                  and not p.startswith(" ") and not p.endswith(" ")][:60]
    for p in paragraphs:
        assert tok.encode(p, bos=False) == sp.encode(p), p
        assert tok.decode(tok.encode(p)) == p


def test_tok512_pieces(tok512):
    tok, _, (_, pieces, _) = tok512
    assert tok.vocab_size == 512
    assert [tok.piece(i) for i in range(512)] == pieces


def test_tok512_vocab_size_prefix(shared_data):
    """Tokenizer(path, vocab_size=n) uses only the first n entries (420 keeps
    the " " piece, id 410, so the dummy prefix exists)."""
    _, pieces, scores = R.read_tokenizer_bin(STORIES / "tok512.bin")
    n = 420
    tok = llama2c.Tokenizer(str(STORIES / "tok512.bin"), vocab_size=n)
    assert tok.vocab_size == n
    changed = 0
    for text in TOK512_STRINGS:
        ids = tok.encode(text)
        assert ids == R.encode(pieces[:n], scores[:n], text)
        assert max(ids) < n
        assert tok.decode(ids) == text
        changed += ids != R.encode(pieces, scores, text)
    assert changed >= 3  # the test can tell a truncated vocab from the full one


# ---------------------------------------------------------------------------
# a synthetic vocabulary written by reference.write_tokenizer_bin
# ---------------------------------------------------------------------------


def test_synthetic_vocab(tmp_path):
    pieces, scores = R.make_vocab(400)
    path = R.write_tokenizer_bin(tmp_path / "tok.bin", pieces, scores)
    tok = llama2c.Tokenizer(str(path))
    assert tok.vocab_size == 400
    for text in ["Once upon a time the cat saw the sun.", "They played and the dog was happy",
                 "x", "The end.", "weird ~~ chars {} and \x7f bytes é"]:
        assert tok.encode(text) == R.encode(pieces, scores, text)
        assert tok.encode(text, bos=False, eos=True) == R.encode(pieces, scores, text, False, True)
    assert tok.decode(tok.encode("The cat and the dog.")) == "The cat and the dog."


def test_tie_break_is_leftmost(tmp_path):
    """Equal merge scores: the leftmost pair merges first."""
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [b"<0x%02X>" % i for i in range(256)]
    base = len(pieces)
    pieces += [b" ", b"a", b"b", b"ab", b"ba", b" a"]
    scores = [0.0] * base + [-10.0, -10.0, -10.0, 1.0, 1.0, 0.5]
    path = R.write_tokenizer_bin(tmp_path / "tie.bin", pieces, scores)
    tok = llama2c.Tokenizer(str(path))
    # " aba": ' a' (0.5) vs 'ab' (1) vs 'ba' (1): 'ab' is the leftmost best
    ids = tok.encode("aba", bos=False)
    assert ids == R.encode(pieces, scores, "aba", False)
    assert ids == [base + 0, base + 3, base + 1]
    ids = tok.encode("bab", bos=False)
    assert ids == R.encode(pieces, scores, "bab", False) == [base + 0, base + 4, base + 2]
