"""The old home of the GGUF writer, kept so that `llama2c.gguf_export` and
`python -m llama2c.gguf_export MODEL OUT [--type T] [--vocab V] [--force]` keep
working. The code lives in llama2c/export/: gguf.py (the writer), binmodel.py
(reading .bin files) and vocab.py (vocabularies); `llama2c export OUT.gguf
--version gguf --bin IN.bin` is the command line (docs/EXPORT.md)."""
from __future__ import annotations

from .export.binmodel import BinModel, read_model
from .export.binfmt import HEADER_BYTES, MAGIC
from .export.gguf import (FTYPES, GGUF_LAYER_NAMES, Q8_0_BLOCK, dequantize_q8_0, export_gguf,
                          gguf_tensor_names, permute_hf_to_meta, permute_meta_to_hf, quantize_q8_0)
from .export.vocab import (SPIECE_SPACE, TT_BYTE, TT_CONTROL, TT_NORMAL, TT_UNKNOWN, TT_UNUSED,
                           TT_USER_DEFINED, Vocab, load_vocab, sentencepiece_vocab, synthetic_pieces,
                           synthetic_vocab, tokenizer_bin_vocab, write_tokenizer_bin)

__all__ = ["BinModel", "FTYPES", "GGUF_LAYER_NAMES", "HEADER_BYTES", "MAGIC", "Q8_0_BLOCK", "SPIECE_SPACE",
           "TT_BYTE", "TT_CONTROL", "TT_NORMAL", "TT_UNKNOWN", "TT_UNUSED", "TT_USER_DEFINED", "Vocab",
           "dequantize_q8_0", "export_gguf", "gguf_tensor_names", "load_vocab", "main",
           "permute_hf_to_meta", "permute_meta_to_hf", "quantize_q8_0", "read_model",
           "sentencepiece_vocab", "synthetic_pieces", "synthetic_vocab", "tokenizer_bin_vocab",
           "write_tokenizer_bin"]


def main(argv: list[str] | None = None) -> int:
    """The old command line, run as `llama2c export OUT --version gguf --bin MODEL ...`."""
    import argparse

    from .export.cli import main as export_main

    p = argparse.ArgumentParser(prog="python -m llama2c.gguf_export",
                                description="Export a llama2c .bin model to GGUF (llama.cpp); "
                                            "the same as `llama2c export OUT --version gguf --bin MODEL`.")
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--type", default="f32", choices=FTYPES, help="matrix type (default f32)")
    p.add_argument("--vocab", default=None,
                   help="tokenizer.model, tokenizer.bin or 'synthetic' (default: tokenizer.bin "
                        "beside the model, else synthetic)")
    p.add_argument("--force", "-f", action="store_true", help="replace an existing OUT")
    args = p.parse_args(argv)
    return export_main([args.out, "--version", "gguf", "--bin", args.model, "--gguf-type", args.type]
                       + (["--tokenizer", args.vocab] if args.vocab is not None else [])
                       + (["--force"] if args.force else []))


if __name__ == "__main__":
    raise SystemExit(main())
