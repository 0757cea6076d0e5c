"""`llama2c export OUT --version {0,1,2,3,4,5,hf,gguf} (--checkpoint CKPT | --meta-llama DIR
| --hf DIR | --bin IN.bin | --gguf IN.gguf) [--tokenizer tok.model] [--group-size N] [--max-seq-len N]
[--gguf-type f32|f16|bf16|q8_0|q4_0] [--force]`.

--version gguf writes llama.cpp's format (export/gguf.py) from a --bin file.
--gguf reads one (export/gguf_source.py, any type the gguf package dequantizes)
and also writes its vocabulary as tokenizer.bin beside OUT (inside OUT for hf).

An existing OUT (or, for hf, a file the export would write into the folder) is
replaced only with --force. Errors print one line on stderr and return 1 (no traceback)."""
from __future__ import annotations

import sys

from ..cliargs import Parser

# what --version accepts (also listed by `llama2c --help`)
VERSION_HELP = {
    "0": "legacy llama2.c .bin (fp32)",
    "1": ".bin, fp32",
    "2": ".bin, int8 Q8_0 (--group-size)",
    "3": ".bin, fp32 + rope_theta/norm_eps",
    "4": ".bin, bf16 + rope_theta/norm_eps",
    "5": ".bin, 4-bit Q4_0 (llama.cpp's blocks) + rope_theta/norm_eps",
    "hf": "Hugging Face folder (LlamaForCausalLM)",
    "gguf": "llama.cpp's GGUF, from --bin (--gguf-type f32|f16|bf16|q8_0|q4_0)",
}
VERSIONS = list(VERSION_HELP)
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")  # export.gguf.FTYPES (not imported here: keeps --help light)


