"""`llama2c export OUT --version {0,1,2,3,4,hf} (--checkpoint CKPT | --meta-llama DIR
| --hf DIR | --bin IN.bin) [--tokenizer tok.model] [--group-size N] [--max-seq-len N] [--force]`.

An existing OUT (or, for hf, a file the export would write into the folder) is
replaced only with --force. Errors print one line on stderr and return 1 (no traceback)."""
from __future__ import annotations

import argparse
import sys

VERSIONS = ["0", "1", "2", "3", "4", "hf"]


def build_parser(prog: str = "llama2c export") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Convert a model to a llama2c .bin file (versions 0-4) or a "
        "Hugging Face folder.")
    p.add_argument("out", metavar="OUT", help="output .bin file (or folder for --version hf)")
    p.add_argument("--version", required=True, choices=VERSIONS,
                   help="0: legacy llama2.c, 1: fp32, 2: int8 Q8_0, 3: fp32 + rope_theta/norm_eps, "
                        "4: bf16 (16-bit) + rope_theta/norm_eps, "
                        "hf: Hugging Face folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="CKPT", help="PyTorch training checkpoint (ckpt.pt)")
    src.add_argument("--meta-llama", metavar="DIR", help="Meta Llama 2 folder (params.json, consolidated.*.pth)")
    src.add_argument("--hf", metavar="DIR", help="Hugging Face Llama folder (config.json + weights)")
    src.add_argument("--bin", metavar="IN", help="llama2c/llama2.c model file (any version)")
    p.add_argument("--tokenizer", metavar="MODEL",
                   help="SentencePiece tokenizer.model to include (--version hf only)")
    p.add_argument("--group-size", type=int, default=None, metavar="N",
                   help="Q8_0 group size for --version 2 (default 64; halved until it divides dim)")
    p.add_argument("--max-seq-len", type=int, default=None, metavar="N",
                   help="override the context length stored in the output")
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

    if args.tokenizer is not None and args.version != "hf":
        return err("--tokenizer is for --version hf; write tokenizer.bin with "
                   "`llama2c tokenizer export tok.model -o tok.bin`")
    if args.group_size is not None and args.version != "2":
        return err("--group-size is for --version 2")
    if args.group_size is not None and args.group_size <= 0:
        return err(f"--group-size must be positive, got {args.group_size}")
    if args.max_seq_len is not None and args.max_seq_len <= 0:
        return err(f"--max-seq-len must be positive, got {args.max_seq_len}")
    kind, path = next((k, v) for k, v in (("checkpoint", args.checkpoint), ("meta", args.meta_llama),
                                          ("hf", args.hf), ("bin", args.bin)) if v is not None)

    def warn(msg: str) -> None:
        print(f"llama2c export: warning: {msg}", file=sys.stderr)

    try:
        from .sources import open_source
        from .writers import write_bin, write_hf

        with open_source(kind, path, max_seq_len=args.max_seq_len) as src:
            if args.version == "hf":
                out = write_hf(src, args.out, tokenizer=args.tokenizer, progress=not args.quiet,
                               force=args.force)
                print(f"wrote {out}/ (Hugging Face LlamaForCausalLM)")
            else:
                out = write_bin(src, args.out, int(args.version), group_size=args.group_size,
                                progress=not args.quiet, warn=warn, force=args.force)
                print(f"wrote {out} (version {args.version}, {out.stat().st_size:,} bytes)")
    except KeyboardInterrupt:
        return 130
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        return err(_message(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
