"""`llama2c bench`: decode and prompt-processing speed, ours against llama.cpp.

    llama2c bench --shape stories15M,stories42M --threads 1,2
    llama2c bench model.bin other.bin --threads 2 --json
    python -m llama2c.bench --shape tinyllama --quant int8 --reps 3

For every model file (or random-weight model of a standard shape, written once
to a cache directory) and thread count it measures, as medians over
interleaved repetitions (ours, llama.cpp, ours, llama.cpp, ...; the order
flips every pair):

  decode   tokens/s of greedy generation after a BOS, timed from the end of
           the first step, as `run` reports `achieved tok/s` (our side runs the
           same C session loop as `run`, one llama2_session_step per token;
           --engine run calls the ./run program itself and parses its line);
  prefill  tokens/s over a P-token prompt at position 0, through
           llama2_forward_batch when the library has it, else one token at a
           time (what the engine does then).

The reference is llama.cpp through llama-cpp-python when it can be imported,
on the same weights exported to GGUF (llama2c/export/gguf.py): fp32 files run
as F32, int8 (version 2) files as Q8_0 and bf16 (version 4) files as F16
(--ref-type forces one type). Without it the reference columns read "n/a".
Results print as a Markdown table (--json: JSON with every sample);
--update-doc FILE rewrites the table between the `<!-- bench:begin -->` and
`<!-- bench:end -->` markers of FILE. Never imports torch.

One job per module:

  cli.py        the command line (flags, the loop over models and threads)
  weights.py    the standard shapes and their random-weight .bin files
  specs.py      which models a run measures; the cached files and GGUF copies
  prompts.py    BOS and the prefill prompt both engines are fed
  ours.py       our engine: libllama2 (and the ./run program for --engine run)
  reference.py  llama.cpp through llama-cpp-python
  measure.py    one row: warm-up, interleaved repetitions, idle waits
  results.py    Row: the samples, their medians and ratios
  machine.py    CPU, load average and git commit recorded with the table
  report.py     the Markdown table and the docs/BENCHMARKS.md block

The names below stay importable from `llama2c.bench` as they were when this
was one module.
"""
from __future__ import annotations

from ..export.binfmt import HEADER_BYTES, MAGIC
from .cli import build_parser, main
from .machine import cpu_info
from .measure import BIG_MODEL_PARAMS, measure, settle
from .ours import Ours, RunProgram
from .prompts import BOS, prompt_tokens
from .reference import LlamaCpp, llama_cpp_status
from .report import DOC_BEGIN, DOC_END, TYPE_NAMES, fmt, fmt_ratio, machine_line, markdown, update_doc
from .results import Row
from .specs import ModelSpec, default_cache_dir, file_model, gguf_for, shape_models
from .weights import QUANTS, SHAPE_LABELS, SHAPES, write_int8_from_fp32, write_random_fp32

__all__ = [
    "BIG_MODEL_PARAMS", "BOS", "DOC_BEGIN", "DOC_END", "HEADER_BYTES", "LlamaCpp", "MAGIC", "ModelSpec", "Ours",
    "QUANTS", "Row", "RunProgram", "SHAPES", "SHAPE_LABELS", "TYPE_NAMES", "build_parser", "cpu_info",
    "default_cache_dir", "file_model", "fmt", "fmt_ratio", "gguf_for", "llama_cpp_status",
    "machine_line", "main", "markdown", "measure", "prompt_tokens", "settle", "shape_models",
    "update_doc", "write_int8_from_fp32", "write_random_fp32",
]