def build_parser(prog: str = "llama2c export") -> Parser:
    p = Parser(
        prog=prog, description="Convert a model to a llama2c .bin file (versions 0-5), a "
        "Hugging Face folder or a GGUF file (llama.cpp).")
    p.add_argument("out", metavar="OUT", help="output .bin file (folder for --version hf, .gguf file "
                   "for --version gguf)")
    p.add_argument("--version", required=True, choices=VERSIONS,
                   help="; ".join(f"{v}: {text}" for v, text in VERSION_HELP.items()))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="CKPT", help="PyTorch training checkpoint (ckpt.pt)")
    src.add_argument("--meta-llama", metavar="DIR", help="Meta Llama 2 folder (params.json, consolidated.*.pth)")
    src.add_argument("--hf", metavar="DIR", help="Hugging Face Llama folder (config.json + weights)")
    src.add_argument("--bin", metavar="IN", help="llama2c/llama2.c model file (any version)")
    src.add_argument("--gguf", metavar="IN", help="llama.cpp GGUF file (architecture llama, any tensor type "
                     "the gguf package dequantizes); also writes tokenizer.bin beside OUT")
    p.add_argument("--tokenizer", metavar="MODEL",
                   help="SentencePiece tokenizer.model to include (--version hf); for --version gguf "
                        "the vocabulary: tokenizer.model, tokenizer.bin or 'synthetic' (default: "
                        "tokenizer.bin beside the model, else synthetic)")
    p.add_argument("--group-size", type=int, default=None, metavar="N",
                   help="Q8_0 group size for --version 2 (default 64; halved until it divides dim)")
    p.add_argument("--max-seq-len", type=int, default=None, metavar="N",
                   help="override the context length stored in the output")
    p.add_argument("--gguf-type", choices=GGUF_TYPES, default=None,
                   help="matrix type for --version gguf (default f32; norms stay F32)")
    p.add_argument("--force", "-f", action="store_true",
                   help="replace an existing OUT (for hf: the files it writes in the folder)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    return p


def _message(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror and e.filename:
        return f"{e.strerror}: {e.filename}"
    if isinstance(e, KeyError):
        return f"missing {e.args[0]!r}"
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)

    def err(msg: str) -> int:
        print(f"llama2c export: error: {msg}", file=sys.stderr)
        return 1

    if args.tokenizer is not None and args.version not in ("hf", "gguf"):
        return err("--tokenizer is for --version hf or gguf; write tokenizer.bin with "
                   "`llama2c tokenizer export tok.model -o tok.bin`")
    if args.group_size is not None and args.version != "2":
        return err("--group-size is for --version 2")
    if args.group_size is not None and args.group_size <= 0:
        return err(f"--group-size must be positive, got {args.group_size}")
    if args.max_seq_len is not None and args.max_seq_len <= 0:
        return err(f"--max-seq-len must be positive, got {args.max_seq_len}")
    if args.gguf_type is not None and args.version != "gguf":
        return err("--gguf-type is for --version gguf")
    if args.version == "gguf":
        return _gguf(args, err)
    kind, path = next((k, v) for k, v in (("checkpoint", args.checkpoint), ("meta", args.meta_llama),
                                          ("hf", args.hf), ("bin", args.bin), ("gguf", args.gguf))
                      if v is not None)

    def warn(msg: str) -> None:
        print(f"llama2c export: warning: {msg}", file=sys.stderr)

    try:
        from .sources import open_source
        from .writers import write_bin, write_hf

        with open_source(kind, path, max_seq_len=args.max_seq_len) as src:
            vocab_out, vocab_same = _gguf_vocab_target(src, args) if kind == "gguf" else (None, False)
            if args.version == "hf":
                out = write_hf(src, args.out, tokenizer=args.tokenizer, progress=not args.quiet,
                               force=args.force)
                print(f"wrote {out}/ (Hugging Face LlamaForCausalLM)")
            else:
                out = write_bin(src, args.out, int(args.version), group_size=args.group_size,
                                progress=not args.quiet, warn=warn, force=args.force)
                print(f"wrote {out} (version {args.version}, {out.stat().st_size:,} bytes)")
            if kind == "gguf":
                if vocab_out is None:
                    warn(f"{path} holds no SentencePiece vocabulary (tokenizer.ggml.model 'llama'); "
                         "no tokenizer.bin written")
                elif vocab_same:
                    print(f"kept {vocab_out} (it holds the file's vocabulary)")
                else:
                    print(f"wrote {src.write_tokenizer_bin(vocab_out, force=args.force)} (its vocabulary)")
    except KeyboardInterrupt:
        return 130
    except ImportError as e:
        return err(str(e) if e.name == "gguf" else f"{e} (pip install {e.name})" if e.name else str(e))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        return err(_message(e))
    return 0


def _gguf_vocab_target(src, args):
    """Where --gguf writes the file's vocabulary: tokenizer.bin beside OUT
    (inside the folder for --version hf), and whether it already holds
    exactly that; (None, False) when the file has no SentencePiece
    vocabulary. An existing, different tokenizer.bin is refused before
    anything is written, unless --force."""
    from pathlib import Path

    from ..outputs import refuse_existing

    data = src.tokenizer_bin_bytes()
    if data is None:
        return None, False
    out = Path(args.out)
    target = (out if args.version == "hf" else out.parent) / "tokenizer.bin"
    same = target.is_file() and target.read_bytes() == data
    if not same:
        refuse_existing(target, args.force)
    return target, same


def _gguf(args, err) -> int:
    """--version gguf: a .bin file to GGUF (export/gguf.py)."""
    if args.bin is None:
        return err("--version gguf reads --bin files only; convert other sources to .bin first "
                   "(e.g. --version 3)")
    if args.max_seq_len is not None:
        return err("--max-seq-len is not supported with --version gguf")
    gguf_type = args.gguf_type or "f32"
    try:
        from .gguf import export_gguf

        out = export_gguf(args.bin, args.out, gguf_type, vocab=args.tokenizer, force=args.force)
    except KeyboardInterrupt:
        return 130
    except ImportError as e:
        if e.name == "gguf":
            return err(f"--version gguf needs the gguf package (pip install 'llama2c[gguf]'): {e}")
        return err(f"{e} (a tokenizer.model needs sentencepiece)" if e.name == "sentencepiece" else str(e))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        return err(_message(e))
    print(f"wrote {out} (GGUF {gguf_type.upper()}, {out.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
