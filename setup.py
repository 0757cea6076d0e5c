"""Builds libllama2 (csrc/) into the llama2c package during `pip install`.

The library is a plain C shared library that llama2c/_ffi.py loads with cffi
(ABI mode), not a Python extension module; setuptools' extension machinery is
only used to compile and link it with the platform's compiler. If `make`
already left an up-to-date build in llama2c/, that build is used as it is.
"""
import os
import shutil
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
LIB_SOURCES = ["csrc/checkpoint.c", "csrc/run.c", "csrc/runq.c", "csrc/forward.c",
               "csrc/tokenizer.c", "csrc/sampler.c", "csrc/session.c", "csrc/kernels.c",
               "csrc/kernels_avx2.c", "csrc/threadpool.c", "csrc/memory.c",
               "csrc/context.c", "csrc/errors.c", "csrc/weight_types.c"]
HEADERS = ["csrc/llama2.h", "csrc/internal.h", "csrc/kernels.h", "csrc/threadpool.h"]

if sys.platform == "win32":
    LIB_NAME = "llama2.dll"
elif sys.platform == "darwin":
    LIB_NAME = "libllama2.dylib"
else:
    LIB_NAME = "libllama2.so"


class BuildLibllama2(build_ext):
    def get_ext_filename(self, fullname):
        # called with "llama2c.libllama2" and with "libllama2": keep the package part
        parts = fullname.split(".")
        if parts[-1] == "libllama2":
            return os.path.join(*parts[:-1], LIB_NAME)
        return super().get_ext_filename(fullname)

    def get_export_symbols(self, ext):
        return []  # a C library, not a module: there is no PyInit_ to export

    def _compiler_flags(self):
        if self.compiler.compiler_type == "msvc":
            return ["/O2", "/fp:precise"], []
        # the same numerics as the Makefile: no fast-math, no fused multiply-add
        return ["-O3", "-std=c11", "-D_POSIX_C_SOURCE=200809L", "-ffp-contract=off", "-pthread"], ["-lm", "-pthread"]

    def build_extension(self, ext):
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        prebuilt = HERE / "llama2c" / LIB_NAME
        newest_source = max((HERE / s).stat().st_mtime for s in LIB_SOURCES + HEADERS)
        if prebuilt.is_file() and prebuilt.stat().st_mtime >= newest_source:
            print(f"llama2c: using the library built by make: {prebuilt}")
            if prebuilt.resolve() != target.resolve():
                shutil.copyfile(prebuilt, target)
            return
        compile_args, link_args = self._compiler_flags()
        ext.extra_compile_args = compile_args
        ext.extra_link_args = link_args
        if sys.platform == "win32":
            ext.define_macros = [("LLAMA2_BUILD_DLL", None)]
        super().build_extension(ext)


setup(
    ext_modules=[Extension("llama2c.libllama2", sources=LIB_SOURCES, depends=HEADERS)],
    cmdclass={"build_ext": BuildLibllama2},
)
