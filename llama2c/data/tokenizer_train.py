"""Training a SentencePiece BPE tokenizer with llama2.c's recipe.

The settings are those of llama2.c's ``train_vocab`` (BPE, byte fallback, split
digits, whitespace-only pieces allowed, identity normalization, full character
coverage) together with Meta's Llama 2 choices that the recipe leaves implicit:
ids 0/1/2 = <unk>/<s>/</s>, no pad token, a dummy prefix, and no whitespace
collapsing (so SentencePiece encodes exactly as the C tokenizer does).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence, Union

from ..outputs import commit, refuse_existing
from .stories import PathLike, expand_inputs, iter_file_stories, write_corpus

# llama2.c passes this raw string (backslash escapes included) as unk_surface
UNK_SURFACE = r" \342\201\207 "
DEFAULT_INPUT_SENTENCE_SIZE = 10_000_000
DEFAULT_MAX_SENTENCE_LENGTH = 1 << 16


def trainer_settings(vocab_size: int, num_threads: Optional[int] = None,
                     input_sentence_size: int = DEFAULT_INPUT_SENTENCE_SIZE,
                     max_sentence_length: int = DEFAULT_MAX_SENTENCE_LENGTH,
                     remove_extra_whitespaces: bool = False) -> dict:
    """The SentencePieceTrainer keyword arguments (without input / model_prefix)."""
    return dict(
        model_type="bpe",
        vocab_size=int(vocab_size),
        input_format="text",
        character_coverage=1.0,
        num_threads=int(num_threads or os.cpu_count() or 1),
        split_digits=True,
        allow_whitespace_only_pieces=True,
        byte_fallback=True,
        unk_surface=UNK_SURFACE,
        normalization_rule_name="identity",
        remove_extra_whitespaces=bool(remove_extra_whitespaces),
        add_dummy_prefix=True,
        pad_id=-1,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        max_sentence_length=int(max_sentence_length),
        input_sentence_size=int(input_sentence_size),
        shuffle_input_sentence=True,
    )


def train_tokenizer(inputs: Union[PathLike, Sequence[PathLike]], vocab_size: int,
                    out_model_path: PathLike, *, num_threads: Optional[int] = None,
                    input_sentence_size: int = DEFAULT_INPUT_SENTENCE_SIZE,
                    max_sentence_length: int = DEFAULT_MAX_SENTENCE_LENGTH,
                    remove_extra_whitespaces: bool = False, verbose: bool = False,
                    force: bool = False, text_field: Optional[str] = None,
                    split: Optional[str] = None) -> Path:
    """Train a BPE tokenizer of ``vocab_size`` pieces on the stories of ``inputs``
    (text, JSON, JSONL or Parquet files, Hugging Face datasets: see
    llama2c.data.stories, also for ``text_field`` and ``split``) and write it to
    ``out_model_path`` (plus the human-readable ``.vocab`` next to it).
    An existing ``out_model_path`` is replaced only with ``force=True`` (else
    FileExistsError, before any training). Returns the model path."""
    import sentencepiece as spm

    vocab_size = int(vocab_size)
    if vocab_size < 260:
        raise ValueError(f"vocab_size {vocab_size} is too small: byte fallback alone needs "
                         "259 pieces (<unk>, <s>, </s> and 256 bytes); use at least 260")
    out = Path(out_model_path)
    refuse_existing(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    files = expand_inputs(inputs)
    with tempfile.TemporaryDirectory(prefix="llama2c-spm-", dir=out.parent) as tmp:
        corpus = Path(tmp) / "corpus.txt"
        n = 0
        with open(corpus, "w", encoding="utf-8", newline="\n") as f:
            for path in files:
                n += write_corpus(iter_file_stories(path, text_field, split), f)
        if n == 0:
            raise ValueError("the inputs hold no text to train a tokenizer on")
        prefix = Path(tmp) / "tok"
        kwargs = trainer_settings(vocab_size, num_threads, input_sentence_size,
                                  max_sentence_length, remove_extra_whitespaces)
        try:
            spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(prefix),
                                           minloglevel=0 if verbose else 2, **kwargs)
        except RuntimeError as e:
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
            raise ValueError(f"SentencePiece could not train a {vocab_size}-piece tokenizer on "
                             f"this text: {msg}") from None
        commit(prefix.with_suffix(".model"), out, overwrite=force)
        vocab_out = out.with_suffix(".vocab") if out.suffix == ".model" else Path(str(out) + ".vocab")
        os.replace(prefix.with_suffix(".vocab"), vocab_out)
    return out
