"""A GGUF file's `gpt2` (byte-level BPE) vocabulary as a BPETokenizer
(hf_tokenizer.py), built the way llama.cpp reads it: tokenizer.ggml.tokens,
.merges ("a b", rank = position), .token_type (CONTROL tokens are special,
USER_DEFINED ones are matched in text too), .bos_token_id /
.eos_token_id / .eot_token_id / .eom_token_id, .add_bos_token, and the
pre-tokenizer named by tokenizer.ggml.pre:

  llama-bpe, llama3, llama-v3  Llama 3's split regex (and, as llama.cpp, whole
                               words found in the vocabulary are taken without
                               merging: ignore_merges; BOS added by default);
  gpt-2, gpt2                  GPT-2's regex;
  default (or none given)      llama.cpp's default sequence of regexes.

Any other pre-tokenizer is a FormatError naming it. The GGUF header is read
by the project's checked parser (export/gguf_source.py). docs/LLAMA3.md.
"""
from __future__ import annotations

import os

import numpy as np

from .errors import FormatError
from .hf_tokenizer import BPETokenizer, byte_decoder, require_tokenizers

__all__ = ["load_gguf_tokenizer", "PRE_TOKENIZERS"]

_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
           r"\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")

# tokenizer.ggml.pre -> (split regexes applied one after another, ignore_merges, add_bos default)
PRE_TOKENIZERS = {
    "llama-bpe": ((_LLAMA3,), True, True), "llama3": ((_LLAMA3,), True, True),
    "llama-v3": ((_LLAMA3,), True, True),
    "gpt-2": ((_GPT2,), False, False), "gpt2": ((_GPT2,), False, False),
    "default": (_DEFAULT, False, False),
}
# token types (llama.cpp's): 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte
CONTROL, USER_DEFINED = 3, 4


def _build(tokenizers, tokens: list[str], merges: list[tuple[str, str]], regexes, ignore_merges: bool):
    from tokenizers import Regex, decoders, models, pre_tokenizers

    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    try:
        model = models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges)
    except Exception as e:
        raise FormatError(f"the GGUF vocabulary and merges do not make a BPE model ({e})") from None
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _merge_pairs(merges, where: str) -> list[tuple[str, str]]:
    pairs = []
    for k, m in enumerate(merges):
        at = m.find(" ", 1) if isinstance(m, str) else -1  # as llama.cpp splits them
        if at < 0:
            raise FormatError(f"{where}: GGUF tokenizer.ggml.merges entry {k} ({m!r:.40}) is not two tokens "
                              "separated by a space")
        pairs.append((m[:at], m[at + 1:]))
    return pairs


def load_gguf_tokenizer(path: str | os.PathLike, vocab_size: int | None = None) -> BPETokenizer | None:
    """The BPETokenizer of a GGUF file whose tokenizer.ggml.model is "gpt2";
    None for any other kind (the C tokenizer reads SentencePiece ones)."""
    from .export.gguf_source import GGUFFile

    where = os.fspath(path)
    g = GGUFFile(path)
    try:
        f = g.fields
        if f.get("tokenizer.ggml.model") != "gpt2":
            return None
        pre = f.get("tokenizer.ggml.pre", "default")
        if not isinstance(pre, str) or pre not in PRE_TOKENIZERS:
            raise FormatError(f"{where}: GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported: llama2c "
                              f"reads {', '.join(PRE_TOKENIZERS)}")
        tokens = f.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, bytes) for t in tokens):
            raise FormatError(f"{where}: GGUF file has no vocabulary (tokenizer.ggml.tokens)")
        merges = f.get("tokenizer.ggml.merges")
        if not isinstance(merges, list):
            raise FormatError(f"{where}: GGUF gpt2 vocabulary without tokenizer.ggml.merges")
        types = f.get("tokenizer.ggml.token_type")
        if types is None:
            types = np.ones(len(tokens), np.int32)
        if not isinstance(types, np.ndarray) or len(types) != len(tokens):
            raise FormatError(f"{where}: GGUF tokenizer.ggml.token_type does not have one entry per token")

        def token_id(key: str):
            v = f.get(key)
            if isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= int(v) < len(tokens):
                return int(v)
            return None

        regexes, ignore_merges, add_bos = PRE_TOKENIZERS[pre]
        add = f.get("tokenizer.ggml.add_bos_token")
        if isinstance(add, (bool, np.bool_)):
            add_bos = bool(add)
        bos, eos = token_id("tokenizer.ggml.bos_token_id"), token_id("tokenizer.ggml.eos_token_id")
        stops = [i for i in (token_id("tokenizer.ggml.eot_token_id"), token_id("tokenizer.ggml.eom_token_id"))
                 if i is not None]
        template = f.get("tokenizer.chat_template")
        texts = [t.decode("utf-8", errors="replace") for t in tokens]
    finally:
        g.close()
    tokenizers = require_tokenizers()
    tok = _build(tokenizers, texts, _merge_pairs(merges, where), regexes, ignore_merges)
    from tokenizers import AddedToken

    for kind, add in ((CONTROL, tok.add_special_tokens), (USER_DEFINED, tok.add_tokens)):
        chosen = [AddedToken(texts[i], special=kind == CONTROL, normalized=False)
                  for i in range(len(texts)) if int(types[i]) == kind]
        if chosen:  # each keeps its id: its text is in the BPE vocabulary already
            add(chosen)
    # pieces straight from the vocabulary: byte-level text back to bytes, added tokens as their text
    dec = byte_decoder()
    pieces = [raw if int(types[i]) in (CONTROL, USER_DEFINED) or not all(c in dec for c in text)
              else bytes(dec[c] for c in text) for i, (raw, text) in enumerate(zip(tokens, texts))]
    return BPETokenizer(tok, bos_id=bos, eos_id=eos, stop_ids=stops, add_bos=add_bos,
                        chat_template=template if isinstance(template, str) else None, vocab_size=vocab_size,
                        byte_level=True, pieces=pieces, path=where)
