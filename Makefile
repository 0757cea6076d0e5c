# llama2c build. The C library and the programs are built by csrc/Makefile
# (llama2.c's targets, the list of sources); this Makefile runs it with the
# outputs at the repository root, where llama2.c has them: ./run, ./runq,
# libllama2, ./testc, build/sanitize/, build/fuzz/. The targets that build the
# programs then put the library and the run program into the Python package
# (llama2c/libllama2.so, llama2c/bin/run), where llama2c/_ffi.py and
# `llama2c run` find them.
#
# Numerics: no target uses -ffast-math or lets the compiler fuse multiply-adds
# (-ffp-contract=off), so every build prints the same tokens as llama2.c's
# `make run`. Speed comes from explicit SIMD kernels chosen at run time and a
# thread pool (LLAMA2_THREADS or OMP_NUM_THREADS set the thread count).

PYTHON ?= python3
# csrc/Makefile, run in csrc/, writing to the repository root
CSRC = $(MAKE) --no-print-directory -C csrc OUT=..

ifeq ($(OS),Windows_NT)
  SHLIB = libllama2.dll
  EXE = .exe
else ifeq ($(shell uname -s),Darwin)
  SHLIB = libllama2.dylib
else
  SHLIB = libllama2.so
endif

# put(file, dest): a copy of file as dest, renamed into place, so that a
# process running the old one keeps it (cp over a running program fails, over
# a loaded library corrupts it)
define put
	@mkdir -p $(dir $(2))
	cp $(1) $(2).tmp && mv -f $(2).tmp $(2)
endef

PROGRAMS = run runfast runomp rungnu runompgnu rundebug
.PHONY: $(PROGRAMS) lib win64 msvc testcc test-neon sanitize bench-kernels fuzz fuzz-smoke test clean

# ./run, ./runq and libllama2, with the flags csrc/Makefile gives each target
$(PROGRAMS):
	$(CSRC) $@
	$(call put,$(SHLIB),llama2c/$(SHLIB))
	$(call put,run$(EXE),llama2c/bin/run$(EXE))

lib:
	$(CSRC) lib
	$(call put,$(SHLIB),llama2c/$(SHLIB))

# run.exe, runq.exe and llama2.dll: cross-compiled with mingw-w64 (left at the
# root only), or built with MSVC where cl.exe is on PATH (also put into the package)
win64:
	$(CSRC) win64

msvc:
	$(CSRC) msvc
	$(call put,llama2.dll,llama2c/llama2.dll)
	$(call put,run.exe,llama2c/bin/run.exe)

# C unit tests (VERBOSITY=1 prints every check); the ASan + UBSan build of
# everything into build/sanitize/ (CI runs both); kernel timings.
testcc sanitize bench-kernels:
	$(CSRC) $@

# The NEON kernels without ARM hardware: C tests and stories260K runs for
# aarch64 under qemu (csrc/Makefile; needs gcc-aarch64-linux-gnu and qemu-user).
test-neon:
	$(CSRC) test-neon SHARED_DATA=$(abspath ../shared/data)

clean:
	$(CSRC) clean
	rm -f llama2c/$(SHLIB) llama2c/llama2.dll
	rm -rf llama2c/bin

# The test command README.md shows: C unit tests, then the Python suite.
test: run testcc
	$(PYTHON) -m pytest -q

# ---- fuzzing (fuzz/README.md) ----
# `make fuzz`: build/fuzz/fuzz_llama2, the harness csrc/fuzz_llama2.c with its
# own mutational driver (gcc, ASan + UBSan, coverage feedback), and with clang
# (and its libFuzzer runtime) build/fuzz/fuzz_llama2_libfuzzer; csrc/Makefile
# builds them.
# `make fuzz-smoke`: seed corpus into build/fuzz-corpus, every seed once, then
# FUZZ_SECONDS of fuzzing (libFuzzer when built, else the gcc driver); any
# sanitizer report, leak, crash, timeout or memory blow-up fails it, and the
# input is left in build/fuzz/artifacts/.
FUZZ_SECONDS ?= 90
FUZZ_SEED ?= 1
FUZZ_ENGINE ?= auto
FUZZ_CORPUS ?= build/fuzz-corpus
FUZZ_ASAN_OPTIONS = detect_leaks=1:allocator_may_return_null=1
FUZZ_UBSAN_OPTIONS = halt_on_error=1:abort_on_error=1:print_stacktrace=1

fuzz:
	$(CSRC) fuzz

fuzz-smoke: fuzz
	rm -rf build/fuzz/artifacts && mkdir -p build/fuzz/artifacts
	$(PYTHON) fuzz/make_corpus.py $(FUZZ_CORPUS)
	ASAN_OPTIONS=$(FUZZ_ASAN_OPTIONS) UBSAN_OPTIONS=$(FUZZ_UBSAN_OPTIONS) ./build/fuzz/fuzz_llama2 -runs=0 \
	  -timeout=20 -artifact_prefix=build/fuzz/artifacts/ $(FUZZ_CORPUS)
	@engine=$(FUZZ_ENGINE); \
	if [ "$$engine" = auto ]; then \
	  if [ -x build/fuzz/fuzz_llama2_libfuzzer ]; then engine=libfuzzer; else engine=gcc; fi; fi; \
	echo "fuzz-smoke: $(FUZZ_SECONDS) s with the $$engine engine, seed $(FUZZ_SEED)"; \
	if [ "$$engine" = libfuzzer ]; then \
	  mkdir -p build/fuzz/libfuzzer-corpus && \
	  ASAN_OPTIONS=$(FUZZ_ASAN_OPTIONS) UBSAN_OPTIONS=$(FUZZ_UBSAN_OPTIONS) ./build/fuzz/fuzz_llama2_libfuzzer \
	    -max_total_time=$(FUZZ_SECONDS) -seed=$(FUZZ_SEED) -timeout=20 -rss_limit_mb=2048 \
	    -malloc_limit_mb=1048576 -max_len=1300000 \
	    -print_final_stats=1 -artifact_prefix=build/fuzz/artifacts/ build/fuzz/libfuzzer-corpus $(FUZZ_CORPUS); \
	else \
	  ASAN_OPTIONS=$(FUZZ_ASAN_OPTIONS) UBSAN_OPTIONS=$(FUZZ_UBSAN_OPTIONS) ./build/fuzz/fuzz_llama2 \
	    -max_total_time=$(FUZZ_SECONDS) -seed=$(FUZZ_SEED) -timeout=20 -rss_limit_mb=2048 \
	    -artifact_prefix=build/fuzz/artifacts/ $(FUZZ_CORPUS); \
	fi
