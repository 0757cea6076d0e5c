"""The `llama2c` command line: one entry point with subcommands.

  llama2c generate [PROMPT] [--model M] [--tokenizer T] [-n NEW_TOKENS] [--temperature ...]
  llama2c chat [--model M] [--system S] [--template T] [--stop TEXT] [-v]
  llama2c perplexity FILE [--model M] [--ctx N] [--stride N]
  llama2c serve [MODEL] [--host H] [--port P] [--n-ctx N] [--parallel N] [--api-key KEY]   (docs/SERVER.md)
  llama2c run MODEL [-t -p -s -n -i -z -m -y]     (llama2.c's flags)
  llama2c info MODEL
  llama2c quantize IN OUT --type q4_0|q8_0|bf16|fp32 [--force]
  llama2c train | finetune | export | tokenizer | data | bench ...   (see each one's --help)

Flags are kebab-case; the older spellings (--top_p, --topp, ...) are hidden
aliases (cliargs.py, docs/CLI.md). Short flags mean one thing in every
subcommand: -m model, -z tokenizer, -t temperature, -p top-p, -s seed, -n a
token count; `run` alone keeps llama2.c's own (its -m is the mode).
Errors print one line on stderr and exit with status 1 (no traceback).
"""
from __future__ import annotations

import argparse
import sys
import time

from .cliargs import Parser
from .errors import Llama2Error


def _open(model, **kw):
    """Llama(model, **kw) with its load notice (e.g. GGUF tensors dequantized
    at load) kept as llm.notice instead of a Python warning."""
    import warnings

    from .errors import ConversionWarning
    from .generate import Llama

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConversionWarning)
        return Llama(model, **kw)


def _load(model, tokenizer, n_threads=None, quantize=False, n_ctx=None):
    from .bundled import bundled_model

    if model is None:
        model, default_tok = bundled_model()
        tokenizer = tokenizer or default_tok
    llm = _open(model, tokenizer=tokenizer, n_threads=n_threads, quantize=quantize, n_ctx=n_ctx)
    if llm.notice:
        print(f"llama2c: note: {llm.notice}", file=sys.stderr)
    return llm


def _sampling(args):
    """The sampling flags as one SamplingParams (checked here, before loading)."""
    from .sampler import SamplingParams

    return SamplingParams(temperature=args.temperature, topp=args.top_p, seed=args.seed, top_k=args.top_k,
                          min_p=args.min_p, repetition_penalty=args.repeat_penalty,
                          logit_bias=[_bias_pair(b) for b in args.logit_bias or ()])


def _bias_pair(text: str) -> tuple[int, float]:
    """ID=BIAS (BIAS a number, or -inf to ban the token)."""
    token, sep, value = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return int(token), float(value)
    except ValueError:
        raise ValueError(f"--logit-bias takes TOKEN_ID=BIAS (got {text!r})") from None


