"""The tokenizer.bin tokenizer: encode text to ids and decode ids to text."""
from __future__ import annotations

import os

from ._ffi import ffi, lib
from .errors import InvalidArgumentError, new_error, raise_for
from .validate import INT_MAX, c_path, check_int

BOS, EOS = 1, 2


class Tokenizer:
    """A llama2.c tokenizer.bin file.

    vocab_size=None reads every entry of the file; a number reads that many
    (a model's tokenizer is opened with the model's vocab_size)."""

    def __init__(self, path: str | os.PathLike, vocab_size: int | None = None):
        raw = c_path(path)
        self.path = os.fsdecode(raw)
        n = -1 if vocab_size is None else check_int("vocab_size", vocab_size, 1)
        err = new_error()
        out = ffi.new("llama2_tokenizer **")
        raise_for(lib.llama2_tokenizer_open(out, raw, n, err), err, self.path)
        self._ptr = ffi.gc(out[0], lib.llama2_tokenizer_free)

    @property
    def vocab_size(self) -> int:
        return lib.llama2_tokenizer_vocab_size(self._ptr)

    def piece(self, token: int) -> bytes:
        """The raw bytes stored for a token (spaces as b' ')."""
        err = new_error()
        piece = ffi.new("const char **")
        length = ffi.new("int *")
        raise_for(lib.llama2_tokenizer_piece(self._ptr, check_int("token", token), piece, length, ffi.NULL, err), err)
        return ffi.unpack(piece[0], length[0])

    def score(self, token: int) -> float:
        err = new_error()
        score = ffi.new("float *")
        raise_for(lib.llama2_tokenizer_piece(self._ptr, check_int("token", token), ffi.NULL, ffi.NULL, score, err), err)
        return score[0]

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        if len(data) > INT_MAX - 3:
            raise InvalidArgumentError(f"text of {len(data)} bytes is too long to encode")
        tokens = ffi.new("int[]", len(data) + 3)
        n = ffi.new("int *")
        err = new_error()
        raise_for(lib.llama2_encode(self._ptr, data, len(data), int(bool(bos)), int(bool(eos)), tokens, n, err), err)
        return list(ffi.unpack(tokens, n[0]))

    def token_bytes(self, prev: int, token: int) -> bytes:
        """The bytes token adds to a text whose previous token is prev: what
        `run` prints for it (BOS and EOS add nothing; after BOS the leading
        space goes; <0xNN> pieces are that byte)."""
        if token in (BOS, EOS):
            return b""
        piece = ffi.new("const char **")
        length = ffi.new("int *")
        err = new_error()
        raise_for(lib.llama2_decode(self._ptr, check_int("prev", prev), check_int("token", token), piece, length,
                                    err), err)
        return ffi.unpack(piece[0], length[0])

    def decode_bytes(self, ids) -> bytes:
        """Concatenated bytes of the pieces; BOS/EOS print nothing, and the
        leading space of the first piece is dropped (as SentencePiece does)."""
        out = bytearray()
        prev = BOS
        piece = ffi.new("const char **")
        length = ffi.new("int *")
        err = new_error()
        vocab = self.vocab_size
        for token in ids:
            token = check_int("token", token)
            if not 0 <= token < vocab:
                raise InvalidArgumentError(f"token {token} out of range [0, {vocab})")
            if token in (BOS, EOS):
                prev = token
                continue
            raise_for(lib.llama2_decode(self._ptr, prev, token, piece, length, err), err)
            out += ffi.unpack(piece[0], length[0])
            prev = token
        return bytes(out)

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")
