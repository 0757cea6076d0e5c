"""Byte-level BPE tokenizers (Llama 3 style) through the `tokenizers`
library: `BPETokenizer`, with the interface the package uses from
llama2c.tokenizer.Tokenizer (encode, decode, decode_bytes, token_bytes,
piece, vocab_size), plus the special ids (bos_id, eos_id, stop_ids), the
chat template and `tokenize_chat` (what ChatTemplate.tokenize calls).

Made from a Hugging Face tokenizer.json (`BPETokenizer.from_json`: the
files beside it, tokenizer_config.json, generation_config.json, config.json
and chat_template.jinja, give add_bos, the stop ids and the chat template)
or from a GGUF file's `gpt2` vocabulary (gguf_tokenizer.py). The C engine
only sees ids. Needs the `hf` extra (pip install "llama2c[hf]");
`import llama2c` does not import tokenizers. docs/LLAMA3.md.

Text: decode / token_bytes give each token's bytes (byte-level pieces
mapped back through GPT-2's byte alphabet), so a character split over two
tokens streams correctly; special (control) tokens add nothing, as
transformers' decode(skip_special_tokens=True); no
clean_up_tokenization_spaces (transformers 5 skips it for BPE too), so
streamed text is always exactly decode() of the same ids.
"""
from __future__ import annotations

import json
import os
import threading
from functools import lru_cache
from pathlib import Path

from .errors import FormatError, InvalidArgumentError
from .validate import check_int

__all__ = ["BPETokenizer", "require_tokenizers", "byte_decoder", "is_byte_level", "END_OF_TURN_TOKENS"]

# tokens that end generation when the vocabulary has them (Llama 3's, and common ones)
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>", "<|im_end|>", "<|endoftext|>")


def require_tokenizers():
    """The tokenizers module, or an ImportError saying how to get it."""
    try:
        import tokenizers
    except ImportError:
        raise ImportError('this model has a byte-level BPE tokenizer (tokenizer.json or a GGUF "gpt2" vocabulary), '
                          'which needs the tokenizers package: pip install "llama2c[hf]"', name="tokenizers") from None
    return tokenizers


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: printable bytes stand
    for themselves, the other 68 for U+0100 onwards in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


