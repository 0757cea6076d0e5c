"""Which tokenizer a Llama gets (`open_tokenizer`): the C tokenizer
(tokenizer.py: tokenizer.bin, or a GGUF file's SentencePiece vocabulary) or
a byte-level BPE one in Python (hf_tokenizer.py: a tokenizer.json, or a
GGUF file's "gpt2" vocabulary, gguf_tokenizer.py). docs/LLAMA3.md.
"""
from __future__ import annotations

import os
from pathlib import Path


def _is_gguf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def open_tokenizer(path, model_path: str, model_is_gguf: bool, vocab_size: int):
    """path: the tokenizer= given (None: the model's own). A .json file (or
    a folder holding tokenizer.json) is a BPETokenizer; a GGUF file with a
    "gpt2" vocabulary too; anything else the C tokenizer. With no path: a
    GGUF model's vocabulary, else tokenizer.bin beside the model (or, when
    there is none, a tokenizer.json there)."""
    from .tokenizer import Tokenizer

    if path is None:
        if model_is_gguf:
            path = model_path
        else:
            folder = Path(model_path).resolve().parent
            path = folder / "tokenizer.bin"
            if not path.exists() and (folder / "tokenizer.json").is_file():
                path = folder / "tokenizer.json"
            if not path.exists():
                raise FileNotFoundError(2, f"no tokenizer given and none beside the model ({path}); pass tokenizer=",
                                        os.fspath(path))
    path = os.fspath(path)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "tokenizer.json")):
        path = os.path.join(path, "tokenizer.json")
    if path.endswith(".json"):
        from .hf_tokenizer import BPETokenizer

        return BPETokenizer.from_json(path, vocab_size=vocab_size)
    if _is_gguf(path):
        from .gguf_tokenizer import load_gguf_tokenizer

        bpe = load_gguf_tokenizer(path, vocab_size=vocab_size)
        if bpe is not None:
            return bpe
    return Tokenizer(path, vocab_size=vocab_size)
