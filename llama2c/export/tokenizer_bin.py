"""SentencePiece tokenizer.model -> llama2.c tokenizer.bin (docs/TOKENIZER.md).

The output is byte-identical to llama2.c's export: for each id, the piece
with U+2581 replaced by ' ' (BOS written "\\n<s>\\n", EOS "\\n</s>\\n"),
its score as float32 and its UTF-8 length as int32; the header is the
longest piece in bytes. Needs sentencepiece, not torch.
"""
from __future__ import annotations

import struct
from pathlib import Path

__all__ = ["export_tokenizer", "tokenizer_pieces", "default_output"]


def default_output(model_path) -> Path:
    """tok.model -> tok.bin beside it."""
    return Path(model_path).with_suffix(".bin")


def tokenizer_pieces(model_path) -> tuple[list[bytes], list[float]]:
    """The pieces (as stored in tokenizer.bin) and scores of a SentencePiece model."""
    import sentencepiece as spm

    model_path = Path(model_path)
    if not model_path.is_file():
        raise FileNotFoundError(f"no such tokenizer model: {model_path}")
    sp = spm.SentencePieceProcessor()
    try:
        ok = sp.Load(str(model_path))
    except (OSError, RuntimeError) as e:
        raise ValueError(f"{model_path}: not a SentencePiece model ({e})") from None
    if not ok:
        raise ValueError(f"{model_path}: not a SentencePiece model")
    bos, eos = sp.bos_id(), sp.eos_id()
    pieces, scores = [], []
    for i in range(sp.vocab_size()):
        if i == bos:
            text = "\n<s>\n"
        elif i == eos:
            text = "\n</s>\n"
        else:
            text = sp.id_to_piece(i)
        pieces.append(text.replace("\u2581", " ").encode("utf-8"))
        scores.append(float(sp.get_score(i)))
    return pieces, scores


def export_tokenizer(model_path, out_path=None, *, force: bool = False) -> Path:
    """Writes the tokenizer.bin of a SentencePiece model (default: the model
    path with .bin) atomically; an existing output is replaced only with
    force=True (else FileExistsError). Returns the path written."""
    from ..outputs import atomic_write, refuse_existing

    out = Path(out_path) if out_path is not None else default_output(model_path)
    refuse_existing(out, force)
    pieces, scores = tokenizer_pieces(model_path)
    with atomic_write(out, overwrite=force) as f:
        f.write(struct.pack("<I", max(len(p) for p in pieces)))
        for p, s in zip(pieces, scores):
            f.write(struct.pack("<fi", s, len(p)))
            f.write(p)
    return out


def main(argv=None) -> int:
    """`llama2c tokenizer export tok.model [-o tok.bin] [--force]`: one-line errors, status 1."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="llama2c tokenizer export",
                                description="Write llama2.c's tokenizer.bin for a SentencePiece model.")
    p.add_argument("model", help="SentencePiece tokenizer.model")
    p.add_argument("-o", "--output", default=None, help="output (default: MODEL with .bin)")
    p.add_argument("-f", "--force", action="store_true", help="replace an existing output")
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        out = export_tokenizer(args.model, args.output, force=args.force)
    except (OSError, ValueError) as e:
        msg = f"{e.strerror}: {e.filename}" if isinstance(e, OSError) and e.strerror and e.filename \
            else str(e)
        print(f"llama2c tokenizer export: error: {msg}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0
