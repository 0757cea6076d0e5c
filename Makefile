# llama2c build. The targets are llama2.c's; each leaves ./run, ./runq and the
# shared library libllama2 (also copied into llama2c/ for the Python package).
#
# Numerics: no target uses -ffast-math or lets the compiler fuse multiply-adds
# (-ffp-contract=off), so every build prints the same tokens as llama2.c's
# `make run`. Speed comes from explicit SIMD kernels chosen at run time and a
# thread pool (LLAMA2_THREADS or OMP_NUM_THREADS set the thread count).

CC ?= gcc
PYTHON ?= python3
LIB_SRC = csrc/checkpoint.c csrc/run.c csrc/runq.c csrc/forward.c csrc/tokenizer.c \
          csrc/sampler.c csrc/session.c csrc/kernels.c csrc/kernels_avx2.c csrc/threadpool.c \
          csrc/memory.c csrc/context.c csrc/errors.c csrc/weight_types.c
HDR = csrc/llama2.h csrc/internal.h csrc/kernels.h csrc/threadpool.h
BASE_FLAGS = -std=c11 -D_POSIX_C_SOURCE=200809L -Wall -Wextra -Wno-unused-parameter -Wno-unknown-pragmas -ffp-contract=off
LIBS = -lm -pthread

ifeq ($(OS),Windows_NT)
  SHLIB = libllama2.dll
else ifeq ($(shell uname -s),Darwin)
  SHLIB = libllama2.dylib
else
  SHLIB = libllama2.so
endif

# build(flags): run, runq and the shared library with those flags
define build
	$(CC) $(BASE_FLAGS) $(1) -o run csrc/cli.c $(LIB_SRC) $(LIBS)
	$(CC) $(BASE_FLAGS) $(1) -DLLAMA2_RUNQ -o runq csrc/cli.c $(LIB_SRC) $(LIBS)
	$(CC) $(BASE_FLAGS) $(1) -fPIC -shared -o $(SHLIB) $(LIB_SRC) $(LIBS)
	cp $(SHLIB) llama2c/$(SHLIB)
endef

.PHONY: run runfast runomp rungnu runompgnu rundebug win64 testcc sanitize clean

run:
	$(call build,-O3)

runfast:
	$(call build,-O3 -funroll-loops)

# Threads come from the library's own pool (csrc/threadpool.c), so the OpenMP
# targets build the same thing; OMP_NUM_THREADS is still honoured.
runomp:
	$(call build,-O3)

rungnu:
	$(call build,-O3 -std=gnu11)

runompgnu:
	$(call build,-O3 -std=gnu11)

rundebug:
	$(call build,-O0 -g)

# Cross-compile for Windows with mingw-w64 (apt-get install gcc-mingw-w64-x86-64).
MINGW ?= x86_64-w64-mingw32-gcc
win64:
	$(MINGW) -std=c11 -O3 -ffp-contract=off -o run.exe csrc/cli.c $(LIB_SRC)
	$(MINGW) -std=c11 -O3 -ffp-contract=off -DLLAMA2_RUNQ -o runq.exe csrc/cli.c $(LIB_SRC)
	$(MINGW) -std=c11 -O3 -ffp-contract=off -DLLAMA2_BUILD_DLL -shared -o llama2.dll $(LIB_SRC)

# C unit tests; VERBOSITY=1 prints every check.
VERBOSITY ?= 0
testcc:
	$(CC) $(BASE_FLAGS) -O1 -g -DVERBOSITY=$(VERBOSITY) -o testc csrc/test_llama2.c $(LIB_SRC) $(LIBS)
	./testc

# AddressSanitizer + UndefinedBehaviorSanitizer build of everything (CI runs it).
SAN = -O1 -g -fsanitize=address,undefined,float-cast-overflow -fno-sanitize-recover=all -fno-omit-frame-pointer
sanitize:
	mkdir -p build/sanitize
	$(CC) $(BASE_FLAGS) $(SAN) -o build/sanitize/run csrc/cli.c $(LIB_SRC) $(LIBS)
	$(CC) $(BASE_FLAGS) $(SAN) -DLLAMA2_RUNQ -o build/sanitize/runq csrc/cli.c $(LIB_SRC) $(LIBS)
	$(CC) $(BASE_FLAGS) $(SAN) -o build/sanitize/testc csrc/test_llama2.c $(LIB_SRC) $(LIBS)
	$(CC) $(BASE_FLAGS) $(SAN) -fPIC -shared -o build/sanitize/$(SHLIB) $(LIB_SRC) $(LIBS)