def is_byte_level(spec: dict) -> bool:
    """Whether a tokenizer.json's decoder (or pre-tokenizer) is ByteLevel."""
    def has(node) -> bool:
        if not isinstance(node, dict):
            return False
        if node.get("type") == "ByteLevel":
            return True
        return any(has(n) for key in ("decoders", "pretokenizers") for n in node.get(key) or ())
    return has(spec.get("decoder")) or has(spec.get("pre_tokenizer"))


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _token_text(value) -> str | None:
    """A tokenizer_config.json token entry: a str or {"content": str}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value) -> list[int]:
    """An eos_token_id of config.json: an int or a list of ints."""
    items = value if isinstance(value, list) else [value]
    return [int(v) for v in items if isinstance(v, int) and not isinstance(v, bool)]


class BPETokenizer:
    """A `tokenizers.Tokenizer` with llama2c's tokenizer interface. Use
    from_json or gguf_tokenizer.load_gguf_tokenizer; the constructor takes
    the parts already worked out."""

    kind = "bpe"

    def __init__(self, tok, *, bos_id: int | None, eos_id: int | None, stop_ids=(), add_bos: bool = True,
                 chat_template: str | None = None, vocab_size: int | None = None, byte_level: bool = True,
                 pieces: list[bytes] | None = None, path: str = ""):
        self._tok = tok
        self.path = path
        self.bos_id, self.eos_id = bos_id, eos_id
        self.add_bos = bool(add_bos) and bos_id is not None
        self.chat_template = chat_template
        self.byte_level = byte_level
        n = tok.get_vocab_size(with_added_tokens=True)
        self._vocab_size = max(n, vocab_size or 0)
        added = tok.get_added_tokens_decoder()
        self._added_ids = set(added)
        self._special = {i for i, t in added.items() if t.special}
        stops = [i for i in ([eos_id] + list(stop_ids)) if i is not None]
        for name in END_OF_TURN_TOKENS:
            i = tok.token_to_id(name)
            if i is not None and i in self._special:
                stops.append(i)
        self.stop_ids = tuple(dict.fromkeys(stops))  # in order, each once
        self._given_pieces = pieces
        self._table: list[bytes] | None = None
        self._lock = threading.Lock()  # encode_special_tokens is the tokenizer's state

    # ---- construction ----
    @classmethod
    def from_json(cls, path: str | os.PathLike, vocab_size: int | None = None) -> "BPETokenizer":
        """A tokenizer.json; its folder's tokenizer_config.json (bos / eos
        tokens, add_bos_token, chat_template), chat_template.jinja,
        generation_config.json and config.json (eos_token_id, int or list:
        every one stops generation) complete it."""
        tokenizers = require_tokenizers()
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
            spec = json.loads(text)
        except FileNotFoundError:
            raise
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise FormatError(f"{path}: not a tokenizer.json ({e})") from None
        try:
            tok = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # the library's own parse errors
            raise FormatError(f"{path}: the tokenizers library cannot read it ({e})") from None
        folder = path.parent
        tcfg = _read_json(folder / "tokenizer_config.json")
        gen, cfg = _read_json(folder / "generation_config.json"), _read_json(folder / "config.json")

        def token_id(name: str, *configs) -> int | None:
            text_ = _token_text(tcfg.get(f"{name}_token"))
            if text_ is not None and tok.token_to_id(text_) is not None:
                return tok.token_to_id(text_)
            for c in configs:
                found = _ids(c.get(f"{name}_token_id"))
                if found:
                    return found[0]
            return None

        bos = token_id("bos", gen, cfg)
        eos = token_id("eos", gen, cfg)
        if isinstance(tcfg.get("add_bos_token"), bool):
            add_bos = tcfg["add_bos_token"]
        else:  # what the post-processor adds, as transformers' encode does
            add_bos = bos is not None and tok.encode("", add_special_tokens=True).ids[:1] == [bos]
        template = tcfg.get("chat_template")
        if isinstance(template, list):  # named templates
            template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}.get("default")
        jinja = folder / "chat_template.jinja"  # transformers 5 saves it apart
        if not isinstance(template, str) and jinja.is_file():
            template = jinja.read_text(encoding="utf-8")
        stops = _ids(gen.get("eos_token_id")) + _ids(cfg.get("eos_token_id"))
        return cls(tok, bos_id=bos, eos_id=eos, stop_ids=stops, add_bos=add_bos,
                   chat_template=template if isinstance(template, str) else None, vocab_size=vocab_size,
                   byte_level=is_byte_level(spec), path=str(path))

    # ---- the interface of llama2c.tokenizer.Tokenizer ----
    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def bos_token(self) -> str:
        return self._content(self.bos_id, "<s>")

    @property
    def eos_token(self) -> str:
        return self._content(self.eos_id, "</s>")

    def _content(self, i: int | None, default: str) -> str:
        if i is None:
            return default
        return self._tok.id_to_token(i) or default

    def encode(self, text: str | bytes, bos: bool = True, eos: bool = False, special: bool = True) -> list[int]:
        """Token ids of text. bos: BOS in front when the tokenizer adds one
        (add_bos); eos: EOS at the end. special: text such as
        "<|eot_id|>" is that special token (transformers' behaviour);
        False: plain text (llama-cpp-python's special=False)."""
        if isinstance(text, (bytes, bytearray)):
            text = bytes(text).decode("utf-8", errors="replace")
        if not isinstance(text, str):
            raise InvalidArgumentError(f"text must be a str (got {type(text).__name__})")
        with self._lock:
            self._tok.encode_special_tokens = not special
            try:
                ids = self._tok.encode(text, add_special_tokens=False).ids
            finally:
                self._tok.encode_special_tokens = False
        if bos and self.add_bos:
            ids = [self.bos_id] + ids
        if eos and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids

    def _pieces(self) -> list[bytes]:
        """Every token's bytes: byte-level pieces mapped back to bytes,
        added tokens as their UTF-8 text, SentencePiece-style pieces with
        U+2581 as a space and <0xNN> as that byte."""
        if self._table is None:
            if self._given_pieces is not None:
                table = list(self._given_pieces)
            else:
                table = [self._piece_of(i) for i in range(self._tok.get_vocab_size(with_added_tokens=True))]
            table += [b""] * (self._vocab_size - len(table))
            self._table = table
        return self._table

    def _piece_of(self, i: int) -> bytes:
        s = self._tok.id_to_token(i)
        if s is None:
            return b""
        if i in self._added_ids:
            return s.encode("utf-8")
        if self.byte_level:
            dec = byte_decoder()
            if all(c in dec for c in s):
                return bytes(dec[c] for c in s)
            return s.encode("utf-8")
        if len(s) == 6 and s.startswith("<0x") and s.endswith(">"):
            try:
                return bytes([int(s[3:5], 16)])
            except ValueError:
                pass
        return s.replace("\u2581", " ").encode("utf-8")

    def piece(self, token: int) -> bytes:
        """The bytes of a token (a special token's text too)."""
        return self._pieces()[self._check(token)]

    def score(self, token: int) -> float:
        self._check(token)
        return 0.0

    def is_special(self, token: int) -> bool:
        return token in self._special

    def _check(self, token) -> int:
        token = check_int("token", token)
        if not 0 <= token < self._vocab_size:
            raise InvalidArgumentError(f"token {token} out of range [0, {self._vocab_size})")
        return token

    def token_bytes(self, prev: int, token: int) -> bytes:
        """The bytes token adds to a text (prev is not needed: byte-level
        pieces carry their own spaces); special tokens add nothing."""
        token = self._check(token)
        return b"" if token in self._special else self._pieces()[token]

    def decode_bytes(self, ids) -> bytes:
        table, special, out = self._pieces(), self._special, bytearray()
        for token in ids:
            token = self._check(token)
            if token not in special:
                out += table[token]
        return bytes(out)

    def decode(self, ids) -> str:
        if not self.byte_level:  # e.g. a SentencePiece-style tokenizer.json: its decoder drops the leading space
            ids = [self._check(t) for t in ids]
            return self._tok.decode([t for t in ids if t < self._tok.get_vocab_size(with_added_tokens=True)],
                                    skip_special_tokens=True)
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # ---- chat ----
    def tokenize_chat(self, template, messages, add_generation_prompt: bool = True) -> list[int]:
        """A conversation's ids as transformers' apply_chat_template gives
        them: rendered with this tokenizer's BOS / EOS text, then encoded
        with special tokens parsed and nothing added."""
        text = template.render(messages, add_generation_prompt, bos_token=self.bos_token, eos_token=self.eos_token)
        return self.encode(text, bos=False, eos=False, special=True)
