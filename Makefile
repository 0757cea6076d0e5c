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
          csrc/memory.c
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