clean:
	rm -f run runq run.exe runq.exe llama2.dll testc $(SHLIB) llama2c/$(SHLIB)
	rm -rf build

# The test command README.md shows: C unit tests, then the Python suite.
.PHONY: test
test: run testcc
	$(PYTHON) -m pytest -q

# Times each kernel alone (one thread): `make bench-kernels`.
.PHONY: bench-kernels
bench-kernels:
	$(CC) $(BASE_FLAGS) -O3 -o build/bench_kernels csrc/bench_kernels.c $(LIB_SRC) $(LIBS) || (mkdir -p build && $(CC) $(BASE_FLAGS) -O3 -o build/bench_kernels csrc/bench_kernels.c $(LIB_SRC) $(LIBS))
	./build/bench_kernels

# ---- fuzzing (fuzz/README.md) ----
# `make fuzz`: build/fuzz/fuzz_llama2, the harness csrc/fuzz_llama2.c with its
# own mutational driver, gcc, ASan + UBSan (float-cast-overflow too); the
# parsing code (FUZZ_COV_SRC) is built with -fsanitize-coverage=trace-pc so the
# driver keeps inputs that reach new code. With clang (and its libFuzzer
# runtime) also build/fuzz/fuzz_llama2_libfuzzer.
# `make fuzz-smoke`: seed corpus into build/fuzz-corpus, every seed once, then
# FUZZ_SECONDS of fuzzing (libFuzzer when built, else the gcc driver); any
# sanitizer report, leak, crash, timeout or memory blow-up fails it, and the
# input is left in build/fuzz/artifacts/.
FUZZ_CC ?= gcc
FUZZ_CLANG ?= clang
FUZZ_SAN = -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all -fsanitize=float-cast-overflow \
           -fno-omit-frame-pointer
FUZZ_COV_SRC = csrc/checkpoint.c csrc/tokenizer.c csrc/session.c csrc/sampler.c
FUZZ_SECONDS ?= 90
FUZZ_SEED ?= 1
FUZZ_ENGINE ?= auto
FUZZ_CORPUS ?= build/fuzz-corpus
FUZZ_ASAN_OPTIONS = detect_leaks=1:allocator_may_return_null=1
FUZZ_UBSAN_OPTIONS = halt_on_error=1:abort_on_error=1:print_stacktrace=1

.PHONY: fuzz fuzz-smoke
fuzz: build/fuzz/fuzz_llama2 build/fuzz/fuzz_llama2_libfuzzer

build/fuzz/fuzz_llama2: csrc/fuzz_llama2.c $(LIB_SRC) $(HDR)
	rm -rf build/fuzz/obj && mkdir -p build/fuzz/obj/cov build/fuzz/obj/plain
	cd build/fuzz/obj/cov && $(FUZZ_CC) $(BASE_FLAGS) $(FUZZ_SAN) -fsanitize-coverage=trace-pc \
	  -c $(addprefix $(CURDIR)/,$(filter $(FUZZ_COV_SRC),$(LIB_SRC)))
	cd build/fuzz/obj/plain && $(FUZZ_CC) $(BASE_FLAGS) $(FUZZ_SAN) \
	  -c $(addprefix $(CURDIR)/,$(filter-out $(FUZZ_COV_SRC),$(LIB_SRC)))
	$(FUZZ_CC) $(BASE_FLAGS) $(FUZZ_SAN) -o $@ csrc/fuzz_llama2.c build/fuzz/obj/cov/*.o build/fuzz/obj/plain/*.o $(LIBS)

# Skipped (with a message) when clang or its libFuzzer runtime is missing:
# apt-get install clang (Debian's clang brings libclang-rt-NN-dev).
build/fuzz/fuzz_llama2_libfuzzer: csrc/fuzz_llama2.c $(LIB_SRC) $(HDR)
	@mkdir -p build/fuzz
	@if ! command -v $(FUZZ_CLANG) >/dev/null 2>&1; then \
	  echo "fuzz: $(FUZZ_CLANG) not found: no libFuzzer build (apt-get install clang)"; \
	elif $(FUZZ_CLANG) $(BASE_FLAGS) -DLLAMA2_LIBFUZZER $(FUZZ_SAN) -fsanitize=fuzzer \
	    -o $@ csrc/fuzz_llama2.c $(LIB_SRC) $(LIBS); then \
	  echo "fuzz: built $@"; \
	else rm -f $@; echo "fuzz: $(FUZZ_CLANG) could not build the libFuzzer harness: skipped"; fi

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
