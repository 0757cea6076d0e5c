"""Model conversion: read .bin files (versions 0-5), training checkpoints,
Meta Llama 2 and Hugging Face checkpoints; write .bin versions 0-5,
Hugging Face folders and GGUF files (llama.cpp, from .bin files); export
SentencePiece tokenizers to tokenizer.bin.

    from llama2c.export import write_bin, write_hf, open_source, export_tokenizer, export_gguf
    with open_source("hf", "Llama-2-7b-hf") as src:
        write_bin(src, "llama2_7b.bin", version=3)
    export_gguf("llama2_7b.bin", "llama2_7b.gguf", "q8_0")   # needs the gguf package

Submodules import torch only where they need it; importing this package
imports nothing heavy (see docs/EXPORT.md).
"""
from __future__ import annotations

__all__ = ["main", "export_tokenizer", "write_bin", "write_hf", "export_gguf", "open_source", "BinSource",
           "CheckpointSource", "MetaSource", "HFSource", "ModelSource", "StateDictSource", "Source"]

_LAZY = {
    "export_tokenizer": "tokenizer_bin",
    "write_bin": "writers", "write_hf": "writers",
    "export_gguf": "gguf",
    "open_source": "sources", "BinSource": "sources", "CheckpointSource": "sources",
    "MetaSource": "sources", "HFSource": "sources", "ModelSource": "sources",
    "StateDictSource": "sources", "Source": "sources",
}


def main(argv=None) -> int:
    """`llama2c export ...` (see llama2c.export.cli)."""
    from .cli import main as _main

    return _main(argv)


def __getattr__(name):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'llama2c.export' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{mod}"), name)
