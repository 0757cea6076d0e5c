"""Builds libllama2 and the `run` program (csrc/) into the llama2c package during `pip install`.

The library is a plain C shared library that llama2c/_ffi.py loads with cffi
(ABI mode), not a Python extension module; setuptools' extension machinery is
only used to compile and link it with the platform's compiler. The program
(llama2c/bin/run, run.exe on Windows) is what `llama2c run` executes. If
`make` already left an up-to-date build in llama2c/, that build is used as it is.
The lists of sources are csrc/Makefile's, read from it.
"""
import filecmp
import os
import re
import shutil
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent


def make_list(name):
    """csrc/Makefile's `NAME = a.c b.c \\ ...` as paths from here (csrc/a.c, ...)."""
    text = (HERE / "csrc" / "Makefile").read_text()
    found = re.search(rf"^{name}[ \t]*=((?:.*\\\n)*.*)$", text, re.M)
    if not found:
        raise RuntimeError(f"csrc/Makefile has no {name} list")
    return ["csrc/" + f for f in found.group(1).replace("\\\n", " ").split()]


LIB_SOURCES = make_list("LIB_SRC")
HEADERS = make_list("HDR")
RUN_SOURCES = make_list("RUN_SRC") + LIB_SOURCES  # the program: its main(), cli.c, the library
RUN_DEPENDS = RUN_SOURCES + HEADERS + ["csrc/cli.h"]

if sys.platform == "win32":
    LIB_NAME = "llama2.dll"
elif sys.platform == "darwin":
    LIB_NAME = "libllama2.dylib"
else:
    LIB_NAME = "libllama2.so"
RUN_NAME = "run.exe" if sys.platform == "win32" else "run"


def up_to_date(built, sources):
    """True when `make` left `built` after the last change to any of sources."""
    return built.is_file() and built.stat().st_mtime >= max((HERE / s).stat().st_mtime for s in sources)


def put(src, dest):
    """dest becomes a copy of src, renamed into place: a process running the
    old file keeps it (a running program cannot be written to, and rewriting
    a loaded library crashes whoever has it loaded). Identical files are left alone."""
    if dest.is_file() and filecmp.cmp(src, dest, shallow=False):
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.copy2(src, tmp)  # with its mode: the program stays executable
    os.replace(tmp, dest)


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

    def run(self):
        # Built into build_lib; for `pip install -e .` (inplace) copied into
        # llama2c/ here, by put(), rather than by setuptools' in-place copy.
        inplace, self.inplace = self.inplace, False
        super().run()
        self.inplace = inplace
        if inplace:
            built = Path(self.build_lib) / "llama2c"
            put(built / LIB_NAME, HERE / "llama2c" / LIB_NAME)
            put(built / "bin" / RUN_NAME, HERE / "llama2c" / "bin" / RUN_NAME)

    def build_extension(self, ext):
        target = Path(self.get_ext_fullpath(ext.name))
        self._build_library(ext, target)
        self._build_program(target.parent / "bin" / RUN_NAME)

    def _build_library(self, ext, target):
        prebuilt = HERE / "llama2c" / LIB_NAME
        if up_to_date(prebuilt, LIB_SOURCES + HEADERS):
            print(f"llama2c: using the library built by make: {prebuilt}")
            put(prebuilt, target)
            return
        compile_args, link_args = self._compiler_flags()
        ext.extra_compile_args = compile_args
        ext.extra_link_args = link_args
        if sys.platform == "win32":
            ext.define_macros = [("LLAMA2_BUILD_DLL", None)]
        super().build_extension(ext)

    def _build_program(self, target):
        """`run` (llama2c/bin/run): what `llama2c run` executes."""
        prebuilt = HERE / "llama2c" / "bin" / RUN_NAME
        if up_to_date(prebuilt, RUN_DEPENDS):
            print(f"llama2c: using the run program built by make: {prebuilt}")
            put(prebuilt, target)
            return
        compile_args, link_args = self._compiler_flags()
        objects = self.compiler.compile(RUN_SOURCES, output_dir=os.path.join(self.build_temp, "run"),
                                        extra_postargs=compile_args, debug=self.debug)
        self.compiler.link_executable(objects, "run", output_dir=str(target.parent),
                                      extra_postargs=link_args, debug=self.debug)


setup(
    ext_modules=[Extension("llama2c.libllama2", sources=LIB_SOURCES, depends=HEADERS)],
    cmdclass={"build_ext": BuildLibllama2},
)