def cmd_generate(args) -> int:
    sampling = _sampling(args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt  # `-`: the prompt comes from stdin
    llama = _load(args.model, args.tokenizer, args.threads, args.quantize, args.ctx)
    start, n = None, 0
    if args.max_tokens is not None:  # -n: new tokens (0: until the context is full)
        if args.max_tokens < 0:
            raise ValueError(f"-n/--max-tokens must be >= 0 (got {args.max_tokens})")
        length = {"max_tokens": args.max_tokens} if args.max_tokens else {"steps": 0}
    else:  # --steps: positions, prompt included, as run's -n
        length = {"steps": 256 if args.steps is None else args.steps}
    for piece in llama.stream(prompt, sampling=sampling, stop=args.stop, stop_at_eos=args.stop_at_eos, **length):
        sys.stdout.write(piece)
        sys.stdout.flush()
        n += 1
        if start is None:
            start = time.perf_counter()
    sys.stdout.write("\n")
    if start is not None and n > 1 and args.verbose:
        print(f"achieved tok/s: {(n - 1) / (time.perf_counter() - start):.1f}", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    sampling = _sampling(args)
    llama = _load(args.model, args.tokenizer, args.threads, args.quantize, args.ctx)
    session = llama.chat_session(system=args.system, template=args.template)
    extra = {"stop": list(args.stop)} if args.stop else {}
    while True:
        try:
            user = input("User: ")
        except EOFError:
            print()
            return 0
        sys.stdout.write("Assistant: ")
        start, n = None, 0
        for piece in session.stream(user, sampling=sampling, steps=args.max_tokens, **extra):
            sys.stdout.write(piece)
            sys.stdout.flush()
            n += 1
            if start is None:
                start = time.perf_counter()
        sys.stdout.write("\n")
        sys.stdout.flush()
        if args.verbose and start is not None and n > 1:
            print(f"achieved tok/s: {(n - 1) / (time.perf_counter() - start):.1f}", file=sys.stderr)
        if session.pos >= session.n_ctx:
            print("(the model's context is full)", file=sys.stderr)
            return 0


def cmd_perplexity(args) -> int:
    if args.file == "-":
        text = sys.stdin.read()
    else:
        with open(args.file, encoding="utf-8") as f:
            text = f.read()
    llama = _load(args.model, args.tokenizer, args.threads, args.quantize, args.ctx)
    start = time.perf_counter()

    def progress(done: int, total: int) -> None:
        spent = time.perf_counter() - start
        eta = spent / done * (total - done)
        print(f"\rwindow {done}/{total}  {spent:.1f} s, ETA {eta:.1f} s", end="", file=sys.stderr, flush=True)

    score = llama.score(text, window=args.ctx, stride=args.stride, progress=progress)
    print(file=sys.stderr)
    print(f"tokens scored: {score.n_scored} (window {args.ctx or llama.n_ctx}, "
          f"stride {args.stride or (args.ctx or llama.n_ctx) // 2})")
    print(f"mean NLL:      {score.nll:.6f} nats/token")
    print(f"perplexity:    {score.perplexity:.4f} +/- {score.perplexity_error:.4f}")
    return 0


def cmd_serve(args) -> int:
    from .server.main import serve

    return serve(args)


def cmd_run(args) -> int:
    from . import run_compat

    return run_compat.main(args.argv)


def cmd_info(args) -> int:
    if args.cpu:
        from .cpu import format_kernel_info

        print(format_kernel_info())
        if args.model is None:
            return 0
    if args.model is None:
        raise ValueError("info needs a MODEL (or --cpu)")
    llm = _open(args.model)
    c = llm.config
    kinds = {0: "version 0 (legacy llama2.c, fp32)", 1: "version 1 (fp32)", 2: "version 2 (int8 Q8_0)",
             3: "version 3 (fp32 + rope_theta/norm_eps)", 4: "version 4 (bf16 + rope_theta/norm_eps)",
             5: "version 5 (4-bit Q4_0 + rope_theta/norm_eps)",
             100: "GGUF (llama.cpp), run as"}
    print(f"file:        {args.model}")
    print(f"format:      {kinds.get(c.version, c.version)}" + (f" {c.weights}" if c.version == 100 else ""))
    if c.group_size:
        print(f"group size:  {c.group_size}")
    print(f"dims:        dim {c.dim}, hidden {c.hidden_dim}, layers {c.n_layers}, heads {c.n_heads}, "
          f"kv heads {c.n_kv_heads}, head size {c.head_size}")
    print(f"vocab:       {c.vocab_size} ({'shared' if c.shared_classifier else 'separate'} classifier)")
    print(f"seq_len:     {c.seq_len}")
    print(f"rope_theta:  {c.rope_theta:g}, norm_eps: {c.norm_eps:g}")
    if c.rope_scaling is not None:
        r = c.rope_scaling
        extra = (f", low_freq_factor {r.low_freq_factor:g}, high_freq_factor {r.high_freq_factor:g}, original "
                 f"context {r.original_max_position_embeddings}") if r.type == "llama3" else ""
        print(f"rope scaling: {r.type}, factor {r.factor:g}{extra}")
    elif c.rope_scaling_type == "factors":
        print("rope scaling: per-frequency factors (the GGUF file's rope_freqs)")
    print(f"parameters:  {c.n_params:,} ({c.n_params / 1e6:.2f} M)")
    print(f"file size:   {c.file_size:,} bytes ({c.file_size / 2**20:.2f} MiB)")
    if llm.notice:
        print(f"note:        {llm.notice}")
    return 0


# --type -> the .bin version it writes (the same as `llama2c export --version N`)
QUANTIZE_TYPES = {"q4_0": 5, "q8_0": 2, "bf16": 4, "fp32": 3}


def cmd_quantize(args) -> int:
    """A thin wrapper over the export writers: IN (a .bin of any version, a
    .gguf file or a Hugging Face folder) -> OUT as the .bin version of --type."""
    import os
    from pathlib import Path

    from .export.cli import _gguf_vocab_target
    from .export.sources import open_source
    from .export.writers import write_bin

    version = QUANTIZE_TYPES[args.type]
    src_path = Path(args.input)
    if src_path.is_dir():
        kind = "hf"
    else:
        with open(src_path, "rb") as f:
            kind = "gguf" if f.read(4) == b"GGUF" else "bin"
    if os.path.lexists(args.output) and src_path.exists() and os.path.samefile(args.input, args.output):
        raise ValueError(f"{args.output} is the input file; write the quantized model elsewhere")

    def warn(msg: str) -> None:
        print(f"llama2c quantize: warning: {msg}", file=sys.stderr)

    try:
        with open_source(kind, args.input) as src:
            vocab = None
            if kind == "gguf":  # its vocabulary as tokenizer.bin beside OUT, as `export --gguf` does
                vocab, same = _gguf_vocab_target(src, argparse.Namespace(out=args.output, version=str(version),
                                                                          force=args.force))
            out = write_bin(src, args.output, version, progress=not args.quiet, warn=warn, force=args.force)
            if vocab is not None and not same:
                src.write_tokenizer_bin(vocab, force=args.force)
    except ImportError as e:
        raise ValueError(f"{e} (pip install {e.name})" if e.name else str(e)) from None
    print(f"wrote {out} ({args.type}: version {version}, {out.stat().st_size:,} bytes)")
    return 0


def _version() -> str:
    from . import __version__
    from ._ffi import ffi, lib

    return f"llama2c {__version__} (libllama2 {ffi.string(lib.llama2_version()).decode()})"


def _export_versions() -> str:
    from .export.cli import VERSION_HELP

    return "\n".join(f"  {v:<5} {text}" for v, text in VERSION_HELP.items())


def build_parser() -> Parser:
    p = Parser(prog="llama2c", description="Llama 2 inference with a small fast C engine.",
               formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog="llama2c export --version V writes:\n" + _export_versions() + "\n\n"
                      "Flags are kebab-case (--top-p); their older spellings still work as hidden "
                      "aliases (docs/CLI.md).")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def sampling(sp):
        sp.add_argument("--model", "-m", default=None, help="model: .bin, .gguf or a Hugging Face folder (default: the bundled model)")
        sp.add_argument("--tokenizer", "-z", default=None,
                        help="tokenizer.bin or a BPE tokenizer.json (default: the model's own)")
        sp.add_argument("--temperature", "-t", type=float, default=1.0, metavar="TEMP",
                        help="0 = greedy (default 1.0)")
        sp.add_argument("--top-p", "-p", type=float, default=0.9, metavar="P",
                        help="nucleus threshold (default 0.9)")
        sp.alias("--top-p", "--topp")  # llama2.c's name
        sp.add_argument("--seed", "-s", type=int, default=None, metavar="N",
                        help="random seed (default: random)")
        sp.add_argument("--top-k", "-k", type=int, default=0, metavar="K",
                        help="keep the k most likely tokens (default off)")
        sp.add_argument("--min-p", type=float, default=0.0, metavar="P",
                        help="keep tokens with p >= P * p_max (default off)")
        sp.add_argument("--repeat-penalty", type=float, default=1.0, metavar="X",
                        help="penalize tokens seen in the last 64 (e.g. 1.1; default 1 = off)")
        sp.add_argument("--logit-bias", action="append", default=None, metavar="ID=BIAS",
                        help="add BIAS to token ID's logit (-inf bans it); repeatable")
        sp.add_argument("--threads", type=int, default=None, metavar="N",
                        help="threads (default: all cores, at most 256)")
        sp.add_argument("--ctx", "-c", type=int, default=None, metavar="N",
                        help="context length in tokens (default: the model's seq_len)")
        sp.add_argument("--quantize", action="store_true", help="run fp32 weights as int8 (Q8_0)")
        sp.add_argument("--stop", action="append", default=None, metavar="TEXT",
                        help="stop when the generated text contains TEXT (repeatable)")
        sp.add_argument("--verbose", "-v", action="store_true", help="report tokens/s on stderr")

    g = sub.add_parser("generate", help="generate text from a prompt")
    g.add_argument("prompt", nargs="?", default="", help="prompt text (- reads it from stdin)")
    sampling(g)
    g.add_argument("--max-tokens", "-n", type=int, default=None, metavar="N",
                   help="new tokens to generate, 0 = until the context is full")
    g.add_argument("--steps", type=int, default=None, metavar="N",
                   help="positions to run, prompt included, 0 = seq_len: run's -n (default 256)")
    g.add_argument("--stop-at-eos", action="store_true", help="stop at EOS (chat/instruct models)")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat (Llama 2 chat template)")
    sampling(c)
    c.add_argument("--system", "-y", default=None, help="system prompt")
    c.add_argument("--max-tokens", "-n", type=int, default=None, metavar="N",
                   help="at most N tokens per reply (default: until EOS or the context is full)")
    c.add_argument("--template", default=None, metavar="NAME|JINJA|FILE",
                   help="chat template: llama-2 (default), chatml, zephyr, a Jinja2 string, a .jinja file "
                        "or a tokenizer_config.json")
    c.set_defaults(func=cmd_chat)

    x = sub.add_parser("perplexity", help="perplexity of a text file under a model (sliding window)")
    x.add_argument("file", help="text file (UTF-8; - reads stdin)")
    x.add_argument("--model", "-m", default=None, help="model: .bin, .gguf or a Hugging Face folder (default: the bundled model)")
    x.add_argument("--tokenizer", "-z", default=None,
                   help="tokenizer.bin or a BPE tokenizer.json (default: the model's own)")
    x.add_argument("--ctx", "-c", type=int, default=None, metavar="N",
                   help="window in tokens (default: the model's seq_len)")
    x.add_argument("--stride", type=int, default=None, metavar="N",
                   help="tokens each window moves on (default: half the window)")
    x.add_argument("--threads", type=int, default=None, metavar="N", help="threads (default: all cores)")
    x.add_argument("--quantize", action="store_true", help="run fp32 weights as int8 (Q8_0)")
    x.set_defaults(func=cmd_perplexity)

    v = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (needs the server extra; docs/SERVER.md)")
    from .server.main import add_arguments as serve_arguments

    serve_arguments(v)
    v.set_defaults(func=cmd_serve)

    r = sub.add_parser("run", help="llama2.c's `run` flags: run MODEL [-t -p -s -n -i -z -m -y]",
                       add_help=False)
    r.add_argument("argv", nargs=argparse.REMAINDER)
    r.set_defaults(func=cmd_run)

    i = sub.add_parser("info", help="format, dimensions, parameters and size of a model file; --cpu: the "
                                    "kernel tier this CPU runs and why")
    i.add_argument("model", nargs="?", default=None, help="model file (.bin, .gguf) or Hugging Face folder")
    i.add_argument("--cpu", action="store_true", help="print the kernel tier in use and why")
    i.set_defaults(func=cmd_info)

    q = sub.add_parser("quantize", help="convert a model's weights to q4_0, q8_0, bf16 or fp32 (.bin "
                                        "version 5, 2, 4 or 3)")
    q.add_argument("input", metavar="IN", help="model: .bin (any version), .gguf or a Hugging Face folder")
    q.add_argument("output", metavar="OUT", help="the .bin file to write")
    q.add_argument("--type", required=True, choices=list(QUANTIZE_TYPES),
                   help="q4_0: 4-bit blocks of 32 (llama.cpp's Q4_0, version 5); q8_0: int8 groups "
                        "(version 2); bf16 (version 4); fp32 (version 3)")
    q.add_argument("--force", "-f", action="store_true", help="replace an existing OUT")
    q.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    q.set_defaults(func=cmd_quantize)

    # the tools with their own command lines (they import torch etc. only when used)
    from .export.cli import VERSIONS

    passthrough = [
        ("train", "train a model (llama2.c's train.py knobs as --key=value; torchrun for DDP/FSDP)",
         _run_train),
        ("finetune", "fine-tune a model (LoRA or --full) on JSONL chats / prompt-completion pairs or text",
         _run_finetune),
        ("export", f"convert models to --version {{{','.join(VERSIONS)}}}: .bin 0-5, a Hugging Face "
                   "folder or GGUF, from .bin, ckpt.pt, Meta or Hugging Face (see below)", _run_export),
        ("tokenizer", "train a SentencePiece tokenizer or export one to tokenizer.bin", _run_tokenizer),
        ("data", "prepare token shards; the TinyStories pipeline", _run_data),
        ("bench", "decode and prefill tokens/s, against llama.cpp when installed", _run_bench),
    ]
    for name, text, fn in passthrough:
        sp = sub.add_parser(name, help=text, add_help=False)
        sp.add_argument("argv", nargs=argparse.REMAINDER)
        sp.set_defaults(func=fn)
    return p


def _run_train(args) -> int:
    from .train import main as train_main

    return train_main(args.argv, prog="llama2c train")


def _run_finetune(args) -> int:
    from .finetune import main as finetune_main

    return finetune_main(args.argv, prog="llama2c finetune")


def _run_export(args) -> int:
    from .export import main as export_main

    return export_main(args.argv)


def _run_tokenizer(args) -> int:
    from .data.cli import main as data_main

    return data_main(["tokenizer", *args.argv], prog="llama2c")


def _run_data(args) -> int:
    from .data.cli import main as data_main

    return data_main(["data", *args.argv], prog="llama2c")


def _run_bench(args) -> int:
    from .bench import main as bench_main

    return bench_main(args.argv)


PASSTHROUGH = {"run": cmd_run, "train": _run_train, "finetune": _run_finetune, "export": _run_export, "tokenizer": _run_tokenizer,
               "data": _run_data, "bench": _run_bench}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASSTHROUGH:  # their own parsers see everything, --help included
        args = argparse.Namespace(argv=argv[1:], func=PASSTHROUGH[argv[0]])
    else:
        args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (Llama2Error, OSError, ValueError, OverflowError) as e:
        msg = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        print(f"llama2c: error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
