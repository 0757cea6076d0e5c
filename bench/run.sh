#!/usr/bin/env bash
# The standard benchmark: the four model shapes (random weights) x fp32/int8 x 1 and 2
# threads, ours against llama.cpp (when llama-cpp-python is installed), medians of
# interleaved pairs; rewrites the table in docs/BENCHMARKS.md.
#
#   bench/run.sh                        # everything (~20 min on 2 cores)
#   BENCH_SHAPES=stories15M,stories42M bench/run.sh
#   bench/run.sh --reps 3               # extra flags go to `llama2c bench`
#
# Environment: BENCH_SHAPES (comma list), BENCH_THREADS (default 1,2), BENCH_DOC
# (default docs/BENCHMARKS.md, "" to leave it alone), LLAMA2C_BENCH_CACHE (models and
# GGUF copies; default ~/.cache/llama2c/bench), LLAMA2C_LIBRARY (a libllama2 to use
# instead of the private build below).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
CACHE=${LLAMA2C_BENCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llama2c/bench}
SHAPES=${BENCH_SHAPES:-stories15M,stories42M,stories110M,tinyllama}
THREADS=${BENCH_THREADS:-1,2}
DOC=${BENCH_DOC-docs/BENCHMARKS.md}
mkdir -p "$CACHE"

# A private build of libllama2 with `make run`'s flags and sources (csrc/Makefile's `lib`
# target: -O3; threads come from the library's own pool), so that rebuilding the tree while
# the benchmark runs cannot pull the library from under it.
if [ -z "${LLAMA2C_LIBRARY:-}" ]; then
  echo "building $CACHE/libllama2.so" >&2
  rm -rf "$CACHE/lib.tmp" && mkdir -p "$CACHE/lib.tmp"
  make -s --no-print-directory -C csrc lib OUT="$CACHE/lib.tmp"
  mv "$CACHE/lib.tmp/libllama2.so" "$CACHE/libllama2.so"
  rmdir "$CACHE/lib.tmp"
  export LLAMA2C_LIBRARY="$CACHE/libllama2.so"
fi

args=(--shape "$SHAPES" --threads "$THREADS" --decode-tokens 128 --big-decode-tokens 32
      --prompt-tokens 128 --reps 5 --cache-dir "$CACHE" --json-out "$CACHE/last.json")
if [ -n "$DOC" ]; then
  args+=(--update-doc "$DOC")
fi
export LLAMA2C_BENCH_COMMAND="bench/run.sh${*:+ $*}"
exec "$PYTHON" -m llama2c.bench "${args[@]}" "$@"
