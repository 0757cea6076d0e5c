"""Command line of the data tools (called by `llama2c tokenizer ...` / `llama2c data ...`,
or `python -m llama2c.data ...`):

  tokenizer train INPUT... --vocab-size N -o tok.model [--force] [--text-field F] [--split S]
  tokenizer export tok.model [-o tok.bin] [--force]
  data prepare INPUT... --tokenizer tok.model -o DIR [--val-fraction F] [--workers N]
               [--text-field F] [--split S]

INPUT: .txt, .json, .jsonl or .parquet files, directories of them, a folder saved
by Hugging Face datasets, or hf:NAME (datasets.load_dataset; may download).
  data tinystories download [--data-dir data] [--url URL]
  data tinystories train_vocab --vocab-size N [--data-dir data]
  data tinystories pretokenize [--vocab-size N] [--tokenizer tok.model] [--data-dir data]

An existing tokenizer file is replaced only with --force; `data prepare` builds the
new shards beside DIR and swaps them in only when they are complete. Flags are
kebab-case; underscores (--vocab_size) and `data prepare -t` (now -z, as
everywhere else) still work, hidden (llama2c/cliargs.py, docs/CLI.md).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

from ..cliargs import Parser


def _export_tokenizer():
    try:
        from llama2c.export.tokenizer_bin import export_tokenizer
    except ImportError:
        return None
    return export_tokenizer


def cmd_tokenizer_train(a) -> int:
    from .tokenizer_train import train_tokenizer

    out = train_tokenizer(a.inputs, a.vocab_size, a.output, num_threads=a.threads,
                          input_sentence_size=a.max_sentences,
                          remove_extra_whitespaces=a.remove_extra_whitespaces, verbose=a.verbose,
                          force=a.force, text_field=a.text_field, split=a.split)
    print(f"wrote {out} ({a.vocab_size} pieces)", file=sys.stderr)
    return 0


def cmd_tokenizer_export(a) -> int:
    export = _export_tokenizer()
    if export is None:
        raise ValueError("tokenizer export is not available in this installation "
                         "(llama2c.export.tokenizer_bin is missing)")
    out = a.output or str(Path(a.model).with_suffix(".bin"))
    export(a.model, out, force=a.force)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def cmd_prepare(a) -> int:
    from .shards import prepare

    meta = prepare(a.inputs, a.tokenizer, a.output, val_fraction=a.val_fraction, workers=a.workers,
                   shard_tokens=a.shard_tokens, progress=not a.quiet, text_field=a.text_field,
                   split=a.split)
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    print(f"{a.output}: train {tr['stories']:,} stories / {tr['tokens']:,} tokens, "
          f"val {va['stories']:,} stories / {va['tokens']:,} tokens, vocab {meta['vocab_size']}",
          file=sys.stderr)
    return 0


def cmd_ts_download(a) -> int:
    from .tinystories import download

    target = download(a.data_dir, a.url, progress=not a.quiet)
    print(f"TinyStories in {target}", file=sys.stderr)
    return 0


def cmd_ts_train_vocab(a) -> int:
    from .tinystories import train_vocab

    out = train_vocab(a.data_dir, a.vocab_size, num_shards=a.num_shards, num_threads=a.threads)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def cmd_ts_pretokenize(a) -> int:
    from .tinystories import pretokenize

    out = pretokenize(a.data_dir, a.vocab_size, tokenizer=a.tokenizer, out_dir=a.output,
                      workers=a.workers, val_fraction=a.val_fraction, progress=not a.quiet)
    print(f"tokens in {out} (train with: llama2c train --data {out})", file=sys.stderr)
    return 0


INPUT_HELP = (".txt, .json, .jsonl or .parquet files, directories of them, a folder saved by "
              "Hugging Face datasets, or hf:NAME (needs datasets; may download)")


def input_options(p) -> None:
    p.add_argument("--text-field", default=None, metavar="NAME",
                   help="the field (JSON, JSONL) or column (Parquet, datasets) holding the text "
                        "(default: \"story\" or \"text\"; for columns also the only string column)")
    p.add_argument("--split", default=None, metavar="NAME",
                   help="the split of a Hugging Face dataset (default train)")


def build_parser(prog: str = "llama2c") -> Parser:
    p = Parser(prog=prog, description="Tokenizer and data tools.")
    top = p.add_subparsers(dest="group", metavar="{tokenizer,data}")
    top.required = True

    tok = top.add_parser("tokenizer", help="train or export a SentencePiece tokenizer")
    tsub = tok.add_subparsers(dest="action", metavar="{train,export}")
    tsub.required = True
    t = tsub.add_parser("train", help="train a BPE tokenizer with llama2.c's settings")
    t.add_argument("inputs", nargs="+", metavar="INPUT", help=INPUT_HELP)
    t.add_argument("--vocab-size", type=int, required=True, metavar="N", help="number of pieces")
    t.add_argument("-o", "--output", required=True, help="output model, e.g. tok512.model")
    t.add_argument("--threads", type=int, default=None, metavar="N",
                   help="trainer threads (default: all cores)")
    t.add_argument("--max-sentences", type=int, default=10_000_000, metavar="N",
                   help="sample at most this many lines (default 10M)")
    t.add_argument("--remove-extra-whitespaces", action="store_true",
                   help="collapse runs of spaces (SentencePiece's default, which llama2.c's "
                        "train_vocab left on); off by default so encoding matches the C tokenizer")
    t.add_argument("-v", "--verbose", action="store_true", help="show SentencePiece's log")
    t.add_argument("-f", "--force", action="store_true", help="replace an existing output model")
    input_options(t)
    t.set_defaults(func=cmd_tokenizer_train)
    e = tsub.add_parser("export", help="write a tokenizer.bin for ./run")
    e.add_argument("model", help="SentencePiece .model")
    e.add_argument("-o", "--output", default=None, help="output .bin (default: MODEL with .bin)")
    e.add_argument("-f", "--force", action="store_true", help="replace an existing output")
    e.set_defaults(func=cmd_tokenizer_export)

    data = top.add_parser("data", help="prepare training data")
    dsub = data.add_subparsers(dest="action", metavar="{prepare,tinystories}")
    dsub.required = True
    d = dsub.add_parser("prepare", help="stories -> uint16 token shards with a train/val split")
    d.add_argument("inputs", nargs="+", metavar="INPUT", help=INPUT_HELP)
    d.add_argument("--tokenizer", "-z", required=True, help="SentencePiece .model")
    d.alias("-z", "-t")  # its old short flag (-t is the temperature in generate and chat)
    d.add_argument("-o", "--output", required=True, help="output directory")
    d.add_argument("--val-fraction", type=float, default=0.05, metavar="F",
                   help="fraction of stories for validation (default 0.05)")
    d.add_argument("--workers", "-j", type=int, default=None, metavar="N",
                   help="processes (default: all cores)")
    d.add_argument("--shard-tokens", type=int, default=1 << 27, metavar="N", help="tokens per shard file")
    d.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    input_options(d)
    d.set_defaults(func=cmd_prepare)

    ts = dsub.add_parser("tinystories", help="llama2.c's TinyStories pipeline")
    tssub = ts.add_subparsers(dest="step", metavar="{download,train_vocab,pretokenize}")
    tssub.required = True

    def common(sp):
        sp.add_argument("--data-dir", default="data", metavar="DIR", help="working directory (default data)")
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    from .tinystories import DEFAULT_HF_URL

    s1 = tssub.add_parser("download", help="download and extract the archive (resumable)")
    common(s1)
    s1.add_argument("--url", default=DEFAULT_HF_URL, help="archive URL (default: Hugging Face)")
    s1.set_defaults(func=cmd_ts_download)
    s2 = tssub.add_parser("train_vocab", help="train data_dir/tok{N}.model")
    common(s2)
    s2.add_argument("--vocab-size", type=int, required=True, metavar="N", help="number of pieces")
    s2.add_argument("--num-shards", type=int, default=10, metavar="N",
                    help="shards to train on (default 10)")
    s2.add_argument("--threads", type=int, default=None, metavar="N",
                    help="trainer threads (default: all cores)")
    s2.set_defaults(func=cmd_ts_train_vocab)
    s3 = tssub.add_parser("pretokenize", help="tokenize all shards into data_dir/tok{N}")
    common(s3)
    s3.add_argument("--vocab-size", type=int, default=0, metavar="N",
                    help="use data_dir/tok{N}.model (0: give --tokenizer)")
    s3.add_argument("--tokenizer", "-z", default=None, help="SentencePiece .model to use instead")
    s3.add_argument("-o", "--output", default=None, help="output directory (default data_dir/tok{N})")
    s3.add_argument("--workers", "-j", type=int, default=None, metavar="N",
                    help="processes (default: all cores)")
    s3.add_argument("--val-fraction", type=float, default=0.05, metavar="F",
                    help="fraction of stories for validation (default 0.05)")
    s3.set_defaults(func=cmd_ts_pretokenize)
    return p


def main(argv: Optional[List[str]] = None, prog: str = "llama2c") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        return args.func(args)
    except (OSError, ValueError, RuntimeError) as e:
        msg = str(e)
        if isinstance(e, OSError) and e.filename and e.strerror:
            msg = f"{e.filename}: {e.strerror}"
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
