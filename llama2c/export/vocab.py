"""Llama 2 (SentencePiece) vocabularies as GGUF stores them: a `Vocab` of
pieces (spaces as U+2581), scores and token types (the TT_* values of
llama.cpp / gguf), read from a tokenizer.model (needs sentencepiece) or a
llama2.c tokenizer.bin, or made up for random-weight models
(`synthetic_vocab`); `write_tokenizer_bin` writes one as tokenizer.bin.
`load_vocab` picks one of these for the GGUF writer. numpy-free."""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

SPIECE_SPACE = "\u2581"  # SentencePiece's visible space

# token types (llama.cpp / gguf TokenType values)
TT_NORMAL, TT_UNKNOWN, TT_CONTROL, TT_USER_DEFINED, TT_UNUSED, TT_BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class Vocab:
    tokens: list[str]   # SentencePiece pieces (spaces as U+2581)
    scores: list[float]
    types: list[int]    # TT_*


def synthetic_pieces(n: int) -> list[str]:
    """n distinct Llama-2-style pieces: <unk>, <s>, </s>, <0x00>..<0xFF>, then
    made-up words (for random-weight models, whose vocabulary means nothing)."""
    if n < 259:
        raise ValueError(f"a synthetic Llama 2 vocabulary needs at least 259 tokens (got {n})")
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    letters = "abcdefghijklmnopqrstuvwxyz"
    for i in range(n - 259):
        k, word = i // 2, ""
        while True:
            word = letters[k % 26] + word
            k = k // 26 - 1
            if k < 0:
                break
        pieces.append((SPIECE_SPACE + word) if i % 2 == 0 else word)
    return pieces


def _types_for(pieces: list[str]) -> list[int]:
    types = []
    for i, p in enumerate(pieces):
        if i == 0:
            types.append(TT_UNKNOWN)
        elif i in (1, 2):
            types.append(TT_CONTROL)
        elif len(p) == 6 and p.startswith("<0x") and p.endswith(">"):
            types.append(TT_BYTE)
        else:
            types.append(TT_NORMAL)
    return types


def synthetic_vocab(n: int) -> Vocab:
    pieces = synthetic_pieces(n)
    return Vocab(pieces, [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(n - 259)],
                 _types_for(pieces))


def sentencepiece_vocab(path: str | os.PathLike) -> Vocab:
    """The vocabulary of a SentencePiece tokenizer.model (needs sentencepiece)."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=os.fspath(path))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        if sp.is_unknown(i):
            types.append(TT_UNKNOWN)
        elif sp.is_control(i):
            types.append(TT_CONTROL)
        elif sp.is_unused(i):
            types.append(TT_UNUSED)
        elif sp.is_byte(i):
            types.append(TT_BYTE)
        else:
            types.append(TT_NORMAL)
    return Vocab(tokens, scores, types)


def tokenizer_bin_vocab(path: str | os.PathLike, vocab_size: int) -> Vocab:
    """The vocabulary of a llama2.c tokenizer.bin (docs/FORMAT.md)."""
    data = Path(path).read_bytes()
    off = 4
    tokens, scores = [], []
    for i in range(vocab_size):
        if off + 8 > len(data):
            raise ValueError(f"{path}: holds fewer than {vocab_size} tokens")
        score, n = struct.unpack_from("<fi", data, off)
        off += 8
        piece = data[off:off + n].decode("utf-8", errors="replace")
        off += n
        if i == 1 and piece.strip() == "<s>":
            piece = "<s>"
        elif i == 2 and piece.strip() == "</s>":
            piece = "</s>"
        tokens.append(piece.replace(" ", SPIECE_SPACE))
        scores.append(float(score))
    return Vocab(tokens, scores, _types_for(tokens))


def write_tokenizer_bin(path: str | os.PathLike, vocab: Vocab) -> Path:
    """Writes a vocabulary as llama2.c's tokenizer.bin (spaces as ' ', BOS / EOS
    as "\\n<s>\\n" / "\\n</s>\\n")."""
    pieces = []
    for i, t in enumerate(vocab.tokens):
        if i == 1:
            t = "\n<s>\n"
        elif i == 2:
            t = "\n</s>\n"
        pieces.append(t.replace(SPIECE_SPACE, " ").encode("utf-8"))
    out = [struct.pack("<I", max(len(p) for p in pieces))]
    for p, s in zip(pieces, vocab.scores):
        out.append(struct.pack("<fi", s, len(p)) + p)
    path = Path(path)
    path.write_bytes(b"".join(out))
    return path


def load_vocab(vocab, vocab_size: int, model_path: Path | None = None) -> Vocab:
    """vocab: a Vocab, "synthetic", a tokenizer.model / tokenizer.bin path, or None
    (tokenizer.bin beside the model if it has vocab_size tokens, else synthetic)."""
    if isinstance(vocab, Vocab):
        v = vocab
    elif vocab is None:
        beside = model_path.parent / "tokenizer.bin" if model_path is not None else None
        v = None
        if beside is not None and beside.exists():
            try:
                v = tokenizer_bin_vocab(beside, vocab_size)
            except ValueError:
                v = None
        if v is None:
            v = synthetic_vocab(vocab_size)
    elif str(vocab) == "synthetic":
        v = synthetic_vocab(vocab_size)
    else:
        p = Path(vocab)
        with open(p, "rb") as f:
            head = f.read(64)
        # a SentencePiece model is a protobuf (first field tag 0x0a); tokenizer.bin
        # starts with a small uint32 max_token_length
        if p.suffix == ".model" or (head[:1] == b"\x0a" and len(head) >= 4
                                   and struct.unpack_from("<I", head)[0] > 4096):
            v = sentencepiece_vocab(p)
        else:
            v = tokenizer_bin_vocab(p, vocab_size)
    if len(v.tokens) < vocab_size:
        raise ValueError(f"the vocabulary has {len(v.tokens)} tokens, the model {vocab_size}")
    if len(v.tokens) > vocab_size:
        v = Vocab(v.tokens[:vocab_size], v.scores[:vocab_size], v.types[:vocab_size])
    return v
