"""`llama2c bench` (and `python -m llama2c.bench`): the command line. Parses
the flags, collects the models (bench/specs.py), measures every model x
thread count (bench/measure.py), and prints or writes the report
(bench/report.py), rewritten after every row so that a run that dies keeps
what it measured."""
from __future__ import annotations

import datetime as _dt
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from ..cliargs import Parser
from .machine import cpu_info, git_commit, loadavg
from .measure import BIG_MODEL_PARAMS, measure
from .reference import llama_cpp_status
from .report import DOC_BEGIN, DOC_END, machine_line, markdown, update_doc
from .results import Row
from .specs import ModelSpec, default_cache_dir, file_model, shape_models
from .weights import QUANTS, SHAPE_LABELS, SHAPES


def _csv(kind):
    def parse(s):
        return [kind(x) for x in s.split(",") if x.strip()]
    return parse


def build_parser() -> Parser:
    """The flags of `llama2c bench` (and `python -m llama2c.bench`); underscore
    spellings (--decode_tokens) parse as hidden aliases."""
    p = Parser(prog="llama2c bench", description="Decode and prompt-processing tokens/s, ours vs llama.cpp.")
    p.add_argument("models", nargs="*", help="model .bin files (fp32 versions 0/1/3, int8 version 2, bf16 version 4, q4_0 version 5)")
    p.add_argument("--shape", type=_csv(str), default=[], action="extend", metavar="NAMES",
                   help=f"random-weight models of these shapes: {', '.join(SHAPES)} (comma list)")
    p.add_argument("--quant", type=_csv(str), default=None, metavar="TYPES",
                   help="weight types for --shape: fp32,int8,bf16,q4_0 (default all four)")
    p.add_argument("--threads", type=_csv(int), default=[1, 2], metavar="LIST",
                   help="thread counts (default 1,2)")
    p.add_argument("--tokenizer", "-z", default=None, help="tokenizer.bin for the model files "
                   "(default: beside each model)")
    p.add_argument("--decode-tokens", "-n", type=int, default=128, metavar="N",
                   help="tokens decoded after BOS (default 128)")
    p.add_argument("--big-decode-tokens", type=int, default=None, metavar="N",
                   help=f"tokens decoded for models over {BIG_MODEL_PARAMS // 10**6}M parameters "
                        "(default: --decode-tokens)")
    p.add_argument("--prompt-tokens", "-P", type=int, default=128, metavar="N",
                   help="prompt length for prefill (default 128)")
    p.add_argument("--reps", type=int, default=5, metavar="N", help="interleaved repetitions (default 5)")
    p.add_argument("--no-prefill", action="store_true", help="measure decode only")
    p.add_argument("--no-reference", action="store_true", help="do not run llama.cpp")
    p.add_argument("--ref-type", choices=("f32", "f16", "q8_0", "q4_0"), default=None,
                   help="GGUF type for llama.cpp (default: f32 for fp32 files, q8_0 for int8, f16 for bf16, "
                        "q4_0 for q4_0)")
    p.add_argument("--engine", choices=("python", "run"), default="python",
                   help="our decode through the library (default) or the ./run program")
    p.add_argument("--run-bin", metavar="PATH",
                   default=os.fspath(Path(__file__).resolve().parents[2] / "run"),
                   help="the run program for --engine run")
    p.add_argument("--cache-dir", metavar="DIR", default=os.fspath(default_cache_dir()),
                   help="where random-weight models and GGUF copies are kept")
    p.add_argument("--json", action="store_true", help="print JSON instead of the Markdown table")
    p.add_argument("--json-out", default=None, metavar="FILE", help="also write the JSON to this file")
    p.add_argument("--update-doc", default=None, metavar="FILE",
                   help=f"rewrite the table between {DOC_BEGIN} and {DOC_END} in FILE")
    p.add_argument("--merge", default=None, metavar="JSON",
                   help="start from the rows of an earlier --json-out file; rows measured now "
                        "(same model, weights and threads) replace them")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress lines on stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    """`llama2c bench ...`: measure, print the table (or JSON), write --json-out
    and --update-doc after every row. Returns the exit status (2: usage)."""
    args = build_parser().parse_args(argv)
    log = (lambda *a, **k: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    if not args.models and not args.shape:
        print("llama2c bench: error: give model files or --shape NAME", file=sys.stderr)
        return 2
    if args.reps < 1 or args.decode_tokens < 1 or args.prompt_tokens < 2 or not args.threads \
            or min(args.threads) < 1:
        print("llama2c bench: error: --reps, --decode-tokens >= 1, --prompt-tokens >= 2, --threads >= 1",
              file=sys.stderr)
        return 2
    quants = args.quant or list(QUANTS)
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    try:
        specs: list[ModelSpec] = []
        for shape in args.shape:
            key = next((k for k in SHAPES if k.lower() == shape.lower()), shape)
            specs += shape_models(key, quants, cache, log=log)
        for m in args.models:
            specs.append(file_model(m, args.tokenizer))
    except (OSError, ValueError) as e:
        print(f"llama2c bench: error: {e}", file=sys.stderr)
        return 1

    ref_ok, ref_info = (False, "disabled (--no-reference)") if args.no_reference else llama_cpp_status()
    if not ref_ok:
        log(f"reference: {ref_info}")
    from .. import __version__

    meta = {"date": _dt.date.today().isoformat(), "cpu": cpu_info(), "llama2c": __version__,
            "commit": git_commit(), "llama_cpp_ok": ref_ok, "llama_cpp": ref_info, "reps": args.reps,
            "decode_tokens": args.decode_tokens, "prompt_tokens": args.prompt_tokens, "engine": args.engine,
            "no_reference": args.no_reference, "no_prefill": args.no_prefill}
    meta["load_before"] = loadavg()
    command = os.environ.get("LLAMA2C_BENCH_COMMAND") or \
        "llama2c bench " + " ".join(argv if argv is not None else sys.argv[1:])
    rows: list[Row] = []
    planned = [(spec.label, spec.quant, t) for spec in specs for t in args.threads]
    if args.merge:
        try:
            old = json.loads(Path(args.merge).read_text())
        except (OSError, ValueError) as e:
            print(f"llama2c bench: error: --merge {args.merge}: {e}", file=sys.stderr)
            return 1
        names = set(Row.__dataclass_fields__)
        for d in old.get("rows", []):
            r = Row(**{k: v for k, v in d.items() if k in names})
            if (r.model, r.weights, r.threads) not in planned:
                rows.append(r)
        meta["merged_from"] = old.get("meta")
        if old.get("meta", {}).get("date") and old["meta"]["date"] != meta["date"]:
            meta["date"] = f"{old['meta']['date']} to {meta['date']}"
    n_planned = len(rows) + len(planned)

    def report(final: bool):
        # written after every row, so a long run that dies keeps what it measured
        meta["load_after"] = loadavg()
        meta["complete"] = final
        order = list(SHAPE_LABELS.values())
        ordered = sorted(rows, key=lambda r: (order.index(r.model) if r.model in order else len(order),
                                              QUANTS.index(r.weights) if r.weights in QUANTS else 9))
        table = markdown(ordered, meta)
        data = {"meta": meta, "rows": [dict(asdict(r), median=r.summary()) for r in ordered]}
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(data, indent=1) + "\n")
        if args.update_doc:
            update_doc(Path(args.update_doc), table, meta, command)
        return table, data

    for spec in specs:
        for t in args.threads:
            rows.append(measure(spec, t, args, ref_ok, log))
            if len(rows) < n_planned:
                report(False)
    table, data = report(True)
    if args.json:
        print(json.dumps(data, indent=1))
    else:
        print(machine_line(meta) + "\n")
        print(table, end="")
    return 0
